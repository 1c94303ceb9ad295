"""The one way to open the SQLite index.

Every connection gets the same treatment (apsw best practice): WAL so that readers in
other processes (DIMSE workers, gunicorn workers) never block the writer,
``synchronous=FULL`` so that a commit is on disk before C-STORE success is sent
(DESIGN.md section 4), foreign keys on, double-quoted string literals off, a busy
timeout long enough for several writer processes, and migrations applied by
``user_version``.  Connections are per thread and per process: never carried across
``fork()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import apsw.bestpractice

from pacs.errors import IndexFailure

#: Milliseconds a connection waits for another writer before giving up.
BUSY_TIMEOUT_MS = 30_000


def connect(path: Path) -> apsw.Connection:
    """Open ``path`` with the project's pragmas applied.

    Parameters
    ----------
    path : Path
        The index file; its folder is created when missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = apsw.Connection(str(path))
        apsw.bestpractice.connection_dqs(conn)
        apsw.bestpractice.connection_enable_foreign_keys(conn)
        apsw.bestpractice.connection_recursive_triggers(conn)
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        conn.pragma("journal_mode", "wal")
        # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
        # commit here stands for an acknowledged C-STORE.
        conn.pragma("synchronous", "FULL")
        # Readers of a large study should not hold the cache of a small machine hostage.
        conn.pragma("cache_size", -32_000)
        conn.pragma("temp_store", "memory")
    except apsw.Error as exc:
        raise IndexFailure(f"cannot open the index {path}: {exc}") from exc
    return conn


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
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._opened: list[apsw.Connection] = []
        self._opened_lock = threading.Lock()
        self._queue: list[_Work] = []
        self._queue_lock = threading.Lock()
        self._leader = threading.Lock()

    def connection(self) -> apsw.Connection:
        """This thread's connection, opened on first use (and again after a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = connect(self.path)
            self._local.conn = conn
            self._local.pid = os.getpid()
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[apsw.Connection]:
        """One short IMMEDIATE write transaction, committed on exit.

        One writer per process at a time; other processes wait on SQLite's lock for up
        to :data:`BUSY_TIMEOUT_MS`.

        Raises
        ------
        IndexFailure
            When the transaction cannot begin or commit.
        """
        conn = self.connection()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise IndexFailure(f"index busy or unavailable: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except apsw.Error as exc:
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                raise IndexFailure(f"index commit failed: {exc}") from exc

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
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._run_batch(batch)
        return [entry.error for entry in entries]

    def _run_batch(self, batch: list[_Work]) -> None:
        try:
            with self.write() as conn:
                for entry in batch:
                    conn.execute("SAVEPOINT piece")
                    try:
                        entry.work(conn)
                    except BaseException as exc:  # noqa: BLE001 - handed to its caller
                        conn.execute("ROLLBACK TO piece")
                        entry.error = exc
                    conn.execute("RELEASE piece")
        except BaseException as exc:  # the commit failed: nothing of the batch is kept
            for entry in batch:
                entry.error = entry.error or exc
        for entry in batch:
            entry.done = True

    def close(self) -> None:
        """Close every connection this object opened in this process."""
        with self._opened_lock:
            for conn in self._opened:
                try:
                    conn.close()
                except apsw.Error:
                    pass
            self._opened.clear()
        self._local = threading.local()
