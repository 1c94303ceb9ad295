"""The DIMSE SCP: AE set-up, the association servers, and worker processes.

Python threads share one core, and a pynetdicom association costs CPU in its own
threads; so the node runs several worker processes that accept from the listening
sockets (pre-fork, like gunicorn): the plain port (``PACS_DIMSE_PORT``) and the DICOM
TLS port (``PACS_DIMSE_TLS_PORT``, :mod:`pacs.dimse.tls`), either of which may be off.
Each worker runs one association server per port, under one set of connection limits,
and has its own index connections and store client, opened after the fork.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import math
import multiprocessing
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacs.core import audit
from pacs.core.access import AccessPolicy
from pacs.core.audit import AuditTrail, Participant
from pacs.core.config import Settings
from pacs.core.customers import customers as customers_of
from pacs.core.net import listening_socket, stop_on_signals, stop_when_orphaned, worker_count
from pacs.core.offload import cannot_start_thread
from pacs.core.services import Services, build
from pacs.dimse import contexts, handlers, limits, seam, tls
from pacs.dimse.customers import Customers
from pacs.dimse.limits import ConnectionLimits

log = logging.getLogger(__name__)

#: Seconds a stopping worker lets running associations finish before aborting them.
DRAIN_SECONDS = 10.0


class NodeAE(AE):
    """pynetdicom's AE, with the TLS context of its associations to C-MOVE destinations
    marked TLS (:func:`pacs.dimse.tls.client_context`; ``None``: no such destination)."""

    destination_tls: ssl.SSLContext | None = None


def make_ae(settings: Settings) -> NodeAE:
    """The application entity with the node's title, limits and contexts (the TLS
    context of its destinations is :func:`start`'s: it reads files)."""
    ae = NodeAE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.dimse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.dimse_timeout
    # C-MOVE destinations are connected from this AE: an unreachable one must fail
    # (A702) within the timeout, not the operating system's minutes.
    ae.connection_timeout = settings.dimse_timeout
    # The called AE title chooses the customer and is checked then, with a reason
    # (A-ASSOCIATE-RJ, :func:`_admit`): pynetdicom's own check knows one title only.
    # The calling AE title is checked by the customer's access rules in the same
    # handler, which hold PACS_ALLOWED_CALLING_AETS too.
    ae.require_called_aet = False
    # Not ``ae.supported_contexts = ...``: that setter drops the SCU/SCP role flags,
    # and without them a C-GET requestor's SCP role proposal is refused (PS3.7 D.3.3.4).
    for context in contexts.scp_contexts():
        ae.add_supported_context(str(context.abstract_syntax), context.transfer_syntax,
                                 scu_role=context.scu_role, scp_role=context.scp_role)
    return ae


#: ``ae.maximum_associations`` when the node's own limits admit associations.
UNCOUNTED = 1 << 30

#: Seconds between two log lines about pending connections closed for room.
EVICTION_REPORT_SECONDS = 10.0

#: Seconds between full garbage collections of an idle worker.
IDLE_COLLECT_SECONDS = 10.0


class _Counted:
    """Connections lost in one way (failed TLS handshakes; connections the worker could
    not take for want of descriptors or threads), logged at most every
    :data:`EVICTION_REPORT_SECONDS` with their count and the last one's detail: what a
    peer can repeat as fast as it connects (a port scan, a flood that exhausts the
    process) is not a flood of logs.  What was counted after a line is logged by
    :meth:`flush` once that time has passed.

    Parameters
    ----------
    what : str
        The line's beginning.
    clock : callable, optional
        Monotonic seconds (tests give their own).
    """

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._last: object = None
        self._reported_at = -EVICTION_REPORT_SECONDS

    def count(self, detail: object) -> None:
        """One more connection lost: ``detail`` (an error, a text) says how."""
        with self._lock:
            self._count += 1
            self._last = detail
        self.flush()

    def flush(self) -> None:
        """Log the count when there is one and the last line is old enough (the
        acceptor calls this now and then)."""
        with self._lock:
            now = self._clock()
            if not self._count or now - self._reported_at < EVICTION_REPORT_SECONDS:
                return
            count, detail = self._count, self._last
            self._count, self._reported_at = 0, now
        log.warning("%s %d time(s) since the last such line: %s", self.what, count,
                    detail)


#: Association rejections logged in full per :data:`EVICTION_REPORT_SECONDS`.
REJECTIONS_LOGGED = 10


