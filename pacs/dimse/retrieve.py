"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): sub-operations that send stored bytes.

The logic, as plain functions over :class:`~pacs.dimse.connection.Responder` (the
requestor) and :class:`~pacs.dimse.connection.StoreTarget` (where the C-STOREs go):

* :func:`plan`: the identifier as a query under the retrieve rules, the number of
  sub-operations counted before the first one (and, for C-MOVE, the stored syntaxes
  of each SOP class, for the destination's presentation contexts);
* :func:`serve_move` / :func:`serve_get`: the refusals, then :func:`run_suboperations`:
  each instance sent as stored, or converted to an uncompressed syntax the peer
  accepted, or failed (:mod:`pacs.dimse.sender`, which makes the next instance ready
  while the destination stores the current one).

The seam (:mod:`pacs.dimse.seam.services`) runs these over the association's socket,
with the Move Originator AE Title and Message ID of the requestor on each C-STORE
(PS3.7 9.3.1.1).  Without the seam, pynetdicom's own sub-operation loop sends what
:mod:`pacs.dimse.handlers` yields from :func:`plan` and :class:`pacs.dimse.sender.Preparer`.

Counts and statuses
-------------------
Pending (FF00) with Remaining / Completed / Failed / Warning (PS3.7 9.1.3, 9.1.4) after
a sub-operation once ``PACS_PENDING_INTERVAL`` seconds have passed since the retrieve
began or its last pending response (:class:`Pacing`; 0: after each); final Success
(0000), Warning (B000) when some failed, A702 when all failed or the destination
refused the association, Cancel (FE00) after a C-CANCEL with Remaining = not started,
and a Failure status of its own when an error ends the sub-operations.  Each final
Warning, Failure and Cancel response whose sub-operations were counted carries the
Failed SOP Instance UID List (0008,0058) of every instance that was not sent (PS3.4
C.4.2.1.4.2 for C-MOVE, C.4.3.1.3.2 for C-GET): those whose C-STORE failed, and, when the
destination refused the association or an error ended the loop, those never tried (the
instances removed since they were counted have no UID left to name; they are counted
only).  The number of sub-operations is counted
before the first one; instances stored meanwhile are not sent and instances removed
meanwhile count as failed, so the counts always add up to the announced total.  Counts
are US values, so a retrieve of more than 65,535 instances is refused (A701) with a
comment asking for a lower level.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context

from pacs.core import transcode
from pacs.core.access import RETRIEVE, address_matches, is_network
from pacs.core.attributes import Level
from pacs.core.config import Modality
from pacs.core.errors import Cancelled, PacsError
from pacs.dimse.audit import AssociationAudit, AuditedResponder
from pacs.dimse.connection import Request, Responder, StoreTarget, SubOperationCounts
from pacs.dimse.find import decode_identifier, off_context
from pacs.dimse.identifier import to_retrieve_query
from pacs.dimse.sender import Prepared, Preparer
from pacs.dimse.status import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    NOT_AUTHORIZED,
    PENDING,
    RETRIEVE_STATUS,
    SUBOPERATIONS_WARNING,
    SUCCESS,
    UNABLE_TO_CALCULATE_MATCHES,
    UNABLE_TO_PERFORM_SUBOPERATIONS,
    Status,
    status_for,
)

if TYPE_CHECKING:
    from pacs.core.query.model import InstanceRef, Query
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Sub-operation counts are US (PS3.7 Table 9.3-4/9.3-6): at most 65,535 per request.
MAX_SUBOPERATIONS = 0xFFFF
#: Presentation context IDs are odd numbers 1-255 (PS3.8 9.3.2.2): 128 per association.
MAX_CONTEXTS = 128
#: Longest value of a short-length VR such as UI in explicit VR (PS3.5 7.1.2).
_MAX_SHORT_VALUE = 0xFFFE


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


