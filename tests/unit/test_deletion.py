"""Removing instances (pacs.core.deletion) over the real index and an in-memory store:
rows, parents, counts and objects together, tombstones, IOCM rejection notes through
the ingest path, instances sent again, repair after a crash between rows and objects,
retention, and the audit trail."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import CTImageStorage, generate_uid

from pacs.core import audit, intake as intake_module, rejection
from pacs.core.deletion import NO_REASON, Removal, Target, delete_rows, reference
from pacs.core.errors import (
    IndexFailure,
    InstanceLocked,
    InvalidRejection,
    InvalidUID,
    NotAuthorized,
    NotFound,
    RejectedInstance,
    StorageError,
    UnsettledWrite,
)
from pacs.core.index import reads, writer
from pacs.core.ingest import Outcome, Received
from pacs.core.reconcile import Problem, reconcile
from pacs.core.rejection import MAX_REFERENCES
from pacs.core.services import Services, drain, mover
from pacs.core.storage.memory import MemoryStore
from tests.factory import make_instance, make_rejection_note, part10

NODE = audit.Participant("tester", True)


def _study(services: Services, count: int = 2, series: int = 1,
           **attributes: object) -> list[tuple[str, str, str, str]]:
    """Store a study; its instances as (study, series, SOP, SOP class) references."""
    study = generate_uid()
    made = []
    for number in range(series):
        series_uid = generate_uid()
        for _ in range(count):
            sop = generate_uid()
            services.ingest.store_bytes(make_instance(
                StudyInstanceUID=study, SeriesInstanceUID=series_uid, SOPInstanceUID=sop,
                SeriesNumber=number + 1, **attributes))
            made.append((study, series_uid, sop, CTImageStorage))
    return made


def _uids(services: Services) -> set[str]:
    return {sop for _key, (sop, _c, _s) in reads.all_objects(
        services.index.connection()).items()}


def _events(services: Services) -> list[dict[str, object]]:
    path = services.settings.data_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []


def test_target_parse() -> None:
    assert str(Target.parse("1.2/1.3/1.4")) == "1.2/1.3/1.4"
    assert Target.parse("1.2/").level == "study"
    assert Target.parse("1.2/1.3").level == "series"
    for bad in ("", "1.2/x", "1/2/3/4", "../1.2"):
        with pytest.raises(InvalidUID):
            Target.parse(bad)


def test_a_series_goes_with_its_rows_objects_and_counts(services: Services) -> None:
    kept = _study(services)
    doomed = _study(services, count=3, series=2)
    study, series = doomed[0][0], doomed[0][1]
    before = reads.counts(services.index.connection())
    rows = services.deleter.plan([Target(study, series)])
    assert {row.sop_uid for row in rows} == {d[2] for d in doomed if d[1] == series}
    assert reads.counts(services.index.connection()) == before  # planning changes nothing

    removal = services.deleter.remove([reference(r) for r in rows], NODE,
                                      audit.APPLICATION_SERVER)
    assert removal.instances == 3 and removal.whole == set() and removal.objects_left == 0
    assert removal.size == sum(row.size for row in rows)
    counts = reads.counts(services.index.connection())
    assert counts == {**before, "series": before["series"] - 1,
                      "instance": before["instance"] - 3}
    assert _uids(services) == {d[2] for d in kept + doomed if d[1] != series}
    stored = list(services.store.keys())  # ObjectStore.keys(), not a dict's
    assert {key.rsplit("/", 1)[1][:-4] for key in stored} == _uids(services)
    stone = reads.tombstone(services.index.connection(), rows[0].sop_uid)
    assert stone == reads.Tombstone(*NO_REASON)

    # The rest of the study: the study and (with the other study kept) not the patient.
    removal = services.deleter.remove(
        [reference(r) for r in services.deleter.plan([Target(study)])], NODE,
        audit.APPLICATION_SERVER)
    assert removal.whole == {study}
    assert reads.counts(services.index.connection()) == {
        "patient": 1, "study": 1, "series": 1, "instance": 2}
    with pytest.raises(NotFound):
        services.deleter.plan([Target(study)])
    names = [e["EventIdentification"]["EventID"]["originalText"] for e in _events(services)]
    assert names == ["DICOM Instances Accessed", "DICOM Study Deleted"]
    deleted = _events(services)[-1]
    assert deleted["EventIdentification"]["EventActionCode"] == "D"
    objects = deleted["ParticipantObjectIdentification"]
    assert [o["ParticipantObjectID"] for o in objects] == [study, "P1"]


def test_a_deleted_instance_sent_again_is_stored(services: Services) -> None:
    made = _study(services, count=1)
    study, series, sop, _ = made[0]
    data = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                         SOPInstanceUID=sop)
    services.deleter.remove([reference(r) for r in services.deleter.plan([Target(study)])],
                            NODE, audit.APPLICATION_SERVER)
    assert services.ingest.store_bytes(data).outcome is Outcome.STORED
    assert reads.tombstone(services.index.connection(), sop) is None


def _note(references: list[tuple[str, str, str, str]], **kwargs: object) -> bytes:
    return make_rejection_note(references, **kwargs)  # type: ignore[arg-type]


def test_a_rejection_note_removes_what_it_names_and_stays(services: Services) -> None:
    other = _study(services)  # the same patient, another study
    rejected = _study(services, count=3)
    note = _note(rejected[:2])
    result = services.ingest.store_bytes(note, calling_ae="QA")
    assert result.outcome is Outcome.STORED
    assert _uids(services) == {d[2] for d in other} | {rejected[2][2], result.sop_instance_uid}
    # Sent again: refused, by the reason of the note; the note itself is a duplicate.
    again = make_instance(StudyInstanceUID=rejected[0][0], SeriesInstanceUID=rejected[0][1],
                          SOPInstanceUID=rejected[0][2])
    with pytest.raises(RejectedInstance, match="113001"):
        services.ingest.store_bytes(again)
    assert services.ingest.store_bytes(note).outcome is Outcome.UNCHANGED
    last = _events(services)[-1]
    assert last["EventIdentification"]["EventID"]["originalText"] == \
        "DICOM Instances Accessed"
    assert last["ActiveParticipant"][0]["UserID"] == "QA"
    assert "113001" in last["EventIdentification"]["EventOutcomeDescription"]


def test_a_note_names_an_instance_not_yet_received(services: Services) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    services.ingest.store_bytes(_note([(study, series, sop, CTImageStorage)],
                                      code="113037",
                                      meaning="Rejected for Patient Safety Reasons"))
    with pytest.raises(RejectedInstance):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop))


def test_retention_expiry_lets_an_instance_come_back(services: Services) -> None:
    made = _study(services, count=1)
    services.ingest.store_bytes(_note(made, code="113039",
                                      meaning="Data Retention Policy Expired"))
    assert made[0][2] not in _uids(services)
    data = make_instance(StudyInstanceUID=made[0][0], SeriesInstanceUID=made[0][1],
                         SOPInstanceUID=made[0][2])
    assert services.ingest.store_bytes(data).outcome is Outcome.STORED


def test_a_note_never_removes_another_patients_instance(services: Services) -> None:
    theirs = _study(services, PatientID="OTHER")
    moved = _study(services)
    wrong_place = [(moved[0][0], generate_uid(), moved[0][2], CTImageStorage)]
    services.ingest.store_bytes(_note(theirs + wrong_place,
                                      StudyInstanceUID=generate_uid()))
    assert {d[2] for d in theirs + moved} <= _uids(services)


def test_a_note_of_another_patient_in_the_instance_s_own_study_removes_nothing(
        services: Services) -> None:
    """A note is stored into the study it rejects from: one of another patient makes
    that study its patient's (the study's patient is its last instance's), yet the
    instances sent for the other patient are not the note's to remove.  Each instance
    row keeps the patient it was sent for."""
    theirs = _study(services, count=2, PatientID="OTHER")
    result = services.ingest.store_bytes(_note(theirs[:1]))  # P1's note, in their study
    assert result.outcome is Outcome.STORED
    assert {d[2] for d in theirs} <= _uids(services)
    assert reads.tombstone(services.index.connection(), theirs[0][2]) is None
    mine = _study(services, count=2)  # P1's own, in a study of its own: removed
    services.ingest.store_bytes(_note(mine[:1]))
    assert mine[0][2] not in _uids(services) and mine[1][2] in _uids(services)


def test_a_later_note_of_a_weaker_reason_leaves_the_refusal(services: Services) -> None:
    """An expired retention (113039) naming an instance a patient-safety rejection
    (113037) removed does not let it back in (IHE RAD TF-2 4.66.4: such an instance
    shall not be accepted again); another instance it names goes as it would."""
    rejected, other = _study(services, count=2)
    services.ingest.store_bytes(_note([rejected], code="113037",
                                      meaning="Rejected for Patient Safety Reasons"))
    services.ingest.store_bytes(_note([rejected, other], code="113039",
                                      meaning="Data Retention Policy Expired"))
    assert reads.tombstone(services.index.connection(), rejected[2]) == reads.Tombstone(
        "113037", "DCM")
    with pytest.raises(RejectedInstance, match="113037"):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=rejected[0], SeriesInstanceUID=rejected[1],
            SOPInstanceUID=rejected[2]))
    assert services.ingest.store_bytes(make_instance(
        StudyInstanceUID=other[0], SeriesInstanceUID=other[1],
        SOPInstanceUID=other[2])).outcome is Outcome.STORED


def test_a_note_first_refuses_only_the_instance_at_its_place(services: Services) -> None:
    """A note naming an instance not received yet refuses it at the study and series
    it names; the UID arriving elsewhere (another patient's study) is stored, as it
    would be kept had it arrived before the note."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    services.ingest.store_bytes(_note([(study, series, sop, CTImageStorage)]))
    with pytest.raises(RejectedInstance):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop))
    elsewhere = make_instance(PatientID="OTHER", SOPInstanceUID=sop)
    assert services.ingest.store_bytes(elsewhere).outcome is Outcome.STORED
    assert sop in _uids(services)
    assert reads.tombstone(services.index.connection(), sop) is not None  # kept
    # Sent at the note's place once more: still refused, the other left where it is.
    with pytest.raises(RejectedInstance):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
            PatientID="OTHER"))
    [row] = reads.located(services.index.connection(), [sop])
    assert row.study_uid != study


