"""DICOM TLS on the real node (PS3.15 B.12): ``pacs serve`` with its plain DIMSE port
off, a TLS port with client certificates of a throwaway CA (:mod:`tests.tlsfiles`),
and a C-MOVE destination reached over TLS.

- dcmtk's echoscu, storescu and findscu over TLS (``+tls KEY CERT +cf CA``), and
  pynetdicom with an ``ssl_context`` (C-ECHO, C-FIND, C-MOVE: dcmtk 3.6.7's movescu
  and getscu have no TLS), are served;
- mutual TLS: a client without a certificate, or with one of another authority, fails
  the handshake; a certificate for another AE title is rejected (A-ASSOCIATE-RJ
  permanent, calling AE title not recognized); the right one is accepted;
- C-MOVE and ``pacs send`` (forwarding's sender) send to a dcmtk storescp with
  ``+tls``, which verifies the node's certificate, and the node verifies its (a
  destination whose certificate the node cannot verify gets nothing);
- the plain port is off: nothing listens there;
- 50 connections that never hand-shake do not keep a legitimate association out, and
  the node closes them within ARTIM.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.conftest import free_port, rejection_of
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    fresh_ct,
    run_dcmtk,
    start_storescp,
)
from tests.interop.test_hostile_dimse import associate_rq, read_pdu
from tests.tlsfiles import Pki, ae_certificate, make_pki

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: The calling AE title of the clients, and the TLS C-MOVE destination's.
SCU, DESTINATION = "TLSSCU", "TLSDEST"
#: Seconds a connection may stay silent before the node closes it (ARTIM).
ARTIM = 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_storescp(pki: Pki, ae_title: str, folder: Path, ca: str = "ca") -> Iterator[int]:
    """A dcmtk storescp on TLS writing into ``folder``, with a certificate ``ca``
    signed, requiring and verifying its peers' (the test CA's): its port."""
    cert, key = ae_certificate(pki, ae_title, server=True, ca=ca)
    port, process = start_storescp(ae_title, folder, "+tls", str(key), str(cert),
                                   "+cf", str(pki.ca),
                                   log=folder.parent / f"{folder.name}.log")
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def destination(pki: Pki, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[int, Path]]:
    """The TLS C-MOVE destination: (port, the folder it writes into)."""
    folder = tmp_path_factory.mktemp("tls-destination")
    with tls_storescp(pki, DESTINATION, folder) as port:
        yield port, folder


@pytest.fixture(scope="module")
def untrusted(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A TLS storescp whose certificate the other CA signed: its port."""
    with tls_storescp(pki, "UNTRUSTED", tmp_path_factory.mktemp("tls-untrusted"),
                      ca="other-ca") as port:
        yield port


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], pki: Pki,
         destination: tuple[int, Path], untrusted: int) -> Node:
    """Plain and TLS ports, client certificates of the test CA required on the TLS
    one; its own certificate names its AE title and serves as client certificate
    towards the destinations."""
    return node_factory(
        "tls", **tls_settings(pki), PACS_ARTIM_TIMEOUT=str(ARTIM),
        PACS_MODALITIES=f"{DESTINATION}=127.0.0.1:{destination[0]}:tls,"
                        f"UNTRUSTED=127.0.0.1:{untrusted}:tls")


def tls_settings(pki: Pki) -> dict[str, str]:
    cert, key = ae_certificate(pki, AE_TITLE, server=True)
    return {"PACS_DIMSE_TLS_PORT": str(free_port()), "PACS_DIMSE_TLS_CERT": str(cert),
            "PACS_DIMSE_TLS_KEY": str(key), "PACS_DIMSE_TLS_CA": str(pki.ca),
            "PACS_UPLOADS_POLL": "0", "PACS_VIEWER_PORT": "0"}


def tls_port(node: Node) -> str:
    return node.env["PACS_DIMSE_TLS_PORT"]


def dcmtk_tls(pki: Pki, ae_title: str = SCU) -> list[str]:
    """dcmtk's options: calling AE title, its certificate, the CA the node is checked by."""
    cert, key = ae_certificate(pki, ae_title)
    return ["-aet", ae_title, "-aec", AE_TITLE, "+tls", str(key), str(cert),
            "+cf", str(pki.ca)]


