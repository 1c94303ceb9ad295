"""pynetdicom's event handlers: the DIMSE logic through pynetdicom's public API.

Each handler receives the :class:`~pacs.core.services.Services` of its customer as an
extra argument (bound to each association by the customer its called AE title names,
:func:`of_customer` and :mod:`pacs.dimse.customers`), never from a global.  With
the seam on (:mod:`pacs.dimse.seam`) its service classes serve C-STORE, C-FIND, C-MOVE
and C-GET themselves and take the services from these bindings; with the seam off (or
a pynetdicom version the seam was not written for) pynetdicom's own service classes
call the handlers below, which run the same plain functions
(:func:`pacs.dimse.storage.store`, :func:`pacs.dimse.find.find_responses`,
:func:`pacs.dimse.retrieve.plan` and :func:`~pacs.dimse.retrieve.count_refusal`,
:func:`pacs.dimse.sender.route`'s choice of context and syntax) and hand pynetdicom
statuses and data sets as it documents.  pynetdicom's own Q/R loop then sends the
C-MOVE / C-GET sub-operations, counts them and answers.

What that does differently (slower; every response and sub-operation encoded through
pydicom, the sub-operations decoded from the stored object first and encoded again: the
same bytes for objects pydicom reads), each a limit of pynetdicom's public API:

* a C-MOVE refused before its first sub-operation (A900, A701, 0124) is answered C514
  (Unable to process): pynetdicom takes no status before the destination, and associates with
  it before the first one (:func:`handle_move`);
* a C-GET refused before its first sub-operation carries a Number of Failed
  Sub-operations of 1 (pynetdicom takes a status only after a count);
* on an association the node requests (C-MOVE sub-operations, forwarding, storage
  commitment reports), pynetdicom's association thread may take a response that
  arrives as it resumes from a pause for the request's sender, for a request it
  refuses ("Received unexpected ... service message"): the sender then has no answer
  until the DIMSE timeout, and the instance counts as failed or is sent again;
* pynetdicom's decoding of an A-ASSOCIATE-RQ fails on an item or User Information
  sub-item of a type it does not know (PS3.8 9.3.1 says to skip it): the association is
  aborted; on an even context ID or a User Identity type outside 1-5 its DUL thread
  ends with an error and the peer is answered by nothing (the seam,
  :mod:`pacs.dimse.seam.reactor`, skips the first and aborts on the others);
* a C-FIND or C-ECHO on a presentation context of another service is aborted (the
  seam answers it 0211).

Four handlers make pynetdicom's loops conformant where they are not: the requestor as
Move Originator (:func:`handle_move`), no stale Remaining count in a final response
(:func:`drop_final_remaining`), an answer to an invalid C-STORE request
(:func:`answer_invalid_store`), and a C-MOVE whose destination refused the association
answered A702 with every instance in the Failed SOP Instance UID List, where pynetdicom
answers A801 without one (:class:`RefusedDestinations`).
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_messages import (
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
)
from pynetdicom.dimse_primitives import C_STORE, N_ACTION

from pacs.core.access import ECHO
from pacs.core.errors import Cancelled, NotFound, PacsError
from pacs.dimse import commitment, contexts, find, limits, retrieve, storage, tls
from pacs.dimse.audit import AssociationAudit, Audits
from pacs.dimse.connection import AcceptedContext, CancelWatch, Request
from pacs.dimse.identifier import read_data_set
from pacs.dimse.sender import log_failure, object_file, route
from pacs.dimse.status import (
    CANCEL,
    INVALID_SOP_INSTANCE,
    MOVE_DESTINATION_UNKNOWN,
    NOT_AUTHORIZED,
    PENDING,
    RETRIEVE_STATUS,
    SUCCESS,
    UNABLE_TO_PERFORM_SUBOPERATIONS,
    Status,
    status_for,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from pacs.core.query.model import InstanceRef
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: What pynetdicom's Q/R loops take from a generator handler: a count, a destination,
#: or a (status, data set) pair.
_Yield = Any


def status_dataset(status: Status) -> Dataset:
    """``status`` as the data set pynetdicom's service classes take from a handler."""
    found = Dataset()
    found.Status = status.code
    if status.comment:
        found.ErrorComment = status.comment
    return found


