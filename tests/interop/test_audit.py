"""The audit trail of a real node (``pacs serve``): dicomweb-client's STOW-RS, QIDO-RS and
WADO-RS against gunicorn's workers, then the trail file read back and each event checked
against PS3.15 A.5 and against what was done (who, what, when, outcome, study UIDs, the
patient); the same for dcmtk's storescu, findscu, movescu and getscu against the DIMSE
workers; the application log, at the default level, holds none of the patient data the
trail holds."""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from pacs.core.audit import CHECK_SECONDS
from tests.auditcheck import (
    detail,
    event_name,
    patients_in,
    problems,
    query_of,
    read_trail,
    requestor,
    studies_in,
)
from tests.conftest import sample
from tests.interop.conftest import AE_TITLE, Node, answers_qido, run_dcmtk, start_storescp

pytestmark = pytest.mark.interop

PATIENT_NAME = "AUDITED^SECRETNAME"
PATIENT_ID = "AUDIT-ID-7731"


@pytest.fixture(scope="module")
def audited(node_factory: Callable[..., Node]) -> Node:
    """A node with two gunicorn workers and two DIMSE workers writing one trail."""
    node = node_factory("audit", PACS_WEB_WORKERS="2")
    answers_qido(node)
    return node


def trail_of(node: Node) -> list[dict[str, Any]]:
    events = read_trail(node.data_dir / "audit.jsonl")
    for event in events:
        assert problems(event) == [], event
    return events


def since(events: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    return [e for e in events if e["EventIdentification"]["EventDateTime"] >= start]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ct(study: str, series: str, number: int) -> FileDataset:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def test_dicomweb_client_stow_qido_wado_are_in_the_trail(audited: Node) -> None:
    client = DICOMwebClient(url=audited.web_url())
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, n) for n in (1, 2)]
    start = utc_now()
    client.store_instances(datasets)
    found = client.search_for_studies(search_filters={"PatientName": PATIENT_NAME})
    assert [r["0020000D"]["Value"][0] for r in found] == [study]
    retrieved = client.retrieve_study(study)
    assert len(retrieved) == 2
    client.retrieve_series_metadata(study, series)
    end = utc_now()

    events = since(trail_of(audited), start)
    assert [event_name(e) for e in events] == [
        "DICOM Instances Transferred", "Query", "DICOM Instances Transferred",
        "DICOM Instances Accessed"]
    stored, query, sent, accessed = events
    for event in events:
        assert start <= event["EventIdentification"]["EventDateTime"] <= end
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 0
        assert requestor(event)["UserID"] == "loopback"
        assert requestor(event)["NetworkAccessPointID"] == "127.0.0.1"
    for event in (stored, sent, accessed):
        assert studies_in(event) == [study] and patients_in(event) == [PATIENT_ID]
    assert stored["EventIdentification"]["EventActionCode"] == "C"
    assert stored["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"] == {
        "SOPClass": [{"UID": datasets[0].SOPClassUID, "NumberOfInstances": 2}]}
    assert sent["EventIdentification"]["EventActionCode"] == "R"
    assert sent["ActiveParticipant"][0]["UserID"] == "INTELPIXEL"  # the node sent them
    assert detail(query, "QueryKeys") == "00100010"
    assert PATIENT_NAME.split("^")[1] in query_of(query).decode()


def test_the_trail_is_protected_and_the_application_log_holds_no_patient_data(
        audited: Node) -> None:
    path = audited.data_dir / "audit.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    assert PATIENT_ID in path.read_text()  # the trail names the patient ...
    log = audited.log()
    assert "STOW-RS" in log  # (the log is the node's, at its default level)
    for secret in (PATIENT_ID, "SECRETNAME", "AUDITED"):
        assert secret not in log  # ... the application log never does


def test_concurrent_requests_to_every_worker_lose_no_event(audited: Node) -> None:
    url = f"{audited.web_url()}/studies"
    start = utc_now()
    count = 60

    def search(number: int) -> int:
        return requests.get(url, params={"StudyDescription": f"concurrent-{number}"},
                            timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(search, range(count))) == {200}
    queries = [e for e in since(trail_of(audited), start) if event_name(e) == "Query"]
    asked = sorted(query_of(e).decode() for e in queries)
    assert asked == sorted(f"/studies?StudyDescription=concurrent-{n}" for n in range(count))


