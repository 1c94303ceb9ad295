"""C-STORE and C-FIND requests read straight from the association's socket.

Why
---
Every message pynetdicom receives goes through its DUL thread: the PDU decoded into
objects, a state machine event, a P-DATA primitive per fragment, the DIMSE provider's
assembly of the fragments, the command set decoded by pydicom into a primitive, a queue,
and a switch to the association thread that serves it.  For a modality sending
thousands of small images, that was a large part of the node's CPU per instance next to
the analysis and the durable write, and two thread switches per message; for a
workstation's C-FIND of a few matches, half the node's CPU per query.

What this module does
---------------------
Once the association thread has served a C-STORE request the usual way
(:class:`pacs.dimse.seam.services.StoreServiceClass`), or while it serves a C-FIND
request (:class:`pacs.dimse.seam.services.RetrieveServiceClass`), it keeps the socket
(:func:`pacs.dimse.seam.reactor.socket_lent`) and reads the next messages itself
(:func:`serve_stores`, :func:`serve_finds`).  While each is an ordinary C-STORE-RQ or
C-FIND-RQ - a command set whose Command Field, Message ID, Priority and Affected SOP
Class UID (and, for a store, Affected SOP Instance UID) are there (PS3.7 9.3.1.1,
9.3.2.1), on an accepted presentation context of that SOP Class, with a data set - it
is stored (:func:`pacs.dimse.storage.store`) or answered
(:func:`pacs.dimse.find.serve_find`) in this thread, without any primitive, and the
responses written by :mod:`pacs.dimse.seam.wire`.

Anything else goes to pynetdicom as it arrived: another DIMSE message, a command this
path does not take, an A-RELEASE-RQ or A-ABORT, a PDU over its ceiling, the connection
closing.  The bytes read since that message began are handed back
(:func:`pacs.dimse.seam.reactor.hand_back`); the DUL reads them before the socket, and
the reactors go on as if this path had never read them.  Once a store request is
taken, its data set is read here to its last fragment: a data set that breaks the
protocol (a command fragment inside it, another context, a malformed fragment) aborts
the association (A-ABORT, PS3.8 9.3.8), as pynetdicom's decoding does.  A C-FIND
request's identifier is kept whole until it is taken (at most
:data:`pacs.dimse.limits.COMMAND_CEILING`), so that anything odd in it goes back too.

While a C-FIND is answered, the socket is watched for its C-CANCEL-RQ (PS3.7 9.3.2.3,
:class:`_CancelWatch`); anything else that arrives meanwhile is handed back once the
answer ends (an A-ABORT or A-RELEASE-RQ ends the answer first).

The wait between two messages keeps pynetdicom's rules: the network idle timer
(PACS_NETWORK_TIMEOUT) is restarted by each PDU and, when it runs out, the socket goes
back to the reactors, which release or abort as configured; a thread that sends on the
association through pynetdicom (which pauses the reactor) gets the socket back before
its response is read; and a report waiting to be sent on the association
(:mod:`pacs.dimse.seam.notify`) once it has been quiet long enough, so that the
reactor, in this same thread, sends it between two messages.  Its response, when it
arrives here, is not a request this path takes: it goes to pynetdicom, and from there
to the thread that waits for it.
"""

from __future__ import annotations

import logging
import select
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pydicom.uid import UID

import pacs.dimse.seam.notify as notify
import pacs.dimse.seam.reactor as reactor
import pacs.dimse.seam.wire as wire
from pacs.core.dataset import valid_uid
from pacs.dimse import find, limits, storage
from pacs.dimse.connection import Request

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacs.core.services import Services
    from pacs.dimse.audit import AssociationAudit

log = logging.getLogger(__name__)

#: Message control header bits (PS3.8 E.2): command fragment, last fragment.
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02
#: Command Fields (PS3.7 E.1-1).
_C_STORE_RQ, _C_STORE_RSP, _C_FIND_RQ, _C_CANCEL_RQ = 0x0001, 0x8001, 0x0020, 0x0FFF
#: Command elements read here (PS3.7 E.1-1).
_SOP_CLASS, _FIELD, _MESSAGE_ID, _RESPONDED_TO, _DATASET_TYPE, _SOP_INSTANCE = (
    0x00000002, 0x00000100, 0x00000110, 0x00000120, 0x00000800, 0x00001000)
