"""DIMSE messages encoded here and written to / read from the association's socket.

pynetdicom builds every message from a primitive: a pydicom command data set, encoded,
then split into one P-DATA primitive per fragment, each handed to the DUL thread, which
encodes and sends it; and every message received goes the other way through the DUL's
PDU decoding, its state machine and a queue.  For a C-FIND answering a thousand studies,
or a C-MOVE of a CT study, that was most of the node's time.  Here:

* responses (C-FIND, C-STORE, pending C-MOVE / C-GET) are encoded once per operation
  (only the status, counts and identifier change) and written by the handler's own
  thread, a whole message usually as one P-DATA-TF PDU holding two PDVs, the command and
  the data set (PS3.8 9.3.5: a PDU may carry several PDVs; E.2: the message control
  header) - :class:`ResponseWriter`, :func:`write_message`;
* the C-STORE requests of a retrieve are written straight to the socket
  (:func:`write_store_request`) and their responses read straight from it
  (:func:`read_store_response`) while the reactor and the DUL keep off
  (:func:`reactor_paused`, :func:`pacs.dimse.seam.reactor.socket_lent`).

P-DATA in Sta6 needs nothing of pynetdicom's state machine; association establishment,
release and abort stay pynetdicom's.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import pacs.dimse.seam.reactor as reactor
from pacs.dimse import limits

if TYPE_CHECKING:
    from pacs.dimse.connection import Request, SubOperationCounts
    from pacs.dimse.status import Status

#: Message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
_COMMAND, _COMMAND_LAST, _DATA, _DATA_LAST = 0x01, 0x03, 0x00, 0x02
#: PDV item overhead: item length (4), presentation context ID (1), control header (1).
_PDV_OVERHEAD = 6
#: Command Data Set Type (0000,0800): a data set follows, or none (PS3.7 E.1-1).
DATASET_PRESENT, NO_DATASET = 0x0000, 0x0101


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def response_command(command_field: int, sop_class_uid: str, message_id: int, status: int,
                     has_dataset: bool, comment: str | None = None,
                     sop_instance_uid: str | None = None,
                     counts: tuple[int, int, int, int] | None = None) -> bytes:
    """A response command set in Implicit VR Little Endian (PS3.7 6.3.1, 9.3).

    ``sop_instance_uid`` is the Affected SOP Instance UID (0000,1000) that C-STORE
    responses carry (PS3.7 9.3.1.2); ``counts`` the Remaining, Completed, Failed and
    Warning sub-operations of a pending C-GET / C-MOVE response (PS3.7 9.3.3.2, 9.3.4.2).
    """
    # Elements in ascending tag order (PS3.5 7.1): the comment before the UID and counts.
    body = b"".join((
        _implicit(0x00000002, _uid(sop_class_uid)),
        _implicit(0x00000100, struct.pack("<H", command_field)),
        _implicit(0x00000120, struct.pack("<H", message_id)),
        _implicit(0x00000800, struct.pack("<H", DATASET_PRESENT if has_dataset else NO_DATASET)),
        _implicit(0x00000900, struct.pack("<H", status)),
    ))
    if comment:
        text = comment[:64].encode("ascii", "replace")
        body += _implicit(0x00000902, text + b" " * (len(text) % 2))
    if sop_instance_uid:
        body += _implicit(0x00001000, _uid(sop_instance_uid))
    for offset, count in enumerate(counts or ()):
        # (0000,1020) Remaining, 1021 Completed, 1022 Failed, 1023 Warning (PS3.7 9.3.3.2)
        body += _implicit(0x00001020 + offset, struct.pack("<H", count))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


#: Bytes of P-DATA-TF PDUs gathered before one ``sendall`` (a few MB keep syscalls few).
_SEND_BUFFER = 4 << 20
#: Data set bytes per PDV when the peer sets no maximum PDU length.
_UNLIMITED_CHUNK = 1 << 20


def store_request_command(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                          originator: tuple[str, int] | None) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian, with the
    Move Originator AE Title and Message ID of a C-MOVE sub-operation."""
    body = [
        _implicit(0x00000002, _uid(sop_class_uid)),
        _implicit(0x00000100, struct.pack("<H", limits.C_STORE_RQ)),
        _implicit(0x00000110, struct.pack("<H", message_id)),
        _implicit(0x00000700, struct.pack("<H", 0)),  # Priority: medium
        _implicit(0x00000800, struct.pack("<H", DATASET_PRESENT)),
        _implicit(0x00001000, _uid(sop_instance_uid)),
    ]
    if originator is not None:
        title = originator[0].encode("ascii", "replace")[:16]
        body.append(_implicit(0x00001030, title + b" " * (len(title) % 2)))
        body.append(_implicit(0x00001031, struct.pack("<H", originator[1])))
    joined = b"".join(body)
    return _implicit(0x00000000, struct.pack("<I", len(joined))) + joined


