"""Per-thread and per-association resources are released when their owner ends, not when
the garbage collector runs: index connections of ended threads, an association's eventfd
(docs/reliability.md, "Leaks over many associations and requests")."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

from pacs.core.index.connection import Index
from pacs.dimse.seam.reactor import _Waker


def open_fds() -> set[str]:
    """What this process's descriptors point at, one entry per descriptor."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue  # the listing's own descriptor
    return found


def index_fds(path: Path) -> int:
    """Descriptors of this process on the index file and its WAL."""
    return sum(1 for entry in open_fds() if entry.split(":", 1)[1].startswith(str(path)))


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(tmp_path / "index.sqlite")
    idx.connection().execute("CREATE TABLE t(x)")
    yield idx
    idx.close()


def in_thread(work: Callable[[], object]) -> None:
    """Run ``work`` in a thread of its own, to its end."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_a_thread_connection_closes_when_the_thread_ends(index: Index) -> None:
    gc.disable()  # the release must not depend on the collector
    try:
        baseline = index_fds(index.path)
        for _ in range(50):
            in_thread(lambda: index.connection().execute("INSERT INTO t VALUES (1)"))
        assert index_fds(index.path) <= baseline + 1  # SQLite may keep one for reuse
    finally:
        gc.enable()


def test_a_connection_kept_alive_elsewhere_is_closed_once_its_thread_ended(
        index: Index) -> None:
    kept: list[object] = []

    def leave_a_cursor() -> None:
        cursor = index.connection().execute("SELECT x FROM t")
        kept.append(cursor)  # a generator's frame, a traceback: outlives the thread

    before = index_fds(index.path)
    in_thread(leave_a_cursor)
    assert index_fds(index.path) > before  # still open: the cursor holds it
    in_thread(index.connection)  # the next connection opened in this process closes it
    assert index_fds(index.path) <= before + 1
    with pytest.raises(apsw.Error):  # closed under the cursor: it cannot be used
        list(kept[0])  # type: ignore[call-overload]


def test_a_live_thread_keeps_its_connection(index: Index) -> None:
    opened, done = threading.Event(), threading.Event()
    results: list[int] = []

    def live() -> None:
        conn = index.connection()
        opened.set()
        done.wait(10)
        results.append(conn.execute("SELECT count(*) FROM t").fetchone()[0])

    thread = threading.Thread(target=live)
    thread.start()
    assert opened.wait(10)
    in_thread(index.connection)  # opens, sweeps ended threads' connections
    done.set()
    thread.join()
    assert results == [0]


def test_close_leaves_connections_inherited_through_fork_alone(index: Index) -> None:
    conn = index.connection()
    pid = os.fork()
    if pid == 0:  # the child: close() must not touch the parent's connection
        try:
            index.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_a_closed_waker_ignores_wake_and_holds_no_descriptor() -> None:
    before = open_fds()
    waker = _Waker()
    assert len(open_fds() - before) == 1
    waker.wake()
    waker.close()
    assert open_fds() - before == set()
    waker.wake()  # a late wake from another thread: nothing happens
    waker.drain()
    waker.close()  # and a second close (the finaliser) neither
    assert open_fds() - before == set()


def test_a_wake_racing_close_never_reaches_a_reused_descriptor(tmp_path: Path) -> None:
    """Wakes from another thread while the waker closes and its number is reused by a
    file: the file stays empty."""
    for _ in range(200):
        waker = _Waker()
        number = waker.fd
        stop = threading.Event()

        def wake_loop(w: _Waker = waker, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                w.wake()

        thread = threading.Thread(target=wake_loop)
        thread.start()
        waker.close()
        reused = os.open(tmp_path / "reused", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        stop.set()
        thread.join()
        try:
            if reused == number:
                assert os.fstat(reused).st_size == 0
        finally:
            os.close(reused)
