"""Fixtures for tests against real peers: ``pacs serve`` as a subprocess, dcmtk tools.

The node runs exactly as an operator would start it: ``python -m pacs serve`` in its own
process group (parent and DIMSE worker processes), configured only by environment
variables, with a temporary folder as working directory so that no ``.env`` is read.

Helpers read back what the node wrote: the index (apsw, read-only) and the object store
(``<data_dir>/objects/<study>/<series>/<sop>.dcm``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import apsw
import pydicom
import pytest
import requests
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from pacs.core.intake import FILES_FOLDER, file_name
from tests.conftest import free_port, sample, start_listening

#: Called AE title of the node (the default).
AE_TITLE = "INTELPIXEL"

#: dcmtk tools honour TCP_NODELAY from the environment (bench/README.md, "Caveats").
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: Seconds a node may take to start listening, and to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

_TMP_PREFIX = ".tmp-"
#: The ports a :class:`Node` picks itself, and how often it starts on newly picked ones
#: when another socket took one first.
_PICKED_PORTS = ("PACS_DIMSE_PORT", "PACS_WEB_PORT", "PACS_VIEWER_PORT")
_PORT_ATTEMPTS = 3


# --- dcmtk -----------------------------------------------------------------------------

@cache
def dcmtk(tool: str) -> str:
    """The path of a dcmtk tool.

    Other packages ship commands with the same names (pynetdicom installs its own
    ``storescu`` and ``echoscu``, often earlier on PATH), so each candidate is asked for
    its version and only dcmtk's is used.
    """
    candidates = []
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin",
                   "/usr/local/bin"]:
        path = os.path.join(folder, tool)
        if os.path.isfile(path) and os.access(path, os.X_OK) and path not in candidates:
            candidates.append(path)

    def is_binary(path: str) -> bool:  # dcmtk's are; wrapper scripts are slow to ask
        with open(path, "rb") as head:
            return head.read(4) == b"\x7fELF"

    for path in sorted(candidates, key=lambda p: not is_binary(p)):
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=10, env=DCMTK_ENV, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    pytest.fail(f"dcmtk's {tool} is not installed (found: {candidates or 'nothing'}); "
                f"apt-get install dcmtk")


def run_dcmtk(tool: str, *args: str, cwd: Path | None = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool with TCP_NODELAY=1; stdout and stderr captured together."""
    return subprocess.run([dcmtk(tool), *args], cwd=cwd, env=DCMTK_ENV, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)


def start_storescp(ae_title: str, folder: Path, *options: str, log: Path | None = None
                   ) -> tuple[int, subprocess.Popen[bytes]]:
    """Start dcmtk's storescp as ``ae_title``, writing into ``folder``, on a free loopback
    port and wait until it accepts: (the port, the process). It is started again on
    another when its port was taken before it bound it (:func:`start_listening`).

    Parameters
    ----------
    ae_title
        Its AE title.
    folder
        The folder it writes what it receives into.
    *options
        More of its options.
    log
        The file its output goes to (none: discarded).
    """
    def start(port: int) -> subprocess.Popen[bytes]:
        with open(log or os.devnull, "wb") as out:  # the child keeps its own
            return subprocess.Popen(
                [dcmtk("storescp"), "-aet", ae_title, *options, "-od", str(folder),
                 str(port)],
                env=DCMTK_ENV, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    return start_listening(start)


# --- the index and the store, read back ------------------------------------------------

@dataclass(frozen=True)
class IndexedInstance:
    """One instance row of the index with the UIDs of its study and series."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    object_key: str
    size: int
    checksum: str
    transfer_syntax: str
    calling_ae: str


def read_index(data_dir: Path) -> dict[str, IndexedInstance]:
    """Every indexed instance by SOP Instance UID (read-only; {} when no index yet)."""
    path = data_dir / "index.sqlite"
    if not path.exists():
        return {}
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        rows = conn.execute(
            "SELECT i.sop_uid, i.sop_class_uid, st.study_uid, se.series_uid, i.object_key, "
            "i.size, i.checksum, i.transfer_syntax, i.calling_ae FROM instance i "
            "JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = se.study_pk"
        ).fetchall()
    finally:
        conn.close()
    return {row[0]: IndexedInstance(*row) for row in rows}


def read_intake(data_dir: Path) -> dict[str, str]:
    """The intake's objects (acknowledged, not yet in the store): key -> SHA-256 of the
    bytes it holds, in the index or in its file (``missing`` when that file is not
    there; {} when no index yet)."""
    path = data_dir / "index.sqlite"
    if not path.exists():
        return {}
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        rows = conn.execute("SELECT object_key, checksum, data FROM intake").fetchall()
    finally:
        conn.close()
    return {key: hashlib.sha256(data).hexdigest() if data else
            _intake_file_sha(data_dir, key, checksum) for key, checksum, data in rows}


def _intake_file_sha(data_dir: Path, key: str, checksum: str) -> str:
    """The SHA-256 of the intake file of ``key`` (pacs.core.intake.file_name)."""
    file = data_dir / FILES_FOLDER / file_name(key, checksum)
    return sha256(file) if file.exists() else "missing"


def intake_files(data_dir: Path) -> list[str]:
    """The files of the intake's folder (temporary files excluded)."""
    folder = data_dir / FILES_FOLDER
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(_TMP_PREFIX)) if folder.is_dir() else []


