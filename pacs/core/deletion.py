"""Removing instances: ``pacs delete``, the DICOMweb DELETE and reject routes, IOCM
rejection notes and the data retention schedule all end here.

One order, safe beside a running node (every process opens its own connections; the
per-UID lock and one transaction keep them apart):

1. take the ingest's lock of each SOP Instance UID (:meth:`pacs.core.ingest.Ingest.
   uid_locks`), so that no store or repair of the same instance runs meanwhile, and
   read the rows again under it (an instance may have moved or gone): only a row still
   at the place the removal names is removed (:func:`still_planned`);
2. in one write transaction (:func:`delete_rows`): delete the instance rows (their
   metadata and their intake copies, :mod:`pacs.core.intake`, go with them; series,
   study and patient rows left empty are removed, so every count stays right) and
   write a tombstone per removed SOP Instance UID (why, by whom, when), and record
   their objects' keys as to be deleted (table ``object_deletion``);
3. delete the objects from the backend store (folder or S3) only: the intake holds
   nothing of them any more after 2 (its files of them are removed too,
   :meth:`pacs.core.intake.IntakeStore.tidy`); then forget the keys deleted.

Nothing half-deleted is ever visible: after 2 no row names the instances, and every
read goes through the index or the intake first.  A crash between 2 and 3, or a store
that fails in 3, leaves objects no row names, each with a tombstone and its key
recorded: the intake's mover deletes them once the store answers, under their UIDs'
locks, unless the instance was stored again at that key meanwhile
(:meth:`pacs.core.intake.Mover.delete_removed`), so no operator has to; ``pacs fsck``
reports such an object as removed and ``--repair`` deletes it rather than index it
(:mod:`pacs.core.reconcile`), so a removed instance never comes back, and no row ever
names a missing object.  A deletion the store did not answer (S3 stalled:
:class:`~pacs.core.errors.UnsettledWrite`) may still be carried out later, over an
object stored at the key since: the key becomes unsettled (:mod:`pacs.core.intake`),
and the removal does not try its objects after it (the mover does), so that a removal
of thousands of instances does not hold their locks for a timeout each; it goes on
removing rows, and its log line counts the objects left.

What a removal names was read without any lock (:meth:`Deleter.plan`: a study may hold
more instances than one transaction should), so each instance may have been stored again
before its lock is taken, and acknowledged.  Sent again into another study or series (its
UIDs corrected), it is no longer in what the removal names: it stays, without a
tombstone (one would refuse it at its new place for good).  Sent again to the same place
with other content, its row has a new change number (``instance.change_seq``): a
deletion, an expiry or a rejection whose reason lets the instance back in (113039,
data retention expired) leaves it, as if it had run before that store (an expiry, which
decided by the old arrival time, could not have chosen the study otherwise); a rejection
whose reason refuses it again removes it, as if it had run after (had it run before,
that store would have been refused by its tombstone,
:func:`pacs.core.rejection.refuses_again`).  Either way the result is one of the two
orders the node could have served the requests in; and a removal a crash cut short,
finished at the next start-up (:meth:`Deleter.resume`), does not take an instance a
sender stored again meanwhile with other content, and was told was stored, unless
its reason would have refused that store.

Large removals run in chunks of :data:`CHUNK` instances, each its own transaction, so
that the node's own stores never wait long for the index.

Every removal is one audit event per patient (PS3.15 A.5.3.8 DICOM Study Deleted for
studies removed whole, A.5.3.6 DICOM Instances Accessed with action D for parts of
studies) and one INFO log line with counts only (no UIDs: they identify a patient's
study).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import apsw

from pacs.core import audit
from pacs.core.attributes import Level
from pacs.core.audit import AuditTrail, Participant, Patient, Study
from pacs.core.dataset import require_uid
from pacs.core.errors import IndexFailure, InvalidUID, NotFound, PacsError, UnsettledWrite
from pacs.core.index import reads, writer
from pacs.core.index.connection import Index
from pacs.core.index.reads import Located
from pacs.core.ingest import RECEIVED_FORMAT, Analysis, Ingest, patient_key
from pacs.core.intake import IntakeStore
from pacs.core.rejection import Reason, Reference, refuses_again
from pacs.core.storage import object_key

log = logging.getLogger(__name__)

#: Instances removed per transaction (and per read of their rows).
CHUNK = reads.MAX_KEYS

#: What a tombstone says of a plain deletion (no rejection code).
NO_REASON = ("", "")


@dataclass(frozen=True)
class Target:
    """What to remove: a study, a series of it, or one instance of that series."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        """``STUDY[/SERIES[/SOP]]`` (UIDs).

        Raises
        ------
        InvalidUID
            Not one to three valid UIDs separated by ``/``.
        """
        parts = text.strip().strip("/").split("/")
        if not 1 <= len(parts) <= 3:
            raise InvalidUID("expected STUDY[/SERIES[/SOP]]")
        uids = [require_uid(part, name) for part, name
                in zip(parts, ("the Study UID", "the Series UID", "the SOP Instance UID"),
                       strict=False)]
        return cls(*uids)

    @property
    def level(self) -> str:
        """What the target names: ``study``, ``series`` or ``instance``."""
        if self.sop_uid is not None:
            return "instance"
        return "series" if self.series_uid is not None else "study"

    def __str__(self) -> str:
        return "/".join(uid for uid in (self.study_uid, self.series_uid, self.sop_uid)
                        if uid is not None)


@dataclass
class Removal:
    """What a removal did.

    Attributes
    ----------
    instances, size :
        Instances removed and the bytes of their objects.
    studies :
        Per Study Instance UID, the removed instances per SOP Class UID.
    whole :
        The studies left without any instance (removed whole).
    objects_left :
        Objects whose deletion failed or was not tried once one had failed (their rows
        are gone and their tombstones kept: ``pacs fsck --repair`` deletes them).
    store_error :
        The store's first deletion it did not answer (stalled), after which no
        object deletion is tried.
    skipped :
        Instances a rejection note names that it may not remove (another patient's,
        or at another place than the note says).
    superseded :
        Instances stored again since the removal was planned (at another place, or,
        for a deletion, with other content: :func:`still_planned`), left as stored.
    """

    instances: int = 0
    size: int = 0
    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)
    objects_left: int = 0
    skipped: int = 0
    superseded: int = 0
    store_error: str = ""

    def count(self, row: Located) -> None:
        """Add one removed instance."""
        self.instances += 1
        self.size += row.size
        classes = self.studies.setdefault(row.study_uid, {})
        if row.sop_class_uid:
            classes[row.sop_class_uid] = classes.get(row.sop_class_uid, 0) + 1

    def add(self, other: Removal) -> None:
        """Count what ``other`` (a later chunk of the same removal) did too."""
        self.instances += other.instances
        self.size += other.size
        for study, classes in other.studies.items():
            mine = self.studies.setdefault(study, {})
            for sop_class, count in classes.items():
                mine[sop_class] = mine.get(sop_class, 0) + count
        self.whole |= other.whole
        self.objects_left += other.objects_left
        self.skipped += other.skipped
        self.superseded += other.superseded
        self.store_error = self.store_error or other.store_error

    def summary(self) -> str:
        """Counts and sizes, no UIDs (for the log and the command)."""
        text = (f"{self.instances} instance(s) of {len(self.studies)} stud(ies), "
                f"{self.size} bytes; {len(self.whole)} stud(ies) removed whole")
        if self.skipped:
            text += f"; {self.skipped} reference(s) not removed (another patient or place)"
        if self.superseded:
            text += (f"; {self.superseded} instance(s) stored again meanwhile, "
                     "left as stored")
        if self.objects_left:
            text += (f"; {self.objects_left} object(s) left in the store, deleted by "
                     "the intake's mover once it answers")
        return text


def delete_rows(conn: apsw.Connection, rows: Iterable[Located],
                tombstones: Iterable[Reference], reason: tuple[str, str], who: str,
                when: str) -> None:
    """Step 2 of the module docstring, inside the caller's write transaction: the
    instance rows (and the parents they leave empty) out, the tombstones in.

    The one place that removes rows for a deletion: whatever else holds an instance's
    data in the index goes here, in the same transaction.
    """
    for row in rows:
        writer.delete_instance(conn, row.sop_uid)
    for stone in tombstones:
        writer.add_tombstone(conn, stone.sop_uid, stone.study_uid, stone.series_uid, reason,
                             who, when)


def _pending_writer(places: Sequence[Reference], who: Participant, kind: audit.Code,
                    reason: Reason | None) -> Callable[[apsw.Connection], int] | None:
    """What writes the pending record of a removal of ``places`` into a transaction,
    its id returned (``None`` for no places)."""
    if not places:
        return None
    text = json.dumps([[p.study_uid, p.series_uid, p.sop_uid,
                        p.change_seq if isinstance(p, Planned) else None]
                       for p in places], separators=(",", ":"))
    why = json.dumps([reason.code, reason.scheme, reason.meaning]) if reason else ""
    return lambda conn: writer.removal_pending(conn, who.user_id, who.address, kind.code,
                                               why, text, time.time())


class _Pending:
    """A removal's pending record: ``id`` once committed (or carried out again,
    ``resume``), written by the transaction of its first chunk that removes something
    (:meth:`record`, then :meth:`committed` once that transaction has committed)."""

    def __init__(self, resume: int | None,
                 write: Callable[[apsw.Connection], int] | None) -> None:
        self.id = resume
        self._write = write

    def record(self, conn: apsw.Connection) -> int | None:
        """Write the record in ``conn``'s transaction unless it is written; its id."""
        if self.id is not None or self._write is None:
            return None
        return self._write(conn)

    def committed(self, recorded: int | None) -> None:
        """The transaction that wrote ``recorded`` (or nothing) has committed."""
        if recorded is not None:
            self.id = recorded