def handle_echo(event: Event, services: Services) -> int:
    """C-ECHO (PS3.4 A.4): Success, or 0124 when the calling AE lacks the ``echo``
    right (:mod:`pacs.core.access`; :data:`pacs.dimse.status.NOT_AUTHORIZED`)."""
    calling = event.assoc.requestor.ae_title
    if services.access.may(calling, ECHO):
        return SUCCESS.code
    log.warning("C-ECHO from %s refused: the AE may not echo", calling)
    return NOT_AUTHORIZED.code


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """Answer C-FIND extended negotiation (PS3.4 C.5.1.1.2, Table C.5-2) with what we
    support of what was offered, in no more bytes than were offered
    (:meth:`pacs.dimse.identifier.Negotiated.to_info`)."""
    answers = {}
    for uid, info in (getattr(event, "app_info", None) or {}).items():
        if uid in contexts.FIND_MODELS:
            agreed = find.negotiated_find_options(info)
            answers[uid] = agreed.to_info(len(info or b""))
    return answers


def _audit(event: Event, audits: Audits | None) -> AssociationAudit | None:
    """The audit of the event's association (:mod:`pacs.dimse.audit`), if kept."""
    return audits.of(event.assoc) if audits is not None else None


def handle_store(event: Event, services: Services, audits: Audits | None = None) -> Dataset:
    """C-STORE (PS3.4 B.2.3), see :func:`pacs.dimse.storage.store`.

    pynetdicom has gathered the whole data set in memory before this runs: the object
    limit decides the status (A700) but, without the seam, cannot keep the node from
    holding the object while it arrives.
    """
    request = cast(C_STORE, event.request)
    buffer = request.DataSet
    data = buffer.getvalue() if buffer is not None else b""
    # The seam's reactor, where it runs under these handlers (a TLS association), keeps
    # no bytes past the object limit but counts them (pacs.dimse.limits.CappedBuffer).
    capped = buffer if isinstance(buffer, limits.CappedBuffer) else None
    received = capped.received if capped is not None else len(data)
    try:
        status = storage.store(services, storage.StoreRequest(
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            transfer_syntax=str(event.context.transfer_syntax),
            abstract_syntax=str(event.context.abstract_syntax),
            calling_ae_title=event.assoc.requestor.ae_title, data_set=data, received=received,
            limit=services.settings.max_object_bytes,
            exhausted=capped is not None and capped.exhausted), _audit(event, audits))
    finally:
        if capped is not None:  # its bytes given back once stored
            capped.holding.release()
    return status_dataset(status)


def handle_n_action(event: Event, services: Services, audits: Audits | None = None,
                    reporter: commitment.Reports | None = None) -> tuple[Dataset, None]:
    """EVT_N_ACTION: a Storage Commitment Request (PS3.4 J.3.2), see
    :func:`pacs.dimse.commitment.accept`; once recorded, ``reporter`` delivers its
    result after the response has gone (:func:`commitment_answered`)."""
    request = cast(N_ACTION, event.request)
    buffer = request.ActionInformation
    data = buffer.getvalue() if buffer is not None else None
    received = buffer.received if isinstance(buffer, limits.CappedBuffer) else len(data or b"")
    action = commitment.ActionRequest(
        message_id=int(request.MessageID or 0),
        sop_class_uid=str(request.RequestedSOPClassUID or ""),
        sop_instance_uid=str(request.RequestedSOPInstanceUID or ""),
        action_type=request.ActionTypeID, action_information=data, received=received,
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae_title=event.assoc.requestor.ae_title,
        called_ae_title=own_title(event.assoc),
        abstract_syntax=str(event.context.abstract_syntax),
        calling_address=str(event.assoc.requestor.address or ""))
    status, pending = commitment.accept(services.commitments, services.access, action,
                                        _audit(event, audits))
    if pending is not None and reporter is not None:
        reporter.expect(event.assoc, action.message_id, pending)
    return status_dataset(status), None


def commitment_answered(event: Event, reporter: commitment.Reports) -> None:
    """EVT_DIMSE_SENT: an N-ACTION response is on its way; its request's report may
    follow (:meth:`pacs.dimse.reports.Reporter.answered`).  The response's PDUs are
    queued right after this event, while the report waits for the verification and
    for the association to be quiet (:data:`pacs.dimse.reports.QUIET`)."""
    message = event.message
    if isinstance(message, N_ACTION_RSP) and message.command_set is not None:
        responded = message.command_set.get("MessageIDBeingRespondedTo")
        if responded is not None:
            reporter.answered(event.assoc, int(responded))


def commitment_associated(event: Event, reporter: commitment.Reports) -> None:
    """EVT_ESTABLISHED: results for the requestor may go on this association
    (:meth:`pacs.dimse.reports.Reporter.associated`: waiting ones are looked for)."""
    reporter.associated(event.assoc)