def test_parts_after_a_note_of_their_batch_are_refused_not_reported_stored(
        services: Services) -> None:
    """A STOW-RS batch [note, instances it names]: the instances are refused as they
    are when sent after the note (the batch ends at the note, applied before the parts
    after it are stored); one before the note in the batch was stored, then removed, as
    it would be one by one."""
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    made = [make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                          SOPInstanceUID=sop) for sop in sops]
    named = [(study, series, sop, CTImageStorage) for sop in sops]
    note = _note(named, code="113037", meaning="Rejected for Patient Safety Reasons")
    results = services.ingest.store_batch([Received.of(made[0]), Received.of(note),
                                           Received.of(made[1]), Received.of(made[2])])
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[1], BaseException)
    assert all(isinstance(result, RejectedInstance) for result in results[2:])
    assert not {uid for _, _, uid, _ in named} & _uids(services)


def test_an_instance_after_a_note_that_lets_it_back_in_stays_stored(
        services: Services) -> None:
    """A STOW-RS batch [113039 note naming X, X]: X, sent after the note, is stored as
    it is when sent after it one by one (a Data Retention Policy Expired note lets an
    instance back in), and stays: it was reported stored, never removed after."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    again = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                          SOPInstanceUID=sop)
    note = _note([(study, series, sop, CTImageStorage)], code="113039",
                 meaning="Data Retention Policy Expired")
    results = services.ingest.store_batch([Received.of(note), Received.of(again)])
    assert not any(isinstance(result, BaseException) for result in results), results
    assert sop in _uids(services)


@pytest.mark.parametrize("code", ["113039", "113001"])
def test_a_repeat_before_a_note_of_its_batch_is_removed_by_it(
        services: Services, code: str) -> None:
    """A STOW-RS batch [X, X again, note naming X]: both copies were sent before the
    note, which removes X, as it does when the three are sent one by one."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first, second = (make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                                   SOPInstanceUID=sop, StudyDescription=text)
                     for text in ("first", "second"))
    note = _note([(study, series, sop, CTImageStorage)], code=code,
                 meaning="Data Retention Policy Expired" if code == "113039"
                 else "Rejected for Quality Reasons")
    results = services.ingest.store_batch([Received.of(first), Received.of(second),
                                           Received.of(note)])
    assert not any(isinstance(result, BaseException) for result in results), results
    assert sop not in _uids(services)


def test_an_ordinary_key_object_selection_removes_nothing(services: Services) -> None:
    made = _study(services)
    services.ingest.store_bytes(_note(made, code="113000", meaning="Of Interest"))
    assert {d[2] for d in made} <= _uids(services)


def test_a_note_in_a_stow_batch(services: Services) -> None:
    made = _study(services)
    results = services.ingest.store_batch([Received.of(_note(made[:1]))])
    assert not isinstance(results[0], BaseException)
    assert made[0][2] not in _uids(services) and made[1][2] in _uids(services)


