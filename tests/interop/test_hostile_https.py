"""Slow and stalled TLS clients against ``pacs serve`` with HTTPS on its DICOMweb and
viewer ports (``PACS_TLS_CERT``): the limits of plain HTTP hold inside TLS.

One web worker of two threads per port and a 3 s ``PACS_HTTP_TIMEOUT``, as in
tests/interop/test_hostile_http.py.  Clients that connect and never finish (or never
start) the handshake are dropped after the timeout, and not before it, while real
HTTPS clients are answered; a TLS client that stops sending its body gets 408; one that
stops reading its response is disconnected.  The node's descriptors come back to where
they were.  At the connection limit (a second node: 16 connections per worker, a 60 s
timeout) stalled handshakes are closed, oldest first, to make room for a real client.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.interop.conftest import Node, fresh_ct
from tests.interop.tlsnode import (
    client_context,
    fake_dist,
    read_until_closed,
    session,
    start_tls_node,
    statuses,
    tls_connect,
    viewer,
    web,
)
from tests.tlsfiles import Pki, make_pki

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

#: PACS_HTTP_TIMEOUT of the node under attack, seconds.
TIMEOUT = 3.0
#: Seconds a real client waits for an answer during an attack.
ANSWER_WITHIN = 10.0
#: Seconds by which every stalled client must have been dropped.
DROPPED_WITHIN = 30.0
#: Descriptors the node may hold above its baseline once an attack is over.
FD_SLACK = 5
#: A TLS handshake record header announcing 512 bytes, and the first 10 of them.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + b"\x00" * 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], pki: Pki,
         tmp_path_factory: pytest.TempPathFactory) -> Node:
    dist = fake_dist(tmp_path_factory.mktemp("ohif") / "dist")
    return start_tls_node(node_factory, "hostile-https", pki, dist,
                          PACS_HTTP_TIMEOUT=str(TIMEOUT), PACS_HTTP_KEEPALIVE="2",
                          PACS_WEB_THREADS="2")


def served(node: Node, pki: Pki) -> None:
    """A QIDO-RS and the viewer's page over HTTPS, each within a few seconds."""
    client = session(pki)
    answer = client.get(f"{web(node)}/studies", timeout=ANSWER_WITHIN)
    assert answer.status_code == 200, answer.text[:300]
    page = client.get(f"{viewer(node)}/", timeout=ANSWER_WITHIN)
    assert page.status_code == 200 and b"viewer" in page.content


