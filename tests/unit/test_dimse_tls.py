"""DICOM TLS in process: the settings (ports, certificates, ``:tls`` destinations), the
contexts of the TLS port and of TLS destinations, the handshake bounded in time, and
the rule that a client certificate names the calling AE title."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from pacs.core import access, config
from pacs.core.config import Modality, Settings
from pacs.core.errors import ConfigError
from pacs.dimse import server, tls
from tests.tlsfiles import Pki, ae_certificate, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def load(**environ: str) -> Settings:
    return config.load(environ=environ, env_file=None)


# --- settings ----------------------------------------------------------------------------

def test_destinations_marked_tls() -> None:
    settings = load(PACS_MODALITIES="PLAIN=host-a:104, SECURE=host-b:2762:tls,"
                                    "V6=::1:2762:TLS")
    assert settings.destinations == {
        "PLAIN": Modality("PLAIN", "host-a", 104),
        "SECURE": Modality("SECURE", "host-b", 2762, tls=True),
        "V6": Modality("V6", "::1", 2762, tls=True)}


def test_aes_over_tls_that_no_certificate_proves_are_named_and_pinned_ones_refused(
) -> None:
    """Without PACS_DIMSE_TLS_CA no client certificate is asked for: an AE marked
    ``tls = true`` is then one any TLS peer may call as (``pacs serve`` warns), and one
    pinned to certificates could never associate (refused at start)."""
    marked = access.build(tables=access.parse(tomllib.loads(
        '[[ae]]\ntitle = "WS"\nrights = ["find"]\ntls = true\n'
        '[[ae]]\ntitle = "CT"\nrights = ["store"]\n')))
    assert tls.unproven_titles(load(), marked) == ["WS"]
    assert tls.unproven_titles(load(PACS_DIMSE_TLS_CA="/ca.pem"), marked) == []
    pinned = access.build(tables=access.parse(tomllib.loads(
        f'[[ae]]\ntitle = "WS"\nrights = ["find"]\ncertificates = ["{"ab" * 32}"]\n')))
    with pytest.raises(ConfigError, match="PACS_DIMSE_TLS_CA"):
        tls.unproven_titles(load(), pinned)
    assert tls.unproven_titles(load(PACS_DIMSE_TLS_CA="/ca.pem"), pinned) == []


@pytest.mark.parametrize("value", ["A=host:tls", "A=host:104:ssl", "A=host:104:tls:tls"])
def test_a_destination_that_cannot_be_read_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="PACS_MODALITIES"):
        load(PACS_MODALITIES=value)


@pytest.mark.parametrize(("environ", "message"), [
    ({"PACS_DIMSE_TLS_PORT": "2762"}, "needs a certificate"),
    ({"PACS_DIMSE_TLS_PORT": "32773", "PACS_TLS_CERT": "c", "PACS_TLS_KEY": "k"},
     "must be another"),
    ({"PACS_DIMSE_TLS_CERT": "c"}, "go together"),
    ({"PACS_DIMSE_TLS_PORT": "70000"}, "not a port"),
])
def test_dimse_listeners_that_cannot_serve_are_refused(environ: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**environ)


def test_serving_needs_a_dimse_port() -> None:
    with pytest.raises(ConfigError, match="serve no DIMSE"):
        config.check_dimse_listeners(load(PACS_DIMSE_PORT="0"))
    config.check_dimse_listeners(load(PACS_DIMSE_PORT="0", PACS_DIMSE_TLS_PORT="2762",
                                      PACS_TLS_CERT="c", PACS_TLS_KEY="k"))


def test_the_https_certificate_serves_dicom_tls_unless_it_has_its_own() -> None:
    shared = load(PACS_DIMSE_TLS_PORT="2762", PACS_TLS_CERT="web.pem", PACS_TLS_KEY="web.key")
    assert config.dimse_tls_identity(shared) == (("PACS_TLS_CERT", "web.pem"),
                                                 ("PACS_TLS_KEY", "web.key"))
    own = shared.with_overrides(dimse_tls_cert="ae.pem", dimse_tls_key="ae.key")
    assert config.dimse_tls_identity(own) == (("PACS_DIMSE_TLS_CERT", "ae.pem"),
                                              ("PACS_DIMSE_TLS_KEY", "ae.key"))
    assert load(PACS_DIMSE_PORT="0", PACS_DIMSE_TLS_PORT="2762", PACS_TLS_CERT="c",
                PACS_TLS_KEY="k").dimse_port == 0


# --- contexts ----------------------------------------------------------------------------------

def tls_node(pki: Pki, **changes: object) -> Settings:
    values: dict[str, object] = {"dimse_tls_port": 2762, "tls_cert": str(pki.server_cert),
                                 "tls_key": str(pki.server_key), **changes}
    return Settings(**values)  # type: ignore[arg-type]


def test_no_tls_port_no_context(pki: Pki) -> None:
    assert tls.server_context(Settings()) is None
    assert tls.server_context(tls_node(pki, dimse_tls_port=0)) is None
    assert tls.client_context(Settings()) is None  # no destination marked TLS


def test_the_tls_port_requires_client_certificates_of_its_authorities_only(pki: Pki) -> None:
    context = tls.server_context(tls_node(pki))
    assert context is not None and context.verify_mode is ssl.CERT_NONE
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    mutual = tls.server_context(tls_node(pki, dimse_tls_ca=str(pki.ca)))
    assert mutual is not None and mutual.verify_mode is ssl.CERT_REQUIRED
    # Only that authority: never the system's store for client certificates.
    assert [c["subject"] for c in mutual.get_ca_certs()] == [((("commonName",
                                                                 "pacs test CA"),),)]
    assert mutual.cert_store_stats()["x509_ca"] == 1


def test_tls_destinations_are_verified_with_the_node_certificate_offered(pki: Pki) -> None:
    destinations = {"SECURE": Modality("SECURE", "localhost", 2762, tls=True)}
    context = tls.client_context(tls_node(pki, destinations=destinations,
                                         dimse_tls_ca=str(pki.ca)))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1
    ae = type("AE", (), {"destination_tls": context})()
    assert tls.client_args(ae, destinations["SECURE"]) == (context, "localhost")
    assert tls.client_args(ae, Modality("PLAIN", "h", 104)) is None


def test_a_bad_certificate_file_names_its_setting(pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="PACS_DIMSE_TLS_CERT"):
        tls.server_context(tls_node(pki, dimse_tls_cert=str(bad),
                                    dimse_tls_key=str(pki.server_key)))
    with pytest.raises(ConfigError, match="PACS_DIMSE_TLS_CA"):
        tls.server_context(tls_node(pki, dimse_tls_ca=str(bad)))


# --- handshake and identity ----------------------------------------------------------------------

def handshaken(pki: Pki, client: tuple[Path, Path] | None) -> ssl.SSLSocket:
    """The server side of a TLS connection over a socket pair, after the node's
    handshake against a client with the certificate ``client``."""
    context = tls.server_context(tls_node(pki, dimse_tls_ca=str(pki.ca)))
    assert context is not None
    left, right = socket.socketpair()
    server = context.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
    client_context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        client_context.load_cert_chain(*client)
    peer = client_context.wrap_socket(right, server_hostname="localhost",
                                      do_handshake_on_connect=False)
    thread = threading.Thread(target=_quietly, args=(peer.do_handshake,))
    thread.start()
    try:
        tls.handshake(server, 10)
    finally:
        thread.join(10)
    return server


def _quietly(step: Callable[[], None]) -> None:
    with contextlib.suppress(OSError):  # the node's side reports the failure
        step()


def test_the_calling_ae_title_must_be_the_certificates(pki: Pki) -> None:
    server = handshaken(pki, ae_certificate(pki, "MODALITY1"))
    try:
        assert tls.certificate_ae(server) == "MODALITY1"
        assert tls.identity_refusal(server, "MODALITY1 ") is None
        refusal = tls.identity_refusal(server, "MODALITY2")
        assert refusal is not None and "CN='MODALITY1'" in refusal
    finally:
        server.close()


def test_plain_sockets_have_no_certificate_rule() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert tls.certificate_ae(left) is None
        assert tls.identity_refusal(left, "ANY") is None


def test_a_client_without_a_certificate_fails_the_handshake(pki: Pki) -> None:
    with pytest.raises(ssl.SSLError):
        handshaken(pki, None)


def test_a_silent_peer_ends_the_handshake_in_time(pki: Pki) -> None:
    context = tls.server_context(tls_node(pki))
    assert context is not None
    left, right = socket.socketpair()
    with right, context.wrap_socket(left, server_side=True,
                                    do_handshake_on_connect=False) as server:
        with pytest.raises(TimeoutError):
            tls.handshake(server, 0.2)
        assert server.getblocking()  # blocking again, for pynetdicom


def test_the_request_gets_what_the_handshake_left_of_artim() -> None:
    assoc = type("Assoc", (), {"acse_timeout": 60.0})()
    event = type("Event", (), {"assoc": assoc})()
    left = server.ArtimLeft()
    server._start_artim(event, 10.0, left)
    assert assoc.acse_timeout == 10.0  # plain connection: all of ARTIM
    left.seconds = 2.5
    server._start_artim(event, 10.0, left)
    assert assoc.acse_timeout == 2.5
    seen: list[float | None] = []
    other = threading.Thread(target=lambda: seen.append(left.seconds))
    other.start()
    other.join()
    assert seen == [None]  # per connection thread
