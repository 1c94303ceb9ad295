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
had more than half of its samples in these loops.

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
  so ``send_c_*``/``release()`` from another thread need not wait for it.  Resuming
  from the pause checkpoint, it looks at the checkpoint again before it takes a
  message: a ``send_c_*`` that cleared it while the thread was still waking up (its
  ``_is_paused`` still True) is waiting for its response, which pynetdicom's own loop
  would take as a request ("Received unexpected C-STORE service message"), leaving
  the sender without an answer until the DIMSE timeout.

The receive path is bounded against hostile peers (:mod:`pacs.dimse.limits`):

* a PDU's declared length is checked against its type's ceiling before any of its body
  is read (:func:`_read_pdu_data`; P-DATA-TF: the Maximum Length this side announced,
  PS3.8 D.1), and buffers grow with the bytes that arrive (:func:`_socket_recv`);
* a PDU must arrive whole within its time (:func:`pace`: the network timeout, longer
  for a large PDU that keeps arriving), and a write be taken whole by the peer within
  the same (:func:`_socket_send`); a PDU that does not is answered with an A-ABORT and
  the connection closed, so no peer holds the DUL thread by sending or reading a byte
  now and then;
* DIMSE message buffers are capped: the command set, and on a node's association the
  data set at PACS_MAX_OBJECT_BYTES (:func:`_receive_primitive`).

Another thread may borrow the socket (:func:`socket_lent`) and give back bytes it read
of something it does not serve (:func:`hand_back`): the DUL reads those before the
socket (:func:`_take`).

When the association thread has nothing to do it runs the work of :data:`IDLE_WORK`
(:mod:`pacs.dimse.seam.notify`: a report waiting to be sent on the association) at
that message boundary; :func:`quiet_for` says how long no PDU has crossed the socket,
and :func:`writes_paused` keeps the DUL from writing while another thread does.

Everything else - the state machine, PDU and DIMSE decoding, the order of the checks,
the abort path - is pynetdicom's own code, called unchanged.  The patch is applied to
the classes once per process by :func:`patch`, which :func:`pacs.dimse.seam.install`
calls only for the pynetdicom version the seam was written and tested against; any
other version keeps pynetdicom's polling loops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from pacs.core.offload import cannot_start_thread
from pacs.dimse import limits

log = logging.getLogger(__name__)
# The loops' own messages keep pynetdicom's loggers (and so the level the node sets).
_dul_log = logging.getLogger("pynetdicom.dul")
_assoc_log = logging.getLogger("pynetdicom.association")

