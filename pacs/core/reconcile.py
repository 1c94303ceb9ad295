"""Repair (``pacs fsck``): make the index and the object store agree after a crash,
never losing an acknowledged object.

What was acknowledged is what the index says: an object is acknowledged only once its
row is committed (:mod:`pacs.core.ingest`, steps 3-5), so for each SOP Instance UID the row
- its object key and the SHA-256 and size of the bytes acknowledged last - is the truth,
and an object no row points to was never acknowledged as it is.  Decisions follow the
row, never the order in which objects are found, their number or their age.

The crash windows of the ingest order and what this module makes of them (every
decision is taken again under the SOP Instance UID's ingest lock,
:meth:`pacs.core.ingest.Ingest.uid_lock`, so that it is safe beside a running node):

(a) a temporary file written, never renamed (folder store): the write was never
    acknowledged; repair deletes temporaries older than ``temp_grace`` (a younger one
    may belong to a write in progress).
(b) an object written at its key, its row never committed:

    - no row for the UID: the object is a complete, durable instance whose sender got
      no answer; repair indexes it (``unacknowledged``), so a resend is a duplicate;
    - a row pointing to another key (a move to another study or series): the row's
      object is the acknowledged one; the new object is ``superseded`` and moved to the
      quarantine, never indexed over the row.
(c) a row committed, the old copy at another key not deleted: the same on disk as the
    second case of (b), and the same answer: the copy no row points to is quarantined.
(d) the same key overwritten in place, the row not committed: the object's checksum
    differs from the row's.  Only an object of the intake's largest blob or more
    (:data:`pacs.core.ingest.DIRECT_OVERWRITE_BYTES`) is written so (a smaller one
    replacing another at its key goes through the intake, the acknowledged bytes left
    at the key until its commit).  For such an object the acknowledged bytes are gone
    (the rename replaced them), and the object is the newer write of the same
    instance: repair indexes it (``rewritten``), so that the row describes what is
    stored and served (bytes damaged in a way that still reads as the same instance
    cannot be told from such a write; the report names them all).  A smaller object
    whose checksum differs cannot be such a write: it is ``damaged`` - changed or
    corrupted outside the node - as is an object that is not a readable instance of
    that UID at that key.  A damaged object is reported and left as it is, its row
    with the acknowledged checksum (a row whose object exists is never dropped, and
    never made to bless what the node did not acknowledge).
(e) a row whose object is gone (not a window of the ingest order: a deletion outside
    pacs, or a failed commit reported as such after it succeeded): another object of
    the same UID, if any, is indexed instead; only when there is none is the row
    dropped (``missing``).  Until then the node lists the instance (C-FIND, QIDO-RS) but
    cannot send it: WADO-RS answers 404 and C-MOVE / C-GET count a failed
    sub-operation.
(f) an instance removed (:mod:`pacs.core.deletion`: rows deleted and a tombstone
    written in one transaction, then the objects deleted), the crash before its object
    was: an object of a UID without a row but with a tombstone is ``removed`` and
    deleted, never indexed, so a removed instance never comes back.  (A store of the
    same UID sent again that crashed before its commit leaves the same, and was never
    acknowledged.)
(g) an IOCM rejection note committed, the crash before all its removals were done: its
    pending row, committed with it, is still there (``unfinished``); the same for a
    removal asked for (a DICOMweb DELETE or rejection, ``pacs delete``, an expiry),
    whose pending row, with its places, was committed with its first chunk.  The node's
    start-up finishes it (``full=False``, before any worker), as does repair for a row
    pending longer than ``temp_grace`` (a younger one may be a note being applied): the
    note is applied again by its sender, what it removed already passed over, each
    note on its own, and only while its row is still the one found.

Repair never rests on an assumption about the store it is given.  A store that lists no
object while the index has rows, or none of any key for more than half of the indexed
instances (:data:`MASS_DROP_SHARE`), is far more likely not the node's store (a folder not
mounted, a mistyped ``PACS_STORAGE``, ``PACS_S3_BUCKET`` or endpoint) than one that lost
them, and (e) would drop every such row: repair then changes nothing and says why
(:attr:`Report.refused`), unless the caller states that the objects are gone
(``allow_mass_drop``, ``pacs fsck --repair --allow-mass-drop``).

Objects are moved to the quarantine (``<data>/quarantine/<run>/<key>``, or
``<customer>/quarantine/<run>/<key>`` in the bucket), never deleted, except those of
removed instances (f), whose removal was asked for and recorded.  Without
``repair`` nothing changes: the report says what repair would do.  The report names
every change by its UIDs and keys; the log counts them (one line), and names them at
DEBUG only: UIDs and keys identify a patient's studies.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs.core import ingest
from pacs.core.audit import Participant
from pacs.core.errors import ForeignObject, NotFound, ObjectTooLarge, PacsError
from pacs.core.index import reads, writer
from pacs.core.ingest import Analysis, try_analyse
from pacs.core.services import Services
from pacs.core.storage import (
    ObjectStore,
    Quarantine,
    digest,
    exists,
    local_path,
    object_key,
    read_object,
)
from pacs.core.storage.filesystem import FileStore, stray_lines

log = logging.getLogger(__name__)

#: Seconds after which a temporary file cannot belong to a write in progress (a put
#: writes bytes already received; even 2 GB take minutes, not an hour).
TEMP_GRACE = 3600.0

#: The share of indexed objects a store may lack before repair refuses to act
#: (module docstring): past it, the store is suspected rather than the objects lost.
MASS_DROP_SHARE = 0.5

class Problem(enum.Enum):
    """What was found (see the module docstring for the crash window of each)."""

    TEMPORARY = "temporary"  # (a) a temporary file of an interrupted write
    UNACKNOWLEDGED = "unacknowledged"  # (b) an object of a UID without a row
    SUPERSEDED = "superseded"  # (b), (c) an object of an indexed UID the row does not name
    REWRITTEN = "rewritten"  # (d) the indexed key holds another version of the instance
    DAMAGED = "damaged"  # (d) the indexed key holds something else
    MISSING = "missing"  # (e) the indexed object is gone
    UNREADABLE = "unreadable"  # an object no row names that is not a readable instance
    REMOVED = "removed"  # (f) an object of a removed instance (a tombstone, no row)
    UNFINISHED = "unfinished"  # (g) a rejection note stored, its removals cut short


class Action(enum.Enum):
    """What repair does about a finding."""

    INDEX = "index"  # index the object as stored (a new row, or the row updated)
    QUARANTINE = "quarantine"  # move the object to the quarantine
    DROP_ROW = "drop row"  # remove the row (its object is gone and no copy is left)
    DELETE = "delete"  # temporary files, and objects of removed instances
    FINISH = "finish"  # apply a rejection note whose removals were cut short
    NONE = "none"  # nothing can be done: reported


@dataclass
class Finding:
    """One problem, what repair does about it, and whether it was done.

    Attributes
    ----------
    problem, action :
        What was found and what repair does.
    sop_uid :
        The SOP Instance UID concerned ("" for a temporary file).
    key :
        The object concerned (a temporary file's path relative to the store).
    note :
        What was found, in a few words.
    done :
        True once the action succeeded.
    moved_to :
        Where a quarantined object went.
    error :
        Why the action failed.
    """

    problem: Problem
    action: Action
    sop_uid: str
    key: str
    note: str = ""
    done: bool = False
    moved_to: str = ""
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        """The finding as a JSON object."""
        return {"problem": self.problem.value, "action": self.action.value,
                "sop_instance_uid": self.sop_uid, "key": self.key, "note": self.note,
                "done": self.done, "moved_to": self.moved_to, "error": self.error}

    def lines(self, repair: bool) -> list[str]:
        """Two lines of the readable report: what was found, and what repair does."""
        if self.done:
            state = f"done, moved to {self.moved_to}" if self.moved_to else "done"
        elif self.error:
            state = f"FAILED: {self.error}"
        elif self.action is Action.NONE:
            state = "cannot be repaired"
        else:
            state = "not done" if repair else "dry run"
        note = f" ({self.note})" if self.note else ""
        return [f"{self.problem.value:<14} {self.key}{note}",
                f"{'':<14} -> {self.action.value}: {state}"]


@dataclass
class Report:
    """What a reconciliation checked, found and did.

    Attributes
    ----------
    repair :
        Whether changes were allowed.
    rows, objects :
        Index rows and stored objects examined.
    checksums :
        Whether every indexed object's checksum was compared (otherwise its size).
    temporaries :
        Temporary files removed.
    recent_temporaries :
        Temporary files younger than the grace period, left alone (a write may be in
        progress).
    quarantine :
        The quarantine folder of this run (``fsck-<start time>``; objects moved there
        keep their key below it, and each finding's note says where it went).
    absent :
        Index rows whose SOP Instance UID the store (intake included) lists no object
        for, at any key: the rows repair would drop (window (e) without a copy).
    implausible :
        Why the store does not look like the one the index describes (it lists nothing,
        or lacks the objects of more than :data:`MASS_DROP_SHARE` of the rows), or "".
    refused :
        Why repair changed nothing (``implausible``, not overridden), or "".
    """

    repair: bool = False
    rows: int = 0
    objects: int = 0
    checksums: bool = True
    temporaries: int = 0
    recent_temporaries: int = 0
    quarantine: str = ""
    absent: int = 0
    implausible: str = ""
    refused: str = ""
    strays: tuple[int, list[str]] = field(default_factory=lambda: (0, []))
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def acting(self) -> bool:
        """Whether the actions are carried out (repair asked for and not refused)."""
        return self.repair and not self.refused

    @property
    def left(self) -> list[Finding]:
        """Findings whose action was not (or could not be) carried out."""
        return [finding for finding in self.findings if not finding.done]

    @property
    def ok(self) -> bool:
        """True when nothing is left to repair, nothing failed and repair was not
        refused."""
        return not self.left and not self.errors and not self.refused

    def count(self, action: Action) -> int:
        """Findings with this action that were carried out."""
        return sum(1 for f in self.findings if f.action is action and f.done)

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON object."""
        return {"repair": self.repair, "ok": self.ok, "rows": self.rows,
                "objects": self.objects, "checksums": self.checksums,
                "temporaries_removed": self.temporaries,
                "recent_temporaries": self.recent_temporaries,
                "quarantine": self.quarantine, "absent": self.absent,
                "implausible": self.implausible, "refused": self.refused,
                "strays": {"count": self.strays[0], "first": self.strays[1]},
                "findings": [finding.as_json() for finding in self.findings],
                "errors": list(self.errors)}

    def lines(self) -> Iterator[str]:
        """The readable report: what was checked, each finding, a summary."""
        compared = "checksums" if self.checksums else "sizes only"
        yield (f"checked {self.rows} index rows and {self.objects} stored objects "
               f"({compared})")
        for finding in self.findings:
            yield from finding.lines(self.repair)
        for error in self.errors:
            yield f"error: {error}"
        if self.recent_temporaries:
            yield (f"{self.recent_temporaries} recent temporary file(s) left alone "
                   "(a write may be in progress)")
        yield from stray_lines(*self.strays)
        if not self.findings and not self.errors:
            yield "index and store agree"
            return
        if self.refused:
            yield (f"repair refused, nothing changed: {self.refused}; if those objects "
                   "are really gone, 'pacs fsck --repair --allow-mass-drop' drops their rows")
            return
        if not self.repair:
            yield (f"{len(self.findings)} problem(s) found; nothing changed (dry run: "
                   "'pacs fsck --repair' carries out the actions above)")
            if self.implausible:
                yield (f"'pacs fsck --repair' would refuse: {self.implausible} "
                       "(unless --allow-mass-drop)")
            return
        removed = sum(1 for f in self.findings if f.problem is Problem.REMOVED and f.done)
        yield (f"{len(self.findings)} problem(s) found; indexed: {self.count(Action.INDEX)}, "
               f"quarantined: {self.count(Action.QUARANTINE)}, rows dropped: "
               f"{self.count(Action.DROP_ROW)}, temporary files removed: "
               f"{self.count(Action.DELETE) - removed}, objects of removed instances "
               f"deleted: {removed}; left: {len(self.left)}")
        places = {f.moved_to.removesuffix(f.key) for f in self.findings if f.moved_to}
        for place in sorted(places):
            yield f"quarantined objects are kept in {place} (under their keys)"


def reconcile(services: Services, full: bool = True, *, repair: bool = False,
              checksums: bool = True, temp_grace: float = TEMP_GRACE,
              allow_mass_drop: bool = False) -> Report:
    """Find (and with ``repair`` mend) what crashes left; see the module docstring.

    Parameters
    ----------
    services : Services
        The node's index, store and ingest (for its per-UID locks).
    full : bool
        Examine the index and every stored object.  ``False`` is the start-up clean-up
        only, called before the node's workers start: every temporary file is then an
        interrupted write's, and all are removed whatever ``repair`` says.
    repair : bool
        Carry out the actions; otherwise only report them.
    checksums : bool
        Compare every indexed object's SHA-256 with the row's (reads every object);
        otherwise its size only.
    temp_grace : float
        Age in seconds below which a temporary file is left alone.
    allow_mass_drop : bool
        Repair even when the store lists no object, or lacks more than
        :data:`MASS_DROP_SHARE` of the indexed ones (module docstring): the caller
        knows those objects are gone.  Otherwise repair changes nothing then, and
        :attr:`Report.refused` says why.
    """
    report = Report(repair=repair, checksums=checksums)
    store = services.store  # the intake's objects first: acknowledged, not missing
    backend = store.backend
    # Before any worker (``full=False``) every pending note was cut short; beside a
    # running node, one pending for less than ``temp_grace`` may be being applied.
    unfinished = _unfinished(services, time.time() - (temp_grace if full else 0.0))
    report.findings += [finding for finding, _step in unfinished]
    if not full:
        if isinstance(backend, FileStore):
            report.temporaries = backend.remove_stale_temporaries()
        # The intake's folder's too (files no row names: the mover's sweep).
        report.temporaries += store.files.remove_stale_temporaries()
        _finish_each(unfinished)
        return report
    report.quarantine = _quarantine_folder()
    if isinstance(backend, FileStore):
        _temporaries(backend, report, temp_grace)
        report.strays = backend.strays()  # not objects: reported, never touched
    rows = reads.all_objects(services.index.connection())
    report.rows = len(rows)
    listed: dict[str, list[str]] = {}
    stored = store.keys()
    for key in stored:
        listed.setdefault(_sop_of(key), []).append(key)
        report.objects += 1
    report.absent = sum(1 for sop, _checksum, _size in rows.values() if sop not in listed)
    report.implausible = implausible(report.rows, report.objects, report.absent)
    if repair and report.implausible and not allow_mass_drop:
        report.refused = report.implausible
        log.error("fsck: repair refused, nothing changed: %s", report.refused)
    suspects = {sop for sop, keys in listed.items() if len(keys) > 1}
    indexed = {sop: key for key, (sop, _checksum, _size) in rows.items()}
    suspects.update(sop for sop, keys in listed.items() if indexed.get(sop) != keys[0])
    for key, (sop, checksum, size) in rows.items():
        if sop in suspects:
            continue
        try:
            if not _matches(store, key, checksum, size, checksums):
                suspects.add(sop)
        except NotFound:
            suspects.add(sop)
        except PacsError as exc:
            report.errors.append(f"{key}: {exc}")
    for sop in sorted(suspects):
        try:
            _resolve(services, sop, listed.get(sop, []), report)
        except PacsError as exc:
            log.error("fsck: an instance could not be examined: %s", exc)
            log.debug("fsck: SOP Instance %s: %s", sop, exc)
            report.errors.append(f"SOP Instance {sop}: {exc}")
    if report.acting:
        _apply_temporaries(backend, report)
        _finish_each(unfinished)
        _log_repairs(report)
    return report


def _unfinished(services: Services, before: float) -> list[_Step]:
    """Window (g): rejection notes whose removals were cut short (the note committed
    with its pending row, the crash before all its removals were done and the row
    dropped, :meth:`pacs.core.ingest.Ingest._apply_rejection`), pending since
    ``before`` or longer.  Repair applies each again, as its sender would by sending
    it again: what it removed already is passed over, the rest removed and audited,
    by its sender."""
    conn = services.index.connection()
    steps: list[_Step] = []
    for pending in reads.rejections_pending(conn):
        if pending.since > before:
            continue
        row = reads.lookup(conn, pending.sop_uid)
        finding = Finding(Problem.UNFINISHED, Action.FINISH, pending.sop_uid,
                          row.object_key if row is not None else "",
                          "a rejection note whose removals were cut short")
        steps.append((finding, _finisher(services, pending)))
    for removal in reads.removals_pending(conn):
        if removal.since <= before:
            finding = Finding(Problem.UNFINISHED, Action.FINISH, "", "",
                              f"a removal asked for by {removal.requestor}, cut short")
            steps.append((finding, _resumer(services, removal)))
    return steps


def _resumer(services: Services, pending: reads.PendingRemoval) -> Callable[[], str]:
    def resume() -> str:
        # Read again, as for a note: done since it was found, it is not done twice.
        if reads.removals_pending(services.index.connection(), pending.id) != [pending]:
            return ""
        try:
            services.deleter.resume(pending)
        except PacsError:
            raise
        except Exception as exc:  # a start-up that cannot finish one still starts
            raise PacsError(f"the removal could not be finished ({type(exc).__name__})"
                            ) from exc
        return ""
    return resume


def _finish_each(steps: list[_Step]) -> None:
    """Carry out each note's step on its own: the notes do not depend on each other,
    and one that cannot be finished must not keep the others from it."""
    for step in steps:
        _carry_out([step])


def _finisher(services: Services, pending: reads.PendingRejection) -> Callable[[], str]:
    def finish() -> str:
        # Read again: the note may have been finished since it was found (sent again,
        # its removals done, and one of the UIDs it rejected stored anew, which a late
        # second application would remove).
        if reads.rejections_pending(services.index.connection(), pending.sop_uid) != [
                pending]:
            return ""
        try:
            _apply_again(services, pending)
        except PacsError:
            raise
        except Exception as exc:  # a start-up that cannot finish a note still starts
            raise PacsError(f"the note could not be applied ({type(exc).__name__})"
                            ) from exc
        log.debug("fsck: finished the rejection note %s", pending.sop_uid)
        return ""
    return finish


def _apply_again(services: Services, pending: reads.PendingRejection) -> None:
    """Apply a pending note again and drop its row (a note no longer indexed, removed
    since, has nothing left to apply)."""
    row = reads.lookup(services.index.connection(), pending.sop_uid)
    if row is not None:
        limit = services.ingest.max_object_bytes
        analysis = try_analyse(read_object(services.store, row.object_key, limit), limit)
        if isinstance(analysis, Analysis) and analysis.rejection is not None:
            services.deleter.reject(analysis, Participant(pending.requestor, True,
                                                          address=pending.address),
                                    again=True)
    with services.index.write() as conn:
        writer.rejection_done(conn, pending.sop_uid)


def _log_repairs(report: Report) -> None:
    """One line of what repair did: its counts.  Which objects and UIDs is the report's
    (the command's output) and DEBUG's: UIDs and keys name a patient's studies, and
    stay out of the log at the default level."""
    if not report.findings:
        return
    done = {action: report.count(action) for action in Action if action is not Action.NONE}
    log.warning("fsck: repaired %s; %d finding(s) left, %d error(s)",
                ", ".join(f"{count} {action.value}" for action, count in done.items()),
                len(report.left), len(report.errors))


def implausible(rows: int, objects: int, absent: int) -> str:
    """Why a store that lists ``objects`` objects and lacks ``absent`` of the ``rows``
    indexed ones is probably not the store the index describes, or ""."""
    if rows and not objects:
        return (f"the store lists no objects while the index has {rows} row(s): is it "
                "the node's store? (a folder not mounted, PACS_STORAGE, PACS_S3_BUCKET "
                "or PACS_S3_ENDPOINT wrong)")
    if absent > rows * MASS_DROP_SHARE:
        return (f"the store lacks {absent} of the {rows} indexed objects (more than "
                f"{MASS_DROP_SHARE:.0%}): is it the node's store, whole? (a folder not "
                "mounted, PACS_STORAGE, PACS_S3_BUCKET or PACS_S3_ENDPOINT wrong, a "
                "partial restore)")
    return ""


def _quarantine_folder() -> str:
    """The quarantine folder of one run: its start time, unique to the microsecond."""
    return "fsck-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _sop_of(key: str) -> str:
    """The SOP Instance UID a key names (``<study>/<series>/<sop>.dcm``)."""
    return key.rsplit("/", 1)[-1].removesuffix(".dcm")


def _temporaries(store: FileStore, report: Report, grace: float) -> None:
    """Findings for temporary files older than ``grace`` seconds (window (a))."""
    now = time.time()
    for path in store.temporaries():
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue  # renamed or removed by its writer meanwhile
        if age < grace:
            report.recent_temporaries += 1
            continue
        report.findings.append(Finding(Problem.TEMPORARY, Action.DELETE, "",
                                       path.relative_to(store.root).as_posix()))


def _apply_temporaries(store: ObjectStore, report: Report) -> None:
    if not isinstance(store, FileStore):
        return
    for finding in report.findings:
        if finding.problem is not Problem.TEMPORARY:
            continue
        try:
            (store.root / finding.key).unlink(missing_ok=True)
        except OSError as exc:
            finding.error = exc.strerror or str(exc)
            continue
        finding.done = True
        report.temporaries += 1
        log.debug("fsck: deleted the temporary file %s of an interrupted write", finding.key)


def _matches(store: ObjectStore, key: str, checksum: str, size: int,
             checksums: bool) -> bool:
    """True when the object at ``key`` is the one the row acknowledged."""
    if checksums:
        return digest(store, key, size) == (checksum, size)
    return store.size(key) == size


@dataclass(frozen=True)
class _Candidate:
    """A stored object read back, readable as an instance of its UID at its key."""

    key: str
    data: bytes
    analysis: Analysis
    written: int  # the store's modification time (ns), 0 when unknown


def _read_candidate(store: ObjectStore, key: str, sop: str,
                    limit: int | None) -> _Candidate | str:
    """The object as a candidate for indexing, or why it is not one: something at its
    key that is no file of the store, or an object over ``limit`` bytes
    (``PACS_MAX_OBJECT_BYTES``, which no ingest acknowledges) is not read."""
    try:
        data = read_object(store, key, limit)
    except (ForeignObject, ObjectTooLarge) as exc:
        return str(exc)
    analysis = try_analyse(data, limit)
    if not isinstance(analysis, Analysis):
        reason = str(analysis) if isinstance(analysis, PacsError) else type(analysis).__name__
        return f"not a readable instance ({reason})"
    if analysis.sop_instance_uid != sop or object_key(
            analysis.study_uid, analysis.series_uid, analysis.sop_instance_uid) != key:
        return "its UIDs do not match its key"
    return _Candidate(key, data, analysis, _written(store, key))


def _written(store: ObjectStore, key: str) -> int:
    path = local_path(store, key)
    if path is None:
        return 0
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


#: A finding and the repair step that carries it out (returning where a quarantined
#: object went, "" for other steps).
_Step = tuple[Finding, Callable[[], str]]


def _resolve(services: Services, sop: str, seen: list[str], report: Report) -> None:
    """Decide (and repair) one SOP Instance UID under its ingest lock."""
    store = services.store
    folder = report.quarantine
    with services.ingest.uid_lock(sop):
        row = reads.lookup(services.index.connection(), sop)
        others = [key for key in seen if (row is None or key != row.object_key)
                  and exists(store, key)]
        steps: list[_Step] = []
        stone = reads.tombstone(services.index.connection(), sop) if row is None else None
        if stone is not None:
            steps += [_remove(services, sop, key, stone) for key in others]
        elif row is not None and exists(store, row.object_key):
            if not _matches(store, row.object_key, row.checksum, row.size, True):
                steps += _rewritten(services, sop, row.object_key)
            steps += [_quarantine(services, Problem.SUPERSEDED, sop, key, folder)
                      for key in others]
        else:
            steps += _replace(services, sop, row, others, folder)
        for finding, _step in steps:
            report.findings.append(finding)
        if report.acting:
            _carry_out(steps)


def _carry_out(steps: list[_Step]) -> None:
    """Run a UID's steps in order; the first failure stops the rest (nothing of the
    UID is moved once its indexing failed)."""
    for finding, step in steps:
        if finding.action is Action.NONE:
            continue
        try:
            moved_to = step()
        except PacsError as exc:
            finding.error = str(exc)
            log.error("fsck: %s of an object failed: %s", finding.action.value, exc)
            log.debug("fsck: %s %s of SOP Instance %s failed: %s", finding.action.value,
                      finding.key, finding.sop_uid, exc)
            return
        finding.done = True
        finding.moved_to = moved_to


def _rewritten(services: Services, sop: str, key: str) -> list[_Step]:
    """Window (d): the indexed key holds bytes other than the acknowledged ones."""
    candidate = _read_candidate(services.store, key, sop, services.ingest.max_object_bytes)
    if isinstance(candidate, str):
        finding = Finding(Problem.DAMAGED, Action.NONE, sop, key,
                          f"differs from the acknowledged checksum and is {candidate}")
        return [(finding, lambda: "")]
    if len(candidate.data) < ingest.DIRECT_OVERWRITE_BYTES:
        finding = Finding(Problem.DAMAGED, Action.NONE, sop, key,
                          "differs from the acknowledged checksum; a later write of the "
                          "instance of its size would have gone through the intake, so "
                          "it was changed outside the node")
        return [(finding, lambda: "")]
    finding = Finding(Problem.REWRITTEN, Action.INDEX, sop, key,
                      "differs from the acknowledged checksum: a later write of the "
                      "instance, never acknowledged, replaced it")
    return [(finding, lambda: _index(services, candidate, "rewritten in place"))]


def _replace(services: Services, sop: str, row: reads.StoredInstance | None,
             others: list[str], folder: str) -> list[_Step]:
    """No usable indexed object: index the newest readable object of the UID, or drop
    the row when none is left; quarantine the rest."""
    steps: list[_Step] = []
    candidates: list[_Candidate] = []
    for key in others:
        candidate = _read_candidate(services.store, key, sop,
                                    services.ingest.max_object_bytes)
        if isinstance(candidate, str):
            steps.append(_quarantine(services, Problem.UNREADABLE, sop, key, folder,
                                     candidate))
        else:
            candidates.append(candidate)
    # Without a row nothing records which write came last; the store's time does
    # (folder store), else the key order.  The others stay in the quarantine.
    candidates.sort(key=lambda c: (c.written, c.key), reverse=True)
    if candidates:
        chosen = candidates[0]
        if row is None:
            finding = Finding(Problem.UNACKNOWLEDGED, Action.INDEX, sop, chosen.key,
                              "stored, never indexed")
            why = "stored but never indexed"
        else:
            finding = Finding(Problem.MISSING, Action.INDEX, sop, row.object_key,
                              f"indexing the copy at {chosen.key} instead")
            why = f"the indexed object {row.object_key} is gone"
        steps.insert(0, (finding, lambda: _index(services, chosen, why)))
        steps += [_quarantine(services, Problem.SUPERSEDED, sop, c.key, folder)
                  for c in candidates[1:]]
    elif row is not None:
        finding = Finding(Problem.MISSING, Action.DROP_ROW, sop, row.object_key,
                          "no copy left")
        steps.insert(0, (finding, lambda: _drop_row(services, sop, row.object_key)))
    return steps


def _remove(services: Services, sop: str, key: str, stone: reads.Tombstone) -> _Step:
    """Window (f): delete the object of a removed instance."""
    why = (f"rejected ({stone.reason_code}, {stone.reason_scheme})" if stone.reason_code
           else "deleted")
    finding = Finding(Problem.REMOVED, Action.DELETE, sop, key,
                      f"its instance was {why}; the object outlived its row")

    def delete() -> str:
        services.store.delete(key)
        log.debug("fsck: deleted %s, the object of removed SOP Instance %s", key, sop)
        return ""

    return finding, delete


def _index(services: Services, candidate: _Candidate, why: str) -> str:
    """Index an object as it is stored (it is not written again); a rejection note is
    applied too, as its store would have (its pending row, written with it, is left
    for the next repair or start-up when that fails)."""
    analysis = candidate.analysis
    services.ingest.index_stored(analysis, candidate.key, len(candidate.data))
    log.debug("fsck: indexed %s as SOP Instance %s (%s)", candidate.key,
              analysis.sop_instance_uid, why)
    if analysis.rejection is not None:
        for pending in reads.rejections_pending(services.index.connection(),
                                                analysis.sop_instance_uid):
            _apply_again(services, pending)
    return ""


def _drop_row(services: Services, sop: str, key: str) -> str:
    with services.index.write() as conn:
        writer.delete_instance(conn, sop)
    log.debug("fsck: dropped the index row of SOP Instance %s: its object %s is gone "
                "and no other copy exists", sop, key)
    return ""


def _quarantine(services: Services, problem: Problem, sop: str, key: str, folder: str,
                note: str = "") -> _Step:
    """The step that takes ``key`` out of service; a store without the
    :class:`~pacs.core.storage.Quarantine` capability gets the finding reported, and
    the object stays where it is (it is never deleted)."""
    store = services.store.backend  # never an intake object: the row names those
    if not isinstance(store, Quarantine):
        unable = "this store cannot quarantine objects: left where it is"
        finding = Finding(problem, Action.NONE, sop, key,
                          f"{note}; {unable}" if note else unable)
        return finding, lambda: ""
    finding = Finding(problem, Action.QUARANTINE, sop, key, note)

    def move() -> str:
        where = store.quarantine(key, folder)
        log.debug("fsck: moved %s (%s, SOP Instance %s) to %s", key, problem.value,
                    sop, where)
        return where

    return finding, move