#: Command Field of an N-EVENT-REPORT-RQ (PS3.7 E.1-1).
N_EVENT_REPORT_RQ = 0x0100


def event_report_command(sop_class_uid: str, message_id: int, sop_instance_uid: str,
                         event_type: int, has_dataset: bool) -> bytes:
    """An N-EVENT-REPORT-RQ command set (PS3.7 10.3.1.1, E.1-1), Implicit VR Little
    Endian, elements in ascending tag order (PS3.5 7.1)."""
    body = b"".join((
        _implicit(0x00000002, _uid(sop_class_uid)),
        _implicit(0x00000100, struct.pack("<H", N_EVENT_REPORT_RQ)),
        _implicit(0x00000110, struct.pack("<H", message_id)),
        _implicit(0x00000800, struct.pack("<H", DATASET_PRESENT if has_dataset
                                          else NO_DATASET)),
        _implicit(0x00001000, _uid(sop_instance_uid)),
        _implicit(0x00001002, struct.pack("<H", event_type)),
    ))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def _pdu(context_id: int, header: int, payload: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBIIBB", 0x04, 0, len(payload) + 6, len(payload) + 2, context_id,
                       header) + payload


@contextmanager
def reactor_paused(assoc: Any) -> Iterator[None]:
    """Hold ``assoc``'s reactor thread at its checkpoint for the whole block.

    While a retrieve writes its sub-operations straight to the socket and takes their
    responses from the DIMSE queue itself, the reactor must neither serve those
    responses nor write in between (pynetdicom's ``send_c_*`` pause it the same way,
    per message; here it is held for the whole retrieve, since a request is written
    before the previous response is read).  On the association whose reactor runs the
    caller (C-GET), ``_is_paused`` is already true and only the checkpoint is cleared
    and restored.
    """
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        yield
    finally:
        assoc._reactor_checkpoint.set()


def write_store_request(assoc: Any, context_id: int, command: bytes, source: BinaryIO,
                        length: int) -> None:
    """Write a C-STORE-RQ whose data set is read from ``source`` straight to the socket.

    pynetdicom's own path turns every fragment into a primitive for the DUL thread to
    encode and send: about 0.2 ms per 16 KB PDU, which capped C-MOVE / C-GET at ~90 MB/s.
    Here the PDUs are written by the caller, several MB per ``sendall``.  This is safe
    because the state machine does nothing when P-DATA is sent in Sta6, and the caller
    holds the association's reactor in :func:`reactor_paused` and writes everything
    else of the retrieve the same way (:func:`write_message`), so the bytes of two
    messages never interleave.

    Raises
    ------
    OSError, EOFError
        The write failed or the object was short; the association has been aborted.
    """
    limit = int(assoc.dimse.maximum_pdu_size or 0)
    chunk = limit - _PDV_OVERHEAD if limit > _PDV_OVERHEAD else _UNLIMITED_CHUNK
    sock = _socket_of(assoc)
    buffer = bytearray(_pdu(context_id, _COMMAND_LAST, command))
    sent = 0
    try:
        while sent < length:
            data = source.read(min(chunk, length - sent))
            if not data:
                raise EOFError("the stored object is shorter than its index entry")
            sent += len(data)
            buffer += _pdu(context_id, _DATA_LAST if sent >= length else _DATA, data)
            if len(buffer) >= _SEND_BUFFER:
                _send(assoc, sock, buffer)
                buffer.clear()
        _send(assoc, sock, buffer)
    except BaseException:
        # Part of a message may be on the wire: the stream cannot carry another one.
        abort(assoc)
        raise