def test_a_note_with_too_many_references_is_refused(services: Services,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_REFERENCES >= 10_000  # a large CT study in one note
    monkeypatch.setattr(rejection, "MAX_REFERENCES", 3)
    study, series = generate_uid(), generate_uid()
    refs = [(study, series, f"1.2.3.{n}", CTImageStorage) for n in range(4)]
    with pytest.raises(InvalidRejection):
        services.ingest.store_bytes(_note(refs))
    assert reads.counts(services.index.connection())["instance"] == 0


@pytest.mark.parametrize("tag", [0x0040A043, 0x0040A375])
def test_a_note_with_text_where_a_sequence_belongs_is_refused(services: Services,
                                                                tag: int) -> None:
    """Concept Name Code Sequence or Current Requested Procedure Evidence Sequence sent
    as LO text: refused as an invalid note (C000), not failed as a defect of the
    node's with a traceback in the log."""
    ds = pydicom.dcmread(io.BytesIO(_note([(generate_uid(), generate_uid(), "1.2.3.4",
                                            CTImageStorage)])))
    del ds[tag]
    ds.add(DataElement(tag, "LO", "X"))
    with pytest.raises(InvalidRejection, match="not a sequence"):
        services.ingest.store_bytes(part10(ds))
    assert reads.counts(services.index.connection())["instance"] == 0


def test_fsck_deletes_the_object_of_a_removed_instance(services: Services) -> None:
    made = _study(services, count=2)
    drain(services)  # in the store (an intake copy goes with the transaction)
    rows = services.deleter.plan([Target(made[0][0], made[0][1], made[0][2])])
    # A crash after the transaction, before the object was deleted.
    with services.index.write() as conn:
        delete_rows(conn, rows, [reference(r) for r in rows], NO_REASON, "tester", "now")
    assert rows[0].object_key in set(services.store.keys())
    dry = reconcile(services)
    assert [f.problem for f in dry.findings] == [Problem.REMOVED]
    report = reconcile(services, repair=True)
    assert report.ok, list(report.lines())
    assert rows[0].object_key not in set(services.store.keys())
    assert made[0][2] not in _uids(services) and made[1][2] in _uids(services)


class CountingStore(MemoryStore):
    """A memory store that counts the deletions of each key; with ``fail_deletes``,
    they fail."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: dict[str, int] = {}
        self.fail_deletes = False
        self.error: type[StorageError] = StorageError
        self.on_unanswered: Callable[[str], None] | None = None  # as S3 has it

    def delete(self, key: str) -> None:
        self.deleted[key] = self.deleted.get(key, 0) + 1
        if self.fail_deletes:
            if self.error is UnsettledWrite and self.on_unanswered is not None:
                self.on_unanswered(key)
            raise self.error("simulated store failure")
        super().delete(key)


def test_a_removal_deletes_each_object_from_the_backend_alone_after_its_transaction(
        make_services: Callable[..., Services]) -> None:
    """The transaction removes the rows and the intake copies; after it the intake is
    neither read nor written again, and each object is deleted once, from the backend
    (whether it had reached the backend or was still in the intake)."""
    store = CountingStore()
    services = make_services(store=store)
    moved = _study(services, count=2)
    drain(services)
    waiting = _study(services, count=1)  # still in the intake
    assert reads.intake_state(services.index.connection()).objects == 1
    rows = services.deleter.plan([Target(moved[0][0]), Target(waiting[0][0])])
    statements: list[str] = []

    def traced(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
        statements.append(sql)
        return True

    conn = services.index.connection()  # the deleting thread's (this one's)
    conn.exec_trace = traced
    try:
        removal = services.deleter.remove([reference(r) for r in rows], NODE,
                                          audit.APPLICATION_SERVER)
    finally:
        conn.exec_trace = None
    assert removal.instances == 3 and removal.objects_left == 0
    committed = max(n for n, sql in enumerate(statements) if sql.strip() == "COMMIT")
    assert any("intake" in sql for sql in statements[:committed])  # with the rows
    assert not [sql for sql in statements[committed + 1:] if "intake" in sql]
    assert store.deleted == {row.object_key: 1 for row in rows}
    assert reads.intake_state(services.index.connection()).objects == 0
    assert list(services.store.keys()) == []


def _pending(services: Services) -> int:
    return reads.pending_deletion_count(services.index.connection())


def _aged(services: Services) -> None:
    """The pending deletions recorded longer ago than the mover leaves to their
    removal (``DELETION_GRACE``)."""
    with services.index.write() as conn:
        conn.execute("UPDATE object_deletion SET since = since - ?",
                     (intake_module.DELETION_GRACE + 1,))


def test_the_object_a_moved_instance_left_is_the_mover_s_when_its_deletion_fails(
        make_services: Callable[..., Services]) -> None:
    """An instance stored again in another series leaves its old object unlisted; its
    deletion is recorded in the commit that moved it, so one the store fails (or a
    crash before it) is done by the intake's mover, not left for ``pacs fsck``."""
    store = CountingStore()
    services = make_services(store=store)
    [(study, series, sop, _)] = _study(services, count=1)
    drain(services)  # the old object in the store
    old_key = f"{study}/{series}/{sop}.dcm"
    moved = generate_uid()
    store.fail_deletes = True
    services.ingest.store_bytes(make_instance(StudyInstanceUID=study,
                                              SeriesInstanceUID=moved, SOPInstanceUID=sop))
    store.fail_deletes = False
    drain(services)
    assert old_key in set(store.keys()) and _pending(services) == 1
    _aged(services)
    assert mover(services).delete_removed() == 1
    assert set(store.keys()) == {f"{study}/{moved}/{sop}.dcm"} and _pending(services) == 0
    # Deleted at once, its record goes with it.
    services.ingest.store_bytes(make_instance(StudyInstanceUID=study,
                                              SeriesInstanceUID=series, SOPInstanceUID=sop))
    drain(services)
    assert set(store.keys()) == {old_key} and _pending(services) == 0


def _removed_with_deletes_failing(services: Services, store: CountingStore, study: str
                                  ) -> tuple[Removal, list[reads.Located]]:
    """Remove ``study`` while the store fails every object deletion: the removal and
    the rows it removed."""
    rows = services.deleter.plan([Target(study)])
    store.fail_deletes = True
    removal = services.deleter.remove([reference(r) for r in rows], NODE,
                                      audit.APPLICATION_SERVER)
    store.fail_deletes = False
    return removal, rows


def _left_to_the_mover(make_services: Callable[..., Services], count: int
                       ) -> tuple[Services, CountingStore]:
    """A study of ``count`` instances removed while the store failed every object
    deletion, recorded long enough ago to be the mover's."""
    store = CountingStore()
    services = make_services(store=store)
    made = _study(services, count=count)
    drain(services)
    _removed_with_deletes_failing(services, store, made[0][0])
    _aged(services)
    return services, store


def test_a_crash_before_the_object_deletion_leaves_an_orphan_fsck_reports(
        make_services: Callable[..., Services]) -> None:
    """The backend's deletion fails (as a crash after the transaction would leave it):
    nothing of the instance is listed, its object stays, fsck reports it as removed and
    repair deletes it."""
    store = CountingStore()
    services = make_services(store=store)
    made = _study(services, count=1)
    drain(services)
    removal, rows = _removed_with_deletes_failing(services, store, made[0][0])
    assert removal.objects_left == 1
    assert made[0][2] not in _uids(services)
    assert rows[0].object_key in set(services.store.keys())
    assert [f.problem for f in reconcile(services).findings] == [Problem.REMOVED]
    assert reconcile(services, repair=True).ok
    assert list(services.store.keys()) == []


def test_the_intake_s_mover_deletes_what_a_failing_store_left(
        make_services: Callable[..., Services]) -> None:
    """The removal records its objects' keys with its rows; those the store failed to
    delete stay recorded, and the mover deletes them once the store answers: no
    operator, no fsck."""
    store = CountingStore()
    services = make_services(store=store)
    made = _study(services, count=3)
    drain(services)
    removal, _rows = _removed_with_deletes_failing(services, store, made[0][0])
    assert removal.objects_left == 3 and _pending(services) == 3
    assert "deleted by the intake's mover" in removal.summary()
    assert mover(services).delete_removed() == 0  # its removal's own for a while
    _aged(services)
    store.fail_deletes = True
    with pytest.raises(StorageError):  # still failing: the keys stay
        mover(services).delete_removed()
    assert _pending(services) == 3 and len(list(services.store.keys())) == 3
    store.fail_deletes = False
    _aged(services)
    assert mover(services).delete_removed() == 3
    assert _pending(services) == 0 and list(services.store.keys()) == []
    assert reconcile(services).ok


def test_a_removal_that_deleted_its_objects_leaves_nothing_pending(
        make_services: Callable[..., Services]) -> None:
    services = make_services(store=CountingStore())
    made = _study(services, count=2)
    drain(services)
    rows = services.deleter.plan([Target(made[0][0])])
    services.deleter.remove([reference(r) for r in rows], NODE, audit.APPLICATION_SERVER)
    assert _pending(services) == 0 and list(services.store.keys()) == []


def test_an_instance_stored_again_at_its_key_keeps_its_object(
        make_services: Callable[..., Services]) -> None:
    """Stored again at the same key (written there directly, no intake) before the
    mover came to its deletion: the new object stays, the deletion is forgotten."""
    store = CountingStore()
    services = make_services(store=store, intake_object_bytes=0)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                         SOPInstanceUID=sop)
    services.ingest.store_bytes(data)
    _removed_with_deletes_failing(services, store, study)
    assert services.ingest.store_bytes(data).outcome is Outcome.STORED
    [key] = list(services.store.backend.keys())  # type: ignore[attr-defined]
    assert reads.intake_keys(services.index.connection()) == []
    _aged(services)
    deletions = dict(store.deleted)
    assert mover(services).delete_removed() == 1
    assert store.deleted == deletions  # not deleted again
    assert _pending(services) == 0
    assert services.store.backend.objects[key] == data  # type: ignore[attr-defined]


