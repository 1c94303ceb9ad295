"""pynetdicom's service classes replaced for a node's associations: the seam's side
of the DIMSE logic.

pynetdicom's own Storage and Query/Retrieve service classes wrap every request in an
event, encode each response with pydicom and hand it to the DUL thread, decode and
re-encode every sub-operation's data set, and set its own AE title as Move Originator.
Here:

* :class:`StoreServiceClass` stores through :func:`pacs.dimse.storage.store` and
  writes the pre-encoded C-STORE-RSP itself (:mod:`pacs.dimse.seam.wire`);
* :class:`RetrieveServiceClass` answers C-FIND requests from the association's socket
  (:func:`pacs.dimse.seam.inbound.serve_finds`), and runs
  :func:`pacs.dimse.retrieve.serve_move` and :func:`pacs.dimse.retrieve.serve_get`
  over :class:`RetrieveResponder` and :class:`SocketTarget`, which write responses and
  C-STORE requests to the sockets and read the C-STORE responses from them;
* :func:`answer_invalid_store` answers a C-STORE request pynetdicom would drop.

:func:`patch` makes pynetdicom use them (its module-level ``uid_to_service_class`` and
``Association._serve_request`` wrapped).  They serve only associations of a node server
that runs the seam (:func:`serves`); any other association in the process (a test's
pynetdicom peer, a node with the seam off) gets pynetdicom's own service classes, which
call the handlers of :mod:`pacs.dimse.handlers`.  Storage Commitment is not replaced
on any association: pynetdicom's own service class calls
:func:`pacs.dimse.handlers.handle_n_action`; an N-EVENT-REPORT on the requestor's
association is sent by :mod:`pacs.dimse.seam.notify`, whose response the wrapped
``_serve_request`` recognises (:func:`patch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from io import BytesIO
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.uid import UID
from pynetdicom import association, evt
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    N_CREATE,
    N_DELETE,
    N_EVENT_REPORT,
    N_GET,
    N_SET,
)
from pynetdicom.service_class import QueryRetrieveServiceClass, StorageServiceClass

import pacs.dimse.seam.inbound as inbound
import pacs.dimse.seam.notify as notify
import pacs.dimse.seam.reactor as reactor
import pacs.dimse.seam.wire as wire
from pacs.dimse import contexts, handlers, retrieve, storage, tls
from pacs.dimse.audit import AssociationAudit, Audits
from pacs.dimse.connection import (
    AcceptedContext,
    CancelWatch,
    Request,
    StoreTarget,
    SubOperationCounts,
)
from pacs.dimse.limits import CappedBuffer, dropped
from pacs.dimse.status import INVALID_SOP_INSTANCE, UNRECOGNIZED_OPERATION, Status

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    from pacs.core.config import Modality
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Command Fields of the responses (PS3.7 E.1-1).
C_STORE_RSP, C_GET_RSP, C_MOVE_RSP = 0x8001, 0x8010, 0x8021


def bound_services(assoc: Association, event: evt.EventType) -> Services | None:
    """The services :func:`pacs.dimse.handlers.of_customer` bound to ``event`` on a
    seam node's association (its customer's); ``None`` for any other association."""
    if not reactor.serves(assoc):
        return None
    bound: Any = assoc.get_handlers(event)
    handler, args = bound if isinstance(bound, tuple) else (None, None)
    if handler is None or not args:
        return None
    return args[0]  # type: ignore[no-any-return]


def bound_audit(assoc: Association, event: evt.EventType) -> AssociationAudit | None:
    """The audit of ``assoc`` (:mod:`pacs.dimse.audit`) from the :class:`Audits` bound
    to ``event`` next to the services; ``None`` when none is kept."""
    bound: Any = assoc.get_handlers(event)
    _, args = bound if isinstance(bound, tuple) else (None, None)
    audits = args[1] if args and len(args) > 1 else None
    return audits.of(assoc) if isinstance(audits, Audits) else None


# -- C-STORE ----------------------------------------------------------------------------

class StoreServiceClass(StorageServiceClass):
    """Storage SCP answering with pre-encoded responses (see the module docstring)."""

    def SCP(self, req: C_STORE, context: PresentationContext) -> None:
        """Store the request's data set, then send the C-STORE response."""
        services = bound_services(self.assoc, evt.EVT_C_STORE)
        if services is None:  # not a seam node: pynetdicom's own flow and handlers
            super().SCP(req, context)
            return
        try:
            status = storage.store(services, _store_request(self.assoc, req, context,
                                                            services),
                                   bound_audit(self.assoc, evt.EVT_C_STORE))
        finally:
            if isinstance(req.DataSet, CappedBuffer):  # its bytes given back once stored
                req.DataSet.holding.release()
        if not self.assoc.is_established:
            return  # aborted meanwhile: nobody to answer
        command = wire.response_command(
            C_STORE_RSP, str(req.AffectedSOPClassUID or ""), int(req.MessageID or 0),
            status.code, False, status.comment,
            sop_instance_uid=str(req.AffectedSOPInstanceUID or ""))
        # The response, then the requests that follow, read and answered off
        # pynetdicom's path.
        inbound.serve_stores(self.assoc, int(context.context_id or 0), command,
                             served(self.assoc, services))