def chunks(items: Sequence[Reference], size: int = CHUNK) -> Iterable[Sequence[Reference]]:
    """``items`` in slices of at most ``size`` (a transaction, a read of rows each)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def rejectable(patient: str, row: Located, place: Reference) -> bool:
    """Whether a rejection note of ``patient`` (:func:`pacs.core.ingest.patient_key`)
    may remove the indexed instance ``row`` it names at ``place``: only the note's
    patient's instances, at the place the note names, so that an error in a note never
    reaches another patient's images."""
    return (row.patient_key == patient and row.study_uid == place.study_uid
            and row.series_uid == place.series_uid)


def _keeps_stricter(conn: apsw.Connection, sop_uid: str, code: tuple[str, str]) -> bool:
    """True when a UID keeps the tombstone it has: one that refuses it when sent again
    (a patient-safety rejection) is never replaced by one that does not (an expired
    retention, a deletion of the UID stored again at another place), which would let
    the rejected instance back in."""
    found = reads.tombstone(conn, sop_uid)
    return (found is not None and refuses_again(found.reason_code, found.reason_scheme)
            and not refuses_again(*code))


@dataclass(frozen=True)
class Planned(Reference):
    """An instance a removal was planned for from the index: its place, and the change
    number its row had then (:attr:`pacs.core.index.reads.Located.change_seq`)."""

    change_seq: int = 0


