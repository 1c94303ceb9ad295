"""TLS of the HTTP ports, in process: the settings (both files or neither), the server
context (BCP 195), the files refused at start, and the worker's non-blocking TLS pieces
(the writer that repeats a write OpenSSL could not finish, the reader that drains what
OpenSSL decrypted) over real TLS connections on socket pairs.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs.core import config
from pacs.core.config import Settings
from pacs.core.errors import ConfigError
from pacs.node import tls
from pacs.node.httpworker import TLS_WRITE_BYTES, Writer, tls_recv_into
from tests.tlsfiles import Pki, encrypted_copy, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, **changes: str) -> Settings:
    values = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), **changes}
    return Settings(**values)  # type: ignore[arg-type]


# --- settings and context ---------------------------------------------------------------

def test_plain_http_without_a_certificate() -> None:
    settings = config.load(environ={}, env_file=None)
    assert tls.server_context(settings) is None
    assert tls.scheme(settings) == "http"


@pytest.mark.parametrize("environ", [
    {"PACS_TLS_CERT": "/some/cert.pem"},
    {"PACS_TLS_KEY": "/some/key.pem"},
    {"PACS_TLS_CA": "/some/ca.pem"},
    {"PACS_TLS_KEY": "/some/key.pem", "PACS_TLS_CA": "/some/ca.pem"},
])
def test_half_a_configuration_is_refused_when_settings_are_read(
        environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="PACS_TLS_"):
        config.load(environ=environ, env_file=None)


def test_the_server_context_follows_bcp_195(pki: Pki) -> None:
    context = tls.server_context(tls_settings(pki))
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.verify_mode is ssl.CERT_NONE  # no PACS_TLS_CA: no client certificate
    for cipher in context.get_ciphers():
        if cipher["protocol"] == "TLSv1.2":
            # Forward secrecy and authenticated encryption only (RFC 9325 4.2).
            assert cipher["aead"], cipher["name"]
            assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]


def test_client_certificates_are_asked_for_with_a_ca(pki: Pki) -> None:
    context = tls.server_context(tls_settings(pki, tls_ca=str(pki.ca)))
    assert context is not None
    assert context.verify_mode is ssl.CERT_OPTIONAL
    # Only that authority, not the system's store.
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "pacs test CA"),),)]


@pytest.mark.parametrize(("name", "problem"), [
    ("tls_cert", "missing"), ("tls_key", "missing"), ("tls_ca", "missing"),
    ("tls_cert", "folder"), ("tls_key", "folder"),
    ("tls_cert", "not pem"), ("tls_key", "not pem"), ("tls_ca", "not pem"),
    ("tls_key", "another key"), ("tls_key", "encrypted")])
def test_files_that_cannot_serve_are_refused_naming_the_setting(
        pki: Pki, tmp_path: Path, name: str, problem: str) -> None:
    path = tmp_path / "file.pem"
    if problem == "folder":
        path = tmp_path
    elif problem == "not pem":
        path.write_text("not a certificate\n")
    elif problem == "another key":
        path = pki.client_key
    elif problem == "encrypted":
        path = encrypted_copy(pki.server_key, tmp_path / "encrypted.key")
    settings = tls_settings(pki, **{"tls_ca": str(pki.ca), name: str(path)})
    setting = {"tls_cert": "PACS_TLS_CERT", "tls_key": "PACS_TLS_KEY", "tls_ca": "PACS_TLS_CA"}
    with pytest.raises(ConfigError, match=setting[name]) as raised:
        tls.server_context(settings)
    if problem == "encrypted":
        assert "encrypted" in str(raised.value)


# --- the worker's TLS input and output --------------------------------------------------

def tls_pair(pki: Pki, client_cert: bool = False,
             ) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(server side, non-blocking, after a non-blocking handshake; client side,
    blocking) of a TLS connection over a socket pair."""
    server_context = tls.server_context(tls_settings(pki, tls_ca=str(pki.ca)))
    assert server_context is not None
    client_context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        client_context.load_cert_chain(pki.client_cert, pki.client_key)
    left, right = socket.socketpair()
    left.setblocking(False)
    server = server_context.wrap_socket(left, server_side=True,
                                        do_handshake_on_connect=False)
    client = client_context.wrap_socket(right, server_hostname="localhost",
                                        do_handshake_on_connect=False)
    done = threading.Thread(target=client.do_handshake)
    done.start()
    deadline = time.monotonic() + 10
    while True:  # the worker's handshake: step by step, waiting on the socket between
        try:
            server.do_handshake()
            break
        except ssl.SSLWantReadError:
            select.select([server], [], [], 1)
        except ssl.SSLWantWriteError:
            select.select([], [server], [], 1)
        assert time.monotonic() < deadline
    done.join(10)
    if client_cert:  # TLS 1.3: the client's certificate is checked after its Finished
        client.sendall(b"x")
        select.select([server], [], [], 5)
        assert server.recv(1) == b"x"
    return server, client