#: Events of the state machine that stand for a primitive of the local user, queued
#: on ``to_provider_queue`` (PS3.8 Table 9-10): A-ASSOCIATE request and responses,
#: P-DATA, A-RELEASE request and response, A-ABORT.
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def failure(exc: BaseException) -> str:
    """An exception in one line for the log: its type and where it was raised, not
    its message (which may quote what a peer sent) nor its traceback (DEBUG)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" \
        if frames else ""
    return f"{type(exc).__name__}{where}"

#: Longest blocking wait in seconds; timers are re-checked at least this often.
MAX_WAIT = 0.5


class _Waker:
    """A file descriptor that becomes readable when :meth:`wake` is called.

    The DUL thread closes it as it ends (:meth:`close`): a finished association is a
    reference cycle, and an eventfd left to the garbage collector stayed open for as
    long as a busy worker went without a full collection.  Other threads may still
    call :meth:`wake` after that (a late ``kill_dul``, a primitive queued during the
    stop); the lock makes such a call either land before the close or do nothing, never
    write into a descriptor number the process has reused meanwhile.
    """

    __slots__ = ("_lock", "_write_fd", "fd")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd = self._write_fd = -1  # closed, should the descriptor not be had (EMFILE)
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
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


class _WakingQueue(queue.Queue[Any]):
    """A queue that wakes the DUL thread whenever another thread puts something on it.

    ``reader`` is the thread that takes from it without blocking before each wait of
    the DUL loop (:func:`_dul_run_reactor` sets it for ``event_queue``): what that
    thread puts itself (the event of each PDU it reads) is taken before it waits, so
    waking it would only cost an eventfd write, a read and one more turn of the loop
    per PDU.
    """

    def __init__(self, waker: _Waker) -> None:
        super().__init__()
        self._waker = waker
        self.reader: int | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if threading.get_ident() != self.reader:
            self._waker.wake()


# -- the DUL thread ---------------------------------------------------------------------

class _DUL(DULServiceProvider):
    """A DUL as :func:`_dul_init_patched` leaves it (for the type checker only: the
    patched functions below take pynetdicom's own instances)."""

    _waker: _Waker
    #: Set when the association thread has something to look at.
    _assoc_wake: threading.Event
    #: While true, the socket's incoming side belongs to another thread
    #: (:func:`socket_lent`); the lock covers the DUL's own reads.
    _socket_lent: bool
    _reader_lock: threading.Lock
    #: Largest length a received PDU may declare, per PDU type (:func:`_read_pdu_data`);
    #: set at the first read, once the local Maximum Length is known.
    _ceilings: tuple[int, ...] | None
    #: Bytes read from the socket by another thread and handed back (:func:`hand_back`):
    #: the DUL reads them before the socket.
    _pushback: bytearray
    #: True while a PDU is being read (:func:`_read_pdu_data`): its own deadline bounds
    #: it, and the association thread's idle timer waits for it (:func:`_idle_expired`).
    _reading: bool
    #: Held by the DUL while it runs a state machine action (which writes any PDU it
    #: sends), and by a thread writing a message itself (:func:`writes_paused`).
    _write_lock: threading.Lock
    #: ``time.monotonic()`` of the last PDU read or written (:func:`quiet_for`).
    _traffic_at: float


def _dul(assoc: Association) -> _DUL:
    """``assoc``'s DUL, patched."""
    return cast(_DUL, assoc.dul)


_dul_init = DULServiceProvider.__init__
_dul_kill = DULServiceProvider.kill_dul


def _dul_init_patched(self: _DUL, assoc: Association) -> None:
    _dul_init(self, assoc)
    self._waker = _Waker()
    self._assoc_wake = threading.Event()
    self.event_queue = _WakingQueue(self._waker)
    self.to_provider_queue = _WakingQueue(self._waker)
    self._socket_lent = False
    self._reader_lock = threading.Lock()
    self._ceilings = None
    self._pushback = bytearray()
    self._reading = False
    self._write_lock = threading.Lock()
    self._traffic_at = time.monotonic()


def _kill_dul_patched(self: _DUL) -> None:
    _dul_kill(self)
    self._waker.wake()


def _stop_dul_patched(self: _DUL) -> bool:
    """pynetdicom's ``stop_dul``, waking the reactor instead of waiting for its poll."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        self._waker.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()  # the reactor exits at its next look at _kill_thread
        return True
    return False


def _wait_for_work(self: _DUL) -> None:
    """Block until the socket is readable, something is queued, or a timer is due."""
    timeout = MAX_WAIT
    artim = self.artim_timer
    if artim._start_time is not None and artim._end_time is None and artim.timeout is not None:
        timeout = max(0.0, min(timeout, artim.remaining))
    if self._pushback and not self._socket_lent:
        return  # handed-back bytes to read (_read_transport)
    fds = [self._waker.fd]
    sock: AssociationSocket | None = self.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None and sock._is_connected and not self._socket_lent:  # type: ignore[union-attr]
        pending = getattr(raw, "pending", None)  # SSL may hold data select cannot see
        if pending is not None and pending():
            return
        try:
            if raw.fileno() >= 0:
                fds.append(raw)
        except OSError:
            pass
    try:
        select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        # A socket closed under us: the transport check reports it (Evt17).
        time.sleep(0.001)
    self._waker.drain()


def _read_transport(self: _DUL) -> bool:
    """pynetdicom's ``_is_transport_event`` unless the socket is lent out; bytes handed
    back (:func:`hand_back`) are read first, whether or not the socket is readable."""
    with self._reader_lock:
        if self._socket_lent:
            return False
        if self._pushback and self.socket is not None:
            self._read_pdu_data()
            return True
        return bool(self._is_transport_event())


@contextmanager
def socket_lent(assoc: Association, traffic: bool = True) -> Iterator[bool]:
    """Keep the DUL thread from reading ``assoc``'s socket for the block.

    A retrieve that writes its C-STORE requests straight to the socket
    (:mod:`pacs.dimse.seam.wire`) reads their responses straight from it too: handing each
    response through the DUL thread, its PDU and DIMSE decoding and the message queue
    cost ~0.2 ms per sub-operation, most of the node's share of a CT C-MOVE once the
    destination's own time is taken out.  A read in progress finishes first (the lock);
    then the DUL only sends (an A-ABORT, for one) until the block ends.

    Yields False, and lends nothing, when the patched reactor is not installed; the
    caller then takes responses from the DIMSE queue as pynetdicom delivers them.

    ``traffic``: the block exchanged messages, so the network idle timer restarts as it
    ends; a borrower that keeps that timer itself (:mod:`pacs.dimse.seam.inbound`)
    passes False, so that an idle timeout it gave up on still fires.
    """
    dul = _dul(assoc)
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
        if traffic:
            dul._idle_timer.restart()  # the DUL saw no traffic meanwhile; there was some
        dul._waker.wake()


def hand_back(assoc: Association, data: bytes | bytearray) -> None:
    """Give bytes read from ``assoc``'s socket during a :func:`socket_lent` back to the
    DUL thread, which reads them before anything more from the socket once the block
    ends: a borrower that read the start of something it does not serve leaves it to
    pynetdicom as if it had never been read."""
    _dul(assoc)._pushback += data


def give_back(assoc: Association) -> None:
    """End a :func:`socket_lent` early, before aborting the association: pynetdicom's
    ``abort()`` waits for the DUL to see the connection close, which it must read."""
    dul = _dul(assoc)
    if getattr(dul, "_socket_lent", False):
        dul._socket_lent = False
        dul._waker.wake()


def _dul_run_reactor(self: _DUL) -> None:
    """``DULServiceProvider.run_reactor`` with the idle sleep replaced by a blocking wait.

    The checks and their order are pynetdicom 3.0's.
    """
    self._idle_timer.start()
    wake_assoc = self._assoc_wake
    # This loop takes every event it queues itself before it waits (see _WakingQueue).
    cast(_WakingQueue, self.event_queue).reader = threading.get_ident()
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
                    self._traffic_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - pynetdicom's: any error aborts
                _dul_log.error("Aborting the association with %s: %s",
                               _remote_address(self.assoc), failure(exc))
                _dul_log.debug("The failure", exc_info=exc)
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
            state = self.state_machine.current_state
            if event in _LOCAL_EVENTS and (event, state) not in TRANSITION_TABLE:
                # A local primitive where PS3.8 Table 9-10 has no action for it, and
                # pynetdicom's state machine would end this thread with an error: the
                # association is being aborted or is gone (Sta13: an A-ABORT sent, the
                # connection closing; Sta1), while the association thread, not yet
                # aware, accepts it (Evt7), sends on it (Evt9) or aborts it too (Evt15:
                # a sub-operation that got no response while the DUL refused the peer's
                # PDU); or an A-ABORT before any A-ASSOCIATE-RQ (Sta2), where there is
                # no association to abort: its connection is closed instead (Evt17,
                # AA-5).  Its primitive, which the event stands for, is taken off the
                # queue as an action would: left there, it would be seen again at
                # once, for ever.
                with contextlib.suppress(queue.Empty):
                    self.to_provider_queue.get(block=False)
                if event == "Evt15" and state == "Sta2" and self.socket is not None:
                    self.socket.close()
                continue
            with self._write_lock:  # an action may write a PDU (writes_paused)
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
    wake: threading.Event = _dul(self)._assoc_wake
    self._is_paused = False
    idle = False
    while not self._kill:
        if idle:
            # Nothing happened last round: wait for the DUL (or the idle timer).
            # Waiting counts as paused, like the original's checkpoint wait.
            self._is_paused = True
            timeout = MAX_WAIT
            idle_timer = self.dul._idle_timer
            if idle_timer.timeout is not None and not _dul(self)._reading:
                timeout = max(0.0, min(timeout, idle_timer.remaining))
            wake.wait(timeout)
            wake.clear()
            if self._kill:  # set by another thread meanwhile
                break  # type: ignore[unreachable]
        idle = True

        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if self._kill:
            # Ended while paused: a release whose answer never came aborted the
            # association.  Going on, the idle timer would abort it again, an event the
            # DUL's state machine (Sta13) refuses, ending the DUL thread with an error.
            break  # type: ignore[unreachable]
        if not self._reactor_checkpoint.is_set():
            # A sender paused us between the wait and the line above and saw us paused:
            # it may already be waiting for its response, which we must not take.
            idle = False
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
            idle = False
        elif any(work(self) for work in IDLE_WORK):
            idle = False  # something was sent: look again at once

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

        if _idle_expired(self):
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


#: What the association thread does at a message boundary, when it has no message to
#: serve: each callable takes the association and answers whether it did something
#: (:func:`pacs.dimse.seam.notify.send_due`).  Only the association's own thread writes
#: its messages, so what these send cannot interleave with anything it sends.
IDLE_WORK: list[Callable[[Association], bool]] = []


def wake(assoc: Association) -> None:
    """Make the association thread look at its work now, not at its next timer."""
    wake_event = getattr(assoc.dul, "_assoc_wake", None)
    if wake_event is not None:
        wake_event.set()


def patched(assoc: Association) -> bool:
    """True when ``assoc`` runs the reactors of this module (:func:`patch` had run when
    it was made), so that :data:`IDLE_WORK` runs in its thread."""
    return hasattr(assoc.dul, "_traffic_at")


def serves(assoc: Association) -> bool:
    """True for an association of a node server that runs the seam
    (:func:`pacs.dimse.seam.install` returned True for its settings)."""
    return getattr(getattr(assoc, "_server", None), "uses_seam", False) is True


def traffic(assoc: Association) -> None:
    """A PDU crossed ``assoc``'s socket outside the DUL (read or written by another
    thread): for :func:`quiet_for`."""
    _dul(assoc)._traffic_at = time.monotonic()


def quiet_for(assoc: Association) -> float:
    """Seconds since a PDU last crossed ``assoc``'s socket, either way."""
    return time.monotonic() - _dul(assoc)._traffic_at