def test_a_key_the_store_refuses_goes_behind_the_others(
        make_services: Callable[..., Services]) -> None:
    services, store = _left_to_the_mover(make_services, 3)
    stubborn = reads.pending_deletions(services.index.connection(), 1)[0]
    delete = store.delete

    def refusing(key: str) -> None:
        if key == stubborn:
            raise StorageError("access denied")
        delete(key)

    store.delete = refusing  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        mover(services).delete_removed()
    assert reads.pending_deletions(services.index.connection(), 5) == [stubborn]
    assert list(services.store.keys()) == [stubborn]


def test_a_failing_store_is_tried_again_after_a_growing_wait(
        make_services: Callable[..., Services], caplog: pytest.LogCaptureFixture) -> None:
    services, store = _left_to_the_mover(make_services, 1)
    moving = mover(services)
    store.fail_deletes = True
    tries = sum(store.deleted.values())
    with caplog.at_level("WARNING", logger="pacs.core.intake"):
        moving._delete_removed_quietly()
        moving._delete_removed_quietly()  # within the wait: not tried
    assert sum(store.deleted.values()) == tries + 1
    assert len([r for r in caplog.records if "trying again" in r.getMessage()]) == 1
    first = moving._deletions_backoff
    _aged(services)
    moving._deletions_after = 0.0  # the wait is over; the store still fails
    moving._delete_removed_quietly()
    assert moving._deletions_backoff == 2 * first
    store.fail_deletes = False
    _aged(services)
    moving._deletions_after = 0.0
    moving._delete_removed_quietly()
    assert _pending(services) == 0 and moving._deletions_backoff == 0.0


def test_a_mover_that_died_leaves_its_pending_deletions_unsettled(
        make_services: Callable[..., Services]) -> None:
    """A DELETE of a killed mover may still land: the next mover makes the keys it may
    have been deleting unsettled, so that an instance stored there again waits in the
    intake until such a deletion could no longer land over it."""
    services, _store = _left_to_the_mover(make_services, 1)
    [key] = reads.pending_deletions(services.index.connection(), 1)
    with services.index.write() as conn:  # as a killed mover leaves it
        conn.execute("UPDATE intake_state SET mover_active = 1")
    mover(services).begin()
    assert reads.unsettled(services.index.connection(), key)


def _unsettled(services: Services, key: str) -> None:
    """As a write of ``key`` the store left unanswered leaves it (it may still land)."""
    with services.index.write() as conn:
        writer.unsettle(conn, key, time.time())


def _settled(services: Services) -> None:
    """Every unsettled key past its settling time, and forgotten by the mover."""
    with services.index.write() as conn:
        conn.execute("UPDATE unsettled SET since = since - ?",
                     (services.settings.s3_settle + 1,))
    mover(services).settle_old()


def test_the_mover_keeps_a_deletion_pending_while_a_write_of_its_key_may_land(
        make_services: Callable[..., Services]) -> None:
    """A PUT of the key that the store left unanswered may land after the deletion
    (the object back, the removed instance's data in the store again): the mover
    deletes the object, keeps the deletion pending behind the others, and deletes the
    key again once it has settled; then the deletion is done."""
    services, _store = _left_to_the_mover(make_services, 1)
    [key] = reads.pending_deletions(services.index.connection(), 1)
    _unsettled(services, key)
    assert mover(services).delete_removed() == 0
    assert list(services.store.keys()) == [] and _pending(services) == 1
    assert mover(services).delete_removed() == 0  # behind the others: not again at once
    services.store.backend.put(key, io.BytesIO(b"late"), 4)  # the late PUT lands
    _settled(services)
    _aged(services)
    assert mover(services).delete_removed() == 1
    assert list(services.store.keys()) == [] and _pending(services) == 0


def test_a_removal_keeps_the_deletion_of_an_unsettled_key_pending(
        make_services: Callable[..., Services]) -> None:
    """The removal deletes its objects at once, an unsettled key's too, but forgets
    only the deletions of settled keys: the intake's mover deletes the other again
    once it has settled."""
    services = make_services(store=CountingStore())
    made = _study(services, count=2)
    drain(services)
    rows = services.deleter.plan([Target(made[0][0])])
    _unsettled(services, rows[0].object_key)
    services.deleter.remove([reference(r) for r in rows], NODE, audit.APPLICATION_SERVER)
    assert list(services.store.keys()) == []
    assert reads.pending_deletions(services.index.connection(), 5) == [rows[0].object_key]
    _settled(services)
    _aged(services)
    assert mover(services).delete_removed() == 1 and _pending(services) == 0