def write_message(assoc: Any, context_id: int, command: bytes) -> None:
    """Write a message without a data set (a pending C-GET / C-MOVE response) straight
    to the socket, as :func:`write_store_request` does (same conditions; the association
    is aborted when the write fails).

    On the C-GET association this keeps the pending responses and the C-STORE requests
    in one writer: handed to the DUL thread instead, a response could be written while
    a request's ``sendall`` was blocked half-way, inside it.
    """
    pdus = _message_pdus(context_id, command, None, _peer_limit(assoc))
    try:
        _send(assoc, _socket_of(assoc), pdus)
    except BaseException:
        abort(assoc)
        raise


def message_pdus(assoc: Any, context_id: int, command: bytes,
                 dataset: bytes | None = None) -> bytes:
    """The P-DATA-TF PDUs of one message on ``assoc`` (fragmented to the peer's maximum
    PDU length), for :func:`write_pdus`."""
    return _message_pdus(context_id, command, dataset, _peer_limit(assoc))


def write_pdus(assoc: Any, pdus: bytes) -> None:
    """Write whole PDUs to ``assoc``'s socket, as :func:`write_message` does but
    without aborting the association when the write fails: the caller does, once it
    holds no lock the abort waits for.

    Raises
    ------
    OSError
        The write failed, or the peer did not take it in time; part of it may have gone.
    """
    _send(assoc, _socket_of(assoc), pdus)


def _send(assoc: Any, sock: Any, data: bytes | bytearray) -> None:
    """Write all of ``data``, taken by the peer within the time one write on ``assoc``
    may take (:func:`pacs.dimse.seam.reactor.pace`): a peer that reads a byte now and
    then cannot hold the writing thread (SO_SNDTIMEO alone starts again with each)."""
    limits.send_all(sock, data, reactor.pace(assoc))
    reactor.traffic(assoc)


def _peer_limit(assoc: Any) -> int:
    """The peer's maximum PDU length, 0 when it set none (or one too small to use)."""
    limit = int(assoc.dimse.maximum_pdu_size or 0)
    return limit if limit > 2 * _PDV_OVERHEAD else 0


def abort(assoc: Any) -> None:
    """Abort ``assoc``, first giving its socket back to the DUL thread if a retrieve
    holds it (:func:`pacs.dimse.seam.reactor.give_back`)."""
    reactor.give_back(assoc)
    assoc.abort()


def _socket_of(assoc: Any) -> Any:
    """The association's socket; ConnectionError once pynetdicom has closed it (after
    the peer's A-ABORT or a dropped connection it sets the socket to ``None``)."""
    sock = getattr(assoc.dul.socket, "socket", None) if assoc.dul.socket else None
    if sock is None:
        raise ConnectionError("the association's connection is closed")
    return sock


# -- reading responses straight from the socket ------------------------------------------

#: PDU types (PS3.8 9.3.1): P-DATA-TF carries DIMSE messages.
_P_DATA_TF = 0x04
#: Command Field values (PS3.7 E.1-1).
C_STORE_RSP, C_FIND_RSP, C_CANCEL_RQ = 0x8001, 0x8020, 0x0FFF


class UnexpectedMessage(ConnectionError):
    """The peer sent something other than the awaited response (an A-ABORT, a release
    request, an unexpected DIMSE message) or nothing within the timeout."""