def client_context(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def associate(node: Node, pki: Pki, cert: tuple[Path, Path] | None,
              calling: str = SCU) -> object:
    """A pynetdicom association over TLS (Verification and Study Root C-FIND)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", int(tls_port(node)), ae_title=AE_TITLE,
                        tls_args=(client_context(pki, cert), "localhost"))


def stored_file(folder: Path, **changes: object) -> tuple[Path, pydicom.Dataset]:
    ds = fresh_ct(**changes)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


# --- dcmtk -------------------------------------------------------------------------------

def test_dcmtk_echoes_stores_and_finds_over_tls(node: Node, pki: Pki, tmp_path: Path) -> None:
    port = tls_port(node)
    echo = run_dcmtk("echoscu", *dcmtk_tls(pki), "127.0.0.1", port)
    assert echo.returncode == 0, f"{echo.stdout}\n--- server ---\n{node.log()}"
    path, ds = stored_file(tmp_path, PatientID="TLS-STORE")
    store = run_dcmtk("storescu", *dcmtk_tls(pki), "127.0.0.1", port, str(path))
    assert store.returncode == 0, f"{store.stdout}\n--- server ---\n{node.log()}"
    assert node.index()[ds.SOPInstanceUID].calling_ae == SCU
    find = run_dcmtk("findscu", *dcmtk_tls(pki), "-S", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", "PatientID=TLS-STORE", "-k", "StudyInstanceUID",
                     "127.0.0.1", port)
    assert find.returncode == 0, find.stdout
    assert ds.StudyInstanceUID in find.stdout


@pytest.mark.parametrize("requestor", ["pynetdicom over TLS", "movescu on the plain port"])
def test_c_move_sends_to_a_tls_destination(node: Node, pki: Pki, tmp_path: Path,
                                           destination: tuple[int, Path],
                                           requestor: str) -> None:
    """Three instances, over TLS to the node or not (the seam's own sub-operations
    serve the plain port's C-MOVE; pynetdicom's the TLS port's)."""
    first, ds = stored_file(tmp_path, PatientID="TLS-MOVE")
    paths = [first] + [stored_file(tmp_path, PatientID="TLS-MOVE",
                                   StudyInstanceUID=ds.StudyInstanceUID,
                                   SeriesInstanceUID=ds.SeriesInstanceUID)[0]
                       for _ in range(2)]
    store = run_dcmtk("storescu", *dcmtk_tls(pki), "127.0.0.1", tls_port(node),
                      *map(str, paths))
    assert store.returncode == 0, store.stdout
    if requestor == "pynetdicom over TLS":
        statuses = move(node, pki, ds.StudyInstanceUID, DESTINATION)
        assert statuses[-1] == 0x0000, f"{statuses}\n--- server ---\n{node.log()}"
    else:
        moved = run_dcmtk("movescu", "-aet", SCU, "-aec", AE_TITLE, "-aem", DESTINATION,
                          "-S", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                          "127.0.0.1", str(node.port))
        assert moved.returncode == 0, f"{moved.stdout}\n--- server ---\n{node.log()}"
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in destination[1].iterdir()}
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert sent <= received, node.log()


def test_c_move_to_a_destination_it_cannot_verify_sends_nothing(
        node: Node, pki: Pki, tmp_path: Path) -> None:
    """UNTRUSTED listens on TLS with a certificate of another authority: the node's
    handshake fails, and the C-MOVE fails without a sub-operation (A702)."""
    path, ds = stored_file(tmp_path, PatientID="TLS-UNTRUSTED")
    store = run_dcmtk("storescu", *dcmtk_tls(pki), "127.0.0.1", tls_port(node), str(path))
    assert store.returncode == 0, store.stdout
    statuses = move(node, pki, ds.StudyInstanceUID, "UNTRUSTED")
    assert statuses[-1] == 0xA702, f"{statuses}\n--- server ---\n{node.log()}"


def test_pacs_send_forwards_to_a_tls_destination_it_verifies(
        node: Node, pki: Pki, tmp_path: Path, destination: tuple[int, Path]) -> None:
    """Forwarding's sender (``pacs send``) reaches a ``:tls`` destination over DICOM TLS
    with the node's certificate, and sends nothing to one it cannot verify."""
    path, ds = stored_file(tmp_path, PatientID="TLS-SEND")
    store = run_dcmtk("storescu", *dcmtk_tls(pki), "127.0.0.1", tls_port(node), str(path))
    assert store.returncode == 0, store.stdout
    sent = node.cli("send", "--quiet", "--to", DESTINATION, str(ds.StudyInstanceUID))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in destination[1].iterdir()}
    assert str(ds.SOPInstanceUID) in received
    refused = node.cli("send", "--quiet", "--to", "UNTRUSTED", str(ds.StudyInstanceUID))
    assert refused.returncode == 1 and "1 not delivered" in refused.stdout, refused.stdout


