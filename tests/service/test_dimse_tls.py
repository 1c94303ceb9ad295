"""The DICOM TLS server in process: connections in their handshake count as pending
connections, so beyond ``PACS_MAX_PENDING_CONNECTIONS`` the oldest are closed at once
(not at ARTIM), while a real TLS peer associates; a C-STORE over TLS is stored with
the calling AE title its certificate names; a storage commitment requestor that goes
on storing over TLS gets its report on its association once it pauses."""

from __future__ import annotations

import hashlib
import queue
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs.core.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE
from pacs.core.config import Settings, parse_modalities
from pacs.core.forwarding import Outbox, Result, refs_of
from pacs.core.routes import load_routes
from pacs.core.services import Services
from pacs.dimse import retrieve, tls
from pacs.dimse.server import NodeServer, start, stop
from pacs.node.forwarder import sender_for
from tests.conftest import free_port, seam_only
from tests.factory import make_instance
from tests.interop.conftest import fresh_ct, read_index, run_dcmtk
from tests.tlsfiles import Pki, ae_certificate, make_pki, openssl

pytestmark = pytest.mark.dimse

#: Pending connections per worker, and an ARTIM no test waits for.
PENDING, ARTIM = 4, 60.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(make_services: Callable[..., Services], pki: Pki) -> Iterator[NodeServer]:
    cert, key = ae_certificate(pki, "INTELPIXEL", server=True)
    services = make_services(dimse_tls_port=free_port(), dimse_tls_cert=str(cert),
                             dimse_tls_key=str(key), dimse_tls_ca=str(pki.ca),
                             max_pending_connections=PENDING, artim_timeout=ARTIM)
    context = tls.server_context(services.settings)
    assert context is not None
    running = start(services, ("127.0.0.1", services.settings.dimse_tls_port),
                    tls_context=context)
    yield running
    stop(running, drain=1.0)


def tls_association(pki: Pki, port: int, calling: str = "MODALITY1",
                    evt_handlers: list[Any] | None = None, twin: str = "") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(PUSH_MODEL)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(*ae_certificate(pki, calling, twin=twin))
    return ae.associate("127.0.0.1", port, ae_title="INTELPIXEL",
                        tls_args=(context, "localhost"), evt_handlers=evt_handlers)


def store_and_ask_commitment(assoc: Any) -> str:
    """Store a CT on ``assoc``, then ask for its storage commitment (N-ACTION,
    PS3.4 J.3.2); the request's Transaction UID."""
    ds = fresh_ct()
    assert assoc.send_c_store(ds).Status == 0x0000
    action = Dataset()
    action.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
        CTImageStorage, ds.SOPInstanceUID)
    action.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_action(action, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    assert status.Status == 0x0000
    return str(action.TransactionUID)


def test_the_oldest_handshakes_are_closed_for_room(server: NodeServer, pki: Pki) -> None:
    port = server.server_address[1]
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(10)]
    try:
        assoc = tls_association(pki, port)
        assert assoc.is_established
        assoc.release()
        # Far sooner than ARTIM: the six oldest are closed as the newer ones come.
        for sock in silent[:6]:
            sock.settimeout(20)
            assert sock.recv(1) == b""
        assert server.limits is not None and server.limits.pending <= PENDING + 1
    finally:
        for sock in silent:
            sock.close()


def test_a_store_over_tls_is_stored_under_the_certificates_ae(
        server: NodeServer, pki: Pki, settings: Settings) -> None:
    data_dir = settings.data_dir
    assoc = tls_association(pki, server.server_address[1], calling="CT7")
    assert assoc.is_established
    ds = fresh_ct()
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert read_index(data_dir)[ds.SOPInstanceUID].calling_ae == "CT7"


@seam_only("a report on the requestor's association is sent by the association's thread")
def test_a_requestor_storing_over_tls_after_its_request_gets_its_report(
        server: NodeServer, pki: Pki) -> None:
    """Over TLS the DUL thread writes every message (one thread per OpenSSL
    connection): the report is handed to it between two messages, after the store
    responses, and the stores that follow the request are all answered."""
    reports: queue.Queue[tuple[Any, str]] = queue.Queue()

    def report(event: Any) -> tuple[int, None]:
        reports.put((event.assoc, str(event.event_information.TransactionUID)))
        return 0x0000, None

    assoc = tls_association(pki, server.server_address[1], calling="CT8",
                            evt_handlers=[(evt.EVT_N_EVENT_REPORT, report)])
    assert assoc.is_established
    try:
        transaction = store_and_ask_commitment(assoc)
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            assert assoc.send_c_store(fresh_ct()).get("Status") == 0x0000
        received, reported = reports.get(timeout=30)
    finally:
        assoc.release()
    assert received is assoc and reported == transaction


