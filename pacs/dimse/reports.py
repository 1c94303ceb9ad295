"""Storage commitment results delivered: one thread per DIMSE worker process.

A request answered Success (:func:`pacs.dimse.commitment.accept`) is recorded and
claimed by the worker that answered it.  Once its N-ACTION response has gone
(:meth:`Reporter.answered`, from EVT_DIMSE_SENT), the :class:`Reporter` verifies the
instances (:meth:`pacs.core.commitment.Commitments.verify`) and sends the Storage
Commitment Result (N-EVENT-REPORT, PS3.4 J.3.3), which may go on the association the
request came on while it is open, or on another (PS3.4 J.3.3.1.2):

1. on an association of the requestor (the one the request came on, or one it opened
   since: :meth:`Reporter.associated`) only when that association is quiet: no PDU
   either way for :data:`QUIET` seconds, and its own thread at a message boundary, with
   nothing of a message being read, served or written.  That thread sends the report
   and tells its response from the requestor's requests (:mod:`pacs.dimse.seam.notify`):
   a requestor that goes on storing after its request has its stores answered, and its
   report once it pauses; one that releases at once has asked to by then.  The
   reporter waits :data:`QUIET_WAIT` seconds at most for such a moment;
2. otherwise on a new association to the requestor's address in ``PACS_MODALITIES``
   (found by its AE title; over DICOM TLS when that entry says ``:tls`` or the access
   rules know the AE as one that associates over TLS only), this node proposing the
   SCP role by SCP/SCU Role Selection (PS3.4 J.3.3.1.3: the requestor accepts an
   association on which the SCP role is proposed by the Storage Commitment SCP);
3. a requestor that has no address there can be reached on its own associations only:
   its result is kept, tried again on the one it came on while that lasts and on the
   next it opens as soon as it does, for :data:`KEEP_UNREACHABLE` seconds after its
   request (or ``PACS_COMMITMENT_KEEP``, when shorter); then it is dropped (the
   requestor, never told, keeps its copies, and such requests cannot fill the queue for
   good).

1 needs the seam's reactor: with ``PACS_DIMSE_SEAM=off`` a result goes on a new
association only, and one for a requestor without an address waits out
:data:`KEEP_UNREACHABLE` and is dropped.

Before each attempt the committed instances are looked up again
(:meth:`pacs.core.commitment.Commitments.recheck`): one removed since, or stored again
with other content, is reported failed.
A report goes on an association of the requestor only when that association comes from
the address the request came from (when it is known): another host calling itself by
the requestor's AE title is not sent its results.  On a new association the report is
sent only once the requestor accepted the SCP role this node proposed (PS3.7 D.3.3.4:
without the acceptor's answer the requestor of an association is its SCU only).

A result is delivered once the requestor answers Success (or a warning); then its
request is removed.  A requestor that leaves a report on its association unanswered
for the DIMSE timeout has that association aborted (its operation would stay
outstanding, and no other may be invoked on it, PS3.7 D.3.3.3), and is held off for
:data:`SILENT_TIMEOUTS` DIMSE timeouts (:meth:`Reporter._silence`): its results and
the associations it opens wait, so that it holds this one thread, and every other
requestor's results behind it, for one timeout in that many.
An attempt that fails (no address, association refused, the SCP role not accepted, no
response, or :data:`TRANSIENT` statuses) is tried again after a growing delay
(:func:`pacs.core.commitment.retry_delay`); requests of any process whose attempt is
due, restarts included, are claimed from the queue every :data:`POLL` seconds at most.
A result still not delivered ``PACS_COMMITMENT_KEEP`` seconds after its request is
dropped when the queue is next looked at (:meth:`pacs.core.commitment.Commitments.
due`, logged): a requestor that has an address but never takes its results (gone,
refusing every association) would otherwise be tried for good, its share of the queue
full and each of its later requests refused (0213).
Any other failure status refuses the report for good (PS3.7 10.1.1.1.8: no such event
type, SOP class or instance, an invalid argument ...): the result is dropped and the
requestor, never told, keeps its copies.  A crash between a report's delivery and its
removal sends it again: results are delivered at least once.

Only pynetdicom's public API, and the seam's :mod:`pacs.dimse.seam.notify` for the
requestor's own associations: ``Association.send_n_event_report`` on an association
this node requested (the peer there answers and sends no requests of its own),
``AE.associate``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt

from pacs.core.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE, Pending
from pacs.core.errors import PacsError
from pacs.core.logs import failure_text
from pacs.dimse import commitment, handlers, tls
from pacs.dimse.retrieve import Outcome, classify, over_tls_if_known
from pacs.dimse.seam import notify

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacs.core.config import Modality
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Seconds without a PDU either way before a report goes on a requestor's association
#: (and, after the N-ACTION response, before it is tried at all): a requestor that
#: releases at once has asked to by then, and one that keeps sending is not sent a
#: request across its own.
QUIET = 1.0
#: Seconds a delivery waits for a requestor's association to be quiet before it goes on
#: a new association (or, without an address, is kept for later).
QUIET_WAIT = 5.0
#: Seconds a result for a requestor without an address in PACS_MODALITIES is kept, from
#: its request, for an association of the requestor to report on.
KEEP_UNREACHABLE = 3600.0
#: Seconds between two looks at the queue for due requests (of any process).
POLL = 5.0
#: Waiting requests of one requestor claimed when it opens an association.
ARRIVAL_CLAIMS = 16
#: DIMSE timeouts a requestor that left a report unanswered for one waits before its
#: results are tried again (:meth:`Reporter._silence`).
SILENT_TIMEOUTS = 10

#: The transfer syntaxes proposed for a report on a new association.
SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: N-EVENT-REPORT response statuses after which the report is sent again (PS3.7
#: 10.1.1.1.8): Processing failure, Resource limitation.  Any other failure refuses it
#: for good.
TRANSIENT = frozenset({0x0110, 0x0213})


class _RefusedForGood(Exception):
    """The requestor answered a report with a status that will not change."""


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
        #: Open associations each requestor may be sent reports on, by AE title.
        self._associations: dict[str, weakref.WeakSet[Any]] = {}
        #: Requestors that opened such an association: their waiting requests to claim.
        self._arrived: list[str] = []
        #: Requestors that left a report unanswered for a DIMSE timeout, and until when
        #: (monotonic) an association they open claims nothing: each claim would hold
        #: this thread for another timeout, the other requestors' results behind it.
        self._silent: dict[str, float] = {}
        self._order = itertools.count()
        self._message_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None
        self._tls: ssl.SSLContext | None = None

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

    def associated(self, assoc: Association) -> None:
        """EVT_ESTABLISHED: an association a report may go on (it accepted the Push
        Model and runs the seam's reactor) is kept as its requestor's, and results
        waiting for that requestor are looked for."""
        if not notify.available(assoc, PUSH_MODEL):
            return
        requestor = str(assoc.requestor.ae_title or "").strip()
        now = time.monotonic()
        with self._lock:
            # Titles whose associations have all ended go: a peer may call with any.
            for gone in [ae for ae, open_ in self._associations.items() if not open_]:
                del self._associations[gone]
            for gone in [ae for ae, until in self._silent.items() if until <= now]:
                del self._silent[gone]
            self._associations.setdefault(requestor, weakref.WeakSet()).add(assoc)
            if requestor not in self._arrived and requestor not in self._silent:
                self._arrived.append(requestor)
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
            if self._ready or self._arrived:
                return 0.0
            if self._verified:
                until = min(until, self._verified[0].due)
        return max(0.0, until - time.monotonic())

    def _work_local(self) -> bool:
        """Verify one answered request, report one verified whose time has come, or
        claim the waiting requests of a requestor that opened an association; False
        when there was nothing to do."""
        with self._lock:
            ready = self._ready.pop(0) if self._ready else None
            job = None
            if ready is None and self._verified and self._verified[0].due <= time.monotonic():
                job = heapq.heappop(self._verified)
            arrived = self._arrived.pop(0) if ready is None and job is None and \
                self._arrived else None
        if ready is not None:
            pending, assoc, answered = ready
            checked = self._checked(pending)
            if checked is not None:
                with self._lock:
                    heapq.heappush(self._verified, _Job(answered + QUIET, next(self._order),
                                                        checked, assoc))
            return True
        if job is not None:
            self._deliver(job.pending, job.assoc)
            return True
        if arrived is not None:
            for pending in self.commitments.of_requestor(arrived, ARRIVAL_CLAIMS):
                self._deliver(pending, None)
            return True
        return False

    def _poll_queue(self) -> float:
        """Claim and deliver one request due in the queue; seconds until the next look
        (none when one was found: there may be more, after the local work)."""
        claimed = self.commitments.due(1)
        if claimed:
            self._deliver(claimed[0], None)
            return 0.0
        found = self.commitments.next_time()
        if found is None:
            return POLL
        return min(POLL, max(0.0, found - time.time()))

    # -- one request --------------------------------------------------------------------

    def _checked(self, pending: Pending) -> Pending | None:
        """The request with its result checked and kept: verified the first time (the
        objects read, :meth:`~pacs.core.commitment.Commitments.verify`), its committed
        instances looked up again after (:meth:`~pacs.core.commitment.Commitments.
        recheck`); ``None`` when it was lost or the check failed (tried again later)."""
        try:
            if pending.result is None:
                return self.commitments.verify(pending, self.services.store)
            return self.commitments.recheck(pending)
        except PacsError as exc:
            delay = self.commitments.failed(pending, f"check failed: {exc}")
            log.warning("storage commitment: the instances could not be checked (%s); "
                        "again in %.0f s", exc, delay)
            return None

    def _deliver(self, pending: Pending, assoc: Association | None) -> None:
        """Report the result, checked first (:meth:`_checked`): on an association of
        the requestor when one is quiet in time, else on a new association to its
        address, else keep it for later (see the module docstring)."""
        if not self.commitments.renew(pending):
            return  # another process took it
        checked = self._checked(pending)
        if checked is None:
            return
        pending = checked
        requestor = pending.request.requestor_ae
        error: str | None = None
        try:
            for target in self._associations_of(pending, assoc):
                error = self._send_on(target, pending)
                if error is None:
                    self._delivered(pending, "on the requestor's association")
                    return
                log.info("storage commitment: the report to %s on its association did "
                         "not go (%s)", requestor, error)
                if not self.commitments.renew(pending):
                    return
            if error == notify.NO_RESPONSE or self._is_silent(requestor):
                self._silence(pending, error or "held off: it left a report unanswered")
                return
            destination = self.services.settings.destinations.get(requestor)
            if destination is None:
                self._keep(pending, error or "no association of the requestor is open")
                return
            error = self._send_new(pending, over_tls_if_known(self.services, destination))
        except _RefusedForGood as refused:
            self.commitments.remove(pending)
            log.warning("storage commitment: the result for %s is dropped: it %s",
                        requestor, str(refused))
            return
        if error is None:
            self._delivered(pending, "on a new association")
            return
        delay = self.commitments.failed(pending, error)
        # Its other results wait as long: one requestor that does not answer must not
        # keep the results of every other waiting behind one timeout per result.
        others = self.commitments.postpone_requestor(pending, delay)
        log.warning("storage commitment: the report to %s could not be delivered (%s); "
                    "again in %.0f s (with %d other result(s) for it)", requestor, error,
                    delay, others)

    def _associations_of(self, pending: Pending, assoc: Association | None
                         ) -> list[Association]:
        """The open associations a report of ``pending`` may go on: ``assoc`` (the
        request's own) first, then those its requestor opened since, from the
        request's address when it is known; none while the requestor is held off
        (:meth:`_silence`)."""
        request = pending.request
        if self._is_silent(request.requestor_ae):
            return []  # held off (_silence): none of its associations for now
        with self._lock:
            known = list(self._associations.get(request.requestor_ae, ()))
        found = [assoc] if assoc is not None else []
        found += [other for other in known if other is not assoc]
        return [one for one in found if notify.available(one, PUSH_MODEL)
                and (not request.address
                     or str(one.requestor.address or "") == request.address)]

    def _is_silent(self, requestor: str) -> bool:
        """True while ``requestor`` is held off (:meth:`_silence`)."""
        with self._lock:
            return self._silent.get(requestor, 0.0) > time.monotonic()

    def _silence(self, pending: Pending, error: str) -> None:
        """``pending``'s requestor left its report unanswered for a DIMSE timeout (the
        association is aborted, :func:`pacs.dimse.seam.notify.report`): this result
        and its others, the associations it opens and new ones to its address wait
        :data:`SILENT_TIMEOUTS` DIMSE timeouts, so that a requestor that never answers
        holds this thread, and every other requestor's results behind it, for one
        timeout in that many, not one per result or per association."""
        requestor = pending.request.requestor_ae
        with self._lock:
            until = self._silent.get(requestor, 0.0)
            hold = max(until - time.monotonic(),
                       SILENT_TIMEOUTS * self.services.settings.dimse_timeout
                       if error == notify.NO_RESPONSE else 0.0)
            self._silent[requestor] = time.monotonic() + hold
        self.commitments.failed(pending, error, at_least=hold)
        others = self.commitments.postpone_requestor(pending, hold)
        if error == notify.NO_RESPONSE:
            log.warning("storage commitment: %s did not answer a report within the DIMSE "
                        "timeout; its results (this one and %d other(s)) wait %.0f s",
                        requestor, others, hold)

    def _keep(self, pending: Pending, error: str) -> None:
        """A requestor without an address: keep its result for an association of its
        own, for :data:`KEEP_UNREACHABLE` seconds after its request at most."""
        requestor = pending.request.requestor_ae
        waited = self.commitments.clock() - pending.received
        if waited >= KEEP_UNREACHABLE:
            self.commitments.remove(pending)
            log.warning("storage commitment: the result for %s is dropped: its AE title "
                        "is not in PACS_MODALITIES and none of its associations was open "
                        "and quiet in %.0f s (%s)", requestor, waited, error)
            return
        delay = self.commitments.failed(pending, error)
        # Said once per result: each of a thousand waiting results tried again every
        # few seconds at first made a line of its own each time.
        log.log(logging.INFO if pending.attempts == 0 else logging.DEBUG,
                "storage commitment: the result for %s waits for one of its "
                "associations (%s; its AE title is not in PACS_MODALITIES); again in "
                "%.0f s or when it opens one", requestor, error, delay)

    def _delivered(self, pending: Pending, how: str) -> None:
        self.commitments.remove(pending)
        result = pending.result
        assert result is not None  # verified before any delivery
        log.info("storage commitment result delivered to %s %s: %d committed, %d failed",
                 pending.request.requestor_ae, how, len(result.committed),
                 len(result.failed))

    def _report(self, pending: Pending) -> notify.EventReport:
        """The N-EVENT-REPORT of ``pending``'s result (PS3.4 J.3.3)."""
        result = pending.result
        assert result is not None
        information = commitment.event_information(
            pending.request.transaction_uid, result, self._title(pending))
        return notify.EventReport(PUSH_MODEL, PUSH_MODEL_INSTANCE, result.event_type,
                                  information, next(self._message_ids) % 0x10000 or 1)

    def _send_on(self, assoc: Association, pending: Pending) -> str | None:
        """Send the report on a requestor's association once it is quiet; ``None`` when
        the requestor answered Success, else what went wrong."""
        outcome = notify.report(assoc, self._report(pending), QUIET, QUIET_WAIT,
                                self.services.settings.dimse_timeout)
        if outcome.status is None:
            return outcome.error or "no response"
        return _answer(outcome.status)

    def _send_new(self, pending: Pending, destination: Modality) -> str | None:
        """Send the report on an association of its own to the requestor's address."""
        settings = self.services.settings
        try:
            assoc = handlers.open_association(
                self._entity(), destination.host, destination.port,
                contexts=[build_context(PUSH_MODEL, SYNTAXES)],
                ae_title=destination.ae_title,
                ext_neg=[build_role(PUSH_MODEL, scp_role=True)], max_pdu=settings.max_pdu,
                tls_args=self._tls_args(destination),
                evt_handlers=[(evt.EVT_CONN_OPEN,
                               handlers.requested_as(self._title(pending))),
                              *handlers.Responses().handlers()])
        except Exception as exc:  # noqa: BLE001 - tried again later like any failure
            return failure_text(exc)
        if assoc is None:
            return f"no association with {destination.host}:{destination.port}"
        try:
            if not any(context.abstract_syntax == PUSH_MODEL and context.as_scp
                       for context in assoc.accepted_contexts):
                return "the SCP role this node proposed was not accepted"
            report = self._report(pending)
            status, _ = assoc.send_n_event_report(
                report.information, report.event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE,
                msg_id=report.message_id)
        except Exception as exc:  # noqa: BLE001 - a peer gone meanwhile, a refused context
            return failure_text(exc)
        finally:
            if assoc.is_established:
                assoc.release()
        code = status.get("Status")
        if code is None:
            return "no response"
        return _answer(int(code))

    def _title(self, pending: Pending) -> str:
        """The node's AE title for this request's report: the one it was asked on (the
        requestor knows the node by it), else the customer's first."""
        return pending.request.called_ae or self.services.settings.ae_title

    def _tls_args(self, destination: Modality) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` to reach ``destination``: a TLS requestor (PS3.15
        B.12) is reached over TLS or not at all; the context is made once.

        Raises
        ------
        ConfigError
            An unreadable or invalid TLS file (the report is tried again later).
        """
        if not destination.tls:
            return None
        if self._tls is None:
            self._tls = tls.destination_context(self.services.settings)
        return self._tls, destination.host

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


def _answer(status: int) -> str | None:
    """``None`` for Success or a warning (PS3.7 C: 0001, 0107, 0116, Bxxx; the report
    was taken); what went wrong for a status after which the report is sent again
    (:data:`TRANSIENT`).

    Raises
    ------
    _RefusedForGood
        Any other status.
    """
    if classify(status) is not Outcome.FAILED:
        return None
    if status in TRANSIENT:
        return f"answered {status:04X}"
    raise _RefusedForGood(f"was answered {status:04X}")
