"""``pacs serve`` with a DIMSE worker, or a DICOMweb worker, at its descriptor limit.

The worker's soft RLIMIT_NOFILE is lowered while it runs (``resource.prlimit``) to a
few more than it holds, and silent connections fill the rest.  The node must go on
serving the association it has, serve a new peer within seconds (a silent connection
is closed for it), write a bounded log, and serve as before once the limit is raised.
The in-process tests (``tests/service/test_exhaustion.py``,
``tests/unit/test_httpworker.py``) check that the acceptors do not spin meanwhile.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.interop.conftest import AE_TITLE, Node, answers_echo, answers_qido

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
