"""A raw-socket DICOM peer that misbehaves on purpose, for the node's requestor side.

:class:`HostileDestination` listens like a C-MOVE destination (or a storage commitment
requestor's own SCP) and does what its ``behaviour`` says: accept the connection and
never answer, accept the association with every context rejected, answer C-STORE
requests late, a byte at a time, with the wrong Message ID, with a PDU declaring 4 GB,
an A-ABORT, or with any status at all.  Everything is written by hand (PS3.8 9.3,
PS3.7 E.1), independent of pynetdicom and of the code under test.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.uid import ImplicitVRLittleEndian

#: PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, P_DATA_TF = 0x01, 0x02, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
#: Command Field values (PS3.7 E.1-1).
C_STORE_RSP = 0x8001


def item(kind: int, body: bytes) -> bytes:
    """A variable item of an A-ASSOCIATE PDU (PS3.8 9.3.2)."""
    return struct.pack(">BBH", kind, 0, len(body)) + body


def element(tag: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element of a command set (PS3.7 6.3.1)."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(*elements: bytes) -> bytes:
    """A command set with its group length first."""
    body = b"".join(elements)
    return element(0x00000000, struct.pack("<I", len(body))) + body


def store_response(message_id: int, status: int, sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
                   sop_instance: str = "1.2.3", command_field: int = C_STORE_RSP) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2)."""
    return command_set(element(0x00000002, sop_class.encode()),
                       element(0x00000100, struct.pack("<H", command_field)),
                       element(0x00000120, struct.pack("<H", message_id)),
                       element(0x00000800, struct.pack("<H", 0x0101)),
                       element(0x00000900, struct.pack("<H", status)),
                       element(0x00001000, sop_instance.encode()))


def pdata(context_id: int, header: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU of one PDV (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBIIBB", P_DATA_TF, 0, len(fragment) + 6, len(fragment) + 2,
                       context_id, header) + fragment


def fields_of(command: bytes) -> dict[int, bytes]:
    """The elements of a command set by tag."""
    out: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, position)
        out[(group << 16) | elem] = command[position + 8:position + 8 + length]
        position += 8 + length
    return out


@dataclass
class Request:
    """A DIMSE request the peer received: its context and command elements."""

    context_id: int
    fields: dict[int, bytes]

    @property
    def message_id(self) -> int:
        return int(struct.unpack("<H", self.fields[0x00000110][:2])[0])

    @property
    def sop_instance(self) -> str:
        return self.fields.get(0x00001000, b"").rstrip(b"\0 ").decode()

    @property
    def sop_class(self) -> str:
        return self.fields.get(0x00000002, b"").rstrip(b"\0 ").decode()

    @property
    def command_field(self) -> int:
        return int(struct.unpack("<H", self.fields[0x00000100][:2])[0])

    def respond(self, status: int, message_id: int | None = None,
                command_field: int | None = None) -> bytes:
        """The PDU of the response to this request (``message_id``: another's;
        ``command_field``: another response's)."""
        field = self.command_field | 0x8000 if command_field is None else command_field
        return pdata(self.context_id, 0x03, store_response(
            self.message_id if message_id is None else message_id, status,
            self.sop_class, self.sop_instance, field))


#: What the peer does with a request: write something (or nothing) on the socket.
Answer = Callable[[socket.socket, Request], None]


