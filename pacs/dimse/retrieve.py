"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): sub-operations that send stored bytes.

Why not pynetdicom's own flow
-----------------------------
pynetdicom's Q/R service class takes a ``Dataset`` from the handler for every
sub-operation, so every instance would be decoded and re-encoded (objects are sent as
stored here), and it sets the Move Originator AE Title of the
C-STORE sub-operations to its *own* AE title instead of the C-MOVE requestor's (PS3.7
9.3.1.1).  :class:`RetrieveServiceClass` therefore replaces the two methods that run
the sub-operations; :func:`install` makes pynetdicom use it for the Patient Root and
Study Root models.  Its C-FIND is :func:`pacs.dimse.find.serve_find`; the association
and the DIMSE messages stay pynetdicom's.

How an instance is sent
-----------------------
As stored when the peer accepted its syntax, else converted to an uncompressed one it
accepted, else the sub-operation fails (:mod:`pacs.dimse.sender`, which also makes the
next instance ready while the destination stores the current one).  Requests and pending
responses are written straight to the sockets, and the C-STORE responses read straight
from the peer's socket (:mod:`pacs.dimse.wire`).

Counts and statuses
-------------------
Pending (FF00) after each sub-operation with Remaining / Completed / Failed / Warning
(PS3.7 9.1.3, 9.1.4); final Success (0000), Warning (B000) with the Failed SOP Instance
UID List (0008,0058) when some failed, A702 when all failed or the destination refused
the association, Cancel (FE00) after a C-CANCEL with Remaining = not started.  The
number of sub-operations is counted before the first one; instances stored meanwhile
are not sent and instances removed meanwhile count as failed, so the counts always add
up to the announced total.  Counts are US values, so a retrieve of more than 65,535
instances is refused (A701) with a comment asking for a lower level.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from itertools import islice
from typing import TYPE_CHECKING, Any, NoReturn

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import association, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass, StorageServiceClass

from pacs.core import transcode
from pacs.core.attributes import Level
from pacs.dimse import contexts, find, reactor, wire
from pacs.dimse.sender import Prepared, Sender
from pacs.dimse.storage import StoreServiceClass, answer_invalid_store, bound_services
from pacs.dimse.identifier import to_retrieve_query
from pacs.dimse.status import (
    MOVE_DESTINATION_UNKNOWN,
    RETRIEVE_CANCELLED,
    RETRIEVE_PENDING,
    RETRIEVE_STATUS,
    RETRIEVE_SUCCESS,
    RETRIEVE_WARNING,
    SUBOPERATIONS_FAILED,
    TOO_MANY_MATCHES,
    status_for,
)
from pacs.core.errors import Cancelled, PacsError

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from pacs.core.config import Modality
    from pacs.core.query.model import InstanceRef, Query
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Sub-operation counts are US (PS3.7 Table 9.3-4/9.3-6): at most 65,535 per request.
MAX_SUBOPERATIONS = 0xFFFF
#: Presentation context IDs are odd numbers 1-255 (PS3.8 9.3.2.2): 128 per association.
MAX_CONTEXTS = 128
#: Longest value of a short-length VR such as UI in explicit VR (PS3.5 7.1.2).
_MAX_SHORT_VALUE = 0xFFFE

_install_lock = threading.Lock()
_installed = False


class Outcome(enum.Enum):
    """What a C-STORE sub-operation came to (PS3.4 C.4.2.3.1 counts)."""

    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"


#: C-STORE statuses a sub-operation counts as a warning (PS3.7 C.4: 0001, 0107, 0116
#: and Bxxx).  0111 (duplicate SOP instance) too: the destination has the object,
#: which is what the requestor wanted (Orthanc treats it the same way).
_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0111, 0x0116})


