"""The per-association audit of DIMSE (pacs/dimse/audit.py) without a network: what an
association that ends midway, a requestor that goes away and a store that finishes after
an abort leave in the trail."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from pacs.core.audit import AuditLog, AuditTrail, Patient, Source
from pacs.core.query.model import InstanceRef
from pacs.dimse.audit import AssociationAudit, AuditedResponder, keys_of
from pacs.dimse.connection import Request, SubOperationCounts
from pacs.dimse.status import PENDING, SUCCESS, Status
from tests.auditcheck import event_name, patients_in, problems, read_trail, studies_in

CT = "1.2.840.10008.5.1.4.1.1.2"
GET = "1.2.840.10008.5.1.4.1.2.2.3"


def trail(tmp_path: Path) -> AuditTrail:
    return AuditTrail(AuditLog(tmp_path / "audit.jsonl"), Source("INTELPIXEL", "default"),
                      lambda uids: {uid: Patient("P-" + uid) for uid in uids})


def events(tmp_path: Path) -> list[dict[str, Any]]:
    found = read_trail(tmp_path / "audit.jsonl")
    assert all(problems(e) == [] for e in found)
    return found


def ref(study: str) -> InstanceRef:
    return InstanceRef(study, "1.9", "1.9.1", CT, "1.2.840.10008.1.2.1", "k", 1)


def request(message_id: int = 7, destination: str = "") -> Request:
    return Request(message_id, GET, "1.2.840.10008.1.2", b"\x08\x00\x52\x00", "SCU",
                   move_destination=destination)


def test_a_retrieve_cut_off_by_the_association_s_end_is_a_serious_failure(
        tmp_path: Path) -> None:
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.retrieve_requested(request(), get=True)
    audit.retrieve_began(7, [ref("1.1"), ref("1.1"), ref("1.2")])
    audit.close()
    audit.close()  # once
    begin_1, begin_2, ended_1, ended_2 = events(tmp_path)  # one of each per patient
    assert {event_name(begin_1), event_name(begin_2)} == {"Begin Transferring DICOM Instances"}
    assert [studies_in(e) for e in (ended_1, ended_2)] == [["1.1"], ["1.2"]]
    assert ended_1["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert ended_1["EventIdentification"]["EventOutcomeDescription"] == \
        "C-GET: the association ended before the final response"


def test_the_final_response_ends_a_retrieve_through_the_responder(tmp_path: Path) -> None:
    sent: list[Status] = []

    class Responder:
        alive = True

        def cancelled(self) -> bool:
            return False

        def send_response(self, status: Status, identifier: bytes | None = None,
                          counts: SubOperationCounts | None = None) -> None:
            sent.append(status)

    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.retrieve_requested(request(destination="NOWHERE"))
    audit.retrieve_began(7, [ref("1.1")])
    responder = AuditedResponder(Responder(), request(destination="NOWHERE"), audit)
    responder.send_response(PENDING, counts=SubOperationCounts(1, 0, 0, 0))
    responder.send_response(SUCCESS, counts=SubOperationCounts(None, 1, 0, 0))
    audit.close()
    assert sent == [PENDING, SUCCESS]
    begin, done = events(tmp_path)
    assert event_name(begin) == "Begin Transferring DICOM Instances"
    assert done["EventIdentification"]["EventOutcomeDescription"] == \
        "C-MOVE status 0000: 1 completed, 0 warning, 0 failed"
    assert done["ActiveParticipant"][1]["UserID"] == "NOWHERE"


def test_a_retrieve_whose_destination_cannot_be_reached_names_its_studies(
        tmp_path: Path) -> None:
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.retrieve_requested(request(destination="GONE"))
    audit.retrieve_unsent(7, [ref("1.1"), ref("1.1"), ref("1.2")])
    audit.retrieve_ended(7, 0xA702, (0, 0, 3))
    audit.close()
    found = events(tmp_path)  # one per patient, and no Begin Transferring
    assert [(event_name(e), studies_in(e), patients_in(e)) for e in found] == [
        ("DICOM Instances Transferred", ["1.1"], ["P-1.1"]),
        ("DICOM Instances Transferred", ["1.2"], ["P-1.2"])]
    assert {e["EventIdentification"]["EventOutcomeIndicator"] for e in found} == {8}


def test_a_query_whose_requestor_went_away_is_a_serious_failure(tmp_path: Path) -> None:
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.queried(request(), ["00080052"], None)
    (event,) = events(tmp_path)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert "went away" in event["EventIdentification"]["EventOutcomeDescription"]


def test_a_store_that_ends_after_the_association_is_written_alone(tmp_path: Path) -> None:
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.stored("1.1", CT, SUCCESS)
    audit.close()
    audit.stored("1.2", CT, SUCCESS)  # a store that was running when the peer aborted
    first, late = events(tmp_path)
    assert studies_in(first) == ["1.1"] and studies_in(late) == ["1.2"]
    assert late["EventIdentification"]["EventOutcomeDescription"] == "C-STORE status 0000"


def test_only_failed_stores_are_a_serious_failure_without_studies(tmp_path: Path) -> None:
    audit = AssociationAudit(trail(tmp_path), "", "127.0.0.1")
    audit.stored("", CT, Status(0xA700))
    audit.close()
    (event,) = events(tmp_path)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert studies_in(event) == []
    assert event["ActiveParticipant"][0]["UserID"] == "(none)"  # no calling AE title


def test_failures_beside_replacements_alone_are_a_minor_failure(tmp_path: Path) -> None:
    """Of three C-STOREs one replaced an object (U), one met it unchanged (R), one
    failed: the C event that counts the failure is 4 (some succeeded), not 8."""
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.stored("1.1", CT, SUCCESS, "U")
    audit.stored("1.1", CT, SUCCESS, "R")
    audit.stored("", CT, Status(0xA700))
    audit.close()
    found = {e["EventIdentification"]["EventActionCode"]:
             e["EventIdentification"]["EventOutcomeIndicator"] for e in events(tmp_path)}
    assert found == {"U": 0, "R": 0, "C": 4}


def test_stores_are_one_event_per_patient_the_instances_named(tmp_path: Path) -> None:
    # The index's patient of study 1.1 is P-1.1 (trail()): never the one named.
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.stored("1.1", CT, SUCCESS, patient=Patient("P1"))
    audit.stored("1.1", CT, SUCCESS, patient=Patient("P2", "HOSP"))
    audit.stored("1.1", CT, SUCCESS, patient=Patient("P1"))
    audit.stored("1.2", CT, SUCCESS, "R", Patient("P1"))
    audit.close()
    audit.stored("1.3", CT, SUCCESS, patient=Patient("P3"))  # after an abort
    found = events(tmp_path)
    assert [(e["EventIdentification"]["EventActionCode"], studies_in(e), patients_in(e))
            for e in found] == [("C", ["1.1"], ["P1"]), ("C", ["1.1"], ["P2^^^HOSP"]),
                                ("R", ["1.2"], ["P1"]), ("C", ["1.3"], ["P3"])]
    counts = [e["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]
              for e in found[:2]]
    assert counts == [{"SOPClass": [{"UID": CT, "NumberOfInstances": 2}]},
                      {"SOPClass": [{"UID": CT, "NumberOfInstances": 1}]}]


def test_an_association_that_did_nothing_writes_nothing(tmp_path: Path) -> None:
    AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1").close()
    assert not (tmp_path / "audit.jsonl").exists()


def test_keys_are_tags_with_sequence_items() -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "SECRET^NAME"
    item = Dataset()
    item.CodeValue = "X"
    item.CodingSchemeDesignator = "Y"
    identifier.ProcedureCodeSequence = [item]
    identifier.ReferencedStudySequence = []
    assert keys_of(identifier) == ["00080052", "00081032.00080100", "00081032.00080102",
                                   "00081110", "00100010"]


def test_an_association_storing_one_study_for_long_keeps_counts_not_one_entry_per_store(
        tmp_path: Path) -> None:
    # A peer with the store right may send the same object again and again on one
    # association (an unchanged instance is stored again); what the audit keeps of it
    # until the association ends must not grow with the number of stores.
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    audit.stored("1.1", CT, SUCCESS, patient=Patient("P-1.1"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            # Fresh strings and patients per store, as each request's data set gives them.
            audit.stored("".join(("1.", "1")), "".join((CT[:4], CT[4:])), SUCCESS,
                         patient=Patient("".join(("P-1", ".1"))))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    audit.stored("1.2", CT, SUCCESS, patient=Patient("P-1.2"))
    audit.stored("", CT, Status(0xA700))
    audit.close()
    assert grown < 64 * 1024  # one entry per store: > 1 MiB
    found = events(tmp_path)  # one event per patient: each study is its own here
    assert [studies_in(e) for e in found] == [["1.1"], ["1.2"]]
    counts = [item["ParticipantObjectDescription"]["SOPClass"]
              for event in found
              for item in event["ParticipantObjectIdentification"]
              if "ParticipantObjectDescription" in item]
    assert counts == [[{"UID": CT, "NumberOfInstances": 20_001}],
                      [{"UID": CT, "NumberOfInstances": 1}]]
    assert {e["EventIdentification"]["EventOutcomeDescription"] for e in found} == \
        {"C-STORE: 20002 stored, 1 failed"}


def test_an_association_storing_many_studies_writes_an_event_per_thousand(
        tmp_path: Path) -> None:
    # However many studies one association sends (a whole archive by one dcmsend), what
    # it keeps for the trail, and each of its events, stay bounded; the patients are
    # those the instances named, never looked up in the index.
    looked_up: list[int] = []

    def patients(uids: Any) -> dict[str, Patient]:
        looked_up.append(len(uids))
        return {uid: Patient("INDEX") for uid in uids}

    path = tmp_path / "audit.jsonl"
    audit = AssociationAudit(AuditTrail(AuditLog(path), Source("INTELPIXEL", "default"),
                                        patients), "SCU", "127.0.0.1")
    for number in range(2500):  # one patient: one event per write
        audit.stored(f"1.{number}", CT, SUCCESS, patient=Patient("P"))
    audit.stored("1.2499", CT, SUCCESS, patient=Patient("P"))  # counted: no new event
    audit.stored("", CT, Status(0xA700))
    audit.close()
    found = events(tmp_path)
    assert looked_up == []
    assert {p for e in found for p in patients_in(e)} == {"P"}
    assert [len(studies_in(e)) for e in found] == [1000, 1000, 500]
    assert [s for e in found for s in studies_in(e)] == [f"1.{n}" for n in range(2500)]
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in found] == [
        "C-STORE: 1000 stored, 0 failed", "C-STORE: 1000 stored, 0 failed",
        "C-STORE: 501 stored, 1 failed"]


def test_an_event_that_cannot_be_made_never_reaches_the_c_store(
        tmp_path: Path, monkeypatch: Any) -> None:
    made = trail(tmp_path)

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug in the trail")

    monkeypatch.setattr(made, "received", broken)
    audit = AssociationAudit(made, "SCU", "127.0.0.1")
    for number in range(1001):  # the 1001st study writes the event of the others
        audit.stored(f"1.{number}", CT, SUCCESS)
    with pytest.raises(RuntimeError):
        audit.close()  # at the association's end: Audits.ended keeps it from pynetdicom
    audit.stored("1.2", CT, SUCCESS)  # after an abort: its own event


def test_a_long_association_writes_its_stores_every_few_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed during a long association loses the record of its last
    STORES_PER_EVENT_SECONDS of stores at most: before, its stores were written only
    when it ended (or at a thousand studies), and a kill lost them all."""
    from pacs.core import audit as core_audit
    from pacs.dimse import audit as dimse_audit
    now = [100.0]
    monkeypatch.setattr(core_audit.time, "monotonic", lambda: now[0])
    audit = AssociationAudit(trail(tmp_path), "SCU", "127.0.0.1")
    for _ in range(3):
        audit.stored("1.1", CT, SUCCESS)
    assert events(tmp_path) == []
    now[0] += dimse_audit.STORES_PER_EVENT_SECONDS
    audit.stored("1.1", CT, SUCCESS)  # the fourth, in the first event
    audit.stored("1.2", CT, SUCCESS)
    [first] = events(tmp_path)
    assert first["EventIdentification"]["EventOutcomeDescription"] == \
        "C-STORE: 4 stored, 0 failed"
    audit.close()
    assert [e["EventIdentification"]["EventOutcomeDescription"]
            for e in events(tmp_path)] == ["C-STORE: 4 stored, 0 failed",
                                           "C-STORE: 1 stored, 0 failed"]
