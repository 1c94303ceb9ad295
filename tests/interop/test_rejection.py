"""Rejection and deletion against ``pacs serve``, with real peers: dcmtk's storescu sends
a study and then an IOCM rejection note (a Key Object Selection built with pydicom), and
the rejected instances are gone from findscu's C-FIND, dicomweb-client's QIDO-RS and
WADO-RS (404), getscu's C-GET and movescu's C-MOVE (no sub-operation), while the note
stays findable and retrievable and the patient's other study is untouched; a rejected
instance sent again is refused.  ``pacs delete`` (dry run, then --yes), the DICOMweb
reject route as OHIF calls it and DELETE on gunicorn, refused while PACS_WEB_DELETE is
off; data retention with a period of seconds; a crash between the rows and the objects
of a removal, after which ``pacs fsck --repair`` deletes the objects instead of
bringing the instances back."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import generate_uid

from tests.auditcheck import event_name, problems, read_trail, studies_in
from tests.factory import make_rejection_note
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    answers_qido,
    dcmtk,
    fresh_ct,
    getscu_counts,
    run_dcmtk,
    start_storescp,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

STORESCP_AET = "REJSCP"
PATIENT_ID = "IOCM-PATIENT"


@dataclass
class Study:
    """A study written to files: its UID and, per series, its SOP Instance UIDs."""

    uid: str
    series: dict[str, list[str]]
    files: list[Path]
    template: FileDataset

    @property
    def sops(self) -> list[str]:
        return [sop for sops in self.series.values() for sop in sops]


def _study(folder: Path, series: int = 2, per_series: int = 2) -> Study:
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    found: dict[str, list[str]] = {}
    files = []
    template = fresh_ct()
    for number in range(series):
        series_uid = generate_uid()
        for _ in range(per_series):
            ds = fresh_ct(StudyInstanceUID=uid, SeriesInstanceUID=series_uid,
                          PatientID=PATIENT_ID, SeriesNumber=number + 1)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            found.setdefault(series_uid, []).append(ds.SOPInstanceUID)
            template = ds
    return Study(uid, found, files, template)


def _storescu(node: Node, *files: Path, verbosity: str = "-v"
              ) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("storescu", verbosity, "-aet", "MODALITY", "-aec", AE_TITLE,
                     "127.0.0.1", str(node.port), *map(str, files), timeout=120)


def _note(study: Study, series: list[str], folder: Path, code: str = "113001",
          meaning: str = "Rejected for Quality Reasons") -> tuple[Path, str]:
    """A rejection note for ``series`` of ``study``, of the study's patient, in a file."""
    references = [(study.uid, s, sop, str(study.template.SOPClassUID))
                  for s in series for sop in study.series[s]]
    data = make_rejection_note(references, code=code, meaning=meaning,
                               PatientID=PATIENT_ID,
                               PatientName=str(study.template.PatientName),
                               PatientBirthDate=study.template.get("PatientBirthDate", ""))
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    path = folder / f"note-{sop}.dcm"
    path.write_bytes(data)
    return path, sop


def _find(node: Node, folder: Path, level: str, **keys: str) -> list[Dataset]:
    """findscu (Study Root) at ``level``, the responses read back."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ["-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    result = run_dcmtk("findscu", "-S", "-aec", AE_TITLE, "-X", "-od", str(folder), *args,
                       "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stdout
    return [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def _image_uids(node: Node, folder: Path, study: str) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in
            _find(node, folder, "IMAGE", StudyInstanceUID=study, SOPInstanceUID="")}


@dataclass
class StoreSCP:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """dcmtk's storescp, the C-MOVE destination."""
    folder = tmp_path_factory.mktemp("rejscp")
    port, process = start_storescp(STORESCP_AET, folder)
    yield StoreSCP(port, folder, process)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], storescp: StoreSCP) -> Node:
    """A node with DICOMweb deletion on, and the storescp as C-MOVE destination."""
    for tool in ("findscu", "getscu", "movescu", "storescu"):
        dcmtk(tool)
    started = node_factory("reject", PACS_WEB_DELETE="true",
                           PACS_MODALITIES=f"{STORESCP_AET}=127.0.0.1:{storescp.port}")
    answers_qido(started)
    return started