#: Seconds between two looks at the socket for a C-CANCEL while a C-FIND is answered
#: (most answers take less: they are written before the first look is due again).
CANCEL_POLL = 0.005


class _StoreCommand(NamedTuple):
    """The fields of a C-STORE-RQ command set this path answers from."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


class _Store(NamedTuple):
    """A C-STORE request read here: its command's fields, its context, the request."""

    command: _StoreCommand
    context_id: int
    request: storage.StoreRequest
    holding: limits.Holding  # of the worker's receive budget, given back once stored


class _Find(NamedTuple):
    """A C-FIND request read here, and its context."""

    context_id: int
    request: Request


@dataclass(frozen=True)
class Served:
    """What this path answers on one association: the node's services, the audits of
    its C-STORE and C-FIND requests, and whether a SOP Class's C-STORE requests
    (``storage_class``) or C-FIND requests (``find_class``) are the node's to serve."""

    services: Services
    store_audit: AssociationAudit | None
    find_audit: AssociationAudit | None
    storage_class: Callable[[str], bool]
    find_class: Callable[[str], bool]


class _HandBack(Exception):
    """Not something this path serves: the bytes read of it go back to pynetdicom."""


class _Broken(Exception):
    """The peer broke the protocol inside a message this path took: abort."""

    def __init__(self, reason: str, invalid: bool = True) -> None:
        super().__init__(reason)
        self.invalid = invalid


def serve_stores(assoc: Association, context_id: int, response: bytes,
                 served: Served) -> None:
    """Send ``response``, the C-STORE-RSP of a request pynetdicom delivered, then serve
    the requests that follow on ``assoc`` from its socket (:func:`_serve_following`).

    The socket is taken before the response is sent: a peer sends its next request
    only once it has the response (no asynchronous operations are negotiated, PS3.7
    D.3.3.3), so that request cannot reach pynetdicom first.
    """
    with reactor.socket_lent(assoc, traffic=False) as lent:
        writer = wire.ResponseWriter(assoc, context_id)
        writer.message(response, last=True)
        if lent and not writer.broken:
            _serve_following(assoc, served, _Reader(assoc, served))


def serve_finds(assoc: Association, request: Request, context_id: int,
                cancelled: Callable[[], bool], served: Served) -> None:
    """Answer ``request``, a C-FIND request pynetdicom delivered (``cancelled``: its
    C-CANCEL as pynetdicom saw it), then serve the requests that follow on ``assoc``
    from its socket (:func:`_serve_following`).  The socket is taken first, as for
    :func:`serve_stores`; a C-CANCEL then arrives on it (:class:`_CancelWatch`)."""
    with reactor.socket_lent(assoc, traffic=False) as lent:
        if not lent:  # the patched reactor is not installed: pynetdicom reads on
            responder = wire.FindResponder(assoc, request, context_id, cancelled)
            find.serve_find(responder, request, served.services, served.find_audit,
                            responder.writer.flush)
            return
        reader = _Reader(assoc, served)
        if reader.answer_find(request, context_id, cancelled):
            _serve_following(assoc, served, reader)


def _serve_following(assoc: Association, served: Served, reader: _Reader) -> None:
    """Serve the C-STORE and C-FIND requests that arrive on ``assoc``, whose socket
    this thread holds, until something else arrives (see the module docstring); then
    return, any bytes read of that message given back to pynetdicom."""
    while reader.wait_for_message():
        try:
            message = reader.request()
        except _HandBack:
            reactor.hand_back(assoc, reader.taken)
            return
        except _Broken as exc:
            log.warning("Aborting the association with %s: %s", assoc.requestor.address, exc)
            reactor.abort_lent(assoc, exc.invalid)
            return
        if isinstance(message, _Find):
            if not reader.answer_find(message.request, message.context_id):
                return
        elif not _answer_store(assoc, served, message):
            return
        if reader.leftover:
            # The PDU went on with the next message: pynetdicom takes it from there.
            reactor.hand_back(assoc, reader.leftover)
            return


