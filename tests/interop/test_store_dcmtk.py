"""C-STORE from dcmtk into ``pacs serve``: the README quickstart, and every Part 10 file
of pydicom's bundled test data sent with ``storescu`` in its own transfer syntax.

Byte identity is checked against what dcmtk actually put on the wire.  dcmtk re-encodes
a data set when it sends it (it drops trailing padding, writes sequences and items its own
way, re-deflates), even in the file's own transfer syntax; so each stored file is
also sent, with the same options, to dcmtk's ``storescp +B`` (bit-preserving: it writes
the data set exactly as read from the network) and the two data sets are compared.
How many also equal the original file's data set is reported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import UID

from tests.conftest import sample
from tests.factory import dataset_bytes
from tests.interop.conftest import (
    AE_TITLE,
    DCMTK_ENV,
    Node,
    assert_consistent,
    dcmtk,
    key_of,
    run_dcmtk,
    sha256,
    start_storescp,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: The README's quickstart line, run with the test node's port.
QUICKSTART = "dcmsend -v localhost 32773 -aec INTELPIXEL -aet ASTER +r +sd -nh test.dcm"

DATA_ROOT = Path(pydicom.data.__file__).parent
FOLDERS = ("test_files", "charset_files")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Parallel senders (the node runs two worker processes).
SENDERS = 4


# --- 1. the README quickstart --------------------------------------------------------------

def test_readme_quickstart_dcmsend(node: Node, tmp_path: Path) -> None:
    """The quickstart's dcmsend line, verbatim but for the port, stores and indexes."""
    readme = Path(__file__).parents[2] / "README.md"
    if readme.exists():
        assert QUICKSTART in readme.read_text(), "README.md lost the quickstart line"
    shutil.copy(sample("CT_small.dcm"), tmp_path / "test.dcm")
    original = pydicom.dcmread(tmp_path / "test.dcm")
    assert shutil.which("dcmsend", path=DCMTK_ENV.get("PATH")) == dcmtk("dcmsend")
    line = QUICKSTART.replace(" 32773 ", f" {node.port} ")

    result = subprocess.run(line, shell=True, cwd=tmp_path, env=DCMTK_ENV, timeout=60,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            check=False)

    assert result.returncode == 0, f"{line}\n{result.stdout}\n--- server ---\n{node.log()}"
    assert "Received C-STORE Response (Success)" in result.stdout, result.stdout
    row = node.index()[original.SOPInstanceUID]
    assert row.calling_ae == "ASTER"
    assert row.object_key == key_of(original.StudyInstanceUID, original.SeriesInstanceUID,
                                    original.SOPInstanceUID)
    node.wait_drained()  # from the intake to the store
    stored_path = node.object_path(row)
    assert row.size == stored_path.stat().st_size
    assert row.checksum == sha256(stored_path)
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == row.transfer_syntax
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.PatientName == original.PatientName
    assert stored.pixel_array.tolist() == original.pixel_array.tolist()


