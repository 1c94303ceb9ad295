"""Slow, stalled and oversized HTTP clients against ``pacs serve`` (DICOMweb and viewer).

The node runs with one web worker of two threads per port and a 3 s HTTP timeout, so
that a single held thread would show at once.  Each attack is kept up by a background
thread (a socket the server closes is replaced) while a real QIDO-RS (requests), a
viewer page and a C-ECHO must be answered; afterwards every attacking socket must have
been closed by the server, memory must have grown by less than 256 MB and the
descriptors must be back where they were.

The last test is the object store down while a DICOMweb worker boots: DIMSE goes on,
DICOMweb answers 503 until the store is back, then serves again.
"""

from __future__ import annotations

import io
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from tests.interop.conftest import Node, Resources, fresh_ct
from tests.storage.seaweed import SeaweedServer

pytestmark = pytest.mark.interop

#: PACS_HTTP_TIMEOUT of the node under attack, seconds.
TIMEOUT = 3.0
#: PACS_MAX_REQUEST_BYTES of the node under attack.
MAX_REQUEST = 16 << 20
#: Memory (sum of RSS over the node's processes) an attack may add.
MEMORY_GROWTH = 256 << 20
#: Descriptors the node may hold above its baseline once an attack is over.
FD_SLACK = 5
#: Threads of each worker's streaming pool (as many as ``PACS_WEB_THREADS``).
STREAM_THREADS = 2
#: Seconds a real client waits for an answer during an attack ("a few seconds").
ANSWER_WITHIN = 10.0


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for OHIF's files: the viewer port serves its index.html."""
    folder = tmp_path_factory.mktemp("ohif") / "dist"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>viewer</title>")
    return folder


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], dist: Path) -> Node:
    node = node_factory("hostile", PACS_HTTP_TIMEOUT=str(TIMEOUT), PACS_HTTP_KEEPALIVE="2",
                        PACS_MAX_REQUEST_BYTES=str(MAX_REQUEST), PACS_WEB_WORKERS="1",
                        PACS_WEB_THREADS="2", PACS_VIEWER_WORKERS="1",
                        PACS_VIEWER_DIST=str(dist), PACS_UPLOADS_POLL="0")
    wait_answering(node)
    return node


def web_port(node: Node) -> int:
    return int(node.env["PACS_WEB_PORT"])


def viewer_port(node: Node) -> int:
    return int(node.env["PACS_VIEWER_PORT"])


def wait_answering(node: Node, timeout: float = 60.0) -> None:
    """Until both HTTP ports answer (their workers have booted)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (requests.get(f"{node.web_url()}/studies", timeout=5).status_code == 200
                    and requests.get(f"http://127.0.0.1:{viewer_port(node)}/",
                                     timeout=5).status_code == 200):
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"HTTP ports not answering:\n{node.log()}"
        time.sleep(0.3)


@dataclass
class Latencies:
    """Seconds each real client took during an attack."""

    qido: list[float] = field(default_factory=list)
    viewer: list[float] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return ", ".join(f"{name} max {max(values):.2f} s" for name, values in
                         (("QIDO", self.qido), ("viewer", self.viewer), ("C-ECHO", self.echo)))


def served_meanwhile(node: Node, rounds: int = 3,
                     also: Callable[[], None] | None = None) -> Latencies:
    """A QIDO-RS, a viewer page and a C-ECHO, each answered within a few seconds.

    ``rounds`` rounds a second apart, so that they span the attack's timeouts; ``also``
    is run in each round too.
    """
    found = Latencies()
    for _ in range(rounds):
        if also is not None:
            also()
        start = time.monotonic()
        answer = requests.get(f"{node.web_url()}/studies", timeout=ANSWER_WITHIN,
                              headers={"Accept": "application/dicom+json"})
        assert answer.status_code == 200, answer.text[:300]
        found.qido.append(time.monotonic() - start)
        start = time.monotonic()
        page = requests.get(f"http://127.0.0.1:{viewer_port(node)}/", timeout=ANSWER_WITHIN)
        assert page.status_code == 200 and b"viewer" in page.content
        found.viewer.append(time.monotonic() - start)
        start = time.monotonic()
        node.assert_serving()
        found.echo.append(time.monotonic() - start)
        time.sleep(1.0)
    return found


def warm(node: Node) -> None:
    """Bursts of concurrent requests on both ports, so that every thread has opened
    what it keeps (its index connection) before the baseline is taken."""
    urls = [f"{node.web_url()}/studies", f"http://127.0.0.1:{viewer_port(node)}/dicom-web/studies"]
    for _ in range(3):
        threads = [threading.Thread(target=requests.get, args=(url,), kwargs={"timeout": 30})
                   for url in urls for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # Stores too: the threads that take STOW-RS bodies and the intake's mover open
    # their index connections at their first object.
    _, body = stow_body(1)
    stores = [threading.Thread(target=requests.post, args=(url,), kwargs={
        "data": body, "timeout": 30, "headers": {"Content-Type": STOW_TYPE}})
        for url in urls for _ in range(6)]
    for thread in stores:
        thread.start()
    for thread in stores:
        thread.join()
    # And every thread of the streaming pools (a body of at least 1 MiB still arriving
    # when its head is read), which opens its index connection at its first object too.
    streamed = [threading.Thread(target=streamed_stow, args=(port, path))
                for port, path in ((web_port(node), b"/studies"),
                                   (viewer_port(node), b"/dicom-web/studies"))
                for _ in range(STREAM_THREADS)]
    for thread in streamed:
        thread.start()
    for thread in streamed:
        thread.join()
    node.wait_drained()
    served_meanwhile(node, rounds=1)


def streamed_stow(port: int, path: bytes) -> None:
    """A STOW-RS of more than 1 MiB whose body follows its head after a pause (so that
    the server streams it), answered 200."""
    _, body = stow_body(30)
    head = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (path, STOW_TYPE.encode(), len(body)))
    with connect(port) as sock:
        sock.sendall(head + body[:4096])
        time.sleep(0.5)
        sock.sendall(body[4096:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def settled(node: Node, baseline: Resources, timeout: float = 30.0) -> Resources:
    """The node's resources once its descriptors are back near ``baseline``."""
    deadline = time.monotonic() + timeout
    while True:
        now = node.resources()
        if now.fds <= baseline.fds + FD_SLACK or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


