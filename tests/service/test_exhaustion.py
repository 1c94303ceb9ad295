"""The DIMSE acceptor when the worker runs short of descriptors or threads
(pacs.dimse.server.NodeServer): no busy loop, no traceback per connection, the
running associations and the next peers served once the shortage is over.

The shortage is a test double: the listening socket's ``accept`` failing with EMFILE
(what a full descriptor table gives), ``threading.Thread.start`` failing as it does at
RLIMIT_NPROC.  ``tests/interop/test_exhaustion.py`` runs the real descriptor limit.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any

import pytest
from falcon import testing
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from adapters.dicomweb.app import create_app
from pacs.core.services import Services
from pacs.dimse import server
from pacs.dimse.seam import reactor
from tests.clock import Clock
from tests.conftest import seam_only
from tests.factory import make_instance
from tests.interop.conftest import run_dcmtk
from tests.service.conftest import RunningNode

pytestmark = pytest.mark.dimse


class Exhausted:
    """The listening socket, whose ``accept`` fails with EMFILE while ``failing``."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failing = True
        self.calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def echo(node: RunningNode) -> int:
    """A C-ECHO's status (-1: no association)."""
    ae = AE(ae_title="EXHAUST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.services.settings.ae_title)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    """True when ``sock`` reads the end of the stream (or a reset) within ``within``."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_for(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_full_descriptor_table_pauses_the_acceptor_and_it_recovers(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    """The listening socket stays readable while accept fails: the acceptor waits
    ACCEPT_PAUSE between attempts (it retried at once, spinning a core), says so once,
    closes the oldest connection that sent no A-ASSOCIATE-RQ for room, keeps serving
    the association it has, and accepts again once descriptors are free."""
    running = AE(ae_title="RUNNING")
    running.add_requested_context(Verification)
    held: Association = running.associate("127.0.0.1", node.port,
                                          ae_title=node.services.settings.ae_title)
    assert held.is_established
    silent = socket.create_connection(("127.0.0.1", node.port))
    assert node.server.limits is not None
    wait_for(lambda: node.server.limits is not None and node.server.limits.pending == 1)
    double = Exhausted(node.server.socket)
    node.server.socket = double  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger=server.__name__)
    knocking = socket.create_connection(("127.0.0.1", node.port))  # queued, unaccepted
    try:
        time.sleep(1.0)
        attempts = double.calls
        assert 1 <= attempts <= 20, f"{attempts} accepts in 1 s"  # ACCEPT_PAUSE 0.1 s
        assert closed_by_peer(silent), "the oldest pending connection was kept"
        assert int(held.send_c_echo().Status) == 0  # the running association is served
        shortages = [r for r in caplog.records if "no descriptor" in r.getMessage()]
        assert len(shortages) == 1 and "Too many open files" in shortages[0].getMessage()
        double.failing = False
        assert echo(node) == 0
        wait_for(lambda: double.calls > attempts + 1)  # the queued connection accepted
    finally:
        node.server.socket = double.real
        held.release()
        silent.close()
        knocking.close()


@pytest.mark.parametrize("refused", [
    "connection", "association",
    pytest.param("dul", marks=seam_only("the DUL thread's start is guarded by the seam"))])
def test_threads_that_cannot_start_close_their_connection_with_one_log_line(
        node: RunningNode, refused: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """RLIMIT_NPROC reached: the connection's thread (started by the acceptor), the
    association's (started by that thread) or its DUL thread (started by the
    association's) cannot start.  The connection is closed at once (with the DUL's, it
    stayed open and unread until the association was collected), a WARNING line counts
    such failures at most every EVICTION_REPORT_SECONDS (socketserver wrote a
    traceback per connection), and the acceptor goes on: once threads start again, a
    C-ECHO succeeds."""
    starting = threading.Thread.start
    short = threading.Event()
    short.set()

    def start(thread: threading.Thread) -> None:
        target = getattr(thread, "_target", None)
        chosen = {
            "connection": target == node.server.process_request_thread,
            "association": isinstance(thread, Association) and thread.is_acceptor,
            "dul": isinstance(thread, DULServiceProvider) and thread.assoc.is_acceptor,
        }[refused]
        if short.is_set() and chosen:
            raise RuntimeError("can't start new thread")
        starting(thread)

    closing = node.server.close_request

    def close_late(request: socket.socket) -> None:
        # The peer sees the end of the stream (shutdown) before the descriptor is
        # released: the echo's connection must not find these still open and pending.
        time.sleep(0.5)
        closing(request)

    caplog.set_level(logging.WARNING, logger=server.__name__)
    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(node.server, "close_request", close_late)
    peers = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(5)]
    try:
        assert all(closed_by_peer(peer) for peer in peers)
        short.clear()
        assert echo(node) == 0
    finally:
        for peer in peers:
            peer.close()
    assert node.server.limits is not None and node.server.limits.pending == 0
    lines = [r for r in caplog.records if "cannot start a thread" in r.getMessage()]
    assert len(lines) == 1 and "can't start new thread" in lines[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err


@seam_only("the association's wake-up descriptor is the seam's")
def test_an_association_without_its_wake_up_descriptor_is_closed_quietly(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """Accepted, but the descriptor table fills before the association's eventfd is
    made: the connection is closed, the oldest silent one too for room, one WARNING
    line (a traceback per connection, and another from the half-made waker's
    ``__del__``), and once descriptors are free the next peer is served."""
    caplog.set_level(logging.WARNING, logger=server.__name__)
    silent = socket.create_connection(("127.0.0.1", node.port))
    wait_for(lambda: node.server.limits is not None and node.server.limits.pending == 1)
    made = reactor.os.eventfd

    def eventfd(*args: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(reactor.os, "eventfd", eventfd)
    peers = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        assert all(closed_by_peer(peer) for peer in peers)
        assert closed_by_peer(silent)
        monkeypatch.setattr(reactor.os, "eventfd", made)
        assert echo(node) == 0
    finally:
        silent.close()
        for peer in peers:
            peer.close()
    lines = [r for r in caplog.records if "no descriptor" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0].getMessage()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_a_peer_retrying_a_rejected_association_gets_ten_log_lines_then_a_count(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    """30 associations to a called AE title the node does not have, as fast as the peer
    can: each is rejected (A-ASSOCIATE-RJ), the first REJECTIONS_LOGGED are logged
    in full (every one was, a WARNING line per attempt)."""
    caplog.set_level(logging.WARNING, logger=server.__name__)
    for _ in range(30):
        # dcmtk's echoscu: pynetdicom's requestor can take a rejection that comes
        # before it has looked at its own connection for a failure to connect.
        result = run_dcmtk("echoscu", "-aet", "LOOPING", "-aec", "NOT-THIS-NODE",
                           "127.0.0.1", str(node.port), timeout=30)
        assert "Association Rejected" in result.stdout, result.stdout
    lines = [r.getMessage() for r in caplog.records
             if "Rejecting the association" in r.getMessage()]
    assert len(lines) == 10  # REJECTIONS_LOGGED
    assert "LOOPING" in lines[0]


def test_rejections_past_the_burst_are_counted_in_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """The window's end logs the count and the last rejection, once."""
    clock = Clock()
    rejections = server._Rejections(clock)
    caplog.set_level(logging.WARNING, logger=server.__name__)
    for i in range(server.REJECTIONS_LOGGED + 5):
        rejections.rejected(f"10.0.0.{i} (PEER): called AE title not recognised")
        clock.now += 0.1
    rejections.flush()  # the window is still open
    clock.now += server.EVICTION_REPORT_SECONDS
    rejections.flush()
    rejections.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == server.REJECTIONS_LOGGED + 1
    assert messages[-1].startswith("Rejected 5 more association(s)")
    assert f"10.0.0.{server.REJECTIONS_LOGGED + 4} (PEER)" in messages[-1]