def request_of(event: Event, move_destination: str = "") -> Request:
    """The C-FIND / C-MOVE / C-GET request of ``event`` as the logic takes it."""
    primitive = event.request
    uid = str(primitive.AffectedSOPClassUID or "")
    identifier = getattr(primitive, "Identifier", None)
    return Request(
        message_id=int(primitive.MessageID or 0), sop_class_uid=uid,
        transfer_syntax=str(event.context.transfer_syntax),
        identifier=identifier.getvalue() if identifier is not None else b"",
        calling_ae_title=event.assoc.requestor.ae_title, move_destination=move_destination,
        extended_negotiation=event.assoc.requestor.sop_class_extended.get(UID(uid)),
        calling_address=str(event.assoc.requestor.address or ""),
        identifier_received=limits.dropped(identifier),
        abstract_syntax=str(event.context.abstract_syntax or ""))


def _watch(event: Event, request: Request) -> CancelWatch:
    return CancelWatch(lambda _: bool(event.is_cancelled), request.message_id)


def handle_find(event: Event, services: Services, audits: Audits | None = None
                ) -> Iterator[tuple[Dataset, Dataset | None]]:
    """EVT_C_FIND (PS3.4 C.4.1): the responses of :func:`pacs.dimse.find.find_responses`,
    each identifier decoded for pynetdicom to encode again."""
    request = request_of(event)
    watch = _watch(event, request)

    def stopped() -> bool:  # a C-CANCEL, or the requestor gone (as find.serve_find)
        return watch() or not event.assoc.is_established

    for status, identifier in find.find_responses(request, services, stopped,
                                                  _audit(event, audits)):
        answer = None
        if identifier is not None:
            answer = read_data_set(identifier, request.transfer_syntax)
        yield status_dataset(status), answer


def handle_get(event: Event, services: Services, audits: Audits | None = None
               ) -> Iterator[_Yield]:
    """EVT_C_GET (PS3.4 C.4.3): the number of sub-operations, then each instance as a
    data set for pynetdicom to send over the requestor's association."""
    request = request_of(event)
    audit = _audit(event, audits)
    if audit is not None:
        audit.retrieve_requested(request, get=True)
    refused = retrieve.not_authorized(request, services, "C-GET")
    if refused is not None:
        yield 1  # pynetdicom takes a status only after a count
        yield status_dataset(refused), None
        return
    cancelled = _watch(event, request)
    try:
        planned = retrieve.plan(request, services, contexts.GET_MODELS, cancelled)
    except Exception as exc:  # noqa: BLE001 - answered with a status
        yield 1  # pynetdicom takes a status only after a count
        yield status_dataset(_refused(request, exc, "C-GET")), None
        return
    refusal = retrieve.count_refusal(planned.total)
    if refusal is not None:
        yield from _refused_by_count(refusal[0])
        return
    yield planned.total
    yield from _instances(event.assoc, services, planned, cancelled, request, audit)