class Attack:
    """``count`` sockets made by ``open_one`` kept open against the node.

    A thread watches them: one that the server closes (EOF, after whatever answer it
    sent) is recorded with how long it lived, and replaced while the attack is on.
    Sockets whose peer must not read (``reads=False``) are not watched; :meth:`stop`
    reads them to the end instead.
    """

    def __init__(self, open_one: Callable[[], socket.socket], count: int,
                 reads: bool = True) -> None:
        self.open_one = open_one
        self.count = count
        self.reads = reads
        self.running = True
        self.lifetimes: list[float] = []
        self.answers: list[bytes] = []
        self.sockets: dict[socket.socket, tuple[float, bytearray]] = {}
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        for _ in range(count):
            self._add()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        if reads:
            self.thread.start()

    def _add(self) -> None:
        sock = self.open_one()
        with self.lock:
            self.sockets[sock] = (time.monotonic(), bytearray())
        if self.reads:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)

    def _watch(self) -> None:
        while self.running or self.sockets:
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                with self.lock:
                    opened, received = self.sockets[sock]
                    received += data
                    if data:
                        continue
                    del self.sockets[sock]
                self.selector.unregister(sock)
                sock.close()
                self.lifetimes.append(time.monotonic() - opened)
                self.answers.append(bytes(received[:200]))
                if self.running:
                    self._add()

    def stop(self, within: float) -> None:
        """Stop replacing; every socket must be closed by the server within ``within`` s."""
        self.running = False
        if self.reads:
            self.thread.join(within)
            assert not self.thread.is_alive(), (
                f"{len(self.sockets)} attacking sockets still open after {within} s")
            return
        for sock, (opened, _) in list(self.sockets.items()):
            sock.settimeout(within)
            total = 0
            while chunk := sock.recv(1 << 20):  # raises TimeoutError if never closed
                total += len(chunk)
            self.lifetimes.append(time.monotonic() - opened)
            self.answers.append(str(total).encode())
            sock.close()
        self.sockets.clear()


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


@dataclass
class Outcome:
    """What the attacking sockets saw: how long each lived, how each answer began."""

    lifetimes: list[float]
    answers: list[bytes]


