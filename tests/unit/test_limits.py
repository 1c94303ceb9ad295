"""Receive buffers, PDU ceilings and connection limits of the DIMSE side
(pacs.dimse.limits)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset

from pacs.dimse import limits

pytestmark = pytest.mark.dimse

# --- PDU ceilings -------------------------------------------------------------------------


def test_pdata_ceiling_is_the_announced_maximum_length() -> None:
    ceilings = limits.pdu_ceilings(262144)
    assert ceilings[limits.P_DATA_TF] == 262144
    assert ceilings[limits.A_ASSOCIATE_RQ] == ceilings[limits.A_ASSOCIATE_AC] == 64 << 10
    for kind in (limits.A_ASSOCIATE_RJ, limits.A_RELEASE_RQ, limits.A_RELEASE_RP,
                 limits.A_ABORT):
        assert 4 <= ceilings[kind] <= 64  # 4 bytes by the standard, a little slack


def test_without_a_maximum_length_pdata_may_carry_one_whole_object() -> None:
    unlimited = limits.unlimited_pdata(1_000_000)
    assert 1_000_000 < unlimited <= 1_000_000 + (2 << 20)
    assert limits.pdu_ceilings(0, unlimited)[limits.P_DATA_TF] == unlimited
    assert limits.pdu_ceilings(0)[limits.P_DATA_TF] == limits.UNLIMITED
    assert limits.unlimited_pdata(0) == limits.UNLIMITED
    assert limits.unlimited_pdata(1 << 40) == limits.UNLIMITED  # a header's 32 bits


# --- reading: buffers grow with arrival ----------------------------------------------------

def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    return ours, theirs


@pytest.mark.parametrize("count", [0, 6, 4096, limits.CHUNK, limits.CHUNK + 1,
                                   3 * limits.CHUNK + 17])
def test_receive_returns_prefix_and_exactly_count_bytes(count: int) -> None:
    ours, theirs = _pair()
    payload = bytes(range(256)) * (count // 256 + 1)
    sender = threading.Thread(target=theirs.sendall, args=(payload[:count] + b"next",))
    sender.start()
    data = limits.receive(ours, count, prefix=b"HEADER")
    sender.join()
    assert bytes(data) == b"HEADER" + payload[:count]
    assert ours.recv(4) == b"next"  # nothing beyond count was read
    ours.close()
    theirs.close()


def test_a_declared_4_gb_allocates_only_what_arrives() -> None:
    """The peer declares 0xFFFFFFF0 bytes, sends 3 MB and closes: the reader returns the
    3 MB, having allocated at most a chunk beyond them."""
    ours, theirs = _pair()
    sent = 3 << 20
    sender = threading.Thread(target=lambda: (theirs.sendall(bytes(sent)), theirs.close()))
    tracemalloc.start()
    try:
        sender.start()
        data = limits.receive(ours, 0xFFFFFFF0, prefix=b"\x04\x00\xff\xff\xff\xf0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sender.join()
    assert len(data) == 6 + sent
    assert peak < 2 * sent + 2 * limits.CHUNK  # the chunks and their joined copy
    ours.close()


def test_a_short_read_returns_what_arrived() -> None:
    ours, theirs = _pair()
    theirs.sendall(b"abc")
    theirs.close()
    assert bytes(limits.receive(ours, 10)) == b"abc"
    ours.close()


def test_a_stalled_read_fails_at_the_receive_timeout() -> None:
    ours, theirs = _pair()
    limits.set_receive_timeout(ours, 0.2)
    theirs.sendall(b"part")
    started = time.monotonic()
    with pytest.raises(OSError):
        limits.receive(ours, 100)
    assert time.monotonic() - started < 5
    ours.close()
    theirs.close()


def test_a_deadline_ends_a_trickle() -> None:
    """Each read gets a byte (the receive timeout never fires), the deadline still
    ends the whole."""
    ours, theirs = _pair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                theirs.send(b"x")
            except OSError:
                return
            time.sleep(0.02)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        with pytest.raises(TimeoutError):
            limits.receive(ours, 1 << 20, deadline=time.monotonic() + 0.3)
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()


def test_a_receive_with_a_deadline_waits_no_longer_than_it() -> None:
    """No read waits past the deadline, whatever the socket's receive timeout."""
    ours, theirs = _pair()
    limits.set_receive_timeout(ours, 30)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        limits.receive(ours, 6, deadline=time.monotonic() + 0.2)
    assert time.monotonic() - started < 5
    ours.close()
    theirs.close()


