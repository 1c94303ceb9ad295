"""The one way to open the SQLite index.

Every connection gets the same treatment (apsw best practice): WAL so that readers in
other processes (DIMSE workers, gunicorn workers) never block the writer,
``synchronous=FULL`` so that a commit is on disk before C-STORE success is sent
(docs/architecture.md, "Guarantees"), foreign keys on, double-quoted string literals off, a busy
timeout long enough for several writer processes, and migrations applied by
``user_version``.  Connections are per thread and per process: never carried across
``fork()``, and closed when their thread ends (:meth:`Index.connection`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import apsw
import apsw.bestpractice

from pacs.core.errors import IndexFailure
from pacs.core.index.wildcards import wildcard_matches

#: Milliseconds a connection waits for another writer before giving up, unless the
#: :class:`Index` is given its own (:func:`busy_timeout_for`).
BUSY_TIMEOUT_MS = 30_000
#: WAL pages after which a committing connection checkpoints by itself (64 MiB of 4 KiB
#: pages, against SQLite's 1000).  A checkpoint copies the WAL into the index file and
#: fsyncs it; the intake's mover runs one (passive) after each batch, off the ingest's
#: commits, and this bounds the WAL when no mover runs (``pacs import``).
AUTOCHECKPOINT_PAGES = 16_384
#: Bytes the WAL file is cut back to once a checkpoint has emptied it; also what the
#: node writes ahead of it (:meth:`Index.write_wal_ahead`).
WAL_SIZE_LIMIT = 64 << 20
#: Bytes per write of :meth:`Index.write_wal_ahead`.
_AHEAD_CHUNK = 1 << 20
#: Free space :meth:`Index.write_wal_ahead` asks for, as a multiple of what it writes.
_AHEAD_ROOM = 4


def busy_timeout_for(answer_within: float) -> float:
    """Seconds to wait for another writer so that a store fails within ``answer_within``.

    A quarter of it: a thread whose piece of work arrives while the group commit before
    it waits (:meth:`Index.commit_all`) may wait twice, and the object write comes on
    top (see :func:`pacs.core.storage.s3.timeouts_for`).  15 s for the default
    ``PACS_DIMSE_TIMEOUT`` of 60 s; at least 1 s.

    Parameters
    ----------
    answer_within : float
        Seconds the peer waits for the answer (``PACS_DIMSE_TIMEOUT``).
    """
    return max(1.0, answer_within / 4)


def connect(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS, *,
            synced: bool = True) -> apsw.Connection:
    """Open ``path`` with the project's pragmas applied.

    Parameters
    ----------
    path : Path
        The index file; its folder is created when missing.
    busy_timeout_ms : int
        Milliseconds to wait for another process's write lock before failing.
    synced : bool
        Commits are on disk when they return (``synchronous=FULL``).  Only the
        intake's mover opens its connections without (``NORMAL``): what it commits
        (rows of objects now in the store) may be lost in a crash, which only repeats
        an identical put; a later synced commit of any process carries it too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = apsw.Connection(str(path))
        apsw.bestpractice.connection_dqs(conn)
        apsw.bestpractice.connection_enable_foreign_keys(conn)
        apsw.bestpractice.connection_recursive_triggers(conn)
        conn.set_busy_handler(_BusyWait(busy_timeout_ms / 1000))
        conn.pragma("journal_mode", "wal")
        # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
        # commit here stands for an acknowledged C-STORE.
        conn.pragma("synchronous", "FULL" if synced else "NORMAL")
        conn.pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES)
        conn.pragma("journal_size_limit", WAL_SIZE_LIMIT)
        # Readers of a large study should not hold the cache of a small machine hostage.
        conn.pragma("cache_size", -32_000)
        conn.pragma("temp_store", "memory")
        # Wildcard matching GLOB cannot say (pacs.core.index.wildcards).
        conn.create_scalar_function("dicom_wildcard", wildcard_matches, 4,
                                    deterministic=True)
    except apsw.Error as exc:
        raise IndexFailure(f"cannot open the index {path}: {exc}") from exc
    return conn


