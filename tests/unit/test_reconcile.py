"""``pacs fsck`` (:mod:`pacs.core.reconcile`): each crash window of store, overwrite and move,
built by hand through the store and index APIs, found by a dry run that changes nothing,
then repaired so that the newest acknowledged version is indexed and served and nothing
acknowledged is lost.

Run over the in-memory store, the folder store and the S3 store (SeaweedFS) alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from falcon import testing
from pydicom.uid import CTImageStorage, generate_uid

from adapters.dicomweb.app import create_app
from pacs.core import ingest as ingest_module
from pacs.core.config import Settings
from pacs.core.index import reads, writer
from pacs.core.ingest import analyse
from pacs.core.reconcile import Action, Problem, Report, reconcile
from pacs.core.services import Services, drain
from pacs.core.storage import exists, object_key
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.memory import MemoryStore
from pacs.core.storage.s3 import S3Store
from tests.conftest import folder_store, sample
from tests.factory import make_instance, make_rejection_note
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture
from tests.storage.test_storage_contract import make_s3_store

pytestmark = pytest.mark.hostile

#: WADO-RS: the instance as stored, whatever its transfer syntax.
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


# --- building instances and crash windows ------------------------------------------------

class Instance:
    """One SOP Instance UID, with versions of it under chosen study / series UIDs."""

    def __init__(self) -> None:
        self.sop = generate_uid()

    def version(self, description: str, study: str | None = None,
                series: str | None = None) -> tuple[str, bytes]:
        """(object key, Part 10 bytes) of a version told apart by its description."""
        ds = pydicom.dcmread(sample("CT_small.dcm"))
        ds.StudyInstanceUID = study or generate_uid()
        ds.SeriesInstanceUID = series or generate_uid()
        ds.SOPInstanceUID = self.sop
        ds.file_meta.MediaStorageSOPInstanceUID = self.sop
        ds.SeriesDescription = description
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return object_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, self.sop), out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(services: Services, key: str, data: bytes) -> None:
    """Write an object as the ingest's store step does, without indexing it."""
    services.store.put(key, io.BytesIO(data), len(data))


def read(services: Services, key: str) -> bytes:
    with services.store.open(key) as stream:
        return stream.read()


def row(services: Services, sop: str) -> writer.StoredInstance | None:
    return writer.lookup(services.index.connection(), sop)


def answer(services: Services, key: str) -> testing.Result:
    """WADO-RS's answer for the instance (by its study / series / instance path)."""
    study, series, name = key.split("/")
    return testing.TestClient(create_app(services)).simulate_get(
        f"/studies/{study}/series/{series}/instances/{name.removesuffix('.dcm')}",
        headers={"Accept": AS_STORED})


def served(services: Services, key: str) -> bytes:
    """The instance as WADO-RS sends it."""
    result = answer(services, key)
    assert result.status_code == 200, result.text
    boundary = result.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    [part] = result.content.split(f"--{boundary}".encode())[1:-1]
    return part.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n")


def quarantined(services: Services) -> dict[str, bytes]:
    """Every quarantined object by its key (below the run's folder)."""
    store = services.store.backend
    if isinstance(store, MemoryStore):
        return {name.split("/", 2)[2]: data for name, data in store.quarantined.items()}
    if isinstance(store, S3Store):
        prefix = f"{store.customer}/quarantine/"
        kept = {}
        for item in store._client.list_objects(bucket_name=store.bucket, prefix=prefix,
                                               recursive=True):
            response = store._client.get_object(bucket_name=store.bucket,
                                                object_name=item.object_name)
            kept[item.object_name.removeprefix(prefix).split("/", 1)[1]] = response.read()
            response.close()
            response.release_conn()
        return kept
    assert isinstance(store, FileStore)
    root = store.quarantine_root
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix().split("/", 1)[1]: p.read_bytes()
            for p in root.rglob("*.dcm")}


def state(services: Services) -> tuple[object, ...]:
    """Everything a repair may change: rows, objects with their bytes, the quarantine."""
    conn = services.index.connection()
    return (writer.all_objects(conn), writer.counts(conn),
            {key: read(services, key) for key in services.store.keys()},  # noqa: SIM118 - a Store
            quarantined(services))


