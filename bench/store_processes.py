"""CPU per instance of ``Ingest.store_bytes`` alone, and in processes storing at once.

No network, no DIMSE: the harness' small instances (``bench/data/ingest/
small_single_r1``, made by ``gen_data.py``) stored through the intake, as a C-STORE
stores them, by ``--processes`` processes started together, each with its share of the
instances, on one index (``--index shared``, as the DIMSE workers of a node) or each on
an index of its own (``own``: the same work with nothing shared).  Each process prints
its wall time and its user and system CPU per instance; the line ``all`` their sum of
instances per second.  The variants take turns for ``--rounds`` rounds.

What it tells apart: one process alone is the work's own cost; two on their own
indexes add what two busy cores cost each other on this machine; two on one index add
what sharing the index costs (SQLite's write lock, and the pages each transaction
reads again after the other process' commit).

Usage::

    .venv/bin/python bench/store_processes.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "ingest" / "small_single_r1"
#: Seconds between starting the processes and their common start.
START_DELAY = 3.0


def store_share(folder: Path, part: int, parts: int, start_at: float) -> dict[str, float]:
    """Store every ``parts``-th instance from the ``part``-th into the node of ``folder``
    from ``start_at`` (a first one before, to open and migrate the index); wall and CPU
    microseconds per instance."""
    from pacs.core import config
    from pacs.core.services import build

    files = sorted(p for p in DATA.rglob("*") if p.is_file() and p.name != "manifest.json")
    objects = [p.read_bytes() for p in files][part::parts]
    services = build(config.load(overrides={"PACS_DATA_DIR": str(folder)}, environ={},
                                 env_file=None))
    try:
        services.ingest.store_bytes(objects[0])
        time.sleep(max(0.0, start_at - time.time()))
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for data in objects[1:]:
            services.ingest.store_bytes(data)
        after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        services.close()
    count = len(objects) - 1
    return {"count": count, "wall": (ended - started) / count * 1e6,
            "user": (after.ru_utime - before.ru_utime) / count * 1e6,
            "system": (after.ru_stime - before.ru_stime) / count * 1e6}


def one_round(processes: int, shared: bool) -> list[dict[str, float]]:
    """Each process' figures for one round of ``processes`` on a shared or own index."""
    with tempfile.TemporaryDirectory(prefix="pacs-store-") as top:
        start_at = time.time() + START_DELAY
        running = [subprocess.Popen(
            [sys.executable, __file__, "--worker", str(Path(top) / (
                "node" if shared else f"node{part}")), str(part), str(processes),
             str(start_at)], stdout=subprocess.PIPE, text=True)
            for part in range(processes)]
        return [json.loads(process.communicate()[0]) for process in running]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, part, parts, start_at = args.worker
        print(json.dumps(store_share(Path(folder), int(part), int(parts), float(start_at))))
        return
    if not DATA.is_dir():
        raise SystemExit(f"no data in {DATA}: run bench/gen_data.py first")
    variants = [("alone", 1, True), ("own index", args.processes, False),
                ("shared index", args.processes, True)]
    for number in range(1, args.rounds + 1):
        for name, processes, shared in variants:
            figures = one_round(processes, shared)
            rate = sum(1e6 / f["wall"] for f in figures)
            cpu = " ".join(f"{f['user']:.0f}+{f['system']:.0f}" for f in figures)
            print(f"round {number}  {name:<12}  {processes} process(es)  "
                  f"{rate:6.0f} inst/s  user+system µs per instance: {cpu}", flush=True)


if __name__ == "__main__":
    main()