@pytest.fixture
def pair(pki: Pki) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    server, client = tls_pair(pki)
    yield server, client
    server.close()
    client.close()


def test_a_tls_writer_sends_everything_to_a_slow_reader(
        pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    server, client = pair
    writer = Writer(server, threading.Lock())
    data = random.Random(7).randbytes(6 << 20)  # far more than the socket buffers hold
    writer.sendall(data)
    writer.sendall(b"tail")
    assert writer.pending and writer.pending_bytes > 0
    assert not writer.flush(0.05)  # nobody reads: no progress, and no error
    received = bytearray()
    client.settimeout(10)

    def read() -> None:
        while len(received) < len(data) + 4:
            received.extend(client.recv(1 << 16))
            time.sleep(0.0005)  # a reader slower than the writer: writes must wait

    reader = threading.Thread(target=read)
    reader.start()
    # OpenSSL keeps half-written records between SSLWantWriteError and the retry; a
    # retry with other bytes would fail ("bad write retry") or corrupt the stream.
    assert writer.flush(10)
    reader.join(30)
    assert bytes(received) == data + b"tail"
    assert not writer.pending and writer.pending_bytes == 0


def test_tls_reads_take_every_record_and_say_what_is_left(
        pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    server, client = pair
    scratch = memoryview(bytearray(1 << 20))
    with pytest.raises(BlockingIOError):
        tls_recv_into(server, scratch, 1000)  # nothing sent yet
    payload = random.Random(3).randbytes(100_000)  # seven records of at most 16 KiB
    client.sendall(payload)
    time.sleep(0.2)
    count, more = tls_recv_into(server, scratch, 20_000)
    assert count == 20_000
    # The rest of a record is decrypted already: the kernel will not say readable.
    assert more and server.pending()
    got = bytearray(scratch[:count])
    while len(got) < len(payload):
        select.select([server], [], [], 0 if server.pending() else 2)
        count, more = tls_recv_into(server, scratch, len(scratch))
        got += scratch[:count]
    assert bytes(got) == payload and not more
    client.close()  # close_notify, then the end
    select.select([server], [], [], 2)
    assert tls_recv_into(server, scratch, 1000) == (0, False)


def test_the_application_is_told_https_and_the_client_certificate(pki: Pki) -> None:
    server, client = tls_pair(pki, client_cert=True)
    try:
        environ = tls.peer_environ(server)
        assert environ["wsgi.url_scheme"] == "https" and environ["HTTPS"] == "on"
        assert environ["SSL_PROTOCOL"] in ("TLSv1.2", "TLSv1.3")
        assert environ["SSL_CLIENT_VERIFY"] == "SUCCESS"
        assert environ["SSL_CLIENT_S_DN"] == "CN=modality,O=pacs tests"
    finally:
        server.close()
        client.close()
    server, client = tls_pair(pki)
    try:
        assert tls.peer_environ(server)["SSL_CLIENT_VERIFY"] == "NONE"
    finally:
        server.close()
        client.close()


def test_a_tls_write_is_at_most_one_slice() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def send(self, view: memoryview) -> int:
            self.sizes.append(len(view))
            return len(view)

    recorder = Recorder()
    writer = Writer(recorder, threading.Lock())  # type: ignore[arg-type]
    writer.sendall(b"z" * (TLS_WRITE_BYTES * 2 + 10))
    writer.send_some()
    assert max(recorder.sizes) == TLS_WRITE_BYTES
    assert sum(recorder.sizes) == TLS_WRITE_BYTES * 2 + 10 and not writer.pending
