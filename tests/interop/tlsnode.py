"""A ``pacs serve`` with HTTPS on its DICOMweb and viewer ports, and clients for it.

Shared by tests/interop/test_https.py and tests/interop/test_hostile_https.py.  The
certificates come from :func:`tests.tlsfiles.make_pki` (a throwaway CA); clients verify
the node against that CA only.  ``requests`` sessions do not trust the environment:
``REQUESTS_CA_BUNDLE`` there would silently replace the session's CA.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import requests

from tests.interop.conftest import Node
from tests.tlsfiles import Pki

#: Seconds a node's HTTP workers may take to boot.
BOOT_SECONDS = 60.0


def fake_dist(folder: Path) -> Path:
    """A stand-in for OHIF's files: an index page and a large script (a file body)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("<!doctype html><title>viewer</title>")
    # Hashed bundle names are served as files, in blocks: 3 MB of them.
    (folder / "app.0123456789abcdef.js").write_bytes(b"/* pacs */\n" * 300_000)
    return folder


def start_tls_node(make: Callable[..., Node], name: str, pki: Pki, dist: Path,
                   **settings: str) -> Node:
    """A node serving HTTPS only, with the test CA for client certificates."""
    node = make(name, PACS_TLS_CERT=str(pki.server_cert), PACS_TLS_KEY=str(pki.server_key),
                PACS_TLS_CA=str(pki.ca), PACS_WEB_WORKERS="1", PACS_VIEWER_WORKERS="1",
                PACS_VIEWER_DIST=str(dist), PACS_UPLOADS_POLL="0", **settings)
    wait_https(node, pki)
    return node


def web(node: Node) -> str:
    """The HTTPS DICOMweb base URL."""
    return f"https://127.0.0.1:{node.env['PACS_WEB_PORT']}"


def viewer(node: Node) -> str:
    """The HTTPS viewer base URL."""
    return f"https://127.0.0.1:{node.env['PACS_VIEWER_PORT']}"


def session(pki: Pki, client: tuple[Path, Path] | None = None) -> requests.Session:
    """A ``requests`` session that trusts the test CA only."""
    made = requests.Session()
    made.trust_env = False
    made.verify = str(pki.ca)
    if client is not None:
        made.cert = (str(client[0]), str(client[1]))
    return made


def wait_https(node: Node, pki: Pki) -> None:
    """Until both ports answer over HTTPS (their workers booted and loaded TLS)."""
    client = session(pki)
    deadline = time.monotonic() + BOOT_SECONDS
    while True:
        try:
            if (client.get(f"{web(node)}/studies", timeout=5).status_code == 200
                    and client.get(f"{viewer(node)}/", timeout=5).status_code == 200):
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"HTTPS ports not answering:\n{node.log()}"
        time.sleep(0.3)


def client_context(pki: Pki) -> ssl.SSLContext:
    """A raw TLS client's context: the test CA, the node's name ``localhost``."""
    return ssl.create_default_context(cafile=str(pki.ca))


def tls_connect(port: int, pki: Pki, timeout: float = 30.0) -> ssl.SSLSocket:
    """A TLS connection to ``port`` (handshake done)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context(pki).wrap_socket(raw, server_hostname="localhost")


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def statuses(answer: bytes) -> list[int]:
    """The status codes of the HTTP/1.1 responses in ``answer``, in order (a status
    line follows the previous body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