def handle_move(event: Event, services: Services, audits: Audits | None = None,
                refusals: RefusedDestinations | None = None) -> Iterator[_Yield]:
    """EVT_C_MOVE (PS3.4 C.4.2): the destination, the number of sub-operations, then
    each instance as a data set for pynetdicom to send over the association it opens
    to the destination, with the requestor as Move Originator (PS3.7 9.3.1.1).
    ``refusals`` learns the move before pynetdicom associates with the destination,
    to answer its refusal (:class:`RefusedDestinations`).

    pynetdicom takes no status before the destination and associates with it before
    the first one: a request refused before its sub-operations (A900, A701) raises
    instead, which pynetdicom answers C514 (Unable to process).
    """
    request = request_of(event, event.move_destination or "")
    destination = retrieve.destination(services, request.move_destination, request)
    audit = _audit(event, audits)
    if audit is not None:
        audit.retrieve_requested(request, destination)
    refused = retrieve.not_authorized(request, services, "C-MOVE")
    if refused is not None:
        raise RefusedBeforeSubOperations(refused)  # pynetdicom: C514, see above
    if destination is None:
        log.warning("C-MOVE from %s refused: move destination %r is not configured",
                    request.calling_ae_title, request.move_destination)
        yield None, None  # pynetdicom: A801
        return
    cancelled = _watch(event, request)
    try:
        planned = retrieve.plan(request, services, contexts.MOVE_MODELS, cancelled,
                                survey=True)
    except Exception as exc:  # noqa: BLE001 - refused, see above
        status = _refused(request, exc, "C-MOVE")
        raise RefusedBeforeSubOperations(status) from None
    refusal = retrieve.count_refusal(planned.total)
    if refusal is not None and refusal[0] != SUCCESS:
        raise RefusedBeforeSubOperations(refusal[0])
    opened: list[Association] = []
    # The sub-operations' association calls with the title this one was called by
    # (the customer's), not the AE's.
    requested = requested_as(own_title(event.assoc))

    def connected(opening: Event) -> None:
        opened.append(opening.assoc)
        requested(opening)

    def originator(sending: Event) -> None:
        # pynetdicom puts its own AE title in the C-STORE-RQ; the standard asks for the
        # requestor's (PS3.7 9.3.1.1).  The message is encoded after this event.
        message = sending.message
        if isinstance(message, C_STORE_RQ) and message.command_set is not None:
            message.command_set.MoveOriginatorApplicationEntityTitle = \
                request.calling_ae_title

    yield (destination.host, destination.port, {
        "contexts": retrieve.destination_contexts(planned.classes),
        "max_pdu": services.settings.max_pdu,
        "tls_args": tls.client_args(event.assoc.ae, destination),
        "evt_handlers": [(evt.EVT_CONN_OPEN, connected), (evt.EVT_DIMSE_SENT, originator),
                         *Responses(counted=True).handlers()]})
    if refusals is not None:
        refusals.expect(event.assoc, request, planned.total,
                        lambda: _unsent(services, planned, cancelled, request, audit))
    yield planned.total  # 0: pynetdicom answers Success without associating
    # Resumed: pynetdicom associated with the destination, its loop answers from here.
    if refusals is not None:
        refusals.associated(event.assoc, request.message_id)
    yield from _instances(lambda: opened[-1] if opened else None, services, planned,
                          cancelled, request, audit)


def _unsent(services: Services, planned: retrieve.Plan, cancelled: Callable[[], bool],
            request: Request, audit: AssociationAudit | None) -> list[InstanceRef]:
    """The instances of a C-MOVE whose destination refused the association, also told
    to the association's audit (its final event names their studies)."""
    refs = retrieve.planned_instances(services, planned, cancelled)
    if audit is not None:
        audit.retrieve_unsent(request.message_id, refs)
    return refs


class RefusedDestinations:
    """The C-MOVEs whose destination pynetdicom is associating with, to answer a
    refusal as the seam does (EVT_DIMSE_SENT, :meth:`answer`).

    pynetdicom answers a destination that refused the association (or could not be
    reached) with A801 (Move Destination unknown), without counts or identifier.  The
    destination is known; what failed are the sub-operations, all of them: A702 with
    Number of Failed Sub-operations = every instance, and each in the Failed SOP
    Instance UID List (PS3.4 C.4.2.1.4.2, Table C.4-2).  The message is encoded after
    this event.  An A801 of a move that named no known destination (none expected)
    keeps its status and gets the Failed SOP Instance UID List, empty, that every
    Refused response contains (PS3.4 C.4.2.1.4.2).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Per association (gone with it), per Message ID: the request, its number of
        # sub-operations and what lists its instances.
        self._expected: weakref.WeakKeyDictionary[Any, dict[int, _ExpectedMove]] = (
            weakref.WeakKeyDictionary())

    def expect(self, assoc: Association, request: Request, total: int,
               instances: Callable[[], list[InstanceRef]]) -> None:
        """``request`` is about to associate with its destination to send ``total``
        instances, which ``instances`` lists."""
        with self._lock:
            self._expected.setdefault(assoc, {})[request.message_id] = (
                request, total, instances)

    def associated(self, assoc: Association, message_id: int) -> None:
        """The destination accepted: nothing to answer here."""
        with self._lock:
            self._expected.get(assoc, {}).pop(message_id, None)

    def answer(self, event: Event) -> None:
        """EVT_DIMSE_SENT: an A801 of an expected move becomes A702 with its list; any
        other A801 gets an empty list."""
        message = event.message
        if not isinstance(message, C_MOVE_RSP) or message.command_set is None:
            return
        command = message.command_set
        if command.get("Status") != MOVE_DESTINATION_UNKNOWN.code:
            return
        with self._lock:
            expected = self._expected.get(event.assoc, {}).pop(
                int(command.get("MessageIDBeingRespondedTo") or 0), None)
        if expected is None:  # no known destination: refused, with an empty list
            syntax = _context_syntax(event.assoc, message.context_id)
            if syntax is not None:
                message.data_set = BytesIO(retrieve.failed_list([], syntax))
                command.CommandDataSetType = 0x0001
            return
        request, total, instances = expected
        counts = retrieve.Counts(total)
        counts.fail_unsent(instances())
        # Everything made before the message changes: should any of it fail, the
        # A801 goes out whole rather than half rewritten.
        identifier = retrieve.failed_list(counts.failed_uids, request.transfer_syntax)
        command.Status = UNABLE_TO_PERFORM_SUBOPERATIONS.code
        command.NumberOfCompletedSuboperations = 0
        command.NumberOfWarningSuboperations = 0
        command.NumberOfFailedSuboperations = counts.failed
        message.data_set = BytesIO(identifier)
        command.CommandDataSetType = 0x0001  # a data set follows (PS3.7 E.1)


def _context_syntax(assoc: Association, context_id: int | None) -> str | None:
    """The transfer syntax of the association's accepted context ``context_id``."""
    for context in assoc.accepted_contexts:
        if context.context_id == context_id and context.transfer_syntax:
            return str(context.transfer_syntax[0])
    return None


