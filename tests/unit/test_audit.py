"""The audit trail's core (pacs.core.audit): the events against PS3.15 A.5, the writer's
guarantees (whole lines from concurrent processes, rotation, a full or unwritable file
that never stops the caller), the DICOM XML and syslog forms."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import multiprocessing
import os
import random
import resource
import signal
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacs.core import audit
from pacs.core.audit import AuditLog, AuditTrail, Participant, Patient, Source, Study
from pacs.core.services import Services
from tests.auditcheck import problems, read_trail
from tests.factory import make_instance

SOURCE = Source("INTELPIXEL", "default")
CLIENT = Participant("STORESCU", True, address="127.0.0.2")
NODE = Participant("INTELPIXEL", False, address="127.0.0.1")
STUDY = Study("1.2.3.4", {"1.2.840.10008.5.1.4.1.1.2": 3})
PATIENT = Patient("PID-1", "HOSP")
SECRET = "Secretname^Patient"
OPERATOR = Participant("alice", True, address="workstation")
MEDIA = audit.source_media("file:///srv/uploads")


def _query() -> dict[str, Any]:
    return audit.query_event(SOURCE, audit.APPLICATION_SERVER, CLIENT, NODE,
                             "1.2.840.10008.5.1.4.1.2.2.1", f"PatientName={SECRET}".encode(),
                             ["00100010", "00080020"], audit.SUCCESS,
                             transfer_syntax="1.2.840.10008.1.2.1")


EVENTS: dict[str, Callable[[], dict[str, Any]]] = {
    "query": _query,
    "stored": lambda: audit.transferred_event(
        SOURCE, audit.APPLICATION_SERVER, audit.CREATE, CLIENT, NODE, [STUDY], PATIENT,
        audit.SUCCESS),
    "moved": lambda: audit.transferred_event(
        SOURCE, audit.APPLICATION_SERVER, audit.READ, NODE,
        Participant("STORESCP", False, address="127.0.0.3"), [STUDY], PATIENT,
        audit.MINOR_FAILURE, "status 0xB000", others=[CLIENT]),
    "begin": lambda: audit.begin_transferring_event(
        SOURCE, audit.APPLICATION_SERVER, NODE, CLIENT, [STUDY], PATIENT),
    "accessed": lambda: audit.accessed_event(
        SOURCE, audit.WEB_SERVER, audit.READ, [CLIENT, NODE], [STUDY], None,
        audit.SERIOUS_FAILURE, "HTTP 404"),
    "alert": lambda: audit.security_alert_event(
        SOURCE, audit.APPLICATION_SERVER, audit.AUDIT_RECORDING_STARTED,
        Participant("INTELPIXEL", True),
        "3 audit event(s) could not be written", audit.MINOR_FAILURE),
    "login": lambda: audit.user_authentication_event(
        SOURCE, audit.WEB_SERVER, Participant("alice", True, address="192.0.2.9"),
        Participant("INTELPIXEL", False), audit.MINOR_FAILURE, "wrong credentials"),
    "import": lambda: audit.import_event(
        SOURCE, audit.APPLICATION_SERVER, [OPERATOR, NODE], MEDIA, [STUDY], PATIENT,
        audit.MINOR_FAILURE, "pacs import: 3 instance(s) imported (3 stored), 1 failed"),
    "log used": lambda: audit.audit_log_used_event(
        SOURCE, audit.APPLICATION_SERVER, OPERATOR, NODE, "file:///data/audit.jsonl",
        details={"patient": "PID-1"}),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_each_event_type_has_the_structure_of_ps3_15_a5(name: str) -> None:
    event = EVENTS[name]()
    assert problems(event) == []
    assert json.loads(audit.encode(event)) == event  # one JSON line, round trip


def test_field_names_and_codes_are_those_of_a5() -> None:
    event = EVENTS["moved"]()
    identification = event["EventIdentification"]
    assert identification["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                                         "originalText": "DICOM Instances Transferred"}
    assert identification["EventActionCode"] == "R"
    assert identification["EventOutcomeIndicator"] == 4
    assert identification["EventDateTime"].endswith("Z")
    sender, receiver, requestor = event["ActiveParticipant"]
    assert sender["RoleIDCode"]["csd-code"] == "110153" and not sender["UserIsRequestor"]
    assert receiver["RoleIDCode"]["csd-code"] == "110152" and receiver["UserID"] == "STORESCP"
    assert requestor == {"UserID": "STORESCU", "UserIsRequestor": True,
                         "NetworkAccessPointTypeCode": 2, "NetworkAccessPointID": "127.0.0.2"}
    assert event["AuditSourceIdentification"]["AuditSourceID"] == "INTELPIXEL"
    study, patient = event["ParticipantObjectIdentification"]
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["ParticipantObjectDescription"] == {
        "SOPClass": [{"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 3}]}
    assert patient["ParticipantObjectID"] == "PID-1^^^HOSP"
    assert patient["ParticipantObjectIDTypeCode"]["codeSystemName"] == "RFC-3881"


def test_a_query_carries_its_keys_tags_and_its_values_only_in_the_query_field() -> None:
    event = _query()
    queried = event["ParticipantObjectIdentification"][0]
    assert queried["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.2.1"
    assert base64.b64decode(queried["ParticipantObjectQuery"]).decode().endswith(SECRET)
    assert queried["ParticipantObjectDetail"] == [
        {"type": "TransferSyntax", "value": "1.2.840.10008.1.2.1"},
        {"type": "QueryKeys", "value": "00100010\\00080020"}]
    del queried["ParticipantObjectQuery"]
    assert "Secretname" not in json.dumps(event)


def test_a_query_longer_than_the_event_holds_is_cut_with_its_length() -> None:
    """An identifier of a MiB is not a line of 1.4 MB (nor, for a refusal, a first
    event of that size kept per source): its first MAX_AUDITED_QUERY bytes, its
    length, and every key searched by."""
    query = b"x" * (audit.MAX_AUDITED_QUERY * 16)
    event = audit.query_event(SOURCE, audit.APPLICATION_SERVER, CLIENT, NODE,
                              "1.2.840.10008.5.1.4.1.2.2.1", query, ["00100010"],
                              audit.SUCCESS)
    queried = event["ParticipantObjectIdentification"][0]
    assert base64.b64decode(queried["ParticipantObjectQuery"]) == \
        query[:audit.MAX_AUDITED_QUERY]
    assert queried["ParticipantObjectDetail"] == [
        {"type": "QueryKeys", "value": "00100010"},
        {"type": "QueryBytes", "value": str(len(query))}]
    assert len(json.dumps(event)) < 2 * audit.MAX_AUDITED_QUERY


def test_studies_are_counted_per_sop_class() -> None:
    studies = audit.studies_of([("1.1", "1.2.840.10008.5.1.4.1.1.2"), ("1.2", ""),
                                ("1.1", "1.2.840.10008.5.1.4.1.1.2"), ("1.1", "1.2.9")])
    assert studies == [Study("1.1", {"1.2.840.10008.5.1.4.1.1.2": 2, "1.2.9": 1}),
                       Study("1.2", {})]


@pytest.mark.parametrize("status, outcome", [
    (0x0000, 0), (0xB000, 4), (0x0001, 4), (0xFE00, 4), (0xA700, 8), (0xC000, 8),
    (0x0117, 8), (0xA801, 8)])
def test_dimse_statuses_become_outcome_indicators(status: int, outcome: int) -> None:
    assert audit.dimse_outcome(status) == outcome


def test_the_setting_names_the_file(tmp_path: Path) -> None:
    assert audit.audit_path("", tmp_path) == tmp_path / "audit.jsonl"
    assert audit.audit_path("off", tmp_path) is None
    assert audit.audit_path("OFF", tmp_path) is None
    assert audit.audit_path(str(tmp_path / "x.jsonl"), tmp_path) == tmp_path / "x.jsonl"


def test_off_writes_nothing(tmp_path: Path) -> None:
    trail = AuditTrail(AuditLog(None), SOURCE)
    trail.transferred(audit.APPLICATION_SERVER, audit.CREATE, CLIENT, NODE, [STUDY], 0)
    assert not trail.enabled and list(tmp_path.iterdir()) == []


def test_the_file_is_created_mode_0600_with_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "trail.jsonl"
    writer = AuditLog(path)
    assert writer.write(_query())
    writer.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [problems(e) for e in read_trail(path)] == [[]]


def test_events_are_written_per_patient(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    asked: list[list[str]] = []

    def lookup(uids: Any) -> dict[str, Patient]:
        asked.append(list(uids))
        return {"1.1": Patient("A"), "1.2": Patient("B"), "1.3": Patient("A")}

    trail = AuditTrail(AuditLog(path), SOURCE, lookup)
    studies = [Study("1.1"), Study("1.2"), Study("1.3"), Study("1.4")]
    trail.transferred(audit.WEB_SERVER, audit.CREATE, CLIENT, NODE, studies, 0)
    trail.close()
    events = read_trail(path)
    assert asked == [["1.1", "1.2", "1.3", "1.4"]]
    named = [([o["ParticipantObjectID"] for o in e["ParticipantObjectIdentification"]])
             for e in events]
    assert named == [["1.1", "1.3", "A"], ["1.2", "B"], ["1.4"]]  # unknown: no patient
    assert all(problems(e) == [] for e in events)


def test_a_failing_patient_lookup_leaves_the_patient_unknown(tmp_path: Path) -> None:
    def lookup(uids: Any) -> dict[str, Patient]:
        raise RuntimeError("index busy")

    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path), SOURCE, lookup)
    trail.accessed(audit.WEB_SERVER, audit.READ, [CLIENT], [STUDY], 0)
    trail.close()
    (event,) = read_trail(path)
    assert [o["ParticipantObjectID"] for o in event["ParticipantObjectIdentification"]] \
        == ["1.2.3.4"]


def test_a_failure_before_any_study_is_still_an_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path), SOURCE)
    trail.transferred(audit.WEB_SERVER, audit.CREATE, CLIENT, NODE, [], 8, "HTTP 400")
    trail.close()
    (event,) = read_trail(path)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert "ParticipantObjectIdentification" not in event


def test_an_import_names_its_importers_its_source_media_and_the_patient() -> None:
    """Data Import (PS3.15 A.5.3.5): EventID 110107 "Import", action C; the importers
    as Destination Role ID, the requestor first; the Source Media (110155) with its
    MediaType (CID 405), as a MediaIdentifier element in the DICOM XML too."""
    event = EVENTS["import"]()
    identification = event["EventIdentification"]
    assert identification["EventID"] == {"csd-code": "110107", "codeSystemName": "DCM",
                                         "originalText": "Import"}
    assert identification["EventActionCode"] == "C"
    operator, node, media = event["ActiveParticipant"]
    assert operator["UserIsRequestor"] and operator["UserID"] == "alice"
    assert operator["RoleIDCode"]["csd-code"] == node["RoleIDCode"]["csd-code"] == "110152"
    assert media == {"UserID": "file:///srv/uploads", "UserIsRequestor": False,
                     "RoleIDCode": audit.SOURCE_MEDIA.as_json(),
                     "MediaIdentifier": {"MediaType": {
                         "csd-code": "110037", "codeSystemName": "DCM",
                         "originalText": "URI"}}}
    study, patient = event["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == "1.2.3.4"
    assert patient["ParticipantObjectID"] == "PID-1^^^HOSP"
    root = ET.fromstring(audit.to_xml(event))
    media_type = root.find("ActiveParticipant/MediaIdentifier/MediaType")
    assert media_type is not None and media_type.get("csd-code") == "110037"
    mediated = root.findall("ActiveParticipant")[2]
    assert [child.tag for child in mediated] == ["RoleIDCode", "MediaIdentifier"]


def test_an_import_without_source_media_breaks_a5_3_5() -> None:
    """The check of the tests itself: an Import needs its one Source Media, typed."""
    event = EVENTS["import"]()
    del event["ActiveParticipant"][2]["MediaIdentifier"]
    assert problems(event) == ["A.5.3.5 Data Import: the Source Media's MediaType "
                               "(CID 405) expected (M)"]
    del event["ActiveParticipant"][2]
    assert problems(event) == ["A.5.3.5 Data Import: one Source Media participant expected"]


def test_the_audit_log_used_names_the_log_as_a_security_resource() -> None:
    """Audit Log Used (PS3.15 A.5.3.2): EventID 110101, action R; the reader (the
    requestor) and the node; one object: the log, type 2, role 13 (Security Resource),
    ID type 12 (URI), named "Security Audit Log"."""
    event = EVENTS["log used"]()
    identification = event["EventIdentification"]
    assert identification["EventID"]["csd-code"] == "110101"
    assert identification["EventActionCode"] == "R"
    reader, node = event["ActiveParticipant"]
    assert reader["UserID"] == "alice" and reader["UserIsRequestor"]
    assert not node["UserIsRequestor"]
    (log,) = event["ParticipantObjectIdentification"]
    assert log == {"ParticipantObjectID": "file:///data/audit.jsonl",
                   "ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 13,
                   "ParticipantObjectIDTypeCode": {"csd-code": "12",
                                                   "codeSystemName": "RFC-3881",
                                                   "originalText": "URI"},
                   "ParticipantObjectName": "Security Audit Log",
                   "ParticipantObjectDetail": [{"type": "patient", "value": "PID-1"}]}
    name = ET.fromstring(audit.to_xml(event)).find(
        "ParticipantObjectIdentification/ParticipantObjectName")
    assert name is not None and name.text == "Security Audit Log"


def _import_audit(path: Path, limit: int = audit.MAX_STUDIES_PER_IMPORT
                  ) -> tuple[AuditTrail, audit.ImportAudit]:
    trail = AuditTrail(AuditLog(path), SOURCE)
    return trail, audit.ImportAudit(trail, [OPERATOR, NODE], MEDIA, "pacs import", limit)


@pytest.mark.parametrize("stored, failed, outcome", [(2, 0, 0), (2, 1, 4), (0, 3, 8)])
def test_an_import_s_outcome_is_that_of_the_c_store_events(
        tmp_path: Path, stored: int, failed: int, outcome: int) -> None:
    """0 when every file was stored, 4 when some failed, 8 when all did (an event
    without studies then)."""
    path = tmp_path / "audit.jsonl"
    trail, record = _import_audit(path)
    for _ in range(stored):
        record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    record.failed(failed)
    record.write()
    trail.close()
    (event,) = read_trail(path)
    assert problems(event) == []
    assert event["EventIdentification"]["EventOutcomeIndicator"] == outcome
    assert event["EventIdentification"]["EventOutcomeDescription"] == (
        f"pacs import: {stored} instance(s) imported"
        + (f" ({stored} stored)" if stored else "") + f", {failed} failed")
    assert ("ParticipantObjectIdentification" in event) == bool(stored)


def test_an_import_is_one_event_per_patient_its_instances_named(tmp_path: Path) -> None:
    """As for C-STORE: a study whose instances name two patients is in an event for
    each, with its SOP classes counted; nothing is written for an import of nothing."""
    path = tmp_path / "audit.jsonl"
    trail, record = _import_audit(path)
    record.write()
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", Patient("A"))
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.4", Patient("A"), "unchanged")
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", Patient("B"), "replaced")
    record.stored("1.2", "1.2.840.10008.5.1.4.1.1.2", Patient("A"))
    record.write()
    record.write()
    trail.close()
    events = read_trail(path)
    assert all(problems(e) == [] for e in events)
    assert [(audit_patients(e), [o.get("ParticipantObjectDescription") for o in
                                 e["ParticipantObjectIdentification"][:-1]])
            for e in events] == [
        (["A"], [{"SOPClass": [{"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 1},
                               {"UID": "1.2.840.10008.5.1.4.1.1.4", "NumberOfInstances": 1}]},
                 {"SOPClass": [{"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 1}]}]),
        (["B"], [{"SOPClass": [{"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": 1}]}])]
    assert {e["EventIdentification"]["EventOutcomeDescription"] for e in events} == {
        "pacs import: 4 instance(s) imported (2 stored, 1 unchanged, 1 replaced), 0 failed"}


def audit_patients(event: dict[str, Any]) -> list[str]:
    return [o["ParticipantObjectID"] for o in event["ParticipantObjectIdentification"]
            if o["ParticipantObjectTypeCodeRole"] == 1]


def test_an_import_of_many_studies_is_written_as_it_goes(tmp_path: Path) -> None:
    """What an import counts is bounded: past ``limit`` studies, the events of those
    counted so far are written and counting starts again."""
    path = tmp_path / "audit.jsonl"
    trail, record = _import_audit(path, limit=2)
    for number in range(5):
        record.stored(f"1.{number}", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
        record.stored(f"1.{number}", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    assert [len(e["ParticipantObjectIdentification"]) for e in read_trail(path)] == [3, 3]
    record.write()
    trail.close()
    events = read_trail(path)
    assert [len(e["ParticipantObjectIdentification"]) for e in events] == [3, 3, 2]
    assert sum(int(e["EventIdentification"]["EventOutcomeDescription"].split()[2])
               for e in events) == 10


def test_a_long_import_is_written_every_few_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import still counting after ``SECONDS_PER_IMPORT_EVENT`` writes what it
    counted: killed later, it loses that many seconds of its record at most."""
    now = [1000.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    path = tmp_path / "audit.jsonl"
    trail, record = _import_audit(path)
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    now[0] += audit.SECONDS_PER_IMPORT_EVENT - 1
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    assert not path.exists()
    now[0] += 1
    record.failed()
    (event,) = read_trail(path)
    assert event["EventIdentification"]["EventOutcomeDescription"] == (
        "pacs import: 2 instance(s) imported (2 stored), 1 failed")
    record.stored("1.2", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    record.write()
    trail.close()
    assert len(read_trail(path)) == 2


def test_an_import_counts_nothing_while_the_trail_is_off() -> None:
    trail = AuditTrail(AuditLog(None), SOURCE)
    record = audit.ImportAudit(trail, [OPERATOR], MEDIA, "pacs import")
    record.stored("1.1", "1.2.840.10008.5.1.4.1.1.2", PATIENT)
    record.failed()
    assert not record._counts.stored and not record._counts.failed
    record.write()  # nothing, and no file


# --- the writer --------------------------------------------------------------------------

def _append_many(path: str, writer_number: int, count: int) -> None:
    """One process of the concurrency test: events of random sizes (up to ~60 KB, far
    past PIPE_BUF), each naming its writer and number."""
    rng = random.Random(writer_number)
    log = AuditLog(Path(path), sync_seconds=0.05)
    for number in range(count):
        event = EVENTS["stored"]()
        event["EventIdentification"]["EventOutcomeDescription"] = (
            f"{writer_number}:{number}:" + "x" * rng.choice((0, 10, 3000, 60_000)))
        assert log.write(event)
    log.close()


def test_concurrent_processes_never_interleave_or_lose_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers, count = 4, 150
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_many, args=(str(path), n, count))
                 for n in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    seen = set()
    for line in lines[:-1]:
        event = json.loads(line)  # every line whole
        writer, number, _ = event["EventIdentification"]["EventOutcomeDescription"].split(":")
        seen.add((int(writer), int(number)))
    assert len(lines) - 1 == writers * count
    assert seen == {(w, n) for w in range(writers) for n in range(count)}


def test_a_rotated_file_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditLog(path, check_seconds=0)
    assert writer.write(EVENTS["stored"]())
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's rename, then create
    assert writer.write(EVENTS["begin"]())
    assert writer.write(EVENTS["begin"]())
    (tmp_path / "audit.jsonl").unlink()  # removed outright
    assert writer.write(EVENTS["query"]())
    writer.close()
    assert len(read_trail(tmp_path / "audit.jsonl.1")) == 1
    assert [e["EventIdentification"]["EventID"]["csd-code"]
            for e in read_trail(path)] == ["110112"]


def test_copytruncate_rotation_keeps_appending_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditLog(path)
    writer.write(EVENTS["stored"]())
    os.truncate(path, 0)  # logrotate copytruncate
    writer.write(EVENTS["query"]())
    writer.close()
    assert len(read_trail(path)) == 1  # no hole of zero bytes before the line


class _SlowStart(threading.Thread):
    """A thread whose start takes a while: the window in which it exists, unstarted."""

    def start(self) -> None:
        time.sleep(0.3)
        super().start()


def test_closing_while_the_first_event_starts_the_sync_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit.threading, "Thread", _SlowStart)
    writer = AuditLog(tmp_path / "audit.jsonl", sync_seconds=0.05)
    first = threading.Thread(target=writer.write, args=(EVENTS["stored"](),))
    first.start()
    time.sleep(0.1)  # the sync thread exists and is starting
    writer.close()  # waits for it to start, then to end; never joins it unstarted
    first.join()
    assert writer._syncer is not None and not writer._syncer.is_alive()
    assert len(read_trail(tmp_path / "audit.jsonl")) == 1


