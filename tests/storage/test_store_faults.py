"""Faults of the parts under the ingest path, in one process: an S3 server that stalls or
refuses, a disk that fills up during a write or an fsync, an index locked by another
writer.  Each must fail within a bounded time, leave nothing behind and let the next
write succeed once the fault is gone.

The whole node under the same faults (SeaweedFS stopped or killed, a full tmpfs, the
index locked) is ``tests/interop/test_faults.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import apsw
import pytest

from pacs.core.attributes import BY_KEYWORD, Level
from pacs.core.config import Settings
from pacs.core.errors import (
    Exhausted,
    IndexFailure,
    StorageError,
    UnsettledWrite,
    WriteNotMade,
)
from pacs.core.index import writer
from pacs.core.index.connection import Index, busy_timeout_for, connect
from pacs.core.ingest import Received, analyse
from pacs.core.query.engine import QueryEngine
from pacs.core.query.model import Query
from pacs.core.services import Services, build
from pacs.core.storage import Staged, exists, filesystem, object_key, staged
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.s3 import S3Store, timeouts_for
from tests.conftest import folder_store
from tests.factory import make_instance

KEY = object_key("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                 "1.2.826.0.1.3680043.8.498.3")

#: Seconds allowed on top of a computed bound (a loaded machine, thread start-up).
SLACK = 5.0


# --- the timeouts ----------------------------------------------------------------------

@pytest.mark.parametrize("answer_within", [10, 15, 20, 30, 60, 120, 600])
def test_a_stalled_store_or_index_fails_before_the_peer_gives_up(answer_within: float) -> None:
    connect_timeout, read_timeout = timeouts_for(answer_within)
    # A single PUT: two stalled connects or sends, one read timeout, under 1 s back-off.
    assert 2 * connect_timeout + read_timeout + 1 < answer_within
    # A thread queued behind a group commit waits for it and then for its own.
    assert 2 * busy_timeout_for(answer_within) < answer_within


def test_default_timeouts() -> None:
    assert timeouts_for(60) == (5.0, 15.0)
    assert busy_timeout_for(60) == 15.0


# --- S3: a server that stalls, or is gone -----------------------------------------------

class StalledServer:
    """A TCP server that accepts connections and never reads or answers (a SIGSTOPped
    S3 server as its clients see it: the kernel accepts, nothing else happens)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        # Small buffers, so that a large body stalls the sender quickly.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def stalled() -> Iterator[StalledServer]:
    server = StalledServer()
    yield server
    server.close()


def _s3(port: int, connect_timeout: float = 1.0, read_timeout: float = 2.0) -> S3Store:
    return S3Store(endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="secret-b",
                   bucket="pacs", customer="default", connect_timeout=connect_timeout,
                   read_timeout=read_timeout)


def test_s3_put_to_a_stalled_server_fails_after_one_read_timeout(
        stalled: StalledServer) -> None:
    store = _s3(stalled.port)
    started = time.monotonic()
    with pytest.raises(StorageError, match="timed out") as caught:
        store.put(KEY, io.BytesIO(b"x" * 1000), 1000)
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 2.0 + SLACK
    # The server has the request and may still carry it out.
    assert isinstance(caught.value, UnsettledWrite)
    # Not sent again: a second try would only double the wait.
    assert len(stalled.accepted) == 1
    assert "secret-b" not in str(caught.value)
    store.close()


def test_s3_put_of_a_body_the_server_stops_reading_fails_within_two_send_timeouts(
        stalled: StalledServer, caplog: pytest.LogCaptureFixture) -> None:
    store = _s3(stalled.port, connect_timeout=1.0, read_timeout=30.0)
    data = os.urandom(8 * 2**20)  # far more than the socket buffers hold
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError):
        store.put(KEY, io.BytesIO(data), len(data))
    # Each send is bounded by the connect timeout; a stalled send is tried once more.
    assert time.monotonic() - started < 2 * 1.0 + 1 + SLACK
    assert len(stalled.accepted) == 2
    # urllib3's retry warning names the URL, i.e. the UIDs of the key: not logged.
    assert not [r for r in caplog.records
                if r.levelno >= logging.INFO and "498.3" in r.getMessage()]
    store.close()