def test_an_idle_mover_makes_a_deletion_again_once_its_key_has_settled(
        make_services: Callable[..., Services]) -> None:
    """Nothing arriving, nothing to move: the running mover forgets the keys that have
    settled as it looks again, and makes the deletion that waited for one of them."""
    services, _store = _left_to_the_mover(make_services, 1)
    [key] = reads.pending_deletions(services.index.connection(), 1)
    _unsettled(services, key)  # the mover's start deletes it, and keeps it pending
    looks = 0

    def stopping() -> bool:
        nonlocal looks
        looks += 1
        if looks == 1:  # running: the key settles, the deletion is due again
            assert _pending(services) == 1
            with services.index.write() as conn:
                conn.execute("UPDATE unsettled SET since = since - ?",
                             (services.settings.s3_settle + 1,))
            _aged(services)
        return _pending(services) == 0 or looks > 20

    mover(services).run(stopping)
    assert _pending(services) == 0 and list(services.store.keys()) == []
    assert not reads.unsettled(services.index.connection(), key)


def test_retention_expires_studies_by_modality(services: Services, tmp_path: Path) -> None:
    ct = _study(services)
    mr = _study(services, Modality="MR")
    with services.index.write() as conn:  # both received 10 days ago
        conn.execute("UPDATE instance SET received_at = '2000-01-01T00:00:00.000000Z'")
    deleter = services.deleter
    assert deleter.expire([("CT", 1e9), ("MR", 1e9)], None, 10, 100) == 0
    assert deleter.expire([("MR", 1.0)], None, 10, 100) == 1  # unlisted modalities: kept
    assert _uids(services) == {d[2] for d in ct}
    assert deleter.expire([], 1.0, 10, 100) == 1
    assert _uids(services) == set()
    assert mr


def _received_long_ago(services: Services) -> None:
    with services.index.write() as conn:
        conn.execute("UPDATE instance SET received_at = '2000-01-01T00:00:00.000000Z'")


def test_a_series_of_a_modality_no_rule_names_keeps_its_study(services: Services) -> None:
    """Without a default period, a study with a series of an unlisted modality is kept
    whatever the others' periods ("as long as any of its parts asks"): a CT rule
    removed a study's SR series with its CT series.  Stored values match the rules
    whatever their case."""
    ct = _study(services, count=1)
    sr = generate_uid()
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID=ct[0][0], SeriesInstanceUID=generate_uid(), SOPInstanceUID=sr,
        Modality="SR"))
    lower = _study(services, count=1, Modality="ct")
    _received_long_ago(services)
    assert services.deleter.expire([("CT", 1.0)], None, 10, 100) == 1
    assert _uids(services) == {ct[0][2], sr}
    assert lower[0][2] not in _uids(services)


def test_a_run_of_retention_plans_a_bounded_number_of_instances(services: Services) -> None:
    """A run takes studies, oldest first, while they hold ``max_instances`` instances
    in all, and the first whatever its size: 100 studies of 3,000 instances each were
    planned in one run (370 MB)."""
    studies = [_study(services, count=2) for _ in range(3)]
    _received_long_ago(services)
    assert services.deleter.expire([], 1.0, 10, 1) == 1  # the first, larger than that
    assert services.deleter.expire([], 1.0, 10, 3) == 1  # 2 fit, 4 do not
    assert services.deleter.expire([], 1.0, 10, 3) == 1
    assert _uids(services) == set() and len(studies) == 3


def test_a_removal_keeps_a_stricter_tombstone_of_the_uid(services: Services) -> None:
    """An instance rejected for patient safety at one study, stored at another (a
    place the rejection does not refuse), then removed there by retention or a
    deletion: the patient-safety tombstone stays, and the instance is still refused at
    the first study (the removal's own tombstone replaced it, letting it back in)."""
    rejected = _study(services, count=1)
    study, series, sop, _ = rejected[0]
    services.ingest.store_bytes(_note(rejected, code="113037",
                                      meaning="Rejected for Patient Safety Reasons"))
    elsewhere = make_instance(StudyInstanceUID=generate_uid(), SOPInstanceUID=sop)
    assert services.ingest.store_bytes(elsewhere).outcome is Outcome.STORED
    _received_long_ago(services)
    assert services.deleter.expire([], 1.0, 10, 100) == 2  # that study and the note's
    assert sop not in _uids(services)
    assert reads.tombstone(services.index.connection(), sop) == reads.Tombstone(
        "113037", "DCM")
    with pytest.raises(RejectedInstance, match="113037"):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop))


def test_an_instance_stored_into_another_study_after_the_plan_stays(
        services: Services) -> None:
    """A removal planned (read without locks), then the instance sent again with a
    corrected Study Instance UID and acknowledged, then the removal: the instance lives
    in the other study now, which the removal was not asked for.  It stays there, with
    no tombstone (with a rejection reason one would refuse it for good), and the
    report does not count it."""
    made = _study(services, count=2)
    study, _series, sop, _ = made[0]
    rows = services.deleter.plan([Target(study)])
    places = [reference(r) for r in rows]
    other_study, other_series = generate_uid(), generate_uid()
    moved = services.ingest.store_bytes(make_instance(
        StudyInstanceUID=other_study, SeriesInstanceUID=other_series, SOPInstanceUID=sop))
    assert moved.outcome is Outcome.REPLACED

    for reason in (None, rejection.reason_of("113001", "DCM")):
        removal = services.deleter.remove(places, NODE, audit.WEB_SERVER, reason=reason)
        assert removal.instances == (1 if reason is None else 0)  # the other one, once
        assert removal.superseded == 1
        assert other_study not in removal.studies
        assert reads.tombstone(services.index.connection(), sop) is None
        [row] = reads.located(services.index.connection(), [sop])
        assert (row.study_uid, row.series_uid) == (other_study, other_series)
        assert row.object_key in set(services.store.keys())
    assert _uids(services) == {sop}
    # Not refused when it is sent again (no tombstone), and served from study B.
    again = make_instance(StudyInstanceUID=other_study, SeriesInstanceUID=other_series,
                          SOPInstanceUID=sop)
    assert services.ingest.store_bytes(again).outcome is Outcome.UNCHANGED