def measured(node: Node, name: str, run: Callable[[], list[Attack]],
             also: Callable[[], None] | None = None) -> Outcome:
    """Baseline, the attacks with the real clients (and ``also``), memory and
    descriptors after."""
    warm(node)
    before = node.resources()
    attacks = run()
    try:
        found = served_meanwhile(node, also=also)
        during = node.resources()
    finally:
        for running in attacks:
            running.stop(within=TIMEOUT + 30)
    after = settled(node, before)
    outcome = Outcome([t for a in attacks for t in a.lifetimes],
                      [x for a in attacks for x in a.answers])
    print(f"\n{name}: before {before}, during {during}, after {after}; {found}; "
          f"{len(outcome.lifetimes)} sockets closed by the server after "
          f"{min(outcome.lifetimes):.1f}-{max(outcome.lifetimes):.1f} s")
    assert during.rss_bytes - before.rss_bytes < MEMORY_GROWTH, (before, during)
    assert after.rss_bytes - before.rss_bytes < MEMORY_GROWTH, (before, after)
    assert after.fds <= before.fds + FD_SLACK, (before, after)
    node.assert_serving()
    return outcome


# --- attacks ----------------------------------------------------------------------------

def test_half_sent_heads_hold_no_thread(node: Node) -> None:
    def half_head(port: int) -> Callable[[], socket.socket]:
        def open_one() -> socket.socket:
            sock = connect(port)
            sock.sendall(b"GET /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: appli")
            return sock
        return open_one

    def run() -> list[Attack]:
        return [Attack(half_head(web_port(node)), 120), Attack(half_head(viewer_port(node)), 120)]

    running = measured(node, "120 + 120 half-sent heads", run)
    assert len(running.lifetimes) >= 240
    # Closed by the server once the head timeout passed, with a 408 answer.
    assert min(running.lifetimes) >= TIMEOUT - 0.5
    assert all(a.startswith(b"HTTP/1.1 408") for a in running.answers), running.answers[:3]


def test_a_connection_flood_closes_the_oldest_slow_clients(node: Node) -> None:
    # More half-sent heads than a worker keeps connections (1000): to accept the real
    # clients, the worker closes the oldest of them before their timeout.
    def open_one() -> socket.socket:
        sock = connect(web_port(node))
        sock.sendall(b"GET /studies HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        return sock

    running = measured(node, "1100 half-sent heads on one worker",
                       lambda: [Attack(open_one, 1100)])
    evicted = [t for t in running.lifetimes if t < TIMEOUT - 1]
    assert len(evicted) >= 100, sorted(running.lifetimes)[:10]


def stow_body(count: int) -> tuple[str, bytes]:
    """(study UID, multipart body) of ``count`` fresh CT_small instances of one study."""
    study = fresh_ct().StudyInstanceUID
    parts = []
    for _ in range(count):
        buffer = io.BytesIO()
        fresh_ct(StudyInstanceUID=study).save_as(buffer, enforce_file_format=True)
        parts.append(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue()
                     + b"\r\n")
    return study, b"".join(parts) + b"--b--\r\n"


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'


def test_stalled_request_bodies_hold_no_thread(node: Node) -> None:
    head = (b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            + STOW_TYPE.encode() + b"\r\nContent-Length: 10485760\r\n\r\n")
    # A part begun and never finished: an application reading it waits for more.
    started = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * (1 << 20)

    def stalled_body(port: int, path: bytes, body: bytes) -> Callable[[], socket.socket]:
        def open_one() -> socket.socket:
            sock = connect(port)
            sock.sendall(head.replace(b"/studies", path) + body)
            return sock
        return open_one

    def run() -> list[Attack]:
        # Heads only, and heads with 1 MiB of body each (100 MiB held by the server:
        # in memory up to its budget, the rest in files).
        return [Attack(stalled_body(web_port(node), b"/studies", b""), 100),
                Attack(stalled_body(web_port(node), b"/studies", started), 100),
                Attack(stalled_body(viewer_port(node), b"/dicom-web/studies", b""), 100)]

    study, body = stow_body(30)  # 1.2 MB: streamed when a streaming thread is free
    assert len(body) > 1 << 20

    def stow() -> None:
        # Sent while the streaming threads are held by stalled bodies: stored anyway.
        stored = requests.post(f"{node.web_url()}/studies", data=body, timeout=ANSWER_WITHIN,
                               headers={"Content-Type": STOW_TYPE,
                                        "Accept": "application/dicom+json"})
        assert stored.status_code == 200, stored.text[:300]

    running = measured(node, "300 stalled 10 MB bodies", run, also=stow)
    assert len(running.lifetimes) >= 300
    assert min(running.lifetimes) >= TIMEOUT - 0.5
    # 408 from the server; a body that had reached the application (streamed) is
    # incomplete, and the application answers 400.
    assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")) for a in running.answers), \
        running.answers[:3]
    assert any(a.startswith(b"HTTP/1.1 408") for a in running.answers)
    found = requests.get(f"{node.web_url()}/studies/{study}/instances", timeout=30)
    assert found.status_code == 200 and len(found.json()) == 30


def large_instance(folder: Path) -> tuple[pydicom.Dataset, Path]:
    """A 32 MiB CT (4096 x 4096, 16 bits) written to ``folder``."""
    ds = fresh_ct()
    ds.Rows = ds.Columns = 4096
    ds.PixelData = np.zeros(4096 * 4096, dtype=np.uint16).tobytes()
    path = folder / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def test_clients_that_never_read_a_large_response_hold_no_thread(
        node: Node, tmp_path: Path) -> None:
    ds, path = large_instance(tmp_path)
    imported = node.cli("import", "--quiet", str(path))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    size = path.stat().st_size
    target = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
              f"/instances/{ds.SOPInstanceUID}").encode()
    request = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*"
               b"\r\n\r\n")

    def never_reads(port: int, prefix: bytes) -> Callable[[], socket.socket]:
        def open_one() -> socket.socket:
            sock = connect(port, receive_buffer=16 << 10)
            sock.sendall(request % (prefix + target))
            return sock
        return open_one

    def run() -> list[Attack]:
        return [Attack(never_reads(web_port(node), b""), 20, reads=False),
                Attack(never_reads(viewer_port(node), b"/dicom-web"), 10, reads=False)]

    running = measured(node, "30 readers of a 32 MiB instance that never read", run)
    # Each was cut off by the server: less than the whole response, then EOF.
    received = [int(a) for a in running.answers]
    assert len(received) == 30 and all(0 < r < size for r in received), received


