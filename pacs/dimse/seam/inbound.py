"""C-STORE requests read straight from the association's socket.

Why
---
Every message pynetdicom receives goes through its DUL thread: the PDU decoded into
objects, a state machine event, a P-DATA primitive per fragment, the DIMSE provider's
assembly of the fragments, the command set decoded by pydicom into a primitive, a queue,
and a switch to the association thread that serves it.  For a modality sending
thousands of small images, that was a large part of the node's CPU per instance next to
the analysis and the durable write, and two thread switches per message.

What this module does
---------------------
Once the association thread has served a C-STORE request the usual way
(:class:`pacs.dimse.seam.services.StoreServiceClass`), it keeps the socket
(:func:`pacs.dimse.seam.reactor.socket_lent`) and reads the next messages itself
(:func:`serve_stores`).  While each is an ordinary C-STORE-RQ - a command set whose
Command Field, Message ID, Affected SOP Class and Instance UIDs are there (PS3.7
9.3.1.1), on an accepted presentation context of that SOP Class, with a data set - it is
stored (:func:`pacs.dimse.storage.store`) and answered (:mod:`pacs.dimse.seam.wire`) in
this thread, without any primitive.

Anything else goes to pynetdicom as it arrived: another DIMSE message, a command this
path does not take as an ordinary store request, an A-RELEASE-RQ or A-ABORT, a PDU over
its ceiling, the connection closing.  The bytes read since that message began are handed
back (:func:`pacs.dimse.seam.reactor.hand_back`); the DUL reads them before the socket,
and the reactors go on as if this path had never read them.  Once a store request is
taken, its data set is read here to its last fragment: a data set that breaks the
protocol (a command fragment inside it, another context, a malformed fragment) aborts
the association (A-ABORT, PS3.8 9.3.8), as pynetdicom's decoding does.

The wait between two messages keeps pynetdicom's rules: the network idle timer
(PACS_NETWORK_TIMEOUT) is restarted by each PDU and, when it runs out, the socket goes
back to the reactors, which release or abort as configured; a thread that sends on the
association (a storage commitment report, which pauses the reactor) gets the socket back
before its response is read.
"""

from __future__ import annotations

import logging
import select
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import pacs.dimse.seam.reactor as reactor
import pacs.dimse.seam.wire as wire
from pacs.core.dataset import valid_uid
from pacs.dimse import limits, storage

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacs.core.services import Services
    from pacs.dimse.audit import AssociationAudit

log = logging.getLogger(__name__)

#: Message control header bits (PS3.8 E.2): command fragment, last fragment.
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02
#: Command Field of a C-STORE-RQ and response (PS3.7 E.1-1).
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
#: Command elements read here (PS3.7 E.1-1).
_SOP_CLASS, _FIELD, _MESSAGE_ID, _DATASET_TYPE, _SOP_INSTANCE = (
    0x00000002, 0x00000100, 0x00000110, 0x00000800, 0x00001000)