class _Rejections:
    """A-ASSOCIATE-RJ sent, for the log: the first :data:`REJECTIONS_LOGGED` of every
    :data:`EVICTION_REPORT_SECONDS` in full, the rest counted in one line with the last
    of them.  A peer that retries a refused association in a loop (a wrong AE title, a
    full node) wrote a WARNING line per attempt, as fast as it could connect.

    Parameters
    ----------
    clock : callable, optional
        Monotonic seconds (tests give their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._started = -EVICTION_REPORT_SECONDS
        self._logged = 0
        self._unlogged = 0
        self._last = ""

    def rejected(self, text: str) -> None:
        """One rejection: ``text`` says from whom and why."""
        with self._lock:
            summary = self._roll()
            full = self._logged < REJECTIONS_LOGGED
            if full:
                self._logged += 1
            else:
                self._unlogged += 1
                self._last = text
        self._report(summary)
        if full:
            log.warning("Rejecting the association from %s", text)

    def flush(self) -> None:
        """Log the count of a window that has ended (the acceptor, now and then)."""
        with self._lock:
            summary = self._roll()
        self._report(summary)

    def _roll(self) -> tuple[int, str] | None:
        """Start a new window when the present one has ended; what it left unlogged."""
        now = self._clock()
        if now - self._started < EVICTION_REPORT_SECONDS:
            return None
        summary = (self._unlogged, self._last) if self._unlogged else None
        self._started, self._logged, self._unlogged = now, 0, 0
        return summary

    @staticmethod
    def _report(summary: tuple[int, str] | None) -> None:
        if summary is not None:
            log.warning("Rejected %d more association(s) within %g s (the last from %s)",
                        summary[0], EVICTION_REPORT_SECONDS, summary[1])


#: errno values of ``accept`` that say the process or the system is out of something
#: (descriptors, socket buffers, memory), not that the peer failed.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Tries at building an accepted connection's association while the process is out
#: of descriptors, and the seconds between them (room is made before each retry).
ROOM_ATTEMPTS = 5
ROOM_WAIT = 0.05

#: Seconds the acceptor waits after an accept that failed for want of resources.  The
#: connection stays in the listening socket's queue, which stays readable: accepting
#: again at once spun a core for as long as the shortage lasted.
ACCEPT_PAUSE = 0.1


#: Seconds a worker waits before accepting per connection it serves, at most
#: :data:`DEFERRAL_STEPS` times (:meth:`NodeServer._defer_to_less_busy_workers`).
ACCEPT_DEFERRAL = 0.002
DEFERRAL_STEPS = 5

#: Connections the kernel holds for the workers to accept.  socketserver's default,
#: 5, drops a burst's further SYNs, which their peers send again only after 1, 3,
#: 7, 15 then 31 seconds.
LISTEN_BACKLOG = 128


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY, bounded connections and an
    optional shared socket.

    With Nagle's algorithm and delayed ACKs every DIMSE round trip costs ~40 ms, so
    accepted sockets get ``TCP_NODELAY``.  When ``shared_socket`` is set (worker
    processes), the server accepts from that already listening, non-blocking socket
    instead of binding its own; a connection another worker took first is skipped.

    With ``limits`` (:func:`start`), connections that have not sent their
    A-ASSOCIATE-RQ are held apart and the oldest beyond PACS_MAX_PENDING_CONNECTIONS
    closed (:meth:`process_request`), and associations are admitted once their request
    has arrived (:func:`_admit`).  Reads of an accepted socket are bounded by
    ``receive_timeout`` (ARTIM until the request arrives, then the network timeout),
    sends by the DIMSE timeout.
    """

    #: The seam serves this server's associations (:func:`pacs.dimse.seam.install`).
    uses_seam: bool = False
    #: The backlog of a socket the server binds itself (socketserver's name).
    request_queue_size = LISTEN_BACKLOG
    shared_socket: socket.socket | None = None
    #: The worker's connection and association limits; None: pynetdicom's own count.
    limits: ConnectionLimits | None = None
    #: Seconds a read of a newly accepted socket may wait for data (SO_RCVTIMEO).
    receive_timeout: float | None = None
    #: The DICOM TLS port's context; None: plain TCP.
    tls: ssl.SSLContext | None = None
    #: Seconds a TLS handshake may take (ARTIM).
    handshake_timeout: float = 10.0
    #: Failed TLS handshakes, for the log.
    handshake_failures: _Counted
    #: Connections lost for want of descriptors (accept, the association's wake-up),
    #: and threads that could not be started for a connection, for the log.
    descriptor_failures: _Counted
    thread_failures: _Counted
    #: What the handshake left of ARTIM, per connection thread.
    artim_left: ArtimLeft
    #: The association rejections of this server, for the log.
    rejections: _Rejections
    #: The customers this server started and stops (:func:`start` given services).
    customers: Customers | None = None
    #: Seconds this worker waits before accepting, per connection it already serves
    #: (:meth:`get_request`); 0 when no other worker accepts from the socket.
    accept_deferral: float = 0.0

    def server_bind(self) -> None:
        """Use the shared socket when there is one."""
        if self.shared_socket is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self.shared_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """The shared socket already listens."""
        if self.shared_socket is None:
            super().server_activate()

    def shutdown(self) -> None:
        """Stop serving (pynetdicom's version expects servers made by start_server)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def server_close(self) -> None:
        """Close our handle; a shared socket must not be shut down for the others."""
        if self.shared_socket is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    #: Monotonic time of the last full collection (see :meth:`service_actions`).
    _last_collect: float = 0.0

    def service_actions(self) -> None:
        """The counts of association rejections and of connections lost for want of
        resources not logged yet, and a full garbage collection now and then, only
        while no association runs.

        pynetdicom's version runs a full ``gc.collect()`` every 60 polls or requests,
        holding the GIL for tens of milliseconds in the middle of whatever transfer is
        running (py-spy caught it stalling C-MOVEs).  Finished associations are
        reference cycles (each holds an eventfd until collected), so they are still
        collected: by Python's own collector, and here once idle.
        """
        self.rejections.flush()
        self.descriptor_failures.flush()
        self.thread_failures.flush()
        now = time.monotonic()
        if now - self._last_collect >= IDLE_COLLECT_SECONDS and not self.active_associations:
            self._last_collect = now
            gc.collect()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, then set TCP_NODELAY and bound blocked sends to the DIMSE timeout and
        blocked reads to :attr:`receive_timeout` (BlockingIOError: another worker took
        the connection).  On the TLS port the socket is wrapped, not yet hand-shaken:
        that is the connection thread's work (:meth:`finish_request`), never the
        acceptor's, whom a silent peer would otherwise hold."""
        self._defer_to_less_busy_workers()
        try:
            client, address = super().get_request()
        except OSError as exc:  # socketserver skips the connection
            if exc.errno in OUT_OF_RESOURCES:
                self._short_of_descriptors(exc)
            raise
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limits.bound_sends(client, self.ae.dimse_timeout)
        limits.set_receive_timeout(client, self.receive_timeout)
        if self.tls is not None:
            client = self.tls.wrap_socket(client, server_side=True,
                                          do_handshake_on_connect=False)
        return client, address

    def _short_of_descriptors(self, exc: OSError) -> None:
        """An accept failed for want of descriptors (or memory): close the oldest
        connection that has sent no A-ASSOCIATE-RQ, whose descriptor its DUL thread
        then frees, and pause before the next accept.

        Connections a flood holds open in silence are what fills the descriptor table;
        a real peer sends its request at once and is never the oldest (as for
        PACS_MAX_PENDING_CONNECTIONS).  Running associations are not touched.
        """
        self._make_room(exc)
        time.sleep(ACCEPT_PAUSE)

    def _make_room(self, exc: OSError) -> None:
        """Count a connection lost for want of descriptors, and close the oldest
        connection that has sent no A-ASSOCIATE-RQ."""
        self.descriptor_failures.count(exc)
        if self.limits is not None:
            oldest = self.limits.evict_oldest()
            if oldest is not None:
                _close_pending(oldest)

    def _defer_to_less_busy_workers(self) -> None:
        """Wait a moment, longer the more connections this worker serves, before
        accepting.

        Every worker wakes for a new connection and the first to accept takes it; the
        associations of one worker share its interpreter (one core at most).  Four
        modalities connecting at once were split three to one as often as two to two,
        and the busier worker then capped the whole node.  A worker that waits
        :data:`accept_deferral` per connection it serves lets a less busy one accept
        first; alone, or when the others are as busy, it accepts a few milliseconds
        later.
        """
        if self.accept_deferral > 0 and self.limits is not None:
            load = self.limits.load
            if load:
                time.sleep(min(load, DEFERRAL_STEPS) * self.accept_deferral)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake first, then the association
        (pynetdicom's); handshake and A-ASSOCIATE-RQ share one ARTIM (the request gets
        at least :data:`ARTIM_AFTER_HANDSHAKE`)."""
        if isinstance(request, ssl.SSLSocket):
            started = time.monotonic()
            try:
                tls.handshake(request, self.handshake_timeout)
            except (OSError, ValueError) as exc:  # ValueError: closed under us
                host = (client_address[0] if isinstance(client_address, tuple)
                        else client_address)
                reason = getattr(exc, "reason", None) or exc or type(exc).__name__
                self.handshake_failures.count(f"the last from {host}: {reason}")
                self.shutdown_request(request)
                return
            took = time.monotonic() - started
            self.artim_left.seconds = max(ARTIM_AFTER_HANDSHAKE,
                                          self.handshake_timeout - took)
        for attempt in range(ROOM_ATTEMPTS):
            try:
                super().finish_request(request, client_address)
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES or attempt == ROOM_ATTEMPTS - 1:
                    raise  # handle_error: counted for the log, room made for the next
                # Accepted with the last descriptor, the association's own (its
                # wake-up) could not be had; nothing of the peer's request is read
                # yet.  The oldest silent connection is closed (its DUL thread frees
                # its descriptor as it sees the end) and this peer is tried again.
                self._make_room(exc)
                time.sleep(ROOM_WAIT)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Register the connection as pending, closing the oldest pending ones beyond
        the limit, then serve it in its own thread (pynetdicom's)."""
        if self.limits is not None:
            closing = self.limits.connected(request)
            for old in closing:
                _close_pending(old)
            if closing:
                self._report_closed(len(closing))
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:
            if not cannot_start_thread(exc):
                raise
            # No thread to read its request: closed at once, and the peer may retry.
            self.thread_failures.count(exc)
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection the server gives up on (no thread, a failed handshake,
        its thread failed): pending no more from now on, not only once the next
        connection finds its socket closed (a peer sees the end of the stream before
        the descriptor is released)."""
        if self.limits is not None:
            self.limits.forget(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's thread failed (socketserver closes the connection): a thread
        that could not be started (the association's own, started from it) or a
        descriptor that could not be had (the association's wake-up) is counted for
        the log, not written there as a traceback per connection; anything else is
        socketserver's report."""
        exc = sys.exc_info()[1]
        if cannot_start_thread(exc):
            assert exc is not None
            self.thread_failures.count(exc)
        elif isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self._make_room(exc)
        else:
            super().handle_error(request, client_address)

    #: Pending connections closed since the last report, and when that was.
    _closed_unreported: int = 0
    _closed_reported_at: float = -EVICTION_REPORT_SECONDS

    def _report_closed(self, count: int) -> None:
        """Log pending connections closed for room, at most every
        :data:`EVICTION_REPORT_SECONDS` (a flood of connections is not a flood of logs)."""
        self._closed_unreported += count
        now = time.monotonic()
        if now - self._closed_reported_at >= EVICTION_REPORT_SECONDS:
            log.warning("Closed %d connection(s) that had sent no A-ASSOCIATE-RQ: "
                        "PACS_MAX_PENDING_CONNECTIONS (%d per worker) reached",
                        self._closed_unreported, self.limits.max_pending if self.limits else 0)
            self._closed_unreported = 0
            self._closed_reported_at = now