def classify(status: int | None) -> Outcome:
    """The outcome of a C-STORE sub-operation from its response status.

    Parameters
    ----------
    status : int or None
        The (0000,0900) Status of the C-STORE response; ``None`` when there was no
        valid response (timeout, abort).
    """
    if status == 0x0000:
        return Outcome.COMPLETED
    if status is not None and (status in _WARNING_CODES or 0xB000 <= status <= 0xBFFF):
        return Outcome.WARNING
    return Outcome.FAILED


@dataclass
class Counts:
    """Sub-operation counts of one C-MOVE / C-GET (PS3.4 C.4.2.1.6, C.4.3.1.5).

    Attributes
    ----------
    total :
        Sub-operations announced (counted before the first one).
    completed, warning, failed :
        Sub-operations finished so far, by outcome.
    failed_uids :
        SOP Instance UIDs of the failed ones, for (0008,0058).
    """

    total: int
    completed: int = 0
    warning: int = 0
    failed: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        """Sub-operations not started yet."""
        return max(self.total - self.completed - self.warning - self.failed, 0)

    def record(self, outcome: Outcome, sop_uid: str) -> None:
        """Count one finished sub-operation."""
        if outcome is Outcome.COMPLETED:
            self.completed += 1
        elif outcome is Outcome.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fail_remaining(self) -> None:
        """Count what was announced but never came (instances removed meanwhile)."""
        self.failed += self.remaining

    def final_status(self, cancelled: bool) -> int:
        """The final status (PS3.4 Table C.4-2 / C.4-3).

        A702 when every sub-operation failed, as pynetdicom and dcm4chee answer.
        """
        if cancelled:
            return RETRIEVE_CANCELLED
        if not self.failed and not self.warning:
            return RETRIEVE_SUCCESS
        if self.failed == self.total:
            return SUBOPERATIONS_FAILED
        return RETRIEVE_WARNING


# -- C-MOVE destination association --------------------------------------------------

def destination_contexts(classes: Mapping[str, set[str]]) -> list[PresentationContext]:
    """Presentation contexts to propose to a C-MOVE destination (at most 128).

    One context per transfer syntax, so that each accepted context says exactly which
    syntax the destination takes: first the stored syntaxes of every SOP class (to send
    as stored), then Explicit and then Implicit VR Little Endian for every class (to
    convert to).  Beyond 128 the last are dropped; instances that then have no context
    fail as sub-operations.
    """
    wanted = [(sop_class, syntax) for sop_class, syntaxes in classes.items()
              for syntax in sorted(syntaxes)]
    for target in transcode.UNCOMPRESSED:
        wanted += [(sop_class, target) for sop_class, syntaxes in classes.items()
                   if target not in syntaxes]
    if len(wanted) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing the first %d",
                    len(wanted), MAX_CONTEXTS)
    return [build_context(sop_class, [syntax]) for sop_class, syntax in wanted[:MAX_CONTEXTS]]


def _nodelay(event: Event) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the destination socket (no Nagle delay per message), and
    blocked sends bounded by the DIMSE timeout (:func:`pacs.dimse.wire.bound_sends`)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.bound_sends(sock.socket, event.assoc.dimse_timeout)


# -- handlers bound to EVT_C_MOVE / EVT_C_GET ------------------------------------------

def _not_installed(event: Event, services: Services) -> NoReturn:
    raise RuntimeError("C-MOVE/C-GET are served by pacs.dimse.retrieve."
                       "RetrieveServiceClass; call pacs.dimse.retrieve.install()")


def handle_move(event: Event, services: Services) -> NoReturn:
    """EVT_C_MOVE: binds ``services`` for :class:`RetrieveServiceClass`.

    pynetdicom never calls it once :func:`install` has run; if it does, the request is
    answered with pynetdicom's handler-failure status (C511) instead of pynetdicom's
    decode-and-re-encode flow.
    """
    _not_installed(event, services)


def handle_get(event: Event, services: Services) -> NoReturn:
    """EVT_C_GET: binds ``services`` for :class:`RetrieveServiceClass` (see
    :func:`handle_move`; pynetdicom's failure status here is C411)."""
    _not_installed(event, services)


# -- the service class -----------------------------------------------------------------

