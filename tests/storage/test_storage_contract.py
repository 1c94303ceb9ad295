"""The object-store contract (``pacs.core.storage``), checked against every backend.

The same tests run on :class:`MemoryStore`, :class:`FileStore` and :class:`S3Store`
against a real SeaweedFS S3 server: the core interface (:class:`ObjectStore`) on
every backend, each optional capability on the backends that declare it (and its
fallback on the others), then backend-specific tests.
"""

from __future__ import annotations

import io
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import urllib3

from pacs.core.config import Settings
from pacs.core.errors import ConfigError, NotFound, StorageError
from pacs.core.reindex import stored_times
from pacs.core.storage import (
    BatchPut,
    LocalFiles,
    ModifiedTimes,
    ObjectStore,
    Quarantine,
    RandomAccess,
    Staging,
    Usage,
    exists,
    local_path,
    object_key,
    open_ranged,
    put_many,
    staged,
    usage,
)
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.memory import MemoryStore
from pacs.core.storage.ranged import MIN_READ_AHEAD
from pacs.core.storage.s3 import S3Store
from tests.storage.proxy import CountingRelay
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture

#: The bucket the contract tests share; each test has its own customer prefix in it.
CONTRACT_BUCKET = "pacs-contract"

KEY = object_key("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                 "1.2.826.0.1.3680043.8.498.3")
OTHER_KEY = object_key("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                       "1.2.826.0.1.3680043.8.498.4")
THIRD_KEY = object_key("1.2.826.0.1.3680043.8.498.9", "1.2.826.0.1.3680043.8.498.10",
                       "1.2.826.0.1.3680043.8.498.11")

BAD_KEYS = [
    "../x.dcm",
    "a/b/c.dcm",
    "1.2/3.4/../../../etc/passwd",
    "1.2/3.4/5.6.dcm/../7.dcm",
    "/1.2/3.4/5.6.dcm",
    "1.2/3.4/5.6",
    "",
]


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def unique_customer() -> str:
    """A fresh customer name, so that S3 tests sharing a bucket stay independent."""
    return "t" + uuid.uuid4().hex[:16]


def make_s3_store(server: SeaweedS3, **overrides: Any) -> S3Store:
    """An S3Store on the test server, in the shared bucket, under a fresh customer."""
    options: dict[str, Any] = {
        "endpoint": server.endpoint,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "bucket": CONTRACT_BUCKET,
        "customer": unique_customer(),
    }
    options.update(overrides)
    return S3Store(**options)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_all(store: ObjectStore, key: str) -> bytes:
    """The object's bytes, read in small pieces to exercise streaming."""
    stream = store.open(key)
    try:
        chunks = []
        while chunk := stream.read(64 * 1024):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        stream.close()


def put_bytes(store: ObjectStore, key: str, data: bytes) -> None:
    store.put(key, io.BytesIO(data), len(data))


class FailingSource(io.RawIOBase):
    """A source that yields some bytes and then fails like a dropped connection."""

    def __init__(self, good: bytes) -> None:
        super().__init__()
        self._good = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._good.read(size)
        if not data:
            raise OSError(104, "Connection reset by peer")
        return data


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    yield MemoryStore()


def _file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    store = FileStore(tmp_path / "objects")
    store.check()
    yield store
    store.close()


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    server: SeaweedS3 = request.getfixturevalue("seaweed_s3")
    store = make_s3_store(server)
    store.check()
    yield store
    for key in list(store.keys()):
        store.delete(key)
    store.close()


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Iterator[ObjectStore]]] = {
    "memory": _memory,
    "file": _file,
    "s3": _s3,
}


def _backend_params(*names: str) -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.interop) if name == "s3" else name
        for name in names
    ]


@pytest.fixture(params=_backend_params("memory", "file", "s3"))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """Each backend in turn, empty and checked."""
    yield from BACKENDS[request.param](request, tmp_path)


@pytest.fixture(params=_backend_params("file", "s3"))
def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """The backends a deployment uses (the memory store is for unit tests only)."""
    yield from BACKENDS[request.param](request, tmp_path)


# --- the contract -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1000, 3 * 1024 * 1024 + 17], ids=["1B", "1kB", "3MB"])
def test_put_then_open_returns_the_same_bytes(store: ObjectStore, size: int) -> None:
    data = payload(size, seed=size)
    put_bytes(store, KEY, data)
    assert read_all(store, KEY) == data
    assert store.size(KEY) == size
    assert exists(store, KEY)


