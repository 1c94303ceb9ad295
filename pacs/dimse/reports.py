"""Storage commitment results delivered: one thread per DIMSE worker process.

A request answered Success (:func:`pacs.dimse.commitment.accept`) is recorded and
claimed by the worker that answered it.  Once its N-ACTION response has gone
(:meth:`Reporter.answered`, from EVT_DIMSE_SENT), the :class:`Reporter` verifies the
instances (:meth:`pacs.core.commitment.Commitments.verify`) and sends the Storage
Commitment Result (N-EVENT-REPORT, PS3.4 J.3.3):

1. on the same association, when the requestor still holds it open :data:`GRACE`
   seconds after the response and has not asked to release it (a requestor that
   releases at once is not sent a report it would ignore in its release);
2. otherwise on a new association to the requestor's address in ``PACS_MODALITIES``
   (found by its AE title), this node proposing the SCP role by SCP/SCU Role Selection
   (PS3.4 J.3.3.1.3: the requestor accepts an association on which the SCP role is
   proposed by the Storage Commitment SCP); a requestor that has no address there is
   not reached at all, and its request is dropped.

A result is delivered once the requestor answers Success; then its request is removed.
An attempt that fails (no address, association refused, no or a failure response) is
tried again after a growing delay (:func:`pacs.core.commitment.retry_delay`); requests
of any process whose attempt is due, restarts included, are claimed from the queue
every :data:`POLL` seconds at most.  A crash between a report's delivery and its
removal sends it again: results are delivered at least once.

Only pynetdicom's public API: ``Association.send_n_event_report`` (which pauses the
association's reactor while it waits for the response, with the seam and without it),
``AE.associate``, ``Association.acse.is_release_requested``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt

from pacs.core.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE, Pending
from pacs.core.errors import PacsError
from pacs.dimse import commitment, handlers

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacs.core.config import Modality
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Seconds after the N-ACTION response before the result goes on the same association:
#: a requestor that releases at once has asked to by then.
GRACE = 1.0
#: Seconds between two looks at the queue for due requests (of any process).
POLL = 5.0

#: The transfer syntaxes proposed for a report on a new association.
SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(order=True)
class _Job:
    """A request to deliver on the association it came on, not before ``due``."""

    due: float
    order: int
    pending: Pending = field(compare=False)
    assoc: Association = field(compare=False)


class Reporter:
    """Verifies and reports the storage commitment requests of one worker process.

    Parameters
    ----------
    services : Services
        The worker's services: the queue, the index and store to verify against, the
        settings (AE title, timeouts, ``PACS_MODALITIES``).
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.commitments = services.commitments
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        #: Recorded requests whose N-ACTION response has not gone yet, per association.
        self._answering: weakref.WeakKeyDictionary[Any, dict[int, Pending]] = (
            weakref.WeakKeyDictionary())
        #: Answered, not verified yet: with their association and the time of the answer.
        self._ready: list[tuple[Pending, Association, float]] = []
        self._verified: list[_Job] = []  # a heap by due time
        self._order = itertools.count()
        self._message_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    # -- from the association threads -------------------------------------------------

    def expect(self, assoc: Association, message_id: int, pending: Pending) -> None:
        """A request was recorded; its N-ACTION response (``message_id``) follows."""
        with self._lock:
            self._answering.setdefault(assoc, {})[message_id] = pending

    def answered(self, assoc: Association, message_id: int) -> None:
        """EVT_DIMSE_SENT of an N-ACTION response: its request may be reported now
        (never before the response: the requestor would take the report for it)."""
        with self._lock:
            pending = self._answering.get(assoc, {}).pop(message_id, None)
            if pending is None:
                return
            self._ready.append((pending, assoc, time.monotonic()))
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------

    def start(self) -> Reporter:
        """Start the delivery thread."""
        self._thread = threading.Thread(target=self._run, name="pacs-commitment",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; requests it holds go back to the queue untried."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            held = [pending for pending, _, _ in self._ready]
            held += [job.pending for job in self._verified]
            held += [p for answering in self._answering.values() for p in answering.values()]
            self._ready, self._verified = [], []
            self._answering.clear()
        for pending in held:
            try:
                self.commitments.release(pending)
            except PacsError:
                log.warning("storage commitment: a request could not be given back; it "
                            "waits for its lease to end")

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stopping.is_set():
            try:
                if self._work_local():
                    continue
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._poll_queue()
                    continue
            except Exception:  # the thread must outlive any failure
                log.exception("storage commitment: delivery failed unexpectedly")
                next_poll = time.monotonic() + POLL
            self._wake.wait(self._wait(next_poll))
            self._wake.clear()

    def _wait(self, next_poll: float) -> float:
        """Seconds until the next poll or the next local job, whichever is first."""
        until = next_poll
        with self._lock:
            if self._ready:
                return 0.0
            if self._verified:
                until = min(until, self._verified[0].due)
        return max(0.0, until - time.monotonic())

    def _work_local(self) -> bool:
        """Verify one answered request, or report one verified whose time has come;
        False when there was nothing to do."""
        with self._lock:
            ready = self._ready.pop(0) if self._ready else None
            job = None
            if ready is None and self._verified and self._verified[0].due <= time.monotonic():
                job = heapq.heappop(self._verified)
        if ready is not None:
            pending, assoc, answered = ready
            checked = self._verify(pending)
            if checked is not None:
                with self._lock:
                    heapq.heappush(self._verified, _Job(answered + GRACE, next(self._order),
                                                        checked, assoc))
            return True
        if job is not None:
            self._deliver(job.pending, job.assoc)
            return True
        return False

    def _poll_queue(self) -> float:
        """Claim and deliver one request due in the queue; seconds until the next look
        (none when one was found: there may be more, after the local work)."""
        claimed = self.commitments.due(1)
        if claimed:
            pending = claimed[0]
            checked = pending if pending.result is not None else self._verify(pending)
            if checked is not None:
                self._deliver(checked, None)
            return 0.0
        found = self.commitments.next_time()
        if found is None:
            return POLL
        return min(POLL, max(0.0, found - time.time()))

    # -- one request --------------------------------------------------------------------

    def _verify(self, pending: Pending) -> Pending | None:
        """The request with its result kept; ``None`` when it was lost or failed."""
        try:
            return self.commitments.verify(pending, self.services.store)
        except PacsError as exc:
            delay = self.commitments.failed(pending, f"verification failed: {exc}")
            log.warning("storage commitment: the instances could not be verified (%s); "
                        "again in %.0f s", exc, delay)
            return None

    def _deliver(self, pending: Pending, assoc: Association | None) -> None:
        """Report the result: on ``assoc`` when the requestor still holds it open, else
        on a new association; keep the request for later when neither worked.  A
        requestor without an address in ``PACS_MODALITIES`` can be reached on its own
        association only: once that is gone its request is dropped (it never receives a
        commitment, so it keeps its copies), and cannot fill the queue for good."""
        if not self.commitments.renew(pending):
            return  # another process took it, or the requestor replaced it
        requestor = pending.request.requestor_ae
        if assoc is not None and _open(assoc):
            error = self._send(assoc, pending)
            if error is None:
                self._delivered(pending, "on the requestor's association")
                return
            log.info("storage commitment: the report to %s on its association failed "
                     "(%s)", requestor, error)
            if not self.commitments.renew(pending):
                return
        destination = self.services.settings.destinations.get(requestor)
        if destination is None:
            self.commitments.remove(pending)
            log.warning("storage commitment: the result for %s is dropped: it left its "
                        "association and its AE title is not in PACS_MODALITIES",
                        requestor)
            return
        try:
            error = self._send_new(pending, destination)
        except Exception as exc:  # noqa: BLE001 - tried again later like any failure
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            self._delivered(pending, "on a new association")
            return
        delay = self.commitments.failed(pending, error)
        log.warning("storage commitment: the report to %s could not be delivered (%s); "
                    "again in %.0f s", requestor, error, delay)

    def _delivered(self, pending: Pending, how: str) -> None:
        self.commitments.remove(pending)
        result = pending.result
        assert result is not None  # verified before any delivery
        log.info("storage commitment result delivered to %s %s: %d committed, %d failed",
                 pending.request.requestor_ae, how, len(result.committed),
                 len(result.failed))

    def _send(self, assoc: Association, pending: Pending) -> str | None:
        """Send the report on ``assoc``; ``None`` when the requestor answered Success,
        else what went wrong."""
        result = pending.result
        assert result is not None
        information = commitment.event_information(
            pending.request.transaction_uid, result, self._title(pending))
        try:
            status, _ = assoc.send_n_event_report(
                information, result.event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE,
                msg_id=next(self._message_ids) % 0x10000 or 1)
        except Exception as exc:  # noqa: BLE001 - a peer gone meanwhile, a refused context
            return f"{type(exc).__name__}: {exc}"
        code = status.get("Status")
        if code is None:
            return "no response"
        return None if int(code) == 0 else f"answered {int(code):04X}"

    def _send_new(self, pending: Pending, destination: Modality) -> str | None:
        """Send the report on an association of its own to the requestor's address."""
        settings = self.services.settings
        assoc = self._entity().associate(
            destination.host, destination.port,
            contexts=[build_context(PUSH_MODEL, SYNTAXES)], ae_title=destination.ae_title,
            ext_neg=[build_role(PUSH_MODEL, scp_role=True)], max_pdu=settings.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, handlers.requested_as(self._title(pending)))])
        if not assoc.is_established:
            # pynetdicom leaves the socket of a rejected association open.
            sock = assoc.dul.socket
            if sock is not None:
                sock.close()
            return f"no association with {destination.host}:{destination.port}"
        try:
            return self._send(assoc, pending)
        finally:
            if assoc.is_established:
                assoc.release()

    def _title(self, pending: Pending) -> str:
        """The node's AE title for this request's report: the one it was asked on (the
        requestor knows the node by it), else the customer's first."""
        return pending.request.called_ae or self.services.settings.ae_title

    def _entity(self) -> AE:
        """The AE that requests associations to report on (made once)."""
        if self._ae is None:
            settings = self.services.settings
            ae = AE(ae_title=settings.ae_title)
            ae.acse_timeout = settings.dimse_timeout
            ae.dimse_timeout = settings.dimse_timeout
            ae.network_timeout = settings.dimse_timeout
            ae.connection_timeout = settings.dimse_timeout
            self._ae = ae
        return self._ae


def _open(assoc: Association) -> bool:
    """True while the requestor holds its association open and has not asked to
    release it (the release request waits for its reactor: PS3.4 J.3.3.1.2 note, the
    SCU is free to release at any time)."""
    return bool(assoc.is_established and not assoc.acse.is_release_requested())