def served(assoc: Association, services: Services) -> inbound.Served:
    """What :mod:`pacs.dimse.seam.inbound` answers on ``assoc`` once it holds its socket:
    C-STORE requests of the SOP Classes :class:`StoreServiceClass` serves, C-FIND
    requests of the models :class:`RetrieveServiceClass` serves, with their audits;
    each kind only when its handler is bound to ``services``."""
    stores = bound_services(assoc, evt.EVT_C_STORE) is services
    finds = bound_services(assoc, evt.EVT_C_FIND) is services
    return inbound.Served(
        services=services, store_audit=bound_audit(assoc, evt.EVT_C_STORE),
        find_audit=bound_audit(assoc, evt.EVT_C_FIND),
        storage_class=_served_by_storage if stores else _none,
        find_class=contexts.FIND_MODELS.__contains__ if finds else _none)


def _none(sop_class_uid: str) -> bool:
    """No SOP Class: requests of a kind whose handler serves other services (or none)
    go to pynetdicom."""
    return False


def _served_by_storage(sop_class_uid: str) -> bool:
    """True for a SOP Class whose C-STORE requests :class:`StoreServiceClass` serves."""
    return association.uid_to_service_class(sop_class_uid) is StoreServiceClass


def _store_request(assoc: Association, req: C_STORE, context: PresentationContext,
                   services: Services) -> storage.StoreRequest:
    """The request as :func:`pacs.dimse.storage.store` takes it; a data set over the
    object limit was not kept while it arrived (:class:`pacs.dimse.limits.CappedBuffer`,
    :func:`pacs.dimse.seam.reactor._receive_primitive`)."""
    buffer = req.DataSet
    exhausted = False
    if isinstance(buffer, CappedBuffer):
        data, received, limit = buffer.getvalue(), buffer.received, buffer.limit
        exhausted = buffer.exhausted
    else:
        data = buffer.getvalue() if buffer is not None else b""
        received, limit = len(data), services.settings.max_object_bytes
    return storage.StoreRequest(
        sop_class_uid=str(req.AffectedSOPClassUID or ""),
        sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
        transfer_syntax=str(context.transfer_syntax[0]),
        abstract_syntax=str(context.abstract_syntax or ""),
        calling_ae_title=assoc.requestor.ae_title, data_set=data, received=received,
        limit=limit, exhausted=exhausted)


