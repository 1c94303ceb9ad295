"""What a DIMSE peer may make the node hold: PDU sizes, buffers, connections.

Pure logic, no pynetdicom: :mod:`pacs.dimse.reactor` applies it to pynetdicom's receive
path and acceptor, :class:`pacs.dimse.server.NodeServer` to its connections.

* **PDU ceilings** (:func:`pdu_ceilings`): the largest length a PDU of each type may
  declare before any of its body is read.  A P-DATA-TF PDU may be as long as the
  Maximum Length the node announced (PS3.8 D.1); an A-ASSOCIATE-RQ / -AC carries only
  contexts and user items; the other PDUs have a fixed size (PS3.8 9.3).
* **Reading** (:func:`receive`): buffers grow with the bytes that arrive, at most
  :data:`CHUNK` ahead of them, never to the length a header declares.
* **Time** (:class:`Pace`): a whole PDU must arrive, and a whole write be taken by the
  peer, within the timeout and one more second per :data:`MIN_RATE` bytes moved
  (:func:`receive`, :func:`send_all`); a peer that sends or reads a byte now and then
  cannot hold a thread for longer.
* **Message buffers** (:class:`CappedBuffer`): a DIMSE data set past the object limit
  stops being kept, but is still counted, so that the request can be answered.
* **Connections** (:class:`ConnectionLimits`): connections that have not sent their
  A-ASSOCIATE-RQ are held apart from associations, at most so many per worker (the
  oldest closed first), and associations are admitted per worker and per source address.
"""

from __future__ import annotations

import contextlib
import io
import math
import select
import socket
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
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
#: Largest identifier of a C-FIND, C-MOVE or C-GET request (PS3.7 9.1.2-9.1.4 set
#: none): a list of 10,000 UIDs to match fits; more is answered Unable to process
#: (:class:`pacs.core.errors.QueryTooLarge`), its bytes counted but not kept.
IDENTIFIER_CEILING = 1 << 20
#: Complete DIMSE messages an association may have waiting for its thread.  No
#: Asynchronous Operations Window is negotiated (PS3.7 D.3.3.3: one operation at a
#: time), so a peer sends its next request once it has the response; a C-CANCEL is
#: kept apart (pynetdicom's ``cancel_req``).  What waits, legitimately, is a request
#: read while the thread finishes the last, or a response to a report the node sent
#: meanwhile.  A peer that keeps sending requests while a C-MOVE runs had each held,
#: up to PACS_MAX_OBJECT_BYTES apiece, until the C-MOVE ended: past this many, the
#: association is aborted.
MAX_QUEUED_MESSAGES = 4
#: Command Field values of the requests whose data set is an identifier (PS3.7 E.1).
QUERY_COMMANDS = frozenset({0x0020, 0x0021, 0x0010})  # C-FIND-RQ, C-MOVE-RQ, C-GET-RQ
#: The Command Field of a C-STORE-RQ (PS3.7 E.1-1): the one message whose data set
#: takes the worker's receive budget (:class:`ReceiveBudget`).
C_STORE_RQ = 0x0001
#: Fragments (presentation data values, PS3.8 E.2) a DIMSE message may come in beyond
#: one per :data:`FRAGMENT_BYTES` of its content.  Each fragment costs the node a
#: microsecond or more whatever it holds, and empty ones add nothing to the bytes the
#: object limit counts: without a bound, a data set of fragments without content never
#: ends and only burns CPU.  Real peers send a fragment per PDU (4 KiB and more).
FREE_FRAGMENTS = 1024
#: See :data:`FREE_FRAGMENTS`.
FRAGMENT_BYTES = 256


class FragmentFlood(ValueError):
    """A DIMSE message in more fragments than its content allows (a protocol error,
    the association is aborted): see :data:`FREE_FRAGMENTS`."""


def count_fragment(count: int, content: int) -> int:
    """The fragment count of a message after one more, which has brought its content
    to ``content`` bytes.

    Raises
    ------
    FragmentFlood
        More fragments than :data:`FREE_FRAGMENTS` and one per :data:`FRAGMENT_BYTES`.
    """
    count += 1
    if count > FREE_FRAGMENTS + content // FRAGMENT_BYTES:
        raise FragmentFlood(f"a message in {count} fragments holding {content} bytes")
    return count
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


