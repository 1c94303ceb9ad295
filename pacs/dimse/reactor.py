"""Blocking waits for pynetdicom's two association threads, instead of polling.

Why
---
Each pynetdicom association runs two threads that *poll*:

* the DUL thread (``DULServiceProvider.run_reactor``, dul.py) loops over "anything to
  send? anything on the socket (``select`` with timeout 0)? any state-machine event?",
  and sleeps ``_run_loop_delay`` (1 ms) when there was nothing;
* the association thread (``Association._run_reactor``, association.py), which runs
  the C-STORE handler, sleeps 1 ms and then looks for a complete DIMSE message.

While a handler parses and stores an instance, the two loops wake about a thousand
times a second each and take the GIL from it; and every message waits up to a
millisecond in each loop before anyone looks at it.  A profile of the node during ingest
(docs/benchmarks.md) had more than half of the samples in these loops.

What this module changes
------------------------
The same loops, with the sleeps replaced by blocking waits that end exactly when there
is work:

* the DUL thread blocks in ``select()`` on the association's socket *and* an eventfd
  (a pipe where there is none).  Anything that gives the DUL work from another thread -
  a primitive to send (``to_provider_queue``), a state-machine event
  (``event_queue``), a request to stop (``kill_dul``/``stop_dul``) - writes to that fd.
  The select timeout is the ARTIM timer's remaining time (capped), so timer events
  still fire on time;
* the association thread blocks on a :class:`threading.Event` that the DUL sets after
  a state-machine action that may concern it (a complete DIMSE message, A-RELEASE or
  A-ABORT, the DUL stopping) with a timeout of the network idle timer's remaining time
  (capped), so the network timeout still fires.  While it waits it counts as paused,
  so ``send_c_*``/``release()`` from another thread need not wait for it.

Everything else - the state machine, PDU and DIMSE decoding, the order of the checks,
the abort path - is pynetdicom's own code, called unchanged.  The patch is applied to
the classes once per process by :func:`install` (called from
``pacs.dimse.server.configure_pynetdicom``) and only to the pynetdicom version it was
written against; any other version keeps pynetdicom's polling loops.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)
# The loops' own messages keep pynetdicom's loggers (and so the level the node sets).
_dul_log = logging.getLogger("pynetdicom.dul")
_assoc_log = logging.getLogger("pynetdicom.association")

#: pynetdicom versions whose reactor loops this module reproduces.
SUPPORTED = ("3.0.",)
#: Longest blocking wait in seconds; timers are re-checked at least this often.
MAX_WAIT = 0.5

_installed = False
_install_lock = threading.Lock()


class _Waker:
    """A file descriptor that becomes readable when :meth:`wake` is called.

    The DUL thread closes it as it ends (:meth:`close`): a finished association is a
    reference cycle, and an eventfd left to the garbage collector stayed open for as
    long as a busy worker went without a full collection.  Other threads may still
    call :meth:`wake` after that (a late ``kill_dul``, a primitive queued during the
    stop); the lock makes such a call either land before the close or do nothing, never
    write into a descriptor number the process has reused meanwhile.
    """

    __slots__ = ("fd", "_write_fd", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._write_fd = self.fd
        else:  # pragma: no cover - non-Linux
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write_fd, False)

    def wake(self) -> None:
        with self._lock:
            if self._write_fd < 0:
                return  # closed: the DUL thread has ended, nothing to wake
            try:
                if self._write_fd == self.fd:
                    os.eventfd_write(self.fd, 1)
                else:  # pragma: no cover
                    os.write(self._write_fd, b"\0")
            except (BlockingIOError, OSError):
                pass  # already readable

    def drain(self) -> None:
        fd = self.fd  # only the DUL thread drains and closes: no race with close()
        if fd < 0:
            return
        try:
            if self._write_fd == fd:
                os.eventfd_read(fd)
            else:  # pragma: no cover
                os.read(fd, 4096)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close the descriptors; later calls of :meth:`wake` do nothing."""
        with self._lock:
            fds = {self.fd, self._write_fd} - {-1}
            self.fd = self._write_fd = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


class _WakingQueue(queue.Queue):
    """A queue that wakes the DUL thread whenever something is put on it."""

    def __init__(self, waker: _Waker) -> None:
        super().__init__()
        self._waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._waker.wake()


# -- the DUL thread ---------------------------------------------------------------------

_dul_init = DULServiceProvider.__init__
_dul_kill = DULServiceProvider.kill_dul


