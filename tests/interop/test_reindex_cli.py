"""``pacs reindex`` as a command: refused beside a running node; on a stopped node whose
index is lost (which ``pacs serve`` refuses to start on), it rebuilds the index from
the objects, and the node started again answers ``findscu`` as before."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.factory import make_instance
from tests.interop.conftest import AE_TITLE, Node, index_counts, run_dcmtk
from tests.interop.test_find_dcmtk import Finder

pytestmark = pytest.mark.interop

ROOT = "1.2.826.0.1.3680043.8.498.55"
#: (Patient ID, name, study UID, series UIDs): two patients, three studies.
STUDIES = [
    ("RX1", "FIRST^PATIENT", f"{ROOT}.1", [f"{ROOT}.1.1", f"{ROOT}.1.2"]),
    ("RX1", "FIRST^PATIENT", f"{ROOT}.2", [f"{ROOT}.2.1"]),
    ("RX2", "SECOND^PATIENT", f"{ROOT}.3", [f"{ROOT}.3.1"]),
]
PER_SERIES = 3


def write_inputs(folder: Path) -> int:
    folder.mkdir(parents=True)
    count = 0
    for patient_id, name, study, series_uids in STUDIES:
        for series in series_uids:
            for number in range(1, PER_SERIES + 1):
                count += 1
                (folder / f"{count}.dcm").write_bytes(make_instance(
                    PatientID=patient_id, PatientName=name, StudyInstanceUID=study,
                    SeriesInstanceUID=series, SOPInstanceUID=f"{series}.{number}",
                    InstanceNumber=number, AccessionNumber=f"A{study[-1]}"))
    return count


def studies(find: Finder) -> list[Dataset]:
    return find("S", "STUDY", StudyInstanceUID="", PatientID="", PatientName="",
                AccessionNumber="", NumberOfStudyRelatedSeries="",
                NumberOfStudyRelatedInstances="", ModalitiesInStudy="")


def test_reindex_rebuilds_a_stopped_nodes_index_and_findscu_answers_from_it(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory("reindex")
    count = write_inputs(tmp_path / "send")
    sent = run_dcmtk("storescu", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(node.port),
                     str(tmp_path / "send"))
    assert sent.returncode == 0, sent.stdout
    find = Finder(node.port, AE_TITLE, tmp_path / "rsp")
    before = studies(find)
    assert len(before) == len(STUDIES)
    counts = index_counts(node.data_dir)

    # Beside the running node: refused, nothing changed.
    refused = node.cli("reindex", "--quiet")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "open in another process" in refused.stderr
    assert not list(node.data_dir.glob("index.sqlite.*"))

    # The node stops and its index is lost; the objects remain (a disk or a bucket).
    # What its intake still held would go with the index: the mover has moved all.
    node.wait_drained()
    node.terminate()
    for path in node.data_dir.glob("index.sqlite*"):
        path.unlink()
    # Started so, the node would make an empty index and answer every query with
    # nothing: it refuses, and says what rebuilds it.
    refused = node.cli("serve", timeout=60)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "'pacs reindex' builds the index" in refused.stderr
    assert not node.data_dir.joinpath("index.sqlite").exists()
    rebuilt = node.cli("reindex", "--quiet", "--json")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["objects"] == report["indexed"] == count
    assert report["skipped"] == [] and report["previous"] is None
    assert index_counts(node.data_dir) == counts

    node.start()
    after = studies(find)
    assert [ds.to_json_dict() for ds in after] == [ds.to_json_dict() for ds in before]
    series = find("S", "SERIES", StudyInstanceUID=STUDIES[0][2], SeriesInstanceUID="",
                  NumberOfSeriesRelatedInstances="")
    assert sorted(str(ds.SeriesInstanceUID) for ds in series) == sorted(STUDIES[0][3])
    assert {int(ds.NumberOfSeriesRelatedInstances) for ds in series} == {PER_SERIES}