def _trickle(sock: socket.socket, stop: threading.Event, every: float) -> threading.Thread:
    """A thread that sends one byte on ``sock`` every ``every`` seconds until ``stop``."""

    def run() -> None:
        while not stop.wait(every):
            try:
                sock.send(b"x")
            except OSError:
                return

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_pace_ends_a_pdu_trickled_within_the_receive_timeout() -> None:
    """A byte every 0.1 s, each well within the socket's receive timeout (0.5 s): the
    PDU's pace (0.5 s, and a second per MIN_RATE bytes moved) ends it all the same,
    header and body together, however long the PDU declared."""
    ours, theirs = _pair()
    limits.set_receive_timeout(ours, 0.5)
    stop = threading.Event()
    theirs.send(b"\x04")  # the header's first byte
    sender = _trickle(theirs, stop, 0.1)
    try:
        pace = limits.Pace(0.5)
        with pytest.raises(TimeoutError):
            head = limits.receive(ours, 6, deadline=pace)
            limits.receive(ours, 1 << 20, head, deadline=pace)
        took = time.monotonic() - pace.start
        assert 0.4 < took < 5, took
        assert 0 < pace.moved < 20  # the bytes that arrived, counted once
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()


def test_a_pace_lets_a_large_pdu_that_keeps_arriving_take_longer() -> None:
    """Past its timeout, a PDU that keeps arriving faster than MIN_RATE goes on: each
    byte moved earns ``1 / rate`` seconds."""
    ours, theirs = _pair()
    size, rate = 64 << 10, 64 << 10  # a second's worth at the pace's rate

    def steady() -> None:
        for _ in range(16):  # 16 slices over ~0.8 s: four times the pace's rate
            theirs.sendall(bytes(size // 16))
            time.sleep(0.05)

    sender = threading.Thread(target=steady)
    sender.start()
    try:
        pace = limits.Pace(0.2, rate=rate)
        assert len(limits.receive(ours, size, deadline=pace)) == size
        assert time.monotonic() - pace.start > 0.2  # longer than the timeout alone
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_pace_still_ends_a_pdu_that_stops_after_earning_time() -> None:
    """1 MiB at once earns 32 s at MIN_RATE; then nothing: no wait outlasts the timeout."""
    ours, theirs = _pair()
    sender = threading.Thread(target=theirs.sendall, args=(bytes(1 << 20),))
    sender.start()
    try:
        pace = limits.Pace(0.3)
        with pytest.raises(TimeoutError):
            limits.receive(ours, 2 << 20, deadline=pace)
        assert pace.moved == 1 << 20
        assert time.monotonic() - pace.start < 5
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_send_all_writes_everything() -> None:
    ours, theirs = _pair()
    data = bytes(range(256)) * 40000
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_drain(theirs, len(data))))
    reader.start()
    limits.send_all(ours, data, limits.Pace(10))
    reader.join()
    assert received == data
    ours.close()
    theirs.close()


