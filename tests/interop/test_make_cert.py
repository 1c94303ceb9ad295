"""``scripts/make-cert.sh`` (what compose's HTTPS reads) makes a certificate the node
serves and clients verify by the CA it wrote, for every name it was given."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.conftest import Node
from tests.interop.tlsnode import fake_dist

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]


def make_cert(folder: Path, *names: str) -> None:
    done = subprocess.run([str(ROOT / "scripts" / "make-cert.sh"), str(folder), *names],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("made") / "tls"
    make_cert(folder, "pacs.hospital.example")
    return folder


def handshake(port: int, ca: Path, name: str) -> str:
    """The first line of a GET /health over TLS, verifying ``name`` against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname=name) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return sock.recv(4096).split(b"\r\n")[0].decode()


def test_the_files_are_what_compose_mounts_and_the_key_is_private(tls: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert (tls / name).stat().st_size > 0
    assert (tls / "key.pem").stat().st_mode & 0o077 == 0
    assert (tls / "ca.key").stat().st_mode & 0o077 == 0


def test_a_second_run_keeps_the_ca(tls: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tls"
    copy.mkdir()
    for name in ("ca.pem", "ca.key"):
        (copy / name).write_bytes((tls / name).read_bytes())
        (copy / name).chmod(0o600)
    make_cert(copy)
    assert (copy / "ca.pem").read_bytes() == (tls / "ca.pem").read_bytes()
    assert (copy / "cert.pem").read_bytes() != (tls / "cert.pem").read_bytes()


def test_the_node_serves_it_and_clients_verify_every_name(
        node_factory: Callable[..., Node], tls: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    dist = fake_dist(tmp_path_factory.mktemp("ohif") / "dist")
    node = node_factory("made-cert", PACS_TLS_CERT=str(tls / "cert.pem"),
                        PACS_TLS_KEY=str(tls / "key.pem"), PACS_WEB_WORKERS="1",
                        PACS_VIEWER_WORKERS="1", PACS_VIEWER_DIST=str(dist),
                        PACS_UPLOADS_POLL="0")
    port = int(node.env["PACS_WEB_PORT"])
    for name in ("localhost", "127.0.0.1", "pacs.hospital.example", socket.gethostname()):
        assert handshake(port, tls / "ca.pem", name) == "HTTP/1.1 200 OK", name
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, tls / "ca.pem", "other.example")
    node.assert_serving()