def test_a_rejection_note_hides_the_instances_on_every_protocol(
        node: Node, storescp: StoreSCP, tmp_path: Path) -> None:
    study, other = _study(tmp_path / "a"), _study(tmp_path / "b", series=1)
    stored = _storescu(node, *study.files, *other.files)
    assert stored.returncode == 0, stored.stdout
    rejected_series, kept_series = list(study.series)
    rejected = set(study.series[rejected_series])
    note, note_sop = _note(study, [rejected_series], tmp_path)

    sent = _storescu(node, note)
    assert sent.returncode == 0 and "Success" in sent.stdout, sent.stdout + node.log()

    # C-FIND: the rejected instances are gone, the note is there, counts follow.
    assert _image_uids(node, tmp_path / "f1", study.uid) == \
        set(study.series[kept_series]) | {note_sop}
    assert _image_uids(node, tmp_path / "f2", other.uid) == set(other.sops)
    studies = _find(node, tmp_path / "f3", "STUDY", PatientID=PATIENT_ID,
                    StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    counts = {str(ds.StudyInstanceUID): int(ds.NumberOfStudyRelatedInstances)
              for ds in studies}
    assert counts[study.uid] == 3 and counts[other.uid] == 2
    # QIDO-RS and WADO-RS (dicomweb-client).
    client = DICOMwebClient(url=node.web_url())
    found = client.search_for_instances(study_instance_uid=study.uid)
    assert {row["00080018"]["Value"][0] for row in found} == \
        set(study.series[kept_series]) | {note_sop}
    for sop in rejected:
        with pytest.raises(requests.HTTPError) as refused:
            client.retrieve_instance(study.uid, rejected_series, sop)
        assert refused.value.response.status_code == 404
    kept = client.retrieve_instance(study.uid, kept_series, study.series[kept_series][0])
    assert kept.SOPInstanceUID == study.series[kept_series][0]
    # C-GET and C-MOVE of the rejected series: nothing to send.
    got = run_dcmtk("getscu", "-v", "-S", "-aec", AE_TITLE, "-od", str(tmp_path),
                    "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.uid}",
                    "-k", f"SeriesInstanceUID={rejected_series}", "127.0.0.1", str(node.port))
    assert got.returncode == 0, got.stdout
    assert "Received C-GET Response (Success)" in got.stdout, got.stdout
    assert getscu_counts(got.stdout) == (0, 0, 0, 0), got.stdout
    assert not list(tmp_path.glob("CT.*"))
    moved = run_dcmtk("movescu", "-v", "-S", "-aec", AE_TITLE, "-aem", STORESCP_AET,
                      "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.uid}",
                      "-k", f"SeriesInstanceUID={rejected_series}", "127.0.0.1",
                      str(node.port))
    assert moved.returncode == 0, moved.stdout
    assert "Received Final Move Response (Success)" in moved.stdout, moved.stdout
    assert not list(storescp.folder.iterdir())
    # The note itself is retrievable.
    (tmp_path / "n").mkdir()
    note_get = run_dcmtk("getscu", "-v", "-S", "-aec", AE_TITLE, "-od", str(tmp_path / "n"),
                         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study.uid}",
                         "-k", f"SOPInstanceUID={note_sop}", "127.0.0.1", str(node.port))
    assert getscu_counts(note_get.stdout)[1] == 1, note_get.stdout

    # Sent again, a rejected instance is refused (IHE RAD TF-2 4.66.4).
    again = _storescu(node, next(p for p in study.files if p.stem in rejected),
                      verbosity="-d")
    assert "0xa771" in again.stdout.lower(), again.stdout
    assert "IOCM rejection note" in again.stdout  # the Error Comment
    assert rejected.isdisjoint(node.index())

    events = [e for e in read_trail(node.data_dir / "audit.jsonl")
              if e["EventIdentification"]["EventActionCode"] == "D"]
    assert [problems(e) for e in events] == [[]]
    assert event_name(events[0]) == "DICOM Instances Accessed"
    assert studies_in(events[0]) == [study.uid]
    assert events[0]["ActiveParticipant"][0]["UserID"] == "MODALITY"
    for secret in (PATIENT_ID, study.uid):
        assert secret not in node.log()