def _answer_store(assoc: Association, served: Served, message: _Store) -> bool:
    """Store a request read here and send its response; False when the association
    ended meanwhile or the response could not be sent."""
    try:
        status = storage.store(served.services, message.request, served.store_audit)
    finally:
        message.holding.release()
    if not assoc.is_established:
        return False  # aborted meanwhile: nobody to answer
    command = message.command
    response = wire.response_command(
        _C_STORE_RSP, command.sop_class_uid, command.message_id, status.code, False,
        status.comment, sop_instance_uid=command.sop_instance_uid)
    writer = wire.ResponseWriter(assoc, message.context_id)
    writer.message(response, last=True)
    return not writer.broken


#: A presentation data value item (PS3.8 9.3.5.1): message control header, presentation
#: context ID, fragment, and where the item starts in its PDU.
_Pdv = tuple[int, int, memoryview, int]


class _Reader:
    """Reads one association's messages from its socket while it is lent."""

    def __init__(self, assoc: Association, served: Served) -> None:
        self.assoc = assoc
        self.served = served
        self.dul: Any = assoc.dul
        self.raw: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
        self.ceiling = reactor.pdata_ceiling(assoc)
        self.limit = served.services.settings.max_object_bytes
        #: Bytes read that go back to pynetdicom on :class:`_HandBack`: the message's,
        #: until it is taken as a store request, then the current PDU's header.
        self.taken = bytearray()
        #: The rest of a PDU that went on after a data set's last fragment, rebuilt as
        #: a PDU of its own for pynetdicom.
        self.leftover = b""
        #: What :meth:`_context` found, by context ID, SOP Class UID (unpadded) and
        #: request (the negotiated contexts do not change during the association).
        #: Only contexts found are kept: at most one SOP Class per context and request.
        self.contexts: dict[tuple[int, bytes, int], tuple[str, str]] = {}

    # -- between messages --

    def wait_for_message(self) -> bool:
        """Wait until the next message starts arriving; False when the socket must go
        back to the reactors instead (the association ends, the idle timer ran out, a
        sender on the association awaits its response, a report is due to be sent on
        it: :func:`pacs.dimse.seam.notify.due`)."""
        assoc, dul, raw = self.assoc, self.dul, self.raw
        checkpoint = assoc._reactor_checkpoint
        pending = getattr(raw, "pending", None)  # TLS: data select cannot see
        while True:
            if assoc._kill or not assoc.is_established or not dul.is_alive():
                return False
            if not checkpoint.is_set() or _pynetdicom_holds_one(assoc) or notify.due(assoc):
                return False
            if pending is not None and pending():
                return True
            timeout = reactor.MAX_WAIT
            idle = dul._idle_timer
            if idle.timeout is not None:
                remaining = idle.remaining
                if remaining <= 0:
                    return False
                timeout = min(timeout, remaining)
            try:
                ready, _, _ = select.select([raw], [], [], timeout)
            except (OSError, ValueError):
                return False
            if ready:
                return bool(checkpoint.is_set())

    # -- one message --

    def request(self) -> _Store | _Find:
        """Read a whole C-STORE or C-FIND request.

        Raises
        ------
        _HandBack
            Not an ordinary C-STORE or C-FIND request of a context this path serves,
            or not a P-DATA-TF PDU, or the connection failed: :attr:`taken` goes back
            to pynetdicom.
        _Broken
            The data set of a store request broke the protocol.
        """
        self.taken.clear()
        self.leftover = b""
        command, context_id, rest, body = self._command()
        fields = _command_elements(command)
        if fields is None:
            raise _HandBack
        field, message_id = _us(fields, _FIELD), _us(fields, _MESSAGE_ID)
        kind = _us(fields, _DATASET_TYPE)
        # Fields every request this path takes has (PS3.7 9.3.1.1, 9.3.2.1: Priority
        # one of LOW, MEDIUM, HIGH), a data set, and no release under way.  Anything
        # else is pynetdicom's, whose decoding of it decides (an abort, for a Priority
        # out of range), the same on both paths.
        if (message_id is None or kind is None or kind == wire.NO_DATASET
                or _us(fields, _PRIORITY) not in _PRIORITIES or self.assoc._sent_release):
            raise _HandBack
        if field == _C_STORE_RQ:
            return self._store(fields, message_id, context_id, rest, body)
        if field == _C_FIND_RQ:
            return self._find(fields, message_id, context_id, rest, body)
        raise _HandBack

    def _command(self) -> tuple[bytes, int, list[_Pdv], bytes | bytearray]:
        """A message's command set, its context ID, the PDVs that followed it in its
        last PDU, and that PDU's body; every byte read kept in :attr:`taken`."""
        command = bytearray()
        context_id, count = -1, 0
        while True:
            if len(self.taken) > limits.COMMAND_CEILING:
                # Kept for a hand-back, these bytes must stay bounded even when their
                # fragments are empty: pynetdicom reads on from here, with its own caps.
                raise _HandBack
            body = self._pdu(keep=True)
            pdvs = self._pdvs(body)
            for position, (header, pcid, fragment, _) in enumerate(pdvs):
                context_id = pcid if context_id < 0 else context_id
                if pcid != context_id or not header & _COMMAND_BIT:
                    raise _HandBack
                command += fragment
                if len(command) > limits.COMMAND_CEILING:
                    raise _HandBack  # pynetdicom's reading of it aborts
                try:
                    count = limits.count_fragment(count, len(command))
                except limits.FragmentFlood:
                    raise _HandBack from None  # pynetdicom's counting of them aborts
                if header & _LAST_BIT:
                    return bytes(command), context_id, pdvs[position + 1:], body

    def _store(self, fields: dict[int, bytes], message_id: int, context_id: int,
               rest: list[_Pdv], body: bytes | bytearray) -> _Store:
        """The rest of a C-STORE request: its data set, read to its last fragment."""
        sop_instance = _ui(fields, _SOP_INSTANCE)
        if not sop_instance:
            raise _HandBack
        sop_class, transfer_syntax = self._context(fields, context_id, _C_STORE_RQ)
        data = _DataSet(self.limit, reactor.holding(self.assoc))
        try:
            # Data set fragments in the command's last PDU: still handed back if
            # malformed.
            self._add(data, rest, context_id, body, _HandBack)
            while not data.complete:
                self.taken.clear()  # taken as a store request: only a PDU goes back now
                body = self._pdu(keep=False)
                self._add(data, self._pdvs(body, _Broken), context_id, body, _Broken)
        except BaseException:
            data.holding.release()
            raise
        request = storage.StoreRequest(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance,
            transfer_syntax=transfer_syntax, abstract_syntax=sop_class,  # _context found it
            calling_ae_title=self.assoc.requestor.ae_title,
            data_set=data.value(), received=data.received, limit=self.limit,
            exhausted=data.holding.refused)
        return _Store(_StoreCommand(message_id, sop_class, sop_instance), context_id, request,
                      data.holding)

    def _find(self, fields: dict[int, bytes], message_id: int, context_id: int,
              rest: list[_Pdv], body: bytes | bytearray) -> _Find:
        """The rest of a C-FIND request: its identifier.  Every byte stays in
        :attr:`taken` up to :data:`pacs.dimse.limits.COMMAND_CEILING` (an identifier is
        a few keys): anything odd, or longer, goes back to pynetdicom whole."""
        sop_class, transfer_syntax = self._context(fields, context_id, _C_FIND_RQ)
        identifier = _DataSet(0)
        self._add(identifier, rest, context_id, body, _HandBack)
        while not identifier.complete:
            if len(self.taken) > limits.COMMAND_CEILING:
                raise _HandBack
            body = self._pdu(keep=True)
            self._add(identifier, self._pdvs(body), context_id, body, _HandBack)
        assoc = self.assoc
        return _Find(context_id, Request(
            message_id=message_id, sop_class_uid=sop_class, transfer_syntax=transfer_syntax,
            identifier=identifier.value(), calling_ae_title=assoc.requestor.ae_title,
            extended_negotiation=assoc.requestor.sop_class_extended.get(UID(sop_class))))

    def answer_find(self, request: Request, context_id: int,
                    cancelled: Callable[[], bool] | None = None) -> bool:
        """Answer a C-FIND request (:func:`pacs.dimse.find.serve_find`), watching the
        socket for its C-CANCEL (and ``cancelled``, pynetdicom's, when it delivered the
        request).  False when this path must end: the association ended, a response
        could not be sent, or something other than a C-CANCEL arrived meanwhile (handed
        back to pynetdicom, or, when broken, the association aborted)."""
        watch = _CancelWatch(self, request.message_id, cancelled)
        if self.leftover:
            # The identifier's PDU went on with the next message, which comes before
            # anything on the socket: that is all the watch may see of it.
            if _cancelled_id(self.leftover[6:]) == request.message_id:
                watch.seen, self.leftover = True, b""
            watch.stop()
        responder = wire.FindResponder(self.assoc, request, context_id, watch,
                                       gone=lambda: watch.gone)
        find.serve_find(responder, request, self.served.services, self.served.find_audit,
                        responder.writer.flush)
        watch.stop()  # a PDU begun meanwhile is pynetdicom's to finish
        if watch.stash or watch.gone:
            reactor.hand_back(self.assoc, watch.stash)
            return False
        return not responder.writer.broken and self.assoc.is_established

    def _add(self, data: _DataSet, pdvs: list[_Pdv], context_id: int, body: bytes | bytearray,
             error: type[Exception]) -> None:
        """Add data set fragments; what follows the last one becomes :attr:`leftover`."""
        for header, pcid, fragment, start in pdvs:
            if data.complete:
                items = bytes(body[start:])
                self.leftover = struct.pack(">BBI", limits.P_DATA_TF, 0, len(items)) + items
                return
            if pcid != context_id:
                raise error("a data set fragment on another presentation context")
            if header & _COMMAND_BIT:
                raise error("a command fragment inside a data set")
            try:
                data.add(fragment, bool(header & _LAST_BIT), len(body))
            except limits.FragmentFlood as exc:
                raise error(str(exc)) from None

    def _pdu(self, keep: bool) -> bytes | bytearray:
        """The body of the next PDU, which must be a P-DATA-TF within the ceiling.

        The header goes to :attr:`taken`, after what it holds when ``keep``, and then
        the body too (a data set's body is never handed back: not copied); a PDU of
        another type, one over the ceiling or the connection closing raise
        :class:`_HandBack` once its header is read, so that pynetdicom's reading of the
        rest decides (a release, an abort, a refusal, a closed connection).  A read that
        fails raises :class:`_Broken`: the whole PDU must arrive within its time
        (:func:`pacs.dimse.seam.reactor.pace`, PACS_DIMSE_TIMEOUT and more for a large PDU
        that keeps arriving), and no wait for more of it may pass the socket's receive
        timeout (a peer stalled or trickling inside a PDU).
        """
        raw = self.raw
        pace = reactor.pace(self.assoc)
        try:
            head = limits.receive(raw, 6, deadline=pace)
        except OSError as exc:
            raise _Broken(f"no whole PDU received ({type(exc).__name__})", False) from None
        if not keep:
            self.taken.clear()
        self.taken += head
        if len(head) < 6:
            raise _HandBack
        kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if kind != limits.P_DATA_TF or length > self.ceiling:
            raise _HandBack
        try:
            body = limits.receive(raw, length, deadline=pace)
        except OSError as exc:
            raise _Broken(f"no whole PDU received ({type(exc).__name__})", False) from None
        if keep:
            self.taken += body
        if len(body) < length:
            # Closed inside the PDU.  Handed back, the header alone makes pynetdicom
            # read on, find the connection closed and end the association.
            raise _HandBack
        self.dul._idle_timer.restart()  # traffic, as the DUL counts it
        reactor.traffic(self.assoc)
        reactor.quickack(raw)
        return body

    @staticmethod
    def _pdvs(body: bytes | bytearray, error: type[Exception] = _HandBack) -> list[_Pdv]:
        """The presentation data value items of a P-DATA-TF PDU's body (PS3.8 9.3.5.1)."""
        view = memoryview(body)
        items: list[_Pdv] = []
        position, end = 0, len(body)
        while position < end:
            length = struct.unpack_from(">I", body, position)[0] if position + 6 <= end else 0
            if length < 2 or position + 4 + length > end:
                raise error("a malformed presentation data value item")
            items.append((body[position + 5], body[position + 4],
                          view[position + 6:position + 4 + length], position))
            position += 4 + length
        if not items:
            raise error("a P-DATA-TF PDU without presentation data values")
        return items

    def _context(self, fields: dict[int, bytes], context_id: int, field: int) -> tuple[str, str]:
        """The SOP Class and transfer syntax of a request (``field``: C-STORE-RQ or
        C-FIND-RQ) on ``context_id``; :class:`_HandBack` unless that is an accepted
        context of the request's SOP Class, one that this path serves for that request
        and not one of common extended negotiation."""
        # Keyed on the value without its padding, and misses not kept: a peer varying
        # the padding, or sending UIDs of no context, must not grow the cache.
        key = (context_id, fields.get(_SOP_CLASS, b"").rstrip(b"\0 "), field)
        found = self.contexts.get(key)
        if found is None:
            looked_up = self._look_up(_ui(fields, _SOP_CLASS), context_id, field)
            if not looked_up:
                raise _HandBack
            found = self.contexts[key] = looked_up
        return found

    def _look_up(self, sop_class: str, context_id: int,
                 field: int) -> tuple[str, str] | tuple[()]:
        """:meth:`_context`, uncached; ``()`` for a request this path does not take."""
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        served = (self.served.storage_class if field == _C_STORE_RQ
                  else self.served.find_class)
        if (not sop_class or context is None or context.abstract_syntax != sop_class
                or not served(sop_class)
                or sop_class in assoc.acceptor.accepted_common_extended):
            return ()
        return sop_class, str(context.transfer_syntax[0])