def test_open_reads_whole_object_with_read_all(store: ObjectStore) -> None:
    data = payload(5000)
    put_bytes(store, KEY, data)
    with store.open(KEY) as stream:
        assert stream.read() == data
        assert stream.read() == b""


def test_put_reads_exactly_length_bytes(store: ObjectStore) -> None:
    source = io.BytesIO(b"0123456789trailing")
    store.put(KEY, source, 10)
    assert read_all(store, KEY) == b"0123456789"


def test_put_many_stores_each_and_fails_only_the_bad_item(store: ObjectStore) -> None:
    """put_many: every item as put would store it; a refused item fails alone."""
    items = [(KEY, payload(1000, seed=1)), ("../../etc/passwd", b"x"),
             (OTHER_KEY, payload(3 * 1024 * 1024 + 5, seed=2))]
    failures = put_many(store, items)
    assert failures[0] is None and failures[2] is None
    assert isinstance(failures[1], StorageError)
    assert read_all(store, KEY) == items[0][1]
    assert read_all(store, OTHER_KEY) == items[2][1]
    assert sorted(store.keys()) == sorted([KEY, OTHER_KEY])


def test_missing_object(store: ObjectStore) -> None:
    assert not exists(store, KEY)
    with pytest.raises(NotFound):
        store.open(KEY)
    with pytest.raises(NotFound):
        store.size(KEY)


def test_keys_list_exactly_what_was_put(store: ObjectStore) -> None:
    assert list(store.keys()) == []
    assert usage(store) == 0
    for index, key in enumerate([KEY, OTHER_KEY, THIRD_KEY]):
        put_bytes(store, key, payload(100 + index))
    assert sorted(store.keys()) == sorted([KEY, OTHER_KEY, THIRD_KEY])
    assert usage(store) == 100 + 101 + 102


def test_delete(store: ObjectStore) -> None:
    put_bytes(store, KEY, b"x" * 10)
    put_bytes(store, OTHER_KEY, b"y" * 10)
    store.delete(KEY)
    assert not exists(store, KEY)
    with pytest.raises(NotFound):
        store.open(KEY)
    assert list(store.keys()) == [OTHER_KEY]
    assert read_all(store, OTHER_KEY) == b"y" * 10


def test_delete_of_a_missing_key_is_fine(store: ObjectStore) -> None:
    store.delete(KEY)
    store.delete(KEY)
    assert not exists(store, KEY)


def test_overwrite_replaces_content(store: ObjectStore) -> None:
    put_bytes(store, KEY, payload(2000, seed=1))
    put_bytes(store, KEY, payload(300, seed=2))
    assert read_all(store, KEY) == payload(300, seed=2)
    assert store.size(KEY) == 300
    assert list(store.keys()) == [KEY]


def test_short_source_fails_and_leaves_no_object(store: ObjectStore) -> None:
    with pytest.raises(StorageError):
        store.put(KEY, io.BytesIO(b"only ten b"), 11)
    assert not exists(store, KEY)
    assert list(store.keys()) == []


def test_failed_overwrite_keeps_the_old_object(real_store: ObjectStore) -> None:
    put_bytes(real_store, KEY, b"old content")
    with pytest.raises(StorageError):
        real_store.put(KEY, io.BytesIO(b"new"), 100)
    assert read_all(real_store, KEY) == b"old content"


def test_source_error_fails_and_leaves_no_object(real_store: ObjectStore) -> None:
    with pytest.raises(StorageError):
        real_store.put(KEY, FailingSource(b"partial"), 1000)  # type: ignore[arg-type]
    assert not exists(real_store, KEY)
    assert list(real_store.keys()) == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_outside_the_uid_layout_are_refused_on_put(store: ObjectStore, key: str) -> None:
    with pytest.raises(StorageError):
        store.put(key, io.BytesIO(b"data"), 4)
    assert list(store.keys()) == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_outside_the_uid_layout_are_refused_everywhere(
    real_store: ObjectStore, key: str
) -> None:
    def present(key: str) -> bool:
        return exists(real_store, key)

    for operation in (real_store.open, real_store.size, real_store.delete, present,
                      partial(open_ranged, real_store)):
        with pytest.raises(StorageError):
            operation(key)


