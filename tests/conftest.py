"""Shared fixtures: settings in a temporary folder, services over an in-memory store,
pydicom's bundled test files (never downloaded), free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from pacs.core import config
from pacs.core.services import Services, build
from pacs.core.storage.memory import MemoryStore

#: Whether the DIMSE tests run with the seam (PACS_DIMSE_SEAM, on by default): ``pytest -m
#: dimse`` runs them once each way (PACS_DIMSE_SEAM=off: pynetdicom's public API only).
SEAM = config.load(environ={"PACS_DIMSE_SEAM": os.environ.get("PACS_DIMSE_SEAM", "on")},
                   env_file=None).dimse_seam


def seam_only(reason: str) -> pytest.MarkDecorator:
    """Exclude a test of a property only the seam provides from the run without it
    (PACS_DIMSE_SEAM=off), saying why; with the seam it runs as any other."""
    return pytest.mark.skipif(not SEAM, reason=f"seam only (PACS_DIMSE_SEAM=off): {reason}")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1",
                  process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on ``port``; fail loudly on timeout, or as soon as
    ``process`` (the server meant to listen there) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ChildProcessError(f"the server for {host}:{port} exited "
                                    f"({process.returncode}) before it listened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def start_listening(start: Callable[[int], subprocess.Popen[bytes]], attempts: int = 5,
                    timeout: float = 30.0) -> tuple[int, subprocess.Popen[bytes]]:
    """Start a server with ``start(port)`` on a free loopback port and wait until it
    accepts: (the port, the process).

    A port found free (:func:`free_port`) can be taken before the server binds it - by
    another server, or as the local port of an outgoing connection - and the server
    then exits ("Address already in use"): it is started again on another port.
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
