"""Bad input against ``pacs serve``: each gets the right status or rejection, nothing is
written, the node keeps serving and the next good C-STORE succeeds.

Requests are crafted with pynetdicom at the DIMSE level where its SCU API would not send
them (a command whose UIDs disagree with the data set, a truncated data set).
"""

from __future__ import annotations

import errno
import io
import random
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from pacs.dimse.limits import MIN_PEER_PDU
from tests.conftest import rejection_of
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    Snapshot,
    fresh_ct,
    key_of,
    run_dcmtk,
    sha256,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: A patient name that must never reach the server log.
SECRET_NAME = "Interop^Secretpatient"

CT_CLASS = str(CTImageStorage)


# --- helpers ----------------------------------------------------------------------------

@pytest.fixture
def assoc(node: Node) -> Iterator[Association]:
    """An established association proposing CT and MR storage in Explicit VR LE."""
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert association.is_established, node.log()
    yield association
    if association.is_established:
        association.release()


def encoded(ds: Dataset) -> bytes:
    """The data set in Explicit VR Little Endian, as it would go on the wire."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we want
        data = encode(ds, False, True)
    assert data is not None
    return data


def raw_store(assoc: Association, sop_class: str, sop_uid: str, data: bytes,
              message_id: int = 1, allow_none: bool = False) -> C_STORE | None:
    """Send a C-STORE request with exactly these command UIDs and data set bytes.

    What ``Association.send_c_store`` does, minus its taking the UIDs from the data set
    and encoding it.
    """
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 0x0002
    request.AffectedSOPClassUID = sop_class
    # Set behind the validating setter: pynetdicom refuses to send some invalid UIDs.
    request._affected_sop_instance_uid = UID(sop_uid)
    request.DataSet = io.BytesIO(data)
    context = assoc._get_valid_context(sop_class, ExplicitVRLittleEndian, "scu",
                                       allow_conversion=False)
    assoc._reactor_checkpoint.clear()  # as send_c_store: pause the reactor
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert allow_none or response is not None, "no C-STORE response (aborted or timed out)"
    return response


def store_dataset(assoc: Association, ds: Dataset) -> C_STORE:
    """C-STORE ``ds`` with the command UIDs taken from the data set."""
    return raw_store(assoc, str(ds.SOPClassUID), str(ds.SOPInstanceUID), encoded(ds))


def assert_nothing_written_and_still_serving(node: Node, before: Snapshot) -> None:
    """No object, index row or temporary file appeared; a good C-STORE then succeeds."""
    after = node.snapshot()
    assert after.index == before.index, "the index changed"
    assert after.objects == before.objects, "the store changed"
    assert not after.temporaries, f"temporary files left: {after.temporaries}"
    assert SECRET_NAME.split("^")[1] not in node.log(), "patient data in the server log"

    good = fresh_ct(PatientName=SECRET_NAME)
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established, node.log()
    try:
        response = store_dataset(assoc, good)
    finally:
        assoc.release()
    assert response.Status == 0x0000, (hex(response.Status), response.ErrorComment)
    row = node.index()[good.SOPInstanceUID]
    assert row.object_key == key_of(good.StudyInstanceUID, good.SeriesInstanceUID,
                                    good.SOPInstanceUID)
    assert row.checksum == sha256(node.object_path(row))
    assert row.calling_ae == "GOODSCU"


def bad_ct(**changes: object) -> Dataset:
    return fresh_ct(PatientName=SECRET_NAME, **changes)


# --- invalid UIDs: 0117 ---------------------------------------------------------------------

@pytest.mark.parametrize("uid", ["1.2.3.abc", "../../etc/passwd", "1.2.03.4",
                                 "1.2.3/../../4", "1.2.3.4 5"])
def test_invalid_sop_instance_uid_via_send_c_store(node: Node, uid: str) -> None:
    """pynetdicom's own send_c_store: command and data set carry the invalid UID."""
    before = node.snapshot()
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = assoc.send_c_store(bad_ct(SOPInstanceUID=uid))
    finally:
        assoc.release()
    assert status.Status == 0x0117, status
    assert_nothing_written_and_still_serving(node, before)