def at_boundary(assoc: Association) -> bool:
    """True when nothing of a message is in hand: none being read or handed back, none
    decoded and waiting, none half assembled, and nothing queued for the DUL to write.
    Only meaningful in the association thread, between two messages it serves."""
    dul = _dul(assoc)
    return not (dul._reading or dul._pushback or dul._socket_lent
                or dul.event_queue.qsize() or dul._recv_pdu.qsize()
                or dul.to_provider_queue.qsize() or assoc.dimse.message is not None
                or assoc.dimse.msg_queue.qsize())


@contextmanager
def writes_paused(assoc: Association) -> Iterator[bool]:
    """Keep ``assoc``'s DUL from writing for the block; yields False (and the caller
    must not write) when it still has something queued to write.

    The DUL writes a PDU only inside a state machine action, which it runs holding
    ``_write_lock``; a thread that holds the lock and finds nothing queued writes a
    whole message before anything the DUL is given later.
    """
    dul = _dul(assoc)
    with dul._write_lock:
        yield not dul.to_provider_queue.qsize()


def _idle_expired(assoc: Association) -> bool:
    """pynetdicom's ``idle_timer_expired``, except while the DUL reads a PDU and once
    an A-ABORT has been written (:func:`_abort_connection`).

    A PDU that has begun to arrive has a deadline of its own (:func:`_read_pdu_data`),
    which ends it with an A-ABORT; an abort from this thread meanwhile would queue a
    second one for a DUL still blocked in its read, and wait for it.  Once an A-ABORT
    is written the connection is closing and the association ends with it.
    """
    return bool(assoc.dul.idle_timer_expired() and not _dul(assoc)._reading
                and not assoc._sent_abort)