def _close_pending(sock: socket.socket) -> None:
    """End a pending connection.  Shut down, not closed: its DUL thread still selects
    on the descriptor, sees the end of the stream and closes it (AA-5).  The socket's
    own ``shutdown`` even for TLS: ``SSLSocket.shutdown`` would drop the TLS state
    under a handshake running in the connection's thread."""
    with contextlib.suppress(OSError):  # closed meanwhile
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _holds_its_place(assoc: Any) -> bool:
    """An admitted association counts until it is released or rejected (its thread may
    take a moment longer to end: a peer that re-associates at once after its release
    must find its place free), otherwise until both its threads have ended.

    An aborted association is not over while its DUL thread still runs: aborting it
    from the association thread (the network timeout) only queues an A-ABORT for a DUL
    that may be blocked reading the peer's socket, and the association thread then
    waits for it.  Freed at the abort, its place went to the next association while
    both threads and the socket stayed, and a peer that stalled inside its PDUs could
    hold any number of them.  With the seam every read and write of a PDU has a
    deadline (:func:`pacs.dimse.seam.reactor.pace`), so such a DUL ends within it;
    pynetdicom's own reads, bounded per ``recv`` only, may keep it (and so the place)
    for as long as the peer keeps sending a byte now and then.
    """
    if assoc.is_released or assoc.is_rejected:
        return False
    return bool(assoc.is_alive() or assoc.dul.is_alive())