# --- optional capabilities -----------------------------------------------------------

#: What each backend declares (and nothing more: a capability a backend does not do
#: better than the fallback is left to the fallback).
DECLARED: dict[type, set[type]] = {
    MemoryStore: {Quarantine},
    FileStore: {LocalFiles, BatchPut, Staging, Quarantine},
    S3Store: {Usage, Quarantine, ModifiedTimes, RandomAccess},
}
CAPABILITIES = (LocalFiles, BatchPut, Staging, Usage, Quarantine, ModifiedTimes,
                RandomAccess)


def test_each_backend_declares_its_capabilities(store: ObjectStore) -> None:
    declared = DECLARED[type(store)]
    assert {kind for kind in CAPABILITIES if isinstance(store, kind)} == declared


def test_objects_are_dated_by_the_capability_or_their_files(store: ObjectStore) -> None:
    """ModifiedTimes (one listing) or, without it, the local files' times: one time per
    stored key, around when it was written (S3 servers keep whole seconds); a store with
    neither (memory) dates nothing, and ``pacs reindex`` orders by key."""
    before = time.time()
    put_bytes(store, KEY, payload(100, seed=5))
    other = object_key("1.2.3", "1.2.3.4", "1.2.3.4.9")
    put_bytes(store, other, payload(100, seed=6))
    times = stored_times(store, store.keys())
    if isinstance(store, ModifiedTimes | LocalFiles):
        assert set(times) == set(store.keys()) == {KEY, other}
        for written in times.values():
            assert before - 2 <= written <= time.time() + 2
    else:
        assert times == {}


def test_local_files_are_the_stored_bytes(store: ObjectStore) -> None:
    """LocalFiles: the object's file holds its bytes; without it, no path (read with
    open)."""
    data = payload(4000, seed=4)
    put_bytes(store, KEY, data)
    if isinstance(store, LocalFiles):
        assert store.local_file(KEY).read_bytes() == data
        assert local_path(store, KEY) == store.local_file(KEY)
        store.delete(KEY)
        assert not store.local_file(KEY).exists()  # the path of a gone object
    else:
        assert local_path(store, KEY) is None


def test_batch_put_and_its_fallback_store_every_item(store: ObjectStore) -> None:
    """BatchPut on the backends that declare it; put_many falls back to put each."""
    items = [(KEY, payload(700, seed=7)), (OTHER_KEY, payload(800, seed=8))]
    if isinstance(store, BatchPut):
        assert store.put_many(items) == [None, None]
    else:
        assert put_many(store, items) == [None, None]
    assert [read_all(store, key) for key, _ in items] == [data for _, data in items]


def test_staged_objects_are_placed_or_leave_nothing(store: ObjectStore) -> None:
    """Staging (or its fallback): a placed object is stored at its key, as put stores
    it, over an older one too; one discarded unplaced leaves nothing."""
    put_bytes(store, KEY, payload(300, seed=1))
    data = payload(5000, seed=2)
    with staged(store, data) as staging:
        staging.place(KEY)
    with staged(store, payload(600, seed=3)) as staging:
        staging.place(OTHER_KEY)
    with staged(store, payload(700, seed=4)):
        pass  # a refused object: never placed
    assert sorted(store.keys()) == sorted([KEY, OTHER_KEY])
    assert read_all(store, KEY) == data
    assert read_all(store, OTHER_KEY) == payload(600, seed=3)
    if isinstance(store, FileStore):
        assert store.temporaries() == []


def test_usage_and_its_fallback_agree(store: ObjectStore) -> None:
    put_bytes(store, KEY, payload(1234))
    put_bytes(store, THIRD_KEY, payload(10))
    expected = 1234 + 10
    assert usage(store) == expected
    if isinstance(store, Usage):
        assert store.usage() == expected
    assert sum(store.size(key) for key in list(store.keys())) == expected


