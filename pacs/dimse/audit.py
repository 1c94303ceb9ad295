"""The DIMSE side of the audit trail: what each association did, as PS3.15 A.5 events
(:mod:`pacs.core.audit`).

=============================  ===========================================================
operation                      event (PS3.15)
=============================  ===========================================================
C-STORE (all of one            DICOM Instances Transferred (A.5.3.7), C: the calling AE
association)                   (source, requestor) to the node (U: the instances that
                               replaced a different object under their UID, R: those
                               the node held already; an event each); written when the
                               association ends (and when it has sent 1000 studies,
                               MAX_STUDIES_PER_EVENT), one event per patient the
                               instances named (not the index's patient of their study:
                               a study may hold two), each study with its SOP classes
                               and instance counts (kept as counts while it runs), the
                               outcome 0 when every store succeeded, 4 when some
                               failed, 8 when all did
C-FIND (each request)          Query (A.5.3.10): the identifier as received
                               (ParticipantObjectQuery), its transfer syntax and its keys'
                               tags, the outcome of the final status
C-MOVE, C-GET (each request)   Begin Transferring DICOM Instances (A.5.3.3) before the
                               first sub-operation, then DICOM Instances Transferred
                               (A.5.3.7), R, with the final status and the counts: the
                               node (source) to the move destination (its AE title and
                               host), the calling AE as requestor; for C-GET the calling
                               AE is the destination.  A retrieve refused before
                               anything was planned (0124, A801, A900, A701) is one
                               DICOM Instances Transferred without studies and with the
                               failure; one whose destination refused the association
                               (or could not be reached) names the studies planned, in
                               that event alone (no Begin Transferring: nothing began)
N-ACTION (storage commitment   DICOM Instances Accessed (A.5.3.6): the requestor and
request)                       the node (R: the instances are read back to be checked),
                               the number of instances referenced, the status
=============================  ===========================================================

C-ECHO touches no patient data and is not recorded.  Who: the calling AE title and the
peer's address of the association.  Outcomes: :func:`pacs.core.audit.dimse_outcome`.

:class:`Audits` keeps one :class:`AssociationAudit` per association of a node server
(created at its first operation, closed by EVT_RELEASED, EVT_ABORTED or EVT_CONN_CLOSE,
whichever comes first); the plain functions of C-STORE, C-FIND, C-MOVE / C-GET and
N-ACTION report to it (their ``audit`` argument), with the seam and without it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from pacs.core import audit
from pacs.core.audit import AuditTrail, Participant, Patient, Study
from pacs.dimse.status import NOT_AUTHORIZED, Status

if TYPE_CHECKING:
    from pacs.core.config import Modality
    from pacs.core.query.model import InstanceRef
    from pacs.dimse.connection import Request, Responder, SubOperationCounts

log = logging.getLogger(__name__)

#: Statuses of a retrieve that end it without sub-operations and without failure.
_NOTHING_TO_DO = 0x0000
#: Refused: Not Authorized (PS3.7 C.5.21): a request refused for who made it, which
#: the trail coalesces when it repeats (:class:`pacs.core.audit.Coalescer`).
_NOT_AUTHORIZED = NOT_AUTHORIZED.code

#: Most studies an association's C-STORE events are kept for (a study counted once
#: per patient its instances named and per EventActionCode): once a C-STORE brings
#: the next one, the events of those stored so far are written and new ones begun.
#: What an association holds for the trail (and the lines its events make) is then
#: bounded however many studies it sends (one ``dcmsend`` of a whole archive is one
#: association).
MAX_STUDIES_PER_EVENT = 1000
#: Seconds of C-STOREs one event counts at most: what an association stored is written
#: then, not only when it ends, so that a worker killed during a long association
#: (a whole archive sent on one) loses the record of that many seconds at most.
STORES_PER_EVENT_SECONDS = 10.0


#: What a C-STORE of each EventActionCode but C did, for its event's description.
_DONE = {audit.UPDATE: "replaced a different object", audit.READ: "already held"}


def keys_of(identifier: Dataset) -> list[str]:
    """The tags of an identifier's keys (``00100010``; ``00081032.00080100`` for a key
    of a sequence item), without their values."""
    keys = []
    for element in identifier:
        tag = f"{int(element.tag):08X}"
        if element.VR == "SQ" and element.value:
            items = [f"{tag}.{int(inner.tag):08X}" for item in element.value for inner in item]
            keys += items or [tag]
        else:
            keys.append(tag)
    return list(dict.fromkeys(keys))


@dataclass
class _Retrieve:
    """One C-MOVE / C-GET of the association, from its request to its final response."""

    request: Request
    destination: Participant
    studies: list[Study] = field(default_factory=list)
    began: bool = False


class AssociationAudit:
    """What one association did, reported by the DIMSE logic and written to the trail.

    Parameters
    ----------
    trail : AuditTrail
        The node's trail.
    calling_ae : str
        The requestor's AE title.
    address : str
        The requestor's IP address.
    """

    def __init__(self, trail: AuditTrail, calling_ae: str, address: str) -> None:
        self.trail = trail
        self.requestor = Participant(calling_ae.strip() or "(none)", True, address=address)
        self._lock = threading.Lock()
        # The C-STOREs answered, counted by what each did to the node's copy (its
        # EventActionCode: the label of its count too), study and patient.
        self._counts = audit.Counts(MAX_STUDIES_PER_EVENT, STORES_PER_EVENT_SECONDS)
        self._closed = False
        self._retrieves: dict[int, _Retrieve] = {}

    # -- C-STORE -------------------------------------------------------------------

    def stored(self, study_uid: str, sop_class_uid: str, status: Status,
               action: str = audit.CREATE, patient: Patient | None = None) -> None:
        """One C-STORE answered with ``status`` (the study unknown when it failed);
        ``action``, what it did to the node's copy: the EventActionCode of its event
        (:data:`pacs.core.ingest.TRANSFER_ACTION`); ``patient``, whom the instance
        names (:attr:`pacs.core.ingest.StoreResult.patient`; ``None``: unknown, no
        Patient object)."""
        success = audit.dimse_outcome(status.code) == audit.SUCCESS
        full = None
        with self._lock:
            closed = self._closed
            if not closed:
                counts = self._counts
                if success and counts.full_for(action, study_uid, patient):
                    full = counts.take()
                if success:
                    counts.add(action, study_uid, sop_class_uid, patient, action)
                else:
                    counts.fail()
                if full is None and counts.due():
                    full = counts.take()
        try:  # the C-STORE is answered whatever happens to its event
            if full is not None:  # written outside the lock: no other store waits on it
                self._write_stores(full)
            if closed:
                # The association ended while this store ran (an abort): its event alone.
                groups = audit.studies_by_patient(
                    [(study_uid, sop_class_uid, patient)] if success else [])
                self.trail.received(audit.APPLICATION_SERVER, action, self.requestor,
                                    self.trail.node(), groups,
                                    audit.dimse_outcome(status.code),
                                    f"C-STORE status {status.code:04X}")
        except Exception:
            log.error("audit trail: the event of C-STOREs could not be made", exc_info=True)

    def _write_stores(self, counts: audit.Counts) -> None:
        """One event per action and patient: the failures go with the instances new to
        the node (C), the event of the C-STOREs as a whole; those that replaced a
        different object (U) or met the node's copy (R) have theirs."""
        groups = counts.by_action()
        if counts.failed:
            groups.setdefault(audit.CREATE, {})
        for action, by_patient in groups.items():
            count = counts.done.get(action, 0)
            if action == audit.CREATE:  # 8 only when no store of any action succeeded
                outcome, description = (counts.outcome(),
                                        f"C-STORE: {count} stored, {counts.failed} failed")
            else:
                outcome, description = audit.SUCCESS, f"C-STORE: {count} {_DONE[action]}"
            self.trail.received(audit.APPLICATION_SERVER, action, self.requestor,
                                self.trail.node(), by_patient, outcome, description)

    # -- C-FIND --------------------------------------------------------------------

    def queried(self, request: Request, keys: Sequence[str], status: Status | None) -> None:
        """One C-FIND request, answered finally with ``status`` (``None``: the
        requestor went away first)."""
        if status is None:
            outcome, description = (audit.SERIOUS_FAILURE,
                                    "C-FIND: the requestor went away before the final response")
        else:
            outcome = audit.dimse_outcome(status.code)
            description = f"C-FIND status {status.code:04X}"
        self.trail.query(audit.APPLICATION_SERVER, self.requestor, request.sop_class_uid,
                         request.identifier, keys, outcome, description,
                         transfer_syntax=request.transfer_syntax,
                         refused=status is not None and status.code == _NOT_AUTHORIZED,
                         size=request.identifier_received or None)

    # -- C-MOVE, C-GET ----------------------------------------------------------------

    def retrieve_requested(self, request: Request, destination: Modality | None = None, *,
                           get: bool = False) -> None:
        """A C-MOVE to ``destination`` (``None``: not a configured one) or a C-GET
        (``get``) arrived."""
        if get:
            receiver = self.requestor  # C-GET: the requestor receives
        elif destination is not None:
            receiver = Participant(destination.ae_title, False, address=destination.host)
        else:
            receiver = Participant(request.move_destination.strip() or "(none)", False)
        with self._lock:
            self._retrieves[request.message_id] = _Retrieve(request, receiver)

    def retrieve_began(self, message_id: int, refs: Iterable[InstanceRef]) -> None:
        """The sub-operations of a retrieve start, over these instances."""
        with self._lock:
            retrieve = self._retrieves.get(message_id)
        if retrieve is None:
            return
        retrieve.studies = audit.studies_of((ref.study_uid, ref.sop_class_uid) for ref in refs)
        retrieve.began = True
        self.trail.begin_transferring(audit.APPLICATION_SERVER, self.trail.node(),
                                      retrieve.destination, retrieve.studies,
                                      others=self._others(retrieve))

    def retrieve_unsent(self, message_id: int, refs: Iterable[InstanceRef]) -> None:
        """The sub-operations of a retrieve over these instances could not start (its
        destination refused the association, or could not be reached): its final
        event names them.

        PS3.15 A.5.3.7 wants the studies of the transfer, a failed one too: they are
        what the requestor asked to send where, which an auditor looks for.  No Begin
        Transferring (A.5.3.3) is written: it records the start of a transfer, and none
        started; the one event, a serious failure, says what was to go and that
        nothing went.
        """
        with self._lock:
            retrieve = self._retrieves.get(message_id)
        if retrieve is not None:
            retrieve.studies = audit.studies_of((ref.study_uid, ref.sop_class_uid)
                                                for ref in refs)

    def retrieve_ended(self, message_id: int, status: int | None,
                       counts: tuple[int, int, int] | None = None) -> None:
        """The final response of a retrieve: its status (``None``: the association
        ended first) and (completed, warning, failed) counts."""
        with self._lock:
            retrieve = self._retrieves.pop(message_id, None)
        if retrieve is None or (not retrieve.began and status == _NOTHING_TO_DO):
            return  # nothing matched: no patient data left the node
        service = "C-MOVE" if retrieve.destination is not self.requestor else "C-GET"
        if status is None:
            description = f"{service}: the association ended before the final response"
        else:
            description = f"{service} status {status:04X}"
        if counts is not None:
            description += (f": {counts[0]} completed, {counts[1]} warning, "
                            f"{counts[2]} failed")
        outcome = audit.SERIOUS_FAILURE if status is None else audit.dimse_outcome(status)
        self.trail.transferred(audit.APPLICATION_SERVER, audit.READ, self.trail.node(),
                               retrieve.destination, retrieve.studies, outcome,
                               description, others=self._others(retrieve),
                               refused=status == _NOT_AUTHORIZED)

    # -- storage commitment --------------------------------------------------------------

    def commitment_requested(self, references: int, status: Status) -> None:
        """One storage commitment request (N-ACTION, PS3.4 J.3.2) of ``references``
        instances, answered with ``status``."""
        self.trail.accessed(audit.APPLICATION_SERVER, audit.READ,
                            [self.requestor, self.trail.node()], [],
                            audit.dimse_outcome(status.code),
                            f"Storage commitment request of {references} instance(s): "
                            f"N-ACTION status {status.code:04X}",
                            refused=status.code == _NOT_AUTHORIZED)

    def _others(self, retrieve: _Retrieve) -> list[Participant]:
        """The requestor of a C-MOVE, a third party to the transfer."""
        return [] if retrieve.destination is self.requestor else [self.requestor]

    def close(self) -> None:
        """The association ended: write its C-STORE event, and end the retrieves it
        left without a final response (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unfinished = [m for m, r in self._retrieves.items() if r.began]
            counted = self._counts.take()
        self._write_stores(counted)
        for message_id in unfinished:
            self.retrieve_ended(message_id, None)


class AuditedResponder:
    """A C-MOVE / C-GET requestor (:class:`~pacs.dimse.connection.Responder`) whose
    final response is also reported to the association's audit."""

    def __init__(self, responder: Responder, request: Request,
                 audit_of: AssociationAudit) -> None:
        self.responder = responder
        self.request = request
        self.audit = audit_of

    @property
    def alive(self) -> bool:
        return self.responder.alive

    def cancelled(self) -> bool:
        return self.responder.cancelled()

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: SubOperationCounts | None = None) -> None:
        self.responder.send_response(status, identifier, counts)
        if not status.is_pending:
            self.audit.retrieve_ended(
                self.request.message_id, status.code,
                None if counts is None else (counts.completed, counts.warning, counts.failed))


class Audits:
    """The :class:`AssociationAudit` of each association of one node server.

    Parameters
    ----------
    trail : AuditTrail
        The node's trail; when it is off, :meth:`of` gives ``None`` and nothing is kept.
    """

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[Any, AssociationAudit] = (
            weakref.WeakKeyDictionary())

    def of(self, assoc: Any) -> AssociationAudit | None:
        """The audit of ``assoc`` (a pynetdicom association), made at its first use."""
        if not self.trail.enabled:
            return None
        with self._lock:
            found = self._open.get(assoc)
            if found is None:
                requestor = assoc.requestor
                found = AssociationAudit(self.trail, str(requestor.ae_title or ""),
                                         str(requestor.address or ""))
                self._open[assoc] = found
            return found

    def ended(self, event: Any) -> None:
        """EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE: write what the association did."""
        with self._lock:
            found = self._open.pop(event.assoc, None)
        if found is not None:
            try:
                found.close()
            except Exception:  # the association's end never fails for the trail
                log.error("audit trail: the events of an association could not be made",
                          exc_info=True)