class _StoreCommand(NamedTuple):
    """The fields of a C-STORE-RQ command set this path answers from."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


class _HandBack(Exception):
    """Not something this path serves: the bytes read of it go back to pynetdicom."""


class _Broken(Exception):
    """A message broke the protocol (``invalid``), or its peer stalled inside a PDU: the
    association is aborted."""

    def __init__(self, reason: str, invalid: bool = True) -> None:
        super().__init__(reason)
        self.invalid = invalid


def serve_stores(assoc: Association, context_id: int, response: bytes, services: Services,
                 audit: AssociationAudit | None, storage_class: Callable[[str], bool]) -> None:
    """Send ``response``, the C-STORE-RSP of a request pynetdicom delivered, then serve
    the C-STORE requests that follow on ``assoc`` from its socket until something else
    arrives (see the module docstring); then return, the socket and any bytes read of
    that message given back to pynetdicom.

    The socket is taken before the response is sent: a peer sends its next request
    only once it has the response (no asynchronous operations are negotiated, PS3.7
    D.3.3.3), so that request cannot reach pynetdicom first.

    ``storage_class`` tells the SOP Classes whose requests the node's Storage service
    class serves; a request of any other goes to pynetdicom.
    """
    with reactor.socket_lent(assoc, traffic=False) as lent:
        writer = wire.ResponseWriter(assoc, context_id)
        writer.message(response, last=True)
        if not lent or writer.broken:
            return
        reader = _Reader(assoc, storage_class, services.settings.max_object_bytes)
        while reader.wait_for_message():
            try:
                command, context_id, request = reader.store_request()
            except _HandBack:
                reactor.hand_back(assoc, reader.taken)
                return
            except _Broken as exc:
                log.warning("Aborting the association with %s: %s",
                            assoc.requestor.address, exc)
                reactor.abort_lent(assoc, exc.invalid)
                return
            status = storage.store(services, request, audit)
            if not assoc.is_established:
                return  # aborted meanwhile: nobody to answer
            response = wire.response_command(
                _C_STORE_RSP, command.sop_class_uid, command.message_id, status.code, False,
                status.comment, sop_instance_uid=command.sop_instance_uid)
            writer = wire.ResponseWriter(assoc, context_id)
            writer.message(response, last=True)
            if writer.broken:
                return
            if reader.leftover:
                # The PDU went on with the next message: pynetdicom takes it from there.
                reactor.hand_back(assoc, reader.leftover)
                return


#: A presentation data value item (PS3.8 9.3.5.1): message control header, presentation
#: context ID, fragment, and where the item starts in its PDU.
_Pdv = tuple[int, int, memoryview, int]


class _Reader:
    """Reads one association's messages from its socket while it is lent."""

    def __init__(self, assoc: Association, storage_class: Callable[[str], bool],
                 limit: int) -> None:
        self.assoc = assoc
        self.dul: Any = assoc.dul
        self.raw: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
        self.ceiling = reactor.pdata_ceiling(assoc)
        self.storage_class = storage_class
        self.limit = limit
        #: Bytes read that go back to pynetdicom on :class:`_HandBack`: the message's,
        #: until it is taken as a store request, then the current PDU's header.
        self.taken = bytearray()
        #: The rest of a PDU that went on after a data set's last fragment, rebuilt as
        #: a PDU of its own for pynetdicom.
        self.leftover = b""
        #: What :meth:`_context` found, by context ID and SOP Class UID as received
        #: (the negotiated contexts do not change during the association).
        self.contexts: dict[tuple[int, bytes], tuple[str, str] | tuple[()]] = {}

    # -- between messages --

    def wait_for_message(self) -> bool:
        """Wait until the next message starts arriving; False when the socket must go
        back to the reactors instead (the association ends, the idle timer ran out, a
        sender on the association awaits its response)."""
        assoc, dul, raw = self.assoc, self.dul, self.raw
        checkpoint = assoc._reactor_checkpoint
        pending = getattr(raw, "pending", None)  # TLS: data select cannot see
        while True:
            if assoc._kill or not assoc.is_established or not dul.is_alive():
                return False
            if not checkpoint.is_set() or _pynetdicom_holds_one(assoc):
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

    def store_request(self) -> tuple[_StoreCommand, int, storage.StoreRequest]:
        """Read a whole C-STORE request: its command fields, its presentation context
        ID and the request as :func:`pacs.dimse.storage.store` takes it.

        Raises
        ------
        _HandBack
            Not an ordinary C-STORE request, or not a P-DATA-TF PDU, or the connection
            failed: :attr:`taken` goes back to pynetdicom.
        _Broken
            The data set of a store request broke the protocol.
        """
        self.taken.clear()
        self.leftover = b""
        command = bytearray()
        context_id = -1
        rest: list[_Pdv] = []
        complete = False
        while not complete:
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
                if header & _LAST_BIT:
                    complete, rest = True, pdvs[position + 1:]
                    break
        parsed, transfer_syntax = self._accept(bytes(command), context_id)
        data = _DataSet(self.limit)
        # Data set fragments in the command's last PDU: still handed back if malformed.
        self._add(data, rest, context_id, body, _HandBack)
        while not data.complete:
            self.taken.clear()  # taken as a store request: only a PDU goes back now
            body = self._pdu(keep=False)
            self._add(data, self._pdvs(body, _Broken), context_id, body, _Broken)
        request = storage.StoreRequest(
            sop_class_uid=parsed.sop_class_uid, sop_instance_uid=parsed.sop_instance_uid,
            transfer_syntax=transfer_syntax, calling_ae_title=self.assoc.requestor.ae_title,
            data_set=data.value(), received=data.received, limit=self.limit)
        return parsed, context_id, request

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
            data.add(fragment, bool(header & _LAST_BIT))

    def _pdu(self, keep: bool) -> bytes | bytearray:
        """The body of the next PDU, which must be a P-DATA-TF within the ceiling.

        The header goes to :attr:`taken`, after what it holds when ``keep``, and then
        the body too (a data set's body is never handed back: not copied); a PDU of
        another type, one over the ceiling or the connection closing raise
        :class:`_HandBack` once its header is read, so that pynetdicom's reading of the
        rest decides (a release, an abort, a refusal, a closed connection).  A read that
        fails (nothing for the socket's receive timeout, PACS_DIMSE_TIMEOUT: a peer
        stalled inside a PDU) raises :class:`_Broken`.
        """
        raw = self.raw
        try:
            head = limits.receive(raw, 6)
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
            body = limits.receive(raw, length)
        except OSError as exc:
            raise _Broken(f"no whole PDU received ({type(exc).__name__})", False) from None
        if keep:
            self.taken += body
        if len(body) < length:
            # Closed inside the PDU.  Handed back, the header alone makes pynetdicom
            # read on, find the connection closed and end the association.
            raise _HandBack
        self.dul._idle_timer.restart()  # traffic, as the DUL counts it
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

    def _accept(self, command: bytes, context_id: int) -> tuple[_StoreCommand, str]:
        """The command's fields and the context's transfer syntax, when this is an
        ordinary C-STORE request on an accepted context of its SOP Class; else
        :class:`_HandBack` (pynetdicom answers it, or refuses it, as it always has)."""
        fields = _command_elements(command)
        if fields is None or _us(fields, _FIELD) != _C_STORE_RQ:
            raise _HandBack
        message_id, kind = _us(fields, _MESSAGE_ID), _us(fields, _DATASET_TYPE)
        sop_instance = _ui(fields, _SOP_INSTANCE)
        if (message_id is None or kind is None or kind == wire.NO_DATASET
                or _us(fields, _PRIORITY) is None or not sop_instance
                or self.assoc._sent_release):
            raise _HandBack
        key = (context_id, fields.get(_SOP_CLASS, b""))
        found = self.contexts.get(key)
        if found is None:
            found = self.contexts[key] = self._context(_ui(fields, _SOP_CLASS), context_id)
        if not found:
            raise _HandBack
        sop_class, transfer_syntax = found
        return _StoreCommand(message_id, sop_class, sop_instance), transfer_syntax

    def _context(self, sop_class: str, context_id: int) -> tuple[str, str] | tuple[()]:
        """The SOP Class and transfer syntax of a store request on ``context_id``, when
        that is an accepted context of the class, the class is the Storage service
        class's and not one of common extended negotiation; else ``()``."""
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if (not sop_class or context is None or context.abstract_syntax != sop_class
                or not self.storage_class(sop_class)
                or sop_class in assoc.acceptor.accepted_common_extended):
            return ()
        return sop_class, str(context.transfer_syntax[0])