def test_ranged_reads_give_the_bytes_wherever_they_start(store: ObjectStore) -> None:
    """RandomAccess on the backends that declare it, and open_ranged (the capability or
    its fallback) on every backend: a seekable stream whose reads, wherever they start
    and however long, give the stored bytes."""
    data = payload(3 * 1024 * 1024 + 5, seed=9)
    put_bytes(store, KEY, data)
    openers = [partial(open_ranged, store, KEY)]
    if isinstance(store, RandomAccess):
        openers.append(partial(store.open_ranged, KEY))
    draw = random.Random(3)
    for opener in openers:
        with opener() as stream:
            assert stream.seekable()
            for _ in range(25):
                start = draw.randrange(len(data))
                length = draw.choice([1, 8, 5000, 40_000, 2_000_000])
                assert stream.seek(start) == start
                assert stream.read(length) == data[start:start + length]
                assert stream.tell() == min(start + length, len(data))
            # Small steps back and forth around one place, as pydicom takes them.
            stream.seek(1000)
            assert stream.read(8) == data[1000:1008]
            stream.seek(-4, io.SEEK_CUR)
            assert stream.read(4) == data[1004:1008]
            assert stream.seek(-10, io.SEEK_END) == len(data) - 10
            assert stream.read() == data[-10:]
            assert stream.read(5) == b""
            stream.seek(len(data) + 7)
            assert stream.read(3) == b""
            stream.seek(2_000_000)
            assert stream.read() == data[2_000_000:]
        with opener() as stream:  # a seek from the end before anything was read
            assert stream.seek(0, io.SEEK_END) == len(data)


def test_ranged_read_of_a_missing_object(store: ObjectStore) -> None:
    """NotFound when opened, or (RandomAccess) at the first read."""
    with pytest.raises(NotFound), open_ranged(store, KEY) as stream:
        stream.read(1)


def test_quarantine_moves_the_object_out_of_the_keys(store: ObjectStore) -> None:
    """Repair's quarantine: the object leaves the keys, its bytes are kept elsewhere."""
    assert isinstance(store, Quarantine)
    store.put(KEY, io.BytesIO(b"kept"), 4)
    store.put(OTHER_KEY, io.BytesIO(b"other"), 5)
    where = store.quarantine(KEY, "fsck-20250101T000000.000000Z")
    assert where.endswith(f"quarantine/fsck-20250101T000000.000000Z/{KEY}")
    assert not exists(store, KEY) and list(store.keys()) == [OTHER_KEY]
    if isinstance(store, MemoryStore):
        kept = store.quarantined[where]
    elif isinstance(store, FileStore):
        kept = Path(where).read_bytes()
    else:
        assert isinstance(store, S3Store)
        response = store._client.get_object(bucket_name=store.bucket, object_name=where)
        kept = response.read()
        response.close()
        response.release_conn()
        store._client.remove_object(bucket_name=store.bucket, object_name=where)
    assert kept == b"kept"
    with pytest.raises(NotFound):
        store.quarantine(KEY, "fsck-again")
    with pytest.raises(StorageError):
        store.quarantine(OTHER_KEY, "../escape")
    assert exists(store, OTHER_KEY)


# --- FileStore only -----------------------------------------------------------------


@pytest.mark.parametrize("source", ["short", "failing"])
def test_file_store_leaves_no_temporary_file_after_a_failed_put(
    tmp_path: Path, source: str
) -> None:
    store = FileStore(tmp_path / "objects")
    store.check()
    put_bytes(store, OTHER_KEY, b"kept")
    stream = io.BytesIO(b"abc") if source == "short" else FailingSource(b"abc")
    with pytest.raises(StorageError):
        store.put(KEY, stream, 10)  # type: ignore[arg-type]
    files = sorted(p.relative_to(store.root).as_posix()
                   for p in store.root.rglob("*") if p.is_file())
    assert files == [OTHER_KEY]
    assert store.remove_stale_temporaries() == 0


