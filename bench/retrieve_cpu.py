"""C-GET rate and the node's CPU per C-GET, versions alternated.

Starts ``pacs serve`` on its folder store in a fresh data folder (as
``bench/ingest_cpu.py`` does), stores one of the harness' retrieve studies into it
with dcmtk's ``storescu`` (``bench/data/retrieve/small_study``, 500 small instances,
or with ``--data ct`` ``retrieve/ct_study``, 100 CT slices; made by ``gen_data.py``),
waits for the intake to drain, retrieves the study once to warm up and then
``--gets`` times with dcmtk's ``getscu``, one after the other, and reads the DIMSE
workers' CPU time (``/proc/<pid>/stat``) before and after.  Prints the median rate of
the C-GETs and the CPU milliseconds per C-GET of the node's DIMSE workers and of
``getscu``.

Each ``--source`` is a folder whose ``pacs`` package is put first on ``PYTHONPATH``
(``.`` is this checkout); the versions take turns for ``--rounds`` rounds.

Usage::

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/retrieve_cpu.py --source /tmp/before --source . --rounds 3
    .venv/bin/python bench/retrieve_cpu.py --source . --data ct --gets 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ingest_cpu import DATA, DCMTK_BIN, cpu_seconds, data_files, descendants, drained, node, role

#: The harness' retrieve studies (``gen_data.py``) by ``--data``.
DATA_SETS = {"small": "retrieve/small_study", "ct": "retrieve/ct_study"}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def get(port: int, study_uid: str, expected: int) -> tuple[float, float]:
    """One C-GET of the study by ``getscu`` (every instance received): the seconds it
    took and ``getscu``'s own CPU seconds."""
    target = tempfile.mkdtemp(prefix="retrieve-cpu-")
    try:
        started = time.monotonic()
        client = subprocess.Popen(
            [os.path.join(DCMTK_BIN, "getscu"), "-S", "-aet", "BENCH", "-aec", "PACS",
             "-od", target, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(client.pid, 0)
        client.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - started
        received = len(os.listdir(target))
        if client.returncode != 0 or received != expected:
            raise SystemExit(f"getscu failed ({client.returncode}), received {received} "
                             f"of {expected} instances")
        return elapsed, usage.ru_utime + usage.ru_stime
    finally:
        shutil.rmtree(target, ignore_errors=True)


def one_run(source: Path, files: list[str], study_uid: str, gets: int) -> dict[str, float]:
    """Median instances per second of ``gets`` C-GETs, and the CPU ms per C-GET of the
    DIMSE workers and of ``getscu``, for one run of ``source``."""
    with node(source, {}) as (pid, port, data):
        subprocess.run([os.path.join(DCMTK_BIN, "storescu"), "-aet", "BENCH", "-aec",
                        "PACS", "-nh", "127.0.0.1", str(port), *files], env=DCMTK_ENV,
                       check=True)
        processes = descendants(pid)
        drained(data, processes, len(files))
        get(port, study_uid, len(files))  # warm: the page cache, the workers
        workers = [p for p, command in processes.items() if role(command) == "dimse"]
        before = sum(cpu_seconds(p) for p in workers)
        runs = [get(port, study_uid, len(files)) for _ in range(gets)]
        cpu = sum(cpu_seconds(p) for p in workers) - before
    return {"inst/s": len(files) / statistics.median(seconds for seconds, _ in runs),
            "dimse": cpu * 1000 / gets,
            "getscu": sum(client for _, client in runs) * 1000 / gets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--gets", type=int, default=20)
    parser.add_argument("--data", choices=sorted(DATA_SETS), default="small",
                        help="the 500-instance small study or the 100-slice CT study")
    args = parser.parse_args()
    data = DATA / DATA_SETS[args.data]
    files = data_files(data)
    study_uid = json.loads((data / "manifest.json").read_text())["studies"][0][
        "StudyInstanceUID"]
    print(f"C-GET of the {args.data} study ({len(files)} instances), {args.gets} per run")
    for number in range(args.rounds):
        for source in args.source:
            result = one_run(source, files, study_uid, args.gets)
            print(f"round {number + 1}  {source!s:<24} {result['inst/s']:7.1f} inst/s  "
                  f"CPU ms per C-GET: dimse {result['dimse']:.1f}  getscu "
                  f"{result['getscu']:.1f}", flush=True)


if __name__ == "__main__":
    main()
