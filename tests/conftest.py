"""Shared fixtures: settings in a temporary folder, services over an in-memory store,
pydicom's bundled test files (never downloaded), free loopback ports."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from pacs.core import config
from pacs.core.services import Services, build
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import seam

#: Whether the DIMSE tests run with the seam (PACS_DIMSE_SEAM, on by default): ``pytest -m
#: dimse`` runs them once each way (PACS_DIMSE_SEAM=off: pynetdicom's public API only).
SEAM = config.load(environ={"PACS_DIMSE_SEAM": os.environ.get("PACS_DIMSE_SEAM", "on")},
                   env_file=None).dimse_seam


@pytest.fixture(autouse=True, scope="session")
def race_free_requestors() -> None:
    """With the seam on, the tests' own pynetdicom requestors run the seam's reactor
    from the first test on, as in-process nodes install it anyway: pynetdicom 3.0's
    requestor reactor can take the response a ``send_c_*`` call waits for ("Received
    unexpected C-STORE service message", then a DIMSE timeout), a race the seam's
    reactor closes (``pacs/dimse/seam/reactor.py``).  Nodes in subprocesses have their
    own; with the seam off nothing of pynetdicom is replaced."""
    if SEAM:
        seam.install(True)


@pytest.fixture(autouse=True)
def logging_left_as_found() -> Iterator[None]:
    """A test that sets the node's logging up in this process (the CLI's commands:
    ``pacs.core.logs.install``) leaves the filters of the root logger's handlers as it
    found them: :class:`pacs.core.logs.Redact` left on one of pytest's own handlers
    would rewrite every later test's records (a traceback made one line) before
    ``caplog`` sees them."""
    handlers = {handler: list(handler.filters) for handler in logging.getLogger().handlers}
    yield
    for handler, filters in handlers.items():
        handler.filters[:] = filters


def rejection_of(assoc: Association) -> tuple[int, int, int] | None:
    """(Result, Source, Reason/Diag.) of the A-ASSOCIATE-RJ an association request got
    (PS3.8 9.3.4); ``None`` when it got none.

    pynetdicom's requestor reports a few fast rejections as an abort, more of them on a
    loaded machine: its DUL thread read the A-ASSOCIATE-RJ and closed the connection
    before the requesting thread looked whether it connected, and the acceptor's
    primitive stays unset.  The rejection is then still in the DUL's queue, unread, and
    is read there.
    """
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        found = [assoc.acceptor.primitive]
    else:
        found = [p for p in list(assoc.dul.to_user_queue.queue) if isinstance(p, A_ASSOCIATE)]
    return next(((int(p.result), int(p.result_source), int(p.diagnostic)) for p in found
                 if p.result is not None), None)


def seam_only(reason: str) -> pytest.MarkDecorator:
    """Exclude a test of a property only the seam provides from the run without it
    (PACS_DIMSE_SEAM=off), saying why; with the seam it runs as any other."""
    return pytest.mark.skipif(not SEAM, reason=f"seam only (PACS_DIMSE_SEAM=off): {reason}")


#: Marks that fail a test when a thread ends with an error (pynetdicom's state machine
#: refusing an event) or an object fails as it is collected: with the seam, none may,
#: and every test gets them (:func:`pytest_collection_modifyitems`).  Without it,
#: pynetdicom's own reactors race (two aborts of one association end its DUL thread
#: with InvalidEventError), so nothing is added.
THREADS_END_CLEANLY = [
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
] if SEAM else []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test fails on a thread that ended with an error (:data:`THREADS_END_CLEANLY`)."""
    for item in items:
        for mark in THREADS_END_CLEANLY:
            item.add_marker(mark)


def folder_store(root: Path) -> FileStore:
    """A folder store at ``root``, checked as a node checks it at start, which makes
    the folder (a write never does: a missing one is a volume not mounted)."""
    store = FileStore(root)
    store.check()
    return store


