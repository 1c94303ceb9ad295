"""The audit trail of DIMSE (pacs/dimse/audit.py) through the real pynetdicom stack, with
the seam and without it (``PACS_DIMSE_SEAM=off pytest -m dimse``): C-STORE as one DICOM
Instances Transferred per association and patient, C-FIND as Query, C-MOVE and C-GET as
Begin Transferring then DICOM Instances Transferred, each checked against PS3.15 A.5 and
against what the peer did."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as StudyFind,
    StudyRootQueryRetrieveInformationModelGet as StudyGet,
    StudyRootQueryRetrieveInformationModelMove as StudyMove,
)

from pacs.core import config
from pacs.core.services import Services
from pacs.dimse.server import REJECTIONS_LOGGED, start, stop
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
from tests.conftest import free_port
from tests.factory import make_instance
from tests.interop.conftest import run_dcmtk
from tests.service.test_retrieve import Destination, start_destination

pytestmark = pytest.mark.dimse

NODE = "INTELPIXEL"
SCU = "AUDITSCU"


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = start_destination("DEST")
    yield dest
    dest.stop()


@pytest.fixture
def node(make_services: Callable[..., Services], destination: Destination
         ) -> Iterator[tuple[Services, int]]:
    table = f"DEST=127.0.0.1:{destination.port}"
    services = make_services(modalities=table, destinations=config.parse_modalities(table),
                             duplicate_policy="reject")
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    yield services, port
    stop(server, drain=1.0)


def trail(services: Services, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The trail once it holds ``count`` events (written by the node's threads), each
    checked against PS3.15 A.5; fails when it holds more."""
    path = services.settings.data_dir / "audit.jsonl"
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = read_trail(path) if path.exists() else []
        if len(events) >= count:
            break
        time.sleep(0.02)
    time.sleep(0.2)  # nothing more should come
    events = read_trail(path) if path.exists() else []
    assert len(events) == count, [event_name(e) for e in events]
    for event in events:
        assert problems(event) == [], event
    return events


def associate(port: int, *contexts: str, get: bool = False) -> Any:
    ae = AE(ae_title=SCU)
    for context in contexts:  # one syntax: the identifiers' is known
        ae.add_requested_context(context, [ImplicitVRLittleEndian])
    roles = None
    if get:
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    assert assoc.is_established
    return assoc


def dataset(data: bytes) -> Dataset:
    return pydicom.dcmread(DicomBytesIO(data))


def load(services: Services, study: str, patient: str, count: int = 2) -> None:
    for _ in range(count):
        services.ingest.store_bytes(make_instance(StudyInstanceUID=study, PatientID=patient),
                                    calling_ae="TEST")


def query(level: str, **keys: Any) -> Dataset:
    found = Dataset()
    found.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(found, keyword, value)
    return found


def test_c_stores_of_an_association_are_one_event_per_patient(
        node: tuple[Services, int]) -> None:
    services, port = node
    first, second = generate_uid(), generate_uid()
    sent = [make_instance(StudyInstanceUID=first, PatientID="PA"),
            make_instance(StudyInstanceUID=first, PatientID="PA"),
            make_instance(StudyInstanceUID=second, PatientID="PB")]
    refused = dataset(sent[0])
    refused.PatientName = "CHANGED^CONTENT"  # a different object under a stored UID
    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    statuses = [assoc.send_c_store(dataset(data)).Status for data in sent]
    statuses.append(assoc.send_c_store(refused).Status)
    assoc.release()
    assert statuses == [0x0000, 0x0000, 0x0000, 0x0111]
    events = trail(services, 2)
    assert [(studies_in(e), patients_in(e)) for e in events] == [
        ([first], ["PA"]), ([second], ["PB"])]
    for event in events:
        assert event_name(event) == "DICOM Instances Transferred"
        identification = event["EventIdentification"]
        assert identification["EventActionCode"] == "C"
        assert identification["EventOutcomeIndicator"] == 4  # one of the four failed
        assert identification["EventOutcomeDescription"] == "C-STORE: 3 stored, 1 failed"
        sender, receiver = event["ActiveParticipant"]
        assert sender == {"UserID": SCU, "UserIsRequestor": True,
                          "RoleIDCode": sender["RoleIDCode"],
                          "NetworkAccessPointTypeCode": 2,
                          "NetworkAccessPointID": "127.0.0.1"}
        assert sender["RoleIDCode"]["csd-code"] == "110153"
        assert receiver["UserID"] == NODE and receiver["RoleIDCode"]["csd-code"] == "110152"
    assert events[0]["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"] \
        == {"SOPClass": [{"UID": CTImageStorage, "NumberOfInstances": 2}]}