def read_store_response(assoc: Any, message_id: int, timeout: float | None,
                        on_cancel: Callable[[int], None] | None = None) -> int:
    """Read the C-STORE-RSP to request ``message_id`` straight from the socket; its
    Status (0000,0900).

    The caller holds the socket (:func:`pacs.dimse.seam.reactor.socket_lent`).  A C-CANCEL-RQ
    read meanwhile (the C-GET requestor cancelling, PS3.7 9.3.2.3) goes to ``on_cancel``
    with the Message ID it cancels, and reading goes on.

    Raises
    ------
    UnexpectedMessage
        Anything else, or no complete response within ``timeout`` seconds; the caller
        aborts the association (nothing can be trusted on it after that).
    """
    sock = _socket_of(assoc)
    deadline = None if not timeout else time.monotonic() + timeout
    pdvs = _pdvs(sock, deadline, limits.pdu_ceilings(_local_limit(assoc)))
    while True:
        command = bytearray()
        for header, fragment, _ in pdvs:
            if not header & 0x01:
                raise UnexpectedMessage("a data set fragment where a command was expected")
            command += fragment
            if len(command) > limits.COMMAND_CEILING:
                raise UnexpectedMessage("a command set longer than any response's")
            if header & 0x02:  # the last fragment of the command (PS3.8 E.2)
                break
        fields = _command_fields(bytes(command))
        last_in_pdu = True
        if fields.get(0x00000800, NO_DATASET) != NO_DATASET:
            for header, _, last_in_pdu in pdvs:  # noqa: B007 - a data set: not expected, dropped;
                # its last PDV says whether more follows in its PDU (checked below)
                if header & 0x01:
                    raise UnexpectedMessage("a command fragment inside a data set")
                if header & 0x02:
                    break
        field = fields.get(0x00000100)
        if field == C_CANCEL_RQ and on_cancel is not None:
            on_cancel(fields.get(0x00000120, -1))
            continue
        if field != C_STORE_RSP or fields.get(0x00000120) != message_id:
            raise UnexpectedMessage("a DIMSE message other than the awaited C-STORE-RSP")
        if not last_in_pdu:
            raise UnexpectedMessage("more data in the PDU after the C-STORE-RSP")
        status = fields.get(0x00000900)
        if status is None:
            raise UnexpectedMessage("a C-STORE-RSP without a Status")
        return status


def _pdvs(sock: Any, deadline: float | None,
          ceilings: tuple[int, ...]) -> Iterator[tuple[int, bytes | bytearray, bool]]:
    """(message control header, fragment, last PDV of its PDU) of each PDV, PDU after
    PDU (PS3.8 9.3.5, E.2).  A PDU longer than ``ceilings`` allows for its type (the
    Maximum Length this side announced, for P-DATA-TF) is not read."""
    while True:
        head = _receive(sock, 6, deadline)
        kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if length > (ceilings[kind] if kind < len(ceilings) else 0):
            raise UnexpectedMessage(f"a PDU of type 0x{kind:02X} and {length} bytes, more "
                                    f"than allowed")
        body = _receive(sock, length, deadline)
        if kind != _P_DATA_TF:
            raise UnexpectedMessage(f"PDU type 0x{kind:02X} instead of P-DATA-TF")
        position = 0
        while position < length:
            item = struct.unpack_from(">I", body, position)[0] if position + 4 <= length else 0
            if item < 2 or position + 4 + item > length:
                raise UnexpectedMessage("a malformed presentation data value item")
            end = position + 4 + item
            yield body[position + 5], body[position + 6:end], end >= length
            position = end


def _receive(sock: Any, count: int, deadline: float | None) -> bytearray | bytes:
    """Exactly ``count`` bytes, waiting at most until ``deadline``, in a buffer that
    grows with what arrives (:func:`pacs.dimse.limits.receive`)."""
    try:
        data = limits.receive(sock, count, deadline=deadline)
    except TimeoutError:
        raise UnexpectedMessage("no response within the DIMSE timeout") from None
    if len(data) < count:
        raise UnexpectedMessage("the peer closed the connection")
    return data


def _local_limit(assoc: Any) -> int:
    """The Maximum Length this side of ``assoc`` announced (PS3.8 D.1); 0: none."""
    user = getattr(assoc, "acceptor" if getattr(assoc, "is_acceptor", False) else "requestor",
                   None)
    return int(getattr(user, "maximum_length", 0) or 0)


def _command_fields(command: bytes) -> dict[int, int]:
    """The US elements of a command set (Implicit VR Little Endian, PS3.7 6.3.1)."""
    fields: dict[int, int] = {}
    position = 0
    while position + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, position)
        value = command[position + 8:position + 8 + length]
        if length == 2:
            fields[(group << 16) | element] = struct.unpack("<H", value)[0]
        position += 8 + length
    return fields


# -- writing the responses of one operation -----------------------------------------------

#: Bytes of responses gathered before one ``sendall`` (a C-FIND answering a thousand
#: studies then makes ~30 system calls instead of a thousand).
_FLUSH_BYTES = 32 * 1024
#: Longest a response waits in the buffer while the next ones are written (a C-FIND's
#: are also sent at the end of each page: :func:`pacs.dimse.find.find_responses`).
_FLUSH_SECONDS = 0.02


