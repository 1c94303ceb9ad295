"""Hostile DIMSE peers against ``pacs serve``: PDU headers declaring huge lengths, PDUs
longer than announced, silent sockets, too many associations, objects over the limit.

In every test the node keeps answering a real C-ECHO (dcmtk) and a QIDO-RS while the
attack runs, and its memory (summed RSS of every node process) grows by less than
256 MB.  The figures are printed for docs/reliability.md (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs.dimse.server import DRAIN_SECONDS
from tests.conftest import rejection_of, seam_only
from tests.interop.conftest import (
    AE_TITLE,
    PATIENCE,
    Node,
    Resources,
    answers_echo,
    answers_qido,
    fresh_ct,
    resources_of,
    run_dcmtk,
)
from tests.service.test_inbound import instance, pdu, pdv, read_response, store_command

pytestmark = [pytest.mark.interop, pytest.mark.hostile, pytest.mark.dimse]

#: PDU lengths are checked against their ceilings before a body is read only by the
#: seam's receive path (pacs/dimse/seam/reactor.py); pynetdicom reads what a header
#: declares, and has no A-ABORT for a PDU over the Maximum Length it announced.
pdu_ceilings = seam_only("PDU ceilings are checked in the seam's receive path")

#: The most a node's memory may grow during an attack.
MEMORY_BOUND = 256 << 20

#: A-ABORT, service provider, invalid PDU parameter value (PS3.8 9.3.8).
ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
#: A-ASSOCIATE-RJ, rejected-transient, service provider (presentation), local limit
#: exceeded (PS3.8 9.3.4).
REJECT_LOCAL_LIMIT = (2, 3, 2)


# --- the node's health during an attack ----------------------------------------------------

echo, qido = answers_echo, answers_qido


def still_serving(node: Node) -> None:
    echo(node)
    qido(node)


def dimse_fds(node: Node) -> int:
    """Open descriptors of the node's parent and DIMSE worker processes (forked from it,
    so with its command line; the web workers' keep-alive connections and index
    connections come and go with HTTP requests)."""
    pids = []
    for pid in node.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"pacs\0serve" in cmdline.read():
                    pids.append(pid)
        except OSError:
            continue
    return resources_of(pids).fds


class Memory:
    """The node's resources before an attack and the most seen since."""

    def __init__(self, node: Node) -> None:
        self.node = node
        still_serving(node)  # warmed up: first requests load modules and connections
        self.before = node.resources()
        self.dimse_fds = dimse_fds(node)
        self.peak = self.before

    def sample(self) -> Resources:
        now = self.node.resources()
        if now.rss_bytes > self.peak.rss_bytes:
            self.peak = now
        return now

    def check(self, name: str) -> None:
        """Print before → peak → now, and require the growth to stay under the bound."""
        now = self.sample()
        print(f"\n[{name}] memory {self.before.rss_bytes / 2**20:.0f} MiB -> peak "
              f"{self.peak.rss_bytes / 2**20:.0f} MiB -> {now.rss_bytes / 2**20:.0f} MiB; "
              f"fds {self.before.fds} -> {now.fds} (DIMSE processes "
              f"{self.dimse_fds} -> {dimse_fds(self.node)})")
        grown = self.peak.rss_bytes - self.before.rss_bytes
        assert grown < MEMORY_BOUND, f"memory grew by {grown / 2**20:.0f} MiB"


# --- raw DIMSE ------------------------------------------------------------------------------

