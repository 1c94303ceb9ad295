"""C-STORE rate and CPU per instance of each part of the node, versions alternated.

Starts ``pacs serve`` on its folder store in a fresh data folder, sends the harness'
2,000 small instances (``bench/data/ingest/small_single_r1``, made by ``gen_data.py``;
``--data ct``: its 400 CT slices, ``ct_single_r1``; ``--data query20k``: the 20,000
small instances of the query set) with dcmtk's ``storescu`` on one association or split
over ``--associations``, and reads each process' CPU time (``/proc/<pid>/stat``) before
and after.  Prints the rate and the CPU milliseconds per instance of the DIMSE workers,
the intake mover and the senders; with ``--drain``, then the seconds until the intake's
mover has emptied it and the mover's CPU meanwhile (per instance sent).  ``--storage s3`` runs
every node on one SeaweedFS ``weed server`` (started here as the harness starts it,
``run_peers.start_weed``), whose CPU is reported too.

Each ``--source`` is a folder whose ``pacs`` package is put first on ``PYTHONPATH`` (a
``git worktree`` of another commit; ``.`` is this checkout), and the versions take turns
for ``--rounds`` rounds, so that the machine's drift weighs on all of them alike.

Usage::

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/ingest_cpu.py --source /tmp/before --source . --rounds 3
    .venv/bin/python bench/ingest_cpu.py --source . --associations 4
    .venv/bin/python bench/ingest_cpu.py --source . --data ct
    .venv/bin/python bench/ingest_cpu.py --source /tmp/before --source . --storage s3
    .venv/bin/python bench/ingest_cpu.py --source . --profile /tmp/samples
    .venv/bin/python bench/ingest_cpu.py --source . --data query20k --associations 4 --drain

``--profile FOLDER`` samples the DIMSE workers with ``py-spy`` (``--nonblocking``, 500
per second, threads apart) while the instances are sent: one file of collapsed stacks
per worker and round (``FOLDER/<round>-<source>/dimse-<pid>.txt``), for a flame graph or
a count by function.  Sampling costs the workers CPU: the rates of such a run are not
comparable with others.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import apsw

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
#: The harness' data sets (``gen_data.py``) by ``--data``.
DATA_SETS = {"small": "ingest/small_single_r1", "ct": "ingest/ct_single_r1",
             "query20k": "query20k"}
DCMTK_BIN = os.environ.get("DCMTK_BIN", "/usr/bin")
TICKS = os.sysconf("SC_CLK_TCK")
S3_PORT = 18433
#: Seconds ``--drain`` waits for the intake to empty.
DRAIN_TIMEOUT = 600


def data_files(folder: Path) -> list[str]:
    """The DICOM files of one of the harness' data sets (``gen_data.py``), sorted."""
    files = sorted(str(p) for p in folder.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    if not files:
        raise SystemExit(f"no data in {folder}: run bench/gen_data.py first")
    return files


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> dict[int, str]:
    """``pid`` and its descendants, with their command lines."""
    children: dict[int, list[int]] = {}
    lines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ") \
                .decode(errors="replace")
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        found[current] = lines.get(current, "")
        todo += children.get(current, [])
    return found


def role(command: str) -> str:
    """Which part of the node a process is."""
    if "pacs.node.mover" in command:
        return "mover"
    if "gunicorn" in command or "adapters" in command:
        return "web"
    if "pacs" in command and "serve" in command:
        return "dimse"
    if command == "weed":
        return "weed"
    return "other"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A SeaweedFS server for the whole run: the settings of a node that stores there."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run_peers  # the harness' own start-up of SeaweedFS

    folder = tempfile.mkdtemp(prefix="ingest-cpu-s3-")
    weed = run_peers.start_weed(folder, S3_PORT)
    try:
        yield {"PACS_STORAGE": "s3", "PACS_S3_ENDPOINT": f"127.0.0.1:{S3_PORT}",
               "PACS_S3_ACCESS_KEY": run_peers.WEED_KEY,
               "PACS_S3_SECRET_KEY": run_peers.WEED_SECRET,
               "PACS_S3_BUCKET": run_peers.WEED_BUCKET, "PACS_S3_SECURE": "false",
               "weed": str(weed.pid)}
    finally:
        weed.kill()
        weed.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def node(source: Path, storage: dict[str, str]) -> Iterator[tuple[int, int, Path]]:
    """``pacs serve`` of ``source`` on a fresh data folder, with the ``PACS_`` settings
    of ``storage`` (its store, the folder when none; ``--setting``): (its pid, its
    DIMSE port, its data folder)."""
    folder = Path(tempfile.mkdtemp(prefix="ingest-cpu-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    # A customer of its own: on S3 each run's objects under a prefix of their own (a
    # node refuses to start without an index over a prefix that holds objects).
    env.update(PYTHONPATH=str(source.resolve()), TCP_NODELAY="1", CUSTOMER=folder.name,
               PACS_DATA_DIR=str(folder / "data"), PACS_STORAGE="file",
               PACS_DIMSE_PORT=str(port), PACS_WEB_PORT=str(free_port()),
               PACS_VIEWER_PORT="0", PACS_UPLOADS_POLL="0", PACS_AE_TITLE="PACS")
    env.update({k: v for k, v in storage.items() if k.startswith("PACS_")})
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "pacs", "serve"], env=env, cwd=folder,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        time.sleep(2)  # every worker and companion up
        yield server.pid, port, folder / "data"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def sampled(processes: dict[int, str], folder: Path | None) -> Iterator[None]:
    """py-spy samples of the DIMSE workers into ``folder`` (collapsed stacks, one file
    per worker), when a folder is given."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
         "--threads", "--rate", "500", "--format", "raw", "--output",
         str(folder / f"dimse-{pid}.txt"), "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid, command in processes.items() if role(command) == "dimse"]
    time.sleep(1)  # every sampler attached
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(2)
            spy.wait(timeout=60)


def drained(data: Path, processes: dict[int, str], count: int) -> dict[str, float]:
    """Wait until the intake of the node on ``data`` is empty: the seconds it took and
    the mover's CPU meanwhile, in ms per instance of the ``count`` sent."""
    movers = [pid for pid, command in processes.items() if role(command) == "mover"]
    before = sum(cpu_seconds(pid) for pid in movers)
    started = time.monotonic()
    [path] = data.rglob("index.sqlite")
    index = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    index.set_busy_timeout(10_000)
    try:
        while index.execute("SELECT objects FROM intake_state").fetchone()[0] > 0:
            if time.monotonic() - started > DRAIN_TIMEOUT:
                raise SystemExit("the intake did not drain")
            time.sleep(0.1)
    finally:
        index.close()
    return {"drain s": time.monotonic() - started,
            "mover drain": (sum(cpu_seconds(pid) for pid in movers) - before)
            * 1000 / count}


def one_run(source: Path, files: list[str], associations: int,
            storage: dict[str, str], profile: Path | None = None,
            drain: bool = False) -> dict[str, float]:
    """Rate and CPU ms per instance of each part for one run of ``source`` (py-spy
    samples of its DIMSE workers into ``profile``, when given; with ``drain``, the
    intake's drain after the sends too, :func:`drained`)."""
    with node(source, storage) as (pid, port, data), \
            sampled(descendants(pid), profile):
        processes = descendants(pid)
        if "weed" in storage:
            processes.update(dict.fromkeys(descendants(int(storage["weed"])), "weed"))
        before = {p: cpu_seconds(p) for p in processes}
        groups = [files[i::associations] for i in range(associations)]
        started = time.monotonic()
        senders = [subprocess.Popen(
            [os.path.join(DCMTK_BIN, "storescu"), "-aet", "BENCH", "-aec", "PACS", "-nh",
             "127.0.0.1", str(port), *group], env={**os.environ, "TCP_NODELAY": "1"})
            for group in groups]
        sending = 0.0
        for sender in senders:
            _, status, usage = os.wait4(sender.pid, 0)  # the sender's own CPU
            sender.returncode = os.waitstatus_to_exitcode(status)
            if sender.returncode != 0:
                raise SystemExit(f"storescu failed ({sender.returncode})")
            sending += usage.ru_utime + usage.ru_stime
        elapsed = time.monotonic() - started
        result = {"inst/s": len(files) / elapsed, "storescu": sending * 1000 / len(files)}
        for process, command in processes.items():
            part = role(command)
            result[part] = result.get(part, 0.0) + \
                (cpu_seconds(process) - before[process]) * 1000 / len(files)
        if drain:
            result.update(drained(data, processes, len(files)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", action="append", type=Path, required=True)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data", choices=sorted(DATA_SETS), default="small",
                        help="the 2,000 small instances, the 400 CT slices, or the "
                        "20,000 small instances of the query set")
    parser.add_argument("--storage", choices=("file", "s3"), default="file")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a pacs setting for every node run")
    parser.add_argument("--profile", type=Path, metavar="FOLDER",
                        help="py-spy samples of the DIMSE workers (collapsed stacks)")
    parser.add_argument("--drain", action="store_true",
                        help="then wait for the intake to drain: seconds, mover CPU")
    args = parser.parse_args()
    files = data_files(DATA / DATA_SETS[args.data])
    print(f"{len(files)} {args.data} instances, {args.associations} association(s); "
          "CPU in ms per instance")
    settings = dict(item.split("=", 1) for item in args.setting)
    with s3_server() if args.storage == "s3" else nullcontext({}) as server:
        storage = {**server, **settings}
        for number in range(args.rounds):
            for source in args.source:
                profile = args.profile / f"{number + 1}-{source.name or 'here'}" \
                    if args.profile else None
                result = one_run(source, files, args.associations, storage, profile,
                                 args.drain)
                parts = "  ".join(f"{part} {result.get(part, 0.0):.2f}"
                                  for part in ("dimse", "mover", "storescu", "weed",
                                               "drain s", "mover drain")
                                  if (part != "weed" or server)
                                  and (args.drain or "drain" not in part))
                print(f"round {number + 1}  {source!s:<24} {result['inst/s']:7.1f} inst/s  "
                      f"{parts}", flush=True)


if __name__ == "__main__":
    main()