def answer_invalid_store(assoc: Association, msg: Any, context_id: int) -> bool:
    """Answer a C-STORE request pynetdicom would drop; True when it was answered.

    pynetdicom ignores a C-STORE-RQ that lacks a required command field (an empty
    Affected SOP Instance UID, say): no response and no abort, so the sender waits for
    its DIMSE timeout, forever with dcmtk's defaults.  It gets 0117 (Invalid SOP
    Instance, PS3.7 C.5) here instead.
    """
    if not isinstance(msg, C_STORE) or msg.is_valid_request or msg.MessageID is None:
        return False
    status = INVALID_SOP_INSTANCE.with_comment(
        "the command's Affected SOP Instance UID is missing or invalid")
    command = wire.response_command(
        C_STORE_RSP, str(msg.AffectedSOPClassUID or ""), int(msg.MessageID), status.code,
        False, status.comment, sop_instance_uid=str(msg.AffectedSOPInstanceUID or "") or None)
    wire.ResponseWriter(assoc, context_id).message(command, last=True)
    return True


#: The Command Field of each request primitive (PS3.7 E.1-1); its response's is the
#: same with bit 15 set.
_REQUEST_FIELDS: dict[type, int] = {
    C_STORE: 0x0001, C_GET: 0x0010, C_FIND: 0x0020, C_MOVE: 0x0021, C_ECHO: 0x0030,
    N_EVENT_REPORT: 0x0100, N_GET: 0x0110, N_SET: 0x0120, N_ACTION: 0x0130,
    N_CREATE: 0x0140, N_DELETE: 0x0150}


def operations_of(sop_class_uid: str) -> tuple[type, ...] | None:
    """The requests a SOP Class of the node's contexts takes (PS3.4 A.4, B, C.4, J.3:
    C-ECHO for Verification, C-STORE for storage, C-FIND, C-MOVE or C-GET for each
    Query/Retrieve model, N-ACTION and N-EVENT-REPORT for Storage Commitment); ``None``
    for any other (left to pynetdicom)."""
    uid = UID(sop_class_uid)
    if uid == contexts.VERIFICATION:
        return (C_ECHO,)
    if uid == contexts.STORAGE_COMMITMENT:
        return (N_ACTION, N_EVENT_REPORT)
    for models, kind in ((contexts.FIND_MODELS, C_FIND), (contexts.MOVE_MODELS, C_MOVE),
                         (contexts.GET_MODELS, C_GET)):
        if uid in models:
            return (kind,)
    return (C_STORE,) if _served_by_storage(uid) else None


def answer_unrecognized(assoc: Association, msg: Any, context_id: int) -> bool:
    """Answer a request whose operation its context's SOP Class does not take; True
    when it was answered.

    pynetdicom hands such a request (a C-ECHO on a storage context, a C-STORE on a
    Query/Retrieve one, an N-GET on Storage Commitment) to the context's service class,
    which fails on it: a traceback in the log, and the association aborted as if by
    the service user.  It gets its response with Unrecognized Operation (0211, PS3.7
    C.5) instead, and the association goes on.
    """
    field = _REQUEST_FIELDS.get(type(msg))
    context = assoc._accepted_cx.get(context_id)
    if field is None or context is None or getattr(msg, "MessageID", None) is None:
        return False
    takes = operations_of(str(context.abstract_syntax or ""))
    if takes is None or isinstance(msg, takes):
        return False
    sop_class = (getattr(msg, "AffectedSOPClassUID", None)
                 or getattr(msg, "RequestedSOPClassUID", None) or "")
    log.info("Answering %s a request (Command Field %#06x) its context's SOP Class does "
             "not take", assoc.requestor.address, field)
    status = UNRECOGNIZED_OPERATION.with_comment(
        "not an operation of the presentation context's SOP Class")
    command = wire.response_command(field | 0x8000, str(sop_class), int(msg.MessageID),
                                    status.code, False, status.comment)
    wire.ResponseWriter(assoc, context_id).message(command, last=True)
    return True


# -- C-FIND, C-MOVE, C-GET ----------------------------------------------------------------