def assert_newest(services: Services, instance: Instance, key: str, data: bytes) -> None:
    """The row names ``key`` with ``data``'s checksum, and ``data`` is what is served."""
    indexed = row(services, instance.sop)
    assert indexed is not None, "the instance is no longer indexed"
    assert (indexed.object_key, indexed.checksum, indexed.size) == (key, sha(data), len(data))
    assert read(services, key) == data
    assert served(services, key) == data


def found(report: Report) -> list[tuple[Problem, Action, str]]:
    return sorted(((f.problem, f.action, f.key) for f in report.findings), key=str)


def dry_then_repair(services: Services, *expected: tuple[Problem, Action, str]) -> Report:
    """A dry run lists ``expected`` (problem, action, key) and changes nothing; the
    repair carries each out; a second run finds nothing."""
    before = state(services)
    dry = reconcile(services, repair=False)
    assert state(services) == before, "the dry run changed something"
    assert found(dry) == sorted(expected, key=str)
    assert not dry.ok and not any(f.done for f in dry.findings)
    fixed = reconcile(services, repair=True)
    assert found(fixed) == sorted(expected, key=str)
    assert fixed.ok and all(f.done for f in fixed.findings), list(fixed.lines())
    again = reconcile(services, repair=False)
    assert again.findings == [] and again.ok, list(again.lines())
    return fixed


@pytest.fixture(params=["memory", "file", pytest.param("s3", marks=pytest.mark.interop)])
def node(request: pytest.FixtureRequest, make_services: Callable[..., Services]) -> Services:
    """Services over the in-memory store, the folder store in a temporary folder, or an
    S3 bucket (a customer prefix of its own)."""
    if request.param == "s3":
        server: SeaweedS3 = request.getfixturevalue("seaweed_s3")
        store = make_s3_store(server)
        store.check()
        return make_services(store=store)
    return make_services(store=MemoryStore() if request.param == "memory" else None)


# --- the crash windows -----------------------------------------------------------------

def test_agreeing_index_and_store_report_nothing(node: Services) -> None:
    instance = Instance()
    _key, data = instance.version("A")
    node.ingest.store_bytes(data)
    report = reconcile(node, repair=True)
    assert report.ok and report.findings == []
    assert (report.rows, report.objects) == (1, 1)
    assert list(report.lines())[-1] == "index and store agree"


def test_move_committed_old_copy_left_keeps_the_newest_acknowledged(node: Services) -> None:
    """(c) The known failure: the UID re-sent under another study, committed, and the
    crash came before the old copy was deleted.  The row's object (B) stays indexed
    and served; the old copy (A) goes to the quarantine, not back into the index."""
    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    node.ingest.store_bytes(old)
    node.ingest.store_bytes(new)  # acknowledged last; the ingest deleted A's object
    put(node, old_key, old)  # ... which the crash left behind
    report = dry_then_repair(node, (Problem.SUPERSEDED, Action.QUARANTINE, old_key))
    assert_newest(node, instance, new_key, new)
    assert not exists(node.store, old_key)
    assert quarantined(node) == {old_key: old}  # nothing is deleted
    assert report.ok and report.count(Action.QUARANTINE) == 1
    [finding] = report.findings
    assert finding.moved_to.endswith(old_key) and finding.sop_uid == instance.sop
    text = "\n".join(report.lines())
    assert f"-> quarantine: done, moved to {finding.moved_to}" in text
    assert "indexed: 0, quarantined: 1, rows dropped: 0" in text


def test_move_written_not_committed_keeps_the_acknowledged_row(node: Services) -> None:
    """(b) The UID re-sent under another series: the new object written, the crash
    before its commit.  It was never acknowledged: the row's object (A) stays."""
    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    node.ingest.store_bytes(old)
    put(node, new_key, new)
    dry_then_repair(node, (Problem.SUPERSEDED, Action.QUARANTINE, new_key))
    assert_newest(node, instance, old_key, old)
    assert quarantined(node) == {new_key: new}