#: Seconds between two tries at another process's write lock, while the wait is short.
BUSY_POLL = 0.0001
#: Seconds of waiting after which the tries are :data:`BUSY_POLL_SLOW` apart.
BUSY_FAST_FOR = 0.005
#: Seconds between two tries once the wait is longer than :data:`BUSY_FAST_FOR`.
BUSY_POLL_SLOW = 0.0005


class _BusyWait:
    """SQLite's busy handler: try the lock again, every :data:`BUSY_POLL` seconds for
    the first :data:`BUSY_FAST_FOR`, then every :data:`BUSY_POLL_SLOW`, until
    ``timeout`` has passed since the first try.

    SQLite's own (``sqlite3_busy_timeout``) sleeps 1, 2, 5, 10, then up to 100 ms
    between tries.  An ingest commit holds the lock for about a millisecond (its
    statements and one WAL fsync) and the DIMSE workers take turns at it, so each
    sleep past the moment the lock is free is time nobody commits: with 4
    associations on 2 workers, tries 0.1 ms apart stored a tenth more instances per
    second than tries 0.5 ms apart.  A try is one failed lock attempt (a system
    call); past the first milliseconds the holder is a long transaction (the mover's
    batch, a deletion), not worth trying for that often.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._since = 0.0

    def __call__(self, tries: int) -> bool:
        now = time.monotonic()
        if tries == 0:
            self._since = now
        waited = now - self._since
        if waited >= self.timeout:
            return False  # SQLITE_BUSY: the caller reports IndexFailure
        time.sleep(BUSY_POLL if waited < BUSY_FAST_FOR else BUSY_POLL_SLOW)
        return True


@dataclass(frozen=True)
class _Opened:
    """A connection an :class:`Index` opened, and the thread and process it is for.

    Both are weak references: the registry must keep neither the connection (it closes
    when its thread's local storage goes) nor the thread (an association thread holds
    the whole association) alive.
    """

    conn: weakref.ref[apsw.Connection]
    thread: weakref.ref[threading.Thread]
    pid: int

    def orphaned(self) -> bool:
        """True when the thread that used the connection has ended."""
        thread = self.thread()
        return thread is None or not thread.is_alive()


class _Work:
    """One piece of work waiting for a group commit (see :meth:`Index.commit`)."""

    def __init__(self, work: Callable[[apsw.Connection], None]) -> None:
        self.work = work
        self.done = False
        self.error: BaseException | None = None


class Index:
    """Connections to one customer's index file, one per thread and process.

    Parameters
    ----------
    path : Path
        The SQLite file.
    busy_timeout : float
        Seconds a write waits for another process's transaction before it fails with
        :class:`IndexFailure` (see :func:`busy_timeout_for`).
    synced : bool
        See :func:`connect`.
    """

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT_MS / 1000, *,
                 synced: bool = True) -> None:
        self.path = path
        self.busy_timeout_ms = int(busy_timeout * 1000)
        self.synced = synced
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._opened: list[_Opened] = []
        self._opened_lock = threading.Lock()
        self._queue: list[_Work] = []
        self._queue_lock = threading.Lock()
        self._leader = threading.Lock()

    def connection(self) -> apsw.Connection:
        """This thread's connection, opened on first use (and again after a fork).

        A thread's connection lives as long as the thread: a DIMSE association and a
        STOW-RS request each run in threads of their own, and a connection kept after
        its thread ended held two descriptors (the file and its WAL) and up to
        ``cache_size`` of memory for ever.  Only this thread's local storage refers to
        it, so it closes as the thread ends; one that something else still refers to
        (a cursor in an abandoned generator, waiting for the garbage collector) is
        closed here, when the next connection is opened, once its thread has ended.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            self._close_orphans()
            conn = connect(self.path, self.busy_timeout_ms, synced=self.synced)
            self._local.conn = conn
            self._local.pid = os.getpid()
            entry = _Opened(weakref.ref(conn), weakref.ref(threading.current_thread()),
                            os.getpid())
            with self._opened_lock:
                self._opened.append(entry)
        return conn

    def _close_orphans(self) -> None:
        """Close the connections of ended threads of this process; forget the closed
        ones and those inherited through ``fork()`` (never closed here: they are the
        parent's)."""
        pid = os.getpid()
        orphans = []
        with self._opened_lock:
            kept = []
            for entry in self._opened:
                conn = entry.conn()
                if conn is None or entry.pid != pid:
                    continue
                if entry.orphaned():
                    orphans.append(conn)
                else:
                    kept.append(entry)
            self._opened = kept
        for conn in orphans:  # its thread has ended: nobody else uses it
            _close(conn)

    @contextmanager
    def write(self, synced: bool = False) -> Iterator[apsw.Connection]:
        """One short IMMEDIATE write transaction, committed on exit (on disk when it
        returns with ``synced``, on a connection opened without: the mover's records of
        what a crash must not lose).

        One writer per process at a time; other processes wait on SQLite's lock for up
        to the busy timeout.

        Raises
        ------
        IndexFailure
            When the transaction cannot begin or commit.
        """
        conn = self.connection()
        with self._write_lock, self._synchronous(conn, synced):
            try:
                conn.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise IndexFailure(f"index busy or unavailable: {exc}") from exc
            try:
                yield conn
            except BaseException:
                # SQLite may have rolled back by itself (disk full, I/O error).
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except apsw.Error as exc:
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                raise IndexFailure(f"index commit failed: {exc}") from exc

    @contextmanager
    def _synchronous(self, conn: apsw.Connection, synced: bool) -> Iterator[None]:
        """``synchronous=FULL`` for the block when ``synced`` is asked of a connection
        opened without."""
        if not synced or self.synced:
            yield
            return
        conn.pragma("synchronous", "FULL")
        try:
            yield
        finally:
            conn.pragma("synchronous", "NORMAL")

    def commit(self, work: Callable[[apsw.Connection], None]) -> None:
        """Run ``work`` in a write transaction, sharing the commit with other threads.

        Group commit: the commit of a WAL transaction costs an fsync, and one writer per
        process means threads storing at the same time (parallel associations, STOW-RS
        parts) wait for each other's fsyncs.  Here a thread that gets the writer's turn
        runs every piece of work queued meanwhile, each in its own savepoint (one
        failing piece does not fail the others), under one COMMIT.  ``work`` returns only
        after the transaction that holds it has committed: the durability of each piece is
        the same as with :meth:`write`.

        Raises
        ------
        IndexFailure, or whatever ``work`` raised
            When this piece of work, or the commit, failed (nothing of it is kept).
        """
        error = self.commit_all([work])[0]
        if error is not None:
            raise error

    def commit_all(self, works: list[Callable[[apsw.Connection], None]]
                   ) -> list[BaseException | None]:
        """:meth:`commit` for several pieces at once: each in its own savepoint, all in
        one transaction (shared with other threads' pieces); each piece's error or
        ``None``, known only once the transaction has committed."""
        entries = [_Work(work) for work in works]
        with self._queue_lock:
            self._queue.extend(entries)
        with self._leader:
            if not all(entry.done for entry in entries):
                self._run_batch()
        return [entry.error for entry in entries]

    def _take(self) -> list[_Work]:
        """The queued pieces; the queue emptied."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        return batch

    def _run_batch(self) -> None:
        """Run the queued pieces in one transaction; mark each done, with its error.

        The queue is taken once the transaction has begun, not before: while this
        thread waits for another process' transaction (SQLite's write lock, held for
        about one WAL fsync), the pieces that this process' other threads queue join
        this transaction instead of waiting for the next one.  With 4 associations on
        2 DIMSE workers, a transaction then held 1.4 instances instead of 1.1.
        """
        batch: list[_Work] = []
        try:
            with self.write() as conn:
                batch = self._take()
                if len(batch) == 1:
                    # Alone in its transaction: its failure fails the transaction
                    # (below), which holds nothing else; no savepoint is needed.
                    batch[0].work(conn)
                else:
                    _run_pieces(conn, batch)
        except BaseException as exc:  # noqa: BLE001 - the transaction failed: each piece gets it
            batch = batch or self._take()  # it could not begin: every queued piece fails
            for entry in batch:
                entry.error = entry.error or _failure(exc)
        for entry in batch:
            entry.done = True

    def write_wal_ahead(self, size: int = WAL_SIZE_LIMIT) -> int:
        """Make the WAL file ``size`` bytes long, its new blocks written (zeros) and
        synced; the bytes added (0 when it is that long already or does not exist).

        Why: a commit that appends to the WAL changes the file's size, so its fsync
        also commits the file system's journal; one that overwrites blocks already
        written does not.  SQLite writes its WAL from the start again after a
        checkpoint and cuts it back only to :data:`WAL_SIZE_LIMIT`, so once the file
        is that long the commits of a burst rewrite it in place (``bench/wal_commits.py``
        on ext4: 1.6-2 times as many synced commits per second).  It cannot mislead SQLite:
        it reads WAL frames from the start and stops at the first whose salt and
        checksum do not match its header's, as zeros never do.  The length is read
        and written under SQLite's write lock (an empty IMMEDIATE transaction, rolled
        back), so no commit appends meanwhile.  Nothing is written on a file system
        with less than four times that much free; one that runs out meanwhile is cut
        back to the length it had.

        Raises
        ------
        IndexFailure
            When the lock cannot be taken, or the file not written.
        """
        conn = self.connection()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise IndexFailure(f"index busy or unavailable: {exc}") from exc
            try:
                return _extend(Path(f"{self.path}-wal"), size)
            finally:
                conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close every connection this object opened in this process."""
        pid = os.getpid()
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for entry in opened:
            conn = entry.conn()
            if conn is not None and entry.pid == pid:
                _close(conn)
        self._local = threading.local()