@dataclass
class HostileDestination:
    """A listening peer: ``associate`` decides how it answers an A-ASSOCIATE-RQ
    ("silent": never; "giant": an A-ASSOCIATE-AC header declaring 0xFFFFFFF0 bytes, 1 KiB
    of them, then silence; "accept"; "reject-contexts": an A-ASSOCIATE-AC rejecting every
    presentation context; "tiny-pdu": accepting, with a Maximum Length of 16 bytes),
    ``answer`` what it does with each request received."""

    ae_title: str
    associate: str = "accept"
    answer: Answer | None = None
    port: int = 0
    #: False: an A-RELEASE-RQ is never answered.
    releases: bool = True
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    #: The PDU type that ended each conversation the node ended with a PDU (A-ABORT
    #: 0x07 ...), rather than by closing the connection or releasing.
    ended_by: list[int] = field(default_factory=list)
    _server: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> HostileDestination:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(0.2)
        self.port = server.getsockname()[1]
        self._server = server
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self._server is not None:
            self._server.close()

    def wait_closed(self, within: float) -> bool:
        """True once every connection the node opened has been closed by it."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            if self.open_connections == 0:
                return True
            time.sleep(0.02)
        return self.open_connections == 0

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open_connections += 1
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        try:
            self._converse(sock)
        except (OSError, ConnectionError):
            pass
        finally:
            sock.close()
            with self._lock:
                self.open_connections -= 1

    def _read(self, sock: socket.socket, count: int) -> bytes | None:
        """``count`` bytes; None once the node closed or the peer is stopping."""
        data = b""
        while len(data) < count:
            if self._stop.is_set():
                return None
            try:
                chunk = sock.recv(count - len(data))
            except TimeoutError:
                continue
            if not chunk:
                return None
            data += chunk
        return data

    def _pdu(self, sock: socket.socket) -> tuple[int, bytes] | None:
        head = self._read(sock, 6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBI", head)
        body = self._read(sock, length)
        return None if body is None else (kind, body)

    def _converse(self, sock: socket.socket) -> None:
        first = self._pdu(sock)
        if first is None or first[0] != A_ASSOCIATE_RQ:
            return
        if self.associate == "silent":
            while self._read(sock, 1) is not None:
                pass
            return
        if self.associate == "giant":
            sock.sendall(struct.pack(">BBI", A_ASSOCIATE_AC, 0, 0xFFFFFFF0) + bytes(1024))
            while self._read(sock, 1) is not None:
                pass
            return
        sock.sendall(associate_ac(first[1], accept=self.associate != "reject-contexts",
                                  max_pdu=16 if self.associate == "tiny-pdu" else 16384))
        command = b""
        context = 0
        expect_data = False
        while (pdu := self._pdu(sock)) is not None:
            kind, body = pdu
            if kind == A_RELEASE_RQ:
                if not self.releases:
                    continue
                sock.sendall(struct.pack(">BBI", A_RELEASE_RP, 0, 4) + bytes(4))
                continue
            if kind != P_DATA_TF:
                with self._lock:
                    self.ended_by.append(kind)
                return
            position = 0
            while position < len(body):
                length = struct.unpack_from(">I", body, position)[0]
                context, header = body[position + 4], body[position + 5]
                fragment = body[position + 6:position + 4 + length]
                position += 4 + length
                if header & 0x01:
                    command += fragment
                    if header & 0x02:
                        fields = fields_of(command)
                        expect_data = fields.get(0x00000800, b"\x01\x01")[:2] != b"\x01\x01"
                        if not expect_data:
                            self._received(sock, Request(context, fields))
                            command = b""
                elif header & 0x02 and expect_data:
                    self._received(sock, Request(context, fields_of(command)))
                    command = b""
                    expect_data = False

    def _received(self, sock: socket.socket, request: Request) -> None:
        self.requests.append(request)
        if self.answer is not None:
            self.answer(sock, request)


def _sub_items(body: bytes, kind: int) -> list[bytes]:
    """The sub-items of type ``kind`` of an item's ``body``, whole (header included)."""
    found, position = [], 0
    while position + 4 <= len(body):
        sub_kind, _, length = struct.unpack_from(">BBH", body, position)
        if sub_kind == kind:
            found.append(body[position:position + 4 + length])
        position += 4 + length
    return found


