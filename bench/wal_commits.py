"""Synced SQLite commits per second into a WAL that grows, and into one written ahead.

Each commit inserts a 9.5 KB blob and an indexed UID (about what a small instance
commits through the intake) with ``synchronous=FULL``, on a fresh index in a folder
of ``--dir`` (the data folder's file system is what is measured).  ``ahead``: the WAL
written ahead to 64 MiB first, as the node's mover does
(:meth:`pacs.core.index.connection.Index.write_wal_ahead`).  The two take turns.

Usage::

    .venv/bin/python bench/wal_commits.py --dir /var/tmp --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from pacs.core.index.connection import WAL_SIZE_LIMIT, Index


def commits_per_second(folder: Path, ahead: bool, commits: int) -> float:
    """Synced commits per second on a fresh index in ``folder``."""
    index = Index(folder / "index.sqlite")
    try:
        with index.write() as conn:
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, uid TEXT, data BLOB)")
            conn.execute("CREATE INDEX t_uid ON t (uid)")
        if ahead:
            index.write_wal_ahead(WAL_SIZE_LIMIT)
        data = os.urandom(9_500)
        started = time.perf_counter()
        for number in range(commits):
            with index.write() as conn:
                conn.execute("INSERT INTO t (uid, data) VALUES (?, ?)",
                             (f"1.2.826.0.1.3680043.8.498.{number}", data))
        return commits / (time.perf_counter() - started)
    finally:
        index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the indexes are made (its file system is measured)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commits", type=int, default=1500)
    args = parser.parse_args()
    for round_number in range(1, args.rounds + 1):
        for ahead in (False, True):
            folder = Path(tempfile.mkdtemp(prefix="wal-commits-", dir=args.dir))
            try:
                rate = commits_per_second(folder, ahead, args.commits)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"round {round_number}  {'ahead  ' if ahead else 'growing'}  "
                  f"{rate:7.0f} commits/s", flush=True)


if __name__ == "__main__":
    main()