class Pacing:
    """When a pending response is due: after every sub-operation, or once ``interval``
    seconds have passed since the first call or the last pending response.

    Pending responses are optional (PS3.4 C.4.2.3.1 for C-MOVE, C.4.3.3.1 for C-GET);
    they report progress.  One after every sub-operation is a message to encode and
    send for each (on a C-GET, on the association that carries the C-STORE requests):
    sending them once per interval took the node's CPU for a C-GET of 500 small
    instances from a median of 121 ms to 114 ms (``bench/retrieve_cpu.py``).  The loop
    stops for a requestor that went away when its association ends
    (``Responder.alive``), whether or not a pending response was due.

    Parameters
    ----------
    interval : float
        ``PACS_PENDING_INTERVAL``; 0 or less: every sub-operation.
    clock : callable
        Seconds, monotonic.
    """

    def __init__(self, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        """True when a pending response is to be sent now (and counted as sent)."""
        if self._interval <= 0:
            return True
        now = self._clock()
        if now - self._last < self._interval:
            return False
        self._last = now
        return True


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

    def fail_unsent(self, listed: Sequence[InstanceRef]) -> None:
        """Count every instance of ``listed`` (the instances of the retrieve, in the
        order they are sent) not counted yet as failed, by UID, then the rest as
        :meth:`fail_remaining`: an error or a refusal ended the sub-operations."""
        for ref in listed[self.completed + self.warning + self.failed:self.total]:
            self.record(Outcome.FAILED, ref.sop_uid)
        self.fail_remaining()

    def final_status(self, cancelled: bool) -> Status:
        """The final status (PS3.4 Table C.4-2 / C.4-3).

        A702 when every sub-operation failed, as pynetdicom and dcm4chee answer.
        """
        if cancelled:
            return CANCEL
        if not self.failed and not self.warning:
            return SUCCESS
        if self.failed == self.total:
            return UNABLE_TO_PERFORM_SUBOPERATIONS
        return SUBOPERATIONS_WARNING

    def snapshot(self, remaining: bool) -> SubOperationCounts:
        """The counts a response carries; Remaining only when ``remaining``."""
        return SubOperationCounts(self.remaining if remaining else None, self.completed,
                                  self.failed, self.warning)


# -- planning ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a retrieve will do: its query, how many sub-operations, and (C-MOVE) the
    stored transfer syntaxes of each SOP class."""

    query: Query
    total: int
    classes: Mapping[str, set[str]] = field(default_factory=dict)


def plan(request: Request, services: Services, models: Mapping[str, str],
         cancelled: Callable[[], bool], survey: bool = False) -> Plan:
    """The request's identifier as a query (PS3.4 C.4.2.1.4, C.4.3.1.3) and the
    number of sub-operations; with ``survey``, also the stored syntaxes per SOP class
    (one pass over the index rows, no object is read).

    Raises
    ------
    InvalidQuery
        The identifier breaks the retrieve rules (A900).
    IndexFailure, QueryLimitExceeded, Cancelled
        The index failed, the query ran too long, or a C-CANCEL arrived.
    """
    query = to_retrieve_query(decode_identifier(request), models[request.sop_class_uid])
    if not survey:
        return Plan(query, services.engine.count(at_image(query), cancelled=cancelled))
    total = 0
    classes: dict[str, set[str]] = {}
    for ref in services.engine.instances(at_image(query), cancelled=cancelled):
        total += 1
        classes.setdefault(ref.sop_class_uid, set()).add(ref.transfer_syntax)
    return Plan(query, total, classes)


def planned_instances(services: Services, planned: Plan, cancelled: Callable[[], bool]
                      ) -> list[InstanceRef]:
    """The instances of ``planned`` (at most as many as it counted), read again for the
    Failed SOP Instance UID List of a retrieve whose sub-operations could not start: a
    second pass over the index, paid only then, rather than every retrieve holding its
    UIDs from the count on.  Empty when the index cannot tell (the counts stay exact).
    """
    try:
        return services.engine.instance_list(at_image(planned.query), planned.total,
                                             cancelled)
    except PacsError as exc:
        log.warning("the instances of a retrieve that could not start were not listed: %s",
                    exc)
        return []


def count_refusal(total: int) -> tuple[Status, Counts | None] | None:
    """The final answer when the count alone decides: zero matches (0000, nothing to
    send and no association to open, pynetdicom #436) and too many (A701)."""
    if total == 0:
        return SUCCESS, Counts(0)
    if total > MAX_SUBOPERATIONS:
        log.warning("retrieve refused: %d instances match, more than %d",
                    total, MAX_SUBOPERATIONS)
        return (UNABLE_TO_CALCULATE_MATCHES.with_comment(
            "more than 65535 instances; retrieve at a lower level"), None)
    return None


def at_image(query: Query) -> Query:
    """The same constraints, one row per instance (to count sub-operations)."""
    return dataclasses.replace(query, level=Level.IMAGE, return_keys=())


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


# -- who may retrieve, and where to -------------------------------------------------------

def not_authorized(request: Request, services: Services, service: str) -> Status | None:
    """0124 when the calling AE lacks the ``retrieve`` right (:mod:`pacs.core.access`),
    else ``None``."""
    if services.access.may(request.calling_ae_title, RETRIEVE):
        return None
    log.warning("%s from %s refused: the AE may not retrieve", service,
                request.calling_ae_title)
    return NOT_AUTHORIZED.with_comment("this AE may not retrieve")


def over_tls_if_known(services: Services, found: Modality) -> Modality:
    """``found`` (an entry of ``PACS_MODALITIES``), reached over DICOM TLS when the
    access rules know its AE as one that associates over TLS only: patient data goes to
    it encrypted whichever list gives its address."""
    if found.tls or not services.access.reached_over_tls(found.ae_title):
        return found
    return dataclasses.replace(found, tls=True)


def destination(services: Services, title: str, request: Request | None = None
                ) -> Modality | None:
    """The C-MOVE destination ``title`` names: a known AE with an address and a port,
    from ``PACS_MODALITIES`` or the access file (:mod:`pacs.core.access`).

    An AE the access file knows on a network (``host = "10.1.2.0/24"``) has no one
    address to be reached at: it is the destination of its own C-MOVEs only, at the
    address its association comes from (which the access rules found inside that
    network, or refused it); named by any other requestor it is unknown (A801).
    """
    title = title.strip()
    found = services.settings.destinations.get(title)
    if found is not None:
        return over_tls_if_known(services, found)
    known = services.access.destinations().get(title)
    if known is None:
        return None
    if not is_network(known.host):
        return Modality(known.title, known.host, known.port, known.over_tls)
    if (request is not None and request.calling_ae_title.strip() == known.title
            and address_matches(known.host, request.calling_address)):
        return Modality(known.title, request.calling_address, known.port, known.over_tls)
    return None


# -- the services -----------------------------------------------------------------------

#: Opens the association to a C-MOVE destination: (destination, stored syntaxes per SOP
#: class, (Move Originator AE Title, Message ID)) -> the target, or None when refused.
Connect = Callable[["Modality", Mapping[str, set[str]], tuple[str, int]], "StoreTarget | None"]

#: The services' names in the log.
_MOVE, _GET = "C-MOVE", "C-GET"


def serve_move(responder: Responder, request: Request, services: Services,
               models: Mapping[str, str], connect: Connect,
               audit: AssociationAudit | None = None) -> None:
    """C-MOVE SCP (PS3.4 C.4.2.2): sub-operations over a new association; the
    association's ``audit`` (:mod:`pacs.dimse.audit`) learns the request, its
    instances and its final status.

    =====  ==================================================================
    FF00   a sub-operation finished, more remain (with the four counts)
    0000   every sub-operation completed; also when nothing matched
    B000   finished with failures (Failed SOP Instance UID List) or warnings
    A702   every sub-operation failed, or the destination refused us
    A801   the Move Destination is not a known AE with an address and a port
    0124   the calling AE lacks the ``retrieve`` right
    0122   the Affected SOP Class UID is not its presentation context's
    A900   the identifier breaks the retrieve rules (C.4.2.1.4)
    A701   the index failed, or more than 65,535 instances matched
    FE00   cancelled by C-CANCEL (Remaining = sub-operations not started)
    C000   anything else (a bug), with an Error Comment
    =====  ==================================================================
    """
    target_ae = destination(services, request.move_destination, request)
    if audit is not None:
        audit.retrieve_requested(request, target_ae)
        responder = AuditedResponder(responder, request, audit)
    try:
        refused = off_context(request, _MOVE) or not_authorized(request, services, _MOVE)
        if refused is not None:
            send_final(responder, request, refused)
            return
        if target_ae is None:
            log.warning("C-MOVE from %s refused: move destination %r is not configured",
                        request.calling_ae_title, request.move_destination)
            send_final(responder, request,
                       MOVE_DESTINATION_UNKNOWN.with_comment("move destination unknown"))
            return
        planned = plan(request, services, models, responder.cancelled, survey=True)
        refusal = count_refusal(planned.total)
        if refusal is not None:
            send_final(responder, request, *refusal)
            return
        target = connect(target_ae, planned.classes,
                         (request.calling_ae_title, request.message_id))
        if target is None:
            log.warning("C-MOVE destination %s (%s:%d) refused or could not be reached",
                        target_ae.ae_title, target_ae.host, target_ae.port)
            counts = Counts(planned.total)
            unsent = planned_instances(services, planned, responder.cancelled)
            if audit is not None:  # its final event names what was to be sent
                audit.retrieve_unsent(request.message_id, unsent)
            counts.fail_unsent(unsent)
            send_final(responder, request, UNABLE_TO_PERFORM_SUBOPERATIONS.with_comment(
                "move destination refused the association"), counts)
            return
        try:
            run_suboperations(responder, target, request, services, planned, _MOVE, audit)
        finally:
            target.release()
    except Exception as exc:  # noqa: BLE001 - answered with a status, see _failed
        _failed(responder, request, exc, _MOVE)


def serve_get(responder: Responder, request: Request, services: Services,
              models: Mapping[str, str], target: StoreTarget,
              audit: AssociationAudit | None = None) -> None:
    """C-GET SCP (PS3.4 C.4.3.2): sub-operations over the requestor's association.

    An instance goes in a storage context the requestor accepted with the SCP role
    for itself (role selection, PS3.7 D.3.3.4).  Statuses as for C-MOVE, without
    A801; zero matches give 0000.  ``audit`` as for :func:`serve_move`.
    """
    if audit is not None:
        audit.retrieve_requested(request, get=True)
        responder = AuditedResponder(responder, request, audit)
    try:
        refused = off_context(request, _GET) or not_authorized(request, services, _GET)
        if refused is not None:
            send_final(responder, request, refused)
            return
        planned = plan(request, services, models, responder.cancelled)
        refusal = count_refusal(planned.total)
        if refusal is not None:
            send_final(responder, request, *refusal)
            return
        run_suboperations(responder, target, request, services, planned, _GET, audit)
    except Exception as exc:  # noqa: BLE001 - answered with a status, see _failed
        _failed(responder, request, exc, _GET)


def run_suboperations(responder: Responder, target: StoreTarget, request: Request,
                      services: Services, planned: Plan, service: str = _MOVE,
                      audit: AssociationAudit | None = None) -> None:
    """Send each instance, with pending responses paced by ``PACS_PENDING_INTERVAL``
    (:class:`Pacing`), then the final one (``audit``: told the instances before the
    first is sent).

    At most ``planned.total`` instances are sent (the count announced to the
    requestor); the requestor's association going away ends the loop silently.  Every
    reference is read before the first send: a read transaction held while a slow peer
    takes its objects would keep the WAL from being checkpointed.
    """
    total = planned.total
    counts = Counts(total)
    pacing = Pacing(services.settings.pending_interval)
    cancelled = responder.cancelled
    ahead: tuple[InstanceRef, Prepared | None] | None = None
    listed: list[InstanceRef] = []
    error: Exception | None = None
    try:
        listed = services.engine.instance_list(at_image(planned.query), total, cancelled)
        if audit is not None:
            audit.retrieve_began(request.message_id, listed)
        refs = enumerate(listed)
        with target.sending():
            preparer = Preparer(target, services.store, services.settings,
                                indexed=services.engine.still_listed)
            ahead = _next(preparer, refs)
            while ahead is not None:
                if cancelled() or not responder.alive:
                    break
                ref, prepared = ahead
                ahead = None
                written = prepared is not None and _send(target, prepared)
                # The next one is made ready while the destination stores this one.
                # Whatever that raises (a C-CANCEL seen by the engine, an index
                # failure) waits until this sub-operation's response is read and
                # counted: a request on the wire is never left unanswered.
                stop: BaseException | None = None
                try:
                    ahead = _next(preparer, refs)
                except Exception as exc:  # noqa: BLE001 - re-raised below
                    stop = exc
                outcome = classify(target.store_status()) if written else Outcome.FAILED
                counts.record(outcome, ref.sop_uid)
                if stop is not None:
                    raise stop
                if counts.remaining and pacing.due():
                    responder.send_response(PENDING, counts=counts.snapshot(remaining=True))
    except Cancelled:
        pass  # the engine saw the C-CANCEL first; ``cancelled()`` remembers it
    except Exception as exc:  # noqa: BLE001 - answered with its status, see below
        error = exc
    finally:
        if ahead is not None and ahead[1] is not None:
            ahead[1].close()
    if error is not None:
        _log_error(request, error, service)
    if not responder.alive:
        return
    if error is not None:
        _ended_by(error, responder, request, counts, listed)
        return
    was_cancelled = cancelled()
    if not was_cancelled:
        counts.fail_remaining()
    status = counts.final_status(was_cancelled)
    log.info("%s from %s: %d sub-operations, %d completed, %d warning, %d failed, "
             "status %04X", service, request.calling_ae_title, total, counts.completed,
             counts.warning, counts.failed, status.code)
    send_final(responder, request, status, counts)


def send_final(responder: Responder, request: Request, status: Status,
               counts: Counts | None = None) -> None:
    """The final response (PS3.4 C.4.2.1.6, C.4.2.3.1).

    Counts go in every final response that had sub-operations (Remaining only after
    a cancel); the Failed SOP Instance UID List in every one but a Success (PS3.4
    C.4.2.1.4.2, C.4.3.1.3.2: a Cancel, Failure, Refused or Warning response contains
    it), zero-length when none failed.
    """
    snapshot = None
    if counts is not None:
        snapshot = counts.snapshot(remaining=status.code == CANCEL.code)
    identifier = None if status.code == SUCCESS.code else failed_list(
        counts.failed_uids if counts is not None else [], request.transfer_syntax)
    responder.send_response(status, identifier, snapshot)


#: The counts of a Cancel response before any sub-operation was planned: a Cancel
#: response contains the numbers of Completed, Failed and Warning sub-operations (PS3.4
#: C.4.2.3.1, C.4.3.3.1); Remaining, which would count those not started, is left out.
NONE_DONE = SubOperationCounts(None, 0, 0, 0)


def _failed(responder: Responder, request: Request, exc: BaseException,
            service: str) -> None:
    """Answer an error that ended the request before its sub-operations (a C-CANCEL
    seen while they were planned: Cancel, none done)."""
    _log_error(request, exc, service)
    if responder.alive:
        status = status_for(RETRIEVE_STATUS, exc)
        responder.send_response(status, failed_list([], request.transfer_syntax),
                                NONE_DONE if status.code == CANCEL.code else None)


def _ended_by(exc: Exception, responder: Responder, request: Request, counts: Counts,
              listed: Sequence[InstanceRef]) -> None:
    """Answer an error that ended the sub-operations: its Failure status, with the
    counts and every instance not sent in the Failed SOP Instance UID List (PS3.4
    C.4.2.1.4.2, C.4.3.1.3.2)."""
    counts.fail_unsent(listed)
    send_final(responder, request, status_for(RETRIEVE_STATUS, exc), counts)


def _log_error(request: Request, exc: BaseException, service: str) -> None:
    """A WARNING for one of the node's errors (a refusal), the traceback for others."""
    if isinstance(exc, PacsError):
        log.warning("%s from %s refused: %s", service, request.calling_ae_title, exc)
    else:
        log.error("%s from %s failed unexpectedly", service, request.calling_ae_title,
                  exc_info=exc)


def _send(target: StoreTarget, prepared: Prepared) -> bool:
    """Write the prepared request; its file is released whatever happens."""
    try:
        return target.send_c_store(prepared.message_id, prepared.context_id,
                                   prepared.command, prepared.source, prepared.length)
    finally:
        prepared.close()


def _next(preparer: Preparer, refs: Iterator[tuple[int, InstanceRef]]
          ) -> tuple[InstanceRef, Prepared | None] | None:
    """The next instance, prepared for sending (``None`` when there is no more)."""
    item = next(refs, None)
    if item is None:
        return None
    number, ref = item
    return ref, preparer.prepare(ref, message_id(number))


def message_id(number: int) -> int:
    """Message ID of the ``number``-th sub-operation: 1-65535, wrapping (US, PS3.7 E.1)."""
    return number % 0xFFFF + 1


def failed_list(uids: list[str], syntax: str) -> bytes:
    """The response identifier with (0008,0058) Failed SOP Instance UID List.

    UI has a 2-byte length in explicit VR (PS3.5 7.1.2): when the list is longer than
    that allows, the first UIDs that fit are sent (and the counts stay exact).
    """
    uid = UID(syntax)
    kept = list(uids)
    if not uid.is_implicit_VR:
        size = 0
        for i, value in enumerate(kept):
            size += len(value) + (1 if i else 0)
            if size > _MAX_SHORT_VALUE - 1:  # leave room for padding to even length
                log.warning("Failed SOP Instance UID List shortened to %d of %d UIDs",
                            i, len(uids))
                kept = kept[:i]
                break
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = kept
    return encode(identifier, uid.is_implicit_VR, uid.is_little_endian,
                  uid.is_deflated) or b""