#: Responses that end an operation which may take longer than the network timeout.
_LONG_ANSWERS = (C_FIND_RSP, C_MOVE_RSP, C_GET_RSP)
#: Pending statuses of those operations (PS3.4 C.4.1.1.4, C.4.2.1.5): more follows.
_PENDING = frozenset({0xFF00, 0xFF01})


def answered(event: Any) -> None:
    """EVT_DIMSE_SENT of a node's association: a final C-FIND, C-MOVE or C-GET
    response starts the network idle time again.

    pynetdicom counts the idle time from the last PDU *received*; a requestor waiting
    for its C-MOVE's sub-operations sends nothing, so a C-MOVE that took longer than
    the network timeout (``PACS_DIMSE_TIMEOUT``) had the requestor's association aborted
    as idle right after its final response, and the requestor's next request on it
    failed.  The requestor is idle from the moment it has its answer.  With the seam
    off too (the timer is the same in every pynetdicom version that has it).
    """
    message = event.message
    if not isinstance(message, _LONG_ANSWERS) or message.command_set is None:
        return
    if message.command_set.get("Status") in _PENDING:
        return
    idle_from_now(event.assoc)


def idle_from_now(assoc: Any) -> None:
    """Start ``assoc``'s network idle time again (see :func:`answered`; the seam's own
    final C-FIND responses, written to the socket, call it themselves)."""
    timer = getattr(getattr(assoc, "dul", None), "_idle_timer", None)
    if timer is not None:
        timer.restart()


# -- the socket -------------------------------------------------------------------------

def _quickack(raw: Any) -> None:
    """Acknowledge at once (Linux ``TCP_QUICKACK``, reset by the kernel after use).

    A peer that leaves Nagle's algorithm on (pynetdicom as SCU, dcmtk without
    TCP_NODELAY=1) holds back the data set PDU of a request until the command PDU is
    acknowledged, and delayed ACKs make that ~40 ms per request.
    """
    try:  # noqa: SIM105 - once per PDU: cheaper than contextlib.suppress
        raw.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except (OSError, AttributeError):
        pass


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
_QUICKACK = quickack = _quickack


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray | bytes:
    """``AssociationSocket.recv`` reading straight into a buffer that grows with the
    data (:func:`pacs.dimse.limits.receive`).

    pynetdicom reads 4 KiB at a time and extends a bytearray (about 130 calls for a
    512x512 CT PDU); this reads as much as the kernel has, into one buffer of the final
    size up to 1 MiB, never allocating for bytes that have not arrived.  Same contract:
    blocks until ``nr_bytes`` are read or the peer closes, and returns what was read.
    """
    raw = self.socket
    data = limits.receive(raw, nr_bytes)  # type: ignore[arg-type]
    if len(data) == nr_bytes:
        _QUICKACK(raw)
    return data


def pace(assoc: Any) -> limits.Pace | None:
    """The time one PDU read or one write on ``assoc`` may take, starting now
    (:class:`pacs.dimse.limits.Pace` of its network timeout, PACS_DIMSE_TIMEOUT on the
    node's associations); ``None`` when it has no timeout."""
    timeout = getattr(assoc, "network_timeout", None)
    return limits.Pace(timeout) if timeout else None


def _socket_send(self: AssociationSocket, bytestream: bytes) -> None:
    """``AssociationSocket.send`` with the whole write bounded by :func:`pace`.

    pynetdicom's loop of ``send`` calls is bounded per call only (SO_SNDTIMEO), so a
    peer that reads a byte now and then held the DUL thread in it for as long as it
    liked.  Same events: EVT_DATA_SENT once written, Evt17 when the write failed.
    """
    try:
        limits.send_all(self.socket, bytestream, pace(self.assoc))
    except Exception:  # noqa: BLE001 - pynetdicom's: any failure is a closed connection
        self.event_queue.put("Evt17")
        return
    dul = self.assoc.dul
    if hasattr(dul, "_traffic_at"):
        dul._traffic_at = time.monotonic()
    evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})


def _local_maximum_length(assoc: Association) -> int:
    """The Maximum Length this side announced (PS3.8 D.1); 0: none."""
    user = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return int(user.maximum_length or 0)


def _node_limits(assoc: Association) -> limits.ConnectionLimits | None:
    """The limits of the node server that accepted ``assoc`` (None: not a node's)."""
    found = getattr(getattr(assoc, "_server", None), "limits", None)
    return found if isinstance(found, limits.ConnectionLimits) else None


def holding(assoc: Association) -> limits.Holding:
    """A new data set's share of the memory budget of the data sets ``assoc``'s worker
    receives (none taken: not a node's association)."""
    node = _node_limits(assoc)
    return node.holding(assoc) if node else limits.Holding(None)


def _ceilings_for(dul: _DUL) -> tuple[int, ...]:
    """The PDU ceilings of ``dul``'s association, computed at its first read."""
    assoc = dul.assoc
    node = _node_limits(assoc)
    unlimited = limits.unlimited_pdata(node.max_object_bytes) if node else limits.UNLIMITED
    ceilings = dul._ceilings = limits.pdu_ceilings(_local_maximum_length(assoc), unlimited)
    return ceilings


def pdata_ceiling(assoc: Association) -> int:
    """The largest P-DATA-TF PDU ``assoc`` may receive (:func:`_read_pdu_data`)."""
    dul = _dul(assoc)
    return (dul._ceilings or _ceilings_for(dul))[limits.P_DATA_TF]