class _CancelWatch:
    """True once a C-CANCEL-RQ of one C-FIND request has arrived (PS3.7 9.3.2.3), read
    from the lent socket while the request is answered.

    The socket is looked at every :data:`CANCEL_POLL` seconds at most (the engine asks
    often, from SQLite's progress handler), one PDU per look.  A P-DATA-TF PDU of at
    most :data:`pacs.dimse.limits.COMMAND_CEILING` is read whole: a C-CANCEL-RQ alone in
    it is taken (that of another request is ignored: it may come late, after the final
    response).  Anything else ends the watch and is kept in :attr:`stash`, whole or its
    header only, for pynetdicom once the request is answered: a request sent without
    awaiting this one's responses (or a cancel split over PDUs, then answered as a late
    one), and a release or abort request or the connection closing, which also make the
    requestor :attr:`gone` (the answer stops).  A look never waits: the watch runs
    inside the query's read transaction, and of a PDU that has begun to arrive it takes
    what is there, the rest at the next looks, or, once the request is answered, the
    part read goes to pynetdicom, which reads the rest within its pace (a peer that
    stops midway holds neither the query's snapshot nor its time limit).  While another
    thread sends on the association through pynetdicom (the reactor checkpoint is
    cleared), the socket is not read: the response it awaits goes to pynetdicom.
    """

    def __init__(self, reader: _Reader, message_id: int,
                 also: Callable[[], bool] | None) -> None:
        self.reader = reader
        self.message_id = message_id
        self.also = also
        self.seen = False
        self.stash = b""
        self.gone = False
        self._partial = bytearray()  # what has arrived of the next PDU
        self._watching = True
        self._due = 0.0

    def stop(self) -> None:
        """Look at the socket no more (what the requestor sent next is not read, and
        the part of a PDU read already is kept in :attr:`stash`)."""
        if self._partial and not self.stash:
            self.stash = bytes(self._partial)
        self._partial = bytearray()
        self._watching = False

    def _wanted(self) -> int:
        """Bytes still to read of the PDU begun in :attr:`_partial`: its header, then a
        P-DATA-TF's body up to :data:`pacs.dimse.limits.COMMAND_CEILING` (0: no more)."""
        head = self._partial
        if len(head) < 6:
            return 6 - len(head)
        length: int = struct.unpack_from(">I", head, 2)[0]
        if head[0] != limits.P_DATA_TF or length > limits.COMMAND_CEILING:
            return 0
        return 6 + length - len(head)

    def __call__(self) -> bool:
        if self.seen or not self._watching:
            return self.seen
        if self.also is not None and self.also():
            self.seen = True
            return True
        now = time.monotonic()
        if now < self._due:
            return False
        self._due = now + CANCEL_POLL
        if not self.reader.assoc._reactor_checkpoint.is_set():
            self.stop()
            return False
        try:
            arrived = limits.readable(self.reader.raw, 0)
        except (OSError, ValueError):  # closed under the lend (an abort)
            self.gone = True
            self.stop()
            return False
        if arrived:
            self._read_one()
        return self.seen

    def _read_one(self) -> None:
        """Take what has arrived of the next PDU, without waiting for the rest (see the
        class docstring): this runs inside the query's read transaction, and a peer
        that sends part of a PDU must not hold it open (nor its time limit) while the
        rest takes its time; a part kept here is added to at the next look, and handed
        to pynetdicom, to be read with its pace, if the answer ends first."""
        reader = self.reader
        try:
            closed = _read_available(reader.raw, self._partial, self._wanted)
        except (OSError, ValueError):  # reset, or closed under the lend
            self.gone = True
            self.stop()
            return
        head = self._partial
        kind = head[0] if len(head) >= 6 else None
        length = struct.unpack_from(">I", head, 2)[0] if kind is not None else 0
        if kind is not None and (kind != limits.P_DATA_TF or length > limits.COMMAND_CEILING):
            self.stash, self.gone = bytes(head), kind != limits.P_DATA_TF
            self.stop()
            return
        if closed:  # closed inside the PDU: pynetdicom finds it closed
            self.stash, self.gone = bytes(head), True
            self.stop()
            return
        if kind is None or len(head) < 6 + length:
            return  # not whole yet
        body = head[6:]
        self._partial = bytearray()
        reader.dul._idle_timer.restart()  # traffic, as the DUL counts it
        reactor.traffic(reader.assoc)
        reactor.quickack(reader.raw)
        message_id = _cancelled_id(body)
        if message_id is None:
            self.stash = bytes(head)
            self.stop()
        elif message_id == self.message_id:
            self.seen = True