def test_new_instance_written_not_committed_is_indexed(node: Services) -> None:
    """(b) A new UID: the object durable, the crash before its commit.  Nothing of it
    was acknowledged; it is indexed (so a resend is an unchanged duplicate)."""
    instance = Instance()
    key, data = instance.version("A")
    put(node, key, data)
    assert row(node, instance.sop) is None
    dry_then_repair(node, (Problem.UNACKNOWLEDGED, Action.INDEX, key))
    assert_newest(node, instance, key, data)
    assert node.ingest.store_bytes(data).outcome.value == "unchanged"


def test_a_rejection_note_written_not_committed_is_indexed_and_applied(
        node: Services) -> None:
    """(b) for an IOCM rejection note: indexed as its store would have, and applied -
    what it rejects removed, nothing left pending - as ``pacs reindex`` does."""
    stored = make_instance(PatientID="P1")
    kept = make_instance(PatientID="P1")
    results = [node.ingest.store_bytes(data) for data in (stored, kept)]
    rejected = results[0]
    note = make_rejection_note([(rejected.study_uid, rejected.series_uid,
                                 rejected.sop_instance_uid, CTImageStorage)])
    analysis = analyse(note)
    key = object_key(analysis.study_uid, analysis.series_uid, analysis.sop_instance_uid)
    drain(node)
    put(node, key, note)
    dry_then_repair(node, (Problem.UNACKNOWLEDGED, Action.INDEX, key))
    conn = node.index.connection()
    assert row(node, rejected.sop_instance_uid) is None
    assert row(node, results[1].sop_instance_uid) is not None
    assert row(node, analysis.sop_instance_uid) is not None
    assert reads.rejections_pending(conn) == []
    assert reads.tombstone(conn, rejected.sop_instance_uid) is not None


def test_several_unindexed_copies_of_a_new_instance_index_one_and_keep_the_others(
        node: Services) -> None:
    instance = Instance()
    first_key, first = instance.version("A")
    second_key, second = instance.version("B")
    put(node, first_key, first)
    if isinstance(node.store.backend, FileStore):  # the folder store orders them by time
        os.utime(node.store.backend.local_file(first_key), (1, 1))
    put(node, second_key, second)
    # The folder store's times tell the later write; without them, the key order.
    chosen = second_key if isinstance(node.store.backend, FileStore) else max(first_key, second_key)
    other = first_key if chosen == second_key else second_key
    dry_then_repair(node, (Problem.UNACKNOWLEDGED, Action.INDEX, chosen),
                    (Problem.SUPERSEDED, Action.QUARANTINE, other))
    data = {first_key: first, second_key: second}
    assert_newest(node, instance, chosen, data[chosen])
    assert quarantined(node) == {other: data[other]}