def test_c_stores_of_two_patients_in_one_study_name_each_patient(
        node: tuple[Services, int]) -> None:
    """One study holding instances of two Patient IDs: the index keeps one patient per
    study (the last stored), yet each event names the patient whose instances it
    counts, so that the trail finds the first patient's too."""
    services, port = node
    study = generate_uid()
    sent = [make_instance(StudyInstanceUID=study, PatientID="P1"),
            make_instance(StudyInstanceUID=study, PatientID="P2")]
    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    assert [assoc.send_c_store(dataset(data)).Status for data in sent] == [0, 0]
    assoc.release()
    events = trail(services, 2)
    assert [(studies_in(e), patients_in(e)) for e in events] == [
        ([study], ["P1"]), ([study], ["P2"])]
    for event in events:
        assert event["ParticipantObjectIdentification"][0][
            "ParticipantObjectDescription"] == {
            "SOPClass": [{"UID": CTImageStorage, "NumberOfInstances": 1}]}


def test_what_a_c_store_did_to_the_node_s_copy_is_its_event_s_action(
        make_services: Callable[..., Services]) -> None:
    """PS3.15 A.5.3.7: EventActionCode C when the node held no copy of the instance, U
    when the store replaced a different object under its UID (the ``overwrite``
    policy), R when it held the same object already: one event each, so that the
    trail tells a replacement from a first store."""
    services = make_services(duplicate_policy="overwrite")
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    try:
        first, other = make_instance(PatientID="PA"), make_instance(PatientID="PA")
        changed = dataset(first)
        changed.PatientName = "CHANGED^CONTENT"
        ae = AE(ae_title=SCU)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in (
            dataset(first), dataset(other), dataset(first), changed)]
        assoc.release()
    finally:
        stop(server, drain=1.0)
    assert statuses == [0x0000] * 4
    events = trail(services, 3)
    assert [(e["EventIdentification"]["EventActionCode"],
             e["EventIdentification"]["EventOutcomeDescription"]) for e in events] == [
        ("C", "C-STORE: 2 stored, 0 failed"), ("R", "C-STORE: 1 already held"),
        ("U", "C-STORE: 1 replaced a different object")]
    assert {event_name(e) for e in events} == {"DICOM Instances Transferred"}


def test_a_c_find_is_a_query_event_with_the_identifier(node: tuple[Services, int]) -> None:
    services, port = node
    load(services, generate_uid(), "PF")
    assoc = associate(port, StudyFind)
    identifier = query("STUDY", PatientName="DOE*", StudyInstanceUID="",
                       ProcedureCodeSequence=[Dataset()])
    identifier.ProcedureCodeSequence[0].CodeValue = ""
    answers = list(assoc.send_c_find(identifier, StudyFind))
    assoc.release()
    assert answers[-1][0].Status == 0x0000 and len(answers) == 2
    (event,) = trail(services, 1)
    assert event_name(event) == "Query"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert event["EventIdentification"]["EventOutcomeDescription"] == "C-FIND status 0000"
    assert requestor(event)["UserID"] == SCU
    assert event["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == StudyFind
    assert detail(event, "TransferSyntax") == ImplicitVRLittleEndian  # the context's
    assert detail(event, "QueryKeys") == "00080052\\00081032.00080100\\00100010\\0020000D"
    assert b"DOE*" in query_of(event)  # the identifier as received, as A.5.3.10 asks


def test_a_c_get_is_begin_transferring_then_transferred_to_the_requestor(
        node: tuple[Services, int]) -> None:
    services, port = node
    study = generate_uid()
    load(services, study, "PG", count=3)
    assoc = associate(port, StudyGet, get=True)
    responses = list(assoc.send_c_get(query("STUDY", StudyInstanceUID=study), StudyGet))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    begin, done = trail(services, 2)
    assert event_name(begin) == "Begin Transferring DICOM Instances"
    assert event_name(done) == "DICOM Instances Transferred"
    assert done["EventIdentification"]["EventActionCode"] == "R"
    assert done["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert done["EventIdentification"]["EventOutcomeDescription"] == \
        "C-GET status 0000: 3 completed, 0 warning, 0 failed"
    for event in (begin, done):
        assert studies_in(event) == [study] and patients_in(event) == ["PG"]
        sender, receiver = event["ActiveParticipant"]
        assert sender["UserID"] == NODE and not sender["UserIsRequestor"]
        assert receiver["UserID"] == SCU and receiver["UserIsRequestor"]
        assert receiver["RoleIDCode"]["csd-code"] == "110152"
    assert done["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"] == {
        "SOPClass": [{"UID": CTImageStorage, "NumberOfInstances": 3}]}


def test_a_c_move_names_the_destination_and_the_requestor(
        node: tuple[Services, int], destination: Destination) -> None:
    services, port = node
    study = generate_uid()
    load(services, study, "PM")
    assoc = associate(port, StudyMove)
    responses = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=study), "DEST",
                                       StudyMove))
    assoc.release()
    assert responses[-1][0].Status == 0x0000 and len(destination.received) == 2
    begin, done = trail(services, 2)
    for event in (begin, done):
        sender, receiver, other = event["ActiveParticipant"]
        assert sender["UserID"] == NODE and sender["RoleIDCode"]["csd-code"] == "110153"
        assert receiver == {"UserID": "DEST", "UserIsRequestor": False,
                            "RoleIDCode": receiver["RoleIDCode"],
                            "NetworkAccessPointTypeCode": 2,
                            "NetworkAccessPointID": "127.0.0.1"}
        assert other["UserID"] == SCU and other["UserIsRequestor"] and "RoleIDCode" not in other
        assert studies_in(event) == [study] and patients_in(event) == ["PM"]
    assert done["EventIdentification"]["EventOutcomeDescription"] == \
        "C-MOVE status 0000: 2 completed, 0 warning, 0 failed"