class ResponseWriter:
    """The responses of one operation, written straight to the association's socket.

    pynetdicom hands every message to the DUL thread, which encodes and sends it: a
    thread switch per response, paid by the node for each match of a C-FIND.  Here the
    handler's own thread writes them, a few per ``sendall`` (at most
    :data:`_FLUSH_BYTES`, or :data:`_FLUSH_SECONDS` old), in order.  Safe for the same
    reasons as :func:`write_store_request`: P-DATA needs nothing of the state machine in
    Sta6, and nothing else writes on the association while its handler runs.

    A write that fails aborts the association; the writer is then :attr:`broken` and
    writes nothing more.
    """

    def __init__(self, assoc: Any, context_id: int) -> None:
        self.assoc = assoc
        self.context_id = context_id
        self.limit = _peer_limit(assoc)
        self.buffer = bytearray()
        self.broken = False
        self.flushed = time.monotonic()

    def message(self, command: bytes, dataset: bytes | None = None, *,
                last: bool = False) -> None:
        """Add one message; ``last`` sends everything now (a final response)."""
        if self.broken:
            return
        self.buffer += _message_pdus(self.context_id, command, dataset, self.limit)
        now = time.monotonic()
        if last or len(self.buffer) >= _FLUSH_BYTES or now - self.flushed >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered."""
        if self.broken or not self.buffer:
            return
        try:
            _send(self.assoc, _socket_of(self.assoc), self.buffer)
        except OSError as exc:
            self.broken = True
            logging.getLogger(__name__).warning("a response could not be sent: %s", exc)
            abort(self.assoc)
        finally:
            self.buffer.clear()
            self.flushed = time.monotonic()


class FindResponder:
    """C-FIND responses written straight to the socket (:class:`ResponseWriter`):
    pending ones a few per ``sendall``, a final one at once.  ``cancelled`` tells
    whether a C-CANCEL for the request has arrived, ``gone`` whether the requestor went
    away otherwise (:class:`pacs.dimse.connection.Responder`).
    """

    def __init__(self, assoc: Any, request: Request, context_id: int,
                 cancelled: Callable[[], bool], gone: Callable[[], bool] = lambda: False
                 ) -> None:
        self.request = request
        self.writer = ResponseWriter(assoc, context_id)
        self.cancelled = cancelled
        self._gone = gone
        # A status is sent with or without an identifier, never both: one command each.
        self._commands: dict[int, bytes] = {}

    @property
    def alive(self) -> bool:
        return not self.writer.broken and not self._gone()

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: SubOperationCounts | None = None) -> None:
        command = None if status.comment else self._commands.get(status.code)
        if command is None:
            command = response_command(C_FIND_RSP, self.request.sop_class_uid,
                                       self.request.message_id, status.code,
                                       identifier is not None, status.comment)
            if not status.comment:  # only the identifier changes between matches
                self._commands[status.code] = command
        # Pending responses may wait a moment in the writer; any other status is final.
        self.writer.message(command, identifier, last=not status.is_pending)
        if not status.is_pending:  # the requestor is idle from its answer on
            reactor.idle_from_now(self.writer.assoc)


def _message_pdus(context_id: int, command: bytes, dataset: bytes | None, limit: int) -> bytes:
    """P-DATA-TF PDUs of one message (PS3.8 9.3.5, E.2): command and data set in one PDU
    when they fit ``limit`` (the peer's maximum PDU length, 0: no limit), else each
    fragmented to fit."""
    pdvs = [(_COMMAND, _COMMAND_LAST, command)]
    if dataset is not None:
        pdvs.append((_DATA, _DATA_LAST, dataset))
    size = sum(len(payload) + _PDV_OVERHEAD for _, _, payload in pdvs)
    if not limit or size <= limit:
        items = b"".join(struct.pack(">IBB", len(payload) + 2, context_id, last) + payload
                         for _, last, payload in pdvs)
        return struct.pack(">BBI", 0x04, 0, len(items)) + items
    room = limit - _PDV_OVERHEAD
    return b"".join(
        _pdu(context_id, last if start + room >= len(payload) else more,
             payload[start:start + room])
        for more, last, payload in pdvs
        for start in range(0, max(len(payload), 1), room))