#: A C-MOVE :class:`RefusedDestinations` waits on: its request, its number of
#: sub-operations, and what lists its instances.
_ExpectedMove = tuple[Request, int, Callable[[], "list[InstanceRef]"]]


class RefusedBeforeSubOperations(Exception):
    """A C-MOVE refused before pynetdicom takes a status (see :func:`handle_move`)."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"refused with {status.code:04X} ({status.meaning}): "
                         f"{status.comment or ''}")
        self.status = status


def answer_invalid_store(event: Event) -> None:
    """EVT_DIMSE_RECV: answer a C-STORE request pynetdicom would drop.

    pynetdicom ignores a C-STORE-RQ that lacks a required command field (an empty
    Affected SOP Instance UID, say): no response and no abort, so the sender waits for
    its DIMSE timeout, forever with dcmtk's defaults.  It gets 0117 (Invalid SOP
    Instance, PS3.7 C.5) here instead.  (The seam answers it in
    :func:`pacs.dimse.seam.services.answer_invalid_store`.)
    """
    message = event.message
    if not isinstance(message, C_STORE_RQ):
        return
    request = cast(C_STORE, message.message_to_primitive())
    if request.is_valid_request or request.MessageID is None:
        return
    status = INVALID_SOP_INSTANCE.with_comment(
        "the command's Affected SOP Instance UID is missing or invalid")
    response = C_STORE()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response.Status = status.code
    response.ErrorComment = status.comment  # type: ignore[assignment]
    event.assoc.dimse.send_msg(response, int(message.context_id or 0))


def drop_final_remaining(event: Event) -> None:
    """EVT_DIMSE_SENT: no Number of Remaining Sub-operations in a final C-MOVE / C-GET
    response other than Cancel (PS3.4 C.4.2.1.6, C.4.3.1.5).

    pynetdicom's Q/R service class sends its pending and final responses from one
    primitive, so its final response keeps the last pending one's Remaining (0).  The
    message is encoded after this event.
    """
    message = event.message
    if isinstance(message, C_MOVE_RSP | C_GET_RSP) and message.command_set is not None:
        command = message.command_set
        if (command.get("Status") not in (PENDING.code, CANCEL.code)
                and "NumberOfRemainingSuboperations" in command):
            del command.NumberOfRemainingSuboperations


def audit_final_response(event: Event, audits: Audits) -> None:
    """EVT_DIMSE_SENT: the final C-MOVE / C-GET response pynetdicom's own loop sent,
    reported to the association's audit (the seam's responders report theirs)."""
    message = event.message
    if not isinstance(message, C_MOVE_RSP | C_GET_RSP) or message.command_set is None:
        return
    command = message.command_set
    status = command.get("Status")
    if status is None or int(status) in (PENDING.code, PENDING_WARNING):
        return
    audit = audits.of(event.assoc)
    if audit is None:
        return
    counts = tuple(int(command.get(name) or 0) for name in (
        "NumberOfCompletedSuboperations", "NumberOfWarningSuboperations",
        "NumberOfFailedSuboperations"))
    audit.retrieve_ended(int(command.get("MessageIDBeingRespondedTo") or 0), int(status),
                         (counts[0], counts[1], counts[2]))


#: A pending status of a retrieve besides FF00 (PS3.4 C.4.2.1.5: sub-operations go on
#: with warnings).
PENDING_WARNING = 0xFF01


def _refused(request: Request, exc: BaseException, service: str) -> Status:
    if isinstance(exc, PacsError):
        log.warning("%s from %s refused: %s", service, request.calling_ae_title, exc)
    else:
        log.exception("%s from %s failed unexpectedly", service, request.calling_ae_title)
    return status_for(RETRIEVE_STATUS, exc)


def _refused_by_count(status: Status) -> Iterator[_Yield]:
    if status == SUCCESS:
        yield 0  # pynetdicom: Success with zero counts
        return
    yield 1
    yield status_dataset(status), None


def _instances(peer: Association | Callable[[], Association | None], services: Services,
               planned: retrieve.Plan, cancelled: CancelWatch, request: Request,
               audit: AssociationAudit | None = None) -> Iterator[_Yield]:
    """(Pending, data set) for each instance, read as :mod:`pacs.dimse.sender` would
    send it (as stored, or converted to an uncompressed syntax the peer accepted).

    An instance that cannot be sent is yielded as a data set holding only its SOP
    Instance UID: pynetdicom fails to send it (no SOP Class UID) and counts it failed,
    with its UID in the Failed SOP Instance UID List.  Instances removed since they
    were counted are yielded empty (failed, no UID).
    """
    try:
        refs = services.engine.instance_list(retrieve.at_image(planned.query),
                                             planned.total, cancelled)
    except Cancelled:
        yield status_dataset(CANCEL), None
        return
    if audit is not None:
        audit.retrieve_began(request.message_id, refs)
    routes: dict[tuple[str, str], tuple[int, str] | None] = {}
    for ref in refs:
        if cancelled():
            yield status_dataset(CANCEL), None
            return
        assoc = peer() if callable(peer) else peer
        yield status_dataset(PENDING), _dataset(assoc, ref, services, routes)
    for _ in range(planned.total - len(refs)):
        yield status_dataset(PENDING), Dataset()


def _dataset(assoc: Association | None, ref: InstanceRef, services: Services,
             routes: dict[tuple[str, str], tuple[int, str] | None]) -> Dataset:
    """The instance as pynetdicom will send it, or a stand-in it fails to send."""
    unsendable = Dataset()
    unsendable.SOPInstanceUID = ref.sop_uid
    if assoc is None or not assoc.is_established:
        return unsendable
    small = (limits.peer_pdu_refusal(assoc.acceptor.maximum_length)
             if assoc.is_requestor else None)
    if small is not None:
        # A C-MOVE destination pynetdicom associated with (open_association's floor).
        log.warning("sub-operation failed: the destination's %s", small)
        assoc.abort()
        return unsendable
    key = (ref.sop_class_uid, ref.transfer_syntax)
    if key not in routes:
        routes[key] = route(accepted_contexts(assoc), *key)
    found = routes[key]
    if found is None:
        log.warning("sub-operation failed: the peer accepted no context for %s in %s or "
                    "an uncompressed syntax it can be converted to",
                    UID(ref.sop_class_uid).name, UID(ref.transfer_syntax).name)
        return unsendable
    try:
        # Removed since the retrieve listed it: failed, not read from an object its
        # deletion has not reached yet (as the seam's sub-operations, sender.Preparer).
        if not services.engine.still_listed(ref):
            raise NotFound("the instance was removed since the request")
        with object_file(services.store, ref, found[1], services.settings) as path:
            return pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - one instance must not end the retrieve
        log_failure(ref, exc)
        return unsendable


def accepted_contexts(assoc: Association) -> list[AcceptedContext]:
    """The contexts of ``assoc`` in which this side may send C-STORE requests."""
    return [AcceptedContext(int(cx.context_id or 0), str(cx.abstract_syntax),
                            str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts if cx.as_scu]


def tcp_settings(event: Event) -> None:
    """EVT_CONN_OPEN of an association the node requests (a C-MOVE destination, a
    forwarding destination, a storage commitment report): TCP_NODELAY on its socket (no
    Nagle delay per message), blocked sends bounded by the DIMSE timeout
    (:func:`pacs.dimse.limits.bound_sends`) and blocked reads by the network timeout
    (:func:`pacs.dimse.limits.set_receive_timeout`).

    The read bound matters with the seam off: pynetdicom's DUL thread, once a PDU has
    begun, reads until its declared length has arrived, so a peer that declared a long
    PDU and went silent held it (and the thread that aborts the association, which
    waits for it) for ever.  pynetdicom reads a socket only once it is readable: an
    idle association is not affected.  (With the seam, its reactor bounds each PDU as a
    whole: :mod:`pacs.dimse.seam.reactor`.)
    """
    sock = event.assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limits.bound_sends(raw, event.assoc.dimse_timeout)
        limits.set_receive_timeout(raw, event.assoc.network_timeout)


#: The C-STORE status pynetdicom's C-MOVE loop counts as each sub-operation outcome.
_COUNTED_AS = {retrieve.Outcome.COMPLETED: 0x0000, retrieve.Outcome.WARNING: 0xB000,
               retrieve.Outcome.FAILED: 0xC000}


#: The response each request the node sends on its own associations awaits.
_RESPONSE_OF: dict[type, type] = {C_STORE_RQ: C_STORE_RSP,
                                  N_EVENT_REPORT_RQ: N_EVENT_REPORT_RSP}


class Responses:
    """EVT_DIMSE_SENT / EVT_DIMSE_RECV of an association the node requested and sends
    requests on through pynetdicom's ``send_c_store`` / ``send_n_event_report``
    (forwarding, C-MOVE sub-operations with the seam off, storage commitment reports
    on an association of their own): only the response of the request's type whose
    Message ID Being Responded To is the request's answers it (PS3.7 9.3.1.2,
    10.3.1.2).

    pynetdicom takes whatever message arrives next as the response: a peer answering
    with another Message ID, or with another command (a C-FIND-RSP), had the instance
    counted as stored (a forwarded instance left the outbox for good) or the storage
    commitment result as delivered.  Anything else keeps its place but loses its
    Status, so that pynetdicom takes it as an invalid response: it aborts the
    association and returns no status (a failed sub-operation; a forwarded instance
    or a report sent again later).  The message is turned into the primitive pynetdicom
    returns after this event.

    ``counted``: a C-STORE response's Status is replaced by the one code of what
    :func:`pacs.dimse.retrieve.classify` makes of it (0000, B000 or C000), for
    pynetdicom's own C-MOVE loop, which would count a C-STORE status its table lacks
    (FE00, say) as no sub-operation at all (the counts then miss the total, PS3.4
    C.4.2.1.6) and 0111 as a failure where the seam counts a warning; the same for its
    C-GET loop, on the requestor's association.

    One instance may serve many associations (the node's own, bound to its server):
    what each awaits is kept by association, and only while it lives.
    """

    def __init__(self, counted: bool = False) -> None:
        self._awaiting: weakref.WeakKeyDictionary[Any, tuple[type, int]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._counted = counted

    def handlers(self) -> list[tuple[Any, Callable[[Event], None]]]:
        """The ``evt_handlers`` entries for ``AE.associate``."""
        return [(evt.EVT_DIMSE_SENT, self.sent), (evt.EVT_DIMSE_RECV, self.received)]

    def sent(self, event: Event) -> None:
        """Remember the response type and Message ID a request written awaits."""
        message = event.message
        answer = _RESPONSE_OF.get(type(message))
        if answer is not None and message.command_set is not None:
            with self._lock:
                self._awaiting[event.assoc] = (answer, int(message.command_set.MessageID))

    def received(self, event: Event) -> None:
        """Strip the Status of any response but the awaited one."""
        message = event.message
        command: Any = message.command_set  # None when the message could not be decoded
        if command is None or "Status" not in command:
            return  # a request (a C-CANCEL, say) is not taken for a response
        with self._lock:
            awaited = self._awaiting.pop(event.assoc, None)
        if (awaited is not None and isinstance(message, awaited[0])
                and command.get("MessageIDBeingRespondedTo") == awaited[1]):
            if self._counted and awaited[0] is C_STORE_RSP:
                command.Status = _COUNTED_AS[retrieve.classify(int(command.Status))]
            return
        log.warning("%s from the peer is not the response awaited (Message ID %s): the "
                    "association is aborted", type(message).__name__,
                    awaited[1] if awaited is not None else None)
        del command.Status


def open_association(ae: Any, host: str, port: int, **kwargs: Any) -> Association | None:
    """``ae.associate(host, port, **kwargs)``: the association established, or ``None``.

    pynetdicom leaves the socket of a rejected association open: it is closed here.  An
    acceptor whose Maximum Length is below the node's floor
    (:func:`pacs.dimse.limits.peer_pdu_refusal`) is aborted (A-ABORT, PS3.8 9.3.8):
    sending it anything would cost a PDU per few bytes.
    """
    assoc = ae.associate(host, port, **kwargs)
    if not assoc.is_established:
        sock = assoc.dul.socket
        if sock is not None:
            sock.close()
        return None
    refusal = limits.peer_pdu_refusal(assoc.acceptor.maximum_length)
    if refusal is not None:
        log.warning("Aborted the association with %s:%s: %s", host, port, refusal)
        assoc.abort()
        return None
    return cast("Association", assoc)


def requested_as(title: str) -> Callable[[Event], None]:
    """An EVT_CONN_OPEN handler for an association the node requests: TCP settings
    (:func:`tcp_settings`) and ``title`` as its calling AE title.

    One pynetdicom AE serves every customer and requests associations with its own
    title (``AE.associate`` takes none); an association made for a customer on behalf
    of a request (C-MOVE sub-operations, a storage commitment report) calls with the
    title that request came in on instead, the one its peer knows the node by.  The
    A-ASSOCIATE-RQ PDU is encoded from the request primitive once the connection is open
    (PS3.8 9.2, state machine action AE-2, after EVT_CONN_OPEN): the title set here is
    the one sent.
    """

    def opened(event: Event) -> None:
        tcp_settings(event)
        if not title:  # no customer's title known: the AE's own
            return
        assoc = event.assoc
        assoc.requestor.ae_title = title
        primitive = assoc.requestor.primitive
        if primitive is not None:
            primitive.calling_ae_title = title

    return opened


def own_title(assoc: Association) -> str:
    """The node's AE title on an association it accepted: the called AE title that
    chose its customer (:func:`pacs.dimse.server._admit` answers with it)."""
    return str(assoc.acceptor.ae_title or "").strip()


def bind(services: Services, seam: bool = True, audits: Audits | None = None,
         reporter: commitment.Reports | None = None) -> list[tuple[Any, ...]]:
    """The ``evt_handlers`` list for an association server of one customer: the
    handlers of every association (:func:`common`) and those of the customer
    (:func:`of_customer`)."""
    return [*common(seam), *of_customer(services, seam, audits, reporter)]


def common(seam: bool = True) -> list[tuple[Any, ...]]:
    """The handlers that need no customer's services (``seam``: the seam serves the
    associations, and pynetdicom's own Q/R loop never runs)."""
    bound: list[tuple[Any, ...]] = [(evt.EVT_SOP_EXTENDED, handle_sop_extended)]
    if not seam:
        bound += [(evt.EVT_DIMSE_SENT, drop_final_remaining),
                  (evt.EVT_DIMSE_RECV, answer_invalid_store),
                  # C-GET sub-operations: pynetdicom's loop sends them on this association.
                  *Responses(counted=True).handlers()]
    return bound


def of_customer(services: Services, seam: bool = True, audits: Audits | None = None,
                reporter: commitment.Reports | None = None) -> list[tuple[Any, ...]]:
    """The handlers bound to one customer's ``services``: for a whole server, or for
    one association once its called AE title has chosen the customer
    (:mod:`pacs.dimse.customers`).

    ``audits``: where each association's operations are reported for the audit trail
    (:mod:`pacs.dimse.audit`), also bound as the second argument of the C-STORE,
    C-FIND, C-MOVE and C-GET handlers for the seam; ``reporter``: who delivers storage
    commitment results (:mod:`pacs.dimse.reports`).  Without the seam, a
    :class:`RefusedDestinations` of its own answers the C-MOVEs whose destination
    refused.
    """
    refusals = None if seam else RefusedDestinations()
    bound: list[tuple[Any, ...]] = [
        (evt.EVT_C_ECHO, handle_echo, [services]),
        (evt.EVT_C_STORE, handle_store, [services, audits]),
        (evt.EVT_C_FIND, handle_find, [services, audits]),
        (evt.EVT_C_MOVE, handle_move, [services, audits, refusals]),
        (evt.EVT_C_GET, handle_get, [services, audits]),
        (evt.EVT_N_ACTION, handle_n_action, [services, audits, reporter]),
    ]
    if refusals is not None:  # before the audit's handler, which reads the answer
        bound.append((evt.EVT_DIMSE_SENT, refusals.answer))
    if reporter is not None:
        bound += [(evt.EVT_DIMSE_SENT, commitment_answered, [reporter]),
                  (evt.EVT_ESTABLISHED, commitment_associated, [reporter])]
    if audits is not None:
        # Whichever comes first ends the association's audit (a peer may close the
        # connection without releasing).
        bound += [(evt.EVT_RELEASED, audits.ended), (evt.EVT_ABORTED, audits.ended),
                  (evt.EVT_CONN_CLOSE, audits.ended)]
        if not seam:
            bound.append((evt.EVT_DIMSE_SENT, audit_final_response, [audits]))
    return bound