def _dul_init_patched(self: DULServiceProvider, assoc: Association) -> None:
    _dul_init(self, assoc)
    self._waker = _Waker()
    #: Set when the association thread has something to look at.
    self._assoc_wake = threading.Event()
    self.event_queue = _WakingQueue(self._waker)
    self.to_provider_queue = _WakingQueue(self._waker)
    #: While true, the socket's incoming side belongs to another thread
    #: (:func:`socket_lent`); the lock covers the DUL's own reads.
    self._socket_lent = False
    self._reader_lock = threading.Lock()


def _kill_dul_patched(self: DULServiceProvider) -> None:
    _dul_kill(self)
    self._waker.wake()


def _stop_dul_patched(self: DULServiceProvider) -> bool:
    """pynetdicom's ``stop_dul``, waking the reactor instead of waiting for its poll."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        self._waker.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()  # the reactor exits at its next look at _kill_thread
        return True
    return False


def _wait_for_work(self: DULServiceProvider) -> None:
    """Block until the socket is readable, something is queued, or a timer is due."""
    timeout = MAX_WAIT
    artim = self.artim_timer
    if artim._start_time is not None and artim._end_time is None and artim.timeout is not None:
        timeout = max(0.0, min(timeout, artim.remaining))
    fds = [self._waker.fd]
    sock: AssociationSocket | None = self.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None and sock._is_connected and not self._socket_lent:  # type: ignore[union-attr]
        pending = getattr(raw, "pending", None)  # SSL may hold data select cannot see
        if pending is not None and pending():
            return
        try:
            if raw.fileno() >= 0:
                fds.append(raw)  # type: ignore[arg-type]
        except OSError:
            pass
    try:
        select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        # A socket closed under us: the transport check reports it (Evt17).
        time.sleep(0.001)
    self._waker.drain()


def _read_transport(self: DULServiceProvider) -> bool:
    """pynetdicom's ``_is_transport_event`` unless the socket is lent out."""
    with self._reader_lock:
        if self._socket_lent:
            return False
        return bool(self._is_transport_event())


@contextmanager
def socket_lent(assoc: Association) -> Iterator[bool]:
    """Keep the DUL thread from reading ``assoc``'s socket for the block.

    A retrieve that writes its C-STORE requests straight to the socket
    (:mod:`pacs.dimse.wire`) reads their responses straight from it too: handing each
    response through the DUL thread, its PDU and DIMSE decoding and the message queue
    cost ~0.2 ms per sub-operation, most of the node's share of a CT C-MOVE once the
    destination's own time is taken out.  A read in progress finishes first (the lock);
    then the DUL only sends (an A-ABORT, for one) until the block ends.

    Yields False, and lends nothing, when the patched reactor is not installed; the
    caller then takes responses from the DIMSE queue as pynetdicom delivers them.
    """
    dul = assoc.dul
    lock = getattr(dul, "_reader_lock", None)
    if lock is None:
        yield False
        return
    with lock:
        dul._socket_lent = True
    try:
        yield True
    finally:
        dul._socket_lent = False
        dul._idle_timer.restart()  # the DUL saw no traffic meanwhile; there was some
        dul._waker.wake()


def give_back(assoc: Association) -> None:
    """End a :func:`socket_lent` early, before aborting the association: pynetdicom's
    ``abort()`` waits for the DUL to see the connection close, which it must read."""
    dul = assoc.dul
    if getattr(dul, "_socket_lent", False):
        dul._socket_lent = False
        dul._waker.wake()


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """``DULServiceProvider.run_reactor`` with the idle sleep replaced by a blocking wait.

    The checks and their order are pynetdicom 3.0's.
    """
    self._idle_timer.start()
    wake_assoc = self._assoc_wake
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif _read_transport(self):
                    self._idle_timer.restart()
            except Exception as exc:
                _dul_log.error("Exception in DUL.run(), aborting association")
                _dul_log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                _wait_for_work(self)
                continue
            self.state_machine.do_action(event)
            # Wake the association thread unless the action cannot concern it: an
            # outgoing P-DATA (Evt9) or a fragment of a message not yet complete.
            if event != "Evt9" and (event != "Evt10" or self.assoc.dimse.msg_queue.qsize()):
                wake_assoc.set()
    finally:
        wake_assoc.set()  # the association thread checks dul.is_alive()
        self._waker.close()  # nothing selects on it any more


# -- the association thread -------------------------------------------------------------

_assoc_kill = Association.kill


def _assoc_kill_patched(self: Association) -> None:
    wake = getattr(self.dul, "_assoc_wake", None)
    if wake is not None:
        self._kill = True
        wake.set()
    _assoc_kill(self)


