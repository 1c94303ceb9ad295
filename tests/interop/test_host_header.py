"""DNS rebinding against the real node: forged ``Host`` headers from loopback.

A page on ``evil.example`` whose name resolves to 127.0.0.1 makes the browser send
``Host: evil.example`` to ``pacs serve``; both HTTP ports (DICOMweb, viewer) must refuse
it with 421 and no data, while the node's own names and ``PACS_WEB_HOSTS`` are served.
Raw sockets, so that the Host header is exactly what is written (as ``curl -H`` does).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest

from tests.interop.conftest import AE_TITLE, Node, fresh_ct, run_dcmtk

pytestmark = [pytest.mark.interop, pytest.mark.hostile]


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory) -> Node:
    dist = tmp_path_factory.mktemp("ohif") / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>viewer</title>")
    node = node_factory("hosts", PACS_WEB_WORKERS="1", PACS_VIEWER_WORKERS="1",
                        PACS_VIEWER_DIST=str(dist), PACS_UPLOADS_POLL="0",
                        PACS_WEB_HOSTS="pacs.hospital.example")
    path = tmp_path_factory.mktemp("ct") / "ct.dcm"
    fresh_ct().save_as(path, enforce_file_format=True)
    stored = run_dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(node.port), str(path),
                       timeout=60)
    assert stored.returncode == 0, stored.stdout
    return node


def get(port: int, path: str, host: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET with exactly this Host header: (status, body)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n"
               "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def ports(node: Node) -> dict[str, tuple[int, str]]:
    return {"dicomweb": (int(node.env["PACS_WEB_PORT"]), "/studies"),
            "viewer": (int(node.env["PACS_VIEWER_PORT"]), "/dicom-web/studies")}


@pytest.mark.parametrize("port", ["dicomweb", "viewer"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:5985", "127.0.0.1.nip.io",
                                  "localhost.evil.example"])
def test_a_rebound_name_gets_421_and_no_data(node: Node, port: str, host: str) -> None:
    number, path = ports(node)[port]
    status, body = get(number, path, host)
    assert status == 421
    assert json.loads(body)["title"] == "Misdirected request"
    assert b"0020000D" not in body  # no study in the answer
    page_status, page = get(number, "/", host)
    assert page_status == 421 and b"viewer" not in page


@pytest.mark.parametrize("port", ["dicomweb", "viewer"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "viewer.localhost",
                                  "pacs.hospital.example"])
def test_the_node_s_own_names_are_served(node: Node, port: str, host: str) -> None:
    number, path = ports(node)[port]
    status, body = get(number, path, f"{host}:{number}")
    assert status == 200
    studies = json.loads(body)
    assert len(studies) == 1 and "0020000D" in studies[0]


def test_the_node_keeps_serving(node: Node) -> None:
    node.assert_serving()
