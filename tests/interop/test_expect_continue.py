"""``Expect: 100-continue`` against the real HTTP worker (RFC 9110 10.1.1): one interim
``100 Continue`` before the body is sent, none once the body came with the head, and
never a second one from gunicorn after the body was read."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.factory import make_instance
from tests.interop.conftest import Node

pytestmark = pytest.mark.interop

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory("expect")


def _head(node: Node, length: int) -> bytes:
    return (b"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/dicom\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)


def _read_until_closed(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def _connect(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(node.env["PACS_WEB_PORT"])),
                                    timeout=30)
    sock.settimeout(30)
    return sock


def test_the_client_waiting_for_100_gets_one_then_the_answer(node: Node) -> None:
    body = make_instance()
    with _connect(node) as sock:
        sock.sendall(_head(node, len(body)))
        interim = b""
        while len(interim) < len(CONTINUE):
            chunk = sock.recv(len(CONTINUE) - len(interim))
            assert chunk, "closed before the 100 Continue"
            interim += chunk
        assert interim == CONTINUE
        sock.sendall(body)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert CONTINUE not in answer


def test_a_body_sent_with_the_head_gets_no_100(node: Node) -> None:
    body = make_instance()
    with _connect(node) as sock:
        sock.sendall(_head(node, len(body)) + body)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert CONTINUE not in answer