def _remote_address(assoc: Association) -> str:
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return str(remote.address)
    except Exception:  # noqa: BLE001 - no address information yet
        return "?"


def _read_pdu_data(self: _DUL) -> None:
    """``DULServiceProvider._read_pdu_data`` that checks a PDU's declared length first.

    pynetdicom reads the 6-byte header, then as many bytes as its length field says into
    a buffer of that size: a few headers declaring 4 GB took gigabytes.  Here a PDU
    longer than its type allows (:func:`pacs.dimse.limits.pdu_ceilings`: for P-DATA-TF
    the Maximum Length this side announced, PS3.8 D.1) is a protocol error answered
    with an A-ABORT (:func:`_refuse_pdu`) before any of it is read, and a body is read
    into a buffer that grows with what arrives.

    The whole PDU, header and body, must arrive in time: before the A-ASSOCIATE-RQ
    (Sta2) before the ARTIM timer ends (the connection is then closed, PS3.8 9.1.3),
    in every other state within its :func:`pace` (the network timeout, and more for a
    large PDU that keeps arriving), else the association is aborted (A-ABORT, reason
    not specified, PS3.8 9.3.8) and the connection closed.  pynetdicom bounded each
    ``recv`` by the socket's receive timeout only: a peer sending a byte a little more
    often held this thread in one PDU for ever.  The events put on the queue are
    pynetdicom's.
    """
    sock = self.socket
    raw = sock.socket if sock is not None else None
    if raw is None:
        self.event_queue.put("Evt17")
        return
    self._reading = True
    try:
        _read_pdu(self, raw)
    finally:
        self._reading = False


def _read_pdu(self: _DUL, raw: socket.socket) -> None:
    """:func:`_read_pdu_data` once the socket is known."""
    deadline: float | limits.Pace | None
    # Sta1 too: an acceptor may read its peer's first bytes before its state machine has
    # taken the connection (Evt5, Sta1 to Sta2).
    requested = self.state_machine.current_state in ("Sta1", "Sta2")
    if requested and self.artim_timer.timeout:
        deadline = time.monotonic() + max(0.0, self.artim_timer.remaining)
    else:
        deadline = pace(self.assoc)
    try:
        head = _take(self, raw, 6, b"", deadline)
        if len(head) < 6:
            self.event_queue.put("Evt17")  # closed (or closing) before a whole header
            return
        pdu_type, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if not 0x01 <= pdu_type <= 0x07:
            _dul_log.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        ceiling = (self._ceilings or _ceilings_for(self))[pdu_type]
        if length > ceiling:
            _refuse_pdu(self, raw, pdu_type, length, ceiling)
            return
        data = _take(self, raw, length, head, deadline)
    except TimeoutError as exc:  # the PDU's time (or ARTIM) ran out
        if requested:
            _dul_log.warning("Connection from %s closed: no whole PDU received (%s)",
                             _remote_address(self.assoc), type(exc).__name__)
            self.event_queue.put("Evt17")
            return
        _dul_log.warning("Aborting the association with %s: a PDU did not arrive whole "
                         "within its time", _remote_address(self.assoc))
        _abort_connection(self, raw, _ABORT_NOT_SPECIFIED)
        return
    except OSError as exc:  # receive timeout, reset
        _dul_log.warning("Connection from %s closed: no whole PDU received (%s)",
                         _remote_address(self.assoc), type(exc).__name__)
        self.event_queue.put("Evt17")
        return
    if len(data) != 6 + length:
        _dul_log.error(f"The received PDU is shorter than expected ({len(data)} of "
                       f"{6 + length} bytes received)")
        self.event_queue.put("Evt17")
        return
    _QUICKACK(raw)
    try:
        if data[0] in _KNOWN_ITEMS:
            data = known_items_only(data)
        pdu, event = self._decode_pdu(data)  # type: ignore[arg-type]
        if event == "Evt6":
            # Its primitive is made later, by the state machine's action (AE-6), where
            # an item pynetdicom cannot take (an even context ID, a User Identity type
            # outside 1-5: PS3.8 9.3.2.2, PS3.7 D.3.3.7) ended this thread with an
            # error and left the connection open: made here, it is an invalid PDU.
            pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom's: an undecodable PDU is Evt19
        _dul_log.error("Aborting the association with %s: a PDU that does not decode "
                       "(%s)", _remote_address(self.assoc), failure(exc))
        _dul_log.debug("The failure", exc_info=exc)
        # A-ABORT from the service provider, invalid PDU parameter value (PS3.8
        # 9.3.8), where pynetdicom's Evt19 (AA-8) said neither source nor reason.
        _abort_connection(self, raw, _ABORT_INVALID_PARAMETER)
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


#: The item types pynetdicom decodes in an A-ASSOCIATE-RQ (PDU type 1) and -AC (2):
#: Application Context, Presentation Context, User Information (PS3.8 9.3.2, 9.3.3).
_KNOWN_ITEMS = {0x01: frozenset({0x10, 0x20, 0x50}), 0x02: frozenset({0x10, 0x21, 0x50})}
#: The User Information sub-items it decodes (PS3.8 D.1, PS3.7 D.3.3).
_KNOWN_USER_ITEMS = frozenset(range(0x51, 0x5A))
#: Bytes before an A-ASSOCIATE-RQ/-AC's first item: the PDU header and its fixed fields.
_FIXED = 6 + 68