def associate_ac(rq: bytes, accept: bool, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC to the A-ASSOCIATE-RQ body ``rq`` (PS3.8 9.3.3): every
    presentation context accepted in its first transfer syntax, or every one rejected
    (result 3, abstract syntax not supported), the roles the requestor proposed
    accepted (SCP/SCU Role Selection, PS3.7 D.3.3.4); ``max_pdu`` its Maximum Length."""
    contexts = roles = b""
    position = 68
    while position + 4 <= len(rq):
        kind, _, length = struct.unpack_from(">BBH", rq, position)
        body = rq[position + 4:position + 4 + length]
        position += 4 + length
        if kind == 0x50:
            roles = b"".join(_sub_items(body, 0x54))
        if kind != 0x20:
            continue
        syntax = ImplicitVRLittleEndian.encode()
        sub = 4
        while sub + 4 <= len(body):
            sub_kind, _, sub_length = struct.unpack_from(">BBH", body, sub)
            if sub_kind == 0x40:
                syntax = body[sub + 4:sub + 4 + sub_length]
                break
            sub += 4 + sub_length
        contexts += item(0x21, bytes([body[0], 0, 0 if accept else 3, 0]) + item(0x40, syntax))
    user = (item(0x51, struct.pack(">I", max_pdu))
            + item(0x52, b"1.2.826.0.1.3680043.9.7433.1") + roles)
    pdu_body = (rq[:68] + item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + item(0x50, user))
    return struct.pack(">BBI", A_ASSOCIATE_AC, 0, len(pdu_body)) + pdu_body


# --- answers ---------------------------------------------------------------------------------

def never(sock: socket.socket, request: Request) -> None:
    """Take the request and never answer it."""


def status(code: int) -> Answer:
    """Answer every request with ``code``."""
    def answer(sock: socket.socket, request: Request) -> None:
        sock.sendall(request.respond(code))
    return answer


def statuses(codes: list[int]) -> Answer:
    """Answer the n-th request with ``codes[n]`` (the last one again after that)."""
    def answer(sock: socket.socket, request: Request) -> None:
        index = min(answer.count, len(codes) - 1)  # type: ignore[attr-defined]
        answer.count += 1  # type: ignore[attr-defined]
        sock.sendall(request.respond(codes[index]))
    answer.count = 0  # type: ignore[attr-defined]
    return answer


def trickle(every: float) -> Answer:
    """Answer Success, one byte every ``every`` seconds."""
    def answer(sock: socket.socket, request: Request) -> None:
        for byte in request.respond(0x0000):
            sock.sendall(bytes([byte]))
            time.sleep(every)
    return answer


def wrong_message_id(sock: socket.socket, request: Request) -> None:
    """Answer Success to another Message ID."""
    sock.sendall(request.respond(0x0000, message_id=(request.message_id + 7) & 0xFFFF))


def wrong_command(sock: socket.socket, request: Request) -> None:
    """Answer with a C-FIND-RSP instead of the request's response."""
    sock.sendall(request.respond(0x0000, command_field=0x8020))


def giant_pdu(sock: socket.socket, request: Request) -> None:
    """A P-DATA-TF header declaring 0xFFFFFFF0 bytes, then a little of them."""
    sock.sendall(struct.pack(">BBI", P_DATA_TF, 0, 0xFFFFFFF0) + bytes(1024))


def malformed_pdv(sock: socket.socket, request: Request) -> None:
    """A P-DATA-TF PDU whose PDV item declares more than its PDU holds."""
    sock.sendall(struct.pack(">BBII", P_DATA_TF, 0, 8, 1000) + b"\x01\x03\0\0")


def abort(sock: socket.socket, request: Request) -> None:
    """An A-ABORT (source 0, service user) instead of an answer."""
    sock.sendall(struct.pack(">BBI", A_ABORT, 0, 4) + bytes(4))


def slowly(seconds: float) -> Answer:
    """Answer Success after ``seconds`` (a destination slow to store, within time)."""
    def answer(sock: socket.socket, request: Request) -> None:
        time.sleep(seconds)
        sock.sendall(request.respond(0x0000))
    return answer