class ArtimLeft(threading.local):
    """What a TLS handshake left of ARTIM, for the association its thread goes on to
    serve (:meth:`NodeServer.finish_request` sets it, :func:`_start_artim` reads it:
    one thread, one connection)."""

    seconds: float | None = None


#: The least time an A-ASSOCIATE-RQ gets after a handshake that took nearly all of ARTIM.
ARTIM_AFTER_HANDSHAKE = 0.5


def _start_artim(event: Any, seconds: float, left: ArtimLeft | None = None) -> None:
    """EVT_CONN_OPEN: the acceptor's ARTIM timer (PS3.8 9.1.2, 9.1.3) runs for
    PACS_ARTIM_TIMEOUT, less what the connection's TLS handshake took (``left``).

    pynetdicom's ARTIM timer and the acceptor's wait for the A-ASSOCIATE-RQ both use the
    association's ACSE timeout; set here for accepted associations only (this AE's
    own requests to C-MOVE destinations keep the DIMSE timeout).
    """
    remaining = left.seconds if left is not None else None
    event.assoc.acse_timeout = seconds if remaining is None else remaining


#: A-ASSOCIATE-RJ when the node is full (PS3.8 9.3.4): rejected-transient, by the
#: service provider (presentation related), local-limit-exceeded.
REJECT_FULL = (0x02, 0x03, 0x02)
#: A-ASSOCIATE-RJ when the calling AE title is not the one the client certificate
#: names, or one the access rules refuse (PS3.8 9.3.4): rejected-permanent, by the
#: service user, calling AE title not recognized.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
#: A-ASSOCIATE-RJ when no customer is called by the called AE title (PS3.8 9.3.4):
#: rejected-permanent, by the service user, called AE title not recognized.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
#: A-ASSOCIATE-RJ when the requestor's Maximum Length is below
#: :data:`pacs.dimse.limits.MIN_PEER_PDU` (PS3.8 9.3.4): rejected-permanent, by the
#: service user, no reason given (the standard has no reason for it).
REJECT_PEER_PDU = (0x01, 0x01, 0x01)