def known_items_only(data: bytes | bytearray) -> bytes | bytearray:
    """An A-ASSOCIATE-RQ or -AC without the items, and User Information sub-items, of
    types pynetdicom does not know, which it fails to decode where PS3.8 9.3.1 says
    "Items of unrecognized types shall be ignored and skipped"; ``data`` itself when it
    has none, or when an item's length overruns the PDU (decoded as it came, and
    refused)."""
    known = _KNOWN_ITEMS[data[0]]
    kept = _items(data, _FIXED, len(data), known, user=True)
    if kept is None:
        return data
    body = bytes(data[6:_FIXED]) + kept
    return bytes(data[:2]) + struct.pack(">I", len(body)) + body


def _items(data: bytes | bytearray, start: int, end: int, known: frozenset[int],
           user: bool = False) -> bytes | None:
    """The items of ``data[start:end]`` whose types are ``known`` (a User Information
    item with its unknown sub-items left out too, when ``user``); ``None`` when none
    is left out or the items do not fit."""
    kept, dropped, at = [], False, start
    while at < end:
        if at + 4 > end:
            return None
        kind = data[at]
        size = struct.unpack_from(">H", data, at + 2)[0]
        if at + 4 + size > end:
            return None
        item = bytes(data[at:at + 4 + size])
        if kind not in known:
            dropped = True
        elif user and kind == 0x50:
            inner = _items(data, at + 4, at + 4 + size, _KNOWN_USER_ITEMS)
            if inner is not None:
                item = bytes(data[at:at + 2]) + struct.pack(">H", len(inner)) + inner
                dropped = True
            kept.append(item)
        else:
            kept.append(item)
        at += 4 + size
    return b"".join(kept) if dropped else None


def _take(self: _DUL, raw: socket.socket, count: int, prefix: bytes | bytearray,
          deadline: float | limits.Pace | None) -> bytes | bytearray:
    """``prefix`` and the next ``count`` bytes of the stream: the handed-back bytes
    (:func:`hand_back`) first, then the socket (:func:`pacs.dimse.limits.receive`)."""
    back = self._pushback
    if back:
        taken = back[:count]
        del back[:count]
        prefix = bytes(prefix) + taken
        count -= len(taken)
        if not count:
            return prefix
    return limits.receive(raw, count, prefix=prefix, deadline=deadline)


#: A-ABORT source and reasons (PS3.8 9.3.8): service-provider; reason not specified,
#: invalid PDU parameter value.
_ABORT_SOURCE_PROVIDER, _ABORT_NOT_SPECIFIED, _ABORT_INVALID_PARAMETER = 0x02, 0x00, 0x06


def _refuse_pdu(self: _DUL, raw: socket.socket, pdu_type: int, length: int,
                ceiling: int) -> None:
    """Answer a PDU longer than allowed: A-ABORT (service provider, invalid PDU
    parameter value, PS3.8 9.3.8), then close the connection.

    Its body cannot be skipped to find the next PDU (that would mean reading everything
    it declares), so the transport is closed at once instead of awaiting the peer's
    close: the state machine takes it as a closed connection (Evt17; in Sta6 AA-4
    tells the association an A-P-ABORT happened).
    """
    _dul_log.warning("Aborting the association with %s: a %s PDU of %d bytes, more than "
                     "the %d allowed (PS3.8 D.1, 9.3.1)", _remote_address(self.assoc),
                     limits.PDU_NAMES.get(pdu_type, "?"), length, ceiling)
    _abort_connection(self, raw, _ABORT_INVALID_PARAMETER)


def _abort_connection(self: _DUL, raw: socket.socket, reason: int) -> None:
    """Write an A-ABORT (service provider, ``reason``: PS3.8 9.3.8) and the end of the
    stream, and tell the state machine the connection is closed (Evt17; in Sta6 AA-4
    gives the association an A-P-ABORT).

    The association counts as aborted from here (pynetdicom's ``_sent_abort``): an
    ``abort()`` from another thread (a write that failed, the network timeout) would
    queue a second A-ABORT, which the state machine, back in Sta1 by then, cannot take.
    """
    self.assoc._sent_abort = True
    abort = A_ABORT_RQ()
    abort.source = _ABORT_SOURCE_PROVIDER
    abort.reason_diagnostic = reason
    try:
        raw.sendall(abort.encode())
        raw.shutdown(socket.SHUT_WR)  # the A-ABORT, then the end of the stream
    except OSError:
        pass
    self.event_queue.put("Evt17")


def abort_lent(assoc: Association, invalid: bool) -> None:
    """Abort ``assoc`` from the thread its socket is lent to (:func:`socket_lent`): the
    A-ABORT is written here, at once, reason "invalid PDU parameter value" when
    ``invalid`` (else "not specified"), and the DUL takes the connection as closed.

    pynetdicom's ``Association.abort()`` queues the A-ABORT for the DUL thread and then
    stops that thread, which may stop before sending it.
    """
    dul = _dul(assoc)
    raw = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    if raw is None:
        dul.event_queue.put("Evt17")
        return
    _abort_connection(dul, raw, _ABORT_INVALID_PARAMETER if invalid else _ABORT_NOT_SPECIFIED)


_ORIGINAL_RECEIVE_PDU = DULServiceProvider.receive_pdu

#: Seconds between looks at the transport while an acceptor waits for its request.
_REQUEST_POLL = 0.2