def test_dcmsend_sends_uncompressed_files_in_their_own_transfer_syntax(
        node: Node, tmp_path: Path) -> None:
    """A peer proposing [Explicit LE, Big Endian, Implicit LE] gets its first choice."""
    shutil.copy(sample("MR_small.dcm"), tmp_path / "test.dcm")
    result = run_dcmtk("dcmsend", "-v", "127.0.0.1", str(node.port), "-aec", AE_TITLE,
                       "--create-report-file", "report.txt", "test.dcm", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    report = (tmp_path / "report.txt").read_text()
    original = re.search(r"Original Xfer : (\S+)", report)
    network = re.search(r"Network Xfer  : (\S+)", report)
    assert original and network, report
    assert network.group(1) == original.group(1), report


def test_compressed_syntax_proposed_with_uncompressed_is_accepted(node: Node,
                                                                  tmp_path: Path) -> None:
    """storescu +C: one context per SOP class with the file's JPEG Lossless syntax first
    and the uncompressed ones after it; the node should take the file as it is."""
    result = run_dcmtk("storescu", "-v", "-xs", "+C", "-R", "-aec", AE_TITLE, "127.0.0.1",
                       str(node.port), str(sample("SC_rgb_jpeg_gdcm.dcm")))
    assert "Converting transfer syntax" not in result.stdout or (
        "-> JPEG Lossless" in result.stdout), result.stdout
    assert result.returncode == 0, result.stdout
    uid = pydicom.dcmread(sample("SC_rgb_jpeg_gdcm.dcm"), stop_before_pixels=True).SOPInstanceUID
    assert node.index()[uid].transfer_syntax == "1.2.840.10008.1.2.4.70"


# --- 2. every bundled pydicom file with storescu ---------------------------------------------

@dataclass
class Candidate:
    """One Part 10 file of pydicom's test data and what its header says."""

    path: Path
    name: str
    sop_class: str = ""
    sop_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    transfer_syntax: str = ""
    frames: int = 1
    # what happened
    output: str = ""
    status: int | None = None  # the node's C-STORE status, None when nothing was sent
    wire: bytes | None = None  # the data set as dcmtk sent it (from storescp +B)

    @property
    def stored(self) -> bool:
        return self.status == 0x0000

    @property
    def group(self) -> str:
        """Files with the same SOP Instance UID are one object sent several times."""
        return self.sop_uid or self.name


def _candidates() -> list[Candidate]:
    found = []
    for folder in FOLDERS:
        for path in sorted((DATA_ROOT / folder).rglob("*")):
            if not path.is_file():
                continue
            with open(path, "rb") as stream:
                if stream.read(132)[128:132] != b"DICM":
                    continue
            candidate = Candidate(path, path.relative_to(DATA_ROOT).as_posix())
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                meta = ds.file_meta
                candidate.transfer_syntax = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")
                candidate.sop_class = str(meta.get("MediaStorageSOPClassUID", "")
                                          or ds.get("SOPClassUID", "")).strip("\0 ")
                candidate.sop_uid = str(ds.get("SOPInstanceUID", "")).strip("\0 ")
                candidate.study_uid = str(ds.get("StudyInstanceUID", "")).strip("\0 ")
                candidate.series_uid = str(ds.get("SeriesInstanceUID", "")).strip("\0 ")
                candidate.frames = int(ds.get("NumberOfFrames", 1) or 1)
            except Exception:  # noqa: BLE001 - pydicom cannot read it: dcmtk will judge
                pass
            found.append(candidate)
    return found


def _profile(folder: Path, candidate: Candidate) -> list[str]:
    """storescu options proposing only the file's SOP class in the file's own transfer
    syntax, so that dcmtk sends it as it is or not at all (no conversion)."""
    if not (_UID_RE.match(candidate.sop_class) and _UID_RE.match(candidate.transfer_syntax)):
        return []  # dcmtk's defaults; it will refuse or convert, and we check what it did
    config = folder / (re.sub(r"[^A-Za-z0-9]+", "_", candidate.name) + ".cfg")
    config.write_text(
        "[[TransferSyntaxes]]\n[Own]\n"
        f"TransferSyntax1 = {candidate.transfer_syntax}\n"
        "[[PresentationContexts]]\n[Own]\n"
        f"PresentationContext1 = {candidate.sop_class}\\Own\n"
        "[[Profiles]]\n[Own]\nPresentationContexts = Own\n")
    return ["-xf", str(config), "Own"]


_RESPONSE_RE = re.compile(r"Received Store Response \((?P<text>[^)]*)\)")
#: How dcmtk names C-STORE statuses in verbose mode (dimse.cc, DU_cstoreStatusString).
_STATUS_NAMES = ((re.compile(r"out\s*of\s*resources", re.IGNORECASE), 0xA700),
                 (re.compile(r"does\s*not\s*match", re.IGNORECASE), 0xA900),
                 (re.compile(r"cannot\s*understand", re.IGNORECASE), 0xC000),
                 (re.compile(r"not\s*supported", re.IGNORECASE), 0x0122))


def _status(text: str) -> int:
    """A C-STORE status from dcmtk's verbose response text (0xFFFF: an unnamed failure)."""
    if text == "Success":
        return 0x0000
    if match := re.search(r"0x([0-9A-Fa-f]{1,4})\b", text):
        return int(match.group(1), 16)
    return next((code for pattern, code in _STATUS_NAMES if pattern.search(text)), 0xFFFF)


def _storescu(port: int, profile: list[str], path: Path) -> tuple[str, int | None]:
    """Send one file; return storescu's log and the node's status (None: nothing sent).

    Verbose rather than debug output: -d costs dcmtk more than the transfer itself.
    """
    result = run_dcmtk("storescu", "-v", "-aec", AE_TITLE, "-aet", "INTEROP", *profile,
                       "127.0.0.1", str(port), str(path))
    match = _RESPONSE_RE.search(result.stdout)
    return result.stdout, (_status(match.group("text")) if match else None)


class Reference:
    """dcmtk's storescp in bit-preserving mode: shows the data set as dcmtk sends it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.received = folder / "received"
        self.received.mkdir(parents=True)
        self.port, self.proc = start_storescp(AE_TITLE, self.received, "+B", "-F", "+xa",
                                              "-pm", log=folder / "storescp.log")
        self.lock = threading.Lock()

    def wire_bytes(self, candidate: Candidate, profile: list[str]) -> bytes:
        """Send ``candidate`` as to the node and return the data set storescp received."""
        output, status = _storescu(self.port, profile, candidate.path)
        assert status == 0, f"storescp refused {candidate.name}:\n{output}"
        with self.lock:  # storescp names files <modality>.<SOP Instance UID>
            names = [p for p in self.received.iterdir()
                     if p.name.split(".", 1)[-1] == candidate.sop_uid]
            assert len(names) == 1, (candidate.name, names)
            data = names[0].read_bytes()
            names[0].unlink()
        return data

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("storescp"))
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def store_node(node_factory: Callable[..., Node]) -> Node:
    """A node of its own for the storescu run: only these files in its index."""
    return node_factory("storescu")


@pytest.fixture(scope="module")
def sent(store_node: Node, reference: Reference,
         tmp_path_factory: pytest.TempPathFactory) -> list[Candidate]:
    """Send every candidate with storescu; files of one SOP Instance UID in order."""
    node = store_node
    candidates = _candidates()
    profiles = tmp_path_factory.mktemp("profiles")
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        groups[candidate.group].append(candidate)
    echo_failures: list[str] = []

    def send_group(members: list[Candidate]) -> None:
        for candidate in members:
            profile = _profile(profiles, candidate)
            candidate.output, candidate.status = _storescu(node.port, profile,
                                                           candidate.path)
            if candidate.stored:
                # What dcmtk sent: when the node stored the file's own data set, that is
                # it (the node does not re-encode); otherwise ask the reference receiver.
                stored = node.data_dir / "objects" / key_of(
                    candidate.study_uid, candidate.series_uid, candidate.sop_uid)
                original = dataset_bytes(candidate.path.read_bytes())
                if stored.is_file() and dataset_bytes(stored.read_bytes()) == original:
                    candidate.wire = original
                else:
                    candidate.wire = reference.wire_bytes(candidate, profile)
            else:
                echo = node.echo()  # refused: the node must keep serving
                if echo.returncode != 0:
                    echo_failures.append(f"{candidate.name}: {echo.stdout}")

    with ThreadPoolExecutor(SENDERS) as pool:
        for future in [pool.submit(send_group, members) for members in groups.values()]:
            future.result()
    assert not echo_failures, "\n".join(echo_failures) + "\n--- server ---\n" + node.log()
    return candidates


def _describe(candidate: Candidate) -> str:
    if candidate.status is None:
        if "No Acceptable Presentation Contexts" in candidate.output:
            return "its SOP class was rejected by the node at association (not a storage class)"
        errors = [line for line in candidate.output.splitlines()
                  if line.startswith(("E:", "F:"))]
        return "not sent by dcmtk: " + (errors[0] if errors else candidate.output[-200:])
    return f"refused by the node with status 0x{candidate.status:04X}"


def test_storescu_sends_every_bundled_file_stored_or_refused(
        store_node: Node, sent: list[Candidate]) -> None:
    """Each file is stored byte for byte and indexed, or refused; most are stored."""
    node = store_node
    stored = [c for c in sent if c.stored]
    refused = [c for c in sent if not c.stored]
    summary = [f"{len(stored)} of {len(sent)} Part 10 files stored, {len(refused)} refused"]
    summary += [f"  refused {c.name} ({c.transfer_syntax or 'no transfer syntax'}): "
                f"{_describe(c)}" for c in refused]
    print("\n".join(summary))

    # Refused: a failure status (never a warning or a silent success), or dcmtk did not
    # send it at all; the node kept serving (checked after each refusal in `sent`).
    for candidate in refused:
        if candidate.status is not None:
            assert candidate.status >= 0xA000 or candidate.status in (0x0110, 0x0111,
                                                                      0x0117, 0x0122), (
                f"{candidate.name}: status 0x{candidate.status:04X}\n{candidate.output}")

    node.wait_drained()  # from the intake to the store
    index = node.index()
    objects = node.objects()
    last_stored: dict[str, Candidate] = {}
    for candidate in sent:  # the duplicate policy is "overwrite": the last one wins
        if candidate.stored:
            last_stored[candidate.sop_uid] = candidate
    identical_to_file = 0
    for uid, candidate in last_stored.items():
        assert uid in index, f"{candidate.name} acknowledged but not indexed"
        row = index[uid]
        assert row.object_key == key_of(row.study_uid, row.series_uid, uid)
        path = node.object_path(row)
        data = path.read_bytes()
        assert row.size == len(data), candidate.name
        assert row.checksum == sha256(path), candidate.name
        assert row.transfer_syntax == candidate.transfer_syntax, candidate.name
        assert row.sop_class_uid == candidate.sop_class, candidate.name
        assert row.calling_ae == "INTEROP"
        meta = pydicom.filereader.read_file_meta_info(path)
        assert meta.TransferSyntaxUID == candidate.transfer_syntax, candidate.name
        assert meta.MediaStorageSOPInstanceUID == uid, candidate.name
        assert dataset_bytes(data) == candidate.wire, (
            f"{candidate.name}: the stored data set differs from what dcmtk sent")
        identical_to_file += dataset_bytes(data) == dataset_bytes(candidate.path.read_bytes())
    print(f"{len(last_stored)} distinct objects stored; {identical_to_file} of them are also "
          f"byte-identical to the original file's data set (dcmtk re-encodes the rest)")

    # Nothing of a refused object was written (unless another file of the UID was stored).
    stored_sops = {key.rsplit("/", 1)[-1][:-len(".dcm")] for key in objects}
    for candidate in refused:
        if candidate.sop_uid and candidate.sop_uid not in last_stored:
            assert candidate.sop_uid not in index, candidate.name
            assert candidate.sop_uid not in stored_sops, candidate.name

    assert len(stored) >= 0.8 * len(sent), "\n".join(summary)
    node.assert_serving()


def test_storescu_coverage(sent: list[Candidate]) -> None:
    """The stored files span what the issue names: compressed syntaxes, multi-frame, SR,
    RT, the character-set files and big endian."""
    stored = [c for c in sent if c.stored]
    syntaxes = Counter(UID(c.transfer_syntax) for c in stored)
    print("stored per transfer syntax: " + ", ".join(
        f"{uid.name}: {n}" for uid, n in sorted(syntaxes.items())))
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99"} <= set(syntaxes), "uncompressed, big endian, deflated"
    assert {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5"} <= set(syntaxes), "JPEG, JPEG-LS, JPEG 2000, RLE"
    assert any(c.frames > 1 for c in stored), "multi-frame"
    assert any(c.sop_class.startswith("1.2.840.10008.5.1.4.1.1.88.") for c in stored), "SR"
    assert any(c.sop_class.startswith("1.2.840.10008.5.1.4.1.1.481.") for c in stored), "RT"
    charset = [c for c in stored if c.name.startswith("charset_files/")]
    assert len(charset) >= 10, "character-set files"


def test_index_and_store_agree_after_storescu(store_node: Node,
                                              sent: list[Candidate]) -> None:
    """Every indexed object exists with its size and checksum, and nothing is unlisted."""
    node = store_node
    assert_consistent(node.data_dir, exact=True)
    assert "Traceback" not in node.log(), node.log()