#: The smallest Maximum Length (PS3.8 D.1) a peer may announce, 0 (no maximum) aside.
#: The standard sets no floor, but each PDU the node sends costs it work whatever it
#: carries: a peer announcing 7 bytes made a C-GET of a 500 MB object half a billion
#: reads of one byte, a thread busy for hours for one request.  At this floor a PDU
#: carries at least 1 KiB.  Real implementations announce far more (dcmtk refuses to be
#: configured below 4 KiB; pynetdicom announces 16 KiB by default).
MIN_PEER_PDU = 1024


def peer_pdu_refusal(maximum_length: int | None) -> str | None:
    """Why a peer announcing ``maximum_length`` is not served (``None``: it is)."""
    if maximum_length and 0 < maximum_length < MIN_PEER_PDU:
        return (f"its maximum PDU length of {maximum_length} bytes is below the "
                f"{MIN_PEER_PDU} the node requires")
    return None


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


#: The slowest average rate, in bytes per second, at which an honest peer is expected to
#: move a PDU or take a write once the timeout has passed: 256 kbit/s.  Each byte moved
#: earns ``1 / MIN_RATE`` seconds more (:class:`Pace`); a peer has to send the bytes to
#: earn their time, so a length it declares earns nothing.
MIN_RATE = 32 << 10


class Pace:
    """The time one transfer (a PDU read, header and body; a write) may take.

    ``timeout`` seconds from its start, and ``1 / rate`` seconds more per byte moved so
    far: a PDU of the usual size (PACS_MAX_PDU, 256 KiB) on any link faster than 4 KiB/s
    arrives within the default timeout alone, a large one on a slow but steady link
    keeps earning time, and a peer that trickles a byte now and then is cut off about
    ``timeout`` seconds after it began, however long the PDU it declared.  Unlike the
    socket's own timeouts (SO_RCVTIMEO, SO_SNDTIMEO), which start again with every byte,
    this bounds the whole transfer; like them, no single wait for the peer lasts longer
    than ``timeout`` (:meth:`wait`), so a transfer that earned much time and then stops
    still ends a timeout later.

    Parameters
    ----------
    timeout : float
        Seconds the transfer may take before any byte earned time (PACS_DIMSE_TIMEOUT).
    rate : float
        Bytes per second that earn one second (:data:`MIN_RATE`).
    """

    __slots__ = ("moved", "rate", "start", "timeout")

    def __init__(self, timeout: float, rate: float = MIN_RATE) -> None:
        self.start = time.monotonic()
        self.timeout = timeout
        self.rate = rate
        self.moved = 0

    def deadline(self) -> float:
        """``time.monotonic()`` value after which the transfer has taken too long."""
        return self.start + self.timeout + self.moved / self.rate

    def wait(self) -> float:
        """Seconds the next wait for the peer may last (0: none left): to the deadline,
        and no longer than ``timeout``."""
        return max(0.0, min(self.deadline() - time.monotonic(), self.timeout))


