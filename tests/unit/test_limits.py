"""Receive buffers, PDU ceilings and connection limits of the DIMSE side
(pacs.dimse.limits)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import tracemalloc
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


def test_waiting_receive_times_out_without_data() -> None:
    ours, theirs = _pair()
    with pytest.raises(TimeoutError):
        limits.receive(ours, 6, deadline=time.monotonic() + 0.2, wait=True)
    ours.close()
    theirs.close()


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