def test_an_expired_client_certificate_fails_the_handshake(server: NodeServer,
                                                           pki: Pki) -> None:
    """A certificate of the node's CA whose validity ended is no proof of its AE: the
    handshake fails (PS3.15 B.12), no association, and the node goes on serving."""
    folder = pki.ca.parent
    ext = folder / "expired.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "expired.key", "-out", "expired.csr", "-subj", "/CN=MODALITY1",
            cwd=folder)
    openssl("x509", "-req", "-in", "expired.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "expired.pem", "-days", "-1", "-extfile",
            "expired.ext", cwd=folder)
    port = server.server_address[1]
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(folder / "expired.pem", folder / "expired.key")
    # TLS 1.3: the client's certificate is judged after the client's handshake ends; the
    # refusal (an alert) arrives with the first read.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as wrapped, \
            pytest.raises(ssl.SSLError) as refused:
        wrapped.recv(1)
    assert "expired" in str(refused.value).lower()
    assoc = tls_association(pki, port)
    assert assoc.is_established
    assoc.release()


def _tls_node(make_services: Callable[..., Services], pki: Pki, tmp_path: Any,
              access: str) -> tuple[Services, NodeServer]:
    """Services with these access rules, served on a DICOM TLS port of the test CA."""
    rules = tmp_path / "access.toml"
    rules.write_text(access)
    cert, key = ae_certificate(pki, "INTELPIXEL", server=True)
    services = make_services(dimse_tls_port=free_port(), dimse_tls_cert=str(cert),
                             dimse_tls_key=str(key), dimse_tls_ca=str(pki.ca),
                             access_file=str(rules), artim_timeout=ARTIM)
    context = tls.server_context(services.settings)
    assert context is not None
    return services, start(services, ("127.0.0.1", services.settings.dimse_tls_port),
                           tls_context=context)


def test_an_ae_known_over_tls_only_is_refused_on_the_plain_port(
        make_services: Callable[..., Services], pki: Pki, tmp_path: Any) -> None:
    """``tls = true`` in the access rules: the AE associates over TLS, its title on the
    plain port is refused (A-ASSOCIATE-RJ, calling AE not recognized), another AE's is
    not."""
    services, secure = _tls_node(
        make_services, pki, tmp_path,
        '[[ae]]\ntitle = "MODALITY1"\nrights = ["echo", "store"]\ntls = true\n')
    plain = start(services, ("127.0.0.1", free_port()))
    try:
        assoc = tls_association(pki, secure.server_address[1])
        assert assoc.is_established
        assoc.release()
        # dcmtk's echoscu: pynetdicom's requestor can take a rejection that comes
        # at once for an abort (tests/service/test_exhaustion.py).
        for calling, answer in (("MODALITY1", "Calling AE Title Not Recognized"),
                                ("OTHER", "Received Echo Response (Success)")):
            result = run_dcmtk("echoscu", "-v", "-aet", calling, "-aec", "INTELPIXEL",
                               "127.0.0.1", str(plain.server_address[1]), timeout=30)
            assert answer in result.stdout, result.stdout
    finally:
        stop(plain, drain=1.0)
        stop(secure, drain=1.0)


def test_an_ae_pinned_to_its_certificate_is_refused_with_another_of_its_title(
        make_services: Callable[..., Services], pki: Pki, tmp_path: Any) -> None:
    """``certificates`` in the access rules: a certificate of the node's authority
    naming the AE title (CN) is not enough, it must be one of the AE's own: the same
    title may be another customer's modality, with a certificate of its own."""
    pinned, _ = ae_certificate(pki, "MODALITY1")
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pinned.read_text())).hexdigest()
    colons = ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    _, secure = _tls_node(make_services, pki, tmp_path,
                          '[[ae]]\ntitle = "MODALITY1"\nrights = ["echo"]\n'
                          f'certificates = ["{colons}"]\n')
    try:
        assoc = tls_association(pki, secure.server_address[1])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        twin = tls_association(pki, secure.server_address[1], twin="twin")
        assert not twin.is_established
    finally:
        stop(secure, drain=1.0)


def test_an_ae_known_over_tls_is_a_tls_destination(
        make_services: Callable[..., Services], tmp_path: Any) -> None:
    rules = tmp_path / "access.toml"
    rules.write_text('[[ae]]\ntitle = "WS"\nhost = "127.0.0.1"\nport = 11112\n'
                     'rights = ["retrieve"]\ntls = true\n')
    found = retrieve.destination(make_services(access_file=str(rules)), "WS")
    assert found is not None and found.tls