#: A-ASSOCIATE-RJ of a request whose presentation context items break PS3.8 9.3.2.2:
#: rejected-permanent, by the service user, no reason given.
REJECT_MALFORMED = (0x01, 0x01, 0x01)


def contexts_refusal(contexts: Any) -> str | None:
    """Why the presentation context items of an A-ASSOCIATE-RQ cannot be negotiated
    (``None``: they can): there is one at least (PS3.8 9.3.2: "one or more
    Presentation Context Items"; accepted without any, the association could carry
    nothing, and its A-ASSOCIATE-AC would hold none, which 9.3.3 forbids too), and
    each needs one Abstract Syntax and at least one Transfer Syntax, its ID odd and
    unlike the others' (PS3.8 9.3.2.2).  pynetdicom's negotiation ends its thread with
    an error on such an item, after the association was admitted."""
    if not contexts:
        return "no presentation context item"
    seen: set[int] = set()
    for context in contexts or ():
        number = context.context_id
        if not isinstance(number, int) or number % 2 == 0 or number in seen:
            return "a presentation context ID that is even, missing or repeated"
        seen.add(number)
        if not context.abstract_syntax or not context.transfer_syntax:
            return "a presentation context without its abstract or transfer syntax"
    return None


#: The handlers of each customer by the called AE title that chooses it
#: (:meth:`pacs.dimse.customers.Customers.bindings`).
Bindings = dict[str, list[tuple[Any, ...]]]
#: The access rules and audit trail of each customer by called AE title
#: (:meth:`pacs.dimse.customers.Customers.policies`).
Policies = dict[str, tuple[AccessPolicy, AuditTrail]]


def _admit(event: Any, connection_limits: ConnectionLimits, bindings: Bindings,
           policies: Policies, owners: Mapping[str, str], rejections: _Rejections) -> None:
    """EVT_REQUESTED: admit the association or reject it, in one handler: who it is
    first (its called AE title, its client certificate, the customer's access rules),
    then the node's limits; bind an admitted one to its customer.

    The refusals, each an A-ASSOCIATE-RJ (PS3.8 9.3.4), in their order:

    1. the called AE title is none of a customer's (``bindings``):
       :data:`REJECT_CALLED_AE`;
    2. on the TLS port with client certificates (``PACS_DIMSE_TLS_CA``) the calling AE
       title is not the one the certificate names
       (:func:`pacs.dimse.tls.identity_refusal`): :data:`REJECT_CALLING_AE`, and a
       Security Alert as for 3;
    3. the called customer's access rules (``policies``) give the calling AE no rights,
       know it at another address, or as one that associates over TLS only
       (:meth:`pacs.core.access.AccessPolicy.association_refusal`):
       :data:`REJECT_CALLING_AE`, and a Security Alert in the customer's audit trail
       (PS3.15 A.5.3.11, Node Authentication; a minor failure: the attempt was
       stopped);
    4. the requestor's Maximum Length is below the node's floor
       (:func:`pacs.dimse.limits.peer_pdu_refusal`): :data:`REJECT_PEER_PDU`; its
       presentation context items cannot be negotiated (:func:`contexts_refusal`):
       :data:`REJECT_MALFORMED`;
    5. the node's limits (:class:`pacs.dimse.limits.ConnectionLimits`: per worker, per
       source address and, with several customers, per customer, ``owners`` naming
       each called AE title's) are reached: :data:`REJECT_FULL`.

    Each refusal of 2-3 is a Security Alert of the audit trail; the log has the first
    :data:`REJECTIONS_LOGGED` refusals of every :data:`EVICTION_REPORT_SECONDS` and
    one line counting the rest (``rejections``, one per server): a peer that
    associates as fast as it can must not fill the log's disk.

    Only an association that passed 1-4 is counted against the limits: a refused one
    never takes a place, so AEs without rights calling from an address cannot use up
    its places for the AEs with rights there, and are told they are not recognized
    (permanent) rather than that the node is full (transient, an invitation to retry).

    pynetdicom counts every acceptor thread against ``ae.maximum_associations``,
    connections that never sent an A-ASSOCIATE-RQ included, so a few idle sockets
    locked out every real peer.  The node sets that count out of reach
    (:data:`UNCOUNTED`) and admits an association here instead, once its request has
    arrived.  A refusal is sent from this handler, which pynetdicom allows (it
    negotiates only a request this event neither rejected nor aborted); ``kill`` waits
    for the DUL to write it before the connection closes.  An admitted association
    gets its customer's handlers (:mod:`pacs.dimse.customers`), answers with the title
    it was called by, and its connection's reads are bounded by the network timeout
    from now on, instead of ARTIM.
    """
    assoc = event.assoc
    sock = assoc.dul.socket
    raw = sock.socket if sock is not None else None
    try:
        host = str(assoc.requestor.address)
    except Exception:  # noqa: BLE001 - no address information
        host = ""
    calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
    called = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
    refused = _identity_refusal(raw, calling, called, host, bindings, policies)
    if refused is None:
        small = limits.peer_pdu_refusal(assoc.requestor.maximum_length)
        refused = (REJECT_PEER_PDU, small) if small is not None else None
    if refused is None:
        malformed = contexts_refusal(getattr(assoc.requestor.primitive,
                                             "presentation_context_definition_list", ()))
        refused = (REJECT_MALFORMED, malformed) if malformed is not None else None
    if refused is not None:
        connection_limits.forget(raw)
    else:
        full = connection_limits.admit(assoc, raw, host, owners[called])
        refused = (REJECT_FULL, full) if full is not None else None
    if refused is not None:
        rejections.rejected(f"{host or '?'} ({calling.strip()}): {refused[1]}")
        assoc.acse.send_reject(*refused[0])
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()
        return
    assoc.acceptor.ae_title = called
    for bound in bindings[called]:
        assoc.bind(*bound)
    if raw is not None:
        limits.set_receive_timeout(raw, assoc.network_timeout)