def receive(sock: socket.socket, count: int, prefix: bytes | bytearray = b"",
            deadline: float | Pace | None = None) -> bytearray | bytes:
    """``prefix`` followed by the next ``count`` bytes of ``sock``.

    The buffer grows with what arrives: at most :data:`CHUNK` bytes are allocated ahead
    of the data, whatever ``count`` a peer declared.  Up to :data:`CHUNK` (the usual
    case: every PDU within the node's Maximum Length) this is one buffer of the final
    size filled in place; longer reads fill chunks joined once at the end.

    Returns early, shorter, when the peer closes the connection.

    Parameters
    ----------
    deadline : float or Pace, optional
        When to give up (TimeoutError): a ``time.monotonic()`` value, or the
        :class:`Pace` of a transfer this read is part of (the bytes read count as moved).
        No read waits past it.  Without one, a blocking read is bounded only by the
        socket's own timeout (SO_RCVTIMEO).

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
    pace = deadline if isinstance(deadline, Pace) else None
    left = _time_left(deadline)
    try:
        while total < size:
            if filled == len(buffer):  # this chunk is full: the next one
                view.release()
                chunks.append(buffer)
                buffer = bytearray(min(size - total, CHUNK))
                view = memoryview(buffer)
                filled = 0
            if left is None:
                read = sock.recv_into(view[filled:])
            else:
                read = _receive_within(sock, view[filled:], left)
                if pace is not None:
                    pace.moved += read
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


def _time_left(deadline: float | Pace | None) -> Callable[[], float] | None:
    """How long the next wait for the peer may last, as :func:`receive` asks it."""
    if deadline is None:
        return None
    if isinstance(deadline, Pace):
        return deadline.wait
    return lambda: deadline - time.monotonic()


#: recv / send flag: do not wait (Linux and the BSDs).
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def _waits_by_itself(sock: Any) -> bool:
    """True for a plain socket with no Python timeout, on which a read or write with
    :data:`_DONTWAIT` returns at once (with a Python timeout it would wait for it; TLS
    sockets take no flags)."""
    return bool(_DONTWAIT) and type(sock) is socket.socket and sock.gettimeout() is None


def _receive_within(sock: Any, view: memoryview, seconds: Callable[[], float]) -> int:
    """One read into ``view`` that waits for data at most ``seconds()`` (the time left).

    The bytes already there are taken without a wait (the usual case, no extra system
    call); only when there are none does it wait (``select``) for the time left.
    """
    if seconds() <= 0:
        raise TimeoutError("no whole PDU within the time allowed")
    if _waits_by_itself(sock):
        try:
            return int(sock.recv_into(view, 0, _DONTWAIT))
        except BlockingIOError:
            pass
    remaining = seconds()
    if remaining <= 0 or not readable(sock, remaining):
        raise TimeoutError("no whole PDU within the time allowed")
    with _within(sock, seconds()):
        return int(sock.recv_into(view))


@contextlib.contextmanager
def _within(sock: Any, seconds: float) -> Iterator[None]:
    """A blocking read or write of ``sock`` that ends within ``seconds``.

    A plain socket that ``select`` found ready reads or writes at once.  A TLS one need
    not: OpenSSL reads a whole record inside one call, and a peer that sent part of one
    held the thread in it for good (the socket's SO_RCVTIMEO ends a wait of the kernel's,
    which CPython's TLS layer then begins again).  A Python timeout bounds the whole
    call instead (``TimeoutError``); the socket's own is put back after it.
    """
    if _waits_by_itself(sock):
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(max(seconds, 0.001))
    try:
        yield
    finally:
        sock.settimeout(before)


#: Bytes handed to a socket per call when its writes cannot be told not to wait (TLS).
_SEND_SLICE = 1 << 16


def send_all(sock: Any, data: bytes | bytearray | memoryview, pace: Pace | None) -> None:
    """Write all of ``data`` to ``sock``, the whole write within ``pace``.

    ``sendall`` with SO_SNDTIMEO fails only when a single wait makes no progress: a peer
    that reads a byte now and then holds the writing thread for as long as it likes.
    Here no wait goes past the pace's deadline, nor lasts longer than its timeout.
    Without a pace this is ``sendall``.

    Raises
    ------
    TimeoutError
        The peer did not take the data in time (part of it may have been written).
    OSError
        The write failed.
    """
    if pace is None:
        sock.sendall(data)
        return
    view = memoryview(data).cast("B")
    sent, size = 0, len(view)
    plain = _waits_by_itself(sock)
    try:
        while sent < size:
            remaining = pace.wait()
            if remaining <= 0:
                raise TimeoutError("the peer did not take the data within the time allowed")
            written = 0
            if plain:  # as much as the socket takes now
                with contextlib.suppress(BlockingIOError):
                    written = int(sock.send(view[sent:], _DONTWAIT))
            if not written:  # wait until it takes more, at most the time left
                if not _writable(sock, remaining):
                    raise TimeoutError("the peer did not take the data within the time "
                                       "allowed")
                if not plain:  # a slice, within the time left (_within)
                    with _within(sock, pace.wait()):
                        written = int(sock.send(view[sent:sent + _SEND_SLICE]))
            sent += written
            pace.moved += written
    finally:
        view.release()


def _writable(sock: Any, seconds: float) -> bool:
    """True when ``sock`` takes more data before ``seconds`` pass."""
    return bool(select.select([], [sock], [], seconds)[1])


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


class ReceiveBudget:
    """The bytes of DIMSE data sets one worker process holds while they arrive.

    Each data set is bounded by the object limit, but a few peers sending large objects
    slowly, on associations of their own, made the worker hold all of them (four of
    250 MB: +1 GB, for as long as each sent a PDU within the DIMSE timeout).  A data
    set takes its bytes from here as they arrive and gives them back once stored;
    one that would pass ``max_bytes`` is dropped, counted on, and answered A700 as an
    object over the limit is.  With several customers one customer's data sets take
    at most ``customer_bytes`` (its share), so that its slow senders cannot refuse
    every other customer's stores.  A data set that is the only one held (in the
    worker, in its customer) always fits that bound, so that any object within the
    object limit can be received.  0: no limit.  Thread-safe.
    """

    def __init__(self, max_bytes: int, customer_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.customer_bytes = customer_bytes
        self.held = 0
        self._by_customer: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, size: int, holding: int, customer: str = "") -> bool:
        """Take ``size`` more bytes for a data set of ``customer`` that holds
        ``holding`` already; False (nothing taken) when they do not fit."""
        with self._lock:
            mine = self._by_customer.get(customer, 0)
            if (self.max_bytes > 0 and self.held + size > self.max_bytes
                    and self.held > holding):
                return False
            if (self.customer_bytes > 0 and mine + size > self.customer_bytes
                    and mine > holding):
                return False
            self.held += size
            self._by_customer[customer] = mine + size
            return True

    def give(self, size: int, customer: str = "") -> None:
        """Give back ``size`` bytes taken for ``customer``."""
        if size:
            with self._lock:
                self.held -= size
                left = self._by_customer.get(customer, 0) - size
                if left > 0:
                    self._by_customer[customer] = left
                else:
                    self._by_customer.pop(customer, None)


class Holding:
    """What one data set holds of a :class:`ReceiveBudget`, for its association's
    customer; given back by :meth:`release` (once, whoever calls it)."""

    def __init__(self, budget: ReceiveBudget | None, customer: str = "") -> None:
        self.budget = budget
        self.customer = customer
        self.size = 0
        self.refused = False

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; once refused, every later call is refused too (the
        data set is dropped) and what was held is given back."""
        if self.refused:
            return False
        if self.budget is None or self.budget.take(size, self.size, self.customer):
            self.size += size
            return True
        self.refused = True
        self.release()
        return False

    def release(self) -> None:
        held, self.size = self.size, 0
        if self.budget is not None:
            self.budget.give(held, self.customer)