def test_file_store_stages_beside_the_objects_and_fsyncs_new_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged object is written durably (``O_DSYNC``) into a temporary file at the
    root, which a crash leaves for start-up to remove; placing it waits for that write,
    renames the file and fsyncs its folder, and each folder created for it in its
    parent; the root, found there (``check`` made it), is fsynced in its parent too."""
    store = FileStore(tmp_path / "objects")
    store.check()
    opened: dict[str, int] = {}
    synced: list[str] = []
    real_open, real_fsync = os.open, os.fsync

    def recording_open(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        opened[str(path)] = flags
        return real_open(path, flags, *args, **kwargs)

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    with staged(store, b"staged") as staging:
        [temporary] = [name for name in opened if Path(name).name.startswith(".tmp-")]
        assert Path(temporary).parent == store.root
        assert opened[temporary] & os.O_DSYNC == os.O_DSYNC
        staging.place(KEY)
    store.close()
    study, series = KEY.split("/")[:2]
    assert synced == [str(store.root.parent), str(store.root), str(store.root / study),
                      str(store.root / study / series)]
    assert read_all(store, KEY) == b"staged"
    assert store.temporaries() == []


def test_start_up_removes_the_folders_deletions_left_empty(tmp_path: Path) -> None:
    """A deletion leaves its folders (a writer of another process may be about to use
    them); the start-up's clean-up, while nothing writes, removes those left empty, and
    the temporary files a crash left, and keeps every folder that holds an object."""
    store = FileStore(tmp_path / "objects")
    store.check()
    study, series = KEY.split("/")[:2]
    gone = f"{study}/1.2.826.0.1.3680043.8.498.7/1.2.826.0.1.3680043.8.498.7.1.dcm"
    elsewhere = "1.2.826.0.1.3680043.8.498.8/1.2.826.0.1.3680043.8.498.8.1/1.2.3.dcm"
    for key in (KEY, gone, elsewhere):
        store.put(key, io.BytesIO(b"one"), 3)
    store.delete(gone)
    store.delete(elsewhere)
    assert (store.root / elsewhere).parent.is_dir()  # left by the deletion
    (store.root / study / ".tmp-left").write_bytes(b"crash")
    assert store.remove_stale_temporaries() == 1
    assert sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")) == [
        study, f"{study}/{series}", KEY]
    store.close()


def test_file_store_writes_make_no_missing_root(tmp_path: Path) -> None:
    """Its folder gone while the node runs (a volume unmounted): writes fail, and
    nothing makes the folder anew to take objects beside the lost ones."""
    store = FileStore(tmp_path / "objects")
    store.check()
    store.root.rmdir()
    with pytest.raises(StorageError):
        store.put(KEY, io.BytesIO(b"one"), 3)
    assert store.put_many([(KEY, b"one")])[0] is not None
    with pytest.raises(StorageError), staged(store, b"staged") as staging:
        staging.place(KEY)
    assert not store.root.exists()
    store.close()


def test_file_store_fsyncs_a_folder_it_finds_in_its_parent_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder made by another writer (a process of the node) may not be fsynced in
    its parent yet: before the first object goes into it, this store fsyncs that
    parent; the next objects find the folder known."""
    store = FileStore(tmp_path / "objects")
    study, series = KEY.split("/")[:2]
    (store.root / study / series).mkdir(parents=True)  # the other writer's, not synced
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.put(KEY, io.BytesIO(b"one"), 3)
    folders = [path for path in synced if Path(path).is_dir()]
    assert folders == [str(store.root / study), str(store.root / study / series)]
    synced.clear()
    store.put(OTHER_KEY, io.BytesIO(b"two"), 3)
    assert [path for path in synced if Path(path).is_dir()] == [
        str(store.root / study / series)]


# --- S3Store only -------------------------------------------------------------------