#: An A-ASSOCIATE-RJ's (result, source, reason) and why it is sent.
Refusal = tuple[tuple[int, int, int], str]


def _identity_refusal(raw: Any, calling: str, called: str, host: str, bindings: Bindings,
                      policies: Policies) -> Refusal | None:
    """Refusals 1-3 of :func:`_admit` (who the association is), ``None``: none."""
    if called not in bindings:
        return REJECT_CALLED_AE, f"called AE title {called!r} is not one this node serves"
    policy, trail = policies[called]
    refusal = tls.identity_refusal(raw, calling) or policy.association_refusal(
        calling, host, secure=tls.is_secure(raw), certificate=tls.peer_fingerprint(raw))
    if refusal is None:
        return None
    _security_alert(trail, calling, host, refusal)
    return REJECT_CALLING_AE, refusal


def _security_alert(trail: AuditTrail, calling: str, host: str, refusal: str) -> None:
    """A refused association in the customer's audit trail, before the peer hears of
    it (PS3.15 A.5.3.11, Node Authentication, minor failure)."""
    if not trail.enabled:
        return
    try:
        trail.security_alert(audit.APPLICATION_SERVER, audit.NODE_AUTHENTICATION,
                             f"association rejected: {refusal}", audit.MINOR_FAILURE,
                             [Participant(calling.strip() or "(none)", True, address=host)])
    except Exception:  # the rejection stands whatever happens to its event
        log.error("audit trail: the event of a rejected association could not be made",
                  exc_info=True)


def connection_limits_of(settings: Settings, customers: int = 1) -> ConnectionLimits:
    """One worker's connection and association limits (shared by its servers), for
    ``customers`` customers: with more than one, each may hold at most
    ``PACS_CUSTOMER_ASSOCIATION_SHARE`` of the worker's associations (at least one)."""
    shared = customers > 1 and settings.max_associations > 0 and \
        settings.customer_association_share < 1
    # The epsilon: 100 * 0.29 is 28.999... in binary, and its share is 29 places.
    per_customer = max(1, math.floor(settings.max_associations
                                     * settings.customer_association_share + 1e-9)
                       ) if shared else 0
    return ConnectionLimits(
        settings.max_associations, settings.max_associations_per_host,
        settings.max_pending_connections, settings.max_object_bytes,
        alive=_holds_its_place, max_per_customer=per_customer,
        receive_bytes=settings.dimse_receive_bytes,
        customer_share=settings.customer_association_share)