def nest_past_path_max(root: Path, file_name: str = "") -> None:
    """Folders nested in ``root`` past PATH_MAX (20 names of 250 characters), made
    relative to each other (no path that long is ever named); ``file_name``: an empty
    file in the deepest."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        if file_name:
            os.close(os.open(file_name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening_sockets(port: int) -> set[int]:
    """The inodes of the sockets in LISTEN state on ``port`` (any local address, IPv4 or
    IPv6), from Linux's /proc/net tables."""
    inodes: set[int] = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.name == "tcp6" and not table.exists():  # a kernel without IPv6
            continue
        for line in table.read_text().splitlines()[1:]:  # after the header
            fields = line.split()
            # local_address is HEXADDR:HEXPORT; state 0A is LISTEN; field 9 the inode.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _open_sockets(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open (none once it is gone)."""
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # exited meanwhile, or not ours to read
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _descendants(pid: int) -> list[int]:
    """The processes descended from ``pid``: its children, theirs, and so on.

    Read from every /proc/<pid>/stat: /proc/<pid>/task/<tid>/children is not in every
    kernel (CONFIG_PROC_CHILDREN).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name (field 2) is in parentheses and may hold spaces and ")": the
        # parent's pid is the second field after the last ")".
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


def _listens(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` or one of its descendants holds a socket listening on ``port``."""
    listening = _listening_sockets(port)
    if not listening:
        return False
    if _open_sockets(process.pid) & listening:
        return True
    # The listener of a multi-process server may be a child (or a grandchild) of the
    # process started; the tree is only walked when something listens on the port.
    return any(_open_sockets(pid) & listening for pid in _descendants(process.pid))


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1",
                  process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``port`` is served; fail loudly on timeout.

    Parameters
    ----------
    port
        The TCP port.
    timeout
        Seconds to wait at most.
    host
        The address a connection is tried to when no ``process`` is given.
    process
        The server meant to listen on ``port``. With it, the port is served once this
        process or one of its descendants (the listener of a multi-process server may be a
        child) holds a socket in LISTEN state on it, at any local address (Linux's /proc);
        a socket of another process on that port does not count, although a connection
        to it would succeed. The wait fails as soon as the process has exited. Without it,
        the port is served as soon as a connection to ``host`` succeeds, whoever accepts
        it.

    Raises
    ------
    ChildProcessError
        ``process`` exited before it listened on ``port``.
    TimeoutError
        ``port`` was not served within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                raise ChildProcessError(f"the server for {host}:{port} exited "
                                        f"({process.returncode}) before it listened")
            if _listens(process, port):
                return
            time.sleep(0.05)
            continue
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    if process is not None:
        # Said apart: a port another process listens on is a taken port, not a slow server.
        other = " (another process listens on it)" if _listening_sockets(port) else ""
        raise TimeoutError(f"the server for {host}:{port} does not listen on it after "
                           f"{timeout} s{other}")
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def start_listening(start: Callable[[int], subprocess.Popen[bytes]], attempts: int = 5,
                    timeout: float = 30.0) -> tuple[int, subprocess.Popen[bytes]]:
    """Start a server with ``start(port)`` on a free loopback port and wait until it (or
    one of its descendants) listens there: (the port, the process).

    A port found free (:func:`free_port`) can be taken before the server binds it - by
    another server, or as the local port of an outgoing connection - and the server
    then exits ("Address already in use"): it is started again on another port. Whether
    the server listens is read from its own sockets (:func:`wait_for_port` with
    ``process``), not from a connection, which another server listening on the port
    would accept in its place.
    """
    for _ in range(attempts):
        port = free_port()
        process = start(port)
        try:
            wait_for_port(port, timeout, process=process)
        except ChildProcessError:
            continue
        except BaseException:
            process.kill()
            process.wait()
            raise
        return port, process
    raise RuntimeError(f"no free port could be bound in {attempts} attempts")


def sample(name: str) -> Path:
    """A pydicom test file by name, resolved offline."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(name)
    return Path(str(path))


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    """Settings of a node whose data lives in ``tmp_path``."""
    return config.load(
        overrides={"PACS_DATA_DIR": str(tmp_path / "data"), "PACS_DIMSE_PORT": "0",
                   "PACS_BIND_ADDRESS": "127.0.0.1",
                   # In-process analysis: helper processes are tested on their own
                   # (tests/unit/test_analysers.py) and under gunicorn (interop).
                   "PACS_WEB_ANALYSERS": "0",
                   # falcon's test client sends "Host: falconframework.org": that name is this
                   # node's (tests/service/test_access_hosts.py checks the rule itself).
                   "PACS_WEB_HOSTS": "falconframework.org",
                   # The DIMSE tests run with the seam on and off (pytest -m dimse).
                   "PACS_DIMSE_SEAM": "on" if SEAM else "off"},
        environ={}, env_file=None)


@pytest.fixture
def memory_store() -> MemoryStore:
    """An empty in-memory object store."""
    return MemoryStore()


@pytest.fixture
def services(settings: config.Settings, memory_store: MemoryStore) -> Iterator[Services]:
    """Services over an in-memory store and a temporary index."""
    built = build(settings, store=memory_store)
    yield built
    built.close()


@pytest.fixture
def make_services(settings: config.Settings) -> Iterator[Callable[..., Services]]:
    """Build services with changed settings (closed at the end)."""
    made: list[Services] = []

    def make(store: object | None = None, **changes: object) -> Services:
        built = build(settings.with_overrides(**changes), store=store)  # type: ignore[arg-type]
        made.append(built)
        return built

    yield make
    for built in made:
        built.close()