def _receive_pdu(self: DULServiceProvider, wait: bool = False,
                 timeout: float | None = None) -> Any:
    """``receive_pdu`` that stops waiting once the peer has closed the connection.

    An acceptor waits up to the ACSE timeout (on a node's server: ARTIM,
    PACS_ARTIM_TIMEOUT) for the A-ASSOCIATE-RQ.  A peer that
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


# -- DIMSE messages: bounded buffers --------------------------------------------------------

_ORIGINAL_RECEIVE_PRIMITIVE = DIMSEServiceProvider.receive_primitive
#: The Command Field of a C-CANCEL-RQ (PS3.7 E.1-1).
C_CANCEL_RQ = 0x0FFF


def _receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    """``DIMSEServiceProvider.receive_primitive``, a fragment at a time, with bounded
    message buffers and the order of fragments checked.

    pynetdicom gathers a message's fragments in memory until the last arrives
    (``DIMSEMessage.decode_msg``).  Each new message gets a command buffer of at most
    :data:`pacs.dimse.limits.COMMAND_CEILING` bytes (more is a protocol error: A-ABORT
    through Evt19, as pynetdicom does for an undecodable message) and, on a node's
    association, a data set buffer that stops keeping bytes past PACS_MAX_OBJECT_BYTES
    (:class:`pacs.dimse.limits.CappedBuffer`); the C-STORE handler answers such a
    message A700 (:func:`pacs.dimse.storage.store`).  Once the command set is decoded,
    the identifier of a C-FIND, C-MOVE or C-GET request is held to
    :data:`pacs.dimse.limits.IDENTIFIER_CEILING` instead (answered Unable to process,
    :func:`pacs.dimse.find.decode_identifier`).

    The fragments of a P-DATA-TF are taken one by one: pynetdicom drops those that
    follow the end of a message in the same PDU, and takes a fragment on another
    presentation context, or a command fragment inside a data set, as part of the
    message (a second C-STORE command replaced the first, unanswered).  The rules of
    the seam's own reader hold here too (:mod:`pacs.dimse.seam.inbound`; PS3.8 9.3.5.1,
    E.2: a message's fragments are on one context, its command set first, then its data
    set): a fragment that breaks them aborts the association, and so does a message in
    more fragments than its content allows (:func:`pacs.dimse.limits.count_fragment`).
    """
    for context_id, fragment in primitive.presentation_data_value_list:
        single = P_DATA()
        single.presentation_data_value_list = [[context_id, fragment]]  # type: ignore[list-item]
        if not _receive_fragment(self, context_id, fragment, single):
            return


def _receive_fragment(self: DIMSEServiceProvider, context_id: int, fragment: bytes,
                      single: Any) -> bool:
    """One fragment of :func:`_receive_primitive`; ``False``: the association is being
    aborted."""
    if self.message is None:
        limit = self.__dict__.get("_object_limit")
        if limit is None:
            node = _node_limits(self.assoc)
            # -1: not a node's association (the node as a requestor, whose responses
            # may well queue: the pending responses of its C-FIND, say).
            limit = node.max_object_bytes if node else -1
            self._object_limit = limit  # type: ignore[attr-defined]  # cached per provider
        if limit >= 0 and self.msg_queue.qsize() >= limits.MAX_QUEUED_MESSAGES:
            return _abort_message(self, f"more than {limits.MAX_QUEUED_MESSAGES} messages "
                                  "sent ahead of their responses (no asynchronous "
                                  "operations window, PS3.7 D.3.3.3)")
        message = self.message = DIMSEMessage()
        message.encoded_command_set = limits.CappedCommand()
        if limit > 0:
            message.data_set = limits.CappedBuffer(limit, holding(self.assoc))
    message = self.message
    out_of_order = _out_of_order(message, context_id, fragment)
    if out_of_order is not None:
        return _abort_message(self, out_of_order)
    counts = message.__dict__
    content = counts["_content"] = counts.get("_content", 0) + len(fragment) - 1
    try:
        counts["_fragments"] = limits.count_fragment(counts.get("_fragments", 0), content)
    except limits.FragmentFlood as exc:
        return _abort_message(self, str(exc))
    try:
        _ORIGINAL_RECEIVE_PRIMITIVE(self, single)
    except limits.CommandTooLarge as exc:
        return _abort_message(self, str(exc))
    except Exception as exc:  # noqa: BLE001 - a message pynetdicom cannot decode
        # A command set of a Command Field it does not know, an element it cannot
        # read, a PDV too short for its header: a protocol error, as the seam's own
        # reader has it (A-ABORT, PS3.8 9.3.8), not the end of this thread.
        _assoc_log.debug("The failure", exc_info=exc)
        return _abort_message(self, f"a message that does not decode ({failure(exc)})")
    pending: Any = self.message  # None once the message is complete
    if pending is None:
        _drop_stale_cancel(self, message)
    else:
        _bound_identifier(message)
    return True


def _drop_stale_cancel(self: DIMSEServiceProvider, message: Any) -> None:
    """Forget a C-CANCEL-RQ read before the request ``message`` (just complete) that
    has its Message ID: it was sent for an earlier request of that ID, after its final
    response (PS3.7 9.3.2.3: a cancel names an operation in progress, and a requestor
    may reuse a Message ID once its operation ended, 9.3.1.1), and pynetdicom, which
    keeps cancels by Message ID, would cancel this request with it."""
    command = getattr(message, "command_set", None)
    if command is None or command.get("CommandField") in (None, C_CANCEL_RQ) or (
            command.get("CommandField", 0) & 0x8000):
        return
    self.cancel_req.pop(command.get("MessageID"), None)


def _out_of_order(message: Any, context_id: int, fragment: bytes) -> str | None:
    """What is wrong with ``fragment`` as the next of ``message`` (``None``: nothing)."""
    if not fragment:
        return "a fragment without its message control header"
    command = fragment[0] & 0x01
    if message.context_id is None:  # its command set is not complete yet
        if not command:
            return "a data set fragment before its command set"
        first = message.__dict__.setdefault("_first_context", context_id)
        return None if first == context_id else "a command fragment on another context"
    if command:
        return "a command fragment inside a data set"
    if context_id != message.context_id:
        return "a data set fragment on another presentation context"
    return None


def _abort_message(self: DIMSEServiceProvider, why: str) -> bool:
    """Abort the association for a message that breaks the protocol (Evt19, as
    pynetdicom does for one it cannot decode); always ``False``."""
    _assoc_log.warning("Aborting the association with %s: %s",
                       _remote_address(self.assoc), why)
    _let_go(self)
    self.message = None
    self.dul.event_queue.put("Evt19")
    return False


def _bound_identifier(message: Any) -> None:
    """Hold the data set of a C-FIND, C-MOVE or C-GET request to the identifier ceiling
    once its command set is decoded (it precedes the data set, PS3.7 6.3.1): a data set
    fragment it has let past since is at most one PDU.  Only a C-STORE's data set takes
    the worker's receive budget (an N-ACTION's, refused for want of it, read as none)."""
    buffer = getattr(message, "data_set", None)
    command = getattr(message, "command_set", None)
    if not isinstance(buffer, limits.CappedBuffer) or command is None:
        return
    field = command.get("CommandField")
    if field in limits.QUERY_COMMANDS:
        buffer.lower(limits.IDENTIFIER_CEILING)
    elif field != limits.C_STORE_RQ:
        buffer.leave_budget()


def _let_go(provider: Any) -> None:
    """Give back the receive budget of the messages an ended association leaves
    unanswered: the one half received, those complete but never served.  They are
    collected with the association, whose objects refer to each other: their buffers'
    own release waited for Python's cycle collector, and stores were refused
    meanwhile."""
    messages = [getattr(provider, "message", None)]
    queue = getattr(provider, "msg_queue", None)
    if queue is not None:
        with queue.mutex:
            messages += [getattr(item[1], "DataSet", None) for item in list(queue.queue)
                         if isinstance(item, tuple) and len(item) == 2]
    for message in messages:
        buffer = getattr(message, "data_set", message)
        if isinstance(buffer, limits.CappedBuffer):
            buffer.leave_budget()


# -- installation -----------------------------------------------------------------------

_assoc_run = Association.run_reactor


def _assoc_run_patched(self: Association) -> None:
    """``Association.run_reactor``; an acceptor whose DUL thread cannot be started
    (RLIMIT_NPROC, a cgroup's pids limit) closes its connection and its waker, and
    leaves the error to its server's count (``handle_error``, called while it is
    handled).  Unhandled, it left the connection open and unread, the peer waiting,
    until the association was collected."""
    try:
        _assoc_run(self)
    except RuntimeError as exc:
        dul = _dul(self)
        server = self._server
        raw = dul.socket.socket if dul.socket is not None else None
        if (dul.is_alive() or server is None or raw is None
                or not cannot_start_thread(exc)):
            _abort_after_failure(self, exc)
            return
        # Counted before the peer can see the end of its connection.
        server.handle_error(raw, (self.requestor.address, self.requestor.port))
        server.shutdown_request(raw)
        dul._waker.close()
    except Exception as exc:  # noqa: BLE001 - the thread's last word: see below
        _abort_after_failure(self, exc)
    finally:
        _let_go(self.dimse)


def _abort_after_failure(assoc: Association, exc: Exception) -> None:
    """The association thread failed (pynetdicom's negotiation of a request it cannot
    take, a defect): abort the association (A-ABORT, service provider, PS3.8 9.3.8)
    and stop its DUL, in one log line.  Ended by the exception instead, the thread left
    the DUL reading the peer's socket, and the association's place taken, for as long
    as the peer kept the connection open."""
    _assoc_log.error("Aborting the association with %s: %s", _remote_address(assoc),
                     failure(exc))
    _assoc_log.debug("The failure", exc_info=exc)
    with contextlib.suppress(Exception):
        assoc.acse.send_ap_abort(0x00)  # reason not specified
    with contextlib.suppress(Exception):
        assoc.kill()


def patch() -> None:
    """Replace pynetdicom's methods with the ones above (once per process, by
    :func:`pacs.dimse.seam.install`, which holds the version gate).

    Associations created afterwards use the blocking reactors (client associations of
    this process too).
    """
    DULServiceProvider.__init__ = _dul_init_patched  # type: ignore[method-assign, assignment]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign, assignment]
    DULServiceProvider.kill_dul = _kill_dul_patched  # type: ignore[method-assign, assignment]
    DULServiceProvider.stop_dul = _stop_dul_patched  # type: ignore[method-assign, assignment]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    Association.run_reactor = _assoc_run_patched  # type: ignore[method-assign]
    Association.kill = _assoc_kill_patched  # type: ignore[method-assign]
    AssociationSocket.recv = _socket_recv  # type: ignore[method-assign, assignment]
    AssociationSocket.send = _socket_send  # type: ignore[method-assign]
    DULServiceProvider.receive_pdu = _receive_pdu  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign, assignment]
    DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