def test_an_unwritable_trail_is_counted_logged_once_and_resumed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the trail's folder should be")
    path = blocker / "audit.jsonl"
    trail = AuditTrail(AuditLog(path), SOURCE)
    with caplog.at_level(logging.INFO, logger="pacs.core.audit"):
        for _ in range(3):
            trail.transferred(audit.WEB_SERVER, audit.CREATE, CLIENT, NODE, [STUDY], 0)
        assert trail.log.dropped == 3
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "cannot be written" in errors[0].getMessage()
        blocker.unlink()  # the operator fixes it
        trail.transferred(audit.WEB_SERVER, audit.CREATE, CLIENT, NODE, [STUDY], 0)
    trail.close()
    alert, event = read_trail(path)
    assert problems(alert) == [] and problems(event) == []
    assert alert["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110134"
    assert alert["EventIdentification"]["EventOutcomeDescription"].startswith(
        "3 audit event(s) could not be written since ")
    assert trail.log.dropped == 0
    assert any("writing again; 3 event(s)" in r.getMessage() for r in caplog.records)


def _fill_the_disk(path: str, limit: int, result: Any) -> None:
    """In a child: a file size limit stands for a full disk (writes past it are cut
    short, then fail with EFBIG); SIGXFSZ ignored as a full disk sends none."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    writer = AuditTrail(AuditLog(Path(path)), SOURCE).log  # the trail reports its gaps
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    outcomes = [writer.write(EVENTS["stored"]()) for _ in range(10)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    outcomes.append(writer.write(EVENTS["query"]()))  # space again
    writer.close()
    result.put((outcomes, writer.written))


def test_a_full_disk_cuts_a_line_drops_events_and_the_trail_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    line = len(audit.encode(EVENTS["stored"]()))
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_fill_the_disk, args=(str(path), line * 2 + line // 2,
                                                         result))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    outcomes, written = result.get(timeout=5)
    assert written == 3
    assert outcomes[:2] == [True, True] and not any(outcomes[2:10]) and outcomes[10]
    events = list(audit.read_events(path.read_bytes().splitlines()))
    # two whole events, the third cut short (unreadable), the gap's alert, the query
    assert [e is None for e in events] == [False, False, True, False, False]
    assert events[3] is not None and events[3]["EventIdentification"]["EventID"][
        "csd-code"] == "110113"
    assert events[3]["EventIdentification"]["EventOutcomeDescription"].startswith("8 audit")
    assert events[4] is not None and problems(events[4]) == []


# --- reading, XML, syslog ---------------------------------------------------------------

def test_dicom_xml_has_the_schema_s_attributes_and_elements() -> None:
    root = ET.fromstring(audit.to_xml(EVENTS["moved"]()))
    assert root.tag == "AuditMessage"
    identification = root.find("EventIdentification")
    assert identification is not None
    assert identification.get("EventActionCode") == "R"
    assert identification.get("EventOutcomeIndicator") == "4"
    event_id = identification.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    participants = root.findall("ActiveParticipant")
    assert [p.get("UserIsRequestor") for p in participants] == ["false", "false", "true"]
    role = participants[0].find("RoleIDCode")
    assert role is not None and role.get("csd-code") == "110153"
    objects = root.findall("ParticipantObjectIdentification")
    assert objects[0].get("ParticipantObjectID") == "1.2.3.4"
    sop_class = objects[0].find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "3"
    query = ET.fromstring(audit.to_xml(_query())).find(
        "ParticipantObjectIdentification/ParticipantObjectQuery")
    assert query is not None and base64.b64decode(query.text or "").endswith(SECRET.encode())


def test_syslog_messages_are_rfc_5424_with_the_xml_body() -> None:
    message = audit.syslog_message(EVENTS["stored"](), "pacs-host")
    header, _, body = message.partition(b"\xef\xbb\xbf")
    fields = header.decode().split(" ")
    assert fields[0] == "<85>1" and fields[2] == "pacs-host" and fields[5] == "IHE+RFC-3881"
    assert ET.fromstring(body.decode()).tag == "AuditMessage"
    assert audit.frame_octets(b"abc") == b"3 abc"
    failed = audit.syslog_message(EVENTS["accessed"](), "h")
    assert failed.startswith(b"<84>1 ")


def test_events_are_filtered_by_study_patient_and_user() -> None:
    event = EVENTS["moved"]()
    assert audit.matches(event, study="1.2.3.4", patient="PID-1", user="STORESCU")
    assert not audit.matches(event, study="9.9")
    assert not audit.matches(event, patient="PID")
    assert not audit.matches(event, user="OTHER")
    assert "DICOM Instances Transferred [R] outcome=4" in audit.summary(event)


def test_a_trail_shared_by_customers_is_read_one_customer_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two customers writing one PACS_AUDIT_LOG: ``pacs audit --customer`` lists, and
    would ship, only the events of the customer it names (their AuditEnterpriseSiteID),
    whatever the other filters."""
    from click.testing import CliRunner

    from pacs.cli import main

    shared = tmp_path / "shared-audit.jsonl"
    log = AuditLog(shared)
    for site, patient in (("alpha", "PID-ALPHA"), ("bravo", "PID-BRAVO")):
        assert log.write(audit.transferred_event(
            Source("NODE", site), audit.APPLICATION_SERVER, audit.CREATE, CLIENT, NODE,
            [STUDY], Patient(patient, "HOSP"), audit.SUCCESS))
    log.close()
    customers = tmp_path / "customers.toml"
    customers.write_text('[[customer]]\nname = "alpha"\nae_titles = "ALPHA"\n'
                         '[[customer]]\nname = "bravo"\nae_titles = "BRAVO"\n',
                         encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for name, value in (("PACS_DATA_DIR", tmp_path / "data"),
                        ("PACS_CUSTOMERS_FILE", customers), ("PACS_AUDIT_LOG", shared)):
        monkeypatch.setenv(name, str(value))
    runner = CliRunner()

    def listed(*options: str) -> list[str]:
        result = runner.invoke(main, ["audit", *options])
        assert result.exit_code == 0, result.output
        return result.output.splitlines()

    (alpha,) = listed("--customer", "alpha")
    assert "PID-ALPHA" in alpha
    (bravo,) = listed("--customer", "bravo", "--format", "json")
    assert json.loads(bravo)["AuditSourceIdentification"]["AuditEnterpriseSiteID"] == "bravo"
    assert listed("--customer", "alpha", "--patient", "PID-BRAVO") == []
    assert not audit.matches(EVENTS["stored"](), site="alpha")
    assert not audit.matches({"AuditSourceIdentification": ["default"]}, site="default")


def test_reading_the_trail_is_recorded_in_it_after_the_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pacs audit`` writes an Audit Log Used (PS3.15 A.5.3.2) into the trail it read,
    once read (the listing does not hold it): the operator as requestor, the log by
    its URI, the filters given as details; a failed shipping too, outcome 4."""
    import getpass

    from click.testing import CliRunner

    from pacs.cli import main
    from tests.auditcheck import requestor

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    assert log.write(EVENTS["stored"]())
    log.close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_AUDIT_LOG", str(path))
    monkeypatch.setenv("PACS_AE_TITLE", "INTELPIXEL")
    runner = CliRunner()
    result = runner.invoke(main, ["audit", "--patient", "PID-1"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 1  # the stored event alone
    _stored, used = read_trail(path)
    assert problems(used) == []
    assert used["EventIdentification"]["EventID"]["originalText"] == "Audit Log Used"
    assert requestor(used)["UserID"] == getpass.getuser()
    (log_object,) = used["ParticipantObjectIdentification"]
    assert log_object["ParticipantObjectID"] == path.as_uri()
    assert log_object["ParticipantObjectDetail"] == [{"type": "patient", "value": "PID-1"}]
    assert used["EventIdentification"]["EventOutcomeDescription"] == \
        "pacs audit: 1 event(s) shown as summary"
    result = runner.invoke(main, ["audit", "--format", "json"])
    assert [json.loads(line)["EventIdentification"]["EventID"]["csd-code"]
            for line in result.output.splitlines()] == ["110104", "110101"]
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = runner.invoke(main, ["audit", "--syslog", f"127.0.0.1:{closed}"])
    assert result.exit_code == 1 and "cannot send" in result.output
    failed = read_trail(path)[-1]
    assert problems(failed) == [] and failed["EventIdentification"][
        "EventOutcomeIndicator"] == audit.MINOR_FAILURE
    assert len(read_trail(path)) == 4


def test_pacs_query_is_recorded_as_a_query(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``pacs query`` shows patients' names and IDs: it is a Query (PS3.15 A.5.3.10) in
    the trail, as a C-FIND or a QIDO-RS search is, by its operator, with its keys."""
    import getpass

    from click.testing import CliRunner

    from pacs.cli import main
    from tests.auditcheck import requestor

    data = tmp_path / "in.dcm"
    data.write_bytes(make_instance(PatientID="AUDIT-ME", PatientName="SECRET^PATIENT"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    assert runner.invoke(main, ["import", str(data)]).exit_code == 0
    [path] = (tmp_path / "data").rglob("audit.jsonl")
    before = len(read_trail(path))
    result = runner.invoke(main, ["query", "--level", "patient", "PatientName=SECRET*"])
    assert result.exit_code == 0 and "AUDIT-ME" in result.output, result.output
    [queried] = read_trail(path)[before:]
    assert problems(queried) == []
    assert queried["EventIdentification"]["EventID"]["csd-code"] == "110112"
    assert requestor(queried)["UserID"] == getpass.getuser()
    [asked] = queried["ParticipantObjectIdentification"]
    assert base64.b64decode(asked["ParticipantObjectQuery"]) == \
        b"pacs query patient PatientName=SECRET*"
    assert {"type": "QueryKeys", "value": "00100010"} in asked["ParticipantObjectDetail"]


def test_a_long_trail_is_read_as_a_stream(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``pacs audit`` holds an event at a time, not the trail: years of events must
    not take the operator's memory.  A trail of 20,000 events (about 20 MB) is read,
    one chosen, with a peak far below the trail's size (its events held at once took
    several times the file)."""
    import tracemalloc

    from click.testing import CliRunner

    from pacs.cli import main

    path = tmp_path / "audit.jsonl"
    line = (json.dumps(EVENTS["stored"]()) + "\n").encode()
    chosen = json.dumps(EVENTS["moved"]()) + "\n"
    path.write_bytes(line * 10_000 + chosen.encode() + line * 10_000)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_AUDIT_LOG", str(path))
    tracemalloc.start()
    try:
        result = CliRunner().invoke(main, ["audit", "--user", "STORESCP",
                                           "--format", "json"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert result.output == chosen
    assert peak < path.stat().st_size / 10, (peak, path.stat().st_size)


def test_reading_no_trail_makes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    """``pacs audit`` before the node's first event lists nothing and makes no trail:
    the file would be the operator's, not the node's."""
    from click.testing import CliRunner

    from pacs.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["audit"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "data" / "audit.jsonl").exists()


FORGED = "\n2026-12-06T00:00:00Z DICOM Study Deleted [D] outcome=0 who=admin@10.9.9.9*"


def test_values_a_peer_chose_never_start_a_line_nor_break_the_xml() -> None:
    """A user name or Patient ID with control characters (a forged record after a line
    feed; a byte XML 1.0 forbids) is written escaped."""
    event = audit.transferred_event(
        SOURCE, audit.APPLICATION_SERVER, audit.CREATE,
        Participant("mallory" + FORGED, True, address="127.0.0.2"), NODE, [STUDY],
        Patient("P9\\" + FORGED + "\x01\u2028", "HOSP"), audit.SUCCESS)
    line = audit.summary(event)
    assert "\n" not in line and "\u2028" not in line and "\x01" not in line
    assert "who=mallory\\x0a2026" in line and "patients=P9\\\\\\x0a" in line
    root = ET.fromstring(audit.to_xml(event))  # parses: no control character in it
    user = root.find("ActiveParticipant")
    assert user is not None and user.get("UserID") == "mallory\\x0a" + FORGED[1:]
    patient = root.findall("ParticipantObjectIdentification")[-1].get("ParticipantObjectID")
    assert patient is not None and patient.endswith("\\x01\\u2028^^^HOSP")
    assert audit.encode(event).count(b"\n") == 1  # the trail's line, JSON-escaped


def test_a_name_a_peer_chose_cannot_read_as_another_participant_in_the_summary() -> None:
    """The summary's own separators in a calling AE title or user name (``@``, ``*``,
    ``,``, spaces, ``=``) are escaped: the line names one participant, at its real
    address, and no second field."""
    event = audit.transferred_event(
        SOURCE, audit.APPLICATION_SERVER, audit.CREATE,
        Participant("A@10.6.6.6*, B", True, address="127.0.0.2"), NODE, [STUDY],
        Patient("P1 studies=9", "HOSP"), audit.SUCCESS)
    line = audit.summary(event)
    assert "who=A\\x4010.6.6.6\\x2a\\x2c\\x20B@127.0.0.2*, " in line
    assert "10.6.6.6*" not in line and line.count(" studies=") == 1
    assert "patients=P1\\x20studies\\x3d9" in line


def _receive_tcp(server: socket.socket, into: list[bytes]) -> None:
    connection, _ = server.accept()
    with connection:
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    while data:  # RFC 6587 octet counting: "LEN SP MSG"
        length, _, rest = data.partition(b" ")
        into.append(rest[:int(length)])
        data = rest[int(length):]


def test_events_are_shipped_as_framed_syslog_over_tcp() -> None:
    received: list[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        receiver = threading.Thread(target=_receive_tcp, args=(server, received))
        receiver.start()
        sent = audit.ship([EVENTS["stored"](), _query()], "127.0.0.1",
                          server.getsockname()[1], hostname="node-a")
        receiver.join(30)
    assert sent == 2 and len(received) == 2
    assert all(m.startswith(b"<85>1 ") and b" node-a pacs " in m for m in received)
    bodies = [ET.fromstring(m.partition(b"\xef\xbb\xbf")[2]) for m in received]
    assert [b.find("EventIdentification/EventID").get("csd-code")  # type: ignore[union-attr]
            for b in bodies] == ["110104", "110112"]


def test_events_are_shipped_over_tls_to_a_repository_whose_certificate_verifies(
        tmp_path: Path) -> None:
    """RFC 5425: the trail holds Patient IDs and queries, so it goes encrypted, to a
    repository whose certificate the given authority issued for its name."""
    import ssl

    from pacs.core import tls
    from tests.tlsfiles import make_pki

    pki = make_pki(tmp_path / "pki")
    server_side = tls.context(ssl.Purpose.CLIENT_AUTH)
    tls.load_identity(server_side, ("cert", str(pki.server_cert)),
                      ("key", str(pki.server_key)))
    received: list[bytes] = []

    def receive(server: socket.socket) -> None:
        connection, _ = server.accept()
        with server_side.wrap_socket(connection, server_side=True) as secured:
            data = b""
            while chunk := secured.recv(65536):
                data += chunk
        length, _, rest = data.partition(b" ")
        received.append(rest[:int(length)])

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        receiver = threading.Thread(target=receive, args=(server,))
        receiver.start()
        client_side = tls.context(ssl.Purpose.SERVER_AUTH, ("ca", str(pki.ca)))
        assert audit.ship([EVENTS["stored"]()], "localhost", server.getsockname()[1],
                          tls=client_side) == 1
        receiver.join(30)
    assert len(received) == 1 and received[0].startswith(b"<85>1 ")
    with socket.socket() as server:  # a repository the authority did not certify
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        other = tls.context(ssl.Purpose.SERVER_AUTH, ("ca", str(pki.other_ca)))
        receiver = threading.Thread(target=lambda: _refuse_one(server, server_side))
        receiver.start()
        with pytest.raises(ssl.SSLError):
            audit.ship([EVENTS["stored"]()], "localhost", server.getsockname()[1],
                       tls=other)
        receiver.join(30)


def _refuse_one(server: socket.socket, context: Any) -> None:
    connection, _ = server.accept()
    with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
        pass


def test_the_trail_goes_in_the_clear_to_this_host_only_unless_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pacs.cli import main

    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    runner = CliRunner()
    for args in (["--syslog", "192.0.2.7:6514"], ["--syslog", "192.0.2.7:514", "--udp"],
                 ["--syslog", "192.0.2.7:6514", "--tls", "--udp"]):
        result = runner.invoke(main, ["audit", *args])
        assert result.exit_code == 2 and "--tls" in result.output, result.output
    assert not (tmp_path / "audit.jsonl").exists()  # refused before any reading


def test_events_are_shipped_as_udp_datagrams() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(30)
        assert audit.ship([EVENTS["begin"]()], "127.0.0.1", server.getsockname()[1],
                          udp=True) == 1
        datagram = server.recv(65536)
    assert b"IHE+RFC-3881" in datagram and datagram.endswith(b"</AuditMessage>")


def test_since_is_compared_as_utc_text() -> None:
    assert audit.parse_since("2024-05-01") == "2024-05-01T00:00:00.000000Z"
    assert audit.parse_since("2024-05-01T14:00+02:00") == "2024-05-01T12:00:00.000000Z"
    with pytest.raises(ValueError):
        audit.parse_since("yesterday")


# --- refusals coalesced ------------------------------------------------------------------

class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _failed_login(trail: AuditTrail, address: str, user: str = "mallory") -> None:
    trail.user_authentication(audit.WEB_SERVER, Participant(user, True, address=address),
                              audit.MINOR_FAILURE, "wrong credentials")


def test_repeated_refusals_from_one_source_are_one_counted_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = _Clock()
    trail = AuditTrail(AuditLog(path, sync_seconds=0), SOURCE,
                       refusals=audit.Coalescer(60.0, clock=clock))
    for _ in range(500):
        _failed_login(trail, "192.0.2.66")
    _failed_login(trail, "192.0.2.77")  # another source: its own first record
    # Accesses to patient data are never coalesced, whatever their outcome.
    for _ in range(3):
        trail.accessed(audit.WEB_SERVER, audit.READ, [CLIENT, NODE], [STUDY], audit.SUCCESS)
    trail.accessed(audit.WEB_SERVER, audit.READ, [CLIENT, NODE], [STUDY],
                   audit.SERIOUS_FAILURE, "HTTP 404")
    assert len(read_trail(path)) == 2 + 4
    clock.now += 61  # the window ended: its record comes with the next event
    _failed_login(trail, "192.0.2.66")
    trail.close()
    events = read_trail(path)
    assert [problems(e) for e in events] == [[]] * len(events)
    first, counted, again = [e for e in events if any(
        p.get("NetworkAccessPointID") == "192.0.2.66" for p in e["ActiveParticipant"])]
    assert first["ActiveParticipant"][0]["UserID"] == "mallory"
    description = counted["EventIdentification"]["EventOutcomeDescription"]
    assert description.startswith(  # the first one's reason kept
        "wrong credentials; 499 more refusal(s) of this kind from this source")
    assert first["EventIdentification"]["EventDateTime"] in description
    assert again["EventIdentification"]["EventOutcomeDescription"] == "wrong credentials"
    assert len(events) == 2 + 4 + 2


def test_a_refused_c_move_is_not_counted_as_more_of_a_refused_c_get(tmp_path: Path) -> None:
    """Refusals are coalesced by their other participants too: a refused C-GET, then a
    refused C-MOVE to DEST from the same AE within the window, left only the C-GET's
    record, the C-MOVE and its destination gone into its count."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path, sync_seconds=0), SOURCE,
                       refusals=audit.Coalescer(60.0, clock=_Clock()))
    node = trail.node()
    for _ in range(2):
        trail.transferred(audit.APPLICATION_SERVER, audit.READ, node, CLIENT, [],
                          audit.MINOR_FAILURE, "C-GET status 0124", refused=True)
    trail.transferred(audit.APPLICATION_SERVER, audit.READ, node,
                      Participant("DEST", False, address="192.0.2.9"), [],
                      audit.MINOR_FAILURE, "C-MOVE status 0124", others=[CLIENT],
                      refused=True)
    trail.close()
    descriptions = [e["EventIdentification"]["EventOutcomeDescription"]
                    for e in read_trail(path)]
    assert descriptions[:2] == ["C-GET status 0124", "C-MOVE status 0124"]
    assert descriptions[2].startswith("C-GET status 0124; 1 more refusal(s)")


def test_c_move_destinations_cost_their_requestor_no_names_of_the_address() -> None:
    """Each C-MOVE destination a refused AE names has a run of its own, up to a bound,
    and costs the other names refused from its address nothing: the first refusal of
    another AE there is still written on its own."""
    coalescer = audit.Coalescer(60.0, identities=3, clock=_Clock())
    node = Participant("INTELPIXEL", False)

    def move(ae: str, destination: str) -> dict[str, Any]:
        return audit.transferred_event(
            SOURCE, audit.APPLICATION_SERVER, audit.READ, node,
            Participant(destination, False), [], None, audit.MINOR_FAILURE,
            "C-MOVE status 0124", [Participant(ae, True, address="192.0.2.5")])

    written = [coalescer.admit(move("A", f"DEST{n}")) for n in range(6)]
    assert written == [True] * 3 + [True, False, False]  # past 3: one run for the rest
    assert coalescer.admit(move("B", "DEST0"))


def test_counted_refusals_are_recorded_when_the_trail_closes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path, sync_seconds=0), SOURCE)
    for _ in range(3):
        trail.security_alert(audit.APPLICATION_SERVER, audit.NODE_AUTHENTICATION,
                             "association rejected", audit.MINOR_FAILURE,
                             [Participant("STRANGER", True, address="192.0.2.5")])
    trail.close()
    _, counted = read_trail(path)
    assert problems(counted) == []
    assert "; 2 more refusal(s)" in counted["EventIdentification"]["EventOutcomeDescription"]