def start(served: Services | Customers, address: tuple[str, int] | None = None,
          shared_socket: socket.socket | None = None, *,
          tls_context: ssl.SSLContext | None = None,
          connection_limits: ConnectionLimits | None = None) -> NodeServer:
    """Start a non-blocking SCP in this process; stop it with ``shutdown()``.

    Parameters
    ----------
    served : Services or Customers
        The core the handlers call: one customer's services (called by its settings'
        AE title; the server starts and stops its storage commitment reporter), or
        the customers of a worker, whose reporters the caller starts and stops.
    address : (host, port), optional
        Where to listen; the settings' address and (plain or TLS) port by default.
    shared_socket : socket.socket, optional
        An already listening socket to accept from (worker processes).
    tls_context : ssl.SSLContext, optional
        Serve DICOM TLS with this context (:func:`pacs.dimse.tls.server_context`).
    connection_limits : ConnectionLimits, optional
        Limits shared with the worker's other server; its own by default.
    """
    owned = isinstance(served, Services)
    customers = Customers.single(served) if isinstance(served, Services) else served
    settings = customers.settings
    patched = seam.install(settings.dimse_seam)
    # The seam writes responses from the association's thread while the DUL thread
    # reads the socket; an OpenSSL connection must not be used by two threads at once,
    # so TLS associations take pynetdicom's public path (the DUL thread alone uses the
    # socket), with the seam's bounded reactor still under it.
    uses_seam = patched and tls_context is None
    port = settings.dimse_tls_port if tls_context is not None else settings.dimse_port
    address = address or (settings.bind_address, port)
    connection_limits = connection_limits or connection_limits_of(settings,
                                                                  len(customers.served))
    artim_left = ArtimLeft()
    rejections = _Rejections()
    deferral = ACCEPT_DEFERRAL if shared_socket is not None and \
        number_of_workers(settings) > 1 else 0.0
    server_class = type("BoundNodeServer", (NodeServer,), {
        "shared_socket": shared_socket, "uses_seam": uses_seam, "limits": connection_limits,
        "accept_deferral": deferral,
        "receive_timeout": settings.artim_timeout, "tls": tls_context,
        "handshake_timeout": settings.artim_timeout, "handshake_failures": _Counted(
            "DICOM TLS handshake(s) failed"),
        "descriptor_failures": _Counted(
            "no descriptor for a DIMSE connection (the oldest that has sent no "
            "A-ASSOCIATE-RQ closed for room)"),
        "thread_failures": _Counted("cannot start a thread for a DIMSE connection "
                                     "(closed)"),
        "artim_left": artim_left, "rejections": rejections,
        "customers": customers if owned else None})
    ae = make_ae(settings)
    ae.destination_tls = tls.client_context(settings, any(
        policy.any_over_tls for policy, _trail in customers.policies().values()))
    # Associations are admitted by the limits once their request has arrived (_admit);
    # pynetdicom's own count, of every acceptor thread including connections that sent
    # nothing yet, must never refuse first.
    ae.maximum_associations = UNCOUNTED
    # Each customer's handlers are bound to an association once admitted (_admit).
    evt_handlers = [*handlers.common(uses_seam),
                    (evt.EVT_CONN_OPEN, _start_artim, [settings.artim_timeout, artim_left]),
                    # The requestor is idle from its final response on, not before.
                    (evt.EVT_DIMSE_SENT, seam.answered),
                    (evt.EVT_REQUESTED, _admit,
                     [connection_limits, customers.bindings(uses_seam),
                      customers.policies(), customers.owners(), rejections]),
                    # C-GET requestors' SCP-role storage contexts: a syntax every
                    # stored object can be sent in, where one was proposed.
                    (evt.EVT_REQUESTED, contexts.prefer_sendable)]
    server = ae.make_server(address, evt_handlers=evt_handlers,
                            contexts=contexts.CheapCopyContexts(ae.supported_contexts),
                            server_class=server_class)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="pacs-dimse-tls-acceptor" if tls_context
                              else "pacs-dimse-acceptor",
                              daemon=True)
    thread.start()
    if owned:
        customers.start()
    return server  # type: ignore[return-value]


def stop(*servers: NodeServer, drain: float = DRAIN_SECONDS) -> None:
    """Stop accepting, close the connections that have sent no A-ASSOCIATE-RQ, let
    established associations finish (all servers together, within ``drain``), then
    abort the rest, and stop delivering storage commitment results (those not delivered
    wait in the queue).

    A closed pending connection's thread may go on waiting for its request until ARTIM
    (pynetdicom's own wait, without the seam): it holds nothing and is not waited for.
    """
    for server in servers:
        server.shutdown()
        if server.limits is not None:
            for sock in server.limits.drop_pending():
                _close_pending(sock)
    deadline = time.monotonic() + drain
    while (any(assoc.is_established for server in servers
               for assoc in server.active_associations)
           and time.monotonic() < deadline):
        time.sleep(0.05)
    for server in servers:
        for assoc in server.active_associations:
            assoc.abort()
        if server.customers is not None:
            server.customers.stop()


class Listeners:
    """The listening sockets the workers share (non-blocking, see :class:`NodeServer`):
    the plain port's and the TLS port's, each ``None`` when turned off (port 0)."""

    def __init__(self, settings: Settings) -> None:
        self.plain: socket.socket | None = None
        self.tls: socket.socket | None = None
        try:
            self.plain = _listen(settings, settings.dimse_port)
            self.tls = _listen(settings, settings.dimse_tls_port)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for sock in (self.plain, self.tls):
            if sock is not None:
                sock.close()