#: Command Fields of C-GET-RSP and C-MOVE-RSP (PS3.7 E.1-1).
_C_GET_RSP, _C_MOVE_RSP = 0x8010, 0x8021

Response = C_MOVE | C_GET


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """Query/Retrieve with our own C-MOVE and C-GET sub-operations (PS3.4 C.4.2, C.4.3).

    The dispatch in ``SCP`` is pynetdicom's; it calls :meth:`_c_find_scp`,
    :meth:`_move_scp` and :meth:`_get_scp` below.  The :class:`~pacs.core.services.Services`
    come from the handler bound to the request's event (EVT_C_FIND, EVT_C_MOVE or
    EVT_C_GET, see :func:`pacs.dimse.handlers.bind`), so nothing is global.
    """

    # -- C-FIND --

    def _c_find_scp(self, req: C_FIND, context: PresentationContext) -> None:
        """C-FIND SCP (PS3.4 C.4.1.2): see :mod:`pacs.dimse.find`."""
        find.serve_find(self, req, context, self._bound_services(evt.EVT_C_FIND))

    # -- C-MOVE --

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        """C-MOVE SCP (PS3.4 C.4.2.2): sub-operations over a new association.

        =====  ==================================================================
        FF00   a sub-operation finished, more remain (with the four counts)
        0000   every sub-operation completed; also when nothing matched
        B000   finished with failures (Failed SOP Instance UID List) or warnings
        A702   every sub-operation failed, or the destination refused us
        A801   the Move Destination is not a configured modality
        A900   the identifier breaks the retrieve rules (C.4.2.1.4)
        A701   the index failed, or more than 65,535 instances matched
        FE00   cancelled by C-CANCEL (Remaining = sub-operations not started)
        C000   anything else (a bug), with an Error Comment
        =====  ==================================================================
        """
        rsp = self._response(C_MOVE(), req)
        cx_id = int(context.context_id or 0)
        try:
            services = self._bound_services(evt.EVT_C_MOVE)
            destination = services.settings.destinations.get(
                str(req.MoveDestination or "").strip())
            if destination is None:
                log.warning("C-MOVE from %s refused: move destination %r is not configured",
                            self.assoc.requestor.ae_title, req.MoveDestination)
                self._final(rsp, cx_id, context, MOVE_DESTINATION_UNKNOWN,
                            comment="move destination unknown")
                return
            query = self._retrieve_query(req, context, contexts.MOVE_MODELS)
            cancelled = find.CancelWatch(self.is_cancelled, int(req.MessageID or 0))
            total, classes = _survey(services, query, cancelled)
            if self._refused_by_count(rsp, cx_id, context, total):
                return
            store_assoc = self._associate(destination, classes, services)
            if store_assoc is None:
                counts = Counts(total, failed=total)
                self._final(rsp, cx_id, context, SUBOPERATIONS_FAILED, counts,
                            comment="move destination refused the association")
                return
            try:
                originator = (str(self.assoc.requestor.ae_title), int(req.MessageID or 0))
                self._suboperations(rsp, cx_id, context, services, query, total,
                                    store_assoc, cancelled, originator)
            finally:
                if store_assoc.is_established:
                    store_assoc.release()
        except Exception as exc:
            self._failed(rsp, cx_id, context, exc, "C-MOVE")

    def _associate(self, destination: Modality, classes: Mapping[str, set[str]],
                   services: Services) -> Association | None:
        """Open the association to the C-MOVE destination, or ``None`` if refused."""
        store_assoc = self.ae.associate(
            destination.host, destination.port,
            contexts=destination_contexts(classes), ae_title=destination.ae_title,
            max_pdu=services.settings.max_pdu, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if store_assoc.is_established:
            return store_assoc
        log.warning("C-MOVE destination %s (%s:%d) refused or could not be reached",
                    destination.ae_title, destination.host, destination.port)
        # pynetdicom leaves the socket of a rejected association open (its own move
        # SCP closes it by hand too).
        sock = store_assoc.dul.socket
        if sock is not None:
            sock.close()
        return None

    # -- C-GET --

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        """C-GET SCP (PS3.4 C.4.3.2): sub-operations over the requestor's association.

        An instance goes in a storage context the requestor accepted with the SCP role
        for itself (role selection, PS3.7 D.3.3.4).  Statuses as for C-MOVE, without
        A801; zero matches give 0000.
        """
        rsp = self._response(C_GET(), req)
        cx_id = int(context.context_id or 0)
        try:
            services = self._bound_services(evt.EVT_C_GET)
            query = self._retrieve_query(req, context, contexts.GET_MODELS)
            cancelled = find.CancelWatch(self.is_cancelled, int(req.MessageID or 0))
            total = services.engine.count(_at_image(query), cancelled=cancelled)
            if self._refused_by_count(rsp, cx_id, context, total):
                return
            self._suboperations(rsp, cx_id, context, services, query, total, self.assoc,
                                cancelled, originator=None)
        except Exception as exc:
            self._failed(rsp, cx_id, context, exc, "C-GET")

    # -- shared --

    def _bound_services(self, event: evt.EventType) -> Services:
        """The services bound to ``event`` by :func:`pacs.dimse.handlers.bind`."""
        return bound_services(self.assoc, event)

    def _retrieve_query(self, req: C_MOVE | C_GET, context: PresentationContext,
                        models: Mapping[str, str]) -> Query:
        """The request's identifier as a query (PS3.4 C.4.2.1.4, C.4.3.1.3).

        Raises
        ------
        InvalidQuery
            The identifier breaks the retrieve rules (A900).
        """
        syntax = context.transfer_syntax[0]
        identifier = decode(req.Identifier, syntax.is_implicit_VR,  # type: ignore[arg-type]
                            syntax.is_little_endian, syntax.is_deflated)
        return to_retrieve_query(identifier, models[str(req.AffectedSOPClassUID)])

    def _refused_by_count(self, rsp: Response, cx_id: int, context: PresentationContext,
                          total: int) -> bool:
        """Answer zero matches (0000) and too many (A701); True when answered."""
        if total == 0:
            # Nothing to send: no association to the destination (pynetdicom #436).
            self._final(rsp, cx_id, context, RETRIEVE_SUCCESS, Counts(0))
            return True
        if total > MAX_SUBOPERATIONS:
            log.warning("retrieve refused: %d instances match, more than %d",
                        total, MAX_SUBOPERATIONS)
            self._final(rsp, cx_id, context, TOO_MANY_MATCHES,
                        comment="more than 65535 instances; retrieve at a lower level")
            return True
        return False

    def _suboperations(self, rsp: Response, cx_id: int, context: PresentationContext,
                       services: Services, query: Query, total: int, peer: Association,
                       cancelled: find.CancelWatch, originator: tuple[str, int] | None) -> None:
        """Send each instance, with a pending response after each, then the final one.

        At most ``total`` instances are sent (the count announced to the requestor);
        the requestor's association going away ends the loop silently.
        """
        counts = Counts(total)
        request_id = int(rsp.MessageIDBeingRespondedTo)

        def cancel(message_id: int) -> None:  # a C-CANCEL read with the responses (C-GET)
            if message_id == request_id:
                cancelled.seen = True

        instances = services.engine.instances(_at_image(query), cancelled=cancelled)
        ahead: tuple[InstanceRef, Prepared | None] | None = None
        try:
            # Every reference is read before the first send: a read transaction held
            # while a slow peer takes its objects would keep the WAL from being
            # checkpointed.  A C-CANCEL from here on is seen by ``cancelled()``.
            refs = enumerate(list(islice(instances, total)))
            with wire.reactor_paused(peer), reactor.socket_lent(peer) as lent:
                sender = Sender(peer, services.store, originator, direct=lent,
                                on_cancel=cancel if originator is None else None,
                                settings=services.settings)
                ahead = _next(sender, refs)
                while ahead is not None:
                    if cancelled() or not self.assoc.is_established:
                        break
                    ref, prepared = ahead
                    ahead = None
                    written = prepared is not None and sender.write(prepared)
                    # The next one is made ready while the destination stores this one.
                    # Whatever that raises (a C-CANCEL seen by the engine, an index
                    # failure) waits until this sub-operation's response is read and
                    # counted: a request on the wire is never left unanswered.
                    stop: BaseException | None = None
                    try:
                        ahead = _next(sender, refs)
                    except Exception as exc:  # noqa: BLE001 - re-raised below
                        stop = exc
                    outcome = (classify(sender.response_status()) if written
                               else Outcome.FAILED)
                    counts.record(outcome, ref.sop_uid)
                    if stop is not None:
                        raise stop
                    if counts.remaining:
                        self._pending(rsp, cx_id, counts)
        except Cancelled:
            pass  # the engine saw the C-CANCEL first; ``cancelled`` remembers it
        finally:
            if ahead is not None and ahead[1] is not None:
                ahead[1].close()
            close = getattr(instances, "close", None)
            if close is not None:
                close()  # end the SQLite statement now, not at garbage collection
        if not self.assoc.is_established:
            return
        if not cancelled.seen:
            counts.fail_remaining()
        status = counts.final_status(cancelled.seen)
        log.info("%s from %s: %d sub-operations, %d completed, %d warning, %d failed, "
                 "status %04X", "C-GET" if originator is None else "C-MOVE",
                 self.assoc.requestor.ae_title, total, counts.completed, counts.warning,
                 counts.failed, status)
        self._final(rsp, cx_id, context, status, counts)

    @staticmethod
    def _response(rsp: Response, req: C_MOVE | C_GET) -> Response:
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        return rsp

    def _pending(self, rsp: Response, cx_id: int, counts: Counts) -> None:
        """FF00 with the four counts (PS3.4 C.4.2.1.6), written straight to the socket
        like the sub-operations (:func:`pacs.dimse.wire.write_message`).  A requestor
        gone away ends the retrieve: the association is aborted and the loop stops."""
        command_field = _C_GET_RSP if isinstance(rsp, C_GET) else _C_MOVE_RSP
        command = wire.response_command(
            command_field, str(rsp.AffectedSOPClassUID), int(rsp.MessageIDBeingRespondedTo),
            RETRIEVE_PENDING, False,
            counts=(counts.remaining, counts.completed, counts.failed, counts.warning))
        try:
            wire.write_message(self.assoc, cx_id, command)
        except OSError:
            log.warning("the retrieve's requestor went away; sub-operations stopped")

    def _final(self, rsp: Response, cx_id: int, context: PresentationContext, status: int,
               counts: Counts | None = None, comment: str | None = None) -> None:
        """The final response (PS3.4 C.4.2.1.6, C.4.2.3.1).

        Counts go in every final response that had sub-operations (Remaining only after
        a cancel); the Failed SOP Instance UID List when some failed.
        """
        rsp.Status = status
        # pynetdicom declares the attribute by assigning None; it takes a str (LO, 64).
        rsp.ErrorComment = comment[:64] if comment else None  # type: ignore[assignment]
        rsp.NumberOfRemainingSuboperations = (
            counts.remaining if counts is not None and status == RETRIEVE_CANCELLED else None)
        rsp.Identifier = None
        if counts is not None:
            _set_counts(rsp, counts)
            if counts.failed_uids:
                rsp.Identifier = _failed_list(counts.failed_uids, context.transfer_syntax[0])
        self.dimse.send_msg(rsp, cx_id)

    def _failed(self, rsp: Response, cx_id: int, context: PresentationContext,
                exc: BaseException, service: str) -> None:
        """Answer an error that ended the request before or between sub-operations."""
        if isinstance(exc, PacsError):
            log.warning("%s from %s refused: %s", service, self.assoc.requestor.ae_title, exc)
        else:
            log.exception("%s from %s failed unexpectedly", service,
                          self.assoc.requestor.ae_title)
        if not self.assoc.is_established:
            return
        status = status_for(RETRIEVE_STATUS, exc)
        self._final(rsp, cx_id, context, int(status.Status), comment=status.ErrorComment)


def _set_counts(rsp: Response, counts: Counts) -> None:
    rsp.NumberOfCompletedSuboperations = counts.completed
    rsp.NumberOfFailedSuboperations = counts.failed
    rsp.NumberOfWarningSuboperations = counts.warning


def _at_image(query: Query) -> Query:
    """The same constraints, one row per instance (to count sub-operations)."""
    return dataclasses.replace(query, level=Level.IMAGE, return_keys=())


def _next(sender: Sender, refs: Iterator[tuple[int, InstanceRef]]
          ) -> tuple[InstanceRef, Prepared | None] | None:
    """The next instance, prepared for sending (``None`` when there is no more)."""
    item = next(refs, None)
    if item is None:
        return None
    number, ref = item
    return ref, sender.prepare(ref, _message_id(number))


def _message_id(number: int) -> int:
    """Message ID of the ``number``-th sub-operation: 1-65535, wrapping (US, PS3.7 E.1)."""
    return number % 0xFFFF + 1


def _survey(services: Services, query: Query, cancelled: Callable[[], bool],
            ) -> tuple[int, dict[str, set[str]]]:
    """How many instances match, and the stored syntaxes of each SOP class.

    One pass over the index rows (no objects are read): the count for the pending
    responses and the SOP classes for the destination's presentation contexts.
    """
    total = 0
    classes: dict[str, set[str]] = {}
    for ref in services.engine.instances(_at_image(query), cancelled=cancelled):
        total += 1
        classes.setdefault(ref.sop_class_uid, set()).add(ref.transfer_syntax)
    return total, classes


def _failed_list(uids: list[str], syntax: UID) -> BytesIO:
    """The response identifier with (0008,0058) Failed SOP Instance UID List.

    UI has a 2-byte length in explicit VR (PS3.5 7.1.2): when the list is longer than
    that allows, the first UIDs that fit are sent (and the counts stay exact).
    """
    kept = list(uids)
    if not syntax.is_implicit_VR:
        size = 0
        for i, uid in enumerate(kept):
            size += len(uid) + (1 if i else 0)
            if size > _MAX_SHORT_VALUE - 1:  # leave room for padding to even length
                log.warning("Failed SOP Instance UID List shortened to %d of %d UIDs",
                            i, len(uids))
                kept = kept[:i]
                break
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = kept
    encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    return BytesIO(encoded or b"")


# -- installation -----------------------------------------------------------------------

def install() -> None:
    """Make pynetdicom serve our Q/R models (FIND, MOVE, GET) with :class:`RetrieveServiceClass`.

    The smallest patch that does it: ``pynetdicom.association`` looks the service class
    up through its module-level name ``uid_to_service_class`` for every request; that
    name is wrapped once per process.  Sub-operations are written by
    :mod:`pacs.dimse.sender`, not pynetdicom's ``send_c_store``.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        original = association.uid_to_service_class
        ours = (frozenset(contexts.FIND_MODELS) | frozenset(contexts.MOVE_MODELS)
                | frozenset(contexts.GET_MODELS))

        def uid_to_service_class(uid: str) -> type:
            if uid in ours:
                return RetrieveServiceClass
            found = original(uid)
            # Storage SOP classes: our C-STORE flow (pacs.dimse.storage).
            return StoreServiceClass if found is StorageServiceClass else found

        association.uid_to_service_class = uid_to_service_class  # type: ignore[assignment]
        serve_request = association.Association._serve_request

        def _serve_request(self: Association, msg: Any, context_id: int) -> None:
            if not answer_invalid_store(self, msg, context_id):
                serve_request(self, msg, context_id)

        association.Association._serve_request = _serve_request  # type: ignore[method-assign]
        _installed = True