def request_of(req: C_FIND | C_MOVE | C_GET, context: PresentationContext,
               assoc: Association) -> Request:
    """The request as the logic takes it."""
    uid = str(req.AffectedSOPClassUID or "")
    identifier = req.Identifier
    return Request(
        message_id=int(req.MessageID or 0), sop_class_uid=uid,
        transfer_syntax=str(context.transfer_syntax[0]),
        identifier=identifier.getvalue() if identifier is not None else b"",
        calling_ae_title=assoc.requestor.ae_title,
        move_destination=str(getattr(req, "MoveDestination", "") or ""),
        extended_negotiation=assoc.requestor.sop_class_extended.get(UID(uid)),
        calling_address=str(assoc.requestor.address or ""),
        identifier_received=dropped(identifier),
        abstract_syntax=str(context.abstract_syntax or ""))


class RetrieveResponder:
    """C-MOVE / C-GET responses: pending ones written straight to the socket like the
    sub-operations (:func:`wire.write_message`), the final one through pynetdicom's
    DIMSE provider once the sub-operations have given the socket back."""

    def __init__(self, service: QueryRetrieveServiceClass, request: Request,
                 context_id: int, kind: type[C_MOVE] | type[C_GET]) -> None:
        self.service = service
        self.assoc = service.assoc
        self.request = request
        self.context_id = context_id
        self.kind = kind
        self.command_field = C_GET_RSP if kind is C_GET else C_MOVE_RSP
        self.cancelled = CancelWatch(service.is_cancelled, request.message_id)

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: SubOperationCounts | None = None) -> None:
        if status.is_pending and counts is not None and identifier is None:
            self._pending(status, counts)
        else:
            self._final(status, identifier, counts)

    def _pending(self, status: Status, counts: SubOperationCounts) -> None:
        """FF00 with the four counts (PS3.4 C.4.2.1.6).  A requestor gone away ends the
        retrieve: the association is aborted and the loop stops."""
        command = wire.response_command(
            self.command_field, self.request.sop_class_uid, self.request.message_id,
            status.code, False,
            counts=(counts.remaining or 0, counts.completed, counts.failed, counts.warning))
        try:
            wire.write_message(self.assoc, self.context_id, command)
        except OSError:
            log.warning("the retrieve's requestor went away; sub-operations stopped")

    def _final(self, status: Status, identifier: bytes | None,
               counts: SubOperationCounts | None) -> None:
        rsp = self.kind()
        rsp.MessageIDBeingRespondedTo = self.request.message_id
        rsp.AffectedSOPClassUID = self.request.sop_class_uid
        rsp.Status = status.code
        # pynetdicom declares the attribute by assigning None; it takes a str (LO, 64).
        rsp.ErrorComment = status.comment  # type: ignore[assignment]
        if counts is not None:
            rsp.NumberOfRemainingSuboperations = counts.remaining
            rsp.NumberOfCompletedSuboperations = counts.completed
            rsp.NumberOfFailedSuboperations = counts.failed
            rsp.NumberOfWarningSuboperations = counts.warning
        rsp.Identifier = BytesIO(identifier) if identifier is not None else None
        self.service.dimse.send_msg(rsp, self.context_id)