def test_refusals_of_too_many_sources_share_one_entry_per_kind() -> None:
    coalescer = audit.Coalescer(60.0, limit=2, clock=_Clock())

    def login(address: str) -> dict[str, Any]:
        return audit.user_authentication_event(
            SOURCE, audit.WEB_SERVER, Participant("x", True, address=address),
            Participant("INTELPIXEL", False), audit.MINOR_FAILURE)

    assert [coalescer.admit(login(f"192.0.2.{n}")) for n in range(6)] == \
        [True, True, True, False, False, False]
    runs = coalescer.ended(everything=True)
    assert [(run.count, run.key.address) for run in runs] == [(3, audit.OTHER_SOURCES)]
    description = audit.coalesced_event(runs[0])["EventIdentification"][
        "EventOutcomeDescription"]
    assert "3 more refusal(s) of this kind from sources past" in description


def test_the_trail_s_writability_is_seen_from_any_process(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert audit.writable(None) == "off"
    assert audit.writable(path) == "ok"  # not made yet: its folder takes it
    path.write_text("")
    assert audit.writable(path) == "ok"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the trail's folder should be")
    assert audit.writable(blocker / "audit.jsonl").startswith("cannot be written")


def _admits_in_a_child(coalescer: audit.Coalescer, event: dict[str, Any], result: Any) -> None:
    result.put(coalescer.admit(event))


def test_a_forked_child_coalesces_its_own_refusals() -> None:
    # The parent records the runs it began; a child starts with none of them.
    coalescer = audit.Coalescer(60.0, clock=_Clock())
    event = EVENTS["login"]()
    assert coalescer.admit(event) and not coalescer.admit(event)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_admits_in_a_child, args=(coalescer, event, result))
    child.start()
    assert result.get(timeout=10) is True
    child.join(10)
    assert [run.count for run in coalescer.ended(everything=True)] == [1]


