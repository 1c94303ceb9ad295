"""The audit trail of DICOMweb (adapters/http/audit.py) through falcon's test client over
real services: one PS3.15 A.5 event per request that touches patient data, with who,
what, when and the outcome; nothing for requests that touch none; a trail that cannot
be written never stops an answer."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from adapters.dicomweb.app import create_app
from adapters.dicomweb.multipart import encode
from adapters.http.audit import Touch, classify, outcome_of, query_keys
from pacs.core.services import Services
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
from tests.service.sample_studies import Archive, load

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
STOW = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
OTHER_HOST = "10.20.30.40"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def node(make_services: Callable[..., Services]) -> Services:
    return make_services(web_user="alice", web_password="s3cret", web_token="tok-123")


@pytest.fixture
def archive(node: Services) -> Archive:
    return load(node)


@pytest.fixture
def client(node: Services) -> testing.TestClient:
    return testing.TestClient(create_app(node))


def trail(services: Services) -> list[dict[str, Any]]:
    """Every event written so far, each checked against PS3.15 A.5."""
    path = services.settings.data_dir / "audit.jsonl"
    events = read_trail(path) if path.exists() else []
    for event in events:
        assert problems(event) == [], event
    return events


def instance(study: str, patient_id: str) -> bytes:
    ds = dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_qido_search_is_a_query_event_with_the_keys_tags(
        client: testing.TestClient, node: Services, archive: Archive) -> None:
    result = client.simulate_get("/dicom-web/studies", params={
        "PatientName": "DOE*", "00080020": "2015", "limit": "5", "includefield": "all"})
    assert result.status_code == 200
    (event,) = trail(node)
    assert event_name(event) == "Query"
    identification = event["EventIdentification"]
    assert identification["EventActionCode"] == "E"
    assert identification["EventOutcomeIndicator"] == 0
    who = requestor(event)
    assert who["UserID"] == "loopback" and who["NetworkAccessPointID"] == "127.0.0.1"
    assert who["RoleIDCode"]["csd-code"] == "110153"
    assert detail(event, "QueryKeys") == "00100010\\00080020"
    query = query_of(event).decode()
    assert query.startswith("/dicom-web/studies?") and "PatientName=DOE" in query
    queried = event["ParticipantObjectIdentification"][0]
    assert queried["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.2.1"
    del queried["ParticipantObjectQuery"]
    assert "DOE" not in str(event)  # the value only in the query, as A.5.3.10 asks
    assert event["AuditSourceIdentification"]["AuditSourceID"] == "INTELPIXEL"


def test_a_head_is_audited_as_its_get(client: testing.TestClient, node: Services,
                                      archive: Archive) -> None:
    """A HEAD runs the GET's query and tells its status and length: recorded alike."""
    assert client.simulate_head("/dicom-web/studies",
                                params={"PatientName": "DOE*"}).status_code == 200
    (event,) = trail(node)
    assert event_name(event) == "Query"
    assert detail(event, "QueryKeys") == "00100010"


def test_a_study_scoped_search_names_the_study_key(
        client: testing.TestClient, node: Services, archive: Archive) -> None:
    study = archive["chest"].uid
    assert client.simulate_get(f"/studies/{study}/series",
                               params={"Modality": "CT"}).status_code == 200
    (event,) = trail(node)
    assert detail(event, "QueryKeys") == "0020000D\\00080060"
    assert query_of(event).decode() == f"/studies/{study}/series?Modality=CT"