# --- out of memory ---------------------------------------------------------------------------

def test_a_store_out_of_memory_is_refused_out_of_resources(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryError while storing (a worker at RLIMIT_AS): C-STORE A700, which a modality
    retries, not 0110 Processing failure; the association and the worker go on."""
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise MemoryError

    monkeypatch.setattr(node.services.ingest, "store_bytes", exhausted)
    ae = AE(ae_title="STORING")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.services.settings.ae_title)
    assert assoc.is_established
    try:
        ds = dcmread(DicomBytesIO(make_instance()))
        assert int(assoc.send_c_store(ds).Status) == 0xA700
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_a_query_out_of_memory_is_503(services: Services,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryError while a QIDO-RS is answered: 503 with Retry-After, not 500."""
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise MemoryError

    monkeypatch.setattr(services.engine, "find", exhausted)
    result = testing.TestClient(create_app(services)).simulate_get("/studies")
    assert result.status_code == 503
    assert result.headers.get("Retry-After")


def test_shortages_counted_after_a_line_are_logged_once_its_time_has_passed(
        caplog: pytest.LogCaptureFixture) -> None:
    """The first failure is logged at once, the next ones in one line
    EVICTION_REPORT_SECONDS later, when the acceptor flushes (they were logged only
    with a failure after that time, or never)."""
    clock = Clock()
    shortage = server._Counted("no descriptor for a DIMSE connection", clock)
    caplog.set_level(logging.WARNING, logger=server.__name__)
    for _ in range(4):
        shortage.count(OSError(errno.EMFILE, "Too many open files"))
        clock.now += 0.1
    shortage.flush()
    assert len(caplog.records) == 1
    clock.now += server.EVICTION_REPORT_SECONDS
    shortage.flush()
    shortage.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and " 3 time(s) " in messages[1]