@pytest.mark.parametrize("uid", ["1." + "2" * 63, "1.2.3.abc/..", "1.2.3\\4"])
def test_invalid_command_uid_sent_behind_pynetdicoms_back(node: Node, assoc: Association,
                                                          uid: str) -> None:
    """UIDs pynetdicom's SCU refuses to send, in the command and the data set: a failure
    status, or an abort when the command itself does not decode (too long for UI)."""
    before = node.snapshot()
    ds = bad_ct(SOPInstanceUID=uid)
    response = raw_store(assoc, CT_CLASS, uid, encoded(ds), allow_none=True)
    if response is None:
        deadline = time.monotonic() + 5
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.is_aborted, "neither a response nor an abort"
    else:
        assert response.Status == 0x0117, (hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


def test_empty_command_uid_gets_an_answer(node: Node) -> None:
    """pynetdicom drops such a request (no response, no abort); the node answers 0117."""
    before = node.snapshot()
    ae = AE(ae_title="BADINPUT")
    ae.dimse_timeout = 5
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        response = raw_store(assoc, CT_CLASS, "", encoded(bad_ct(SOPInstanceUID="")),
                             allow_none=True)
        assert response is not None and response.Status == 0x0117
    finally:
        if assoc.is_established:
            assoc.abort()
    assert_nothing_written_and_still_serving(node, before)


@pytest.mark.parametrize("keyword,uid", [
    ("SOPInstanceUID", "../../etc/passwd"),
    ("SOPInstanceUID", "1." + "2" * 63),
    ("SOPInstanceUID", ""),
    ("StudyInstanceUID", "../../../tmp/pacs-escape"),
    ("SeriesInstanceUID", "1.2.3.abc"),
    ("StudyInstanceUID", "1.2.840.10008.a"),
])
def test_invalid_uid_in_data_set_only(node: Node, assoc: Association, keyword: str,
                                      uid: str) -> None:
    """A valid command, but an identifying UID of the data set is not a UID (some of
    them would name a path outside the store if used unvalidated)."""
    before = node.snapshot()
    ds = bad_ct(**{keyword: uid})
    command_uid = ds.SOPInstanceUID if keyword != "SOPInstanceUID" else generate_uid()
    response = raw_store(assoc, CT_CLASS, str(command_uid), encoded(ds))
    assert response.Status == 0x0117, (hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


# --- command / data set mismatch: A900 ------------------------------------------------------

def test_command_sop_instance_uid_differs_from_data_set(node: Node,
                                                       assoc: Association) -> None:
    before = node.snapshot()
    ds = bad_ct()
    response = raw_store(assoc, CT_CLASS, generate_uid(), encoded(ds))
    assert response.Status == 0xA900, (hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


def test_command_sop_class_differs_from_data_set(node: Node, assoc: Association) -> None:
    """The command says MR (and goes on the MR context); the data set is a CT."""
    before = node.snapshot()
    ds = bad_ct()
    response = raw_store(assoc, str(MRImageStorage), str(ds.SOPInstanceUID), encoded(ds))
    assert response.Status == 0xA900, (hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


# --- truncated data sets: C000 --------------------------------------------------------------

CUTS = ("in pixel data", "in the pixel data header", "one byte short",
        "in the Patient Name header", "in the Patient Name value", "in the Study Date header")


def cut(data: bytes, where: str) -> bytes:
    """An encoded CT_small data set cut short at the named place."""
    pixel = data.index(b"\xe0\x7f\x10\x00OW")
    name = data.index(b"\x10\x00\x10\x00PN")
    keep = {
        "in pixel data": pixel + 12 + struct.unpack_from("<I", data, pixel + 8)[0] // 2,
        "in the pixel data header": pixel + 6,
        "one byte short": len(data) - 1,
        "in the Patient Name header": name + 5,
        "in the Patient Name value": name + 8 + struct.unpack_from("<H", data, name + 6)[0] // 2,
        "in the Study Date header": data.index(b"\x08\x00\x20\x00DA") + 3,
    }[where]
    return data[:keep]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_data_set(node: Node, assoc: Association, where: str) -> None:
    before = node.snapshot()
    ds = bad_ct()
    response = raw_store(assoc, CT_CLASS, str(ds.SOPInstanceUID), cut(encoded(ds), where))
    assert response.Status == 0xC000, (where, hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


@pytest.mark.parametrize("data", [b"\x08\x00\x05\x00", b"\xff" * 7, b"DICM" * 64],
                         ids=["a lone tag", "seven bytes", "garbage"])
def test_data_set_that_is_not_one(node: Node, assoc: Association, data: bytes) -> None:
    before = node.snapshot()
    response = raw_store(assoc, CT_CLASS, generate_uid(), data)
    assert response.Status == 0xC000, (hex(response.Status), response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


def test_data_set_without_identifying_uids(node: Node, assoc: Association) -> None:
    """A valid command, a data set that parses but lacks SOP Instance and Study UIDs."""
    before = node.snapshot()
    ds = bad_ct()
    command_uid = str(ds.SOPInstanceUID)
    del ds.SOPInstanceUID
    del ds.StudyInstanceUID
    response = raw_store(assoc, CT_CLASS, command_uid, encoded(ds))
    assert response.Status in (0x0117, 0xA900, 0xC000), (hex(response.Status),
                                                         response.ErrorComment)
    assert_nothing_written_and_still_serving(node, before)


# --- raw bytes on the DIMSE port --------------------------------------------------------------

def _payloads() -> dict[str, bytes]:
    rng = random.Random(20260211)
    noise = bytes(rng.getrandbits(8) for _ in range(65536))
    return {
        "random bytes": b"\x5a" + noise[1:],
        "random bytes, many chunks": noise * 2,
        "A-ASSOCIATE-RQ header, garbage body": b"\x01\x00" + struct.pack(">I", 200)
                                               + noise[:200],
        "A-ASSOCIATE-RQ with a huge length": b"\x01\x00\xff\xff\xff\xff" + noise[:1000],
        "P-DATA before any association": b"\x04\x00" + struct.pack(">I", 1000)
                                         + noise[:1000],
        "HTTP request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "a few bytes": b"\x07",
    }


@pytest.fixture(scope="module")
def raw_node(node_factory: Callable[..., Node]) -> Iterator[Node]:
    """A node of its own for raw-socket abuse, killed at the end: connections that end
    before an A-ASSOCIATE-RQ stay open in pynetdicom until the ACSE timeout and would
    hold up a clean stop for the drain time."""
    raw = node_factory("raw")
    yield raw
    raw.kill9()


@pytest.mark.parametrize("name", list(_payloads()))
def test_raw_bytes_to_dimse_port(raw_node: Node, name: str) -> None:
    node = raw_node
    before = node.snapshot()
    payload = _payloads()[name]
    answer = b""
    with socket.create_connection(("127.0.0.1", node.port), timeout=2) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):  # until the node closes, or 2 s of silence
                answer += chunk
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # closed by the node while we sent, or still waiting for more: both fine
        except OSError as exc:
            # Reset by the node before our shutdown (it refused what we sent): fine too.
            if exc.errno != errno.ENOTCONN:
                raise
    # If the node answers at all, it aborts (A-ABORT, 07H) or rejects (A-ASSOCIATE-RJ).
    assert answer[:1] in (b"", b"\x07", b"\x03"), answer[:16]
    assert_nothing_written_and_still_serving(node, before)
    node.assert_serving()


def test_silent_connections_do_not_exhaust_the_node(node_factory: Callable[..., Node]) -> None:
    node = node_factory("probes", PACS_MAX_ASSOCIATIONS="4")
    try:
        for _ in range(12):  # a load balancer's or port scanner's TCP probes
            socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
        deadline = time.monotonic() + 3
        while (result := node.echo()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.returncode == 0, result.stdout
    finally:
        node.kill9()


# --- wrong called AE title --------------------------------------------------------------------

def test_wrong_called_ae_title_is_rejected_at_association(node: Node) -> None:
    before = node.snapshot()
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NOT-" + AE_TITLE[:10])
    assert not assoc.is_established
    # rejected-permanent, by the service user, called AE title not recognised (PS3.8 9.3.4)
    assert rejection_of(assoc) == (1, 1, 7)
    assert_nothing_written_and_still_serving(node, before)


@pytest.mark.parametrize("max_pdu, accepted", [(0, True), (MIN_PEER_PDU, True),
                                                 (MIN_PEER_PDU - 1, False), (16, False)])
def test_a_requestor_announcing_a_tiny_maximum_pdu_is_rejected(
        node: Node, max_pdu: int, accepted: bool) -> None:
    """Every PDU sent to the peer costs the node work whatever it carries: a Maximum
    Length under the node's floor is rejected (rejected-permanent, by the service user,
    no reason given: PS3.8 9.3.4 has none for it); 0 (no maximum) and the floor are
    served."""
    before = node.snapshot()
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, max_pdu=max_pdu)
    try:
        assert assoc.is_established is accepted
        if accepted:
            assert assoc.send_c_echo().Status == 0
        else:
            assert rejection_of(assoc) == (1, 1, 1)
    finally:
        if assoc.is_established:
            assoc.release()
    assert_nothing_written_and_still_serving(node, before)


def test_wrong_called_ae_title_with_dcmtk(node: Node) -> None:
    before = node.snapshot()
    result = run_dcmtk("echoscu", "-aec", "WRONGAE", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout, result.stdout
    assert "Called AE Title Not Recognized" in result.stdout, result.stdout
    assert_nothing_written_and_still_serving(node, before)