def wait_closed(sockets: list[socket.socket], within: float) -> dict[socket.socket, float]:
    """When the server closed each socket (monotonic time); fails past ``within``."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as waiting:
        for sock in sockets:
            sock.setblocking(False)
            waiting.register(sock, selectors.EVENT_READ, sock)
        deadline = time.monotonic() + within
        while len(closed) < len(sockets):
            left = deadline - time.monotonic()
            assert left > 0, f"{len(sockets) - len(closed)} stalled client(s) still open"
            for key, _ in waiting.select(min(left, 1.0)):
                sock = key.data
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", "a stalled handshake got an answer"
                closed[sock] = time.monotonic()
                waiting.unregister(sock)
    return closed


def test_stalled_handshakes_are_dropped_after_the_timeout_while_others_are_served(
        node: Node, pki: Pki) -> None:
    served(node, pki)
    baseline = node.resources()
    ports = [int(node.env["PACS_WEB_PORT"]), int(node.env["PACS_VIEWER_PORT"])]
    opened: dict[socket.socket, float] = {}
    for port in ports:
        for number in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            if number % 2:
                sock.sendall(PARTIAL_HELLO)  # a handshake begun and never finished
            opened[sock] = time.monotonic()
    try:
        for _ in range(3):  # spanning the timeout: the stalled ones hold nothing
            started = time.monotonic()
            served(node, pki)
            assert time.monotonic() - started < 2 * ANSWER_WITHIN
            time.sleep(1.0)
        closed = wait_closed(list(opened), DROPPED_WITHIN)
        held = min(closed[sock] - opened[sock] for sock in opened)
        # Dropped by the timeout, not by anything sooner (the server's deadline runs
        # from its accept, a little after our connect).
        assert held >= TIMEOUT - 0.5, f"a stalled handshake was dropped after {held:.2f} s"
    finally:
        for sock in opened:
            sock.close()
    served(node, pki)
    deadline = time.monotonic() + 15
    while (now := node.resources()).fds > baseline.fds + FD_SLACK:
        assert time.monotonic() < deadline, f"descriptors {baseline} -> {now}"
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while "slow or stalled HTTP connection" not in node.log():
        assert time.monotonic() < deadline, "the stalled clients were not reported"
        time.sleep(0.5)
    # The figures of docs/reliability.md (pytest -s).
    print(f"\nstalled TLS handshakes: before {baseline}, after {now}; dropped "
          f"{held:.2f}-{max(closed[s] - opened[s] for s in opened):.2f} s after connecting")


def test_a_tls_client_that_stops_sending_its_body_gets_408(node: Node, pki: Pki) -> None:
    with tls_connect(int(node.env["PACS_WEB_PORT"]), pki) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/dicom\r\nContent-Length: 100000\r\n\r\n"
                     + b"\0" * 1000)
        served(node, pki)  # while it stalls
        sock.settimeout(DROPPED_WITHIN)
        answer = read_until_closed(sock)
    assert statuses(answer) == [408]
    assert b"stopped arriving" in answer


def test_a_tls_client_that_stops_reading_is_disconnected(node: Node, pki: Pki) -> None:
    # 11 MB of pixels in one series: more than the kernel's buffers of both sides.
    first = fresh_ct(Rows=1700, Columns=1700)
    second = fresh_ct(Rows=1700, Columns=1700, StudyInstanceUID=first.StudyInstanceUID,
                      SeriesInstanceUID=first.SeriesInstanceUID)
    for number, instance in enumerate((first, second)):
        instance.PixelData = np.random.default_rng(number).integers(
            0, 4000, (1700, 1700), dtype=np.uint16).tobytes()
    DICOMwebClient(web(node), session=session(pki)).store_instances([first, second])
    path = f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    accept = 'multipart/related; type="application/dicom"'
    whole = session(pki).get(f"{web(node)}{path}", headers={"Accept": accept}, timeout=60)
    assert whole.status_code == 200 and len(whole.content) > 2 * len(first.PixelData)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)  # before connecting
    raw.settimeout(30)
    raw.connect(("127.0.0.1", int(node.env["PACS_WEB_PORT"])))
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\n"
                     "\r\n".encode())
        for _ in range(int(2 * TIMEOUT) + 2):  # reads nothing; the others are served
            served(node, pki)
            time.sleep(1.0)
        sock.settimeout(DROPPED_WITHIN)
        received = read_until_closed(sock)
    assert statuses(received)[:1] == [200]
    assert len(received) < len(whole.content)  # cut off: the node gave up on it
    served(node, pki)


#: The HTTP workers' connection limit of the crowded node (the worker's smallest).
LIMIT = 16


@pytest.fixture(scope="module")
def crowded(node_factory: Callable[..., Node], pki: Pki,
            tmp_path_factory: pytest.TempPathFactory) -> Node:
    """A node whose timeout is far away and whose connection limit is near."""
    dist = fake_dist(tmp_path_factory.mktemp("ohif-crowded") / "dist")
    return start_tls_node(node_factory, "crowded-https", pki, dist,
                          PACS_HTTP_TIMEOUT="60",
                          GUNICORN_CMD_ARGS=f"--worker-connections {LIMIT}")


def server_closed(sock: socket.socket) -> bool:
    """The server closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_stalled_handshakes_past_the_connection_limit_make_room_for_real_clients(
        crowded: Node, pki: Pki) -> None:
    port = int(crowded.env["PACS_WEB_PORT"])
    stalled = []
    try:
        for number in range(3 * LIMIT):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            if number % 2:
                sock.sendall(PARTIAL_HELLO)
            stalled.append(sock)
        time.sleep(0.5)
        # Long before PACS_HTTP_TIMEOUT (60 s): only the connection limit can make room.
        answer = session(pki).get(f"{web(crowded)}/studies", timeout=ANSWER_WITHIN)
        assert answer.status_code == 200
        time.sleep(0.5)
        dropped = [sock for sock in stalled if server_closed(sock)]
        assert len(dropped) >= 2 * LIMIT, f"{len(dropped)} of {len(stalled)} dropped"
        # The oldest went first.
        assert set(dropped) >= set(stalled[:2 * LIMIT - 2])
    finally:
        for sock in stalled:
            sock.close()