def _pynetdicom_holds_one(assoc: Association) -> bool:
    """True when pynetdicom holds a message, or part of one, that it read before the
    socket was lent (a peer that sent it without awaiting the previous response): it
    must be served first, by the reactors, which this thread runs once it returns."""
    dul: Any = assoc.dul
    return bool(assoc.dimse.msg_queue.qsize() or assoc.dimse.message is not None
                or dul.event_queue.qsize() or dul._recv_pdu.qsize())


class _DataSet:
    """A data set's fragments, kept up to the object limit and counted past it (as
    :class:`pacs.dimse.limits.CappedBuffer` does for pynetdicom's buffers)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fragments: list[memoryview] = []
        self.received = 0
        self.complete = False

    def add(self, fragment: memoryview, last: bool) -> None:
        self.received += len(fragment)
        if self.limit > 0 and self.received > self.limit:
            self.fragments.clear()  # over the limit: answered A700, nothing kept
        elif fragment:  # empty ones, kept, would grow the list without end
            self.fragments.append(fragment)
        self.complete = last

    def value(self) -> bytes:
        if len(self.fragments) == 1:
            return bytes(self.fragments[0])
        return b"".join(self.fragments)


#: Priority (0000,0700), required in a C-STORE-RQ (PS3.7 9.3.1.1).
_PRIORITY = 0x00000700


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