def test_a_deletion_keeps_an_instance_stored_again_with_other_content(
        services: Services) -> None:
    """Sent again into the same series with other content after a deletion was planned:
    as if the deletion had come first, the new object stays, with no tombstone."""
    made = _study(services, count=1)
    study, series, sop, _ = made[0]
    places = [reference(r) for r in services.deleter.plan([Target(study)])]
    newer = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                          SOPInstanceUID=sop, SeriesDescription="corrected")
    assert services.ingest.store_bytes(newer).outcome is Outcome.REPLACED

    removal = services.deleter.remove(places, NODE, audit.APPLICATION_SERVER)
    assert (removal.instances, removal.superseded, removal.whole) == (0, 1, set())
    assert _uids(services) == {sop}
    assert reads.tombstone(services.index.connection(), sop) is None
    [key] = services.store.keys()
    with services.store.open(key) as stream:
        assert stream.read() == newer


def test_a_rejection_removes_an_instance_stored_again_at_its_place(
        services: Services) -> None:
    """A rejection refuses the instance for good (113001): had it come before the new
    object, that object would have been refused; so the object now at the planned
    place goes, with its tombstone, whatever its content."""
    made = _study(services, count=1)
    study, series, sop, _ = made[0]
    places = [reference(r) for r in services.deleter.plan([Target(study)])]
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
        SeriesDescription="corrected"))

    removal = services.deleter.remove(places, NODE, audit.WEB_SERVER,
                                      reason=rejection.reason_of("113001", "DCM"))
    assert (removal.instances, removal.superseded, removal.whole) == (1, 0, {study})
    assert _uids(services) == set()
    assert reads.tombstone(services.index.connection(), sop) == reads.Tombstone("113001",
                                                                                 "DCM")


def test_a_rejection_that_lets_instances_back_in_keeps_one_stored_again_when_resumed(
        services: Services) -> None:
    """A rejection by path for 113039 (data retention expired: sent again, an instance
    is taken back) cut short by a crash after its first chunk: an instance of the part
    not yet removed, sent again with other content and acknowledged, stays when the
    start-up finishes the removal (had the removal come first, that store would have
    been taken); the others go, with their tombstones."""
    made = _study(services, count=3)
    study = made[0][0]
    who = audit.Participant("admin", True)
    places = [reference(r) for r in services.deleter.plan([Target(study)])]
    reason = rejection.reason_of("113039", "DCM")
    assert reason is not None
    with services.index.write() as conn:
        writer.removal_pending(conn, who.user_id, "", audit.WEB_SERVER.code,
                               json.dumps([reason.code, reason.scheme, reason.meaning]),
                               json.dumps([[p.study_uid, p.series_uid, p.sop_uid,
                                            p.change_seq] for p in places]), 0.0)
    _, series, sop, _ = made[1]
    newer = make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                          SOPInstanceUID=sop, SeriesDescription="sent again")
    assert services.ingest.store_bytes(newer).outcome is Outcome.REPLACED

    reconcile(services, full=False)
    assert reads.removals_pending(services.index.connection()) == []
    assert _uids(services) == {sop}
    assert reads.tombstone(services.index.connection(), made[0][2]) == reads.Tombstone(
        "113039", "DCM")