def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(max_pdu: int = 16384, calling: str = "HOSTILE") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in Implicit VR LE (context 1) and CT
    Image Storage in Explicit VR LE (context 3) (PS3.8 9.3.2)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, Verification.encode())
                    + _item(0x40, ImplicitVRLittleEndian.encode()))
    context += _item(0x20, bytes([3, 0, 0, 0]) + _item(0x30, CTImageStorage.encode())
                     + _item(0x40, ExplicitVRLittleEndian.encode()))
    body = (struct.pack(">HH", 1, 0) + AE_TITLE.ljust(16).encode()
            + calling.ljust(16).encode() + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context
            + _item(0x50, _item(0x51, struct.pack(">I", max_pdu))))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the node closed the connection."""
    head = _read(sock, 6)
    if len(head) < 6:
        return None
    kind, _, length = struct.unpack(">BBI", head)
    return kind, _read(sock, length)


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def closed(sock: socket.socket) -> bool:
    """True when the node has closed the connection (what is left unread is dropped)."""
    try:
        while chunk := sock.recv(65536):
            del chunk
    except ConnectionResetError:
        return True
    return True


@contextmanager
def raw_association(node: Node, source: str = "127.0.0.1") -> Iterator[tuple[socket.socket, int]]:
    """A raw socket with an established association; yields it and the Maximum Length
    the node announced in its A-ASSOCIATE-AC."""
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE,
                                    source_address=(source, 0))
    try:
        sock.sendall(associate_rq())
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x02, (answer, node.log())
        body = answer[1]
        at = body.index(b"\x51\x00\x00\x04")
        yield sock, struct.unpack_from(">I", body, at + 4)[0]
    finally:
        sock.close()


def pdata(length: int, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU of ``length`` bytes after its header: one PDV of command bytes."""
    return (struct.pack(">BBIIBB", 0x04, 0, length, length - 4, context_id, 0x01)
            + bytes(length - 6))


# --- huge declared lengths ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(node_factory: Callable[..., Node]) -> Iterator[Node]:
    """A node with a short ARTIM timer and DIMSE timeout, killed at the end."""
    node = node_factory("hostile", PACS_ARTIM_TIMEOUT="2", PACS_DIMSE_TIMEOUT="5")
    yield node
    node.kill9()


@pdu_ceilings
def test_associate_rq_headers_declaring_4_gb(hostile: Node) -> None:
    """Four 6-byte A-ASSOCIATE-RQ headers declaring 0xFFFFFFFF bytes (they took ~2.9 GB):
    each is answered with an A-ABORT before any body is read, and closed."""
    node = hostile
    memory = Memory(node)
    socks = [socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE)
             for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(b"\x01\x00\xff\xff\xff\xff")
        still_serving(node)
        for sock in socks:
            assert _read(sock, 10) == ABORT_INVALID_PARAMETER
            assert closed(sock)
    finally:
        for sock in socks:
            sock.close()
    still_serving(node)
    memory.check("A-ASSOCIATE-RQ headers declaring 0xFFFFFFFF bytes")


@pdu_ceilings
def test_pdata_declaring_4_gb_then_stalling(hostile: Node) -> None:
    """Inside an association: a P-DATA-TF header declaring 0xFFFFFFF0 bytes, then
    silence.  Longer than the Maximum Length the node announced: A-ABORT, closed."""
    node = hostile
    memory = Memory(node)
    with raw_association(node) as (sock, maximum):
        assert maximum == 262144
        sock.sendall(b"\x04\x00\xff\xff\xff\xf0" + bytes(1000))
        still_serving(node)
        assert _read(sock, 10) == ABORT_INVALID_PARAMETER
        assert closed(sock)
    still_serving(node)
    memory.check("P-DATA-TF declaring 0xFFFFFFF0 bytes in an association, then stalling")


@pdu_ceilings
@pytest.mark.parametrize("excess", [1, 4096])
def test_pdata_longer_than_the_announced_maximum(hostile: Node, excess: int) -> None:
    """A whole P-DATA-TF PDU longer than the node's Maximum Length (PS3.8 D.1) is a
    protocol error: A-ABORT (service provider, invalid PDU parameter value), closed."""
    node = hostile
    memory = Memory(node)
    with raw_association(node) as (sock, maximum):
        # Closed while we were still sending: the A-ABORT is already here.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(pdata(maximum + excess))
        assert _read(sock, 10) == ABORT_INVALID_PARAMETER
        assert closed(sock)
    still_serving(node)
    memory.check(f"P-DATA-TF {excess} byte(s) over the announced maximum")


def _stored_once(sock: socket.socket, number: int) -> None:
    """A first C-STORE on a raw association, answered Success: the node's association
    thread reads what follows from the socket itself (pacs.dimse.seam.inbound)."""
    uid, data = instance(number)
    sock.sendall(pdu(pdv(3, 0x03, store_command(uid, number)), pdv(3, 0x02, data)))
    assert read_response(sock)[0x00000900] == 0x0000