def test_pacs_delete_dry_run_then_yes(node: Node, tmp_path: Path) -> None:
    study = _study(tmp_path / "c")
    assert _storescu(node, *study.files).returncode == 0
    node.wait_drained()  # the mover done: nothing changes but what the command does
    before = node.snapshot()

    dry = node.cli("delete", study.uid, f"{study.uid}/{next(iter(study.series))}")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "4 instance(s)" in dry.stdout and "dry run" in dry.stdout
    assert node.snapshot() == before

    done = node.cli("delete", "--yes", "--quiet", study.uid)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 4 instance(s)" in done.stdout
    assert set(study.sops).isdisjoint(node.index())
    assert not any(study.uid in key for key in node.objects())
    assert _find(node, tmp_path / "f", "STUDY", StudyInstanceUID=study.uid) == []
    missing = node.cli("delete", study.uid)
    assert missing.returncode == 1 and "not found" in missing.stdout
    # A deleted study sent again is stored again.
    assert _storescu(node, *study.files).returncode == 0
    assert set(study.sops) <= set(node.index())


def test_ohifs_reject_and_delete_over_dicomweb(node: Node, tmp_path: Path) -> None:
    study = _study(tmp_path / "d")
    assert _storescu(node, *study.files).returncode == 0
    first, second = list(study.series)
    base = node.web_url()

    # What OHIF's delete action sends (dcm4cheeReject): POST, no body, %5E.
    rejected = requests.post(f"{base}/dicom-web/studies/{study.uid}/series/{first}/reject/"
                             "113001%5EDCM", timeout=30)
    assert rejected.status_code == 200 and rejected.json() == {"count": 2}
    client = DICOMwebClient(url=f"{base}/dicom-web")
    found = client.search_for_instances(study_instance_uid=study.uid)
    assert {row["00080018"]["Value"][0] for row in found} == set(study.series[second])

    assert requests.delete(f"{base}/studies/{study.uid}", timeout=30).status_code == 204
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study.uid}) == []
    assert requests.delete(f"{base}/studies/{study.uid}", timeout=30).status_code == 404
    assert set(study.sops).isdisjoint(node.index())