def test_overwrite_in_place_not_committed_indexes_what_is_stored(
        node: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """(d) The same key overwritten (same study and series) by an object large enough
    to be written there directly (here: any), the crash before the commit: the rename
    replaced the acknowledged bytes.  The row then describes the stored object, so
    that index, metadata and served bytes agree."""
    monkeypatch.setattr(ingest_module, "DIRECT_OVERWRITE_BYTES", 0)
    instance = Instance()
    study, series = generate_uid(), generate_uid()
    key, old = instance.version("A", study, series)
    same_key, new = instance.version("B", study, series)
    assert key == same_key
    node.ingest.store_bytes(old)
    put(node, key, new)
    dry_then_repair(node, (Problem.REWRITTEN, Action.INDEX, key))
    assert_newest(node, instance, key, new)
    conn = node.index.connection()
    assert conn.execute("SELECT series_description FROM series WHERE series_uid = ?",
                        (series,)).fetchone() == ("B",)


def _reported_and_left(node: Services, key: str) -> Report:
    """Reconcile with and without repair: the object at ``key`` is reported damaged,
    each time, and nothing changes; the last report."""
    before = state(node)
    for repair in (False, True):
        report = reconcile(node, repair=repair)
        assert [(f.problem, f.action, f.key) for f in report.findings] == [
            (Problem.DAMAGED, Action.NONE, key)]
        assert not report.ok
        assert state(node) == before
    return report


def test_a_changed_object_too_small_to_be_a_direct_overwrite_is_damaged(
        node: Services) -> None:
    """(d) An object that reads as a version of the instance at its key, but of a size
    whose later write would have gone through the intake: changed outside the node (a
    flipped byte, an edited Patient ID).  Reported and left, its row keeping the
    acknowledged checksum and values - never indexed as if the node had stored it."""
    instance = Instance()
    study, series = generate_uid(), generate_uid()
    key, old = instance.version("A", study, series)
    _, edited = instance.version("B", study, series)
    node.ingest.store_bytes(old)
    drain(node)
    put(node, key, edited)
    _reported_and_left(node, key)
    row = writer.lookup(node.index.connection(), instance.sop)
    assert row is not None and row.checksum == hashlib.sha256(old).hexdigest()


def test_a_damaged_indexed_object_is_reported_and_left(node: Services) -> None:
    """(d) An indexed object that is not that instance any more: never dropped, never
    indexed; the report says it cannot be repaired."""
    instance = Instance()
    key, data = instance.version("A")
    node.ingest.store_bytes(data)
    put(node, key, data[:1000])
    report = _reported_and_left(node, key)
    assert "cannot be repaired" in "\n".join(report.lines())


def test_a_row_whose_object_is_gone_is_dropped(node: Services) -> None:
    """(e) No object, no copy: until the repair the instance is listed but cannot be
    sent (WADO-RS answers 404); then the row goes, with its empty parents
    (two instances beside it keep their objects: the store is plausibly the node's)."""
    for description in ("kept 1", "kept 2"):
        node.ingest.store_bytes(Instance().version(description)[1])
    instance = Instance()
    key, data = instance.version("A")
    node.ingest.store_bytes(data)
    node.store.delete(key)
    assert answer(node, key).status_code == 404
    dry_then_repair(node, (Problem.MISSING, Action.DROP_ROW, key))
    assert row(node, instance.sop) is None
    assert writer.counts(node.index.connection()) == {
        "patient": 1, "study": 2, "series": 2, "instance": 2}


def test_a_row_whose_object_is_gone_takes_the_copy_left_elsewhere(node: Services) -> None:
    """(e) The row's object gone, an older copy of the UID at another key: that copy is
    indexed instead of dropping the instance."""
    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    node.ingest.store_bytes(old)
    node.ingest.store_bytes(new)
    put(node, old_key, old)
    node.store.delete(new_key)
    dry_then_repair(node, (Problem.MISSING, Action.INDEX, new_key))
    assert_newest(node, instance, old_key, old)


def _stored(services: Services, count: int) -> list[str]:
    """Store ``count`` instances and move them to the store; their object keys."""
    keys = []
    for number in range(count):
        key, data = Instance().version(f"instance {number}")
        services.ingest.store_bytes(data)
        keys.append(key)
    drain(services)
    return keys


def test_repair_refuses_a_store_that_lists_nothing(node: Services) -> None:
    """A store answering but empty while the index has rows (a folder not mounted, a
    wrong bucket): every row would be dropped by assumption.  The dry run says repair
    would refuse; repair changes nothing, reports why and is not ok; only
    ``allow_mass_drop`` drops the rows."""
    keys = _stored(node, 3)
    for key in keys:
        node.store.delete(key)
    before = state(node)

    dry = reconcile(node, repair=False)
    assert dry.absent == 3 and "lists no objects" in dry.implausible
    assert any("would refuse" in line for line in dry.lines())
    refused = reconcile(node, repair=True)
    assert state(node) == before, "a refused repair changed something"
    assert "lists no objects while the index has 3 row(s)" in refused.refused
    assert not refused.ok and not any(f.done for f in refused.findings)
    assert found(refused) == sorted(((Problem.MISSING, Action.DROP_ROW, key) for key in keys),
                                    key=str)
    assert list(refused.lines())[-1].startswith("repair refused, nothing changed")
    assert refused.as_json()["refused"] == refused.refused

    allowed = reconcile(node, repair=True, allow_mass_drop=True)
    assert allowed.ok and allowed.count(Action.DROP_ROW) == 3, list(allowed.lines())
    assert writer.counts(node.index.connection())["instance"] == 0


def test_repair_refuses_when_more_than_half_the_objects_are_missing(node: Services) -> None:
    """Half of the indexed instances without an object is repaired; more is refused
    (nothing quarantined, indexed or dropped) unless ``allow_mass_drop``."""
    keys = _stored(node, 4)
    for key in keys[:2]:
        node.store.delete(key)
    half = reconcile(node, repair=True)
    assert half.ok and half.count(Action.DROP_ROW) == 2 and not half.implausible

    keys += _stored(node, 2)  # 4 rows: 2 + 2 new
    for key in keys[2:5]:
        node.store.delete(key)
    unindexed = Instance().version("stored, never indexed")
    put(node, *unindexed)
    before = state(node)
    refused = reconcile(node, repair=True)
    assert "lacks 3 of the 4 indexed objects" in refused.refused, refused.as_json()
    assert state(node) == before and not refused.ok
    assert {f.problem for f in refused.findings} == {Problem.MISSING, Problem.UNACKNOWLEDGED}

    allowed = reconcile(node, repair=True, allow_mass_drop=True)
    assert allowed.ok and allowed.count(Action.DROP_ROW) == 3
    assert allowed.count(Action.INDEX) == 1
    assert set(writer.all_objects(node.index.connection())) == {keys[5], unindexed[0]}


def test_an_unreadable_unindexed_object_is_quarantined(node: Services) -> None:
    instance = Instance()
    key, _data = instance.version("A")
    put(node, key, b"not DICOM" * 20)
    report = dry_then_repair(node, (Problem.UNREADABLE, Action.QUARANTINE, key))
    assert quarantined(node) == {key: b"not DICOM" * 20}
    assert row(node, instance.sop) is None
    assert "not a readable instance" in report.findings[0].note


def test_an_object_whose_content_names_another_key_is_not_indexed(node: Services) -> None:
    instance = Instance()
    _key, data = instance.version("A")
    wrong = object_key(generate_uid(), generate_uid(), instance.sop)
    put(node, wrong, data)
    dry_then_repair(node, (Problem.UNREADABLE, Action.QUARANTINE, wrong))
    assert row(node, instance.sop) is None
    assert quarantined(node) == {wrong: data}


def test_temporaries_older_than_the_grace_are_removed(
        make_services: Callable[..., Services], settings: Settings) -> None:
    """(a) A temporary file of an interrupted write: never acknowledged.  A recent one
    may belong to a write in progress and is left alone."""
    services = make_services()
    assert isinstance(services.store.backend, FileStore)
    folder = settings.objects_dir / "1.2.3" / "4.5.6"
    folder.mkdir(parents=True)
    stale, recent = folder / ".tmp-stale", folder / ".tmp-recent"
    stale.write_bytes(b"x" * 100)
    recent.write_bytes(b"y" * 100)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    dry = reconcile(services)
    assert [(f.problem, f.key) for f in dry.findings] == [
        (Problem.TEMPORARY, "1.2.3/4.5.6/.tmp-stale")]
    assert stale.exists() and dry.recent_temporaries == 1
    fixed = reconcile(services, repair=True)
    assert fixed.ok and fixed.temporaries == 1
    assert not stale.exists() and recent.exists()


def test_start_up_clean_up_removes_every_temporary(make_services: Callable[..., Services],
                                                   settings: Settings) -> None:
    services = make_services()
    folder = settings.objects_dir / "1.2.3" / "4.5.6"
    folder.mkdir(parents=True)
    (folder / ".tmp-a").write_bytes(b"x")
    assert reconcile(services, full=False).temporaries == 1
    assert not (folder / ".tmp-a").exists()


def test_quick_mode_compares_sizes(node: Services) -> None:
    instance = Instance()
    study, series = generate_uid(), generate_uid()
    key, old = instance.version("A", study, series)
    _, same_size = instance.version("B", study, series)  # one letter differs
    node.ingest.store_bytes(old)
    put(node, key, same_size)
    assert reconcile(node, checksums=False).findings == []
    assert [f.problem for f in reconcile(node).findings] == [Problem.DAMAGED]


# --- beside a running node ----------------------------------------------------------------

def test_repair_waits_for_the_ingest_lock_of_the_uid(node: Services) -> None:
    """fsck decides under the same per-UID lock as ingest: while an ingest holds it,
    the repair of that UID waits."""
    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    node.ingest.store_bytes(old)
    node.ingest.store_bytes(new)
    put(node, old_key, old)
    reports: list[Report] = []
    with node.ingest.uid_lock(instance.sop):
        worker = threading.Thread(target=lambda: reports.append(
            reconcile(node, repair=True)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the repair did not wait for the lock"
        assert exists(node.store, old_key)
    worker.join(60)
    assert not worker.is_alive() and reports[0].ok
    assert_newest(node, instance, new_key, new)


def test_a_store_failure_is_reported_and_changes_nothing(node: Services,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pacs.core.errors import StorageError

    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    node.ingest.store_bytes(old)
    node.ingest.store_bytes(new)
    put(node, old_key, old)

    def failing(key: str, folder: str) -> str:
        raise StorageError("simulated failure")

    monkeypatch.setattr(node.store.backend, "quarantine", failing)
    report = reconcile(node, repair=True)
    assert not report.ok
    [finding] = report.findings
    assert not finding.done and "simulated failure" in finding.error
    assert "FAILED" in "\n".join(report.lines())
    assert_newest(node, instance, new_key, new)
    assert read(node, old_key) == old


def test_report_as_json(node: Services) -> None:
    instance = Instance()
    key, data = instance.version("A")
    put(node, key, data)
    found = reconcile(node).as_json()
    assert found["ok"] is False and found["repair"] is False
    assert found["findings"] == [{
        "problem": "unacknowledged", "action": "index", "sop_instance_uid": instance.sop,
        "key": key, "note": "stored, never indexed", "done": False, "moved_to": "",
        "error": ""}]


def test_quarantine_of_the_folder_store_keeps_the_file(tmp_path: Path) -> None:
    store = folder_store(tmp_path / "objects")
    key = object_key("1.2.3", "4.5.6", "7.8.9")
    store.put(key, io.BytesIO(b"abc"), 3)
    where = store.quarantine(key, "fsck-1")
    assert Path(where) == tmp_path / "quarantine" / "fsck-1" / key
    assert Path(where).read_bytes() == b"abc"
    assert not exists(store, key) and list(store.keys()) == []


class _NoQuarantine:
    """A memory store seen through the core interface alone: no Quarantine capability."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def put(self, key: str, source: io.BytesIO, length: int) -> None:
        self.inner.put(key, source, length)

    def open(self, key: str) -> io.BytesIO:
        return self.inner.open(key)  # type: ignore[return-value]

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self) -> object:
        return self.inner.keys()

    def check(self, create: bool = True) -> None:
        """Always usable."""

    def close(self) -> None:
        """Nothing to release."""


def test_a_store_that_cannot_quarantine_reports_and_keeps_the_object(
        make_services: Callable[..., Services]) -> None:
    """Without the Quarantine capability the superseded copy is reported, left in place
    and never deleted; the repair says it is left."""
    services = make_services(store=_NoQuarantine())
    instance = Instance()
    old_key, old = instance.version("A")
    new_key, new = instance.version("B")
    services.ingest.store_bytes(old)
    services.ingest.store_bytes(new)
    put(services, old_key, old)
    report = reconcile(services, repair=True)
    [finding] = report.findings
    assert (finding.problem, finding.action, finding.key) == (
        Problem.SUPERSEDED, Action.NONE, old_key)
    assert "cannot quarantine" in finding.note and not finding.done
    assert not report.ok and "cannot be repaired" in "\n".join(report.lines())
    assert read(services, old_key) == old
    assert_newest(services, instance, new_key, new)