def _assoc_run_reactor(self: Association) -> None:
    """``Association._run_reactor`` with the 1 ms sleep replaced by a blocking wait.

    The checks and their order are pynetdicom 3.0's.
    """
    wake: threading.Event = self.dul._assoc_wake
    self._is_paused = False
    idle = False
    while not self._kill:
        if idle:
            # Nothing happened last round: wait for the DUL (or the idle timer).
            # Waiting counts as paused, like the original's checkpoint wait.
            self._is_paused = True
            timeout = MAX_WAIT
            idle_timer = self.dul._idle_timer
            if idle_timer.timeout is not None:
                timeout = max(0.0, min(timeout, idle_timer.remaining))
            wake.wait(timeout)
            wake.clear()
            if self._kill:
                break
        idle = True

        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # A sender paused us between the wait and the line above and saw us paused:
            # it may already be waiting for its response, which we must not take.
            idle = False
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
            idle = False

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _assoc_log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _assoc_log.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _assoc_log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# -- the socket -------------------------------------------------------------------------

def _quickack(raw: Any) -> None:
    """Acknowledge at once (Linux ``TCP_QUICKACK``, reset by the kernel after use).

    A peer that leaves Nagle's algorithm on (pynetdicom as SCU, dcmtk without
    TCP_NODELAY=1) holds back the data set PDU of a request until the command PDU is
    acknowledged, and delayed ACKs make that ~40 ms per request.
    """
    try:
        raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except (OSError, AttributeError):
        pass


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
_QUICKACK = _quickack


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer.

    pynetdicom reads 4 KiB at a time and extends a bytearray (about 130 calls for a
    512x512 CT PDU); this reads as much as the kernel has into a buffer of the final
    size.  Same contract: blocks until ``nr_bytes`` are read or the peer closes, and
    returns what was read.
    """
    raw = self.socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        count = raw.recv_into(view[nr_read:])  # type: ignore[union-attr]
        if not count:
            view.release()
            del buffer[nr_read:]
            return buffer
        nr_read += count
    view.release()
    _QUICKACK(raw)
    return buffer


_ORIGINAL_RECEIVE_PDU = DULServiceProvider.receive_pdu

#: Seconds between looks at the transport while an acceptor waits for its request.
_REQUEST_POLL = 0.2


def _receive_pdu(self: DULServiceProvider, wait: bool = False,
                 timeout: float | None = None) -> Any:
    """``receive_pdu`` that stops waiting once the peer has closed the connection.

    An acceptor waits up to the ACSE timeout for the A-ASSOCIATE-RQ.  A peer that
    connects and closes at once (a port probe, a load balancer's health check) leaves
    nothing in the queue, so pynetdicom counted the connection as an active association
    for the whole timeout: a few probes filled PACS_MAX_ASSOCIATIONS and every real peer
    was refused.  Here the wait is cut into short slices and ends when the socket is
    closed (the DUL thread has ended).
    """
    if not wait or timeout is None or timeout <= _REQUEST_POLL:
        return _ORIGINAL_RECEIVE_PDU(self, wait, timeout)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        primitive = _ORIGINAL_RECEIVE_PDU(self, True, max(0.0, min(_REQUEST_POLL, remaining)))
        if primitive is not None or remaining <= _REQUEST_POLL:
            return primitive
        # The DUL thread ends when the transport closes (AA-5 in Sta2): nothing more
        # can arrive.
        if not self.is_alive():
            return _ORIGINAL_RECEIVE_PDU(self, False, None)


# -- installation -----------------------------------------------------------------------

def supported() -> bool:
    """True when the installed pynetdicom is a version this module reproduces."""
    return pynetdicom.__version__.startswith(SUPPORTED)


def install() -> bool:
    """Patch pynetdicom's classes once per process; return whether they are patched.

    Associations created afterwards use the blocking reactors (client associations of
    this process too).  With an unsupported pynetdicom version nothing is changed.
    """
    global _installed
    with _install_lock:
        if _installed:
            return True
        if not supported():
            log.warning("pynetdicom %s: keeping its polling reactor (written for %s)",
                        pynetdicom.__version__, ", ".join(SUPPORTED))
            return False
        DULServiceProvider.__init__ = _dul_init_patched  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _kill_dul_patched  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _stop_dul_patched  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        Association.kill = _assoc_kill_patched  # type: ignore[method-assign]
        AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
        DULServiceProvider.receive_pdu = _receive_pdu  # type: ignore[method-assign]
        _installed = True
        return True