def test_each_name_refused_from_an_address_is_recorded_up_to_a_bound(tmp_path: Path) -> None:
    # Each calling AE title or user name tried is in the trail, but trying one name
    # after another from one address is bounded too.
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path, sync_seconds=0), SOURCE,
                       refusals=audit.Coalescer(60.0, identities=3, clock=_Clock()))
    for number in range(50):
        _failed_login(trail, "192.0.2.66", f"guess{number}")
    _failed_login(trail, "192.0.2.66", "guess0")  # counted with its own name's first
    trail.close()
    events = read_trail(path)
    names = [e["ActiveParticipant"][0]["UserID"] for e in events]
    assert names[:4] == ["guess0", "guess1", "guess2", "guess3"]
    descriptions = [e["EventIdentification"]["EventOutcomeDescription"] for e in events[4:]]
    assert sorted(descriptions)[0].startswith(
        "wrong credentials; 1 more refusal(s) of this kind from this source")
    assert any(d.startswith("wrong credentials; 46 more refusal(s) of this kind from this "
                            "address, under other names") for d in descriptions), descriptions
    assert len(events) == 4 + 2


def test_the_patients_of_more_studies_than_one_statement_holds_are_all_found(
        services: Services) -> None:
    """A C-MOVE or a removal of more than MAX_KEYS studies: each study's event names
    its patient, not only those of the first MAX_KEYS (the rest were grouped into one
    event without a patient)."""
    from pacs.core.index import reads
    count = reads.MAX_KEYS + 3
    uids = [f"1.2.826.0.1.{n}" for n in range(count)]
    for n, uid in enumerate(uids):
        services.ingest.store_bytes(make_instance(StudyInstanceUID=uid,
                                                  PatientID=f"P{n % 7}"))
    found = audit.patients_in_index(services.index.connection, [*uids, "1.9.9"])
    assert len(found) == count
    assert found[uids[-1]] == audit.Patient(f"P{(count - 1) % 7}", "")


def test_a_query_counted_but_not_kept_says_its_length() -> None:
    """An identifier over its ceiling arrives counted, not kept: its event says how
    long it was, with nothing of it (there is nothing)."""
    event = audit.query_event(SOURCE, audit.APPLICATION_SERVER, CLIENT, NODE,
                              "1.2.840.10008.5.1.4.1.2.2.1", b"", [], audit.MINOR_FAILURE,
                              size=3 << 20)
    queried = event["ParticipantObjectIdentification"][0]
    assert queried["ParticipantObjectQuery"] == ""
    assert {"type": "QueryBytes", "value": str(3 << 20)} in queried["ParticipantObjectDetail"]
