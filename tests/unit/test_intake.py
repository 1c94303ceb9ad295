"""The intake (:mod:`pacs.core.intake`): the order of writes and syncs, recorded.

A recording store and SQLite's own hooks on the index connections (row changes, commits)
log every durable step in order; the tests read the log:

- an object is acknowledged (``store_bytes`` returns) only after ONE commit, with
  ``synchronous=FULL``, that holds its index row and its bytes, and nothing is written
  to the store before the acknowledgement;
- the mover's put is durable (returned) before the intake row is deleted;
- an overwrite racing a move ends with the newest bytes in the store, and every read
  sees the intake first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

import apsw
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from pacs.core import health, ingest as ingest_module, intake
from pacs.core.errors import InstanceLocked, IntakeFull, StorageError, UnsettledWrite
from pacs.core.index import reads, writer
from pacs.core.ingest import Received
from pacs.core.intake import Hold, Mover, Refusals, mover_lock
from pacs.core.reconcile import reconcile
from pacs.core.services import Services, drain, mover
from pacs.core.storage.memory import MemoryStore
from tests.conftest import sample


class RecordingStore(MemoryStore):
    """A memory store that logs each put, when it has returned (durable)."""

    def __init__(self, log: list[tuple[str, ...]]) -> None:
        super().__init__()
        self.log = log
        self.on_put: Callable[[str], None] | None = None

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        if self.on_put is not None:
            self.on_put(key)
        super().put(key, source, length)
        self.log.append(("put", key))


def record(conn: apsw.Connection, log: list[tuple[str, ...]]) -> None:
    """Log the row changes of the instance and intake tables and every commit (with
    the connection's ``synchronous`` level) of ``conn``."""
    level = conn.pragma("synchronous")

    def changed(kind: int, _db: str, table: str, _rowid: int) -> None:
        if table in ("instance", "intake"):
            name = {apsw.SQLITE_INSERT: "insert", apsw.SQLITE_DELETE: "delete",
                    apsw.SQLITE_UPDATE: "update"}[kind]
            log.append((name, table))

    def committed() -> bool:
        log.append(("commit", "FULL" if level == 2 else str(level)))
        return False  # let it commit

    conn.set_update_hook(changed)
    conn.set_commit_hook(committed)


def instance(sop: str = "1.2.826.0.1.3680043.8.498.1", **changes: str) -> bytes:
    ds = dcmread(sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def read(services: Services, key: str) -> bytes:
    with services.store.open(key) as stream:
        return stream.read()


@pytest.fixture
def log() -> list[tuple[str, ...]]:
    return []


@pytest.fixture
def node(make_services: Callable[..., Services], log: list[tuple[str, ...]]) -> Services:
    services = make_services(store=RecordingStore(log))
    record(services.index.connection(), log)
    return services


def test_acknowledged_after_one_full_commit_of_row_and_bytes(
        node: Services, log: list[tuple[str, ...]]) -> None:
    data = instance()
    result = node.ingest.store_bytes(data)
    log.append(("ack", result.sop_instance_uid))
    written = [entry for entry in log if entry != ("update", "instance")]  # triggers'
    assert written == [("insert", "instance"), ("insert", "intake"), ("commit", "FULL"),
                       ("ack", result.sop_instance_uid)]
    key = reads.lookup(node.index.connection(), result.sop_instance_uid)
    assert key is not None
    assert read(node, key.object_key) == data  # read your writes: from the intake
    assert node.store.backend.objects == {}  # type: ignore[attr-defined]


class BatchRecordingStore(RecordingStore):
    """A recording store with the BatchPut capability (as the folder store)."""

    def put_many(self, items: list[tuple[str, bytes]],
                 modified: Sequence[float] | None = None) -> list[None]:
        for key, data in items:
            self.put(key, io.BytesIO(data), len(data))
        return [None] * len(items)


@pytest.mark.parametrize("batched", [True, False], ids=["batch put", "one by one"])
def test_the_mover_deletes_a_row_only_after_its_put_returned(
        make_services: Callable[..., Services], log: list[tuple[str, ...]],
        monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    node = make_services(store=(BatchRecordingStore if batched else RecordingStore)(log))
    keys = {}
    for number in range(6):
        result = node.ingest.store_bytes(instance(f"1.2.826.0.1.3680043.8.498.{number}"))
        keys[f"{result.study_uid}/{result.series_uid}/{result.sop_instance_uid}.dcm"] = (
            reads.intake_entry(node.index.connection(), result.study_uid + "/" +
                               result.series_uid + "/" + result.sop_instance_uid + ".dcm"))
    moved = writer.intake_moved

    def logged(conn: apsw.Connection, entry_id: int) -> bool:
        log.append(("delete", str(entry_id)))
        return moved(conn, entry_id)

    monkeypatch.setattr(writer, "intake_moved", logged)
    record(node.index.connection(), log)
    with mover_lock(node.settings.data_dir, wait=False) as held:
        assert held
        moving = mover(node)
        assert moving.move_batch() == 6
        moving.close()
    for key, entry in keys.items():
        assert entry is not None
        assert log.index(("put", key)) < log.index(("delete", str(entry.id)))
    # Every put (in parallel without BatchPut), then the deletes in one transaction:
    # SQLite's write lock taken once per batch.
    steps = [item[0] for item in log if item[1] not in ("intake", "instance")]
    assert steps == ["put"] * 6 + ["delete"] * 6 + ["commit"]
    if batched:  # one durability pass, oldest first
        assert [item[1] for item in log[:6]] == list(keys)
    assert reads.intake_state(node.index.connection()).objects == 0
    for key in keys:
        assert read(node, key) == node.store.backend.objects[key]  # type: ignore[attr-defined]


def test_the_mover_process_commits_without_sync(make_services: Callable[..., Services]
                                                ) -> None:
    """The mover's own index (``synced=False``): a lost delete repeats an identical put."""
    services = make_services(store=MemoryStore())
    from pacs.core.services import build
    moving = build(services.settings, store=services.store.backend, synced=False)
    try:
        assert moving.index.connection().pragma("synchronous") == 1  # NORMAL
        assert services.index.connection().pragma("synchronous") == 2  # FULL
    finally:
        moving.close()


def test_an_overwrite_during_a_move_ends_with_the_newest_bytes(
        node: Services, log: list[tuple[str, ...]]) -> None:
    """The overwrite waits for the mover's ingest lock; the mover deletes only the row
    it copied; the next batch stores the newer version."""
    old, new = instance(StudyDescription="old"), instance(StudyDescription="new")
    node.ingest.store_bytes(old)
    [key] = reads.intake_keys(node.index.connection())
    overwrite: list[threading.Thread] = []
    store = node.store.backend
    assert isinstance(store, RecordingStore)

    def during_put(_key: str) -> None:
        if not overwrite:  # the first put of the old version: overwrite meanwhile
            thread = threading.Thread(target=node.ingest.store_bytes, args=(new,))
            overwrite.append(thread)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive(), "the overwrite did not wait for the mover's lock"

    store.on_put = during_put
    moving = mover(node)
    assert moving.move_batch() == 1
    overwrite[0].join(10)
    assert store.objects[key] == old  # moved, then replaced in the intake
    assert read(node, key) == new  # the intake wins over the store
    assert moving.drain() == 1
    assert store.objects[key] == new
    assert reads.intake_state(node.index.connection()).objects == 0
    row = reads.lookup(node.index.connection(), "1.2.826.0.1.3680043.8.498.1")
    assert row is not None and row.checksum == hashlib.sha256(new).hexdigest()


def test_an_overwrite_between_listing_and_locking_is_not_deleted(node: Services) -> None:
    """The row listed is replaced before the mover takes the locks: it skips it (the
    newer row has a new id) and moves the newer one next."""
    old, new = instance(StudyDescription="old"), instance(StudyDescription="new")
    node.ingest.store_bytes(old)
    [key] = reads.intake_keys(node.index.connection())

    @contextmanager
    def overwrite_first(uids: list[str]) -> Iterator[None]:
        node.ingest.store_bytes(new)  # takes (and releases) the lock itself
        with node.ingest.uid_locks(uids):
            yield

    locks: Callable[[list[str]], AbstractContextManager[None]] = overwrite_first
    moving = Mover(node.index, node.store, locks)
    assert moving.move_batch() == 0
    assert node.store.backend.objects == {}  # type: ignore[attr-defined]
    assert mover(node).drain() == 1
    assert node.store.backend.objects[key] == new  # type: ignore[attr-defined]


def test_a_large_overwrite_in_place_goes_through_the_intake_too(
        make_services: Callable[..., Services]) -> None:
    """An object over the intake's size that replaces another at the same key is
    acknowledged through the intake all the same (placed directly, it would destroy
    the acknowledged bytes before its own commit): its copy replaces the old one's."""
    small = instance(StudyDescription="old")
    services = make_services(store=MemoryStore(), intake_object_bytes=len(small))
    services.ingest.store_bytes(small)
    [key] = reads.intake_keys(services.index.connection())
    large = instance(StudyDescription="new, and longer than the old one")
    services.ingest.store_bytes(large)
    assert reads.intake_keys(services.index.connection()) == [key]
    assert read(services, key) == large
    assert drain(services) == 1
    assert services.store.backend.objects[key] == large  # type: ignore[attr-defined]
    assert read(services, key) == large


def test_a_moved_instance_drops_the_intake_copy_of_its_old_key(node: Services) -> None:
    node.ingest.store_bytes(instance())
    assert len(reads.intake_keys(node.index.connection())) == 1
    moved = node.ingest.store_bytes(instance(SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9"))
    new_key = f"{moved.study_uid}/{moved.series_uid}/{moved.sop_instance_uid}.dcm"
    assert reads.intake_keys(node.index.connection()) == [new_key]
    assert sorted(node.store.keys()) == [new_key]


def read_across_a_move(services: Services, data: bytes) -> None:
    """Store ``data`` through the intake, open it, let the mover move it meanwhile, and
    read on: the stream gives the whole object, and the intake is empty after."""
    services.ingest.store_bytes(data)
    [key] = reads.intake_keys(services.index.connection())
    moved: list[int] = []
    with services.store.open(key) as stream:
        head = stream.read(1000)
        done = threading.Thread(target=lambda: moved.append(mover(services).drain()))
        done.start()
        done.join(10)
        assert moved == [1]
        rest = stream.read()
    assert head + rest == data
    assert reads.intake_keys(services.index.connection()) == []


def test_a_read_outlives_the_move_of_its_object(node: Services) -> None:
    """A stream opened on the intake copy reads on from the store once the mover
    deleted the row."""
    read_across_a_move(node, instance())


def test_the_mover_waits_longer_while_the_store_keeps_failing(
        node: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that finds nothing to move (every row waits for its unanswered key to
    settle) does not prove the store back: the next failure waits longer, not from the
    start again (each try that times out leaves more keys unanswered)."""
    outcomes: list[int | None] = [None, 0, None, 0, None, 3]
    waits: list[float] = []

    def batch() -> int:
        outcome = outcomes.pop(0)
        if outcome is None:
            raise StorageError("timed out")
        return outcome

    with node.index.write() as conn:  # a write of a key went unanswered
        writer.unsettle(conn, "1.2/1.2.3/1.2.3.4.dcm", time.time())
    moving = mover(node)
    monkeypatch.setattr(moving, "move_batch", batch)
    monkeypatch.setattr(intake.Hold, "holds", lambda *_: False)
    monkeypatch.setattr(intake, "_sleep", lambda seconds, _: waits.append(seconds))
    moving._run(lambda: not outcomes)
    failures = [wait for wait in waits if wait != intake.LINGER]
    assert failures == [0.5, 1.0, 2.0]
    assert reads.intake_state(node.index.connection()).mover_error is None  # it moved


def test_the_mover_clears_its_error_once_nothing_waits_on_the_store(
        node: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure, then nothing left to move and nothing unanswered (the instance
    removed meanwhile): the store is not in the way of anything, and ``pacs status``
    no longer shows its failure."""
    outcomes: list[int | None] = [None, 0]

    def batch() -> int:
        outcome = outcomes.pop(0)
        if outcome is None:
            raise StorageError("timed out")
        return outcome

    moving = mover(node)
    monkeypatch.setattr(moving, "move_batch", batch)
    monkeypatch.setattr(intake.Hold, "holds", lambda *_: False)
    monkeypatch.setattr(intake, "_sleep", lambda *_: None)
    moving._run(lambda: not outcomes)
    assert reads.intake_state(node.index.connection()).mover_error is None


def test_the_intake_refuses_past_its_limit_and_takes_again_once_drained(
        make_services: Callable[..., Services]) -> None:
    first = instance("1.2.826.0.1.3680043.8.498.1")
    services = make_services(store=MemoryStore(), intake_max_bytes=len(first))
    services.ingest.store_bytes(first)
    with pytest.raises(IntakeFull):
        services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.2"))
    found = health.check(services)
    assert (found.intake_objects, found.intake_bytes) == (1, len(first))
    assert drain(services) == 1
    services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.2"))


def test_the_limit_bounds_what_the_intake_holds_whatever_arrives_at_once(
        make_services: Callable[..., Services]) -> None:
    """``PACS_INTAKE_MAX_BYTES`` was a threshold checked once before a store: a STOW-RS
    batch of 16 parts was checked once and took them all (ten times the limit), and
    an object larger than the room left went in.  Each part, each object, now takes
    its room: what the intake holds stays within the limit, the rest is refused."""
    size = len(instance())
    services = make_services(store=MemoryStore(), intake_max_bytes=int(size * 3.5))
    parts = [Received.of(instance(f"1.2.826.0.1.3680043.8.498.{n}")) for n in range(1, 17)]
    results = services.ingest.store_batch(parts)
    assert [isinstance(r, IntakeFull) for r in results] == [False] * 3 + [True] * 13
    assert reads.intake_bytes(services.index.connection()) == 3 * size
    with pytest.raises(IntakeFull):  # half an object's room left
        services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.20"))
    drain(services)
    # Alone in an empty intake, an object larger than the limit is taken.
    services = make_services(store=MemoryStore(), intake_max_bytes=size // 2)
    services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.30"))
    with pytest.raises(IntakeFull):
        services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.31"))


def test_a_failing_store_leaves_the_rows_and_reports_the_error(
        make_services: Callable[..., Services]) -> None:
    store = MemoryStore()
    services = make_services(store=store)
    services.ingest.store_bytes(instance())  # acknowledged though the store is down next
    store.fail_puts = True
    stop = threading.Event()
    moving = mover(services)
    thread = threading.Thread(target=moving.run, args=(stop.is_set,))
    thread.start()
    try:
        for _ in range(100):
            if health.check(services).intake_error:
                break
            stop.wait(0.05)
        found = health.check(services)
        assert found.intake_objects == 1 and found.intake_error
        store.fail_puts = False
        for _ in range(200):
            if not health.check(services).intake_objects:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(10)
    found = health.check(services)
    assert found.intake_objects == 0 and found.intake_error is None
    assert len(store.objects) == 1


def _backlog(objects: int = 1, size: int = 10, age: float = 1.0) -> reads.IntakeState:
    return reads.IntakeState(objects, size, 1000.0 - age if objects else None, None, None)


@pytest.mark.parametrize(("hold", "backlog", "arriving", "holds"), [
    (Hold(30, 100), _backlog(), True, True),  # a young, small backlog while objects arrive
    (Hold(30, 100), _backlog(), False, False),  # they paused: move
    (Hold(30, 100), _backlog(age=30), True, False),  # the oldest waited long enough
    (Hold(30, 100), _backlog(size=100), True, False),  # half the intake's room is taken
    (Hold(30, 100), _backlog(objects=0, size=0), True, False),  # nothing to move
    (Hold(0, 100), _backlog(), True, False),  # PACS_INTAKE_MOVER_HOLD=0
])
def test_the_mover_holds_only_a_young_small_backlog_while_objects_arrive(
        hold: Hold, backlog: reads.IntakeState, arriving: bool, holds: bool) -> None:
    assert hold.holds(backlog, arriving, now=1000.0) is holds


@pytest.mark.parametrize("direct", [False, True], ids=["intake", "direct"])
def test_the_mover_waits_while_instances_arrive_and_moves_once_they_pause(
        make_services: Callable[..., Services], direct: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances stored every 0.05 s, through the intake or (larger ones) directly: the
    mover, looking every 0.5 s here (a store on a busy machine may take a few tenths
    of a second, which must not look like a pause), leaves the intake alone until they
    pause."""
    monkeypatch.setattr(intake, "LINGER", 0.5)
    first = instance("1.2.826.0.1.3680043.8.498.100")
    store = MemoryStore()
    services = make_services(store=store, intake_object_bytes=len(first) if direct else None)
    services.ingest.store_bytes(first)
    moving = Mover(services.index, services.store, services.ingest.uid_locks,
                   Hold(seconds=30, bytes=1 << 30))
    stop = threading.Event()
    thread = threading.Thread(target=moving.run, args=(stop.is_set,))
    thread.start()
    try:
        for number in range(40):
            services.ingest.store_bytes(instance(
                f"1.2.826.0.1.3680043.8.498.{number + 1}", StudyDescription="longer " * 8))
            time.sleep(0.05)
        held = reads.intake_keys(services.index.connection())
        deadline = time.monotonic() + 10
        while reads.intake_state(services.index.connection()).objects:
            assert time.monotonic() < deadline, "the mover did not move once they paused"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert len(held) == (1 if direct else 41) and moving.state.holds >= 3
    assert len(store.objects) == 41


@pytest.mark.parametrize("drain_for", [0.0, 10.0], ids=["no-drain", "drain"])
def test_a_mover_stopped_while_it_holds_moves_the_intake_within_its_drain_time(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch,
        drain_for: float) -> None:
    """Stopped while it holds back (instances just arrived), the mover moves what the
    intake holds before it returns, for up to ``drain_for`` seconds; without, the
    objects stay in the intake."""
    monkeypatch.setattr(intake, "LINGER", 30.0)  # no second look before the stop
    store = MemoryStore()
    services = make_services(store=store)
    for number in range(5):
        services.ingest.store_bytes(instance(f"1.2.826.0.1.3680043.8.498.{number + 1}"))
    moving = Mover(services.index, services.store, services.ingest.uid_locks,
                   Hold(seconds=30, bytes=1 << 30))
    stop = threading.Event()
    thread = threading.Thread(target=moving.run, args=(stop.is_set, drain_for))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not moving.state.holds:  # its first look: instances arrived
            assert time.monotonic() < deadline, "the mover did not look"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    left = reads.intake_state(services.index.connection()).objects
    assert (len(store.objects), left) == ((5, 0) if drain_for else (0, 5))


def test_fsck_counts_an_intake_object_as_stored(node: Services) -> None:
    node.ingest.store_bytes(instance())
    report = reconcile(node)
    assert report.ok and not report.findings and report.rows == 1


def test_deleting_an_instance_drops_its_intake_copy(node: Services) -> None:
    result = node.ingest.store_bytes(instance())
    with node.index.write() as conn:
        writer.delete_instance(conn, result.sop_instance_uid)
    assert reads.intake_state(node.index.connection()).objects == 0


def test_the_store_delete_drops_the_intake_copy(node: Services) -> None:
    node.ingest.store_bytes(instance())
    [key] = reads.intake_keys(node.index.connection())
    node.store.delete(key)
    assert reads.intake_keys(node.index.connection()) == []
    assert list(node.store.keys()) == []


def test_local_files_are_none_while_in_the_intake(make_services: Callable[..., Services]
                                                  ) -> None:
    services = make_services()  # the folder store
    services.ingest.store_bytes(instance())
    [key] = reads.intake_keys(services.index.connection())
    from pacs.core.storage import local_path
    assert local_path(services.store, key) is None
    drain(services)
    path = local_path(services.store, key)
    assert path is not None and path.read_bytes() == read(services, key)


def test_a_second_mover_does_not_take_the_lock(settings: object, tmp_path: object) -> None:
    from pathlib import Path
    folder = Path(str(tmp_path)) / "data"
    with mover_lock(folder, wait=False) as first, mover_lock(folder, wait=False) as second:
        assert first and not second


def test_intake_reader_seeks(node: Services) -> None:
    data = instance()
    node.ingest.store_bytes(data)
    [key] = reads.intake_keys(node.index.connection())
    with node.store.open(key) as stream:
        stream.seek(132)
        assert stream.read(4) == data[132:136]
        stream.seek(-10, io.SEEK_END)
        assert stream.read() == data[-10:]


def test_an_intake_object_reads_as_a_file(node: Services) -> None:
    """pydicom reads the stream as it reads a file (it asks for its name)."""
    data = instance()
    node.ingest.store_bytes(data)
    [key] = reads.intake_keys(node.index.connection())
    with node.store.open(key) as stream:
        assert dcmread(stream).SOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_logged_at_most_once_per_interval_with_their_count(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = Refusals(interval=10.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="pacs.core.intake"):
        for _ in range(500):
            refusals.refused()
        refusals.refused(20)  # the parts of a STOW-RS batch
        clock.now += 9.9
        refusals.refused()
        refusals.settled()  # too soon: kept for the next line
        clock.now += 0.2
        refusals.refused()
        refusals.refused(3)
        clock.now += 10.0
        refusals.settled()
        clock.now += 100.0
        refusals.settled()  # nothing refused since: nothing to say
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the intake is full (PACS_INTAKE_MAX_BYTES): 1 store(s) refused since "
                    "the last report; the object store has not caught up"),
        ("WARNING", "the intake is full (PACS_INTAKE_MAX_BYTES): 521 store(s) refused "
                    "since the last report; the object store has not caught up"),
        ("WARNING", "the intake takes objects again; 3 store(s) refused since the last "
                    "report")]


class FailingStore(MemoryStore):
    """A memory store that records the key of every put started, and fails those
    ``failing`` names (``None``: every put fails) with ``error``; an
    :class:`UnsettledWrite` is told to ``on_unanswered`` first, as S3 does
    (:class:`pacs.core.storage.LateWrites`)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []
        self.failing: set[str] | None = None
        self.error: type[StorageError] = StorageError
        self.on_unanswered: Callable[[str], None] | None = None
        self._started_lock = threading.Lock()

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        with self._started_lock:
            self.started.append(key)
        if self.failing is None or key in self.failing:
            if self.error is UnsettledWrite and self.on_unanswered is not None:
                self.on_unanswered(key)
            raise self.error("simulated stalled store (timed out)")
        super().put(key, source, length)


def _intake_of(count: int, make_services: Callable[..., Services],
               store: MemoryStore) -> tuple[Services, list[str]]:
    """Services over ``store`` with ``count`` instances in the intake; their keys in
    the order the mover takes them."""
    services = make_services(store=store)
    for number in range(count):
        services.ingest.store_bytes(instance(f"1.2.826.0.1.3680043.8.498.{number + 1}"))
    batch = reads.intake_batch(services.index.connection(), 0, intake.BATCH_OBJECTS,
                               intake.BATCH_BYTES)
    return services, [entry.object_key for entry in batch]


def test_a_failing_store_costs_a_batch_one_round_of_puts(
        make_services: Callable[..., Services]) -> None:
    """Every PUT fails (a stalled S3: each would wait for its timeout): the batch
    starts one round of PARALLEL_PUTS and no more, so its per-UID locks are held for
    one timeout, not one per object.  Nothing is lost: every object stays in the
    intake and is moved once the store takes them."""
    store = FailingStore()
    services, keys = _intake_of(10, make_services, store)
    moving = Mover(services.index, services.store, services.ingest.uid_locks)
    with pytest.raises(StorageError):
        moving.move_batch()
    moving.close()
    assert len(store.started) == intake.PARALLEL_PUTS < len(keys)
    assert reads.intake_keys(services.index.connection()) == sorted(keys)
    store.failing = set()
    assert mover(services).drain() == 10
    assert sorted(store.objects) == sorted(keys)


def test_the_puts_stop_at_the_first_failure_and_the_rest_wait_in_the_intake(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """One PUT at a time: the two before the failing one are moved (their rows
    removed), the failing one and those after it are not started and stay in the
    intake, readable; the next round moves them."""
    monkeypatch.setattr(intake, "PARALLEL_PUTS", 1)
    store = FailingStore()
    services, keys = _intake_of(6, make_services, store)
    store.failing = {keys[2]}
    moving = Mover(services.index, services.store, services.ingest.uid_locks)
    with pytest.raises(StorageError):
        moving.move_batch()
    moving.close()
    assert store.started == keys[:3]
    assert sorted(store.objects) == sorted(keys[:2])
    assert reads.intake_keys(services.index.connection()) == sorted(keys[2:])
    assert moving.state.moved == 2
    assert all(read(services, key) for key in keys)  # the rest from the intake
    store.failing = set()
    assert mover(services).drain() == 4
    assert sorted(store.objects) == sorted(keys)


def test_a_store_waits_a_bounded_time_for_an_instance_the_mover_holds(
        node: Services) -> None:
    """The mover holds a batch's locks while a stalled store keeps it: a store of one
    of those instances answers InstanceLocked (A700 for C-STORE, 503 for STOW-RS)
    after the ingest's lock wait instead of waiting for the mover; nothing of it is
    kept.  Once released, the same store succeeds."""
    from adapters.dicomweb.errors import outcome_for
    from pacs.dimse.status import STORE_STATUS, status_for

    first = instance()
    node.ingest.store_bytes(first)
    again = instance(StudyDescription="sent again")
    node.ingest.lock_wait = 0.2
    with node.ingest.uid_locks(["1.2.826.0.1.3680043.8.498.1"], bounded=False):
        with pytest.raises(InstanceLocked) as caught:
            node.ingest.store_bytes(again)
        row = reads.lookup(node.index.connection(), "1.2.826.0.1.3680043.8.498.1")
        assert row is not None and row.checksum == hashlib.sha256(first).hexdigest()
    assert status_for(STORE_STATUS, caught.value).code == 0xA700
    assert outcome_for(caught.value).status == "503 Service Unavailable"
    node.ingest.store_bytes(again)
    row = reads.lookup(node.index.connection(), "1.2.826.0.1.3680043.8.498.1")
    assert row is not None and row.checksum == hashlib.sha256(again).hexdigest()


def _unsettled(services: Services) -> list[str]:
    return [str(key) for (key,) in services.index.connection().execute(
        "SELECT object_key FROM unsettled ORDER BY object_key")]


def test_an_unanswered_put_keeps_its_key_in_the_intake_until_it_has_settled(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 did not answer the PUT of one key: it may carry it out later, over what is
    written there meanwhile.  The key waits in the intake (read from there), its
    overwrite too, while the others move; once it has settled, the newest bytes are
    put over whatever the late PUT left, and the key is forgotten."""
    monkeypatch.setattr(intake, "PARALLEL_PUTS", 1)
    store = FailingStore()
    services, keys = _intake_of(3, make_services, store)
    store.failing, store.error = {keys[0]}, UnsettledWrite
    waiting = Mover(services.index, services.store, services.ingest.uid_locks, settle=60)
    with pytest.raises(UnsettledWrite):
        waiting.move_batch()
    assert _unsettled(services) == [keys[0]]
    assert health.check(services).intake_unsettled == 1
    store.failing = set()
    old = read(services, keys[0])
    new = instance("1.2.826.0.1.3680043.8.498.1", StudyDescription="new")
    services.ingest.store_bytes(new)  # an overwrite, acknowledged through the intake
    store.objects[keys[0]] = old  # the late PUT lands
    assert waiting.drain() == 2  # the others; the unsettled key waits
    assert reads.intake_keys(services.index.connection()) == [keys[0]]
    assert read(services, keys[0]) == new
    settled = Mover(services.index, services.store, services.ingest.uid_locks, settle=0)
    assert settled.drain() == 1
    assert store.objects[keys[0]] == new
    assert _unsettled(services) == []
    assert reads.intake_state(services.index.connection()).objects == 0


def test_an_unanswered_direct_overwrite_puts_the_previous_object_back_in_the_intake(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """An object too large for the intake (over SQLITE_MAX_BLOB, made small here: the
    direct path even in place) whose PUT S3 did not answer replaced the one the index
    names: that one goes back into the intake rather than to the store (where the late
    PUT could land over it), and the next object of the key is acknowledged through the
    intake until the key has settled."""
    first = instance(StudyDescription="first")
    monkeypatch.setattr(ingest_module, "SQLITE_MAX_BLOB", len(first) + 1)
    monkeypatch.setattr(ingest_module, "DIRECT_OVERWRITE_BYTES", len(first) + 1)
    store = FailingStore()
    store.failing = set()
    services = make_services(store=store, intake_object_bytes=len(first) // 2)
    services.ingest.store_bytes(first)
    [key] = store.objects
    second = instance(StudyDescription="second, longer than the first")
    store.failing, store.error = {key}, UnsettledWrite
    with pytest.raises(UnsettledWrite):
        services.ingest.store_bytes(second)
    store.objects[key] = second  # the late PUT lands
    assert read(services, key) == first  # what the index names, from the intake
    assert _unsettled(services) == [key]
    third = instance(StudyDescription="third")
    services.ingest.store_bytes(third)
    assert store.objects[key] == second  # not written directly
    assert read(services, key) == third
    assert Mover(services.index, services.store, services.ingest.uid_locks).drain() == 0
    store.failing = set()
    assert Mover(services.index, services.store, services.ingest.uid_locks,
                 settle=0).drain() == 1
    assert store.objects[key] == third
    assert _unsettled(services) == []
    row = reads.lookup(services.index.connection(), "1.2.826.0.1.3680043.8.498.1")
    assert row is not None and row.checksum == hashlib.sha256(third).hexdigest()


def test_a_settled_key_without_an_intake_copy_is_forgotten(
        make_services: Callable[..., Services]) -> None:
    """An unanswered PUT of a new object (nothing acknowledged it) leaves its key
    unsettled; once settled, with nothing of it in the intake, the key is forgotten."""
    store = FailingStore()
    store.error = UnsettledWrite
    data = instance()
    services = make_services(store=store, intake_object_bytes=len(data) // 2)
    with pytest.raises(UnsettledWrite):
        services.ingest.store_bytes(data)
    [key] = _unsettled(services)
    assert store.objects == {} and reads.intake_keys(services.index.connection()) == []
    Mover(services.index, services.store, services.ingest.uid_locks, settle=60).settle_old()
    assert _unsettled(services) == [key]
    Mover(services.index, services.store, services.ingest.uid_locks, settle=0).settle_old()
    assert _unsettled(services) == []


def test_a_mover_that_died_leaves_the_intake_unsettled_for_the_next(
        make_services: Callable[..., Services]) -> None:
    """A mover killed with PUTs in flight (S3 may still carry them out) never cleared
    its mark: the next one makes every key then in the intake unsettled and writes
    none before it has settled; a mover that stops cleanly leaves nothing to settle."""
    services, keys = _intake_of(2, make_services, MemoryStore())

    def mover_of(settle: float) -> Mover:
        return Mover(services.index, services.store, services.ingest.uid_locks,
                     settle=settle, late_writes=True)

    mover_of(60).begin()  # and killed: no finish
    assert mover_of(60).drain() == 0
    assert _unsettled(services) == sorted(keys)
    assert mover_of(0).drain() == 2
    assert _unsettled(services) == []
    services.ingest.store_bytes(instance("1.2.826.0.1.3680043.8.498.7"))
    assert mover_of(60).drain() == 1  # the last one stopped cleanly