def _read_available(sock: Any, into: bytearray, wanted: Callable[[], int]) -> bool:
    """Add to ``into`` what ``sock`` holds already, up to ``wanted()`` bytes more
    (asked again after each read), without waiting; True when the peer has closed.

    The socket is made non-blocking for the reads: a TLS socket may be readable with
    only part of a record, whose blocking read would wait for the rest."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while (count := wanted()) > 0:
            try:
                chunk = sock.recv(count)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            if not chunk:
                return True
            into += chunk
        return False
    finally:
        sock.settimeout(timeout)


def _cancelled_id(body: bytes | bytearray) -> int | None:
    """The Message ID Being Responded To of a P-DATA-TF PDU body that holds one whole
    C-CANCEL-RQ and nothing else (PS3.7 9.3.2.3: a command without a data set; PS3.8
    E.2: its fragments on one context, the last one marked last); else ``None``."""
    try:
        pdvs = _Reader._pdvs(body)
    except _HandBack:
        return None
    context_id = pdvs[0][1]
    for position, (header, pcid, _, _) in enumerate(pdvs):
        last = position == len(pdvs) - 1
        if (pcid != context_id or not header & _COMMAND_BIT
                or bool(header & _LAST_BIT) != last):
            return None
    fields = _command_elements(b"".join(bytes(fragment) for _, _, fragment, _ in pdvs))
    if fields is None or _us(fields, _FIELD) != _C_CANCEL_RQ:
        return None
    return _us(fields, _RESPONDED_TO)


def _pynetdicom_holds_one(assoc: Association) -> bool:
    """True when pynetdicom holds a message, or part of one, that it read before the
    socket was lent (a peer that sent it without awaiting the previous response): it
    must be served first, by the reactors, which this thread runs once it returns."""
    dul: Any = assoc.dul
    return bool(assoc.dimse.msg_queue.qsize() or assoc.dimse.message is not None
                or dul.event_queue.qsize() or dul._recv_pdu.qsize())


class _DataSet:
    """A data set's fragments, kept up to the object limit and counted past it (as
    :class:`pacs.dimse.limits.CappedBuffer` does for pynetdicom's buffers).

    A fragment that is most of its PDU is kept as a view of it (no copy); others are
    copied together, so that what a data set holds stays close to its bytes: a view
    costs about 200 bytes of its own and keeps its whole PDU alive, so a peer sending
    one-byte fragments, or one 4 KiB fragment in each 256 KiB PDU of empty ones, would
    otherwise make the node hold hundreds or 64 times the bytes the limit counts.  The
    fragments themselves are bounded too (:func:`pacs.dimse.limits.count_fragment`).
    """

    def __init__(self, limit: int, holding: limits.Holding | None = None) -> None:
        self.limit = limit
        self.holding = holding or limits.Holding(None)
        self.fragments: list[memoryview | bytearray] = []
        self.received = 0
        self.count = 0
        self.complete = False

    def add(self, fragment: memoryview, last: bool, pdu_bytes: int) -> None:
        """Add a fragment of a PDU whose body is ``pdu_bytes`` long.

        Raises
        ------
        pacs.dimse.limits.FragmentFlood
            More fragments than the data set's bytes allow.
        """
        self.received += len(fragment)
        self.count = limits.count_fragment(self.count, self.received)
        if ((self.limit > 0 and self.received > self.limit)
                or not self.holding.take(len(fragment))):
            # Over the object limit, or the worker's budget: answered A700, nothing kept.
            self.fragments.clear()
            self.holding.release()
        elif len(fragment) >= _VIEWED_FRAGMENT_BYTES and 2 * len(fragment) >= pdu_bytes:
            self.fragments.append(fragment)
        elif fragment:
            last_kept = self.fragments[-1] if self.fragments else None
            if isinstance(last_kept, bytearray):
                last_kept += fragment
            else:
                self.fragments.append(bytearray(fragment))
        self.complete = last

    def value(self) -> bytes:
        """The data set's bytes; the fragments are let go (held once, not twice)."""
        fragments, self.fragments = self.fragments, []
        if len(fragments) == 1:
            return bytes(fragments[0])
        return b"".join(fragments)


#: Fragments from this size on are kept as views of their PDU, smaller ones copied.
_VIEWED_FRAGMENT_BYTES = 4096


#: Priority (0000,0700), required in a C-STORE-RQ (PS3.7 9.3.1.1), and its values:
#: MEDIUM, HIGH, LOW.
_PRIORITY = 0x00000700
_PRIORITIES = frozenset({0x0000, 0x0001, 0x0002})


def _command_elements(command: bytes) -> dict[int, bytes] | None:
    """The elements of a command set (Implicit VR Little Endian, PS3.7 6.3.1); None when
    it does not parse to its end."""
    elements: dict[int, bytes] = {}
    position, end = 0, len(command)
    while position + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", command, position)
        if position + 8 + length > end:
            return None
        elements[(group << 16) | element] = command[position + 8:position + 8 + length]
        position += 8 + length
    return elements if position == end else None


def _us(fields: dict[int, bytes], tag: int) -> int | None:
    value = fields.get(tag)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(fields: dict[int, bytes], tag: int) -> str:
    """A UID element's value; empty when missing or not a valid UID (PS3.5 9.1)."""
    text = fields.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")
    return text if valid_uid(text) else ""
