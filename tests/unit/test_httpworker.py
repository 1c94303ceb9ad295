"""The pieces of the HTTP worker's event loop (``pacs.node.httpworker``), in process: the
chunked decoder, the body spool and its memory budget, the reader over received
pieces, and the non-blocking response writer."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import selectors
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from gunicorn.config import Config
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader

from pacs.core.errors import IncompleteBody
from pacs.node import httpworker
from pacs.node.httpworker import (
    CHUNK_BYTES,
    FREE_CHUNKS,
    BadRequest,
    Budget,
    Chunked,
    Spool,
    Writer,
)


def chunked(body: bytes, sizes: list[int], extension: bytes = b"",
            trailers: bytes = b"") -> bytes:
    out, position = bytearray(), 0
    for size in sizes:
        out += b"%x%s\r\n%s\r\n" % (size, extension, body[position:position + size])
        position += size
    return bytes(out + b"0\r\n" + trailers + b"\r\n")


def decode(encoded: bytes, piece: int) -> tuple[bytes, int, bool]:
    """Feed ``encoded`` in pieces of ``piece`` bytes: (body, bytes consumed, done)."""
    decoder, body, consumed = Chunked(), bytearray(), 0
    for start in range(0, len(encoded), piece):
        data = encoded[start:start + piece]
        pieces, used = decoder.feed(data)
        body += b"".join(pieces)
        consumed += used
        if decoder.done:
            break
    return bytes(body), consumed, decoder.done


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 100_000])
def test_chunked_bodies_decode_whatever_the_pieces(piece: int) -> None:
    body = bytes(random.Random(piece).getrandbits(8) for _ in range(5000))
    encoded = chunked(body, [1, 4000, 999], extension=b";name=value",
                      trailers=b"Checksum: abc\r\n")
    decoded, consumed, done = decode(encoded + b"GET / HTTP/1.1\r\n", piece)
    assert done and decoded == body
    assert consumed == len(encoded)  # what follows is the next request's


def test_chunks_past_what_their_data_allows_are_refused() -> None:
    """Each chunk costs the worker's loop whatever it holds: a body of one-byte chunks
    is refused past FREE_CHUNKS (and one chunk per CHUNK_BYTES of data); up to it, the
    data of each buffer fed comes as one piece, not one object per chunk."""
    allowed = max(n for n in range(4 * FREE_CHUNKS) if n <= FREE_CHUNKS + n // CHUNK_BYTES)
    small = bytes(range(256)) * 8
    encoded = chunked(small[:allowed], [1] * allowed)
    pieces, _ = Chunked().feed(encoded)
    assert pieces == [small[:allowed]]
    decoded, _, done = decode(encoded, 4096)
    assert done and decoded == small[:allowed]
    with pytest.raises(BadRequest, match="chunks for"):
        decode(chunked(small, [1] * len(small)), 4096)
    # Large chunks among small ones earn room for more.
    body = bytes(64 * 4096) + small
    decoded, _, done = decode(chunked(body, [64 * 4096] + [1] * len(small)), 65536)
    assert done and decoded == body


@pytest.mark.parametrize("encoded", [
    b"zz\r\nabc\r\n0\r\n\r\n",            # not hexadecimal
    b"\r\n",                              # no size
    b"3\nabc\r\n0\r\n\r\n",               # bare LF
    b"3\r\nabcd\r\n0\r\n\r\n",            # longer than announced
    b"11111111111111111\r\n",             # 17 digits
    b"3" + b" " * 5000 + b"\r\n",         # a size line without end
])
def test_invalid_chunked_framing_is_refused(encoded: bytes) -> None:
    with pytest.raises(BadRequest) as raised:
        decode(encoded, 1000)
    assert raised.value.status.startswith(("400", "431"))


def test_trailers_are_bounded() -> None:
    encoded = b"0\r\n" + b"X-T: aaaa\r\n" * (httpworker.MAX_TRAILER_BYTES // 8)
    with pytest.raises(BadRequest) as raised:
        decode(encoded, 4096)
    assert raised.value.status.startswith("431")


def spooled(pieces: list[bytes], folder: Path, in_memory: bool = True) -> Spool:
    spool = Spool(Budget(1 << 30 if in_memory else 0), str(folder), None)
    for piece in pieces:
        spool.write(piece)
    spool.finish()
    return spool


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "file"])
def test_the_body_reader_reads_like_a_buffer(tmp_path: Path, in_memory: bool) -> None:
    rng = random.Random(5)
    data = bytes(rng.choice(b"ab\n") for _ in range(3000))
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 20)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        body = spooled(pieces, tmp_path, in_memory).reader(timeout=5)
        reference = io.BytesIO(data)
        while True:
            size = rng.choice([None, -1, 0, 1, 5, 64, 4000])
            if rng.random() < 0.5:
                got, want = body.readline(size), reference.readline(size)
            else:
                got, want = body.read(size), reference.read(size)
            assert got == want
            if reference.tell() == len(data):
                assert body.read() == b""
                break


def test_a_read_of_exactly_the_next_piece_is_not_copied(tmp_path: Path) -> None:
    """A large piece is kept as it arrived (small ones are joined, and copied)."""
    first, second = b"x" * httpworker.PIECE_BYTES, b"y" * 10
    body = spooled([first, second], tmp_path).reader(timeout=5)
    assert body.read(len(first)) is first
    lines = spooled([b"a\nb", b"c\n", b"d"], tmp_path).reader(timeout=5)
    assert list(lines) == [b"a\n", b"bc\n", b"d"]


def test_a_body_is_read_while_it_arrives(tmp_path: Path) -> None:
    spool = Spool(Budget(1 << 20), str(tmp_path), 3000)
    reader = spool.reader(timeout=10)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(reader.read(3000)))
    thread.start()
    for _ in range(3):
        time.sleep(0.05)
        assert thread.is_alive()  # waits for the whole read
        spool.write(b"k" * 1000)
    thread.join(5)
    assert got == [b"k" * 3000]


def test_a_body_that_stops_arriving_is_incomplete(tmp_path: Path) -> None:
    spool = Spool(Budget(1 << 20), str(tmp_path), 3000)
    spool.write(b"k" * 1000)
    reader = spool.reader(timeout=10)
    assert reader.read(1000) == b"k" * 1000  # what arrived reads as it came
    threading.Timer(0.1, spool.abort).start()
    with pytest.raises(IncompleteBody):
        reader.read(2000)


def test_what_arrived_before_a_stop_is_read_before_the_error(tmp_path: Path) -> None:
    """A read of so many bytes returns what arrived before the client stopped (the
    multipart parts whole in it are stored, not dropped); the next read raises."""
    spool = Spool(Budget(1 << 20), str(tmp_path), 3000)
    spool.write(b"k" * 1000)
    reader = spool.reader(timeout=0.1)
    assert reader.read(2000) == b"k" * 1000
    with pytest.raises(IncompleteBody):
        reader.read(1000)


def test_a_body_with_nothing_more_within_the_timeout_is_incomplete(tmp_path: Path) -> None:
    spool = Spool(Budget(1 << 20), str(tmp_path), 3000)
    spool.write(b"k" * 1000)
    with pytest.raises(IncompleteBody):
        spool.reader(timeout=0.1).read()


def test_a_finished_body_ends_without_error(tmp_path: Path) -> None:
    spool = Spool(Budget(1 << 20), str(tmp_path), 1000)
    spool.write(b"k" * 1000)
    spool.finish()
    reader = spool.reader(timeout=10)
    assert reader.read() == b"k" * 1000
    assert reader.read() == b""


def test_a_spool_keeps_small_bodies_in_memory_within_the_budget(tmp_path: Path) -> None:
    budget = Budget(100)
    small = Spool(budget, str(tmp_path), 60)
    assert budget.used == 60
    small.write(b"a" * 60)
    other = Spool(budget, str(tmp_path), 60)  # does not fit: a file, nothing taken
    assert budget.used == 60
    other.write(b"b" * 60)
    small.finish()
    other.finish()
    assert small.reader(5).read() == b"a" * 60 and other.reader(5).read() == b"b" * 60
    small.close()
    other.close()
    assert budget.used == 0


def test_a_chunked_body_moves_to_a_file_when_it_outgrows_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpworker, "MEMORY_BODY_BYTES", 1000)
    budget = Budget(10_000)
    spool = Spool(budget, str(tmp_path), None)
    for _ in range(5):
        spool.write(b"z" * 300)
    assert budget.used == 0  # given back when it moved to the file
    spool.finish()
    assert spool.reader(5).read() == b"z" * 1500
    spool.close()
    assert not list(tmp_path.iterdir())  # the file had no name


def test_a_spool_refuses_a_body_that_would_fill_the_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpworker, "SPOOL_RESERVE_BYTES", 1 << 62)
    with pytest.raises(BadRequest) as raised:
        Spool(Budget(0), str(tmp_path), 10)
    assert raised.value.status.startswith("503")


def test_the_writer_keeps_what_the_socket_does_not_take() -> None:
    left, right = socket.socketpair()
    try:
        left.setblocking(False)
        writer = Writer(left)
        data = b"q" * (8 << 20)  # more than the socket buffers hold
        writer.sendall(data)
        writer.sendall(b"tail")
        assert writer.pending and writer.pending_bytes > 0
        assert not writer.flush(0.05)  # nobody reads: no progress
        received = bytearray()
        right.settimeout(5)
        while len(received) < len(data) + 4:
            received += right.recv(1 << 20)
            writer.send_some()
        assert bytes(received) == data + b"tail" and not writer.pending
        assert writer.pending_bytes == 0
    finally:
        left.close()
        right.close()


def _request(head: bytes) -> Request:
    from gunicorn.config import Config
    from gunicorn.http.unreader import IterUnreader

    return Request(Config(), IterUnreader([head]), ("127.0.0.1", 1), 1)


@pytest.mark.parametrize("head, expected", [
    (b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Expect: 100-Continue\r\n\r\n", True),
    (b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", False),
    # RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored.
    (b"POST /studies HTTP/1.0\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Expect: 100-continue\r\n\r\n", False),
])
def test_expects_continue_reads_the_parsed_head(head: bytes, expected: bool) -> None:
    assert httpworker.expects_continue(_request(head)) is expected


def test_gunicorns_late_continue_is_dropped_and_other_sends_go_out() -> None:
    """The loop answers ``Expect: 100-continue`` before the body; gunicorn's own 100,
    sent with ``send`` once the body is read, must not reach the client."""
    left, right = socket.socketpair()
    try:
        left.setblocking(False)
        writer = Writer(left)
        continue_line = b"HTTP/1.1 100 Continue\r\n\r\n"
        assert writer.send(continue_line) == len(continue_line)
        assert writer.send(b"HTTP/1.1 200 OK\r\n\r\n") == 19
        right.settimeout(5)
        assert right.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    finally:
        left.close()
        right.close()


# --- accepting when the process is short of descriptors ------------------------------------

class Exhausted:
    """A listening socket whose ``accept`` fails with ENFILE while ``failing``."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failing = True

    def accept(self) -> tuple[socket.socket, object]:
        if self.failing:
            raise OSError(errno.ENFILE, "Too many open files in system")
        return self.real.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


