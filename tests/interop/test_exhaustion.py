"""``pacs serve`` with a DIMSE worker, or a DICOMweb worker, at its descriptor limit,
and both at their thread limit.

The worker's soft RLIMIT_NOFILE is lowered while it runs (``resource.prlimit``) to a
few more than it holds, and silent connections fill the rest.  The node must go on
serving the association it has, serve a new peer within seconds (a silent connection
is closed for it), write a bounded log, and serve as before once the limit is raised.
The thread limit is a cgroup's ``pids.max`` (cgroup v1, root only: RLIMIT_NPROC does
not hold for root).
The in-process tests (``tests/service/test_exhaustion.py``,
``tests/unit/test_httpworker.py``) check that the acceptors do not spin meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.interop.conftest import (
    AE_TITLE,
    Node,
    answers_echo,
    answers_qido,
    run_dcmtk,
)

pytestmark = [pytest.mark.interop, pytest.mark.hostile, pytest.mark.dimse]

#: Descriptors the worker may open beyond those it holds when the limit is lowered.
HEADROOM = 12
#: Silent connections opened against the lowered limit: more than the headroom.
SILENT = 40


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def command(pid: int) -> list[str]:
    return (Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))[:-1]


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def limited(pid: int) -> Iterator[int]:
    """``pid``'s soft descriptor limit lowered to what it holds and :data:`HEADROOM`;
    the limit set is given, and put back on leaving."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = descriptors(pid) + HEADROOM
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, before[1]))
    try:
        yield limit
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


def silent_connections(stack: ExitStack, port: int) -> None:
    for _ in range(SILENT):
        stack.enter_context(socket.create_connection(("127.0.0.1", port)))


def test_a_dimse_worker_at_its_descriptor_limit_serves_new_peers(
        node_factory: object) -> None:
    """A flood of silent connections fills the worker's descriptors (ARTIM 60 s would
    not free them): an association already running still answers, a dcmtk C-ECHO
    associates (the oldest silent connection is closed for it; it waited for ARTIM),
    and the shortage is one log line per 10 s."""
    node: Node = node_factory("dimse", PACS_DIMSE_WORKERS="1",  # type: ignore[operator]
                              PACS_ARTIM_TIMEOUT="60")
    worker = next(p for p in children(node.proc.pid)  # type: ignore[union-attr]
                  if command(p)[-2:] == ["pacs", "serve"])
    ae = AE(ae_title="HELD")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established
    answers_qido(node)  # every process started
    answers_echo(node)
    before = node.resources()
    with ExitStack() as stack:
        limit = stack.enter_context(limited(worker))
        silent_connections(stack, node.port)
        time.sleep(1.0)
        assert descriptors(worker) <= limit
        assert int(held.send_c_echo().Status) == 0
        started = time.monotonic()
        answers_echo(node)
        answers_echo(node)
        print(f"\nC-ECHO at the limit ({limit} descriptors): two in "
              f"{time.monotonic() - started:.2f} s")
    held.release()
    answers_echo(node)
    print(f"node {before} -> {node.resources()}")
    log = node.log(since_start=True)
    assert 1 <= log.count("no descriptor for a DIMSE connection") <= 2
    assert "Traceback" not in log


def test_a_web_worker_at_its_descriptor_limit_serves_new_clients(
        node_factory: object) -> None:
    """The same against the one DICOMweb worker: QIDO-RS answers within seconds (the
    oldest silent connection is closed for it; it waited for PACS_HTTP_TIMEOUT)."""
    node: Node = node_factory("web", PACS_WEB_WORKERS="1",  # type: ignore[operator]
                              PACS_HTTP_TIMEOUT="60")
    arbiter = next(p for p in children(node.proc.pid)  # type: ignore[union-attr]
                   if "pacs.node.apps:dicomweb_app()" in command(p))
    url = f"{node.web_url()}/studies"
    assert requests.get(url, timeout=30).status_code == 200  # its worker has booted
    worker = children(arbiter)[0]
    port = int(node.env["PACS_WEB_PORT"])
    before = node.resources()
    with ExitStack() as stack:
        limit = stack.enter_context(limited(worker))
        silent_connections(stack, port)
        time.sleep(1.0)
        assert descriptors(worker) <= limit
        started = time.monotonic()
        for _ in range(2):
            assert requests.get(url, timeout=20).status_code == 200
        print(f"\nQIDO-RS at the limit ({limit} descriptors): two in "
              f"{time.monotonic() - started:.2f} s")
    assert requests.get(url, timeout=20).status_code == 200
    print(f"node {before} -> {node.resources()}")
    log = node.log(since_start=True)
    assert 1 <= log.count("cannot accept HTTP connections") <= 2
    assert "Traceback" not in log