def wait_drained(data_dir: Path, timeout: float = 90.0) -> None:
    """Wait until the intake's mover has moved every object to the store."""
    deadline = time.monotonic() + timeout
    while read_intake(data_dir):
        assert time.monotonic() < deadline, (
            f"the intake still holds {len(read_intake(data_dir))} objects")
        time.sleep(0.1)


def index_counts(data_dir: Path) -> dict[str, int]:
    """Rows per table of the index."""
    conn = apsw.Connection(str(data_dir / "index.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("patient", "study", "series", "instance")}
    finally:
        conn.close()


def stored_objects(data_dir: Path) -> dict[str, Path]:
    """Every object file of the folder store by key (temporary files excluded)."""
    root = data_dir / "objects"
    found: dict[str, Path] = {}
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file() and not path.name.startswith(_TMP_PREFIX):
                found[path.relative_to(root).as_posix()] = path
    return found


def temporaries(data_dir: Path) -> list[Path]:
    """Temporary files of interrupted or failed writes anywhere in the data folder."""
    return sorted(p for p in data_dir.rglob(f"{_TMP_PREFIX}*"))


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def key_of(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The object key of an instance (docs/architecture.md, "Data layout")."""
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


@dataclass(frozen=True)
class Snapshot:
    """What the node has written: index rows and object files with their checksums."""

    index: dict[str, IndexedInstance]
    objects: dict[str, str]
    temporaries: list[Path]


def snapshot(data_dir: Path) -> Snapshot:
    """The index and store as they are now."""
    return Snapshot(index=read_index(data_dir),
                    objects={k: sha256(p) for k, p in stored_objects(data_dir).items()},
                    temporaries=temporaries(data_dir))


def assert_consistent(data_dir: Path, exact: bool = False) -> dict[str, IndexedInstance]:
    """The index lists nothing that neither the intake nor the store holds; with
    ``exact`` the intake is empty and the store holds nothing the index lacks.

    Each indexed object is in the intake with the indexed checksum, or exists at the
    key derived from its UIDs, with the indexed size and checksum.
    """
    index = read_index(data_dir)
    objects = stored_objects(data_dir)
    intake = read_intake(data_dir)
    if exact:
        assert not intake, f"{len(intake)} objects still in the intake"
    for sop_uid, row in index.items():
        assert row.object_key == key_of(row.study_uid, row.series_uid, sop_uid)
        if row.object_key in intake:
            assert intake[row.object_key] == row.checksum, f"intake differs: {row.object_key}"
            continue
        assert row.object_key in objects, f"indexed but not stored: {row.object_key}"
        path = objects[row.object_key]
        assert path.stat().st_size == row.size, f"size differs for {row.object_key}"
        assert sha256(path) == row.checksum, f"checksum differs for {row.object_key}"
    if exact:
        unlisted = set(objects) - {row.object_key for row in index.values()}
        assert not unlisted, f"stored but not indexed: {sorted(unlisted)}"
        assert not temporaries(data_dir), f"temporary files left: {temporaries(data_dir)}"
        assert not intake_files(data_dir), f"intake files left: {intake_files(data_dir)}"
    return index


# --- dcmsend's log ---------------------------------------------------------------------------

# dcmsend -d dumps each incoming C-STORE RSP; its Affected SOP Instance UID and status
# say which instance the sender saw acknowledged.
_RSP = re.compile(
    r"Message Type\s*: C-STORE RSP.*?Affected SOP Instance UID\s*: (?P<uid>[0-9.]+)"
    r".*?DIMSE Status\s*: 0x(?P<status>[0-9A-Fa-f]{4})", re.DOTALL)


def acknowledged(log: str) -> set[str]:
    """SOP Instance UIDs whose C-STORE a ``dcmsend -d`` log shows as successful."""
    found = set()
    for block in log.split("INCOMING DIMSE MESSAGE")[1:]:
        match = _RSP.search(block.split("END DIMSE MESSAGE")[0])
        if match and int(match.group("status"), 16) == 0:
            found.add(match.group("uid"))
    return found


class SenderLog:
    """Collects a running dcmsend's output; ``wait_for(n)`` returns after n successes."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._successes = 0
        self._target = 0
        self._reached = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "DIMSE Status" in line and "0x0000" in line:
                self._successes += 1
                if self._successes >= self._target:
                    self._reached.set()
        self._reached.set()  # the sender ended

    def wait_for(self, successes: int, timeout: float = 120.0) -> None:
        self._target = successes
        if self._successes >= successes:
            return
        assert self._reached.wait(timeout), "dcmsend made no progress"

    def finish(self, timeout: float = 60.0) -> str:
        self.process.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return "".join(self.lines)


def start_dcmsend(port: int, folder: Path, calling: str = "DCMSEND") -> SenderLog:
    """``dcmsend -d`` of a folder, running in the background."""
    process = subprocess.Popen(
        [dcmtk("dcmsend"), "-d", "-aec", AE_TITLE, "-aet", calling, "+sd", "127.0.0.1",
         str(port), str(folder)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1)
    return SenderLog(process)


# --- test data --------------------------------------------------------------------------

def _uid64(rng: random.Random) -> str:
    """A random valid UID of exactly 64 characters (under pydicom's root)."""
    return "1.2.826.0.1.3680043.8.498." + str(rng.randrange(10**37, 10**38))


def make_instances(folder: Path, count: int, *, per_series: int = 50,
                   patient_id: str = "INTEROP", rows: int = 0,
                   name: str = "{:05d}.dcm") -> list[tuple[Path, str]]:
    """Write ``count`` distinct CT instances (CT_small with new UIDs) into ``folder``.

    Returns (path, SOP Instance UID) pairs.  A new series every ``per_series`` files.
    Fast: pydicom encodes one template with 64-character placeholder UIDs, whose bytes
    are then replaced by other 64-character UIDs (no length changes anywhere).
    ``rows``: images of ``rows`` x ``rows`` pixels instead of CT_small's 128 x 128 (512:
    a CT slice of 512 KB); ``name``: the file names (formatted with the number).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    sop_slot, series_slot = "1.2." + "9" * 60, "1.3." + "9" * 60
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.PatientID = patient_id
    if rows:
        ds.Rows = ds.Columns = rows
        ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    ds.StudyInstanceUID = _uid64(rng)
    ds.SeriesInstanceUID = series_slot
    ds.SOPInstanceUID = sop_slot
    ds.file_meta.MediaStorageSOPInstanceUID = sop_slot
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    template = buffer.getvalue()
    assert template.count(sop_slot.encode()) == 2 and template.count(series_slot.encode()) == 1
    made = []
    series = ""
    for i in range(count):
        if i % per_series == 0:
            series = _uid64(rng)
        sop = _uid64(rng)
        path = folder / name.format(i)
        path.write_bytes(template.replace(sop_slot.encode(), sop.encode())
                         .replace(series_slot.encode(), series.encode()))
        made.append((path, sop))
    return made


def fresh_ct(**changes: object) -> FileDataset:
    """CT_small with new study, series and instance UIDs (and optional changes)."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


# --- the node ---------------------------------------------------------------------------

def listening(port: int) -> bool:
    """True when a socket listens on ``port`` (from /proc/net, without connecting)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Resources:
    """What a set of processes holds: resident memory and open file descriptors."""

    rss_bytes: int
    fds: int

    def __str__(self) -> str:
        return f"{self.rss_bytes / 2**20:.0f} MiB, {self.fds} fds"


def resources_of(pids: list[int]) -> Resources:
    """Sum RSS (``/proc/<pid>/statm``) and ``/proc/<pid>/fd`` entries over ``pids``."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss = fds = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as statm:
                rss += int(statm.read().split()[1]) * page
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # gone meanwhile
    return Resources(rss, fds)


def _live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every live
    (non-zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X"):
            yield int(entry), fields


def _with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every live descendant of them."""
    children: dict[int, list[int]] = {}
    for pid, fields in _live_processes():
        children.setdefault(int(fields[1]), []).append(pid)
    found = set(pids)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def _describe(pids: list[int]) -> str:
    """One line per process: pid, state, threads, where the kernel has it waiting, and
    its command line (what a stop that hangs is waiting for)."""
    lines = []
    for pid in pids:
        try:
            status = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        lines.append(f"{pid} {status.get('State', '?')} threads={status.get('Threads', '?')} "
                     f"wchan={wchan or '-'} {command[:160]}")
    return "\n".join(lines)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


class Node:
    """``pacs serve`` as a subprocess in its own process group.

    Attributes
    ----------
    port : int
        The DIMSE port.
    root : Path
        Working directory (no ``.env`` there).
    data_dir : Path
        ``PACS_DATA_DIR``.
    log_path : Path
        stdout and stderr of every run, appended.
    env : dict
        The environment of the node and of ``pacs`` CLI calls.
    """

    def __init__(self, root: Path, port: int | None = None, **settings: str) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # The ports picked here (free a moment ago) are picked again when another
        # socket took one before the node bound it (see start).
        self._picked = {name for name in _PICKED_PORTS if name not in settings}
        if port:
            self._picked.discard("PACS_DIMSE_PORT")
        self.data_dir = root / "data"
        self.log_path = root / "serve.log"
        # PACS_DIMSE_SEAM passes: the DIMSE tests run with the seam on and off.
        env = {k: v for k, v in os.environ.items()
               if (not k.startswith("PACS_") and k != "CUSTOMER") or k == "PACS_DIMSE_SEAM"}
        env.update({
            "PACS_DATA_DIR": str(self.data_dir),
            "PACS_DIMSE_PORT": str(self.port),
            "PACS_WEB_PORT": str(free_port()),
            "PACS_VIEWER_PORT": str(free_port()),
            "PACS_BIND_ADDRESS": "127.0.0.1",
            "PACS_DIMSE_WORKERS": "2",
            "PACS_LOG_LEVEL": "INFO",
            "TCP_NODELAY": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(settings)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def listen_port(self) -> int:
        """The DIMSE port it listens on: the plain one, or the TLS one when the plain
        one is off (``PACS_DIMSE_PORT=0``)."""
        if self.env["PACS_DIMSE_PORT"] != "0":
            return self.port
        return int(self.env["PACS_DIMSE_TLS_PORT"])

    # -- lifecycle --

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Node:
        """Start ``pacs serve`` and wait until its workers accept associations.

        A port picked by :func:`free_port` is free only when picked: another socket
        (a client's ephemeral port on loopback, the S3 test server's own connections)
        may take it before the node binds it.  The node then refuses to start
        ("Address already in use"), and is started again on newly picked ports.
        """
        assert not self.running, "already running"
        for _ in range(_PORT_ATTEMPTS):
            self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "pacs", "serve"], cwd=self.root, env=self.env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            if self._wait_ready():
                return self
            self._kill_group()  # whatever it started before it found the port taken
            for name in self._picked:
                self.env[name] = str(free_port())
            self.port = int(self.env["PACS_DIMSE_PORT"])
        pytest.fail(f"pacs serve found a port taken {_PORT_ATTEMPTS} times:\n{self.log()}")

    def _wait_ready(self) -> bool:
        """Wait for the "listening" log line (all workers ready) and the listening socket;
        False when the node stopped because a port it was to listen on was taken.

        The port is checked in /proc/net/tcp rather than by connecting: pynetdicom keeps
        an association whose peer connected and left without a word until the ACSE
        timeout, which would then hold up every clean stop.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                if self._picked and "Address already in use" in self.log(since_start=True):
                    return False
                pytest.fail(f"pacs serve exited with {self.proc.returncode} while "
                            f"starting:\n{self.log()}")
            if " listening on " in self.log(since_start=True) and listening(self.listen_port):
                return True
            time.sleep(0.05)
        self._kill_group()
        pytest.fail(f"pacs serve did not listen on port {self.port} within "
                    f"{START_TIMEOUT} s:\n{self.log()}")

    def log(self, since_start: bool = False) -> str:
        """The server log (all runs, or the current run only)."""
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self._log_offset if since_start else 0:].decode("utf-8", "replace")

    def _wait_group_gone(self, pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _group_members(pgid):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of group {pgid} still alive: "
                                     f"{_group_members(pgid)}\n{self.log()}")
            time.sleep(0.02)

    def _kill_group(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._wait_group_gone(pgid, STOP_TIMEOUT)

    def kill9(self) -> None:
        """SIGKILL the whole process group (parent and workers) at once."""
        assert self.proc is not None
        self._kill_group()

    def terminate(self, sig: int = signal.SIGTERM, group: bool = False,
                  timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM (or ``sig``) and require a clean exit (0) within ~15 s.

        ``group`` sends it to the whole process group, as a terminal does for Ctrl-C.
        """
        assert self.proc is not None and self.running, "not running"
        pgid = self.proc.pid
        if group:
            os.killpg(pgid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            lingering = _describe(_with_descendants(_group_members(pgid)))
            self._kill_group()
            pytest.fail(f"pacs serve did not stop within {timeout} s of signal "
                        f"{sig}; still running:\n{lingering}\n--- log ---\n{self.log()}")
        assert code == 0, f"pacs serve exited with {code} after signal {sig}:\n{self.log()}"
        self._wait_group_gone(pgid, STOP_TIMEOUT)
        return code

    def restart(self) -> Node:
        """Stop cleanly when running, then start again on the same port and data."""
        if self.running:
            self.terminate()
        return self.start()

    def stop(self, signalled: bool = False) -> None:
        """Cleanup: SIGTERM (unless ``signalled`` already), then SIGKILL the group if
        it lingers."""
        if self.proc is None:
            return
        if self.running:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)
        if _group_members(self.proc.pid):
            self._kill_group()

    # -- talking to it --

    def cli(self, *args: str, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``python -m pacs ARGS`` with the node's environment and working folder."""
        return subprocess.run([sys.executable, "-m", "pacs", *args], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)

    def echo(self) -> subprocess.CompletedProcess[str]:
        """C-ECHO with dcmtk's echoscu."""
        return run_dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(self.port),
                         timeout=30)

    def assert_serving(self) -> None:
        """The node answers a C-ECHO and its processes are alive."""
        assert self.running, f"pacs serve is not running:\n{self.log()}"
        result = self.echo()
        assert result.returncode == 0, (
            f"echoscu failed:\n{result.stdout}\n--- server log ---\n{self.log()}")

    # -- what it holds --

    def pids(self) -> list[int]:
        """Every live process of the node: its process group (parent, DIMSE workers,
        gunicorn, upload watcher) and their descendants (the analyser helpers run in
        sessions of their own)."""
        assert self.proc is not None
        return _with_descendants(_group_members(self.proc.pid))

    def resources(self) -> Resources:
        """Memory (sum of RSS) and open descriptors summed over every node process."""
        return resources_of(self.pids())

    def web_url(self) -> str:
        """The DICOMweb base URL."""
        return f"http://127.0.0.1:{self.env['PACS_WEB_PORT']}"

    # -- what it wrote --

    def index(self) -> dict[str, IndexedInstance]:
        return read_index(self.data_dir)

    def objects(self) -> dict[str, Path]:
        self._settle()
        return stored_objects(self.data_dir)

    def object_path(self, row: IndexedInstance) -> Path:
        self._settle()
        return self.data_dir / "objects" / row.object_key

    def _settle(self) -> None:
        """What the node acknowledged reaches the store once its mover has moved it:
        wait for that before reading the store, while the node runs with its mover."""
        if self.running and self.env.get("PACS_INTAKE_MOVER", "on") != "off":
            self.wait_drained()

    def wait_drained(self, timeout: float = 90.0) -> None:
        """Wait until the intake's mover has stored everything acknowledged."""
        wait_drained(self.data_dir, timeout)

    def snapshot(self) -> Snapshot:
        self._settle()
        return snapshot(self.data_dir)


def getscu_counts(output: str) -> tuple[int, ...]:
    """(Remaining, Completed, Failed, Warning) of getscu's final status report."""
    values = {}
    for line in output.splitlines():
        for name in ("Remaining", "Completed", "Failed", "Warning"):
            if f"Number of {name} Suboperations" in line:
                values[name] = int(line.rsplit(":", 1)[1])
    return tuple(values.get(name, -1) for name in ("Remaining", "Completed", "Failed",
                                                    "Warning"))


#: Seconds an answer may take while the node is under attack or starting.
PATIENCE = 30.0


def answers_echo(node: Node) -> None:
    """A real C-ECHO (dcmtk) answers; echoscu gives up after 10 s of anything."""
    result = run_dcmtk("echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aec", AE_TITLE,
                       "127.0.0.1", str(node.port), timeout=60)
    assert result.returncode == 0, f"{result.stdout}\n--- server log ---\n{node.log()}"


def answers_qido(node: Node) -> None:
    """A QIDO-RS answers (the web application may still be starting: 503 meanwhile)."""
    deadline = time.monotonic() + PATIENCE
    while (response := requests.get(f"{node.web_url()}/studies", timeout=10)).status_code \
            == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Node]]:
    """Make nodes (started) in fresh folders; all are stopped once the module's tests
    have run (no node of a finished module keeps its processes through the rest)."""
    nodes: list[Node] = []
    for tool in ("dcmsend", "storescu", "echoscu", "storescp"):
        dcmtk(tool)

    def make(name: str = "node", start: bool = True, **settings: str) -> Node:
        node = Node(tmp_path_factory.mktemp(name), **settings)
        nodes.append(node)
        return node.start() if start else node

    yield make
    stop_all(nodes)


def stop_all(nodes: list[Node]) -> None:
    """Stop nodes together: each is told first, so that their shutdowns overlap, then
    each is cleaned up (:meth:`Node.stop`)."""
    told = [node for node in nodes if node.proc is not None and node.running]
    for node in told:
        node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    for node in nodes:
        node.stop(signalled=node in told)


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node]) -> Node:
    """A running node shared by the tests of one module (its own data folder)."""
    return node_factory("node")


@pytest.fixture
def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk tools (TCP_NODELAY=1)."""
    return dict(DCMTK_ENV)