@pytest.fixture
def loop_worker(tmp_path: Path) -> Iterator[tuple[httpworker.HttpWorker, Exhausted]]:
    """A worker's loop (no application, no threads) on a loopback listener whose
    accepts fail until told otherwise."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    double = Exhausted(listener)
    worker = httpworker.HttpWorker(0, os.getppid(), [double], None, 30, Config(),
                                   logging.getLogger("test.httpworker"))
    worker.limits = httpworker.Limits(timeout=30.0, keepalive=15.0, max_body=1 << 20,
                                      spool_dir=str(tmp_path))
    worker.max_connections = 16
    worker.poller = selectors.DefaultSelector()
    try:
        yield worker, double
    finally:
        for conn in list(worker.connections.values()):
            worker._close(conn)
        worker.poller.close()
        worker.tmp.close()
        listener.close()


def exchange(worker: httpworker.HttpWorker, double: Exhausted, request: bytes) -> bytes:
    """Send ``request`` on a new connection and run the worker's loop until the answer's
    first line has come (within 3 s): what came."""
    with socket.create_connection(double.real.getsockname()) as client:
        client.sendall(request)
        client.settimeout(0.01)
        answer = b""
        deadline = time.monotonic() + 3.0
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            worker._cycle()
            with contextlib.suppress(TimeoutError):
                answer += client.recv(4096)
        return answer


def test_a_worker_without_connections_accepts_again_after_a_shortage(
        loop_worker: tuple[httpworker.HttpWorker, Exhausted],
        caplog: pytest.LogCaptureFixture) -> None:
    """ENFILE (the system's table full, by another process) with no connection of its
    own: the worker accepts again after ACCEPT_PAUSE (it waited for one of its own
    connections to close, for ever), and logs the failures once per REPORT_SECONDS
    (it logged each)."""
    worker, double = loop_worker
    caplog.set_level(logging.WARNING, logger=httpworker.__name__)
    worker._accept_enabled(True)
    client = socket.create_connection(double.real.getsockname())
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            worker._cycle()
        assert not worker.connections
        double.failing = False
        deadline = time.monotonic() + 2.0  # ACCEPT_PAUSE (0.5 s) and a TICK
        while not worker.connections and time.monotonic() < deadline:
            worker._cycle()
        assert len(worker.connections) == 1
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files in system" in lines[0]


def test_a_request_no_thread_can_take_is_answered_503(
        loop_worker: tuple[httpworker.HttpWorker, Exhausted],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """RLIMIT_NPROC reached before the pool has a thread: the request is answered 503
    and never run later on its closed connection (the worker closed it unanswered, with
    a traceback, and left the call queued); one WARNING line counts such failures; once
    threads start again the next request is run."""
    worker, double = loop_worker
    double.failing = False
    ran: list[object] = []
    monkeypatch.setattr(worker, "_serve", lambda conn, body: ran.append(conn))
    worker.pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pacs-http")
    worker.stream_pool = futures.ThreadPoolExecutor(max_workers=2)
    starting = threading.Thread.start
    short = True

    def start(thread: threading.Thread) -> None:
        if short and thread.name.startswith("pacs-http"):
            raise RuntimeError("can't start new thread")
        starting(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    caplog.set_level(logging.WARNING, logger=httpworker.__name__)
    worker._accept_enabled(True)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        answers = []
        for _ in range(3):
            answers.append(exchange(worker, double, request))
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
        short = False
        with socket.create_connection(double.real.getsockname()) as client:
            client.sendall(request)
            deadline = time.monotonic() + 3.0
            while len(ran) < 1 and time.monotonic() < deadline:
                worker._cycle()
        worker.last_sweep = 0.0  # the sweep reports, however fast the above went
        worker._cycle()
    finally:
        worker.pool.shutdown(wait=True)
        worker.stream_pool.shutdown(wait=True)
    assert len(ran) == 1  # the new request only, none of the refused ones
    lines = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert len(lines) == 1 and "can't start new thread" in lines[0]
    assert not [r for r in caplog.records if r.exc_info]


def test_refused_request_bodies_are_logged_once_then_counted(
        loop_worker: tuple[httpworker.HttpWorker, Exhausted],
        caplog: pytest.LogCaptureFixture) -> None:
    """Five POSTs over PACS_MAX_REQUEST_BYTES: each is answered 413, one log line says
    so (each wrote one) and the sweep counts the other four once REPORT_SECONDS have
    passed."""
    worker, double = loop_worker
    double.failing = False
    caplog.set_level(logging.INFO, logger=httpworker.__name__)
    worker._accept_enabled(True)
    request = b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    for _ in range(5):
        assert exchange(worker, double, request).startswith(b"HTTP/1.1 413 ")
    lines = [r.getMessage() for r in caplog.records if "PACS_MAX_REQUEST_BYTES" in
             r.getMessage()]
    assert len(lines) == 1 and "99999999 bytes" in lines[0]
    worker.too_large.reported -= httpworker.REPORT_SECONDS  # as if that long ago
    worker.last_sweep = 0.0
    worker._cycle()
    lines = [r.getMessage() for r in caplog.records if "PACS_MAX_REQUEST_BYTES" in
             r.getMessage()]
    assert len(lines) == 2 and ": 4 since the last such line" in lines[1]


def test_a_client_watch_tells_a_closed_connection_from_bytes_sent_ahead() -> None:
    """The query of a client that hung up stops (``environ[CLIENT_GONE]``); a client
    that sent its next request ahead is still there."""
    server, client = socket.socketpair()
    with server, client:
        watch = httpworker.ClientWatch(server.fileno())
        assert not watch()
        client.sendall(b"GET /studies HTTP/1.1\r\n\r\n")  # pipelined: not a close
        time.sleep(httpworker.CLIENT_WATCH_INTERVAL)
        assert not watch()
        client.close()
        assert not watch()  # looked at most once an interval
        time.sleep(httpworker.CLIENT_WATCH_INTERVAL)
        assert watch() and watch()


def _parsed(head: bytes) -> Request:
    return Request(Config(), IterUnreader([head]), ("127.0.0.1", 1), 1)


def test_the_host_a_request_names_follows_rfc_9112() -> None:
    """3.2: an HTTP/1.1 request without a Host header gets 400 (HTTP/1.0 may lack
    it); 3.2.2: an absolute-form target's authority is the request's host, whatever
    its Host header says (the loopback rule and the customers see that one)."""
    assert "without a Host" in (httpworker.host_refusal(
        _parsed(b"GET /studies HTTP/1.1\r\n\r\n")) or "")
    assert httpworker.host_refusal(_parsed(b"GET /studies HTTP/1.0\r\n\r\n")) is None
    absolute = _parsed(b"GET http://evil.example:8080/studies HTTP/1.1\r\n"
                       b"Host: 127.0.0.1\r\n\r\n")
    assert httpworker.host_refusal(absolute) is None
    assert absolute.headers == [("HOST", "evil.example:8080")]
    bare = _parsed(b"GET http://u:p@node.example/studies HTTP/1.1\r\n\r\n")
    assert httpworker.host_refusal(bare) is None and bare.headers == [("HOST", "node.example")]
    plain = _parsed(b"GET /studies HTTP/1.1\r\nHost: localhost:5985\r\n\r\n")
    assert httpworker.host_refusal(plain) is None
    assert plain.headers == [("HOST", "localhost:5985")]


def test_a_body_received_a_byte_at_a_time_holds_close_to_its_bytes(tmp_path: Path) -> None:
    """Each receive was a piece of its own (a bytes object and an offset): a client
    sending a byte at a time made a body hold about 50 times what the budget counts
    (a 64 MiB budget, 3 GB of a worker).  Small pieces are joined; the bytes read back
    are the bytes sent."""
    budget = httpworker.Budget(64 << 20)
    declared = 200_000
    sent = bytes(range(256)) * (declared // 256) + bytes(declared % 256)
    tracemalloc.start()
    spool = httpworker.Spool(budget, str(tmp_path), declared)
    base = tracemalloc.get_traced_memory()[0]
    for byte in range(declared):
        spool.write(sent[byte:byte + 1])
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held < 2 * declared, held
    with spool.changed:
        assert spool.take(0, declared) == sent and spool.take(70_000, 5) == sent[70_000:70_005]
    spool.close()


def test_a_streamed_request_with_no_thread_gives_its_streaming_place_back(
        loop_worker: tuple[httpworker.HttpWorker, Exhausted],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A body large enough to be streamed, whose thread cannot start: 503, and its place
    among the streamed requests is given back (it was kept for the worker's life, and
    after ``threads`` such refusals no body was streamed again)."""
    worker, double = loop_worker
    double.failing = False
    worker.limits = httpworker.Limits(timeout=30.0, keepalive=15.0, max_body=8 << 20,
                                      spool_dir=worker.limits.spool_dir)
    worker.pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pacs-http")
    worker.stream_pool = futures.ThreadPoolExecutor(max_workers=2,
                                                    thread_name_prefix="pacs-http-stream")
    worker.streams = httpworker.Budget(2)
    starting = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("pacs-http"):
            raise RuntimeError("can't start new thread")
        starting(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    worker._accept_enabled(True)
    head = (b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: %d\r\n\r\n" % (2 << 20))
    try:
        for _ in range(3):
            assert exchange(worker, double, head).startswith(b"HTTP/1.1 503")
        assert worker.streams.used == 0
    finally:
        monkeypatch.undo()
        worker.pool.shutdown(wait=True)
        worker.stream_pool.shutdown(wait=True)