# --- sizes ------------------------------------------------------------------------------

def raw_exchange(port: int, data: bytes, timeout: float = ANSWER_WITHIN) -> bytes:
    """Send ``data`` and read until the server closes (or ``timeout``)."""
    with connect(port) as sock:
        sock.sendall(data)
        sock.settimeout(timeout)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        return bytes(received)


@pytest.mark.parametrize("port_of", [web_port, viewer_port], ids=["dicomweb", "viewer"])
def test_a_body_over_the_limit_is_refused_before_it_is_sent(
        node: Node, port_of: Callable[[Node], int]) -> None:
    prefix = b"" if port_of is web_port else b"/dicom-web"
    head = (b"POST " + prefix + b"/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
            b"Content-Length: %d\r\n" % (MAX_REQUEST + 1))
    # No body is ever sent: the answer cannot depend on reading it.
    answer = raw_exchange(port_of(node), head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # With Expect: 100-continue, the refusal comes instead of the 100.
    answer = raw_exchange(port_of(node), head + b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer


@pytest.mark.parametrize("port_of", [web_port, viewer_port], ids=["dicomweb", "viewer"])
def test_answers_the_loop_writes_itself_carry_the_same_headers(
        node: Node, port_of: Callable[[Node], int]) -> None:
    """An invalid request line, a line over gunicorn's limit, a header field over its
    limit, a head over the loop's, a body over the limit: plain text with nosniff, the
    sandbox policy and no-store, as the applications' answers; never gunicorn's HTML
    page, and the request's text (which may name a patient) not in the log."""
    marker = b"SECRETPATIENT"
    host = b"Host: 127.0.0.1\r\n"
    requests = {
        b"400": b"GET /studies?PatientName=" + marker + b" HTTP/1.1 x\r\n" + host + b"\r\n",
        b"414": b"GET /studies?PatientName=" + marker + b"A" * 9000 + b" HTTP/1.1\r\n"
                + host + b"\r\n",
        b"431": b"GET /studies HTTP/1.1\r\n" + host + b"X-A: " + marker + b"a" * 9000
                + b"\r\n\r\n",
        b"413": b"POST /studies HTTP/1.1\r\n" + host
                + b"Content-Length: %d\r\n\r\n" % (MAX_REQUEST + 1),
    }
    before = len(node.log())
    for status, request in requests.items():
        answer = raw_exchange(port_of(node), request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), answer[:300]
        lines = head.lower().split(b"\r\n")
        assert b"content-type: text/plain" in lines, head
        assert b"x-content-type-options: nosniff" in lines, head
        assert b"cache-control: no-store" in lines, head
        assert any(line.startswith(b"content-security-policy: ") and b"sandbox" in line
                   for line in lines), head
        assert b"<" not in body and marker not in body, body
    assert marker.decode() not in node.log()[before:]


def test_requests_waiting_for_a_thread_are_bounded(node: Node, tmp_path: Path) -> None:
    """200 requests for a rendered image sent at once to a worker of 2 threads: at most
    WAITING_PER_THREAD per thread wait for one, the others are answered 503 with
    Retry-After at once (before, all waited, unwatched: a client sending a thousand and
    hanging up on each kept every thread answering nobody for seconds); the node
    answers a query afterwards."""
    ds = fresh_ct()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    imported = node.cli("import", "--quiet", str(path))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    target = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
              f"/instances/{ds.SOPInstanceUID}/rendered?viewport=2048,2048").encode()
    request = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: image/png\r\n"
               b"Connection: close\r\n\r\n") % target
    clients = []
    for _ in range(200):
        sock = connect(web_port(node))
        sock.sendall(request)
        clients.append(sock)
    statuses: dict[bytes, int] = {}
    for sock in clients:
        with sock:
            sock.settimeout(60)
            head = b""
            while b"\r\n\r\n" not in head:
                piece = sock.recv(4096)
                if not piece:
                    break
                head += piece
            status = head[9:12]
            statuses[status] = statuses.get(status, 0) + 1
            if status == b"503":
                assert b"\r\nretry-after: 1\r\n" in head.lower(), head
    print(f"\n[200 rendered requests at once] statuses {statuses}")
    assert set(statuses) == {b"200", b"503"} and statuses[b"503"] > 0, statuses
    assert requests.get(f"http://127.0.0.1:{web_port(node)}/studies",
                        timeout=30).status_code == 200