class SocketTarget:
    """C-STORE sub-operations written straight to an association's socket and their
    responses read straight from it (:mod:`pacs.dimse.seam.wire`), while its reactor is
    held (:func:`wire.reactor_paused`) and its DUL thread keeps off the socket
    (:func:`reactor.socket_lent`).

    Parameters
    ----------
    assoc : Association
        The association to the C-MOVE destination, or the C-GET requestor's.
    originator : (AE title, Message ID), optional
        Move Originator AE Title and Message ID (PS3.7 9.3.1.1); ``None`` for C-GET.
    on_cancel : callable, optional
        Called with the Message ID a C-CANCEL-RQ read with the responses cancels (the
        C-GET requestor's association carries both).
    releases : bool
        :meth:`release` releases the association (C-MOVE's own).
    """

    def __init__(self, assoc: Association, originator: tuple[str, int] | None,
                 on_cancel: Callable[[int], None] | None = None,
                 releases: bool = False) -> None:
        self.assoc = assoc
        self.originator = originator
        self.on_cancel = on_cancel
        self.releases = releases
        self.direct = False
        self._awaiting = 0  # Message ID of the request last written

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def accepted_contexts(self) -> list[AcceptedContext]:
        return handlers.accepted_contexts(self.assoc)

    def request_command(self, sop_class_uid: str, sop_instance_uid: str,
                        message_id: int) -> bytes:
        return wire.store_request_command(sop_class_uid, sop_instance_uid, message_id,
                                          self.originator)

    @contextmanager
    def sending(self) -> Iterator[None]:
        with wire.reactor_paused(self.assoc), reactor.socket_lent(self.assoc) as lent:
            self.direct = lent
            try:
                yield
            finally:
                self.direct = False

    def send_c_store(self, message_id: int, context_id: int, command: bytes,
                     source: BinaryIO, length: int) -> bool:
        self._awaiting = message_id
        try:
            wire.write_store_request(self.assoc, context_id, command, source, length)
        except Exception as exc:  # noqa: BLE001 - the writer has aborted the association
            log.warning("sub-operation failed: the request could not be written (%s)",
                        type(exc).__name__)
            return False
        return True

    def store_status(self) -> int | None:
        if self.direct:
            try:
                return wire.read_store_response(self.assoc, self._awaiting,
                                                self.assoc.dimse_timeout, self.on_cancel)
            except OSError as exc:  # wire.UnexpectedMessage included
                log.warning("sub-operation failed: %s", exc)
                if self.assoc.is_established:
                    wire.abort(self.assoc)
                return None
        _, response = self.assoc.dimse.get_msg(block=True)
        if response is None:
            if self.assoc.is_established:
                self.assoc.abort()
            return None
        status = getattr(response, "Status", None)
        return int(status) if status is not None else None

    def release(self) -> None:
        if self.releases and self.assoc.is_established:
            self.assoc.release()


def connector(ae: ApplicationEntity, services: Services, calling: str) -> retrieve.Connect:
    """Opens C-MOVE destination associations from ``ae`` (:data:`retrieve.Connect`),
    calling with the title ``calling`` (:func:`pacs.dimse.handlers.requested_as`)."""

    def connect(destination: Modality, classes: Mapping[str, set[str]],
                originator: tuple[str, int]) -> StoreTarget | None:
        store_assoc = handlers.open_association(
            ae, destination.host, destination.port,
            contexts=retrieve.destination_contexts(classes), ae_title=destination.ae_title,
            max_pdu=services.settings.max_pdu, tls_args=tls.client_args(ae, destination),
            evt_handlers=[(evt.EVT_CONN_OPEN, handlers.requested_as(calling))])
        if store_assoc is None:
            return None
        return SocketTarget(store_assoc, originator, releases=True)

    return connect


#: Where :func:`keep_early_cancel` keeps a C-CANCEL-RQ for the request being served.
_EARLY_CANCEL = "_pacs_early_cancel"


def keep_early_cancel(assoc: Association, msg: Any) -> None:
    """Keep a C-CANCEL-RQ of ``msg``'s Message ID read before ``msg`` is served.

    A requestor may cancel a C-FIND, C-MOVE or C-GET at once after its request (PS3.7
    9.3.2.3, 9.3.3.3, 9.3.4.3); pynetdicom's DUL may have read the cancel already when
    the association thread dispatches the request, and ``_serve_request`` empties the
    cancel requests just before it calls the service class: the cancel was lost and
    every sub-operation run (3 of 5 such C-MOVEs ended 0000).  The service class puts
    it back (:func:`restore_early_cancel`)."""
    message_id = getattr(msg, "MessageID", None)
    cancel = assoc.dimse.cancel_req.get(message_id) if message_id is not None else None
    assoc.__dict__[_EARLY_CANCEL] = (message_id, cancel) if cancel is not None else None