def reference(row: Located) -> Planned:
    """The place of an indexed instance, as a rejection note would name it, with the
    change number of the row read (what :func:`still_planned` compares)."""
    return Planned(row.study_uid, row.series_uid, row.sop_uid, row.change_seq)


def still_planned(row: Located, place: Reference, exact: bool) -> bool:
    """Whether the indexed ``row``, read under its UID's lock, is still the instance a
    removal named at ``place`` (module docstring).

    It must be at the same study and series: an instance sent again with corrected UIDs
    lives elsewhere now.  With ``exact`` (a deletion, an expiry or a rejection whose
    reason lets the instance back in, whose result would keep an object stored after
    it) and a place planned from the index (:class:`Planned`), it must also be the same
    row version: not stored again since with other content.
    """
    if (row.study_uid, row.series_uid) != (place.study_uid, place.series_uid):
        return False
    return not exact or not isinstance(place, Planned) or row.change_seq == place.change_seq


#: The audit source types (``kind``) of a removal by the code its pending record keeps.
_KINDS = {kind.code: kind for kind in (audit.WEB_SERVER, audit.APPLICATION_SERVER)}


class Deleter:
    """Removes instances from one customer's index and store (module docstring).

    Parameters
    ----------
    index, store, ingest :
        The customer's index and store (the objects are deleted from its backend), and
        the ingest whose per-UID locks a removal takes.
    trail :
        The audit trail every removal is recorded in.
    """

    def __init__(self, index: Index, store: IntakeStore, ingest: Ingest,
                 trail: AuditTrail) -> None:
        self.index = index
        self.store = store
        self.ingest = ingest
        self.trail = trail

    # -- what would go ---------------------------------------------------------------

    def plan(self, targets: Sequence[Target]) -> list[Located]:
        """The instances the targets name, each once, in the order given.

        Raises
        ------
        NotFound
            A target names nothing the index holds.
        """
        found: dict[str, Located] = {}
        conn = self.index.connection()
        for target in targets:
            rows = reads.instances_under(conn, target.study_uid, target.series_uid,
                                         target.sop_uid)
            if not rows:
                raise NotFound(f"no such {target.level}")
            for row in rows:
                found.setdefault(row.sop_uid, row)
        return list(found.values())

    # -- removing --------------------------------------------------------------------

    def remove(self, places: Sequence[Reference], who: Participant, kind: audit.Code, *,
               reason: Reason | None = None,
               accept: Callable[[Located, Reference], bool] | None = None,
               progress: Callable[[int], None] | None = None,
               resume: int | None = None, again: bool = False) -> Removal:
        """Remove the instances at ``places`` (module docstring), audit and log it.

        A removal that can be carried out again from what is recorded (no ``accept``
        rule: a deletion, a rejection by path, an expiry) is recorded as pending in
        the transaction of its first chunk that removes something, and forgotten after
        its last, or once its requestor is told it failed (an error, an interrupt):
        one a dying process cut short is finished at the node's start-up
        (:func:`pacs.core.reconcile.reconcile`, :meth:`resume`), whose own failure
        keeps the record for the next.  Recorded with its first removal, never before
        it, a removal whose first commit fails (a full disk) leaves no record that a
        start-up could carry out after its requestor was told it failed; one that
        fails after a chunk was removed, and whose record cannot be forgotten either,
        is finished at the next start-up (part of it is done: finishing it is what
        was asked).  A rejection note's are recorded with the note
        (:mod:`pacs.core.ingest`).

        Parameters
        ----------
        places :
            The instances to remove (those no longer indexed are passed over; with a
            ``reason`` they still get a tombstone, so that they are refused when they
            arrive).  An instance no longer at its place, or, without a ``reason``,
            stored again since it was planned (:func:`still_planned`), is left as it
            is, without a tombstone, and counted in ``superseded``.
        who :
            The requestor (a user, an AE title, the node), for the tombstones and the
            audit trail.
        kind :
            The audit source type of the process (web server, application server).
        reason :
            The rejection's reason (CID 7010), ``None`` for a plain deletion.
        accept :
            Whether an indexed instance may be removed for the place naming it
            (``None``: all may); one refused is counted in ``skipped`` and left as it is.
        progress :
            Called with the number of places handled after each chunk.
        resume :
            The pending record of a removal cut short, carried out again (none made).
        again :
            Carried out again after a crash (``resume``, a rejection note finished at
            start-up): the objects its first run left of instances it had removed
            (their rows gone, their tombstones in) are deleted too.

        Raises
        ------
        IndexFailure
            The index failed, or (:class:`~pacs.core.errors.InstanceLocked`) a lock of
            a chunk's instances was held longer than the ingest's lock wait; the chunks
            before were removed (and recorded).
        """
        removal = Removal()
        code = (reason.code, reason.scheme) if reason is not None else NO_REASON
        requested = sorted({place.study_uid for place in places})
        patients = self._patients(requested)
        pending = _Pending(resume, None if resume is not None or accept is not None
                           else _pending_writer(places, who, kind, reason))
        try:
            for chunk in chunks(places):
                # Each chunk is audited once committed: a removal cut short (a crash,
                # a failure) leaves the record of what it did.
                part = Removal(store_error=removal.store_error)
                self._remove_chunk(chunk, who.user_id, code, accept, part, partial(
                    self._audit, part, who, kind, reason, patients, audit.SUCCESS,
                    requested), again=again or resume is not None, pending=pending)
                removal.add(part)
                if progress is not None:
                    progress(len(chunk))
        except BaseException as exc:  # whatever stops it here, its requestor sees
            why = str(exc) if isinstance(exc, PacsError) else type(exc).__name__
            with contextlib.suppress(Exception):  # the failure is what must be raised
                self._audit(Removal(), who, kind, reason, patients,
                            audit.SERIOUS_FAILURE, requested, why)
                self._log(removal, who, reason, why)
            # Asked for, the requestor is told and may ask again (an interrupted
            # ``pacs delete`` is not finished at the next start); carried out again
            # (``resume``), nobody is: kept for the next start-up or repair.  Only a
            # process that dies (kill -9, a crash) keeps a removal asked for pending.
            if resume is None:
                self._forget_pending(pending.id)
            raise
        self._log(removal, who, reason)
        self._forget_pending(pending.id)
        return removal

    def _forget_pending(self, pending: int | None) -> None:
        if pending is None:
            return
        try:
            with self.index.write() as conn:
                writer.removal_done(conn, pending)
        except PacsError as exc:  # carried out again at start-up: it finishes the rest
            log.warning("a removal's pending record could not be dropped (%s)", exc)

    def resume(self, pending: reads.PendingRemoval) -> Removal:
        """Carry out again a removal a crash cut short (its pending record): what it
        removed already is passed over, by its requestor, the record dropped after."""
        places = [Planned(study, series, sop, seq) if seq is not None
                  else Reference(study, series, sop)
                  for study, series, sop, seq in json.loads(pending.places)]
        reason = Reason(*json.loads(pending.reason)) if pending.reason else None
        return self.remove(places, Participant(pending.requestor, True,
                                               address=pending.address),
                           _KINDS.get(pending.source, audit.APPLICATION_SERVER),
                           reason=reason, resume=pending.id)

    def _remove_chunk(self, chunk: Sequence[Reference], who: str, code: tuple[str, str],
                      accept: Callable[[Located, Reference], bool] | None,
                      removal: Removal, committed: Callable[[], None],
                      again: bool = False, pending: _Pending | None = None) -> None:
        """Remove one chunk's rows (one transaction, which records the removal as
        ``pending`` when it is the first to remove something), call ``committed`` (its
        audit record: before the object deletions, which on S3 take most of a
        removal's time, so that a crash among them leaves the record of the rows
        removed), then delete their objects, all under the chunk's ingest locks (a UID
        stored again meanwhile must not lose its new object to a late deletion)."""
        uids = [place.sop_uid for place in chunk]
        with self.ingest.uid_locks(uids):
            conn = self.index.connection()
            indexed = {row.sop_uid: row for row in reads.located(conn, uids)}
            rows: list[Located] = []
            stones: list[Reference] = []
            left: list[str] = []  # objects a first run cut short left (``again``)
            for place in chunk:
                row = indexed.get(place.sop_uid)
                if row is None:
                    if again and reads.tombstone(conn, place.sop_uid) is not None:
                        left.append(object_key(place.study_uid, place.series_uid,
                                               place.sop_uid))
                    if code != NO_REASON and not _keeps_stricter(conn, place.sop_uid, code):
                        stones.append(place)  # refused when it arrives
                elif accept is not None and not accept(row, place):
                    removal.skipped += 1
                elif not still_planned(row, place, exact=not refuses_again(*code)):
                    removal.superseded += 1  # no tombstone: it was stored after
                else:
                    rows.append(row)
                    # Its UID may have a stricter tombstone from another place (a
                    # patient-safety rejection of it at another study): that one stays.
                    if not _keeps_stricter(conn, row.sop_uid, code):
                        stones.append(reference(row))
            keys = [row.object_key for row in rows] + left
            if stones or rows:
                when = datetime.now(UTC).strftime(RECEIVED_FORMAT)
                recorded = None
                with self.index.write() as conn:
                    if pending is not None:
                        recorded = pending.record(conn)
                    delete_rows(conn, rows, stones, code, who, when)
                    writer.deletions_pending(conn, keys, time.time())
                    remaining = reads.study_patients(conn,
                                                     sorted({r.study_uid for r in rows}))
                if pending is not None:
                    pending.committed(recorded)
                for row in rows:
                    removal.count(row)
                    if row.study_uid not in remaining:
                        removal.whole.add(row.study_uid)
                committed()
            # Under the chunk's locks an object at a removed UID's key, no row naming
            # it, is what the crash left, never a write in progress.
            deleted = [key for key in keys if self._delete_object(key, removal)]
            if rows:  # their intake files, which their intake rows named
                self.store.tidy({row.sop_uid for row in rows})
            self._forget_deleted(deleted)

    def _forget_deleted(self, keys: list[str]) -> None:
        """Forget the pending deletions of ``keys`` (deleted now); a failure leaves
        them to the intake's mover, whose deletion of a deleted object is a no-op."""
        if not keys:
            return
        try:
            with self.index.write() as conn:
                writer.deletions_done(conn, keys)
        except IndexFailure as exc:
            log.warning("could not record the deletion of removed instances' objects "
                        "(%s); the intake's mover deletes them again", exc)

    def _delete_object(self, key: str, removal: Removal) -> bool:
        """Delete a removed instance's object from the backend (its intake copy went
        with its rows), unless the store failed earlier in this removal: then it is
        left, counted, for the intake's mover (its deletion is pending); True when
        deleted."""
        if removal.store_error:
            removal.objects_left += 1
            return False
        try:
            self.store.backend.delete(key)
        except UnsettledWrite as exc:  # the store recorded the key unsettled
            removal.objects_left += 1
            removal.store_error = str(exc) or type(exc).__name__
            log.warning("the store did not answer the deletion of a removed instance's "
                        "object (%s); the removal's other objects are left too, for "
                        "the intake's mover to delete", removal.store_error)
            return False
        except PacsError as exc:
            removal.objects_left += 1
            log.warning("could not delete the object of a removed instance (%s); the "
                        "intake's mover will", exc)
            return False
        return True

    def _patients(self, study_uids: Sequence[str]) -> Mapping[str, Patient]:
        """The patient of each study, read before its rows go (for the audit trail)."""
        return self.trail.patients_of(study_uids)

    def _audit(self, removal: Removal, who: Participant, kind: audit.Code,
               reason: Reason | None, patients: Mapping[str, Patient], outcome: int,
               requested: Sequence[str], failure: str = "") -> None:
        """The audit events of (a chunk of) a removal; of a failure, naming the studies
        asked for."""
        if not (removal.instances or failure):
            return
        why = f"rejected {reason}" if reason is not None else "deleted"
        description = f"{why}: {removal.summary()}"
        if failure:
            description += f"; failed: {failure}"
        studies = [Study(uid, classes) for uid, classes in removal.studies.items()] or [
            Study(uid) for uid in requested]
        self.trail.deleted(kind, [who, self.trail.node()], studies, removal.whole,
                           patients, outcome, description)

    @staticmethod
    def _log(removal: Removal, who: Participant, reason: Reason | None,
             failure: str = "") -> None:
        """The log line of a removal, once it ended (counts, no UIDs)."""
        if removal.instances or removal.skipped or removal.superseded or failure:
            why = f"rejected {reason}" if reason is not None else "deleted"
            level = logging.WARNING if failure or removal.skipped else logging.INFO
            log.log(level, "%s by %s: %s", why, _who(who), removal.summary()
                    + (f"; failed: {failure}" if failure else ""))

    # -- rejection notes ------------------------------------------------------------

    def reject(self, note: Analysis, who: Participant, *, again: bool = False) -> None:
        """The ingest's hook (:attr:`pacs.core.ingest.Ingest.on_rejection`): remove what
        a stored rejection note rejects.

        Only instances of the note's patient at the place the note names are removed
        (an error in a note never reaches another patient's images); every named UID
        not indexed gets a tombstone, so it is refused when it arrives.
        """
        rejection = note.rejection
        if rejection is None:
            return
        accept = partial(rejectable, patient_key(note.values[Level.PATIENT]))
        self.remove(rejection.references, who, audit.APPLICATION_SERVER,
                    reason=rejection.reason, accept=accept, again=again)

    def refused(self, note: Analysis, who: Participant) -> None:
        """The ingest's hook (:attr:`pacs.core.ingest.Ingest.on_refused_rejection`):
        a rejection note from a sender without the right to remove data is a Security
        Alert, Use of Restricted Function (PS3.15 A.5.3.11, PS3.16 CID 403), a minor
        failure (the attempt was stopped), beside the failed store the edge records."""
        reason = note.rejection.reason.meaning if note.rejection is not None else "?"
        self.trail.security_alert(audit.APPLICATION_SERVER, audit.RESTRICTED_FUNCTION,
                                  f"rejection note refused ({reason}): the sender may "
                                  "not remove data", audit.MINOR_FAILURE, [who])

    # -- retention ------------------------------------------------------------------

    def expire(self, days_by_modality: Sequence[tuple[str, float]],
               default_days: float | None, limit: int, max_instances: int) -> int:
        """Remove up to ``limit`` studies whose retention period is over (their last
        instance received longer ago than it: :func:`pacs.core.index.reads.
        expired_instances`), of ``max_instances`` instances at most but for the first;
        return how many were planned for removal."""
        now = datetime.now(UTC).timestamp() / 86400 + 2440587.5  # a Julian day number
        rows = reads.expired_instances(self.index.connection(), now, days_by_modality,
                                       default_days, limit, max_instances)
        if not rows:
            return 0
        places = [reference(row) for row in rows]
        self.remove(places, self.trail.node(requestor=True), audit.APPLICATION_SERVER)
        return len({row.study_uid for row in rows})


def _who(who: Participant) -> str:
    """The requestor for the log: a user name or AE title, never a patient's data."""
    return who.user_id + (f"@{who.address}" if who.address else "")