def test_a_single_part_body_that_stops_is_not_stored(node: Node) -> None:
    ds = fresh_ct()
    ds.Rows = ds.Columns = 1024
    ds.PixelData = bytes(1024 * 1024 * 2)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    # Declared whole (2 MiB: streamed to the application), sent up to Pixel Data, an
    # element boundary: what arrived reads as a whole object without pixels.
    head = (b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
            b"dicom\r\nAccept: application/dicom+json\r\nContent-Length: %d\r\n\r\n"
            % len(data))
    with connect(web_port(node)) as sock:
        sock.sendall(head + data[:data.index(b"\xe0\x7f\x10\x00")])
        sock.settimeout(TIMEOUT + ANSWER_WITHIN)
        answer = b""
        while b"before its end" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"before its end" in answer, answer[:300]
    found = requests.get(f"{node.web_url()}/studies/{ds.StudyInstanceUID}/instances",
                         timeout=30)
    assert found.status_code == 404, found.text[:300]  # nothing of it stored


def test_a_chunked_body_over_the_limit_is_refused(node: Node) -> None:
    with connect(web_port(node)) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
                     b"chunked\r\nContent-Type: multipart/related; type=\"application/"
                     b"dicom\"; boundary=b\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"\0" * (1 << 20))
        try:
            for _ in range(MAX_REQUEST // (1 << 20) + 4):
                sock.sendall(chunk)
        except OSError:
            pass  # refused while sending: the answer is read below
        sock.settimeout(ANSWER_WITHIN)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_chunked_and_pipelined_requests_are_served(node: Node) -> None:
    ds = fresh_ct()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue()
            + b"\r\n--b--\r\n")
    pieces = (body[i:i + 7000] for i in range(0, len(body), 7000))  # sent chunked
    stored = requests.post(f"{node.web_url()}/studies", data=pieces, timeout=60, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        "Accept": "application/dicom+json"})
    assert stored.status_code == 200, stored.text[:300]
    query = (b"GET /studies?StudyInstanceUID=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Accept: application/dicom+json\r\n\r\n" % ds.StudyInstanceUID.encode())
    # Two requests in one write, the second asking to close: two answers, then EOF.
    answer = raw_exchange(web_port(node), query + query.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert answer.count(b"HTTP/1.1 200") == 2, answer[:500]
    assert answer.count(ds.StudyInstanceUID.encode()) >= 2


# --- the object store down while a worker boots -----------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as line:
        return line.read().replace(b"\0", b" ").decode()


def dicomweb_master(node: Node) -> int:
    assert node.proc is not None
    [master] = [p for p in _children(node.proc.pid) if "pacs-dicomweb" in _cmdline(p)]
    return master


def test_dicomweb_waits_for_the_object_store_while_dimse_goes_on(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "weed").start()
    try:
        s3 = server.s3
        node = node_factory("s3boot", PACS_STORAGE="s3", PACS_S3_ENDPOINT=s3.endpoint,
                            PACS_S3_ACCESS_KEY=s3.access_key, PACS_S3_SECRET_KEY=s3.secret_key,
                            PACS_S3_BUCKET="boot", PACS_WEB_WORKERS="1", PACS_VIEWER_PORT="0",
                            PACS_UPLOADS_POLL="0",
                            # The direct path (objects over the intake's threshold): a
                            # store waits for S3 (through the intake it would not,
                            # tests/interop/test_intake.py).
                            PACS_INTAKE_OBJECT_BYTES="0")
        qido = f"{node.web_url()}/studies"

        def status() -> int:
            """The QIDO's status; 0 while nothing answers (a worker booting)."""
            try:
                return requests.get(qido, timeout=ANSWER_WITHIN).status_code
            except requests.RequestException:
                return 0

        def stow() -> int:
            """A STOW-RS of one fresh instance: its status (0 while nothing answers)."""
            try:
                return requests.post(f"{node.web_url()}/studies", data=stow_body(1)[1],
                                     headers={"Content-Type": STOW_TYPE},
                                     timeout=60).status_code
            except requests.RequestException:
                return 0

        deadline = time.monotonic() + 60
        while status() != 200:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.5)
        before = node.resources()
        # The store goes away, and the DICOMweb worker is replaced (as after a crash):
        # the new one starts without the store (pacs serve checked it at its start), so
        # queries of the index are answered while stores fail.
        server.kill()
        killed = time.monotonic()
        old_workers = set(_children(dicomweb_master(node)))
        for worker in old_workers:
            os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not (set(_children(dicomweb_master(node))) - old_workers) or status() != 200:
            assert time.monotonic() < deadline, node.log()
            node.assert_serving()  # C-ECHO throughout
            time.sleep(0.5)
        answering = time.monotonic() - killed
        assert stow() == 409  # the part failed (A700): nothing of it stored
        health = requests.get(f"{node.web_url()}/health", timeout=ANSWER_WITHIN)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        server.start()
        back = time.monotonic()
        deadline = time.monotonic() + 90
        while stow() != 200:
            assert time.monotonic() < deadline, node.log()
            node.assert_serving()
            time.sleep(0.5)
        assert requests.get(f"{node.web_url()}/health", timeout=30).status_code == 200
        serving = time.monotonic() - back
        # gunicorn itself killed: pacs serve starts it again, DIMSE goes on.
        os.kill(dicomweb_master(node), signal.SIGKILL)
        killed = time.monotonic()
        node.assert_serving()
        deadline = time.monotonic() + 90
        while status() != 200:
            assert time.monotonic() < deadline, node.log()
            node.assert_serving()
            time.sleep(0.5)
        assert "restarting it" in node.log(since_start=True)
        after = node.resources()
        print(f"\nS3 down while a DICOMweb worker boots: QIDO 200 after {answering:.1f} s, "
              f"STOW 200 {serving:.1f} s after S3 is back; gunicorn killed: 200 again after "
              f"{time.monotonic() - killed:.1f} s; C-ECHO throughout; before {before}, "
              f"after {after}")
        node.terminate()
    finally:
        server.close()