def test_wado_instances_are_transferred_to_the_client_with_the_patient(
        client: testing.TestClient, node: Services, archive: Archive) -> None:
    chest = archive["chest"]
    series = chest.series[0]
    result = client.simulate_get(
        f"/studies/{chest.uid}/series/{series.uid}/instances/{series.instances[0]}",
        headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert result.status_code == 200
    (event,) = trail(node)
    assert event_name(event) == "DICOM Instances Transferred"
    assert event["EventIdentification"]["EventActionCode"] == "R"
    sender, receiver = event["ActiveParticipant"]
    assert sender["UserID"] == "INTELPIXEL" and not sender["UserIsRequestor"]
    assert sender["RoleIDCode"]["csd-code"] == "110153"
    assert receiver["UserID"] == "loopback" and receiver["UserIsRequestor"]
    assert receiver["RoleIDCode"]["csd-code"] == "110152"
    assert studies_in(event) == [chest.uid]
    assert patients_in(event) == ["P1"]


@pytest.mark.parametrize("suffix", ["/metadata", "/series/{series}/metadata",
                                    "/series/{series}/instances/{sop}/frames/1",
                                    "/series/{series}/instances/{sop}/rendered",
                                    "/thumbnail"])
def test_metadata_frames_and_rendered_views_are_instances_accessed(
        client: testing.TestClient, node: Services, archive: Archive, suffix: str) -> None:
    chest = archive["chest"]
    series = chest.series[0]
    path = f"/studies/{chest.uid}" + suffix.format(series=series.uid,
                                                   sop=series.instances[0])
    result = client.simulate_get(path, headers={"Accept": "*/*"})
    assert result.status_code == 200, result.text
    (event,) = trail(node)
    assert event_name(event) == "DICOM Instances Accessed"
    assert event["EventIdentification"]["EventActionCode"] == "R"
    assert studies_in(event) == [chest.uid] and patients_in(event) == ["P1"]
    assert [p["UserID"] for p in event["ActiveParticipant"]] == ["loopback", "INTELPIXEL"]


def test_an_unknown_study_is_a_minor_failure_naming_it(
        client: testing.TestClient, node: Services) -> None:
    result = client.simulate_get("/studies/1.2.3.999/metadata")
    assert result.status_code == 404
    (event,) = trail(node)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert event["EventIdentification"]["EventOutcomeDescription"] == "HTTP 404"
    assert studies_in(event) == ["1.2.3.999"] and patients_in(event) == []


def test_stow_is_one_event_per_patient_with_its_studies_and_counts(
        client: testing.TestClient, node: Services) -> None:
    first, second = generate_uid(), generate_uid()
    parts = [instance(first, "PA"), instance(first, "PA"), instance(second, "PB")]
    payload = b"".join(encode((({"Content-Type": "application/dicom"}, p) for p in parts),
                              BOUNDARY))
    result = client.simulate_post("/studies", body=payload, headers={
        "Content-Type": STOW, "Authorization": basic("alice", "s3cret")})
    assert result.status_code == 200
    events = trail(node)
    assert [event_name(e) for e in events] == ["DICOM Instances Transferred"] * 2
    assert [(studies_in(e), patients_in(e)) for e in events] == [
        ([first], ["PA"]), ([second], ["PB"])]
    for event in events:
        assert event["EventIdentification"]["EventActionCode"] == "C"
        sender, receiver = event["ActiveParticipant"]
        assert sender["UserID"] == "alice" and sender["UserIsRequestor"]
        assert sender["RoleIDCode"]["csd-code"] == "110153"
        assert receiver["UserID"] == "INTELPIXEL"
    description = events[0]["ParticipantObjectIdentification"][0][
        "ParticipantObjectDescription"]
    assert description == {"SOPClass": [{"UID": "1.2.840.10008.5.1.4.1.1.2",
                                         "NumberOfInstances": 2}]}


def test_stow_of_two_patients_in_one_study_names_each_patient(
        client: testing.TestClient, node: Services) -> None:
    """The index keeps one patient per study (the last stored): each event names the
    patient of the instances it counts, not the index's."""
    study = generate_uid()
    parts = [instance(study, "P1"), instance(study, "P2")]
    payload = b"".join(encode((({"Content-Type": "application/dicom"}, p) for p in parts),
                              BOUNDARY))
    result = client.simulate_post("/studies", body=payload, headers={"Content-Type": STOW})
    assert result.status_code == 200
    assert [(studies_in(e), patients_in(e)) for e in trail(node)] == [
        ([study], ["P1"]), ([study], ["P2"])]


def test_stow_with_a_failed_part_is_a_minor_failure(
        client: testing.TestClient, node: Services) -> None:
    study = generate_uid()
    payload = b"".join(encode(((({"Content-Type": "application/dicom"}, p)
                                for p in (instance(study, "PA"), b"not dicom"))), BOUNDARY))
    result = client.simulate_post("/studies", body=payload, headers={"Content-Type": STOW})
    assert result.status_code == 202
    (event,) = trail(node)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert studies_in(event) == [study]


@pytest.mark.parametrize("every_part, status", [("of another study", 409),
                                                 ("unreadable", 400)])
def test_stow_whose_every_part_failed_is_a_serious_failure(
        client: testing.TestClient, node: Services, every_part: str, status: int) -> None:
    """Nothing stored (409, or 400 when no part could be read) is a serious failure
    (8), as a C-STORE association whose every store failed; some stored (202) stays a
    minor one."""
    study = generate_uid()
    part = (instance(generate_uid(), "PA") if every_part == "of another study"
            else b"not dicom")
    payload = b"".join(encode(((({"Content-Type": "application/dicom"}, part),)),
                              BOUNDARY))
    result = client.simulate_post(f"/studies/{study}", body=payload,
                                  headers={"Content-Type": STOW})
    assert result.status_code == status
    (event,) = trail(node)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert event["EventIdentification"]["EventOutcomeDescription"] == f"HTTP {status}"


@pytest.mark.parametrize("headers, protocol, user", [
    ({"Authorization": basic("alice", "s3cret")}, "https", "alice"),
    ({"Authorization": "Bearer tok-123"}, "https", "token"),
])
def test_credentials_name_the_user(client: testing.TestClient, node: Services,
                                   headers: dict[str, str], protocol: str, user: str) -> None:
    result = client.simulate_get("/studies", remote_addr=OTHER_HOST, headers=headers,
                                 protocol=protocol)
    assert result.status_code == 200
    (event,) = trail(node)
    assert requestor(event)["UserID"] == user
    assert requestor(event)["NetworkAccessPointID"] == OTHER_HOST


@pytest.mark.parametrize("headers, protocol, status, user", [
    ({}, "http", 403, "anonymous"),
    ({"Authorization": basic("mallory", "guess")}, "http", 403, "mallory"),
    ({"Authorization": basic("alice", "wrong")}, "https", 401, "alice"),
])
def test_refused_requests_are_recorded_as_serious_failures(
        client: testing.TestClient, node: Services, headers: dict[str, str], protocol: str,
        status: int, user: str) -> None:
    result = client.simulate_get("/studies/1.2.3/metadata", remote_addr=OTHER_HOST,
                                 headers=headers, protocol=protocol)
    assert result.status_code == status
    events = trail(node)
    logins = [e for e in events if event_name(e) == "User Authentication"]
    (event,) = [e for e in events if e not in logins]
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert event["EventIdentification"]["EventOutcomeDescription"] == f"HTTP {status}"
    assert requestor(event)["UserID"] == user  # as claimed: never checked over plain HTTP
    assert studies_in(event) == ["1.2.3"]
    # Credentials checked and wrong: a failed login (PS3.15 A.5.3.12); over plain HTTP
    # they are never checked, so no login was attempted.
    assert [(requestor(e)["UserID"], requestor(e)["NetworkAccessPointID"],
             e["EventIdentification"]["EventOutcomeIndicator"]) for e in logins] == (
        [(user, OTHER_HOST, 4)] if status == 401 else [])


def test_requests_without_patient_data_are_not_recorded(
        client: testing.TestClient, node: Services) -> None:
    assert client.simulate_get("/health").status_code == 200
    client.simulate_options("/studies", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"})
    client.simulate_head("/health")
    client.simulate_get("/no-such-route")
    assert trail(node) == []


def test_an_unwritable_trail_never_stops_an_answer(
        make_services: Callable[..., Services], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the trail's folder should be")
    services = make_services(audit_log=str(blocker / "audit.jsonl"))
    load(services)
    client = testing.TestClient(create_app(services))
    result = client.simulate_get("/studies", params={"PatientID": "P1"})
    assert result.status_code == 200 and len(result.json) == 2
    assert services.audit.log.dropped == 1


def test_the_trail_can_be_turned_off(make_services: Callable[..., Services]) -> None:
    services = make_services(audit_log="off")
    client = testing.TestClient(create_app(services))
    assert client.simulate_get("/studies").status_code == 200
    assert not (services.settings.data_dir / "audit.jsonl").exists()


@pytest.mark.parametrize("method, path, touch", [
    ("GET", "/studies", Touch("query")),
    ("GET", "/dicom-web/series/", Touch("query")),
    ("GET", "/studies/1.2/series/1.3/instances", Touch("query", "1.2", "1.3")),
    ("GET", "/studies/1.2", Touch("retrieve", "1.2")),
    ("GET", "/studies/1.2/series/1.3/instances/1.4", Touch("retrieve", "1.2", "1.3")),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/frames/1,2", Touch("access", "1.2", "1.3")),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/bulkdata/7FE00010",
     Touch("access", "1.2", "1.3")),
    ("GET", "/studies/1.2/rendered", Touch("access", "1.2")),
    ("POST", "/dicom-web/studies", Touch("store")),
    ("POST", "/studies/1.2", Touch("store", "1.2")),
    ("DELETE", "/studies/1.2", Touch("remove", "1.2")),
    ("DELETE", "/dicom-web/studies/1.2/series/1.3", Touch("remove", "1.2", "1.3")),
    ("POST", "/studies/1.2/series/1.3/instances/1.4/reject/113001^DCM",
     Touch("remove", "1.2", "1.3")),
    ("DELETE", "/studies", None), ("DELETE", "/studies/1.2/series/1.3/instances/1.4", None),
    ("HEAD", "/studies", Touch("query")),  # a HEAD runs the GET
    ("HEAD", "/studies/1.2/series/1.3/instances/1.4/metadata",
     Touch("access", "1.2", "1.3")),
    ("GET", "/health", None), ("HEAD", "/health", None),
    ("GET", "/", None), ("GET", "/series/1.2", None), ("POST", "/studies/1.2/series", None),
])
def test_requests_are_classified_by_path(method: str, path: str, touch: Touch | None) -> None:
    assert classify(method, path) == touch


@pytest.mark.parametrize("status, outcome", [
    (200, 0), (206, 0), (202, 4), (400, 4), (404, 4), (406, 4), (409, 8), (413, 4),
    (401, 8), (403, 8), (421, 8), (429, 8), (500, 8), (503, 12)])
def test_http_statuses_become_outcome_indicators(status: int, outcome: int) -> None:
    assert outcome_of(status) == outcome


def test_query_keys_are_tags() -> None:
    keys = query_keys(["PatientName", "00100020", "limit", "ProcedureCodeSequence.CodeValue",
                       "NotAKeyword", "includefield", "patientname"], Touch("query", "1.2"))
    assert keys == ["0020000D", "00100010", "00100020", "00081032.00080100", "NotAKeyword",
                    "patientname"]