def move(node: Node, pki: Pki, study: str, destination: str) -> list[int]:
    """The statuses of a Study Root C-MOVE of ``study`` sent by pynetdicom over TLS."""
    assoc = associate(node, pki, ae_certificate(pki, SCU))
    assert assoc.is_established, node.log()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        return [int(status.Status) for status, _ in assoc.send_c_move(
            query, destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()


# --- pynetdicom and mutual TLS ----------------------------------------------------------------

def test_pynetdicom_with_its_certificate_is_served(node: Node, pki: Pki) -> None:
    assoc = associate(node, pki, ae_certificate(pki, SCU))
    assert assoc.is_established, node.log()
    try:
        assert assoc.send_c_echo().Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = [status.Status for status, _ in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind)]
        assert statuses[-1] == 0x0000
    finally:
        assoc.release()


def test_a_certificate_for_another_ae_is_rejected(node: Node, pki: Pki) -> None:
    assoc = associate(node, pki, ae_certificate(pki, "OTHERAE"), calling=SCU)
    # Rejected permanent, by the service user, calling AE title not recognized.
    assert rejection_of(assoc) == (1, 1, 3), node.log()
    # A Security Alert (PS3.15 A.5.3.11) of type Node Authentication, naming the caller.
    alerts = [line for line in (node.data_dir / "audit.jsonl").read_text().splitlines()
              if '"110113"' in line]
    assert alerts and '"110126"' in alerts[-1] and SCU in alerts[-1], alerts


@pytest.mark.parametrize("client", ["none", "other CA"])
def test_a_client_without_a_valid_certificate_is_refused(node: Node, pki: Pki,
                                                         client: str) -> None:
    cert = None if client == "none" else ae_certificate(pki, SCU, ca="other-ca")
    assoc = associate(node, pki, cert)
    assert not assoc.is_established
    assert not assoc.is_rejected  # refused by TLS, before any A-ASSOCIATE-RQ was read
    # dcmtk too: echoscu without a certificate of the test CA.
    echo = run_dcmtk("echoscu", "-aet", SCU, "-aec", AE_TITLE, "+tla", "+cf", str(pki.ca),
                     "127.0.0.1", tls_port(node))
    assert echo.returncode != 0


def test_the_plain_port_can_be_turned_off(node_factory: Callable[..., Node],
                                          pki: Pki) -> None:
    tls_only = node_factory("tls-only", PACS_DIMSE_PORT="0", **tls_settings(pki))
    try:
        echo = run_dcmtk("echoscu", *dcmtk_tls(pki), "127.0.0.1", tls_port(tls_only))
        assert echo.returncode == 0, f"{echo.stdout}\n--- server ---\n{tls_only.log()}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", tls_only.port), timeout=5).close()
        assert (f"listening on 127.0.0.1:{tls_port(tls_only)} (TLS with client "
                f"certificates) with") in tls_only.log()
    finally:
        tls_only.stop()


# --- hostile ----------------------------------------------------------------------------------

@pytest.mark.hostile
def test_connections_that_never_handshake_do_not_keep_a_peer_out(node: Node,
                                                                  pki: Pki) -> None:
    silent = [socket.create_connection(("127.0.0.1", int(tls_port(node))), timeout=30)
              for _ in range(50)]
    try:
        echo = run_dcmtk("echoscu", *dcmtk_tls(pki), "127.0.0.1", tls_port(node))
        assert echo.returncode == 0, f"{echo.stdout}\n--- server ---\n{node.log()}"
        # Each is closed by the node once ARTIM has passed (a generous wait: closing,
        # not timing, is what is checked).
        deadline = time.monotonic() + ARTIM + 20
        for sock in silent:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()
    assert "DICOM TLS handshake(s) failed" in node.log()


#: The first three bytes of a TLS application data record's header (RFC 8446 5.1).
PART_OF_A_RECORD = b"\x17\x03\x03"


def _closed_by_the_node(sock: ssl.SSLSocket, within: float) -> bool:
    """True once the node closes the connection (what it sends before is read raw)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not socket.socket.recv(sock, 4096):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def test_a_peer_that_sends_part_of_a_tls_record_is_dropped_in_time(
        node_factory: Callable[..., Node], pki: Pki) -> None:
    """Part of a TLS record, then silence, after the association and before it: each
    connection is closed within its time (the PDU's, ARTIM), and TLS peers are
    served meanwhile.  OpenSSL reads a record whole inside one call, which the
    socket's receive timeout did not end: each held a thread and an association place
    for good, and 16 of them locked a host out of both ports."""
    node = node_factory("tlsrecord", **tls_settings(pki), PACS_ARTIM_TIMEOUT="2",
                        PACS_DIMSE_TIMEOUT="2")
    context = client_context(pki, ae_certificate(pki, SCU))
    held = []
    try:
        for associated in (True, False):
            raw = socket.create_connection(("127.0.0.1", int(tls_port(node))), timeout=30)
            sock = context.wrap_socket(raw, server_hostname="localhost")
            held.append(sock)
            if associated:
                sock.sendall(associate_rq(calling=SCU))
                answer = read_pdu(sock)
                assert answer is not None and answer[0] == 0x02, node.log()
            socket.socket.sendall(sock, PART_OF_A_RECORD)
        # A generous wait: that they are closed, not when, is what is checked.
        assert [_closed_by_the_node(sock, 30) for sock in held] == [True, True], node.log()
        echo = run_dcmtk("echoscu", *dcmtk_tls(pki), "127.0.0.1", tls_port(node))
        assert echo.returncode == 0, f"{echo.stdout}\n--- server ---\n{node.log()}"
    finally:
        for sock in held:
            sock.close()
