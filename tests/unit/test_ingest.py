"""The ingest path over an in-memory store: outcomes, policies, failures."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs.core import dataset, ingest as ingest_module
from pacs.core.errors import (
    DuplicateRejected,
    IndexFailure,
    InvalidInstance,
    InvalidUID,
    ObjectTooLarge,
    StorageError,
    UIDMismatch,
    UnreadableData,
    WriteNotMade,
)
from pacs.core.index import writer
from pacs.core.index.connection import Index
from pacs.core.ingest import Outcome, Received
from pacs.core.services import Services, drain
from pacs.core.storage import filesystem, object_key
from pacs.core.storage.memory import MemoryStore
from tests.conftest import folder_store, sample
from tests.factory import dataset_bytes, make_instance, part10, relabelled


def _bytes(name: str = "CT_small.dcm", **changes: str) -> bytes:
    ds = dcmread(sample(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _row(services: Services, sop_uid: str) -> writer.StoredInstance | None:
    return writer.lookup(services.index.connection(), sop_uid)


def _stored(services: Services) -> dict[str, bytes]:
    """Every object as readers see it (the intake first, then the store)."""
    found = {}
    for key in services.store.keys():  # noqa: SIM118 - a store, not a dict
        with services.store.open(key) as stream:
            found[key] = stream.read()
    return found


def test_store_writes_object_and_index(services: Services, memory_store: MemoryStore) -> None:
    data = sample("CT_small.dcm").read_bytes()
    result = services.ingest.store_bytes(data, calling_ae="MOD")
    assert result.outcome is Outcome.STORED
    row = _row(services, result.sop_instance_uid)
    assert row is not None
    assert memory_store.objects == {}  # acknowledged from the intake
    assert _stored(services)[row.object_key] == data
    assert drain(services) == 1
    assert memory_store.objects[row.object_key] == data
    assert _stored(services) == memory_store.objects
    assert row.object_key == f"{result.study_uid}/{result.series_uid}/{result.sop_instance_uid}.dcm"
    assert row.checksum == hashlib.sha256(data).hexdigest()
    assert row.size == len(data)
    conn = services.index.connection()
    assert writer.counts(conn) == {"patient": 1, "study": 1, "series": 1, "instance": 1}
    name, folded, ae = conn.execute(
        "SELECT patient.patient_name, patient.patient_name_folded, calling_ae FROM patient "
        "JOIN study ON study.patient_pk = patient.pk JOIN series ON series.study_pk = study.pk "
        "JOIN instance ON instance.series_pk = series.pk").fetchone()
    assert name == "CompressedSamples^CT1"
    assert folded == "COMPRESSEDSAMPLES^CT1"
    assert ae == "MOD"


def test_same_object_twice_is_unchanged(services: Services) -> None:
    data = sample("CT_small.dcm").read_bytes()
    services.ingest.store_bytes(data)
    assert services.ingest.store_bytes(data).outcome is Outcome.UNCHANGED


def test_the_same_data_set_in_another_transfer_syntax_is_another_object(
        services: Services) -> None:
    """PS3.10 7.1: the Transfer Syntax UID says how the data set's bytes are read; the
    same bytes under another syntax are another object (replaced by the default
    policy), not the one stored."""
    data = sample("SC_rgb_jpeg_dcmtk.dcm").read_bytes()
    rle = relabelled(data, "1.2.840.10008.1.2.5")  # RLE Lossless: encapsulated too
    assert services.ingest.store_bytes(data).outcome is Outcome.STORED
    assert services.ingest.store_bytes(rle).outcome is Outcome.REPLACED
    [syntax] = services.index.connection().execute(
        "SELECT transfer_syntax FROM instance").fetchone()
    assert syntax == "1.2.840.10008.1.2.5"


@pytest.mark.parametrize("policy, outcome", [("overwrite", Outcome.REPLACED),
                                             ("keep", Outcome.KEPT_FIRST)])
def test_different_object_same_uid(make_services: Callable[..., Services], policy: str,
                                   outcome: Outcome) -> None:
    store = MemoryStore()
    services = make_services(store=store, duplicate_policy=policy)
    first, second = _bytes(), _bytes(StudyDescription="changed")
    services.ingest.store_bytes(first)
    result = services.ingest.store_bytes(second)
    assert result.outcome is outcome
    row = _row(services, result.sop_instance_uid)
    assert row is not None
    expected = second if policy == "overwrite" else first
    assert _stored(services)[row.object_key] == expected
    drain(services)
    assert store.objects[row.object_key] == expected
    assert row.checksum == hashlib.sha256(expected).hexdigest()  # index matches the object


def test_reject_policy(make_services: Callable[..., Services]) -> None:
    services = make_services(store=MemoryStore(), duplicate_policy="reject")
    services.ingest.store_bytes(_bytes())
    with pytest.raises(DuplicateRejected):
        services.ingest.store_bytes(_bytes(StudyDescription="changed"))


def test_overwrite_moving_series_leaves_no_empty_parents(services: Services,
                                                         memory_store: MemoryStore) -> None:
    services.ingest.store_bytes(_bytes())
    result = services.ingest.store_bytes(_bytes(SeriesInstanceUID="1.2.3.4", PatientID="P2"))
    conn = services.index.connection()
    assert writer.counts(conn) == {"patient": 1, "study": 1, "series": 1, "instance": 1}
    assert list(_stored(services)) == [
        f"{result.study_uid}/1.2.3.4/{result.sop_instance_uid}.dcm"]
    drain(services)
    assert list(memory_store.objects) == list(_stored(services))


def test_uid_mismatch(services: Services, memory_store: MemoryStore) -> None:
    data = sample("CT_small.dcm").read_bytes()
    with pytest.raises(UIDMismatch):
        services.ingest.store_bytes(data, expected=("1.2.840.10008.5.1.4.1.1.2", "1.2.3"))
    with pytest.raises(InvalidUID):
        services.ingest.store_bytes(data, expected=("1.2.840.10008.5.1.4.1.1.2", "1.2.x"))
    assert _stored(services) == {}


def _appended(syntax: str, tag: int, value: bytes, **attributes: object) -> bytes:
    """A CT object in ``syntax`` with one more top-level element after its pixel data
    (PS3.5 7.1 breached: the tags no longer ascend), encoded by hand."""
    value += b"\0" * (len(value) % 2)
    group, element = tag >> 16, tag & 0xFFFF
    implicit = syntax == ImplicitVRLittleEndian
    extra = (struct.pack("<HHI", group, element, len(value)) if implicit else
             struct.pack("<HH2sH", group, element, b"UI" if group == 0x0020 else b"LO",
                         len(value))) + value
    ds = dcmread(DicomBytesIO(make_instance(**attributes)))
    data = part10(ds, syntax)
    if syntax != DeflatedExplicitVRLittleEndian:
        return data + extra
    body = dataset_bytes(data)
    inflated = zlib.decompress(body, -15) + extra
    squeeze = zlib.compressobj(wbits=-15)
    return data[:len(data) - len(body)] + squeeze.compress(inflated) + squeeze.flush()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_elements_repeated_or_after_the_pixel_data_are_refused_and_stored_ones_still_read(
        services: Services, syntax: str) -> None:
    """PS3.5 7.1: a Study Instance UID repeated after the pixel data (pydicom readers
    of the object would see it, the index the first), or a Patient ID that comes only
    there (past the header the index reads), is refused (C000 / 400): alone and in a
    batch, nothing kept.  Read again (by fsck, reindex), such an object still parses,
    its ambiguity reported."""
    repeated = _appended(syntax, 0x0020000D, b"1.2.777", StudyInstanceUID="1.2.3.9")
    late = _appended(syntax, 0x00100020, b"PID-LATE", PatientID=None)
    for data in (repeated, late):
        with pytest.raises(UnreadableData, match="repeated, or placed after the pixel"):
            services.ingest.store_bytes(data)
        (result,) = services.ingest.store_batch([Received.of(data)])
        assert isinstance(result, UnreadableData)
        read = dataset.read_part10(data)
        assert not read.unambiguous
    assert dataset.read_part10(repeated).study_uid == "1.2.3.9"
    assert _stored(services) == {}
    assert writer.counts(services.index.connection())["instance"] == 0
    assert dataset.read_part10(make_instance()).unambiguous
    walked = dataset_bytes(repeated)
    assert not dataset.check_complete(memoryview(walked), syntax)
    assert dataset.check_complete(memoryview(dataset_bytes(part10(
        dcmread(DicomBytesIO(make_instance())), syntax))), syntax)


def test_elements_out_of_order_before_the_pixel_data_are_taken(services: Services) -> None:
    """Out of order but each once, before the pixel data: every reader (and the index)
    sorts them alike, so a sloppy writer's object is stored as sent."""
    data = make_instance(PatientID="P-ORDER")
    body = dataset_bytes(data)
    first = 8 + struct.unpack_from("<H", body, 6)[0]  # the first element, moved down
    moved = body[first:]
    pixels = moved.index(b"\xe0\x7f\x10\x00")
    shuffled = data[:len(data) - len(body)] + moved[:pixels] + body[:first] + moved[pixels:]
    assert dataset.read_part10(shuffled).unambiguous
    assert services.ingest.store_bytes(shuffled).outcome is Outcome.STORED