@pytest.mark.parametrize("listed", ["access file", "PACS_MODALITIES"])
def test_an_ae_pinned_to_certificates_is_a_tls_destination(
        make_services: Callable[..., Services], tmp_path: Any, listed: str) -> None:
    """An AE that must present one of its certificates associates over TLS only (it is
    refused in the clear): C-MOVE, forwarding and storage commitment reports reach it
    over TLS too, not in the clear."""
    rules = tmp_path / "access.toml"
    address = 'host = "127.0.0.1"\nport = 11112\n' if listed == "access file" else ""
    rules.write_text(f'[[ae]]\ntitle = "WS"\n{address}rights = ["retrieve"]\n'
                     f'certificates = ["{"ab" * 32}"]\n')
    entry = "WS=10.0.0.5:104" if listed == "PACS_MODALITIES" else ""
    services = make_services(access_file=str(rules), modalities=entry,
                             destinations=parse_modalities(entry))
    assert "TLS" in (services.access.association_refusal("WS", "127.0.0.1") or "")
    found = retrieve.destination(services, "WS")
    assert found is not None and found.tls
    assert services.access.any_over_tls


def test_a_modalities_entry_of_an_ae_known_over_tls_is_a_tls_destination(
        make_services: Callable[..., Services], tmp_path: Any) -> None:
    """The access rules' ``tls = true`` holds whichever list gives the AE's address: an
    AE that must associate over TLS is reached over TLS by C-MOVE, forwarding and
    storage commitment reports, though its ``PACS_MODALITIES`` entry says nothing."""
    rules = tmp_path / "access.toml"
    rules.write_text('[[ae]]\ntitle = "WS"\nrights = ["retrieve"]\ntls = true\n')
    entry = "WS=10.0.0.5:104"
    services = make_services(access_file=str(rules), modalities=entry,
                             destinations=parse_modalities(entry))
    found = retrieve.destination(services, "WS")
    assert found is not None and found.tls and (found.host, found.port) == ("10.0.0.5", 104)


def _tls_listener(pki: Pki, title: str, handlers: list[Any]) -> Any:
    """A pynetdicom SCP ``title`` on a free loopback port that speaks DICOM TLS only
    (a server certificate of the test CA): a peer that associates in the clear gets
    no association."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*ae_certificate(pki, title, server=True))
    ae = AE(ae_title=title)
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(PUSH_MODEL, scu_role=True, scp_role=True)
    return ae.start_server(("127.0.0.1", free_port()), block=False, ssl_context=context,
                           evt_handlers=handlers)


def test_forwarding_to_an_ae_known_over_tls_goes_over_tls(
        make_services: Callable[..., Services], pki: Pki, tmp_path: Any) -> None:
    """A forwarding destination the access rules know with ``tls = true`` and an
    address (no ``PACS_MODALITIES`` entry, so no ``:tls`` there) is sent its
    instances over DICOM TLS, verified by the node's CA, never in the clear."""
    received: queue.Queue[str] = queue.Queue()

    def stored(event: Any) -> int:
        received.put(str(event.dataset.PatientID))
        return 0x0000

    listener = _tls_listener(pki, "DEST", [(evt.EVT_C_STORE, stored)])
    try:
        rules = tmp_path / "access.toml"
        rules.write_text('[[ae]]\ntitle = "DEST"\nhost = "127.0.0.1"\n'
                         f'port = {listener.server_address[1]}\nrights = ["echo"]\n'
                         'tls = true\n')
        services = make_services(access_file=str(rules), dimse_tls_ca=str(pki.ca))
        outbox = Outbox(services.index, load_routes("all: -> DEST", ""))
        outbox.feed()
        services.ingest.store_bytes(make_instance(PatientID="FORWARDED"), calling_ae="CT1")
        outbox.feed()
        deliveries = sender_for("DEST", services).send(refs_of(outbox.take("DEST")))
        assert [delivery.result for delivery in deliveries] == [Result.SENT]
        assert received.get(timeout=5) == "FORWARDED"
    finally:
        listener.shutdown()


def test_a_storage_commitment_report_to_a_tls_requestor_goes_over_tls(
        make_services: Callable[..., Services], pki: Pki) -> None:
    """A requestor whose ``PACS_MODALITIES`` entry says ``:tls`` gets its report on a
    new association over DICOM TLS once its own association has ended."""
    reports: queue.Queue[str] = queue.Queue()

    def report(event: Any) -> tuple[int, None]:
        reports.put(str(event.event_information.TransactionUID))
        return 0x0000, None

    listener = _tls_listener(pki, "REQ", [(evt.EVT_N_EVENT_REPORT, report)])
    entry = f"REQ=127.0.0.1:{listener.server_address[1]}:tls"
    services = make_services(modalities=entry, destinations=parse_modalities(entry),
                             dimse_tls_ca=str(pki.ca))
    node = start(services, ("127.0.0.1", free_port()))
    try:
        requestor = AE(ae_title="REQ")
        requestor.add_requested_context(CTImageStorage)
        requestor.add_requested_context(PUSH_MODEL)
        assoc = requestor.associate("127.0.0.1", node.server_address[1],
                                    ae_title=services.settings.ae_title)
        assert assoc.is_established
        transaction = store_and_ask_commitment(assoc)
        assoc.release()
        assert reports.get(timeout=30) == transaction
    finally:
        stop(node, drain=1.0)
        listener.shutdown()
