"""Smaller hardening cases against ``pacs serve`` (docs/reliability.md, "Smaller cases").

- a stored value too long for Explicit VR's 16-bit length field (a 70 KB name received
  in Implicit VR) does not break the listings that include it: C-FIND (dcmtk findscu in
  both VR encodings), QIDO-RS and WADO-RS metadata;
- a C-FIND reader that stops reading holds no read transaction: the WAL is checkpointed
  and truncated meanwhile;
- an upload rewritten in place after the watcher read it is not deleted unstored;
- links in the upload folder are moved aside as links, never read through;
- a stored value pydicom cannot convert, answered through pydicom's writer, neither
  fails the answer nor reaches the log at INFO.

Every case checks that the node keeps answering a C-ECHO and a QIDO-RS and that its
memory grows by less than :data:`MEMORY_BOUND`; the figures are printed (``-s``).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PatientFind,
    StudyRootQueryRetrieveInformationModelFind as StudyFind,
)

from tests.factory import make_instance
from tests.interop.conftest import AE_TITLE, Node, Resources, run_dcmtk

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

#: The most the node's memory may grow during one case.
MEMORY_BOUND = 256 * 2**20
#: Generous bound for anything the node should do "at once" on a loaded machine.
PATIENCE = 60.0
#: Longest value Explicit VR's 16-bit length field holds, padded to even length.
MAX_SHORT = 0xFFFE

LONG_NAME = "Longname" * 8750 + "^Given"  # 70 006 characters


# --- the node and its health ---------------------------------------------------------------

@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory("review", PACS_UPLOADS_POLL="0.2")


def qido(node: Node, path: str = "/studies", **params: str) -> requests.Response:
    """A QIDO-RS (the web application may still be starting: 503 meanwhile)."""
    deadline = time.monotonic() + PATIENCE
    while True:
        response = requests.get(f"{node.web_url()}{path}", params=params, timeout=30)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def still_serving(node: Node) -> None:
    """A real C-ECHO and a QIDO-RS answer within a few seconds."""
    started = time.monotonic()
    node.assert_serving()
    assert qido(node, limit="1").status_code == 200
    assert time.monotonic() - started < 30


class Memory:
    """The node's resources before a case and the most seen since."""

    def __init__(self, node: Node) -> None:
        self.node = node
        still_serving(node)
        self.before: Resources = node.resources()
        self.peak = self.before

    def sample(self) -> None:
        now = self.node.resources()
        if now.rss_bytes > self.peak.rss_bytes:
            self.peak = now

    def check(self, name: str) -> None:
        self.sample()
        now = self.node.resources()
        print(f"\n[{name}] memory {self.before.rss_bytes / 2**20:.0f} MiB -> peak "
              f"{self.peak.rss_bytes / 2**20:.0f} MiB -> {now.rss_bytes / 2**20:.0f} MiB; "
              f"fds {self.before.fds} -> {now.fds}")
        assert self.peak.rss_bytes - self.before.rss_bytes < MEMORY_BOUND


def ct(**attributes: object) -> Dataset:
    """A small CT instance with new UIDs and ``attributes``."""
    return pydicom.dcmread(io.BytesIO(make_instance(**attributes)))


def store_implicit(node: Node, datasets: list[Dataset]) -> None:
    """C-STORE in Implicit VR Little Endian (32-bit value lengths) with pynetdicom."""
    ae = AE(ae_title="IMPLICIT")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established, node.log()
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status is not None and status.Status == 0, node.log()
    finally:
        assoc.release()