def _listen(settings: Settings, port: int) -> socket.socket | None:
    if not port:
        return None
    sock = listening_socket(settings.bind_address, port, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _worker(settings: Settings, served: list[tuple[tuple[str, ...], Settings]],
            listeners: Listeners, ready: Any, parent: int) -> None:
    """One worker process: its own services per customer (``served``: each customer's
    called AE titles and settings), serving until SIGTERM or SIGINT, or until its
    ``parent`` (``pacs serve``) is gone."""
    stopping = threading.Event()
    stop_on_signals(stopping)
    # pacs serve checked the stores.  One worker: one set of services, one storage
    # commitment reporter and one audit per customer.
    customers = Customers([(titles, build(own, check_store=False)) for titles, own in served],
                          settings)
    # What start-up created lives as long as the process: keep it out of every later
    # collection, so that the collector's full passes stay short (gc.freeze docs).
    # Before serving, so that no association's objects are frozen with it.
    gc.collect()
    gc.freeze()
    shared = connection_limits_of(settings, len(served))  # one worker, one set of limits
    servers = []
    if listeners.plain is not None:
        servers.append(start(customers, shared_socket=listeners.plain,
                             connection_limits=shared))
    if listeners.tls is not None:
        servers.append(start(customers, shared_socket=listeners.tls,
                             tls_context=tls.server_context(settings),
                             connection_limits=shared))
    customers.start()
    stop_when_orphaned(stopping.set, "DIMSE worker", parent)
    ready.release()
    # Poll: a signal the kernel hands to another thread of this process would not
    # wake a main thread blocked in an untimed wait, and the stop would be lost.
    while not stopping.wait(0.5):
        pass
    stop(*servers)
    customers.stop()
    customers.close()


def number_of_workers(settings: Settings) -> int:
    """The configured worker count, or one per CPU."""
    return worker_count(settings.dimse_workers)


#: A worker that dies sooner than this after its start is restarted after a delay that
#: doubles up to :data:`RESPAWN_MAX_DELAY` (it may fail again at once: a broken index).
RESPAWN_QUICK_DEATH = 10.0
RESPAWN_MAX_DELAY = 30.0


class _Respawn:
    """When a dead worker of one slot may be replaced: at once after a long life,
    with a growing delay after deaths in quick succession (no log flood, no busy loop)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.delay = 0.0
        self.died: float | None = None

    def due(self, process: multiprocessing.process.BaseProcess) -> bool:
        """True when ``process`` (dead) may be replaced now."""
        now = time.monotonic()
        if self.died is None:
            self.died = now
            quick = now - self.start < RESPAWN_QUICK_DEATH
            self.delay = min(max(self.delay * 2, 0.5), RESPAWN_MAX_DELAY) if quick else 0.0
        return now - self.died >= self.delay

    def started(self) -> None:
        """A replacement has just been started."""
        self.start = time.monotonic()
        self.died = None

    def failed(self) -> None:
        """A replacement could not be started: as a death right after its start."""
        self.start = time.monotonic()
        self.died = None


def replace_dead(workers: list[multiprocessing.process.BaseProcess],
                 respawn: list[_Respawn],
                 spawn: Callable[[], multiprocessing.process.BaseProcess]) -> None:
    """Start a replacement for each dead worker whose delay has passed.

    A replacement that cannot be forked (EAGAIN at RLIMIT_NPROC or a cgroup's pids
    limit, ENOMEM) leaves the dead worker in its slot, to be tried again after the
    slot's next, longer delay: the other workers and the rest of the node go on (the
    error ended ``pacs serve`` as a whole).
    """
    for i, process in enumerate(workers):
        if process.is_alive() or not respawn[i].due(process):
            continue
        log.error("DIMSE worker %d exited with %s; restarting", process.pid,
                  process.exitcode)
        try:
            workers[i] = spawn()
        except OSError as exc:
            log.error("cannot start a DIMSE worker: %s; trying again later", exc)
            respawn[i].failed()
            continue
        respawn[i].started()


def run_workers(settings: Settings, stopping: threading.Event,
                on_ready: Callable[[], None] | None = None) -> None:
    """Serve DIMSE from worker processes until ``stopping`` is set.

    A worker that dies is replaced; on stop every worker gets SIGTERM and is awaited, so
    no running C-STORE is cut short between its durable write and its response.
    """
    served = [(c.ae_titles, c.settings) for c in customers_of(settings)]
    listeners = Listeners(settings)
    context = multiprocessing.get_context("fork")
    count = number_of_workers(settings)
    ready = context.Semaphore(0)

    def spawn() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(settings, served, listeners, ready,
                                                        os.getpid()),
                                  name="pacs-dimse", daemon=False)
        process.start()
        return process

    workers = [spawn() for _ in range(count)]
    for _ in range(count):
        ready.acquire(timeout=60)
    log.info("DIMSE %s listening on %s with %d worker(s), %s",
             ", ".join(title for titles, _ in served for title in titles),
             describe(settings), count,
             "through the pynetdicom seam" if settings.dimse_seam and seam.supported()
             else "pure pynetdicom (PACS_DIMSE_SEAM=off or another pynetdicom version)")
    if on_ready:
        on_ready()
    respawn = [_Respawn() for _ in workers]
    while not stopping.wait(0.5):
        replace_dead(workers, respawn, spawn)
    for process in workers:
        if process.is_alive():
            os.kill(process.pid or 0, signal.SIGTERM)
    for process in workers:
        process.join(DRAIN_SECONDS + 5)
        if process.is_alive():
            process.kill()
    listeners.close()


def describe(settings: Settings) -> str:
    """The DIMSE ports for the log: ``address:port`` (plain) and ``address:port (TLS)``."""
    ports = [f"{settings.bind_address}:{settings.dimse_port}"] if settings.dimse_port else []
    if settings.dimse_tls_port:
        clients = " with client certificates" if settings.dimse_tls_ca else ""
        ports.append(f"{settings.bind_address}:{settings.dimse_tls_port} (TLS{clients})")
    return " and ".join(ports)