def test_refused_while_off_and_retention(node_factory: Callable[..., Node],
                                         tmp_path: Path) -> None:
    """Deletion over DICOMweb is off by default; retention of ~1 s removes the study.

    The study is stored before retention is turned on: with a period this short, a
    pause between two instances of the send would expire the study in two parts (two
    removals, as the rule says for a study that receives an instance after expiring)."""
    aged = node_factory("retention")
    answers_qido(aged)
    study = _study(tmp_path / "e", series=1)
    refused = requests.delete(f"{aged.web_url()}/studies/{study.uid}", timeout=30)
    assert refused.status_code == 403 and "PACS_WEB_DELETE" in refused.text
    assert _storescu(aged, *study.files).returncode == 0
    aged.wait_drained()
    assert set(study.sops) <= set(aged.index())
    aged.terminate()
    aged.env.update(PACS_RETENTION_DAYS="0.00001", PACS_RETENTION_INTERVAL="0.5")
    aged.start()
    deadline = time.monotonic() + 60
    while set(study.sops) & set(aged.index()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(study.sops).isdisjoint(aged.index()), aged.log()
    # The rows go in one commit, the files after it: the removal ends with them.
    while aged.objects() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not aged.objects()
    events = [e for e in read_trail(aged.data_dir / "audit.jsonl")
              if event_name(e) == "DICOM Study Deleted"]
    assert [studies_in(e) for e in events] == [[study.uid]]
    assert events[0]["ActiveParticipant"][0]["UserID"] == AE_TITLE
    # The companion logs the run once it has ended (after the audit event).
    deadline = time.monotonic() + 10
    while ("data retention: 1 expired stud(ies) removed" not in aged.log()
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert "data retention: 1 expired stud(ies) removed" in aged.log()


#: Runs a removal in a process of its own that dies (as by kill -9) once the rows and
#: tombstones are committed, at the first object deletion.
CRASH = """
import os, sys
from pacs.core import audit, config
from pacs.core.deletion import Target, reference
from pacs.core.services import build
services = build(config.load())
def crash(key):
    os._exit(137)
services.store.backend.delete = crash  # the removal deletes objects from the backend
rows = services.deleter.plan([Target(sys.argv[1])])
services.deleter.remove([reference(r) for r in rows], audit.Participant("crash", True),
                        audit.APPLICATION_SERVER)
"""


def test_a_crash_between_rows_and_objects_never_brings_them_back(
        node: Node, tmp_path: Path) -> None:
    study = _study(tmp_path / "g")
    assert _storescu(node, *study.files).returncode == 0
    # The window is between the rows' commit and the objects' deletion from the store:
    # the objects must be there (moved out of the intake, whose copies go with the
    # rows), or there is nothing to outlive them.
    node.wait_drained()
    crashed = subprocess.run([sys.executable, "-c", CRASH, study.uid], cwd=node.root,
                             env=node.env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert crashed.returncode == 137, crashed.stderr
    assert set(study.sops).isdisjoint(node.index())
    left = [key for key in node.objects() if key.startswith(study.uid)]
    assert len(left) == 4  # the objects outlived their rows
    # The rows' removal was audited once committed, before the object deletions.
    events = [e for e in read_trail(node.data_dir / "audit.jsonl")
              if event_name(e) == "DICOM Study Deleted"
              and e["ActiveParticipant"][0]["UserID"] == "crash"]
    assert [studies_in(e) for e in events] == [[study.uid]]

    report = node.cli("fsck")
    assert report.returncode == 1 and report.stdout.count("removed ") == 4, report.stdout
    repaired = node.cli("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "objects of removed instances deleted: 4" in repaired.stdout
    assert not [key for key in node.objects() if key.startswith(study.uid)]
    assert set(study.sops).isdisjoint(node.index())
    assert _find(node, tmp_path / "f", "STUDY", StudyInstanceUID=study.uid) == []


def test_a_rejection_note_over_stow_rs(node: Node, tmp_path: Path) -> None:
    """The note through gunicorn's STOW-RS (analysed in a helper process): the same
    effect as over C-STORE; a rejected instance stored again gets 409 (A771)."""
    study = _study(tmp_path / "h")
    client = DICOMwebClient(url=node.web_url())
    client.store_instances([pydicom.dcmread(path) for path in study.files])
    first, second = list(study.series)
    note, note_sop = _note(study, [first], tmp_path, code="113038",
                           meaning="Incorrect Modality Worklist Entry")
    client.store_instances([pydicom.dcmread(note)])
    found = client.search_for_instances(study_instance_uid=study.uid)
    assert {row["00080018"]["Value"][0] for row in found} == \
        set(study.series[second]) | {note_sop}
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances([pydicom.dcmread(study.files[0])])
    assert refused.value.response.status_code == 409
    failed = refused.value.response.json()["00081198"]["Value"][0]  # Failed SOP Sequence
    assert failed["00081197"]["Value"] == [0xA771]  # Failure Reason