def restore_early_cancel(assoc: Association, message_id: int | None) -> None:
    """The cancel :func:`keep_early_cancel` kept for ``message_id``, back among
    pynetdicom's cancel requests (where ``is_cancelled`` looks)."""
    kept = assoc.__dict__.pop(_EARLY_CANCEL, None)
    if kept is not None and message_id is not None and kept[0] == message_id:
        assoc.dimse.cancel_req[message_id] = kept[1]


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """Query/Retrieve with our own C-FIND responses and C-MOVE / C-GET sub-operations.

    The dispatch in ``SCP`` is pynetdicom's; it calls the three methods below.  The
    :class:`~pacs.core.services.Services` come from the handler bound to the request's
    event (:func:`pacs.dimse.handlers.bind`), so nothing is global.
    """

    def _c_find_scp(self, req: C_FIND, context: PresentationContext) -> None:
        restore_early_cancel(self.assoc, req.MessageID)
        services = bound_services(self.assoc, evt.EVT_C_FIND)
        if services is None:
            super()._c_find_scp(req, context)
            return
        request = request_of(req, context, self.assoc)
        # This request, then the requests that follow, answered off pynetdicom's path.
        inbound.serve_finds(self.assoc, request, int(context.context_id or 0),
                            CancelWatch(self.is_cancelled, request.message_id),
                            served(self.assoc, services))

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        restore_early_cancel(self.assoc, req.MessageID)
        services = bound_services(self.assoc, evt.EVT_C_MOVE)
        if services is None:
            super()._move_scp(req, context)
            return
        request = request_of(req, context, self.assoc)
        responder = RetrieveResponder(self, request, int(context.context_id or 0), C_MOVE)
        retrieve.serve_move(responder, request, services, contexts.MOVE_MODELS,
                            connector(self.ae, services, handlers.own_title(self.assoc)),
                            bound_audit(self.assoc, evt.EVT_C_MOVE))

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        restore_early_cancel(self.assoc, req.MessageID)
        services = bound_services(self.assoc, evt.EVT_C_GET)
        if services is None:
            super()._get_scp(req, context)
            return
        request = request_of(req, context, self.assoc)
        responder = RetrieveResponder(self, request, int(context.context_id or 0), C_GET)
        target = SocketTarget(self.assoc, None, on_cancel=responder.cancelled.seen_cancel)
        retrieve.serve_get(responder, request, services, contexts.GET_MODELS, target,
                           bound_audit(self.assoc, evt.EVT_C_GET))


def patch() -> None:
    """Make pynetdicom use the classes above (once per process, by
    :func:`pacs.dimse.seam.install`).

    ``pynetdicom.association`` looks the service class up through its module-level name
    ``uid_to_service_class`` for every request; that name is wrapped.
    ``Association._serve_request`` is wrapped to answer invalid C-STORE requests and
    requests of an operation their context's SOP Class does not take, and to hand the
    response to a report sent by :mod:`pacs.dimse.seam.notify` to its sender.
    """
    original = association.uid_to_service_class
    ours = (frozenset(contexts.FIND_MODELS) | frozenset(contexts.MOVE_MODELS)
            | frozenset(contexts.GET_MODELS))

    def uid_to_service_class(uid: str) -> type:
        if uid in ours:
            return RetrieveServiceClass
        found = original(uid)
        return StoreServiceClass if found is StorageServiceClass else found

    association.uid_to_service_class = uid_to_service_class
    serve_request = association.Association._serve_request

    def _serve_request(self: Association, msg: Any, context_id: int) -> None:
        if notify.take_response(self, msg):
            return  # the response to a report this side sent, not a request
        if reactor.serves(self) and (answer_invalid_store(self, msg, context_id)
                                     or answer_unrecognized(self, msg, context_id)):
            return
        keep_early_cancel(self, msg)
        serve_request(self, msg, context_id)

    association.Association._serve_request = _serve_request  # type: ignore[method-assign]
