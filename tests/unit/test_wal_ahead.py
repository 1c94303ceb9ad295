"""The index's WAL written ahead (:meth:`pacs.core.index.connection.Index.write_wal_ahead`).

What is on disk is read as a crash would leave it: the index file and its WAL copied
while the node's connections are still open (no checkpoint, no close), then opened
alone.  Every commit made before the copy is there, whether it was made before or after
the WAL was written ahead, before or after SQLite started the WAL again from its
beginning over the zeros and the old frames.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from pacs.core.errors import IndexFailure
from pacs.core.index.connection import WAL_SIZE_LIMIT, Index

#: A small length, so that the tests write little; the real one is WAL_SIZE_LIMIT.
AHEAD = 1 << 20


def _wal(index: Index) -> Path:
    return Path(f"{index.path}-wal")


def _insert(index: Index, *values: int) -> None:
    for value in values:
        with index.write() as conn:
            conn.execute("INSERT INTO t VALUES (?)", (value,))


def _as_after_a_crash(index: Index, folder: Path) -> list[int]:
    """The rows of ``t`` in a copy of the index file and its WAL as they are on disk
    now, opened alone (SQLite recovers the WAL)."""
    folder.mkdir()
    copy = folder / index.path.name
    shutil.copyfile(index.path, copy)
    shutil.copyfile(_wal(index), f"{copy}-wal")
    conn = apsw.Connection(str(copy))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return [row[0] for row in conn.execute("SELECT x FROM t ORDER BY x")]
    finally:
        conn.close()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    opened = Index(tmp_path / "index.sqlite")
    with opened.write() as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    yield opened
    opened.close()


def test_the_wal_is_written_ahead_once_and_every_commit_survives(index: Index,
                                                                tmp_path: Path) -> None:
    _insert(index, 1, 2)
    before = _wal(index).stat().st_size
    assert 0 < before < AHEAD
    assert index.write_wal_ahead(AHEAD) == AHEAD - before
    assert _wal(index).stat().st_size == AHEAD
    assert index.write_wal_ahead(AHEAD) == 0  # long enough already
    _insert(index, 3)
    assert _wal(index).stat().st_size == AHEAD  # the commit wrote in place
    assert _as_after_a_crash(index, tmp_path / "crash1") == [1, 2, 3]
    # A checkpoint, then SQLite starts the WAL again from its beginning: new frames over
    # the old ones, the old ones and the zeros after them ignored.
    index.connection().wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    _insert(index, 4)
    assert _wal(index).stat().st_size == AHEAD
    assert _as_after_a_crash(index, tmp_path / "crash2") == [1, 2, 3, 4]
    index.close()
    reopened = Index(index.path)
    try:
        assert [row[0] for row in reopened.connection().execute(
            "SELECT x FROM t ORDER BY x")] == [1, 2, 3, 4]
    finally:
        reopened.close()


def test_an_index_whose_wal_was_only_written_ahead_opens_empty_of_frames(
        index: Index, tmp_path: Path) -> None:
    """Written ahead right after a checkpoint emptied it: zeros after a header, or after
    frames already copied - nothing that SQLite takes for a commit."""
    _insert(index, 1)
    index.connection().wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    assert _wal(index).stat().st_size == 0
    index.write_wal_ahead(AHEAD)
    assert _as_after_a_crash(index, tmp_path / "crash") == [1]
    _insert(index, 2)
    assert _as_after_a_crash(index, tmp_path / "crash2") == [1, 2]


def test_a_full_disk_leaves_the_wal_as_it_was(index: Index,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    _insert(index, 1)
    before = _wal(index).read_bytes()
    real = os.pwrite
    writes = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(offset)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(IndexFailure, match="No space left"):
        index.write_wal_ahead(4 << 20)
    monkeypatch.undo()
    assert _wal(index).read_bytes() == before
    _insert(index, 2)  # the lock was given back
    assert _as_after_a_crash(index, tmp_path / "crash") == [1, 2]


def test_what_is_written_ahead_stays_through_checkpoints(index: Index) -> None:
    """SQLite cuts the WAL back to ``journal_size_limit`` (WAL_SIZE_LIMIT) after a
    checkpoint, never shorter: the default length written ahead is kept."""
    assert index.write_wal_ahead() > 0
    for value in range(3):
        _insert(index, value)
        index.connection().wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    _insert(index, 3)
    assert _wal(index).stat().st_size == WAL_SIZE_LIMIT


def test_a_disk_with_little_room_gets_nothing_written(index: Index,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Less than four times the bytes to write free (a small volume): nothing written,
    so that no store at the same moment meets a full disk because of it."""
    _insert(index, 1)
    before = _wal(index).read_bytes()
    real = os.fstatvfs

    def small(fd: int) -> os.statvfs_result:
        found = real(fd)
        fields = list(found)
        fields[4] = (3 * AHEAD) // found.f_frsize  # f_bavail: three times what is asked
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "fstatvfs", small)
    with pytest.raises(IndexFailure, match="too little free space"):
        index.write_wal_ahead(AHEAD + len(before))
    assert _wal(index).read_bytes() == before