@pdu_ceilings
def test_pdata_declaring_4_gb_after_a_store(hostile: Node) -> None:
    """After a C-STORE, when the association's own thread reads the requests: a P-DATA-TF
    header declaring 0xFFFFFFF0 bytes is refused the same way (A-ABORT, closed)."""
    node = hostile
    memory = Memory(node)
    with raw_association(node) as (sock, _maximum):
        _stored_once(sock, 1)
        sock.sendall(b"\x04\x00\xff\xff\xff\xf0" + bytes(1000))
        assert _read(sock, 10) == ABORT_INVALID_PARAMETER
        assert closed(sock)
    still_serving(node)
    memory.check("P-DATA-TF declaring 0xFFFFFFF0 bytes after a store")


@pdu_ceilings
def test_a_store_that_stalls_inside_its_data_set(hostile: Node) -> None:
    """After a C-STORE: the next one's command, half a data set PDU, then silence.  The
    node aborts the association after PACS_DIMSE_TIMEOUT (5 s here), nothing of that
    instance indexed."""
    node = hostile
    with raw_association(node) as (sock, _maximum):
        _stored_once(sock, 2)
        uid, data = instance(3)
        whole = pdu(pdv(3, 0x02, data))
        sock.sendall(pdu(pdv(3, 0x03, store_command(uid, 3))) + whole[:len(whole) // 2])
        started = time.monotonic()
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x07, answer  # A-ABORT
        assert 4 < time.monotonic() - started < PATIENCE
        assert closed(sock)
    still_serving(node)
    assert uid not in node.index()


def test_unlimited_pdu_buffer_grows_with_arrival(node_factory: Callable[..., Node]) -> None:
    """PACS_MAX_PDU=0 (no Maximum Length): a P-DATA-TF declaring 1.5 GB, 8 MB of it sent,
    then silence.  The node holds what arrived, not what was declared, and closes the
    connection after the DIMSE timeout (a read that stops midway)."""
    node = node_factory("unlimited", PACS_MAX_PDU="0", PACS_DIMSE_TIMEOUT="3")
    try:
        memory = Memory(node)
        with raw_association(node) as (sock, maximum):
            assert maximum == 0
            sock.sendall(b"\x04\x00" + struct.pack(">I", 1_500_000_000) + bytes(8 << 20))
            still_serving(node)
            memory.sample()
            started = time.monotonic()
            assert closed(sock)  # blocks until the node gives up (socket timeout 30 s)
            print(f"\n[unlimited PDU stalled] closed after {time.monotonic() - started:.1f} s")
        still_serving(node)
        memory.check("P-DATA-TF declaring 1.5 GB with PACS_MAX_PDU=0, 8 MB sent, stalled")
    finally:
        node.kill9()


# --- silent connections -----------------------------------------------------------------------

def _open_silent(node: Node, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE)
        socks.append(sock)
    return socks


def _open_ones(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the node has not closed yet (without blocking)."""
    still = []
    for sock in socks:
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            still.append(sock)
            continue
        except ConnectionResetError:
            continue
        finally:
            sock.settimeout(timeout)
        if data:
            still.append(sock)
    return still


def test_hundreds_of_silent_connections(node_factory: Callable[..., Node]) -> None:
    """300 connections that send nothing: they do not count as associations (4 allowed
    per worker here), at most PACS_MAX_PENDING_CONNECTIONS per worker stay open (the
    oldest are closed first), a real C-ECHO still succeeds."""
    node = node_factory("silent", PACS_MAX_ASSOCIATIONS="4",
                        PACS_MAX_PENDING_CONNECTIONS="16", PACS_ARTIM_TIMEOUT="60")
    try:
        memory = Memory(node)
        socks = _open_silent(node, 300)
        try:
            deadline = time.monotonic() + PATIENCE
            while len(still := _open_ones(socks)) > 2 * 16 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(still) <= 2 * 16, f"{len(still)} silent connections still open"
            # The newest are the ones kept: each worker keeps its own newest 16, and the
            # two workers take connections unevenly, so "newest" is per worker; but the
            # first two thirds are all gone (keeping the oldest would keep exactly those).
            assert set(still) <= set(socks[-100:])
            memory.sample()
            still_serving(node)
            # A real peer's connection evicts an old silent one, never the other way.
            for _ in range(3):
                echo(node)
            assert "PACS_MAX_PENDING_CONNECTIONS (16 per worker) reached" in node.log()
        finally:
            for sock in socks:
                sock.close()
        memory.check("300 silent connections, PACS_MAX_PENDING_CONNECTIONS=16, 2 workers")
    finally:
        node.kill9()


def test_silent_connections_are_closed_after_artim(node_factory: Callable[..., Node]) -> None:
    """Connections that send nothing, or only part of an A-ASSOCIATE-RQ, are closed when
    ARTIM expires (PS3.8 9.1.2, 9.1.3); meanwhile they do not lock out a real peer."""
    node = node_factory("artim", PACS_DIMSE_WORKERS="1", PACS_ARTIM_TIMEOUT="2",
                        PACS_MAX_ASSOCIATIONS="4")
    try:
        memory = Memory(node)
        fds_before = dimse_fds(node)
        socks = _open_silent(node, 40)
        partial = socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE)
        request = associate_rq()
        partial.sendall(request[:len(request) // 2])  # the rest never comes
        trickle = socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE)
        started = time.monotonic()
        try:
            still_serving(node)
            memory.sample()
            # A request trickled a byte at a time cannot outlast ARTIM either.
            sent = 0
            while sent < len(request) and time.monotonic() - started < PATIENCE:
                try:
                    trickle.sendall(request[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                time.sleep(0.25)
            assert sent < len(request), "the trickled request outlasted ARTIM"
            for sock in [*socks, partial, trickle]:
                assert closed(sock)
            print(f"\n[silent connections, ARTIM 2 s] all closed after "
                  f"{time.monotonic() - started:.1f} s")
        finally:
            for sock in [*socks, partial, trickle]:
                sock.close()
        still_serving(node)
        deadline = time.monotonic() + PATIENCE
        while dimse_fds(node) > fds_before and time.monotonic() < deadline:
            time.sleep(0.2)  # the DIMSE worker lets go of every descriptor it took
        assert dimse_fds(node) <= fds_before
        memory.check("40 silent connections + a partial and a trickled A-ASSOCIATE-RQ, "
                     "ARTIM 2 s")
    finally:
        node.kill9()


def test_silent_connections_do_not_hold_up_a_stop(node_factory: Callable[..., Node]) -> None:
    """A stopping node closes the connections that sent no request at once instead of
    letting them run out their ARTIM time within its drain (10 s)."""
    node = node_factory("stopping", PACS_ARTIM_TIMEOUT="60")
    try:
        still_serving(node)
        socks = _open_silent(node, 20)
        deadline = time.monotonic() + PATIENCE
        while len(_open_ones(socks)) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # every connection accepted by a worker
        started = time.monotonic()
        node.terminate()
        took = time.monotonic() - started
        print(f"\n[stop with 20 silent connections] {took:.1f} s")
        assert took < DRAIN_SECONDS, "the stop waited for the silent connections"
        for sock in socks:
            assert closed(sock)
            sock.close()
    finally:
        node.stop()


# --- trickled PDUs ----------------------------------------------------------------------------

def dimse_threads(node: Node) -> int:
    """Threads of the node's parent and DIMSE worker processes (see :func:`dimse_fds`)."""
    threads = 0
    for pid in node.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"pacs\0serve" not in cmdline.read():
                    continue
            with open(f"/proc/{pid}/status") as status:
                threads += int(next(line.split()[1] for line in status
                                    if line.startswith("Threads:")))
        except (OSError, StopIteration):
            continue
    return threads


class Trickle:
    """A raw association that sends a P-DATA-TF header declaring 1000 bytes, then one
    byte of its body every ``every`` seconds, from its own thread, until the node closes
    the connection or ``longest`` seconds have passed."""

    def __init__(self, node: Node, source: str, after_store: bool, every: float,
                 longest: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node.port), timeout=longest,
                                             source_address=(source, 0))
        self.sock.sendall(associate_rq())
        answer = read_pdu(self.sock)
        assert answer is not None and answer[0] == 0x02, (answer, node.log())
        if after_store:  # the association's own thread reads what follows
            _stored_once(self.sock, 100 + int(source.rsplit(".", 1)[1]))
        self.every, self.longest = every, longest
        self.started = time.monotonic()
        self.closed_after: float | None = None
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        self.sock.sendall(b"\x04\x00" + struct.pack(">I", 1000))
        while time.monotonic() - self.started < self.longest:
            time.sleep(self.every)
            try:
                self.sock.sendall(b"\0")
            except OSError:
                return

    def wait_closed(self) -> float | None:
        """Seconds from the first byte until the node closed the connection; ``None``
        when it was still open after ``longest`` seconds."""
        try:
            while self.sock.recv(65536):
                pass
            self.closed_after = time.monotonic() - self.started
        except TimeoutError:
            self.closed_after = None
        except ConnectionResetError:
            self.closed_after = time.monotonic() - self.started
        return self.closed_after

    def close(self) -> None:
        self.sock.close()
        self._thread.join()


@seam_only("pynetdicom's own reads bound each recv, not a whole PDU")
def test_trickled_pdus_are_dropped_and_their_threads_end(
        node_factory: Callable[..., Node]) -> None:
    """A P-DATA-TF whose body arrives a byte every 2 s, each byte within the receive
    timeout (PACS_DIMSE_TIMEOUT, 3 s here), read by the DUL thread (right after the
    association) or by the association's own thread (after a store): each PDU must
    arrive whole within its time, so the node closes these connections within about
    twice the timeout, every thread and descriptor they took ends with them, and other
    peers are served meanwhile.  Three rounds from one address whose limit is two
    associations: a third is refused while they trickle, and the next round finds both
    places free again."""
    timeout = 3.0
    node = node_factory("trickle", PACS_DIMSE_WORKERS="1", PACS_DIMSE_TIMEOUT=str(timeout),
                        PACS_MAX_ASSOCIATIONS_PER_HOST="2")
    try:
        memory = Memory(node)
        threads_started = dimse_threads(node)
        with raw_association(node) as (sock, _maximum):
            _stored_once(sock, 99)  # starts the one thread of the audit trail's writer
        deadline = time.monotonic() + PATIENCE
        while dimse_threads(node) > threads_started + 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # that association's own threads end
        threads_before, fds_before = dimse_threads(node), dimse_fds(node)
        for round_ in range(3):
            tricklers = [Trickle(node, "127.0.0.2", after_store, every=2.0,
                                 longest=8 * timeout) for after_store in (False, True)]
            try:
                _assert_rejected_for_limit(_associate(node, "127.0.0.2"))
                still_serving(node)
                took = [t.wait_closed() for t in tricklers]
            finally:
                for trickler in tricklers:
                    trickler.close()
            print(f"\n[trickled PDUs, PACS_DIMSE_TIMEOUT=3, round {round_ + 1}] closed "
                  f"after {took} s; threads {threads_before} -> {dimse_threads(node)}")
            assert all(t is not None and t < 4 * timeout for t in took), (took, node.log())
            deadline = time.monotonic() + PATIENCE
            while (dimse_threads(node) > threads_before or dimse_fds(node) > fds_before) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert dimse_threads(node) <= threads_before, node.log()
            assert dimse_fds(node) <= fds_before, node.log()
        still_serving(node)
        memory.check("trickled P-DATA-TF bodies, a byte every 2 s, PACS_DIMSE_TIMEOUT=3")
    finally:
        node.kill9()


# --- association limits -------------------------------------------------------------------

def _associate(node: Node, source: str = "127.0.0.1") -> Association:
    ae = AE(ae_title="LIMITS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = PATIENCE
    return ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, bind_address=(source, 0))


def _associate_soon(node: Node, source: str) -> Association:
    """An association from ``source`` once the node has seen a place freed (an abort
    reaches the node's association thread a moment after the peer sent it)."""
    deadline = time.monotonic() + PATIENCE
    while not (assoc := _associate(node, source)).is_established:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    return assoc


def _assert_rejected_for_limit(assoc: Association) -> None:
    """The A-ASSOCIATE-RJ the node sent (:func:`tests.conftest.rejection_of`)."""
    assert not assoc.is_established
    assert rejection_of(assoc) == REJECT_LOCAL_LIMIT


def _raw_rejection(node: Node, source: str) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ a raw request gets."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=PATIENCE,
                                  source_address=(source, 0)) as sock:
        sock.sendall(associate_rq())
        answer = read_pdu(sock)
        assert answer is not None and answer[0] == 0x03, answer
        assert closed(sock)
        return answer[1][1], answer[1][2], answer[1][3]


def test_associations_per_host(node_factory: Callable[..., Node]) -> None:
    """Two associations from 127.0.0.2 are its limit: a third is rejected (A-ASSOCIATE-RJ
    2/3/2); peers on other addresses go on associating."""
    node = node_factory("perhost", PACS_DIMSE_WORKERS="1",
                        PACS_MAX_ASSOCIATIONS_PER_HOST="2", PACS_MAX_ASSOCIATIONS="8")
    held: list[Association] = []
    try:
        memory = Memory(node)
        held = [_associate(node, "127.0.0.2") for _ in range(2)]
        assert all(a.is_established for a in held), node.log()
        _assert_rejected_for_limit(_associate(node, "127.0.0.2"))
        assert _raw_rejection(node, "127.0.0.2") == REJECT_LOCAL_LIMIT
        still_serving(node)  # from 127.0.0.1
        other = _associate(node, "127.0.0.3")
        assert other.is_established
        other.release()
        held.pop().release()
        held.append(_associate_soon(node, "127.0.0.2"))  # a released place is free
        held.pop().abort()
        held.append(_associate_soon(node, "127.0.0.2"))  # and an aborted one
        memory.check("3rd association from one address, PACS_MAX_ASSOCIATIONS_PER_HOST=2")
    finally:
        for assoc in held:
            assoc.release()
        node.kill9()


#: A-ASSOCIATE-RJ, rejected-permanent, service user, calling AE title not recognized
#: (PS3.8 9.3.4).
REJECT_CALLING_AE = (1, 1, 3)


def _associate_as(node: Node, calling: str, source: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = PATIENCE
    return ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, bind_address=(source, 0))


def test_refused_associations_take_no_place(node_factory: Callable[..., Node]) -> None:
    """An AE the access rules refuse is refused as such (1/1/3, a Security Alert in the
    audit trail) even when its address has no place left, and never holds one: a flood
    of refused associations from an address leaves its place to the AE with rights
    there."""
    node = node_factory("refused-places", PACS_DIMSE_WORKERS="1",
                        PACS_MAX_ASSOCIATIONS_PER_HOST="1", PACS_MAX_ASSOCIATIONS="64",
                        PACS_ALLOWED_CALLING_AETS="ALLOWED")
    source = "127.0.0.2"
    held = _associate_as(node, "ALLOWED", source)
    try:
        assert held.is_established, node.log()
        stranger = _associate_as(node, "STRANGER", source)
        assert rejection_of(stranger) == REJECT_CALLING_AE, node.log()
        trail = (node.data_dir / "audit.jsonl").read_text(encoding="utf-8")
        assert '"110126"' in trail and "STRANGER" in trail  # Node Authentication
    finally:
        held.release()
    # Another address, that no association has used yet: a flood of refused ones, and
    # the AE with rights takes the address's one place in the middle of it.
    source = "127.0.0.3"
    refused: list[Association] = []
    started = threading.Event()

    def flood() -> None:
        for _ in range(10):
            refused.append(_associate_as(node, "STRANGER", source))
            started.set()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert started.wait(PATIENCE)
        allowed = _associate_as(node, "ALLOWED", source)
        try:
            assert allowed.is_established, node.log()
            _assert_rejected_for_limit(_associate_as(node, "ALLOWED", source))  # its place
        finally:
            allowed.release()
    finally:
        for thread in threads:
            thread.join()
    assert len(refused) == 40
    assert all(rejection_of(a) == REJECT_CALLING_AE for a in refused)


def test_full_node_rejects_with_local_limit_exceeded(
        node_factory: Callable[..., Node]) -> None:
    """PACS_MAX_ASSOCIATIONS held by real associations: the next is rejected with a
    clear A-ASSOCIATE-RJ (rejected-transient, service provider, local limit exceeded),
    seen by pynetdicom, dcmtk and a raw socket; once one ends, echo works again."""
    node = node_factory("full", PACS_DIMSE_WORKERS="1", PACS_MAX_ASSOCIATIONS="3")
    held: list[Association] = []
    try:
        memory = Memory(node)
        held = [_associate(node) for _ in range(3)]
        assert all(a.is_established for a in held), node.log()
        _assert_rejected_for_limit(_associate(node))
        assert _raw_rejection(node, "127.0.0.1") == REJECT_LOCAL_LIMIT
        result = run_dcmtk("echoscu", "-to", "10", "-ta", "10", "-aec", AE_TITLE,
                           "127.0.0.1", str(node.port), timeout=60)
        assert result.returncode != 0
        assert "Rejected Transient" in result.stdout, result.stdout
        assert "Local Limit Exceeded" in result.stdout, result.stdout
        qido(node)
        held.pop().release()
        still_serving(node)
        memory.check("a 4th association on a node full at PACS_MAX_ASSOCIATIONS=3")
    finally:
        for assoc in held:
            assoc.release()
        node.kill9()


# --- objects over PACS_MAX_OBJECT_BYTES ----------------------------------------------------------

def _large_ct(path: Path, pixel_bytes: int) -> pydicom.FileDataset:
    """A CT whose pixel data has ``pixel_bytes`` bytes (16-bit, square-ish)."""
    ds = fresh_ct()
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_store_over_the_object_limit(node_factory: Callable[..., Node],
                                     tmp_path: Path) -> None:
    """A 288 MiB C-STORE to a node with PACS_MAX_OBJECT_BYTES=1000000: A700, nothing
    stored, the node's memory does not follow the object; on one association an object
    over the limit gets A700 and the next one is stored."""
    node = node_factory("objects", PACS_MAX_OBJECT_BYTES="1000000")
    try:
        memory = Memory(node)
        big = _large_ct(tmp_path / "big.dcm", 288 << 20)
        result = run_dcmtk("storescu", "-v", "-to", "30", "-ta", "30", "-td", "120",
                           "-aec", AE_TITLE, "127.0.0.1", str(node.port),
                           str(tmp_path / "big.dcm"), timeout=300)
        # dcmtk names status A700 "Refused: OutOfResources" (PS3.4 B.2.3)
        assert "Refused: OutOfResources" in result.stdout, result.stdout
        memory.sample()
        still_serving(node)
        assert big.SOPInstanceUID not in node.index()
        assert not node.objects()

        ae = AE(ae_title="OBJECTS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = PATIENCE
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            over = fresh_ct(Rows=1024, Columns=1024, PixelData=bytes(2 << 20))
            assert assoc.send_c_store(over).Status == 0xA700
            small = fresh_ct()
            assert assoc.send_c_store(small).Status == 0x0000
        finally:
            assoc.release()
        index = node.index()
        assert small.SOPInstanceUID in index and over.SOPInstanceUID not in index
        node.wait_drained()
        assert len(node.objects()) == 1
        still_serving(node)
        memory.check("C-STORE of 288 MiB, PACS_MAX_OBJECT_BYTES=1000000")
    finally:
        node.kill9()


def test_store_at_the_limit_is_stored(node_factory: Callable[..., Node]) -> None:
    """An object just under PACS_MAX_OBJECT_BYTES is stored as usual."""
    node = node_factory("atlimit", PACS_MAX_OBJECT_BYTES="1000000")
    try:
        ds = fresh_ct(Rows=640, Columns=700, PixelData=bytes(640 * 700 * 2))
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        assert 900_000 < len(buffer.getvalue()) < 1_000_000
        ae = AE(ae_title="OBJECTS")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert ds.SOPInstanceUID in node.index()
    finally:
        node.kill9()
