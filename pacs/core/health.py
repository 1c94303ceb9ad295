"""Is the node healthy: the answer of ``GET /health`` and ``pacs status``.

Two depths, because the two callers differ in what they can afford:

- the quick check (``GET /health``, hit every 30 s by Docker's HEALTHCHECK): the store
  answers (folder writable, or bucket reachable with working credentials), the index
  answers a count per level, and bytes stored are summed from the index — never by
  listing the bucket, which costs one request per thousand objects; the intake's
  backlog (objects and bytes acknowledged but not yet in the store, the oldest one's
  age, the mover's last error) is one row;
- the thorough check (``pacs status``, run by a person): also SQLite's
  ``PRAGMA quick_check`` over the whole index file and the bytes actually in the store
  (a full listing on S3).

Nothing here names a patient: counts and sizes only.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pacs.core import audit
from pacs.core.errors import PacsError
from pacs.core.index import outbox, reads
from pacs.core.index.outbox import Backlog
from pacs.core.services import Services
from pacs.core.storage import usage


@dataclass(frozen=True)
class Health:
    """One health check's findings.

    Attributes
    ----------
    store : str
        ``file`` or ``s3``.
    store_reachable : bool
        The store accepted its reachability check.
    store_error : str or None
        Why it did not.
    index : str
        ``ok``, or what the index check reported.
    counts : dict
        Rows per level (``patient``, ``study``, ``series``, ``instance``).
    indexed_bytes : int
        Sum of the indexed objects' sizes.
    store_bytes : int or None
        Bytes found in the store (thorough check only).
    disk_free_bytes : int or None
        Free space on the data folder's file system (the index, and the objects when
        stored in a folder).
    commitments_waiting : int
        Storage commitment results not delivered yet (:mod:`pacs.core.commitment`).
    forwarding : tuple of Backlog
        Each forwarding destination's backlog, failures, last error and last success
        (:mod:`pacs.core.forwarding`).
    intake_objects, intake_bytes : int
        Acknowledged objects (and their bytes) still in the intake, not yet in the
        store (:mod:`pacs.core.intake`).
    intake_oldest_seconds : float or None
        How long the oldest of them has waited.
    intake_error : str or None
        The mover's last error while it lasts (the store failed).
    intake_unsettled : int
        Keys whose last write S3 did not answer: their objects wait in the intake
        until S3 can no longer carry that write out (``PACS_S3_SETTLE``).
    audit : str
        The audit trail: ``ok``, ``off``, or why it cannot be written now
        (:func:`pacs.core.audit.writable`).  The node serves either way (the trail
        fails open), so this does not make the check fail.
    audit_events_lost : int
        Events this process could not write since the trail last worked.
    removals_pending : int
        Removals (deletions, rejections, rejection notes' removals) asked for and not
        all done: running now, or cut short by a crash and finished at the node's next
        start (:mod:`pacs.core.reconcile`); until then what they name is still served.
    deletions_pending : int
        Objects of removed instances not deleted from the store yet: the store failed
        when they were removed (the intake's mover deletes them once it answers), or
        the removal is running.
    index_wal_bytes : int
        Size of the index's write-ahead log.  Checkpoints cut it back to
        ``WAL_SIZE_LIMIT`` (:mod:`pacs.core.index.connection`); past that it grows only
        while a reader keeps an old snapshot open (another process reading the index),
        with every commit, until that reader ends.
    """

    store: str
    store_reachable: bool
    store_error: str | None
    index: str
    counts: dict[str, int] = field(default_factory=dict)
    indexed_bytes: int = 0
    store_bytes: int | None = None
    disk_free_bytes: int | None = None
    commitments_waiting: int = 0
    forwarding: tuple[Backlog, ...] = ()
    intake_objects: int = 0
    intake_bytes: int = 0
    intake_oldest_seconds: float | None = None
    intake_error: str | None = None
    intake_unsettled: int = 0
    audit: str = "off"
    audit_events_lost: int = 0
    removals_pending: int = 0
    deletions_pending: int = 0
    index_wal_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Store reachable and index sound."""
        return self.store_reachable and self.index == "ok"

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready mapping with ``status`` first (``ok`` or ``unhealthy``)."""
        return {"status": "ok" if self.ok else "unhealthy", **asdict(self)}


def check(services: Services, thorough: bool = False) -> Health:
    """Check the store and the index of ``services``.

    Parameters
    ----------
    services : Services
        The node's core.
    thorough : bool
        Run ``PRAGMA quick_check`` (reads the whole index) and measure the store.

    Returns
    -------
    Health
        Never raises for a failing store or index: that is what it reports.
    """
    store_error = None
    try:
        # A check makes nothing: a folder or bucket gone while the node runs (a volume
        # unmounted) is reported, not made anew to take objects beside the lost ones.
        services.store.check(create=False)
    except PacsError as exc:
        store_error = str(exc)
    index_state = "ok"
    counts: dict[str, int] = {}
    indexed_bytes = waiting = removing = deleting = 0
    forwarding: tuple[Backlog, ...] = ()
    intake = reads.IntakeState(0, 0, None, None, None)
    try:
        conn = services.index.connection()
        if thorough:
            index_state = reads.quick_check(conn)
        counts = reads.counts(conn)
        indexed_bytes = reads.indexed_bytes(conn)
        waiting = reads.commitments_waiting(conn)
        forwarding = tuple(outbox.backlogs(conn))
        intake = reads.intake_state(conn)
        removing = reads.removals_pending_count(conn)
        deleting = reads.pending_deletion_count(conn)
    except PacsError as exc:
        index_state = f"error: {exc.__class__.__name__}: {exc}"
    store_bytes = None
    if thorough and store_error is None:
        try:
            store_bytes = usage(services.store)
        except PacsError as exc:
            store_error = str(exc)
    try:
        disk_free: int | None = shutil.disk_usage(services.settings.data_dir).free
    except OSError:
        disk_free = None
    try:
        wal = os.stat(f"{services.settings.index_path}-wal").st_size
    except OSError:
        wal = 0
    return Health(store=services.settings.storage, store_reachable=store_error is None,
                  store_error=store_error, index=index_state, counts=counts,
                  indexed_bytes=indexed_bytes, store_bytes=store_bytes,
                  disk_free_bytes=disk_free, commitments_waiting=waiting,
                  forwarding=forwarding,
                  intake_objects=intake.objects,
                  intake_bytes=intake.bytes,
                  intake_oldest_seconds=(None if intake.oldest is None
                                         else round(max(0.0, time.time() - intake.oldest), 3)),
                  intake_error=intake.mover_error,
                  intake_unsettled=intake.unsettled,
                  audit=audit.writable(services.audit.log.path),
                  audit_events_lost=services.audit.log.dropped,
                  removals_pending=removing, deletions_pending=deleting,
                  index_wal_bytes=wal)