#: cgroup v1's pids controller, where a group's pids.max bounds its processes' threads.
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@contextmanager
def thread_limited(pids: list[int]) -> Iterator[None]:
    """``pids`` moved into a cgroup of their own whose pids.max is one more thread than
    they run; the limit lifted on leaving (the group is removed once they have ended)."""
    if not (PIDS_CGROUP / "cgroup.procs").exists() or not os.access(PIDS_CGROUP, os.W_OK):
        pytest.skip("needs a writable cgroup v1 pids controller (root)")
    group = PIDS_CGROUP / f"pacs-test-{os.getpid()}"
    group.mkdir()
    try:
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        running = int((group / "pids.current").read_text())
        (group / "pids.max").write_text(str(running + 1))
        yield
    finally:
        (group / "pids.max").write_text("max")
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # ended meanwhile
                (PIDS_CGROUP / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_workers_at_their_thread_limit_refuse_quickly_and_recover(
        node_factory: object) -> None:
    """The DIMSE worker and the DICOMweb worker can start one more thread: six C-ECHOs
    at once are refused or answered within seconds (a connection without its threads
    is closed), the association already running answers, twelve QIDO-RS at once get
    200 or 503 (a request no thread can take), never a closed connection; one WARNING
    line each, no traceback (socketserver wrote one per connection); once the limit is
    lifted both serve as before."""
    node: Node = node_factory("threads", PACS_DIMSE_WORKERS="1",  # type: ignore[operator]
                              PACS_WEB_WORKERS="1")
    answers_qido(node)
    answers_echo(node)
    worker = next(p for p in children(node.proc.pid)  # type: ignore[union-attr]
                  if command(p)[-2:] == ["pacs", "serve"])
    arbiter = next(p for p in children(node.proc.pid)  # type: ignore[union-attr]
                   if "pacs.node.apps:dicomweb_app()" in command(p))
    ae = AE(ae_title="HELD")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert held.is_established
    echoes: list[int] = []
    answers: list[object] = []

    def echo() -> None:
        echoes.append(run_dcmtk("echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aec",
                                AE_TITLE, "127.0.0.1", str(node.port),
                                timeout=60).returncode)

    def qido() -> None:
        try:
            answers.append(requests.get(f"{node.web_url()}/studies", timeout=20)
                           .status_code)
        except requests.RequestException as exc:
            answers.append(type(exc).__name__)

    with thread_limited([worker, *children(arbiter)]):
        started = time.monotonic()
        for target, count in ((echo, 6), (qido, 12)):
            peers = [threading.Thread(target=target) for _ in range(count)]
            for peer in peers:
                peer.start()
            for peer in peers:
                peer.join()
        took = time.monotonic() - started
        assert int(held.send_c_echo().Status) == 0
    print(f"\nC-ECHO return codes {echoes}, QIDO-RS {answers} in {took:.1f} s")
    assert len(echoes) == 6 and took < 20
    assert set(answers) <= {200, 503}, answers
    held.release()
    answers_echo(node)
    answers_qido(node)
    time.sleep(0.5)  # the HTTP worker's count is logged by its loop's next sweep
    log = node.log(since_start=True)
    assert "Traceback" not in log
    assert log.count("cannot start a thread for a DIMSE connection") <= 2
    assert log.count("cannot start HTTP request threads") <= 2