def _extend(path: Path, size: int) -> int:
    """:meth:`Index.write_wal_ahead` under the lock: zeros from the end of ``path`` to
    ``size``, synced; cut back on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        start = os.fstat(fd).st_size
        if start >= size:
            return 0
        room = os.fstatvfs(fd)
        if room.f_bavail * room.f_frsize < _AHEAD_ROOM * (size - start):
            # Never the writer that takes a small disk's last bytes, even for a moment:
            # a store at the same time would fail for it.
            raise IndexFailure(f"too little free space to write the WAL ahead by "
                               f"{size - start} bytes")
        zeros = bytes(_AHEAD_CHUNK)
        try:
            for offset in range(start, size, _AHEAD_CHUNK):
                os.pwrite(fd, zeros[:min(_AHEAD_CHUNK, size - offset)], offset)
            os.fdatasync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise IndexFailure(f"cannot write the WAL ahead: {exc}") from exc
        return size - start
    finally:
        os.close(fd)


def _run_pieces(conn: apsw.Connection, batch: list[_Work]) -> None:
    """Run each piece of ``batch`` in its own savepoint of the transaction of ``conn``:
    a piece that fails is rolled back alone, with its error kept."""
    for entry in batch:
        conn.execute("SAVEPOINT piece")
        try:
            entry.work(conn)
        except BaseException as exc:  # handed to its caller
            if conn.getautocommit():
                # SQLite rolled the whole transaction back (disk full, I/O error): the
                # pieces before this one are gone too, and the next ones must not run
                # outside a transaction.
                raise
            conn.execute("ROLLBACK TO piece")
            entry.error = _failure(exc)
        conn.execute("RELEASE piece")


def _failure(exc: BaseException) -> BaseException:
    """An SQLite error as :class:`IndexFailure` (disk full, I/O error, busy); anything
    else as it is."""
    if isinstance(exc, apsw.Error):
        failure = IndexFailure(f"index write failed: {exc}")
        failure.__cause__ = exc
        return failure
    return exc


def _close(conn: apsw.Connection) -> None:
    """Close ``conn``, and the statements of its cursors with it."""
    with contextlib.suppress(apsw.Error):
        conn.close(True)