def test_transfer_codings_but_chunked_are_refused_and_counted(node: Node) -> None:
    """``gzip, chunked``: the chunked framing was undone and the compressed bytes read
    as the body (400 from the application, a DICOM part that does not parse);
    ``Transfer-Encoding: x``: 501, one ERROR line per request.  Both are 501 (RFC 9112
    6.1), counted in the worker's line of invalid requests, no ERROR line."""
    before = node.log().count("failed unexpectedly")
    for coding in (b"gzip, chunked", b"x") * 10:
        with connect(web_port(node)) as sock:
            sock.sendall(b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
                         b"%s\r\nContent-Type: application/dicom\r\n\r\n0\r\n\r\n" % coding)
            sock.settimeout(ANSWER_WITHIN)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 501"), (coding, answer[:200])
    assert node.log().count("failed unexpectedly") == before, node.log()[-2000:]


def test_an_answer_before_the_body_has_arrived_says_the_connection_closes(
        node: Node) -> None:
    """A body the application refuses while it still arrives (streamed: over 1 MiB):
    the answer says ``Connection: close``, as the server then closes (RFC 9112 9.6);
    it said keep-alive."""
    with connect(web_port(node)) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain"
                     b"\r\nContent-Length: %d\r\n\r\n" % (8 << 20) + bytes(2 << 20))
        sock.settimeout(ANSWER_WITHIN)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 415") and b"connection: close" in head, head