def test_s3_put_to_a_closed_port_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = _s3(port, connect_timeout=5.0, read_timeout=15.0)
    started = time.monotonic()
    with pytest.raises(StorageError, match="refused") as caught:
        store.put(KEY, io.BytesIO(b"x"), 1)
    assert time.monotonic() - started < SLACK
    assert not isinstance(caught.value, UnsettledWrite)  # nothing reached a server
    assert isinstance(caught.value, WriteNotMade)  # nothing to undo
    store.close()


def test_s3_ranged_read_fails_as_a_whole_read_does(stalled: StalledServer) -> None:
    """Frames and headers read in ranges: a stalled server fails the read after one
    read timeout (not asked again), a closed port at once, both as StorageError."""
    store = _s3(stalled.port)
    started = time.monotonic()
    with store.open_ranged(KEY) as stream, pytest.raises(StorageError, match="timed out"):
        stream.seek(1000)
        stream.read(10)
    assert 2.0 <= time.monotonic() - started < 2.0 + SLACK
    assert len(stalled.accepted) == 1
    store.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = _s3(port)
    with store.open_ranged(KEY) as stream, pytest.raises(StorageError, match="refused"):
        stream.read(10)
    store.close()


def test_s3_store_takes_its_timeouts_from_the_dimse_timeout(settings: Settings) -> None:
    store = S3Store.from_settings(settings.with_overrides(
        storage="s3", s3_endpoint="127.0.0.1:9", dimse_timeout=20.0))
    timeout = store._http.connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout) == timeouts_for(20.0)
    store.close()


# --- the folder store: a disk that fills up --------------------------------------------