def test_refused_and_failed_requests_are_recorded(audited: Node) -> None:
    start = utc_now()
    missing = requests.get(f"{audited.web_url()}/studies/1.2.3.4.5/metadata", timeout=30)
    assert missing.status_code == 404
    misdirected = requests.get(f"{audited.web_url()}/studies", timeout=30,
                               headers={"Host": "evil.example"})
    assert misdirected.status_code == 421
    events = since(trail_of(audited), start)
    assert [(event_name(e), e["EventIdentification"]["EventOutcomeIndicator"])
            for e in events] == [("DICOM Instances Accessed", 4), ("Query", 8)]
    assert studies_in(events[0]) == ["1.2.3.4.5"]


def test_a_rotated_trail_is_reopened_by_every_worker(audited: Node) -> None:
    path = audited.data_dir / "audit.jsonl"
    rotated = audited.data_dir / "audit.jsonl.1"
    requests.get(f"{audited.web_url()}/studies", timeout=30)
    path.rename(rotated)  # logrotate without copytruncate, and no signal
    # A writer looks at the path again at its first event a second after its last look.
    time.sleep(CHECK_SECONDS + 0.2)
    before = rotated.read_bytes()
    for _ in range(6):
        assert requests.get(f"{audited.web_url()}/studies", timeout=30).status_code == 200
    assert rotated.read_bytes() == before  # no worker writes to the old file any more
    assert path.stat().st_mode & 0o777 == 0o600
    assert [event_name(e) for e in trail_of(audited)] == ["Query"] * 6


def test_pacs_audit_lists_and_filters_the_trail(audited: Node) -> None:
    client = DICOMwebClient(url=audited.web_url())
    study = generate_uid()
    client.store_instances([ct(study, generate_uid(), 1)])
    listed = audited.cli("audit", "--study", study)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert "DICOM Instances Transferred [C] outcome=0" in line
    assert f"studies={study}" in line and f"patients={PATIENT_ID}" in line
    as_json = audited.cli("audit", "--patient", PATIENT_ID, "--format", "json")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events and all(PATIENT_ID in patients_in(e) for e in events)
    assert study in {uid for e in events for uid in studies_in(e)}
    xml = audited.cli("audit", "--study", study, "--format", "xml")
    assert xml.stdout.startswith("<AuditMessage><EventIdentification EventActionCode=\"C\"")
    nothing = audited.cli("audit", "--user", "NOBODY", "--since", "2000-01-01")
    assert nothing.returncode == 0 and nothing.stdout == ""


# --- DIMSE: dcmtk's storescu, findscu, movescu and getscu ----------------------------------

