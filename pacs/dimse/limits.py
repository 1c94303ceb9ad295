"""What a DIMSE peer may make the node hold: PDU sizes, buffers, connections.

Pure logic, no pynetdicom: :mod:`pacs.dimse.reactor` applies it to pynetdicom's receive
path and acceptor, :class:`pacs.dimse.server.NodeServer` to its connections.

* **PDU ceilings** (:func:`pdu_ceilings`): the largest length a PDU of each type may
  declare before any of its body is read.  A P-DATA-TF PDU may be as long as the
  Maximum Length the node announced (PS3.8 D.1); an A-ASSOCIATE-RQ / -AC carries only
  contexts and user items; the other PDUs have a fixed size (PS3.8 9.3).
* **Reading** (:func:`receive`): buffers grow with the bytes that arrive, at most
  :data:`CHUNK` ahead of them, never to the length a header declares.
* **Message buffers** (:class:`CappedBuffer`): a DIMSE data set past the object limit
  stops being kept, but is still counted, so that the request can be answered.
* **Connections** (:class:`ConnectionLimits`): connections that have not sent their
  A-ASSOCIATE-RQ are held apart from associations, at most so many per worker (the
  oldest closed first), and associations are admitted per worker and per source address.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

#: Bytes read ahead of what has arrived: a buffer grows by at most this much at a time.
CHUNK = 1 << 20
#: Largest A-ASSOCIATE-RQ / -AC body: contexts and user items (PS3.8 9.3.2, 9.3.3).
#: Even every storage SOP class in a dozen transfer syntaxes stays far below it.
ASSOCIATE_CEILING = 64 << 10
#: Largest body of the fixed-size PDUs (A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP, A-ABORT: 4
#: bytes, PS3.8 9.3.4, 9.3.6-9.3.8), with room for a peer that pads them.
FIXED_CEILING = 64
#: Largest command set of one DIMSE message; real ones are a few hundred bytes.
COMMAND_CEILING = 64 << 10
#: Room for the command set and PDV headers next to a data set in one unlimited PDU.
PDU_OVERHEAD = 1 << 20
#: No ceiling: the largest length a PDU header can declare.
UNLIMITED = 0xFFFFFFFF

#: PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
PDU_NAMES = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
             A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF",
             A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT"}


def pdu_ceilings(max_pdu: int, unlimited_data: int = UNLIMITED) -> tuple[int, ...]:
    """The largest PDU length (the header's length field) allowed per PDU type.

    Parameters
    ----------
    max_pdu : int
        The Maximum Length this side announced (A-ASSOCIATE-RQ/-AC user information,
        PS3.8 D.1): the longest variable field of a P-DATA-TF PDU it receives.  0 means
        no maximum.
    unlimited_data : int
        The P-DATA-TF ceiling when ``max_pdu`` is 0 (see :func:`unlimited_pdata`).

    Returns
    -------
    tuple of int
        Indexed by PDU type (0x01-0x07); index 0 is unused (0).
    """
    data = max_pdu if max_pdu > 0 else unlimited_data
    return (0, ASSOCIATE_CEILING, ASSOCIATE_CEILING, FIXED_CEILING, data, FIXED_CEILING,
            FIXED_CEILING, FIXED_CEILING)


def unlimited_pdata(max_object_bytes: int) -> int:
    """The P-DATA-TF ceiling without a Maximum Length: one PDU may carry a whole object
    (and its command), not more."""
    if max_object_bytes <= 0:
        return UNLIMITED
    return min(UNLIMITED, max_object_bytes + PDU_OVERHEAD)


def receive(sock: socket.socket, count: int, prefix: bytes | bytearray = b"",
            deadline: float | None = None, wait: bool = False) -> bytearray | bytes:
    """``prefix`` followed by the next ``count`` bytes of ``sock``.

    The buffer grows with what arrives: at most :data:`CHUNK` bytes are allocated ahead
    of the data, whatever ``count`` a peer declared.  Up to :data:`CHUNK` (the usual
    case: every PDU within the node's Maximum Length) this is one buffer of the final
    size filled in place; longer reads fill chunks joined once at the end.

    Returns early, shorter, when the peer closes the connection.

    Parameters
    ----------
    deadline : float, optional
        ``time.monotonic()`` value after which to give up (TimeoutError).  Without
        ``wait`` it is checked between reads: a blocking read is bounded by the socket's
        own timeout (SO_RCVTIMEO).
    wait : bool
        With a ``deadline``, wait for the socket to become readable before each read
        (``select``), at most until then.

    Raises
    ------
    TimeoutError
        ``deadline`` passed.
    OSError
        The read failed (a receive timeout included).
    """
    start = len(prefix)
    size = start + count
    buffer = bytearray(min(size, start + CHUNK))
    buffer[:start] = prefix
    view = memoryview(buffer)
    filled, total = start, start
    chunks: list[bytearray] = []
    try:
        while total < size:
            if filled == len(buffer):  # this chunk is full: the next one
                view.release()
                chunks.append(buffer)
                buffer = bytearray(min(size - total, CHUNK))
                view = memoryview(buffer)
                filled = 0
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (wait and not readable(sock, remaining)):
                    raise TimeoutError("no data within the time allowed")
            read = sock.recv_into(view[filled:])
            if not read:  # closed by the peer: what arrived
                view.release()
                del buffer[filled:]
                break
            filled += read
            total += read
    finally:
        view.release()
    if not chunks:
        return buffer
    chunks.append(buffer)
    return b"".join(chunks)


def readable(sock: Any, seconds: float) -> bool:
    """True when a read of ``sock`` returns something before ``seconds`` pass.  A TLS
    socket may hold decrypted bytes already (``pending``) that ``select`` cannot see."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return True
    return bool(select.select([sock], [], [], seconds)[0])


def set_receive_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Make a blocking read of ``sock`` that gets nothing for ``seconds`` fail
    (SO_RCVTIMEO; EAGAIN, an OSError).  ``None`` or 0 removes the bound."""
    seconds = seconds if seconds and seconds > 0 else 0.0
    whole = int(seconds)
    with contextlib.suppress(OSError):  # already closed: nothing to bound
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


def bound_sends(sock: Any, seconds: float | None) -> None:
    """Make a send on ``sock`` that cannot progress for ``seconds`` fail (SO_SNDTIMEO).

    Retrieves write straight to their sockets (:mod:`pacs.dimse.seam.wire`), and a
    peer that stops reading would otherwise hold the writing thread forever; the
    failed write aborts the association like any other write error.
    """
    if not seconds or seconds <= 0:
        return
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


class CappedBuffer(io.BytesIO):
    """A DIMSE message's data set buffer that keeps at most ``limit`` bytes.

    pynetdicom appends every data set fragment of a message to one buffer until the last
    arrives.  Past ``limit`` this one drops what it holds and keeps nothing more, only
    counting (:attr:`received`), so that the message can still be answered
    (:attr:`overflowed`) once complete, and the association go on.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0
        self.overflowed = False

    def write(self, data: Any) -> int:
        size = len(data)
        self.received += size
        if self.received <= self.limit:
            return super().write(data)
        if not self.overflowed:
            self.overflowed = True
            self.seek(0)
            self.truncate(0)  # frees what was kept
        return size


class CommandTooLarge(ValueError):
    """A command set longer than :data:`COMMAND_CEILING`: a protocol error."""


class CappedCommand(io.BytesIO):
    """A DIMSE message's command set buffer; more than ``limit`` bytes raise
    :class:`CommandTooLarge` (the association is then aborted)."""

    def __init__(self, limit: int = COMMAND_CEILING) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise CommandTooLarge(f"a command set longer than {self.limit} bytes")
        return super().write(data)


class ConnectionLimits:
    """The connections and associations of one worker process.

    A connection is *pending* from its acceptance until its A-ASSOCIATE-RQ arrives
    (:meth:`connected`, :meth:`admit`).  Pending connections do not count as
    associations: at most ``max_pending`` are kept, and when one more arrives the
    **oldest** is closed.  A real peer sends its request within milliseconds of
    connecting, so it is always among the newest; closing the newest instead would let
    anyone who keeps ``max_pending`` silent sockets open refuse every real peer.

    An association is admitted (:meth:`admit`) while fewer than ``max_associations``
    are running in the worker and fewer than ``max_per_host`` from the same address.
    Running associations are found again on each admission by ``alive`` (the
    association threads), so one that ends any way at all frees its place.

    Limits of 0 or less mean no limit.  Thread-safe.
    """

    def __init__(self, max_associations: int, max_per_host: int, max_pending: int,
                 max_object_bytes: int = 0,
                 is_open: Callable[[Any], bool] | None = None,
                 alive: Callable[[Any], bool] | None = None) -> None:
        self.max_associations = max_associations
        self.max_per_host = max_per_host
        self.max_pending = max_pending
        self.max_object_bytes = max_object_bytes
        self._is_open = is_open or _socket_open
        self._alive = alive or _thread_alive
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, None] = OrderedDict()
        self._admitted: dict[Hashable, str] = {}

    def connected(self, connection: Hashable) -> list[Any]:
        """Register a new pending connection; the connections to close now (the
        oldest beyond ``max_pending``), already forgotten."""
        with self._lock:
            for old in [c for c in self._pending if not self._is_open(c)]:
                del self._pending[old]
            self._pending[connection] = None
            closing = []
            while 0 < self.max_pending < len(self._pending):
                closing.append(self._pending.popitem(last=False)[0])
            return closing

    def admit(self, association: Hashable, connection: Hashable | None,
              host: str) -> str | None:
        """The A-ASSOCIATE-RQ of ``connection`` arrived: admit ``association`` from
        ``host``, or say why not (``None``: admitted)."""
        with self._lock:
            self._pending.pop(connection, None)
            for gone in [a for a in self._admitted if not self._alive(a)]:
                del self._admitted[gone]
            if 0 < self.max_associations <= len(self._admitted):
                return f"{self.max_associations} associations are running in this worker"
            if 0 < self.max_per_host <= sum(1 for h in self._admitted.values() if h == host):
                return f"{self.max_per_host} associations from this address are running"
            self._admitted[association] = host
            return None

    def forget(self, connection: Hashable | None) -> None:
        """``connection`` is pending no more (its request arrived and was refused)."""
        with self._lock:
            self._pending.pop(connection, None)

    def drop_pending(self) -> list[Any]:
        """Forget every pending connection; those still open, to close (the worker is
        stopping)."""
        with self._lock:
            dropped = [c for c in self._pending if self._is_open(c)]
            self._pending.clear()
            return dropped

    @property
    def pending(self) -> int:
        """Pending connections registered (closed ones included until the next
        :meth:`connected`)."""
        return len(self._pending)

    @property
    def load(self) -> int:
        """Connections this worker serves: pending, and admitted still running."""
        with self._lock:
            return len(self._pending) + sum(1 for a in self._admitted if self._alive(a))


def _socket_open(sock: Any) -> bool:
    try:
        return bool(sock.fileno() >= 0)
    except (OSError, AttributeError):
        return False


def _thread_alive(thread: Any) -> bool:
    return bool(thread.is_alive())