def test_a_c_move_to_an_unknown_destination_is_a_failure_without_studies(
        node: tuple[Services, int]) -> None:
    services, port = node
    load(services, generate_uid(), "PR")
    assoc = associate(port, StudyMove)
    responses = list(assoc.send_c_move(query("STUDY", PatientID="PR"), "NOWHERE", StudyMove))
    assoc.release()
    assert responses[-1][0].Status == 0xA801
    (event,) = trail(services, 1)
    assert event_name(event) == "DICOM Instances Transferred"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert event["EventIdentification"]["EventOutcomeDescription"].startswith(
        "C-MOVE status A801")
    assert event["ActiveParticipant"][1]["UserID"] == "NOWHERE"
    assert studies_in(event) == []


def test_a_c_move_to_an_unreachable_destination_names_the_studies_planned(
        make_services: Callable[..., Services]) -> None:
    """PS3.15 A.5.3.7: the failed transfer names what was to be sent, one event per
    patient; no Begin Transferring, since no sub-operation began."""
    table = f"GONE=127.0.0.1:{free_port()}"  # nothing listens there
    services = make_services(modalities=table, destinations=config.parse_modalities(table))
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    try:
        first, second = generate_uid(), generate_uid()
        load(services, first, "PU")
        load(services, second, "PV", count=1)
        assoc = associate(port, StudyMove)
        responses = list(assoc.send_c_move(query("STUDY", StudyInstanceUID=[first, second]),
                                           "GONE", StudyMove))
        assoc.release()
        assert responses[-1][0].Status == 0xA702
        events = trail(services, 2)
    finally:
        stop(server, drain=1.0)
    assert {event_name(e) for e in events} == {"DICOM Instances Transferred"}
    assert sorted((studies_in(e), patients_in(e)) for e in events) == sorted([
        ([first], ["PU"]), ([second], ["PV"])])
    for event in events:
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
        assert event["ActiveParticipant"][1]["UserID"] == "GONE"


def test_echo_and_retrieves_of_nothing_are_not_recorded(node: tuple[Services, int]) -> None:
    services, port = node
    assoc = associate(port, StudyGet, "1.2.840.10008.1.1", get=True)
    assert assoc.send_c_echo().Status == 0x0000
    responses = list(assoc.send_c_get(query("STUDY", StudyInstanceUID="1.2.3.404"),
                                      StudyGet))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    trail(services, 0)


def test_a_store_after_an_abort_is_still_recorded(node: tuple[Services, int]) -> None:
    services, port = node
    study = generate_uid()
    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.send_c_store(dataset(make_instance(StudyInstanceUID=study,
                                                    PatientID="PX"))).Status == 0
    assoc.abort()
    (event,) = trail(services, 1)
    assert studies_in(event) == [study] and patients_in(event) == ["PX"]
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 0


def test_refused_associations_are_audited_and_logged_once_per_interval(
        make_services: Callable[..., Services], caplog: pytest.LogCaptureFixture) -> None:
    # An AE that may do nothing can associate as fast as it connects: the trail gets
    # the first refusal's Security Alert and one record counting the others, and the
    # log the first few of an interval in full and a count of the rest, so a flood of
    # them fills neither disk.
    services = make_services(unknown_ae_rights=frozenset())
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    try:
        with caplog.at_level("WARNING", logger="pacs.dimse.server"):
            for _ in range(12):  # dcmtk: see test_exhaustion.py on pynetdicom's requestor
                result = run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", NODE,
                                   "127.0.0.1", str(port), timeout=30)
                assert "Association Rejected" in result.stdout, result.stdout
        services.audit.flush(everything=True)  # the refusals after the first are counted
        alerts = trail(services, 2)
    finally:
        stop(server, drain=1.0)
    assert {event_name(e) for e in alerts} == {"Security Alert"}
    assert "; 11 more refusal(s) of this kind from this source" in alerts[1][
        "EventIdentification"]["EventOutcomeDescription"]
    lines = [r.getMessage() for r in caplog.records if "Rejecting" in r.getMessage()]
    assert len(lines) == REJECTIONS_LOGGED, lines
    assert "STRANGER" in lines[0] and "not known" in lines[0]