def _enospc(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _nothing_left(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert leftovers == []


def test_file_put_that_runs_out_of_space_mid_write_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = folder_store(tmp_path / "objects")

    def half_then_full(source: BinaryIO, out: BinaryIO, length: int) -> int:
        out.write(source.read(length // 2))
        out.flush()
        _enospc()
        return 0

    monkeypatch.setattr("pacs.core.storage.filesystem._copy", half_then_full)
    with pytest.raises(StorageError, match="No space left"):
        store.put(KEY, io.BytesIO(b"x" * 4096), 4096)
    _nothing_left(tmp_path / "objects")
    monkeypatch.undo()
    store.put(KEY, io.BytesIO(b"y" * 4096), 4096)  # space again: the next one is stored
    assert store.open(KEY).read() == b"y" * 4096


@pytest.mark.parametrize("how", ["put", "put_many", "stage"])
def test_file_write_whose_fsync_runs_out_of_space_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """ENOSPC (or EIO) from fsync: delayed allocation finds no room when it flushes."""
    store = folder_store(tmp_path / "objects")
    other = object_key("1.2.3", "1.2.4", "1.2.5")
    monkeypatch.setattr(os, "fsync", _enospc)
    if how == "put_many":
        failures = store.put_many([(KEY, b"a" * 100), (other, b"b" * 100)])
        assert all(isinstance(f, StorageError) for f in failures)
    elif how == "stage":  # O_DSYNC: the write itself syncs, and fails
        real_write = os.write

        def full_temporaries(fd: int, data: bytes) -> int:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".tmp-"):
                _enospc()
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", full_temporaries)
        with staged(store, b"a" * 100) as staging, \
                pytest.raises(StorageError, match="No space left"):
            staging.place(KEY)
        store.close()
    else:
        with pytest.raises(StorageError, match="No space left"):
            store.put(KEY, io.BytesIO(b"a" * 100), 100)
    _nothing_left(tmp_path / "objects")
    assert not exists(store, KEY)


def test_a_stage_with_no_thread_to_write_it_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread can start (the process is at its limit): the stage is refused
    (``Exhausted``, A700 at the edges) and its temporary file neither stays in the
    folder nor keeps a descriptor open (each such refusal left both)."""
    store = folder_store(tmp_path / "objects")

    def no_thread(*_args: object) -> None:
        raise Exhausted("cannot start a thread")

    monkeypatch.setattr(store._stagers, "submit", no_thread)  # type: ignore[attr-defined]
    before = _open_temporaries()
    for _ in range(3):
        with pytest.raises(Exhausted), staged(store, b"x" * 4096):
            pass
    assert (store.temporaries(), _open_temporaries()) == ([], before)
    store.close()


def _open_temporaries() -> list[str]:
    """This process' descriptors open on temporary files of a store."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if "/.tmp-" in target:
                found.append(target)
    return found


def test_a_quarantine_across_file_systems_names_the_copy_before_the_original_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quarantine to another file system (``EXDEV``): the copy's folder is synced
    before the original is unlinked (the unlink alone could reach the disk before a
    crash, and the object be in neither place)."""
    (tmp_path / "other").mkdir()
    store = FileStore(tmp_path / "objects", quarantine_root=tmp_path / "other" / "q")
    store.check()
    store.put(KEY, io.BytesIO(b"only copy"), 9)
    events: list[str] = []
    unlink, fsync_dir = Path.unlink, filesystem._fsync_dir

    def rename(_source: object, _target: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def unlinked(self: Path, missing_ok: bool = False) -> None:
        events.append(f"unlink {self.parent}")
        unlink(self, missing_ok=missing_ok)

    def synced(path: Path) -> None:
        events.append(f"fsync {path}")
        fsync_dir(path)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Path, "unlink", unlinked)
    monkeypatch.setattr(filesystem, "_fsync_dir", synced)
    where = Path(store.quarantine(KEY, "fsck-run"))
    assert where.read_bytes() == b"only copy"
    assert events.index(f"fsync {where.parent}") < events.index(
        f"unlink {(store.root / KEY).parent}"), events


# --- the ingest path: nothing acknowledged that is not durable --------------------------

class FullDisk:
    """An object store whose disk is full while :attr:`full` is set: each write fails
    as the folder store fails on ENOSPC; reads go on."""

    def __init__(self, inner: FileStore) -> None:
        self.inner = inner
        self.full = False

    def _check(self) -> None:
        if self.full:
            raise StorageError(f"cannot write object: {os.strerror(errno.ENOSPC)}")

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        self._check()
        self.inner.put(key, source, length)

    def put_many(self, items: Sequence[tuple[str, bytes]],
                 modified: Sequence[float] | None = None) -> list[StorageError | None]:
        if self.full:
            return [StorageError(f"cannot write object: {os.strerror(errno.ENOSPC)}")
                    for _ in items]
        return self.inner.put_many(items, modified)

    def stage(self, data: bytes) -> Staged:
        """The folder's staging, whose placing fails while the disk is full."""
        return _FullWhenPlaced(self, self.inner.stage(data))

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class _FullWhenPlaced:
    def __init__(self, disk: FullDisk, inner: Staged) -> None:
        self.disk = disk
        self.inner = inner

    def place(self, key: str) -> None:
        self.disk._check()
        self.inner.place(key)

    def discard(self) -> None:
        self.inner.discard()


@pytest.fixture
def file_services(settings: Settings) -> Iterator[Callable[..., Services]]:
    """Services over a folder store (optionally wrapped) with a short DIMSE timeout."""
    made: list[Services] = []

    def make(wrap: Callable[[FileStore], object] = lambda store: store,
             **changes: object) -> Services:
        changed = settings.with_overrides(dimse_timeout=4.0, **changes)  # busy timeout 1 s
        store = wrap(folder_store(changed.objects_dir))
        built = build(changed, store=store)  # type: ignore[arg-type]
        made.append(built)
        return built

    yield make
    for built in made:
        built.close()


def _indexed(services: Services) -> set[str]:
    return {row[0] for row in services.index.connection().execute(
        "SELECT sop_uid FROM instance")}


def _sop(data: bytes) -> str:
    return analyse(data).sop_instance_uid


def test_ingest_on_a_full_disk_fails_and_recovers(
        file_services: Callable[..., Services]) -> None:
    # The direct path: the objects' own writes meet the full disk (through the intake,
    # the index's commit would: an index failure, tested on its own).
    full_disk_scenario(file_services(FullDisk, intake_object_bytes=0))


def full_disk_scenario(services: Services) -> None:
    """Store, fill the disk, store (single and batch: refused, nothing indexed, reads go
    on, no temporary file), free it, store again (stored).  ``services`` must be built
    over a :class:`FullDisk`, without the intake (``intake_object_bytes`` 0)."""
    store: FullDisk = services.store.backend  # type: ignore[assignment]
    first = make_instance()
    services.ingest.store_bytes(first)
    store.full = True
    refused = make_instance()
    with pytest.raises(StorageError):
        services.ingest.store_bytes(refused)
    batch = services.ingest.store_batch([Received.of(make_instance()) for _ in range(3)])
    assert all(isinstance(result, StorageError) for result in batch)
    # Reads go on: what was stored is found and can be opened.
    assert _indexed(services) == {_sop(first)}
    [key] = list(store.inner.keys())
    assert services.store.open(key).read() == first
    assert store.inner.temporaries() == []
    store.full = False
    services.ingest.store_bytes(refused)
    assert _indexed(services) == {_sop(first), _sop(refused)}


@pytest.fixture
def held_index(settings: Settings) -> Iterator[Callable[[], None]]:
    """Start a write transaction on the index from another connection (as another
    process would); yields a function that ends it."""
    holder: list[apsw.Connection] = []

    def release() -> None:
        while holder:
            conn = holder.pop()
            conn.execute("ROLLBACK")
            conn.close()

    def hold() -> Callable[[], None]:
        conn = connect(settings.index_path)
        conn.execute("BEGIN IMMEDIATE")
        holder.append(conn)
        return release

    yield hold  # type: ignore[misc]
    release()


def test_ingest_while_another_writer_holds_the_index(
        file_services: Callable[..., Services], held_index: Callable[[], Callable[[], None]],
        settings: Settings) -> None:
    services = file_services()
    stored = make_instance(PatientID="HELD")
    services.ingest.store_bytes(stored)
    release = held_index()
    errors: list[BaseException] = []

    def store_one() -> None:
        try:
            services.ingest.store_bytes(make_instance(PatientID="HELD"))
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    # Several at once: threads queued behind a group commit wait for it, then for
    # their own (busy timeout 1 s each).
    started = time.monotonic()
    threads = [threading.Thread(target=store_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    # Reads are not blocked by the writer (WAL): a query answers meanwhile.
    engine = QueryEngine(services.index, max_rows=100, time_limit=10)
    assert _query_patients(engine) == ["HELD"]
    for thread in threads:
        thread.join(timeout=30)
    assert time.monotonic() - started < 2 * 1.0 + SLACK
    assert len(errors) == 4 and all(isinstance(e, IndexFailure) for e in errors), errors
    # The objects written for them were removed again: the store holds what is indexed.
    row = writer.lookup(services.index.connection(), _sop(stored))
    assert row is not None
    assert list(services.store.keys()) == [row.object_key]
    assert services.store.backend.temporaries() == []  # type: ignore[attr-defined]
    release()
    services.ingest.store_bytes(make_instance(PatientID="HELD"))
    assert len(_indexed(services)) == 2


def _query_patients(engine: QueryEngine) -> list[str | None]:
    returns = (BY_KEYWORD["PatientID"],)
    query = Query(level=Level.PATIENT, return_keys=returns)
    return [match.values["PatientID"] for match in engine.find(query)]


# --- the group commit when SQLite rolls the whole transaction back ---------------------

def test_a_piece_whose_failure_ends_the_transaction_fails_the_whole_batch(
        tmp_path: Path) -> None:
    """SQLite rolls back the whole transaction on SQLITE_FULL or an I/O error: the pieces
    before are gone, and the pieces after must not run (they would commit alone)."""
    index = Index(tmp_path / "index.sqlite")
    index.connection().execute("CREATE TABLE t (x INTEGER)")

    def insert(value: int) -> Callable[[apsw.Connection], None]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (value,))

    def disk_full(conn: apsw.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL
        raise apsw.FullError("database or disk is full")

    errors = index.commit_all([insert(1), disk_full, insert(2)])
    assert all(isinstance(error, IndexFailure) for error in errors), errors
    assert index.connection().execute("SELECT count(*) FROM t").fetchone()[0] == 0
    index.commit(insert(3))  # the index is usable again
    assert index.connection().execute("SELECT x FROM t").fetchall() == [(3,)]
    index.close()


class AnsweringServer:
    """A TCP server that reads each request's head and body and answers with
    ``answer`` (``None``: closes the connection without a word, then stops listening:
    a server that took the request and went away).  With ``then``, only the first
    request gets ``answer`` (``None``: its connection closed, the server listening on)
    and every later one ``then``."""

    def __init__(self, answer: bytes | None, then: bytes | None = None) -> None:
        self.answer = answer
        self.then = then
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(body) < length and (chunk := conn.recv(65536)):
                    body += chunk
                self.requests += 1
                answer = self.answer if self.then is None or self.requests == 1 else self.then
                if answer is None and self.then is not None:
                    continue  # taken, not answered: the connection closes
                if answer is None:
                    self.sock.close()  # gone: the retry finds the port closed
                    return
                conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()


def _s3_error(status: str, code: str) -> bytes:
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>m</Message><Resource>/pacs</Resource><RequestId>r</RequestId>"
            f"</Error>").encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize(("answer", "unanswered"), [
    (None, True),  # taken, the connection dropped, then the port closed
    (_s3_error("500 Internal Server Error", "InternalError"), True),
    (_s3_error("503 Slow Down", "SlowDown"), False),
    (_s3_error("403 Forbidden", "AccessDenied"), False),
])
def test_an_s3_write_is_unsettled_only_when_s3_may_still_carry_it_out(
        answer: bytes | None, unanswered: bool) -> None:
    """What S3 refused (an error code it answered with, a request it throttled) is
    settled; a request it took without answering, or answered with an internal error,
    may still be carried out: UnsettledWrite, the key told to ``on_unanswered`` first,
    whatever the retries met last."""
    server = AnsweringServer(answer)
    store = _s3(server.port)
    told: list[str] = []
    store.on_unanswered = told.append
    try:
        with pytest.raises(StorageError) as caught:
            store.put(KEY, io.BytesIO(b"x" * 100), 100)
    finally:
        store.close()
        server.close()
    assert isinstance(caught.value, UnsettledWrite) is unanswered, caught.value
    assert isinstance(caught.value, WriteNotMade) is not unanswered
    # Told once more for each attempt tried again after one S3 may carry out.
    assert set(told) == ({KEY} if unanswered else set())
    assert server.requests >= 1


_OK = b"HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("first", [
    None,  # taken, the connection dropped unanswered
    _s3_error("500 Internal Server Error", "InternalError"),
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
], ids=["dropped", "500", "502"])
@pytest.mark.parametrize("write", ["put", "delete"])
def test_an_s3_write_tried_again_after_an_attempt_s3_may_carry_out_is_unsettled(
        first: bytes | None, write: str) -> None:
    """The first attempt reached the server and went unanswered, the retry succeeded:
    the write returns, but the first attempt may still be carried out later, over
    whatever is written to the key since, so its key is told to ``on_unanswered`` all
    the same (before, only a write that failed in the end was)."""
    server = AnsweringServer(first, then=_OK)
    store = _s3(server.port)
    told: list[str] = []
    store.on_unanswered = told.append
    try:
        if write == "put":
            store.put(KEY, io.BytesIO(b"x" * 100), 100)
        else:
            store.delete(KEY)
    finally:
        store.close()
        server.close()
    assert server.requests == 2
    assert told == [KEY]


def test_an_s3_write_tried_again_after_slow_down_stays_settled() -> None:
    """A throttled attempt (503 Slow Down) was refused, not taken: its retry's success
    settles the key."""
    server = AnsweringServer(_s3_error("503 Slow Down", "SlowDown"), then=_OK)
    store = _s3(server.port)
    told: list[str] = []
    store.on_unanswered = told.append
    try:
        store.put(KEY, io.BytesIO(b"x" * 100), 100)
    finally:
        store.close()
        server.close()
    assert server.requests == 2 and told == []