@pytest.mark.interop
def test_s3_objects_live_under_the_customer_prefix(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    settings = Settings(
        customer=unique_customer(),
        storage="s3",
        s3_endpoint=seaweed_s3.endpoint,
        s3_access_key=seaweed_s3.access_key,
        s3_secret_key=seaweed_s3.secret_key,
        s3_bucket=CONTRACT_BUCKET,
    )
    store = S3Store.from_settings(settings)
    store.check()
    try:
        put_bytes(store, KEY, b"under the prefix")
        admin = seaweed_s3.client()
        names = [o.object_name for o in admin.list_objects(
            bucket_name=CONTRACT_BUCKET, prefix=f"{settings.customer}/", recursive=True)]
        assert names == [f"{settings.customer}/{KEY}"]
        stat = admin.stat_object(bucket_name=CONTRACT_BUCKET, object_name=names[0])
        assert stat.size == len(b"under the prefix")
    finally:
        store.delete(KEY)
        store.close()


@pytest.mark.interop
def test_s3_keys_ignore_other_customers_and_foreign_objects(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    store = make_s3_store(seaweed_s3)
    neighbour = make_s3_store(seaweed_s3, customer=store.customer + "x")
    store.check()
    admin = seaweed_s3.client()
    foreign = store._prefix + "notes/readme.txt"
    try:
        put_bytes(store, KEY, b"mine")
        put_bytes(neighbour, OTHER_KEY, b"theirs")
        admin.put_object(bucket_name=CONTRACT_BUCKET, object_name=foreign,
                         data=io.BytesIO(b"hand-made"), length=9)
        assert list(store.keys()) == [KEY]
        assert usage(store) == 4
        assert list(neighbour.keys()) == [OTHER_KEY]
    finally:
        store.delete(KEY)
        neighbour.delete(OTHER_KEY)
        admin.remove_object(bucket_name=CONTRACT_BUCKET, object_name=foreign)
        store.close()
        neighbour.close()


@pytest.mark.interop
def test_s3_multipart_round_trip_and_short_source(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    # 5 MiB parts (S3's minimum): an 11 MiB object takes three parts.
    store = make_s3_store(seaweed_s3, part_size=5 * 1024 * 1024)
    store.check()
    data = payload(11 * 1024 * 1024 + 5, seed=11)
    try:
        put_bytes(store, KEY, data)
        assert store.size(KEY) == len(data)
        assert read_all(store, KEY) == data
        # The source runs dry in the third part: the upload is aborted, nothing stays.
        with pytest.raises(StorageError, match="short source"):
            store.put(OTHER_KEY, io.BytesIO(data[: 10 * 1024 * 1024 + 3]), len(data))
        assert not exists(store, OTHER_KEY)
        assert list(store.keys()) == [KEY]
    finally:
        store.delete(KEY)
        store.close()


@pytest.mark.interop
@pytest.mark.parametrize("size", [1000, 11 * 1024 * 1024], ids=["put", "multipart"])
def test_s3_body_damaged_in_transit_is_refused(
    seaweed_s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch, size: int  # noqa: F811
) -> None:
    """Content-MD5 is sent over plain HTTP too, with a single PUT and with each part of
    a multipart upload, so the server refuses a damaged body."""
    store = make_s3_store(seaweed_s3, part_size=5 * 1024 * 1024)
    store.check()
    original = urllib3.HTTPConnectionPool.urlopen

    def damaging(pool: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        # On the way to the socket, below the client that computed the headers.
        body = kwargs.get("body")
        if method == "PUT" and body:
            kwargs["body"] = (b"\x01" if body[0] == 0 else b"\x00") + bytes(body[1:])
        return original(pool, method, url, *args, **kwargs)

    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", damaging)
    try:
        with pytest.raises(StorageError, match="BadDigest"):
            put_bytes(store, KEY, payload(size))
        monkeypatch.undo()
        assert not exists(store, KEY)
    finally:
        store.close()


@pytest.mark.interop
def test_s3_stream_close_releases_the_connection(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    store = make_s3_store(seaweed_s3)
    store.check()
    try:
        put_bytes(store, KEY, payload(200_000))
        # Closing half-read streams must not exhaust or wedge the pool.
        for _ in range(30):
            stream = store.open(KEY)
            assert len(stream.read(10)) == 10
            stream.close()
            stream.close()
        assert read_all(store, KEY) == payload(200_000)
    finally:
        store.delete(KEY)
        store.close()


@pytest.mark.interop
def test_s3_ranged_reads_fetch_what_they_read(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    """Counted on the wire: a read in the middle of an object fetches about its own
    size, where open (a whole-object stream, still one GET) fetches everything."""
    size = 4_000_000
    data = payload(size, seed=11)
    with CountingRelay(seaweed_s3.endpoint) as relay:
        store = make_s3_store(seaweed_s3, endpoint=relay.endpoint)
        store.check()
        try:
            put_bytes(store, KEY, data)
            relay.reset()
            with open_ranged(store, KEY) as stream:
                stream.seek(3_000_000)
                assert stream.read(100_000) == data[3_000_000:3_100_000]
                for start in range(0, 200, 8):  # small reads near one place: one GET
                    stream.seek(start)
                    assert stream.read(8) == data[start:start + 8]
            assert relay.requests == 2
            assert 100_000 + MIN_READ_AHEAD < relay.received < 100_000 + MIN_READ_AHEAD + 2000
            relay.reset()
            assert read_all(store, KEY) == data
            assert relay.requests == 1
            assert size < relay.received < size + 1000
        finally:
            store.delete(KEY)
            store.close()


@pytest.mark.interop
def test_s3_ranged_stream_refuses_an_object_overwritten_meanwhile(
        seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    """Reads of one stream come from one version of the object (If-Match): a stream
    that would join two versions fails instead."""
    store = make_s3_store(seaweed_s3)
    store.check()
    try:
        first, second = payload(300_000, seed=12), payload(300_000, seed=13)
        put_bytes(store, KEY, first)
        with store.open_ranged(KEY) as stream:
            assert stream.read(10) == first[:10]
            put_bytes(store, KEY, second)
            stream.seek(200_000)
            with pytest.raises(StorageError, match="changed"):
                stream.read(10)
        with store.open_ranged(KEY) as stream:
            stream.seek(200_000)
            assert stream.read(10) == second[200_000:200_010]
    finally:
        store.delete(KEY)
        store.close()


@pytest.mark.interop
@pytest.mark.parametrize("wrong", ["secret", "access"])
def test_s3_check_refuses_wrong_credentials(seaweed_s3: SeaweedS3, wrong: str) -> None:  # noqa: F811
    bad_secret = "definitely-not-the-secret"
    if wrong == "secret":
        store = make_s3_store(seaweed_s3, secret_key=bad_secret)
    else:
        store = make_s3_store(seaweed_s3, access_key="no-such-key", secret_key=bad_secret)
    with pytest.raises(ConfigError, match="credentials") as caught:
        store.check()
    message = str(caught.value)
    assert bad_secret not in message
    assert seaweed_s3.secret_key not in message
    # A put with wrong credentials fails as a StorageError, without secrets either.
    with pytest.raises(StorageError) as failed:
        put_bytes(store, KEY, b"data")
    assert bad_secret not in str(failed.value)
    store.close()


@pytest.mark.interop
def test_s3_check_fails_fast_on_an_unreachable_endpoint() -> None:
    store = S3Store(endpoint=f"127.0.0.1:{closed_port()}", access_key="a",
                    secret_key="secret-b", bucket="pacs", customer="default")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach") as caught:
        store.check()
    assert time.monotonic() - started < 5
    assert "secret-b" not in str(caught.value)
    started = time.monotonic()
    with pytest.raises(StorageError):
        store.size(KEY)
    assert time.monotonic() - started < 5
    store.close()


@pytest.mark.interop
def test_s3_check_creates_a_missing_bucket(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    bucket = "pacs-new-" + uuid.uuid4().hex[:12]
    admin = seaweed_s3.client()
    assert not admin.bucket_exists(bucket_name=bucket)
    store = make_s3_store(seaweed_s3, bucket=bucket)
    try:
        assert list(store.keys()) == []
        store.check()
        assert admin.bucket_exists(bucket_name=bucket)
        store.check()  # idempotent
    finally:
        store.close()
        admin.remove_bucket(bucket_name=bucket)


@pytest.mark.interop
def test_s3_check_without_create_refuses_a_missing_bucket(
        seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    """A check that must change nothing (``pacs fsck``) reports a missing bucket (a
    mistyped PACS_S3_BUCKET) instead of creating an empty one."""
    bucket = "pacs-absent-" + uuid.uuid4().hex[:12]
    admin = seaweed_s3.client()
    store = make_s3_store(seaweed_s3, bucket=bucket)
    try:
        with pytest.raises(ConfigError, match=f"no bucket '{bucket}'.*PACS_S3_BUCKET"):
            store.check(create=False)
        assert not admin.bucket_exists(bucket_name=bucket)
    finally:
        store.close()


def test_file_check_without_create_refuses_a_missing_folder(tmp_path: Path) -> None:
    """The same for the folder store: a folder not mounted (or a wrong data folder) is
    reported, not created; with ``create`` (a node's start) it is created."""
    root = tmp_path / "objects"
    store = FileStore(root)
    with pytest.raises(ConfigError, match="does not exist"):
        store.check(create=False)
    assert not root.exists()
    store.check()
    assert root.is_dir()
    store.check(create=False)  # now it exists
    store.close()


def test_s3_endpoint_with_a_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PACS_S3_ENDPOINT"):
        S3Store(endpoint="http://localhost:9000", access_key="a", secret_key="b",
                bucket="pacs", customer="default")


def test_s3_refuses_an_unsafe_customer_prefix() -> None:
    with pytest.raises(ConfigError):
        S3Store(endpoint="localhost:9000", access_key="a", secret_key="b",
                bucket="pacs", customer="../other")