def _drain(sock: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def sipped_pair() -> Iterator[socket.socket]:
    """Our end of a TCP connection over loopback with small buffers, whose peer reads
    2 KiB every 0.1 s (~20 KB/s, below :data:`pacs.dimse.limits.MIN_RATE`): each read
    shows up as progress of our write at once (a Unix socket pair frees the writer's
    room only once a whole write has been read), so every wait of a plain ``sendall``
    makes progress within SO_SNDTIMEO."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(listener.getsockname())
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stop = threading.Event()

    def sip() -> None:
        while not stop.wait(0.1):
            try:
                theirs.recv(2048)
            except OSError:
                return

    reader = threading.Thread(target=sip)
    reader.start()
    try:
        yield ours
    finally:
        stop.set()
        reader.join()
        ours.close()
        theirs.close()


def test_send_all_gives_up_on_a_peer_that_reads_a_little_now_and_then() -> None:
    """1 MiB would take the sipping peer 50 s; the whole write has its pace (0.5 s, and
    a second per MIN_RATE bytes taken)."""
    with sipped_pair() as ours:
        limits.bound_sends(ours, 0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            limits.send_all(ours, bytes(1 << 20), limits.Pace(0.5))
        assert time.monotonic() - started < 5


# --- message buffers ---------------------------------------------------------------------------

def test_capped_buffer_keeps_up_to_the_limit() -> None:
    buffer = limits.CappedBuffer(10)
    buffer.write(b"12345")
    buffer.write(b"67890")
    assert buffer.getvalue() == b"1234567890" and not buffer.overflowed


def test_capped_buffer_drops_everything_past_the_limit_and_keeps_counting() -> None:
    buffer = limits.CappedBuffer(10)
    buffer.write(b"123456")
    assert buffer.write(b"7890X") == 5
    assert buffer.overflowed and buffer.getvalue() == b""
    buffer.write(bytes(1000))
    assert buffer.received == 1011 and buffer.getvalue() == b""


def test_capped_buffer_is_a_bytesio_for_pynetdicom() -> None:
    assert isinstance(limits.CappedBuffer(1), BytesIO)


def test_command_buffer_refuses_a_long_command() -> None:
    command = limits.CappedCommand(16)
    command.write(bytes(16))
    with pytest.raises(limits.CommandTooLarge):
        command.write(b"x")


def test_an_element_declaring_4_gb_in_a_command_set_reads_what_is_there() -> None:
    """pynetdicom decodes a command set with pydicom from a BytesIO: a length field
    larger than the bytes received allocates no more than those bytes."""
    element = b"\x00\x00\x00\x09" + (0xFFFFFFF0).to_bytes(4, "little") + bytes(100)
    tracemalloc.start()
    try:
        # A short value may be refused (any error); what matters is the allocation.
        with contextlib.suppress(Exception):
            read_dataset(BytesIO(element), True, True).get(0x00000900)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- connections ---------------------------------------------------------------------------------

class _Conn:
    """A connection or association stand-in: open / alive until ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.open = True

    def __repr__(self) -> str:
        return self.name


def _limits(**kwargs: int) -> limits.ConnectionLimits:
    settings = {"max_associations": 3, "max_per_host": 2, "max_pending": 2}
    settings.update(kwargs)
    return limits.ConnectionLimits(
        settings["max_associations"], settings["max_per_host"], settings["max_pending"],
        is_open=lambda c: c.open, alive=lambda a: a.open)


def test_the_oldest_pending_connections_are_closed_first() -> None:
    gate = _limits()
    a, b, c, d = (_Conn(n) for n in "abcd")
    assert gate.connected(a) == []
    assert gate.connected(b) == []
    assert gate.connected(c) == [a]
    assert gate.connected(d) == [b]
    assert gate.pending == 2


def test_pending_connections_that_ended_or_associated_leave_room() -> None:
    gate = _limits()
    a, b, c = (_Conn(n) for n in "abc")
    gate.connected(a)
    gate.connected(b)
    a.open = False  # ARTIM closed it
    assert gate.connected(c) == []
    assert gate.admit(_Conn("assoc-b"), b, "10.0.0.1") is None  # b's request arrived
    assert gate.connected(_Conn("e")) == []
    assert gate.pending == 2


def test_a_stopping_worker_drops_the_open_pending_connections() -> None:
    gate = _limits(max_pending=5)
    a, b = _Conn("a"), _Conn("b")
    gate.connected(a)
    gate.connected(b)
    a.open = False
    assert gate.drop_pending() == [b]
    assert gate.pending == 0


def test_out_of_descriptors_the_oldest_open_pending_connection_goes() -> None:
    """What the acceptor closes when accept fails with EMFILE (NodeServer)."""
    gate = _limits(max_pending=5)
    a, b, c = (_Conn(n) for n in "abc")
    for conn in (a, b, c):
        gate.connected(conn)
    a.open = False  # ARTIM closed it already
    assert gate.evict_oldest() is b
    assert gate.evict_oldest() is c
    assert gate.evict_oldest() is None
    assert gate.pending == 0


def test_pending_connections_do_not_count_as_associations() -> None:
    gate = _limits(max_pending=100)
    for i in range(50):
        gate.connected(_Conn(f"idle{i}"))
    assert gate.admit(_Conn("real"), _Conn("real-conn"), "10.0.0.9") is None


def test_associations_are_limited_per_worker_and_per_host() -> None:
    gate = _limits()
    first, second = _Conn("1"), _Conn("2")
    assert gate.admit(first, None, "10.0.0.1") is None
    assert gate.admit(second, None, "10.0.0.1") is None
    refusal = gate.admit(_Conn("3"), None, "10.0.0.1")
    assert refusal is not None and "address" in refusal
    assert gate.admit(_Conn("4"), None, "10.0.0.2") is None
    refusal = gate.admit(_Conn("5"), None, "10.0.0.3")
    assert refusal is not None and "worker" in refusal
    first.open = False  # its thread ended
    assert gate.admit(_Conn("6"), None, "10.0.0.3") is None


def test_associations_are_limited_per_customer() -> None:
    gate = limits.ConnectionLimits(4, 0, 2, is_open=lambda c: c.open,
                                   alive=lambda a: a.open, max_per_customer=2)
    first = _Conn("1")
    assert gate.admit(first, None, "10.0.0.1", "alpha") is None
    assert gate.admit(_Conn("2"), None, "10.0.0.2", "alpha") is None
    refusal = gate.admit(_Conn("3"), None, "10.0.0.3", "alpha")
    assert refusal is not None and "customer" in refusal
    assert gate.admit(_Conn("4"), None, "10.0.0.3", "beta") is None
    first.open = False  # its thread ended
    assert gate.admit(_Conn("5"), None, "10.0.0.3", "alpha") is None


def test_load_counts_pending_connections_and_running_associations() -> None:
    """What a worker weighs before accepting (NodeServer._defer_to_less_busy_workers)."""
    gate = _limits(max_pending=5)
    waiting, running, ended = _Conn("waiting"), _Conn("running"), _Conn("ended")
    gate.connected(waiting)
    gate.admit(running, None, "10.0.0.1")
    gate.admit(ended, None, "10.0.0.2")
    assert gate.load == 3
    ended.open = False  # its thread ended
    assert gate.load == 2


def test_a_busier_worker_accepts_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection a worker serves delays its accept by ACCEPT_DEFERRAL, up to
    DEFERRAL_STEPS of them; an idle worker, or one alone, accepts at once."""
    from types import SimpleNamespace

    from pacs.dimse import server

    waits: list[float] = []
    monkeypatch.setattr(server.time, "sleep", waits.append)
    gate = _limits(max_pending=0, max_associations=0, max_per_host=0)
    worker = SimpleNamespace(accept_deferral=server.ACCEPT_DEFERRAL, limits=gate)
    defer = server.NodeServer._defer_to_less_busy_workers
    defer(worker)  # type: ignore[arg-type]
    for number in range(2 * server.DEFERRAL_STEPS):
        gate.admit(_Conn(f"a{number}"), None, "10.0.0.1")
        defer(worker)  # type: ignore[arg-type]
    alone = SimpleNamespace(accept_deferral=0.0, limits=gate)
    defer(alone)  # type: ignore[arg-type]
    steps = [min(n, server.DEFERRAL_STEPS) for n in range(1, 2 * server.DEFERRAL_STEPS + 1)]
    assert waits == [pytest.approx(step * server.ACCEPT_DEFERRAL) for step in steps]


def test_an_aborted_association_holds_its_place_until_its_threads_end() -> None:
    """Aborted from its own thread (the network timeout) while its DUL thread is still
    blocked on the socket, an association still holds a thread and a descriptor: it
    counts until both threads have ended.  Released or rejected, it counts no more."""
    from types import SimpleNamespace

    from pacs.dimse.server import _holds_its_place

    def association(**state: bool) -> SimpleNamespace:
        dul = SimpleNamespace(alive=state.pop("dul", True))
        dul.is_alive = lambda: dul.alive
        found = SimpleNamespace(alive=state.pop("thread", True), dul=dul,
                                is_released=False, is_aborted=False, is_rejected=False)
        found.is_alive = lambda: found.alive
        for name, value in state.items():
            setattr(found, name, value)
        return found

    assert _holds_its_place(association())
    aborted = association(is_aborted=True)
    assert _holds_its_place(aborted)  # both threads still run
    aborted.alive = False
    assert _holds_its_place(aborted)  # the DUL thread still runs
    aborted.dul.alive = False
    assert not _holds_its_place(aborted)
    assert not _holds_its_place(association(is_released=True))
    assert not _holds_its_place(association(is_rejected=True))
    assert not _holds_its_place(association(thread=False, dul=False))


def test_zero_means_no_limit() -> None:
    gate = _limits(max_associations=0, max_per_host=0, max_pending=0)
    for i in range(200):
        assert gate.connected(_Conn(f"c{i}")) == []
        assert gate.admit(_Conn(f"a{i}"), None, "10.0.0.1") is None


def test_admission_is_atomic_across_threads() -> None:
    gate = _limits(max_associations=5, max_per_host=0)
    admitted: list[bool] = []
    barrier = threading.Barrier(20)

    def one() -> None:
        barrier.wait()
        admitted.append(gate.admit(_Conn("t"), None, "10.0.0.1") is None)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 5


def test_a_message_begun_while_too_many_wait_aborts_the_association() -> None:
    """No Asynchronous Operations Window is negotiated: a peer that keeps sending
    requests while one is served (C-STOREs behind a C-MOVE to a destination that never
    reads) had each held whole until the first ended.  With
    :data:`limits.MAX_QUEUED_MESSAGES` complete messages waiting, the first fragment of
    the next aborts the association (Evt19), and nothing of it is kept."""
    import queue
    from types import SimpleNamespace

    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.pdu_primitives import P_DATA

    import pacs.dimse.seam.reactor as reactor

    provider = DIMSEServiceProvider.__new__(DIMSEServiceProvider)
    provider.msg_queue = queue.Queue()
    provider.message = None
    events: queue.Queue[str] = queue.Queue()
    provider._assoc = SimpleNamespace(  # type: ignore[assignment]
        is_acceptor=True, requestor=SimpleNamespace(address="10.0.0.9"),
        dul=SimpleNamespace(event_queue=events))
    fragment = b"\x03" + bytes(8)
    single = P_DATA()
    for waiting in range(limits.MAX_QUEUED_MESSAGES):
        provider.msg_queue.put((1, f"message {waiting}"))
    provider._object_limit = 1 << 20  # type: ignore[attr-defined]  # a node's association
    assert reactor._receive_fragment(provider, 1, fragment, single) is False
    assert events.get_nowait() == "Evt19" and provider.message is None
    # The node as a requestor: the pending responses of its own C-FIND may well wait.
    provider._object_limit = -1  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):  # the fragment itself is no real command
        reactor._receive_fragment(provider, 1, fragment, single)
    assert events.empty()


def test_the_receive_budget_is_shared_and_given_back() -> None:
    """Data sets take the worker's budget as they arrive: one that would pass it is
    dropped (its bytes given back) unless it is the only one held; a buffer gives its
    bytes back once released, or once pynetdicom lets go of it."""
    budget = limits.ReceiveBudget(100)
    first, second = (limits.CappedBuffer(1000, limits.Holding(budget)) for _ in range(2))
    first.write(b"x" * 80)
    second.write(b"y" * 10)
    second.write(b"y" * 20)  # 110 > 100, and the first holds bytes too: dropped
    assert (second.exhausted, second.overflowed, second.getvalue(), budget.held) == \
        (True, True, b"", 80)
    second.write(b"y")  # dropped for good, nothing taken
    assert budget.held == 80
    first.write(b"x" * 200)  # the only one held: any object within its limit fits
    assert (first.exhausted, budget.held) == (False, 280)
    first.holding.release()
    assert budget.held == 0
    third = limits.CappedBuffer(1000, limits.Holding(budget))
    third.write(b"z" * 50)
    del third  # never released by its handler (an aborted message)
    assert budget.held == 0


def test_each_customer_takes_its_share_of_the_receive_budget() -> None:
    """With several customers one customer's slow senders hold at most its share
    (``PACS_CUSTOMER_ASSOCIATION_SHARE`` of it): another customer's stores still fit
    (they were refused once one customer held the whole budget)."""
    node = limits.ConnectionLimits(32, 16, 64, max_per_customer=24, receive_bytes=100,
                                   customer_share=0.75, alive=lambda _: True)
    assert node.admit("a1", None, "10.0.0.1", "alpha") is None
    assert node.admit("a2", None, "10.0.0.2", "alpha") is None
    assert node.admit("b1", None, "10.0.0.3", "bravo") is None
    one, two, other = node.holding("a1"), node.holding("a2"), node.holding("b1")
    assert one.take(60) and not two.take(20)  # alpha past its 75: refused
    assert other.take(25)  # bravo's within the 100 in all
    one.release(), other.release()
    assert node.receiving.held == 0
    alone = node.holding("a1")
    assert alone.take(150)  # the only one held: any object fits