def test_retention_keeps_an_instance_stored_again_after_the_plan(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention plans an expired study; an instance of it sent again meanwhile, and
    one new to it, make the study recent again: they stay (the others, still as
    planned, go)."""
    made = _study(services, count=2)
    study, series, sop, _ = made[0]
    with services.index.write() as conn:
        conn.execute("UPDATE instance SET received_at = '2000-01-01T00:00:00.000000Z'")
    new_sop = generate_uid()
    planned = reads.expired_instances

    def plan_then_store(*args: object) -> list[reads.Located]:
        rows = planned(*args)  # type: ignore[arg-type]
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
            SeriesDescription="sent again"))
        services.ingest.store_bytes(make_instance(  # a new instance of the study
            StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=new_sop))
        return rows

    monkeypatch.setattr(reads, "expired_instances", plan_then_store)
    assert services.deleter.expire([], 1.0, 10, 100) == 1
    assert _uids(services) == {sop, new_sop}
    assert reads.tombstone(services.index.connection(), made[1][2]) == reads.Tombstone(
        *NO_REASON)
    assert reads.tombstone(services.index.connection(), sop) is None


def test_a_removal_waits_a_bounded_time_for_a_held_instance(services: Services) -> None:
    """An instance whose lock another holder keeps (the mover, stuck on a stalled
    store): the removal fails with InstanceLocked (503 over DICOMweb) after the
    ingest's lock wait, and removes nothing of that chunk."""
    made = _study(services, count=2)
    rows = services.deleter.plan([Target(made[0][0])])
    services.ingest.lock_wait = 0.2
    held = services.ingest.uid_locks([made[1][2]], bounded=False)
    with held, pytest.raises(InstanceLocked):
        services.deleter.remove([reference(r) for r in rows], NODE, audit.APPLICATION_SERVER)
    assert _uids(services) == {d[2] for d in made}
    assert all(reads.tombstone(services.index.connection(), d[2]) is None for d in made)
    outcome = _events(services)[-1]["EventIdentification"]["EventOutcomeIndicator"]
    assert outcome == audit.SERIOUS_FAILURE


def test_once_the_store_leaves_a_deletion_unanswered_the_others_are_left_for_fsck(
        make_services: Callable[..., Services], caplog: pytest.LogCaptureFixture) -> None:
    """A stalled store: the first deletion is not answered (after its timeout); the
    removal tries no other, removes every row, says so in one line, and leaves the key
    unsettled (the deletion may still land, over an object stored there next)."""
    store = CountingStore()
    store.error = UnsettledWrite
    services = make_services(store=store)
    made = _study(services, count=3)
    drain(services)
    rows = services.deleter.plan([Target(made[0][0])])
    store.fail_deletes = True
    with caplog.at_level("WARNING", logger="pacs.core.deletion"):
        removal = services.deleter.remove([reference(r) for r in rows], NODE,
                                          audit.APPLICATION_SERVER)
    store.fail_deletes = False
    assert removal.instances == 3 and removal.objects_left == 3
    assert sum(store.deleted.values()) == 1
    assert len([r for r in caplog.records if "did not answer" in r.getMessage()]) == 1
    assert _uids(services) == set()
    assert reads.unsettled(services.index.connection(), rows[0].object_key)
    assert reconcile(services, repair=True).ok
    assert list(services.store.keys()) == []


def test_a_rejection_note_refused_to_its_sender_is_a_security_alert(
        services: Services) -> None:
    """A note from a sender without the right to remove data is refused, nothing of it
    or of what it names removed, and the attempt recorded as a Security Alert of type
    Use of Restricted Function (PS3.15 A.5.3.11, PS3.16 CID 403) naming the sender."""
    rejected = _study(services, count=1)
    with pytest.raises(NotAuthorized):
        services.ingest.store_bytes(_note(rejected), calling_ae="NOREJECT",
                                    may_reject=False)
    assert rejected[0][2] in _uids(services)
    services.audit.flush(everything=True)
    alerts = [event for event in _events(services)
              if event["EventIdentification"]["EventID"]["originalText"]
              == "Security Alert"]
    assert len(alerts) == 1, alerts
    identification = alerts[0]["EventIdentification"]
    assert identification["EventTypeCode"][0]["csd-code"] == "110132"
    assert identification["EventOutcomeIndicator"] == audit.MINOR_FAILURE
    assert "NOREJECT" in {p["UserID"] for p in alerts[0]["ActiveParticipant"]}


def test_a_refused_note_stays_refused_when_its_alert_cannot_be_written(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    rejected = _study(services, count=1)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError("audit disk gone")

    monkeypatch.setattr(services.audit, "security_alert", broken)
    with pytest.raises(NotAuthorized):
        services.ingest.store_bytes(_note(rejected), may_reject=False)
    assert rejected[0][2] in _uids(services)


def test_each_committed_chunk_of_a_removal_is_audited(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal cut short after some of its chunks (a crash, a failure) leaves the
    record of what those did: each chunk is audited once committed.  Before, one event
    was written after the last chunk, and a removal killed midway had none."""
    from pacs.core import deletion
    made = _study(services, count=5)
    monkeypatch.setattr(deletion, "chunks",
                        lambda items: (items[i:i + 2] for i in range(0, len(items), 2)))
    real = deletion.delete_rows
    calls = []

    def failing_third(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise IndexFailure("simulated")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deletion, "delete_rows", failing_third)
    rows = services.deleter.plan([Target(made[0][0])])
    with pytest.raises(IndexFailure):
        services.deleter.remove([reference(r) for r in rows], NODE, audit.APPLICATION_SERVER)
    assert len(_uids(services)) == 1
    events = [e for e in _events(services)
              if e["EventIdentification"]["EventID"]["originalText"]
              == "DICOM Instances Accessed"]
    outcomes = [e["EventIdentification"]["EventOutcomeIndicator"] for e in events]
    assert outcomes == [audit.SUCCESS, audit.SUCCESS, audit.SERIOUS_FAILURE]
    assert all("2 instance(s)" in e["EventIdentification"]["EventOutcomeDescription"]
               for e in events[:2])


def test_a_rejection_note_cut_short_is_finished_at_start_up(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The note is committed with a pending row, dropped once its removals are done:
    a crash between (here, the removal failing after the note's commit) leaves the row,
    which fsck reports and the node's start-up (``reconcile(full=False)``) finishes, by
    the note's sender; a note applied at once leaves no row."""
    applied = _study(services, count=1)
    services.ingest.store_bytes(_note(applied), calling_ae="QA")
    assert reads.rejections_pending(services.index.connection()) == []
    rejected = _study(services, count=3)
    hook = services.ingest.on_rejection

    def crashed(*_: object) -> None:
        raise IndexFailure("simulated crash before the removals")

    monkeypatch.setattr(services.ingest, "on_rejection", crashed)
    note = _note(rejected)
    with pytest.raises(IndexFailure):
        services.ingest.store_bytes(note, calling_ae="QA")
    monkeypatch.setattr(services.ingest, "on_rejection", hook)
    [pending] = reads.rejections_pending(services.index.connection())
    assert pending.requestor == "QA"
    assert {r[2] for r in rejected} <= _uids(services) and pending.sop_uid in _uids(services)
    # Beside a running node a note pending for less than the grace may be being applied.
    assert reconcile(services, repair=False).findings == []
    dry = reconcile(services, repair=False, temp_grace=0)
    assert [(f.problem, f.done) for f in dry.findings] == [(Problem.UNFINISHED, False)]
    assert not dry.ok
    reconcile(services, full=False)
    assert not {r[2] for r in rejected} & _uids(services)
    assert reads.rejections_pending(services.index.connection()) == []
    last = _events(services)[-1]
    assert last["ActiveParticipant"][0]["UserID"] == "QA"
    assert reconcile(services, repair=False).ok


def test_each_pending_note_is_finished_on_its_own_and_only_while_pending(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A note that cannot be finished (its object gone) does not keep the next one
    from it; a note finished meanwhile (its row dropped) is not applied again."""
    hook = services.ingest.on_rejection

    def crashed(*_: object) -> None:
        raise IndexFailure("simulated crash before the removals")

    first, second = _study(services, count=1), _study(services, count=1)
    monkeypatch.setattr(services.ingest, "on_rejection", crashed)
    notes = []
    for made in (first, second):
        with pytest.raises(IndexFailure):
            services.ingest.store_bytes(_note(made), calling_ae="QA")
        notes.append(reads.rejections_pending(services.index.connection())[-1].sop_uid)
    monkeypatch.setattr(services.ingest, "on_rejection", hook)
    gone = reads.lookup(services.index.connection(), notes[0])
    assert gone is not None
    drain(services)
    services.store.backend.delete(gone.object_key)
    report = reconcile(services, full=False)
    assert [(f.sop_uid, f.done) for f in report.findings] == [(notes[0], False),
                                                              (notes[1], True)]
    assert first[0][2] in _uids(services) and second[0][2] not in _uids(services)
    # Found pending, finished by someone else before its turn: not applied again.
    third = _study(services, count=1)
    monkeypatch.setattr(services.ingest, "on_rejection", crashed)
    with pytest.raises(IndexFailure):
        services.ingest.store_bytes(_note(third), calling_ae="QA")
    monkeypatch.setattr(services.ingest, "on_rejection", hook)
    pending = reads.rejections_pending(services.index.connection())[-1]
    from pacs.core import reconcile as reconcile_module
    [step] = [step for finding, step in reconcile_module._unfinished(services, pending.since)
              if finding.sop_uid == pending.sop_uid]
    with services.index.write() as conn:
        writer.rejection_done(conn, pending.sop_uid)
    assert step() == ""
    assert third[0][2] in _uids(services)


def test_objects_a_removal_cut_short_left_are_deleted_when_it_is_finished(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after a chunk's rows went but before its objects did: the start-up that
    finishes the removal deletes those objects too (no row names them, their UIDs have
    tombstones), rather than leave them to ``pacs fsck``."""
    made = _study(services, count=3)
    drain(services)  # the objects in the store, not the intake
    backend = services.store.backend

    class Killed(BaseException):
        """The process dies as it deletes the first object."""

    def dying(_key: str, _removal: object) -> None:
        raise Killed

    monkeypatch.setattr(services.deleter, "_delete_object", dying)
    monkeypatch.setattr(services.deleter, "_forget_pending", lambda _pending: None)
    who = audit.Participant("admin", True)
    with pytest.raises(Killed):
        services.deleter.remove([reference(r) for r in services.deleter.plan(
            [Target(made[0][0])])], who, audit.WEB_SERVER)
    monkeypatch.undo()
    assert not _uids(services) & {m[2] for m in made}
    left = [key for key in backend.keys() if any(m[2] in key for m in made)]  # noqa: SIM118
    assert len(left) == 3
    reconcile(services, full=False)
    assert not [key for key in backend.keys() if any(m[2] in key for m in made)]  # noqa: SIM118
    assert reads.removals_pending(services.index.connection()) == []


def test_a_removal_cut_short_is_finished_at_start_up(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion (DICOMweb, ``pacs delete``, an expiry) records its places with its
    first chunk: one a crash cut short (here, the process "dies" at its second chunk)
    is finished by the node's start-up, by its requestor, and one that failed with an
    answer (its requestor told) is not kept."""
    from pacs.core import deletion
    made = _study(services, count=5)
    kept = _study(services, count=1)
    monkeypatch.setattr(deletion, "chunks",
                        lambda items: (items[i:i + 2] for i in range(0, len(items), 2)))
    real = deletion.delete_rows
    calls = []

    class Killed(BaseException):
        """The process dies at the second chunk: nothing after runs."""

    def dying_at_the_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deletion, "delete_rows", dying_at_the_second)
    # A dead process runs no handler: nothing forgets the record.
    monkeypatch.setattr(services.deleter, "_forget_pending", lambda _pending: None)
    rows = services.deleter.plan([Target(made[0][0])])
    who = audit.Participant("admin", True, address="10.0.0.7")
    with pytest.raises(Killed):
        services.deleter.remove([reference(r) for r in rows], who, audit.WEB_SERVER)
    monkeypatch.setattr(deletion, "delete_rows", real)
    monkeypatch.undo()
    monkeypatch.setattr(deletion, "chunks",
                        lambda items: (items[i:i + 2] for i in range(0, len(items), 2)))
    assert len(_uids(services) & {m[2] for m in made}) == 3
    [pending] = reads.removals_pending(services.index.connection())
    assert (pending.requestor, pending.address) == ("admin", "10.0.0.7")
    report = reconcile(services, full=False)
    assert [(f.problem, f.done) for f in report.findings] == [(Problem.UNFINISHED, True)]
    assert not _uids(services) & {m[2] for m in made}
    assert kept[0][2] in _uids(services)
    assert reads.removals_pending(services.index.connection()) == []
    assert _events(services)[-1]["ActiveParticipant"][0]["UserID"] == "admin"
    # A removal that fails with an answer leaves no record to finish.
    def failing(*_: object, **__: object) -> None:
        raise IndexFailure("simulated")

    monkeypatch.setattr(deletion, "delete_rows", failing)
    with pytest.raises(IndexFailure):
        services.deleter.remove([reference(r) for r in services.deleter.plan(
            [Target(kept[0][0])])], who, audit.WEB_SERVER)
    assert reads.removals_pending(services.index.connection()) == []
    # Nor one interrupted (Ctrl-C on ``pacs delete``): not finished at the next start.
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(deletion, "delete_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        services.deleter.remove([reference(r) for r in services.deleter.plan(
            [Target(kept[0][0])])], who, audit.WEB_SERVER)
    assert reads.removals_pending(services.index.connection()) == []
    assert kept[0][2] in _uids(services)


def test_a_removal_whose_first_commit_fails_on_a_full_disk_is_never_carried_out(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DELETE answered 503 because the disk is full, where the record of its failure
    cannot be written either: nothing of it was removed, and no start-up carries it
    out after its requestor was told it failed (its pending record goes in the commit
    of its first removal, which failed)."""
    from pacs.core import deletion
    made = _study(services, count=3)

    def full(*_: object, **__: object) -> None:
        raise IndexFailure("index commit failed: database or disk is full")

    monkeypatch.setattr(deletion, "delete_rows", full)
    monkeypatch.setattr(services.deleter, "_forget_pending", full)  # the disk is full
    with pytest.raises(IndexFailure):
        services.deleter.remove([reference(r) for r in services.deleter.plan(
            [Target(made[0][0])])], audit.Participant("admin", True), audit.WEB_SERVER)
    monkeypatch.undo()
    assert reads.removals_pending(services.index.connection()) == []
    reconcile(services, full=False)
    assert {m[2] for m in made} <= _uids(services)


def test_a_removal_carried_out_again_that_fails_stays_pending(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Carried out again at the start-up, nobody is told of a failure: the record is
    kept for the next start-up (or repair), which finishes it."""
    from pacs.core import deletion
    made = _study(services, count=2)
    who = audit.Participant("admin", True)
    places = [reference(r) for r in services.deleter.plan([Target(made[0][0])])]
    with services.index.write() as conn:
        writer.removal_pending(conn, who.user_id, "", audit.WEB_SERVER.code, "",
                               json.dumps([[p.study_uid, p.series_uid, p.sop_uid,
                                            p.change_seq] for p in places]), 0.0)
    real = deletion.delete_rows

    def held(*_: object, **__: object) -> None:
        raise InstanceLocked("held by the mover")

    monkeypatch.setattr(deletion, "delete_rows", held)
    first = reconcile(services, full=False)
    assert [(f.problem, f.done) for f in first.findings] == [(Problem.UNFINISHED, False)]
    assert len(reads.removals_pending(services.index.connection())) == 1
    monkeypatch.setattr(deletion, "delete_rows", real)
    reconcile(services, full=False)
    assert reads.removals_pending(services.index.connection()) == []
    assert not {m[2] for m in made} & _uids(services)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_pacs_delete_stopped_by_a_signal_is_stopped_as_by_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_number: int) -> None:
    """``pacs delete`` stopped by SIGTERM (a service manager, a timeout) or SIGHUP (its
    terminal closed) takes the way of Ctrl-C: stopped with what it did reported, and
    what it had not done forgotten.  Killed by the signal instead, it left its removal
    pending, and the next start of the node finished it without anyone asking."""
    from click.testing import CliRunner

    from pacs.cli import main
    from pacs.core import config, deletion
    from pacs.core.services import build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    settings = config.load(overrides={"PACS_DATA_DIR": str(tmp_path / "data")},
                           env_file=None)
    services = build(settings)
    made = _study(services, count=6)
    services.close()
    monkeypatch.setattr(deletion, "chunks",
                        lambda items: (items[i:i + 2] for i in range(0, len(items), 2)))
    real = deletion.Deleter._remove_chunk
    done: list[int] = []

    def then_stopped(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)  # the chunk's rows and objects removed
        done.append(1)
        if len(done) == 1:
            os.kill(os.getpid(), signal_number)

    monkeypatch.setattr(deletion.Deleter, "_remove_chunk", then_stopped)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM,
                                                                signal.SIGHUP)}
    # Should the command not handle the signal, this test process must survive it.
    signal.signal(signal_number, lambda *_: None)
    try:
        result = CliRunner().invoke(main, ["delete", "--yes", "--quiet", made[0][0]])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert result.exit_code != 0, result.output
    services = build(settings)
    try:
        assert reads.removals_pending(services.index.connection()) == []
        assert len(_uids(services) & {m[2] for m in made}) == 4  # the first chunk went
        reconcile(services, full=False)  # the next start of the node
        assert len(_uids(services) & {m[2] for m in made}) == 4
    finally:
        services.close()