def find_with_dcmtk(node: Node, folder: Path, syntax: str, level: str,
                    **keys: str) -> list[pydicom.Dataset]:
    """findscu (Study Root) proposing ``syntax`` (``-xe`` explicit first, ``-xi``
    implicit only); the responses as data sets."""
    folder.mkdir(parents=True)
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    query.save_as(folder / "query.dcm", implicit_vr=False, little_endian=True)
    result = run_dcmtk("findscu", "-S", syntax, "-aec", AE_TITLE, "-X", "-od", str(folder),
                       "127.0.0.1", str(node.port), str(folder / "query.dcm"))
    assert result.returncode == 0, result.stdout
    assert "Failed" not in result.stdout and "0xc000" not in result.stdout.lower(), (
        result.stdout)
    return [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


# --- 1. a value longer than Explicit VR can hold -------------------------------------------

@pytest.mark.dimse
def test_a_value_too_long_for_explicit_vr_does_not_break_listings(node: Node,
                                                                  tmp_path: Path) -> None:
    memory = Memory(node)
    long_one = ct(PatientID="LONGNAME")
    long_one.PatientName = LONG_NAME  # sent in Implicit VR: a 32-bit length
    others = [ct(PatientID=f"OTHER{n}", PatientName=f"OTHER^{n}") for n in range(2)]
    store_implicit(node, [long_one, *others])
    studies = {str(ds.StudyInstanceUID) for ds in [long_one, *others]}

    # C-FIND in Explicit VR: the name is cut to what its 16-bit length field holds, on a
    # character boundary, for this answer; every other study is answered in full.
    explicit = {str(ds.StudyInstanceUID): ds for ds in find_with_dcmtk(
        node, tmp_path / "explicit", "-xe", "STUDY", StudyInstanceUID="", PatientName="",
        PatientID="")}
    assert studies <= set(explicit)
    sent = str(explicit[long_one.StudyInstanceUID].PatientName)
    assert len(sent) == MAX_SHORT and LONG_NAME.startswith(sent)
    assert str(explicit[others[0].StudyInstanceUID].PatientName) == "OTHER^0"
    # In Implicit VR (32-bit lengths) the whole name goes out.
    implicit = {str(ds.StudyInstanceUID): ds for ds in find_with_dcmtk(
        node, tmp_path / "implicit", "-xi", "STUDY", StudyInstanceUID="", PatientName="")}
    assert str(implicit[long_one.StudyInstanceUID].PatientName) == LONG_NAME
    assert studies <= set(implicit)

    # QIDO-RS and WADO-RS metadata: JSON has no length fields, the value is whole.
    listed = {row["0020000D"]["Value"][0]: row
              for row in qido(node, includefield="PatientName").json()}
    assert studies <= set(listed)
    assert listed[long_one.StudyInstanceUID]["00100010"]["Value"][0]["Alphabetic"] == (
        LONG_NAME)
    metadata = requests.get(f"{node.web_url()}/studies/{long_one.StudyInstanceUID}/metadata",
                            timeout=30)
    assert metadata.status_code == 200
    assert metadata.json()[0]["00100010"]["Value"][0]["Alphabetic"] == LONG_NAME

    # The cut is logged with the study's UID and the tag, never the name.
    log = node.log()
    assert f"(0010,0010) of study {long_one.StudyInstanceUID}" in log
    assert "LongnameLongname" not in log
    memory.check("70 KB name in Explicit VR C-FIND, QIDO-RS, WADO-RS metadata")
    still_serving(node)


# --- 2. a slow C-FIND reader ------------------------------------------------------------------

def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _associate_rq(abstract: str, calling: str = "SLOWREADER") -> bytes:
    """An A-ASSOCIATE-RQ proposing ``abstract`` in Implicit VR LE (PS3.8 9.3.2)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode())
                    + _item(0x40, ImplicitVRLittleEndian.encode()))
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.10.543")
    body = (struct.pack(">HH", 1, 0) + AE_TITLE.ljust(16).encode()
            + calling.ljust(16).encode() + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + _item(0x50, user))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the node closed the connection")
        data += chunk
    return data


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    kind, _, length = struct.unpack(">BBI", _read(sock, 6))
    return kind, _read(sock, length)


def _find_request(identifier: Dataset, model: str) -> bytes:
    """The P-DATA-TF PDUs of a C-FIND-RQ on presentation context 1."""
    request = C_FIND()
    request.MessageID = 1
    request.AffectedSOPClassUID = model
    request.Priority = 2
    request.Identifier = io.BytesIO(encode(identifier, True, True))
    message = C_FIND_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return b"".join(pdus)


def _responses(sock: socket.socket, first: tuple[int, bytes]) -> tuple[int, int]:
    """Read C-FIND responses, from the PDU ``first`` on, until the final one:
    (pending count, final status)."""
    pending = 0
    command = b""
    pdu: tuple[int, bytes] | None = first
    while True:
        kind, body = pdu or _read_pdu(sock)
        pdu = None
        assert kind == 0x04, f"PDU type {kind:#x}"
        at = 0
        while at < len(body):
            length, _, header = struct.unpack_from(">IBB", body, at)
            value = body[at + 6:at + 4 + length]
            at += 4 + length
            if not header & 0x01:
                continue  # a data set fragment
            command += value
            if not header & 0x02:
                continue
            status_at = command.index(b"\x00\x00\x00\x09\x02\x00\x00\x00") + 8
            status = struct.unpack_from("<H", command, status_at)[0]
            command = b""
            if status in (0xFF00, 0xFF01):
                pending += 1
            else:
                return pending, status


def _checkpoint(data_dir: Path) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(TRUNCATE)``: busy is 1 when a read transaction is open."""
    conn = apsw.Connection(str(data_dir / "index.sqlite"))
    try:
        conn.set_busy_timeout(3000)
        return tuple(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    finally:
        conn.close()


@pytest.mark.dimse
def test_a_reader_that_stops_reading_holds_no_read_transaction(node: Node) -> None:
    """A C-FIND whose answers (~6 MB) outgrow the socket buffers, read by a peer that
    stops reading: meanwhile a C-STORE commits and a checkpoint truncates the WAL (an
    open read transaction would keep it growing), and the node answers others."""
    big = [ct(PatientID=f"BIG{n:03d}") for n in range(100)]
    for n, ds in enumerate(big):
        ds.PatientName = f"Big{n:03d}^" + "X" * 60_000
    store_implicit(node, big)
    memory = Memory(node)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
    sock.settimeout(PATIENCE)
    sock.connect(("127.0.0.1", node.port))
    try:
        sock.sendall(_associate_rq(str(PatientFind)))
        kind, _ = _read_pdu(sock)
        assert kind == 0x02, node.log()
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "BIG*"
        query.PatientName = ""
        sock.sendall(_find_request(query, str(PatientFind)))
        first = _read_pdu(sock)  # the answers have begun
        time.sleep(2)  # the node fills the socket buffers and waits for the reader

        store_implicit(node, [ct(PatientID="DURING", PatientName="WHILE^STALLED")])
        busy, wal_frames, _ = _checkpoint(node.data_dir)
        assert busy == 0, "a read transaction is held while the C-FIND reader stalls"
        # The TRUNCATE checkpoint emptied the WAL (the file's size after it is not
        # looked at: the intake's mover may already be writing the next commit).
        assert wal_frames == 0
        still_serving(node)
        memory.sample()

        pending, status = _responses(sock, first)  # the reader is back: all arrives
        assert (pending, status) == (100, 0x0000)
        sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        assert _read_pdu(sock)[0] == 0x06
    finally:
        sock.close()
    memory.check("C-FIND reader stalled mid-answer (6 MB of responses)")
    still_serving(node)


# --- 3. the upload folder ------------------------------------------------------------------------

def _watcher_pid(node: Node) -> int:
    for pid in node.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"pacs.node.uploads" in cmdline.read():
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no upload watcher among {node.pids()}:\n{node.log()}")


def _has_open(pid: int, path: Path) -> bool:
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            if os.readlink(f"{folder}/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def _large_ct(pixel_bytes: int) -> tuple[bytes, str]:
    ds = ct(Rows=1024, Columns=pixel_bytes // 2048)
    ds.PixelData = os.urandom(pixel_bytes)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), str(ds.SOPInstanceUID)


def _wait(condition: Callable[[], bool], what: str, node: Node, pause: float = 0.02) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"{what}\n{node.log()}"
        time.sleep(pause)


def _rewrite_once_read(node: Node, path: Path, first: bytes, second: bytes) -> bool:
    """Drop ``first`` at ``path``; once the watcher has read it (opened and closed it),
    rewrite it in place with ``second``.  False when the read was too quick to be seen
    (the watcher is then left to finish with the file)."""
    pid = _watcher_pid(node)
    path.write_bytes(first)
    deadline = time.monotonic() + PATIENCE
    while not _has_open(pid, path):
        if not path.exists():
            return False  # read, stored and deleted between two looks
        assert time.monotonic() < deadline, f"the watcher never read the upload\n{node.log()}"
        time.sleep(0.001)
    _wait(lambda: not _has_open(pid, path), "the watcher never closed the upload", node,
          pause=0.001)
    with open(path, "r+b") as rewrite:  # in place: same inode, new content
        rewrite.truncate(0)
        rewrite.write(second)
    return True


def test_an_upload_rewritten_after_it_was_read_is_not_deleted_unstored(node: Node) -> None:
    """The file is rewritten in place (same inode) as soon as the watcher has read it,
    while it stores what it read: the new content must end up stored, not deleted."""
    memory = Memory(node)
    uploads = node.data_dir / "uploads"
    for attempt in range(5):
        first, first_uid = _large_ct(40 * 2**20)
        second, second_uid = _large_ct(40 * 2**20)
        path = (uploads / f"rewritten{attempt}.dcm").resolve()
        if _rewrite_once_read(node, path, first, second):
            break
    else:
        pytest.fail("the watcher's reads were never seen")
    _wait(lambda: first_uid in node.index(), "the first content was not stored", node)
    _wait(lambda: second_uid in node.index() and not path.exists(),
          "the rewritten content was lost", node)
    memory.check("upload rewritten in place between read and delete")
    still_serving(node)


def test_links_in_the_upload_folder_are_moved_aside_never_followed(node: Node,
                                                                    tmp_path: Path) -> None:
    memory = Memory(node)
    uploads = node.data_dir / "uploads"
    passwd = Path("/etc/passwd").read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    outside_object = ct(PatientID="OUTSIDE")
    outside_object.save_as(outside / "outside.dcm", enforce_file_format=True)
    before = (outside / "outside.dcm").read_bytes()
    (uploads / "passwd.dcm").symlink_to("/etc/passwd")
    (uploads / "outside.dcm").symlink_to(outside / "outside.dcm")
    (uploads / "linked-folder").symlink_to(outside)
    rejected = uploads / "rejected"
    names = ("passwd.dcm", "outside.dcm", "linked-folder")
    _wait(lambda: all((rejected / f"{n}.reason.txt").exists() for n in names),
          "the links were not moved aside", node)
    for name in names:
        assert (rejected / name).is_symlink() and not (uploads / name).exists()
        assert "links are not followed" in (rejected / f"{name}.reason.txt").read_text()
    assert Path("/etc/passwd").read_bytes() == passwd
    assert (outside / "outside.dcm").read_bytes() == before
    assert str(outside_object.SOPInstanceUID) not in node.index()
    memory.check("links in the upload folder")
    still_serving(node)


# --- 4. nothing of a data set in the log at INFO --------------------------------------------------

SECRET = "Sekretweight"


def _malformed(path: Path) -> FileDataset:
    """An object whose Patient's Weight (DS) is text pydicom refuses to convert
    (``could not convert string to float: 'Sekretweight'``)."""
    ds = ct(PatientID="MALFORMED", PatientName="Sekretname^Patient", PatientWeight="1234567.890")
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(b"1234567.890 ") == 1  # replaced by as many bytes
    path.write_bytes(data.replace(b"1234567.890 ", SECRET.encode()))
    return ds


@pytest.mark.dimse
def test_a_value_pydicom_refuses_is_answered_and_not_logged(node: Node, tmp_path: Path) -> None:
    """Stored with dcmtk as sent; answered by C-FIND through pydicom's writer (an ISO
    2022 request), QIDO-RS and WADO-RS; the node's log at INFO holds none of its values."""
    memory = Memory(node)
    ds = _malformed(tmp_path / "malformed.dcm")
    sent = run_dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(node.port),
                     str(tmp_path / "malformed.dcm"))
    assert sent.returncode == 0, sent.stdout
    ae = AE(ae_title="ISO2022")
    ae.add_requested_context(StudyFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        query = Dataset()
        query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.PatientName = ""
        query.PatientWeight = ""
        answers = list(assoc.send_c_find(query, StudyFind))
    finally:
        assoc.release()
    assert [status.Status for status, _ in answers] == [0xFF00, 0x0000], node.log()
    weight = answers[0][1].get_item(0x00101030).value  # as stored (raw or text)
    assert (weight.decode() if isinstance(weight, bytes) else weight) == SECRET
    study = qido(node, StudyInstanceUID=str(ds.StudyInstanceUID), includefield="all")
    assert study.status_code == 200 and len(study.json()) == 1
    metadata = requests.get(f"{node.web_url()}/studies/{ds.StudyInstanceUID}/metadata",
                            timeout=30)
    assert metadata.status_code == 200
    time.sleep(1)  # whatever the workers log about it is written
    log = node.log()
    assert "Sekret" not in log, [line for line in log.splitlines() if "Sekret" in line]
    memory.check("a DS pydicom cannot convert, answered through pydicom's writer")
    still_serving(node)


@pytest.fixture(autouse=True)
def _uploads_ready(node: Node) -> Iterator[None]:
    """The upload watcher has created its folder before a case uses it."""
    _wait(lambda: (node.data_dir / "uploads").is_dir(), "no upload folder", node)
    yield