class CappedBuffer(io.BytesIO):
    """A DIMSE message's data set buffer that keeps at most ``limit`` bytes.

    pynetdicom appends every data set fragment of a message to one buffer until the last
    arrives.  Past ``limit`` this one drops what it holds and keeps nothing more, only
    counting (:attr:`received`), so that the message can still be answered
    (:attr:`overflowed`) once complete, and the association go on.
    """

    def __init__(self, limit: int, holding: Holding | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0
        self.overflowed = False
        self.holding = holding or Holding(None)
        # Given back once pynetdicom has done with the message (its handler has run).
        weakref.finalize(self, self.holding.release)

    @property
    def exhausted(self) -> bool:
        """Dropped because the worker's :class:`ReceiveBudget` had no room for it."""
        return self.holding.refused

    def write(self, data: Any) -> int:
        size = len(data)
        self.received += size
        if self.received <= self.limit and self.holding.take(size):
            return super().write(data)
        self._overflow()
        return size

    def lower(self, limit: int) -> None:
        """Keep at most ``limit`` bytes from now on (once the message's command says
        what its data set is); what was kept past it is dropped at once.  A data set
        held to so little (a query's identifier) takes nothing of the receive budget
        (:meth:`leave_budget`): it is not refused because stores fill it."""
        self.limit = min(self.limit, limit)
        self.leave_budget()
        if self.received > self.limit:
            self._overflow()

    def leave_budget(self) -> None:
        """Take nothing more of the receive budget, and give back what was taken: the
        message is not a C-STORE (a query's identifier, a storage commitment's Action
        Information), or has ended unanswered (its association gone)."""
        self.holding.release()
        self.holding = Holding(None)

    def _overflow(self) -> None:
        if not self.overflowed:
            self.overflowed = True
            self.seek(0)
            self.truncate(0)  # frees what was kept
            self.holding.release()


def dropped(buffer: object) -> int:
    """The bytes that arrived in ``buffer`` when it stopped keeping them, else 0."""
    return buffer.received if isinstance(buffer, CappedBuffer) and buffer.overflowed else 0


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
    are running in the worker, fewer than ``max_per_host`` from the same address and
    fewer than ``max_per_customer`` of the same customer (the one its called AE title
    names: with several customers, one whose modalities flood the node still leaves
    the others places).  Running associations are found again on each admission by
    ``alive`` (the association threads), so one that ends any way at all frees its
    place.

    Limits of 0 or less mean no limit.  Thread-safe.
    """

    def __init__(self, max_associations: int, max_per_host: int, max_pending: int,
                 max_object_bytes: int = 0,
                 is_open: Callable[[Any], bool] | None = None,
                 alive: Callable[[Any], bool] | None = None, *,
                 max_per_customer: int = 0, receive_bytes: int = 0,
                 customer_share: float = 1.0) -> None:
        self.max_associations = max_associations
        #: The bytes of data sets being received (``PACS_DIMSE_RECEIVE_BYTES``), with
        #: several customers each one's share of them (as of the associations).
        self.receiving = ReceiveBudget(receive_bytes, math.floor(
            receive_bytes * customer_share) if max_per_customer and receive_bytes else 0)
        self.max_per_host = max_per_host
        self.max_per_customer = max_per_customer
        self.max_pending = max_pending
        self.max_object_bytes = max_object_bytes
        self._is_open = is_open or _socket_open
        self._alive = alive or _thread_alive
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, None] = OrderedDict()
        self._admitted: dict[Hashable, tuple[str, str]] = {}  # (address, customer)

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
              host: str, customer: str = "") -> str | None:
        """The A-ASSOCIATE-RQ of ``connection`` arrived: admit ``association`` from
        ``host`` to ``customer``, or say why not (``None``: admitted)."""
        with self._lock:
            self._pending.pop(connection, None)
            for gone in [a for a in self._admitted if not self._alive(a)]:
                del self._admitted[gone]
            if 0 < self.max_associations <= len(self._admitted):
                return f"{self.max_associations} associations are running in this worker"
            if 0 < self.max_per_host <= sum(1 for h, _ in self._admitted.values()
                                            if h == host):
                return f"{self.max_per_host} associations from this address are running"
            if 0 < self.max_per_customer <= sum(1 for _, c in self._admitted.values()
                                                if c == customer):
                return (f"{self.max_per_customer} associations of this customer are "
                        "running in this worker")
            self._admitted[association] = (host, customer)
            return None

    def customer_of(self, association: Hashable) -> str:
        """The customer an admitted association was admitted to (``""``: unknown)."""
        with self._lock:
            return self._admitted.get(association, ("", ""))[1]

    def holding(self, association: Hashable) -> Holding:
        """A new data set's share of :attr:`receiving`, for ``association``'s customer."""
        return Holding(self.receiving, self.customer_of(association))

    def forget(self, connection: Hashable | None) -> None:
        """``connection`` is pending no more (its request arrived and was refused)."""
        with self._lock:
            self._pending.pop(connection, None)

    def evict_oldest(self) -> Any | None:
        """Forget the oldest pending connection still open and return it, to close (a
        new one could not be accepted for want of descriptors); ``None``: none open."""
        with self._lock:
            while self._pending:
                oldest = self._pending.popitem(last=False)[0]
                if self._is_open(oldest):
                    return oldest
            return None

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