DIMSE_NAME = "AUDITED^DIMSEPATIENT"
DIMSE_ID = "DIMSE-AUDIT-5529"


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp as the C-MOVE destination DEST."""
    folder = tmp_path_factory.mktemp("dest")
    port, process = start_storescp("DEST", folder, log=folder / "storescp.log")
    try:
        yield port, folder
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def dimse_node(node_factory: Callable[..., Node], storescp: tuple[int, Path]) -> Node:
    return node_factory("audit-dimse", PACS_MODALITIES=f"DEST=127.0.0.1:{storescp[0]}")


def dimse_files(folder: Path) -> tuple[list[Path], str, str]:
    """Two studies of one patient: two instances, then one."""
    folder.mkdir()
    first, second = generate_uid(), generate_uid()
    paths = []
    for number, study in enumerate((first, first, second)):
        ds = ct(study, generate_uid(), number + 1)
        ds.PatientName, ds.PatientID = DIMSE_NAME, DIMSE_ID
        paths.append(folder / f"{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths, first, second


def dcmtk_ok(result: subprocess.CompletedProcess[str], node: Node) -> None:
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"


def wait_for_events(node: Node, start: str, count: int) -> list[dict[str, Any]]:
    """The events since ``start`` once there are ``count`` (a DIMSE worker writes an
    association's C-STORE event when the association has ended)."""
    deadline = time.monotonic() + 30
    while len(since(trail_of(node), start)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and no more come
    events = since(trail_of(node), start)
    assert len(events) == count, [event_name(e) for e in events]
    return events


@pytest.mark.dimse
def test_dcmtk_store_find_move_get_are_in_the_trail(dimse_node: Node, tmp_path: Path,
                                                    storescp: tuple[int, Path]) -> None:
    node, port = dimse_node, str(dimse_node.port)
    paths, first, second = dimse_files(tmp_path / "in")

    start = utc_now()
    dcmtk_ok(run_dcmtk("storescu", "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", port,
                       *map(str, paths)), node)
    (stored,) = wait_for_events(node, start, 1)
    assert event_name(stored) == "DICOM Instances Transferred"
    assert stored["EventIdentification"]["EventActionCode"] == "C"
    assert stored["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert requestor(stored)["UserID"] == "MODALITY"
    assert requestor(stored)["NetworkAccessPointID"] == "127.0.0.1"
    assert studies_in(stored) == [first, second] and patients_in(stored) == [DIMSE_ID]
    assert start <= stored["EventIdentification"]["EventDateTime"] <= utc_now()

    start = utc_now()
    dcmtk_ok(run_dcmtk("findscu", "-S", "-aet", "WORKSTATION", "-aec", AE_TITLE,
                       "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=AUDITED*",
                       "-k", "StudyInstanceUID", "127.0.0.1", port), node)
    (query,) = wait_for_events(node, start, 1)
    assert event_name(query) == "Query" and requestor(query)["UserID"] == "WORKSTATION"
    assert detail(query, "QueryKeys") == "00080052\\00100010\\0020000D"
    assert b"AUDITED*" in query_of(query)
    assert query["EventIdentification"]["EventOutcomeIndicator"] == 0

    start = utc_now()
    dcmtk_ok(run_dcmtk("movescu", "-S", "-aet", "WORKSTATION", "-aec", AE_TITLE, "-aem",
                       "DEST", "-k", "QueryRetrieveLevel=STUDY", "-k",
                       f"StudyInstanceUID={first}", "127.0.0.1", port, timeout=120), node)
    begin, moved = wait_for_events(node, start, 2)
    assert [event_name(begin), event_name(moved)] == [
        "Begin Transferring DICOM Instances", "DICOM Instances Transferred"]
    for event in (begin, moved):
        node_side, dest, asking = event["ActiveParticipant"]
        assert (node_side["UserID"], dest["UserID"], asking["UserID"]) == (
            AE_TITLE, "DEST", "WORKSTATION")
        assert asking["UserIsRequestor"] and dest["NetworkAccessPointID"] == "127.0.0.1"
        assert studies_in(event) == [first] and patients_in(event) == [DIMSE_ID]
    assert moved["EventIdentification"]["EventOutcomeDescription"] == \
        "C-MOVE status 0000: 2 completed, 0 warning, 0 failed"
    assert len(list(storescp[1].glob("CT.*"))) == 2

    start = utc_now()
    dcmtk_ok(run_dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", AE_TITLE, "-od",
                       str(tmp_path), "-k", "QueryRetrieveLevel=STUDY", "-k",
                       f"StudyInstanceUID={second}", "127.0.0.1", port, timeout=120), node)
    begin, got = wait_for_events(node, start, 2)
    assert event_name(got) == "DICOM Instances Transferred"
    assert [p["UserID"] for p in got["ActiveParticipant"]] == [AE_TITLE, "VIEWER"]
    assert studies_in(got) == [second] and got["EventIdentification"][
        "EventOutcomeIndicator"] == 0

    log = node.log()
    assert " listening on " in log  # the node's log, at its default level ...
    for secret in (DIMSE_ID, "DIMSEPATIENT", "AUDITED"):
        assert secret not in log  # ... names no patient; the trail does