def test_store_failure_leaves_nothing(make_services: Callable[..., Services],
                                      memory_store: MemoryStore) -> None:
    """The direct path (no intake): the store's failure fails the object."""
    services = make_services(store=memory_store, intake_object_bytes=0)
    memory_store.fail_puts = True
    with pytest.raises(StorageError):
        services.ingest.store_bytes(sample("CT_small.dcm").read_bytes())
    assert memory_store.objects == {}
    assert writer.counts(services.index.connection())["instance"] == 0


def test_index_failure_removes_the_object(services: Services, memory_store: MemoryStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise IndexFailure("simulated")

    monkeypatch.setattr(writer, "upsert", broken)
    with pytest.raises(IndexFailure):
        services.ingest.store_bytes(sample("CT_small.dcm").read_bytes())
    assert memory_store.objects == {}
    assert _stored(services) == {}


@pytest.mark.parametrize("intake", [True, False])
def test_index_failure_on_overwrite_restores_the_previous_object(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        monkeypatch: pytest.MonkeyPatch, intake: bool) -> None:
    services = make_services(store=memory_store,
                             **({} if intake else {"intake_object_bytes": 0}))
    first = _bytes()
    services.ingest.store_bytes(first)

    def broken(*_: object, **__: object) -> None:
        raise IndexFailure("simulated")

    monkeypatch.setattr(writer, "upsert", broken)
    with pytest.raises(IndexFailure):
        services.ingest.store_bytes(_bytes(StudyDescription="changed"))
    assert list(_stored(services).values()) == [first]


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_an_interrupt_after_the_commit_keeps_the_object_the_row_names(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        monkeypatch: pytest.MonkeyPatch, overwrite: bool, batch: bool) -> None:
    """A Ctrl-C of ``pacs import`` (any exception), or a failure a STOW-RS batch's
    commit reports, that arrives once SQLite committed the row of an object written
    to the store directly: the row names that object, which stays, unchanged; undone
    as after a failed commit, the row named none (or the previous object, under the
    new one's checksum)."""
    services = make_services(store=memory_store, intake_object_bytes=0)
    if overwrite:
        services.ingest.store_bytes(_bytes())
    new = _bytes(StudyDescription="changed")
    commit_all = Index.commit_all

    def interrupted(index: Index, works: list[Any]) -> list[BaseException | None]:
        commit_all(index, works)
        raise KeyboardInterrupt  # the commit is on disk, its caller never hears

    def reported_failed(index: Index, works: list[Any]) -> list[BaseException | None]:
        commit_all(index, works)  # on disk, then reported failed (an I/O error)
        return [IndexFailure("index commit failed: disk I/O error")] * len(works)

    if batch:
        monkeypatch.setattr(Index, "commit_all", reported_failed)
        [result] = services.ingest.store_batch([Received.of(new)])
        assert isinstance(result, IndexFailure)
    else:
        monkeypatch.setattr(Index, "commit_all", interrupted)
        with pytest.raises(KeyboardInterrupt):
            services.ingest.store_bytes(new)
    monkeypatch.undo()
    assert list(_stored(services).values()) == [new]
    row = _row(services, dcmread(io.BytesIO(new)).SOPInstanceUID)
    assert row is not None and row.checksum == hashlib.sha256(new).hexdigest()


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_a_failed_folder_sync_on_overwrite_restores_the_previous_object(
        make_services: Callable[..., Services], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, batch: bool) -> None:
    """An object too large for the intake (DIRECT_OVERWRITE_BYTES, made small here) that
    replaces another at its key: the folder store renames the new object over the
    previous one, then fsyncs the folder; when that fsync fails the sender is refused,
    and the previous object (the one the index still describes) is back at its key."""
    monkeypatch.setattr(ingest_module, "DIRECT_OVERWRITE_BYTES", 1)
    store = folder_store(tmp_path / "objects")
    services = make_services(store=store, intake_object_bytes=0)
    first = _bytes()
    services.ingest.store_bytes(first)
    key = _row(services, dcmread(DicomBytesIO(first)).SOPInstanceUID).object_key
    real_fsync_dir = filesystem._fsync_dir
    failures = iter([OSError(errno.EIO, "simulated")])

    def fsync_dir_failing_once(path: Path) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_fsync_dir(path)

    monkeypatch.setattr(filesystem, "_fsync_dir", fsync_dir_failing_once)
    second = _bytes(StudyDescription="changed")
    if batch:
        assert isinstance(services.ingest.store_batch([Received.of(second)])[0],
                          StorageError)
    else:
        with pytest.raises(StorageError):
            services.ingest.store_bytes(second)
    assert next(failures, None) is None  # the failure did happen where intended
    assert (tmp_path / "objects" / key).read_bytes() == first
    assert list(_stored(services).values()) == [first]


def test_a_study_folder_another_writer_made_is_synced_in_the_store_s_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker made the study folder and has not fsynced the root yet; this one
    makes a series folder in it and writes an object there: the root is fsynced too,
    or a power failure could take the study folder's entry, and the acknowledged
    object with it."""
    root = tmp_path / "objects"
    store = folder_store(root)
    key = object_key("1.2.826.0.1.3680043.8.498.90", "1.2.826.0.1.3680043.8.498.90.1",
                     "1.2.826.0.1.3680043.8.498.90.1.1")
    (root / key).parent.parent.mkdir(parents=True)  # the other writer's study folder
    synced: list[Path] = []
    real_fsync_dir = filesystem._fsync_dir

    def recorded(path: Path) -> None:
        synced.append(Path(path))
        real_fsync_dir(path)

    monkeypatch.setattr(filesystem, "_fsync_dir", recorded)
    store.put(key, io.BytesIO(b"object"), 6)
    assert root in synced and (root / key).parent.parent in synced


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_an_overwrite_in_place_keeps_the_acknowledged_object_until_its_commit(
        make_services: Callable[..., Services], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, batch: bool) -> None:
    """Another object under a stored UID at the same key goes through the intake even
    on the direct path: the acknowledged object stays at its key until the commit that
    replaces it (a crash, a refused commit, a store that cannot put it back leave it
    as acknowledged); the new one is read from the intake at once, and the mover
    writes it over the old one afterwards."""
    store = folder_store(tmp_path / "objects")
    services = make_services(store=store, intake_object_bytes=0)
    first = _bytes()
    services.ingest.store_bytes(first)
    uid = dcmread(DicomBytesIO(first)).SOPInstanceUID
    key = _row(services, uid).object_key
    second = _bytes(StudyDescription="changed")

    def refused(*_: object, **__: object) -> None:
        raise IndexFailure("simulated")

    with monkeypatch.context() as patched:  # the commit fails: nothing was written
        patched.setattr(writer, "upsert", refused)
        patched.setattr(store, "put", lambda *_a, **_k: pytest.fail("written directly"))
        if batch:
            assert isinstance(services.ingest.store_batch([Received.of(second)])[0],
                              IndexFailure)
        else:
            with pytest.raises(IndexFailure):
                services.ingest.store_bytes(second)
    assert (tmp_path / "objects" / key).read_bytes() == first
    assert list(_stored(services).values()) == [first]
    if batch:
        assert services.ingest.store_batch([Received.of(second)])[0].outcome is \
            Outcome.REPLACED
    else:
        assert services.ingest.store_bytes(second).outcome is Outcome.REPLACED
    assert (tmp_path / "objects" / key).read_bytes() == first  # until the mover's turn
    assert list(_stored(services).values()) == [second]
    assert drain(services) == 1
    assert (tmp_path / "objects" / key).read_bytes() == second
    assert _row(services, uid).checksum == hashlib.sha256(second).hexdigest()


def test_objects_without_patient_id_are_not_merged(services: Services) -> None:
    services.ingest.store_bytes(_bytes(PatientID="", PatientName="A^B", SOPInstanceUID="1.2.1"))
    services.ingest.store_bytes(_bytes(PatientID="", PatientName="C^D", SOPInstanceUID="1.2.2",
                                       StudyInstanceUID="1.2.9"))
    assert writer.counts(services.index.connection())["patient"] == 2


def test_an_instance_lacking_a_study_attribute_keeps_the_value_known(
        services: Services) -> None:
    """A key object or presentation state a viewer made often lacks Study Description
    or Accession Number: stored after the images, it leaves the study's values as they
    were (it does not blank them for QIDO-RS and C-FIND); a newer object that has
    another value still wins, and the instance's own row is its object's."""
    first = make_instance(StudyInstanceUID="1.2.3.7", SOPInstanceUID="1.2.3.7.1",
                          StudyDescription="HEAD CT", AccessionNumber="A1")
    services.ingest.store_bytes(first)
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID="1.2.3.7", SOPInstanceUID="1.2.3.7.2", Modality="KO"))
    conn = services.index.connection()
    row = conn.execute("SELECT study_description, accession_number FROM study "
                       "WHERE study_uid = '1.2.3.7'").fetchone()
    assert row == ("HEAD CT", "A1")
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID="1.2.3.7", SOPInstanceUID="1.2.3.7.3",
        StudyDescription="HEAD CT WITH CONTRAST"))
    assert conn.execute("SELECT study_description FROM study WHERE study_uid = "
                        "'1.2.3.7'").fetchone() == ("HEAD CT WITH CONTRAST",)


def test_an_instance_rewrites_only_the_parent_rows_whose_values_it_changes(
        services: Services) -> None:
    """The second instance of a series writes its own rows, not its unchanged patient,
    study and series (each rewrite costs the pages of the row and its indexes in the
    commit); one that brings a new value rewrites that level, and the newest wins."""
    services.ingest.store_bytes(_bytes(SOPInstanceUID="1.2.1"))
    written: list[tuple[int, str]] = []
    conn = services.index.connection()
    conn.set_update_hook(lambda op, _db, table, _row: written.append((op, table)))
    try:
        services.ingest.store_bytes(_bytes(SOPInstanceUID="1.2.2"))
        assert {table for _, table in written} & {"patient", "study", "series"} == set()
        assert (apsw.SQLITE_INSERT, "instance") in written
        written.clear()
        services.ingest.store_bytes(_bytes(SOPInstanceUID="1.2.3",
                                           SeriesDescription="NEWER"))
        assert {table for _, table in written} & {"patient", "study", "series"} == {
            "series"}
    finally:
        conn.set_update_hook(None)
    described = conn.execute("SELECT series_description FROM series").fetchall()
    assert described == [("NEWER",)]


def test_an_instance_of_a_known_series_costs_nine_statements(services: Services) -> None:
    """Every statement on the acknowledgement's path is a call into SQLite that lets go
    of the GIL, where other associations' threads take it: a small instance of a series
    already indexed asks for the intake's room, then, in its one transaction, for its
    row and tombstone at once, and for each unchanged parent by one SELECT, then writes
    its row and its intake copy (no savepoint: it is alone in its transaction).  The
    lookup is the transaction's own: a read before it was a transaction more, whose
    start reads the index's pages again after another process' commit."""
    services.ingest.store_bytes(_bytes(SOPInstanceUID="1.2.1"))
    statements: list[str] = []

    def traced(_cursor: object, sql: str, _bindings: object) -> bool:
        statements.append(" ".join(sql.split()[:4]))
        return True

    conn = services.index.connection()
    conn.exec_trace = traced
    try:
        services.ingest.store_bytes(_bytes(SOPInstanceUID="1.2.2"))
    finally:
        conn.exec_trace = None
    assert len(statements) == 9, statements
    assert statements[1] == "BEGIN IMMEDIATE", statements
    assert statements[2].startswith("SELECT i.sop_uid,"), statements
    assert [s for s in statements if s.startswith(("INSERT", "SAVEPOINT"))] == [
        "INSERT INTO instance (sop_uid,", "INSERT OR REPLACE INTO"], statements


def test_concurrent_ingests_share_commits_and_each_is_indexed(services: Services,
                                                               memory_store: MemoryStore) -> None:
    """Group commit (Index.commit): many threads at once, every instance indexed, and a
    failing piece of work does not take the others of its batch down."""
    from concurrent.futures import ThreadPoolExecutor

    payloads = [_bytes(SOPInstanceUID=f"1.2.7.{n}") for n in range(24)]
    payloads.append(_bytes(SOPInstanceUID="1.2.7.x"))  # invalid UID: refused, alone
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(services.ingest.store_bytes, p) for p in payloads]
    outcomes = [f.exception() or f.result().outcome for f in futures]
    assert outcomes[:-1] == [Outcome.STORED] * 24
    assert isinstance(outcomes[-1], InvalidUID)
    assert writer.counts(services.index.connection())["instance"] == 24
    assert len(_stored(services)) == 24


def test_a_failing_piece_of_a_group_commit_keeps_the_others(services: Services) -> None:
    def good(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (1)")

    def bad(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (2)")
        raise IndexFailure("simulated")

    services.index.commit(good)
    with pytest.raises(IndexFailure):
        services.index.commit(bad)
    rows = list(services.index.connection().execute("SELECT x FROM t"))
    assert rows == [(1,)]


def _held_by_another_process(services: Services) -> apsw.Connection:
    """A second connection to the index holding its write lock, as another process would."""
    other = apsw.Connection(str(services.index.path))
    other.execute("BEGIN IMMEDIATE")
    return other


def _queued(services: Services, pieces: int) -> None:
    """Wait until ``pieces`` pieces of work are queued for the next group commit."""
    deadline = time.monotonic() + 10
    while len(services.index._queue) < pieces:
        assert time.monotonic() < deadline, "the pieces were never queued"
        time.sleep(0.001)


def test_a_piece_queued_while_the_leader_waits_for_the_lock_joins_its_commit(
        services: Services) -> None:
    """The leader takes the queue once its transaction has begun: a piece another thread
    queues while it waits for another process' lock commits with it, in its thread."""
    services.index.commit(lambda conn: conn.execute("CREATE TABLE t (x)"))
    ran_in: dict[str, int] = {}

    def piece(name: str) -> Callable[[apsw.Connection], None]:
        def work(conn: apsw.Connection) -> None:
            ran_in[name] = threading.get_ident()
            conn.execute("INSERT INTO t VALUES (?)", (name,))
        return work

    other = _held_by_another_process(services)
    leader = threading.Thread(target=services.index.commit, args=(piece("leader"),))
    leader.start()
    _queued(services, 1)
    time.sleep(0.05)  # the leader is in SQLite's busy handler
    follower = threading.Thread(target=services.index.commit, args=(piece("follower"),))
    follower.start()
    _queued(services, 2)
    other.execute("COMMIT")
    other.close()
    leader.join(10)
    follower.join(10)
    assert ran_in["follower"] == ran_in["leader"] == leader.ident
    rows = sorted(services.index.connection().execute("SELECT x FROM t"))
    assert rows == [("follower",), ("leader",)]


def test_a_group_commit_that_cannot_begin_fails_every_queued_piece(
        make_services: Callable[..., Services]) -> None:
    services = make_services(dimse_timeout=0.8)  # the busy timeout: a quarter
    other = _held_by_another_process(services)
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            services.index.commit(lambda conn: conn.execute("CREATE TABLE t (x)"))
        except IndexFailure as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    other.execute("ROLLBACK")
    other.close()
    assert len(errors) == 3 and not services.index._queue


# --- several objects with one durability point (STOW-RS) ----------------------------------

def test_a_batch_gives_each_object_what_store_bytes_would(services: Services,
                                                          memory_store: MemoryStore) -> None:
    first = _bytes(SOPInstanceUID="1.2.3.4.1")
    again_different = _bytes(SOPInstanceUID="1.2.3.4.1", PatientName="Other^Name")
    second = _bytes(SOPInstanceUID="1.2.3.4.2")
    bad_uid = _bytes(SOPInstanceUID="1.02.3")
    stored = _bytes(SOPInstanceUID="1.2.3.4.3")
    services.ingest.store_bytes(stored)

    results = services.ingest.store_batch(
        [Received.of(data) for data in (first, bad_uid, second, stored, again_different)])

    assert [getattr(r, "outcome", type(r)) for r in results] == [
        Outcome.STORED, InvalidUID, Outcome.STORED, Outcome.UNCHANGED,
        Outcome.REPLACED]  # the repeated UID meets the first as a duplicate (overwrite)
    row = _row(services, "1.2.3.4.1")
    assert row is not None and _stored(services)[row.object_key] == again_different
    assert writer.counts(services.index.connection())["instance"] == 3


def test_a_batch_store_failure_fails_its_objects_and_indexes_nothing(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    services = make_services(store=memory_store, intake_object_bytes=0)
    memory_store.fail_puts = True
    results = services.ingest.store_batch([Received.of(_bytes(SOPInstanceUID="1.2.3.4.1")),
                                           Received.of(_bytes(SOPInstanceUID="1.2.3.4.2"))])
    assert all(isinstance(result, StorageError) for result in results)
    assert memory_store.objects == {}
    assert writer.counts(services.index.connection())["instance"] == 0


def test_a_batch_index_failure_of_one_object_keeps_the_others(
        services: Services, memory_store: MemoryStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    upsert = writer.upsert

    def failing_for_one(conn: object, row: writer.InstanceRow, *, new: bool) -> None:
        if row.values[writer.Level.IMAGE]["sop_uid"] == "1.2.3.4.2":
            raise IndexFailure("simulated")
        upsert(conn, row, new=new)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "upsert", failing_for_one)
    results = services.ingest.store_batch([Received.of(_bytes(SOPInstanceUID="1.2.3.4.1")),
                                           Received.of(_bytes(SOPInstanceUID="1.2.3.4.2"))])
    assert getattr(results[0], "outcome", None) is Outcome.STORED
    assert isinstance(results[1], IndexFailure)
    assert [key.rsplit("/", 1)[1] for key in _stored(services)] == ["1.2.3.4.1.dcm"]


# --- PACS_MAX_OBJECT_BYTES ------------------------------------------------------------------

def _deflated(sop_uid: str, zeros: int) -> bytes:
    """A deflated object whose pixel data is ``zeros`` zero bytes (a few KB deflated)."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PixelData = b"\0" * zeros
    ds.Rows, ds.Columns = zeros // 2048, 1024
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_objects_over_the_limit_are_refused_on_every_path(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        tmp_path: Path) -> None:
    plain = _bytes(SOPInstanceUID="1.2.3.4.1")
    services = make_services(store=memory_store, max_object_bytes=len(plain) - 1)
    with pytest.raises(ObjectTooLarge):
        services.ingest.store_bytes(plain)
    [result] = services.ingest.store_batch([Received.of(plain)])
    assert isinstance(result, ObjectTooLarge)
    path = tmp_path / "big.dcm"
    path.write_bytes(plain)
    with pytest.raises(ObjectTooLarge):
        services.ingest.store_file(path)
    assert memory_store.objects == {}
    assert writer.counts(services.index.connection())["instance"] == 0


def test_a_deflated_object_counts_its_inflated_size(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    bomb = _deflated("1.2.3.4.5", 4 << 20)
    assert len(bomb) < 64 << 10
    small = make_services(store=memory_store, max_object_bytes=1 << 20)
    with pytest.raises(ObjectTooLarge):
        small.ingest.store_bytes(bomb)
    assert _stored(small) == {}
    large = make_services(store=memory_store, max_object_bytes=8 << 20)
    result = large.ingest.store_bytes(bomb)
    row = _row(large, result.sop_instance_uid)
    assert row is not None and _stored(large)[row.object_key] == bomb  # as received


def test_a_data_set_of_too_many_elements_leaves_nothing_behind(
        make_services: Callable[..., Services], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the walk (MAX_ELEMENTS) on the folder store, where an object written
    to the store directly is staged while it is analysed: no object, staged file or
    row is left, on every path."""
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 30)
    store = folder_store(tmp_path / "objects")
    services = make_services(store=store, intake_object_bytes=0)
    many = _bytes()  # CT_small: more than 30 element headers
    with pytest.raises(ObjectTooLarge, match="more than 30 elements"):
        services.ingest.store_bytes(many)
    [result] = services.ingest.store_batch([Received.of(many)])
    assert isinstance(result, ObjectTooLarge)
    assert _stored(services) == {}
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []
    assert writer.counts(services.index.connection())["instance"] == 0


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_a_file_that_is_not_regular_is_refused_unread(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        tmp_path: Path, kind: str) -> None:
    """``pacs import`` of a FIFO (its open would wait for a writer for ever), a device
    (``/dev/zero`` reads for ever) or a socket: refused, never read."""
    services = make_services(store=memory_store)
    path = tmp_path / "odd.dcm"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
    with pytest.raises(InvalidInstance, match="not a regular file"):
        services.ingest.store_file(path)
    assert memory_store.objects == {}


def test_a_link_is_refused_when_links_are_not_followed(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        tmp_path: Path) -> None:
    services = make_services(store=memory_store)
    (tmp_path / "outside.dcm").write_bytes(_bytes(SOPInstanceUID="1.2.3.4.1"))
    (tmp_path / "link.dcm").symlink_to(tmp_path / "outside.dcm")
    with pytest.raises(InvalidInstance, match="link"):
        services.ingest.store_file(tmp_path / "link.dcm", follow_links=False)
    assert memory_store.objects == {}
    services.ingest.store_file(tmp_path / "link.dcm")  # named by the operator: followed


def test_a_write_the_store_never_made_is_not_undone(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A direct write the store refused or never received (S3 down: connection
    refused) stored nothing: the store fails alone, no undo is tried (it would fail
    the same way, and its ERROR would send the operator to ``pacs fsck`` for
    nothing)."""
    store = MemoryStore()
    services = make_services(store=store, intake_object_bytes=0)
    deletes: list[str] = []

    def refused(*args: object, **kwargs: object) -> None:
        raise WriteNotMade("S3 write failed: connection refused or host unreachable")

    def delete(key: str) -> None:
        deletes.append(key)
        raise StorageError("S3 delete failed: connection refused or host unreachable")

    monkeypatch.setattr(store, "put", refused)
    monkeypatch.setattr(store, "delete", delete)
    with pytest.raises(WriteNotMade):
        services.ingest.store_bytes(_bytes())
    assert deletes == []
    assert not [r for r in caplog.records if "could not undo" in r.getMessage()]
