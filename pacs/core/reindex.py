"""Rebuild a customer's index from its object store alone (``pacs reindex``).

The object store holds every acknowledged object whole, byte for byte as received
(docs/architecture.md, "Data layout"); everything the index says of an instance is
derived from those bytes at ingest (:func:`pacs.core.ingest.analyse`).  So a node whose
index is lost is replaced, not restored: point a new node at the same folder or
bucket and rebuild.

How a rebuild goes (:func:`rebuild`):

1. **Not beside a running node.**  The index has one writer per customer, the node;
   a rebuild while a node serves the customer would miss what it stores meanwhile and
   swap the file from under it.  A node keeps its index open, and every open SQLite
   connection in WAL mode holds a read lock on the "dead man switch" byte of the
   index's ``-shm`` file; a rebuild that can take the write lock there knows no
   process has the index open (:func:`index_in_use`).  It asks before it starts and
   again just before the swap, and refuses otherwise (:class:`IndexFailure`).  A
   process may have opened, written and closed the index in between (a node started
   and stopped, ``pacs import``, ``pacs delete``): the swap is refused too when the
   index's file or write-ahead log changed since the start (:func:`written_state`).
2. **Every object through the ingest's analysis.**  The store's keys are read and
   analysed as at ingest (:func:`pacs.core.ingest.analyse`, in the ingest's helper
   processes, :class:`pacs.core.analysers.AnalyserPool`): index values, DICOM JSON
   metadata, pixel data position, checksum, transfer syntax are the ingest's own, so
   the rebuilt rows equal the originals.  An object that is not a readable instance,
   or whose UIDs name another key, is reported and left where it is: never deleted,
   never guessed into the index.  A SOP Instance UID found at several keys (a copy a
   crash left, see :mod:`pacs.core.reconcile`) is indexed from the one the previous
   index names, when it names one of them, else from the one written last; the
   others are reported (``pacs fsck`` quarantines them).  Where the store dates two
   of them alike (S3 dates writes to the whole second) and no previous index
   decides, the order of writes is not known: the one indexed is the later by key
   order, and the instance is reported as ``tied`` (to be checked before ``pacs fsck
   --repair`` quarantines the others).
3. **In the order the store received them.**  The index holds, for a patient, the
   patient attributes received last (:func:`pacs.core.index.writer.upsert`), so rows
   are written in the order of the objects' stored modification times (then key
   order): a store's own record of the order of writes.  The folder store has file
   times (nanoseconds); a store that offers :class:`ModifiedTimes` gives them too.
   Where the store cannot tell, the order is the keys' (reported as ``undated``): a
   Patient ID whose studies carry different patient attributes may then show another
   study's on its patient row (each study row keeps its own, exact).
4. **What the store cannot tell.**  ``received_at`` becomes the object's stored
   modification time (UTC, the ingest's format), or :data:`UNKNOWN_RECEIVED` when the
   store has none; ``calling_ae`` is empty, as for ``pacs import``.  Row keys
   (``pk`` and the parent references) are numbered anew.  Nothing else differs.
5. **A new file, swapped in when complete.**  The rows go to a new SQLite file beside
   the index (``index.sqlite.reindex-<time>``), written in batches, checked
   (``PRAGMA quick_check``) and closed; only then does it replace the index with one
   ``rename``.  The previous index is kept beside it as
   ``index.sqlite.before-reindex-<time>`` (with its ``-wal`` when it had one).  Any
   failure before the rename (the store fails, an interrupt, a full disk) removes the
   new file and leaves the index as it was; the new file of a rebuild killed before
   its rename is removed by the next rebuild.
6. **Rejection notes are applied again.**  An IOCM rejection note (:mod:`pacs.core.
   rejection`) in the store removed, when it was stored, the instances it names
   (:mod:`pacs.core.deletion`): their rows went and tombstones came, then their objects
   went.  An object of such an instance can still be in the store (a crash between the
   two, a failed deletion: ``pacs fsck --repair`` deletes it).  So once every object is
   indexed, each note found is applied again, in the order the store wrote them, by the
   removal's own rules (:func:`pacs.core.deletion.delete_rows`, :func:`~pacs.core.
   deletion.rejectable`): whatever order the notes and the instances they name were
   met in, those instances are hidden again and their UIDs get their tombstones (who
   removed them is not known: :data:`UNKNOWN_SENDER`; when: the note's stored time).
   Their objects are left in place and counted as ``rejected``.  The one exception is
   the reason that lets an instance come back (113039, Data Retention Policy
   Expired): an instance it names that is in the store may have been sent again after
   the rejection, and the store's times cannot prove it was not.  They are not the
   order of acknowledgement: an object the intake held is written by its mover after
   objects acknowledged later and written directly (over ``PACS_INTAKE_OBJECT_BYTES``),
   and S3 dates writes to the whole second.  So such an instance stays indexed,
   counted as ``undecided``: hidden, its acknowledged object would be deleted by
   ``pacs fsck --repair``, a guess that loses data; kept, a retention's removal can be
   made again.  With a previous index, its tombstones decide first (item 9).
   Instances deleted without a note are known by the previous index's tombstones alone (item
   9): without a previous index the store keeps no record of them.
7. **Not before the intake is empty.**  Acknowledged objects waiting in the index's
   intake (:mod:`pacs.core.intake`) are not in the store yet; a rebuild refuses while
   there are any (``pacs reindex`` drains the intake into the store first), and while
   removals or rejection notes a crash cut short are not finished (``pacs reindex``
   finishes them first, as the node's start-up does).  It asks
   before it starts and again just before the swap (with the question of 1): a node
   started and stopped during the rebuild may have left acknowledged objects there,
   which the swap would leave in the set-aside previous index only.
8. **Keys whose last write went unanswered stay so.**  A write S3 did not answer may
   still land (:mod:`pacs.core.intake`, ``unsettled``); the index records the key
   until that can no longer happen, and a write of it meanwhile goes through the
   intake.  The store cannot tell, so the rebuilt index takes those records from the
   previous one, read when the intake is asked the last time; so too the objects of
   removed instances whose deletion is pending (``object_deletion``, deleted by the
   intake's mover: :mod:`pacs.core.deletion`), and the work waiting: storage
   commitment requests not answered yet, forwarding's queue, and the removals and
   rejection notes a crash cut short (``removal_pending``, ``rejection_pending``: the
   node's start-up finishes them, as it would have with the previous index), as they
   were, and forwarding's cursor at the newest change, the instances it had not read yet changed
   again after it in their order (the rebuild numbers every instance anew).
9. **Removals the previous index recorded stay done.**  A removal deletes an
   instance's rows and writes its tombstone, then deletes its object; on S3 that
   deletion may fail or go unanswered, and a write S3 took late may land after the
   removal, so an object of a removed instance can be in the store.  The previous
   index's tombstones (a UID stored again loses its tombstone) are carried into the
   rebuilt one, and an object at the place a tombstone names is not indexed: counted
   as ``removed``, left in place (``pacs fsck --repair`` deletes it).  Without a
   previous index there is nothing to carry (a lost index: item 6 alone).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apsw

from pacs.core import metadata
from pacs.core.analysers import AnalyserPool
from pacs.core.attributes import Level
from pacs.core.deletion import chunks, delete_rows, reference, rejectable
from pacs.core.errors import (
    ForeignObject,
    IndexFailure,
    NotFound,
    ObjectTooLarge,
    PacsError,
    StorageError,
)
from pacs.core.index import outbox, reads, writer
from pacs.core.index.connection import Index, connect
from pacs.core.index.migrations import migrate
from pacs.core.index.reads import Located
from pacs.core.ingest import RECEIVED_FORMAT, Analysis, instance_row, patient_key
from pacs.core.reconcile import implausible
from pacs.core.rejection import Reference, Rejection
from pacs.core.storage import ModifiedTimes, ObjectStore, local_path, object_key, read_object
from pacs.core.storage.filesystem import FileStore, stray_lines

log = logging.getLogger(__name__)

#: ``received_at`` of an instance whose store does not tell when it was written.
UNKNOWN_RECEIVED = ""
#: Who removed the instances a rejection note found in the store rejects: the note's
#: sender is not in the object (as the ingest's hook records an unnamed sender).
UNKNOWN_SENDER = "(none)"
#: Rows written per index transaction: one fsync per batch, not per object.
BATCH = 500
#: Byte of the ``-shm`` file every open WAL connection holds a read lock on (SQLite's
#: unix VFS: ``UNIX_SHM_DMS``, after the eight wal-index locks at 120).
_SHM_DMS_BYTE = 128
#: Threads reading objects (a store's latency, not CPU, bounds them).
READERS = 4


@dataclass(frozen=True)
class Skipped:
    """An object left out of the index, and why (it stays in the store as it is)."""

    key: str
    reason: str


@dataclass
class Report:
    """What a rebuild found and did.

    Attributes
    ----------
    index :
        The index file rebuilt.
    previous :
        Where the index it replaced was kept (``None``: there was none).
    objects :
        Object keys listed in the store.
    indexed :
        Objects indexed.
    skipped :
        Objects left out: not readable instances, or UIDs naming another key.
    duplicates :
        SOP Instance UIDs found at more than one key: the others, which are left in
        place, then the key indexed (the previous index's, or the one written last).
    tied :
        Those of ``duplicates`` whose indexed copy and another were dated alike by the
        store, with no previous index to decide: the order of writes is not known.
    undated :
        Objects whose stored time the store did not tell (ordered by key instead).
    rejected :
        Objects of instances that rejection notes in the store reject: not indexed
        (removed again after they were read), left in place.
    undecided :
        Objects of instances a note that lets them come back names: kept indexed
        (item 6).
    removed :
        Objects of instances the previous index records removed (item 9): not
        indexed, left in place.
    strays :
        Files of a folder store not at an object key (not read), and the first of
        their paths.
    counts :
        Rows per level of the new index.
    seconds :
        Time the rebuild took.
    leftovers :
        New index files of earlier rebuilds killed before their swap, removed.
    """

    index: Path
    previous: Path | None = None
    objects: int = 0
    indexed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)
    undated: int = 0
    rejected: int = 0
    undecided: int = 0
    removed: int = 0
    strays: tuple[int, list[str]] = field(default_factory=lambda: (0, []))
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    leftovers: int = 0

    @property
    def rate(self) -> float:
        """Objects per second."""
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> Iterator[str]:
        """The readable report (keys and UIDs only: no patient data)."""
        yield (f"indexed {self.indexed} of {self.objects} stored objects in "
               f"{self.seconds:.1f} s ({self.rate:.0f} objects/s)")
        yield ", ".join(f"{table}: {count}" for table, count in self.counts.items())
        for skipped in self.skipped:
            yield f"not indexed, left in place: {skipped.key} ({skipped.reason})"
        for sop, keys in self.duplicates.items():
            yield (f"SOP Instance {sop} is stored at {len(keys)} keys: indexed {keys[-1]}, "
                   f"left in place: {', '.join(keys[:-1])} ('pacs fsck --repair' "
                   "quarantines them)")
        for sop in self.tied:
            yield (f"SOP Instance {sop}: the store dates its copies alike and no previous "
                   "index names one, so which was written last is not known: check "
                   "which to keep before 'pacs fsck --repair' quarantines the others")
        if self.undated:
            yield (f"{self.undated} object(s) without a stored time: ordered by key, "
                   "received time unknown")
        if self.rejected:
            yield (f"{self.rejected} object(s) of instances rejected by rejection notes "
                   "in the store: not indexed, left in place ('pacs fsck --repair' "
                   "deletes them)")
        if self.undecided:
            yield (f"{self.undecided} object(s) of instances a rejection note that lets "
                   "them come back names, which may have been sent again after it: kept "
                   "indexed (remove them again if they were not sent again)")
        if self.removed:
            yield (f"{self.removed} object(s) of instances the previous index records "
                   "removed: not indexed, left in place ('pacs fsck --repair' deletes them)")
        yield from stray_lines(*self.strays)
        yield f"index rebuilt: {self.index}"
        if self.previous is not None:
            yield f"previous index kept as {self.previous}"

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON object."""
        return {"index": str(self.index),
                "previous": str(self.previous) if self.previous else None,
                "objects": self.objects, "indexed": self.indexed,
                "skipped": [{"key": s.key, "reason": s.reason} for s in self.skipped],
                "duplicates": self.duplicates, "tied": self.tied,
                "undated": self.undated,
                "rejected": self.rejected, "undecided": self.undecided,
                "removed": self.removed,
                "strays": {"count": self.strays[0], "first": self.strays[1]},
                "counts": self.counts, "seconds": round(self.seconds, 3)}


def index_in_use(path: Path) -> bool:
    """True when another process has the SQLite index ``path`` open.

    Every connection to a WAL database holds a read lock on one byte of its ``-shm``
    file for as long as it is open (a node's processes keep theirs); a write lock there
    is refused while any does.  No ``-shm`` file: no connection is open (SQLite creates
    it with the first and removes it with the last).

    Call it before this process opens the index, never while it has it open: locks of
    this process are not seen, and closing the descriptor opened here would drop them
    (POSIX record locks belong to the process, not to the descriptor).
    """
    try:
        fd = os.open(f"{path}-shm", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise IndexFailure(f"cannot check whether the index is in use: {exc}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock taken, if any
    return False


def stored_times(store: ObjectStore, keys: Iterable[str]) -> dict[str, float]:
    """When each object was written, as far as the store tells (:class:`ModifiedTimes`,
    else the files' modification times of a store with local files); keys it cannot
    date are left out."""
    if isinstance(store, ModifiedTimes):
        return dict(store.modified_times())
    times: dict[str, float] = {}
    for key in keys:
        path = local_path(store, key)
        if path is None:  # no local files, or not a regular file at the key
            continue
        with contextlib.suppress(OSError):
            times[key] = path.stat().st_mtime_ns / 1e9
    return times


#: What reading and analysing one object gives: its size and analysis, or why not.
_Outcome = tuple[int, Analysis | Exception]


def refuse_implausible(index_path: Path, listed: int, allow_mass_drop: bool = False
                       ) -> None:
    """Refuse to rebuild from a store that lists ``listed`` objects where the index
    holds rows of far more (none at all, or fewer than half of them): a folder not
    mounted, a wrong bucket or endpoint, whose rebuild would swap an empty or partial
    index in (``pacs fsck --repair`` refuses the same, :func:`pacs.core.reconcile.
    implausible`); ``allow_mass_drop`` rebuilds all the same.

    Raises
    ------
    IndexFailure
        The store is implausible and the drop not allowed; nothing is changed.
    """
    rows = _indexed(index_path)
    why = implausible(rows, listed, max(0, rows - listed))
    if why and not allow_mass_drop:
        raise IndexFailure(f"{why}: nothing rebuilt ('pacs reindex --allow-mass-drop' "
                           "rebuilds from it all the same)")


def _indexed(index_path: Path) -> int:
    """The instance rows of the index at ``index_path`` whose objects the store should
    hold: those its intake does not hold yet (0 without an index)."""
    if not index_path.exists():
        return 0
    conn = connect(index_path)
    try:
        tables = reads.tables(conn)
        rows = reads.counts(conn)["instance"] if "instance" in tables else 0
        return rows - (reads.intake_objects(conn) if "intake" in tables else 0)
    finally:
        conn.close()


def rebuild(index_path: Path, store: ObjectStore, analysers: AnalyserPool, *,
            readers: int = READERS,
            on_total: Callable[[int], None] | None = None,
            on_object: Callable[[], object] | None = None,
            allow_mass_drop: bool = False, customer: str | None = None) -> Report:
    """Rebuild the index at ``index_path`` from ``store``; see the module docstring.

    Parameters
    ----------
    index_path : Path
        The customer's index file (it may be missing).
    store : ObjectStore
        The customer's object store.
    analysers : AnalyserPool
        Where objects are analysed (size 0: in the reading threads).
    readers : int
        Threads reading objects from the store.
    on_total, on_object :
        Progress: called with the number of objects once listed, and after each one.
    allow_mass_drop : bool
        Rebuild from a store that lists far fewer objects than the index holds rows
        (:func:`refuse_implausible`).
    customer : str, optional
        The customer the rebuilt index records as its owner when the previous index
        records none (or is gone); a previous owner is kept.

    Raises
    ------
    IndexFailure
        A process has the index open (a running node), its intake holds objects not
        yet in the store (before the rebuild, or again before the swap), the store
        lists far fewer objects than the index holds (:func:`refuse_implausible`), or
        the new index cannot be written; the index is left as it was.
    StorageError
        The store failed; the index is left as it was.
    """
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    report = Report(index=index_path)
    _refuse_if_in_use(index_path)
    _refuse_if_intake_holds(index_path)
    removed = _tombstones(index_path)
    owner = _owner(index_path)
    # The index as the checks left it (closed): anything that writes to it while the
    # rebuild runs (a node started and stopped, pacs import, pacs delete) changes it,
    # and the swap would throw that away.
    untouched = written_state(index_path)
    if isinstance(store, FileStore):
        _refuse_links(store)
    keys = list(store.keys())
    if isinstance(store, FileStore):
        report.strays = store.strays()
    dated = stored_times(store, keys)
    # The order of writes, as the store recorded it; undated objects first, by key.
    keys.sort(key=lambda key: (dated.get(key, 0.0), key))
    report.objects = len(keys)
    refuse_implausible(index_path, len(keys), allow_mass_drop)
    report.undated = sum(1 for key in keys if key not in dated)
    if on_total is not None:
        on_total(len(keys))
    report.leftovers = _remove_leftovers(index_path)
    new_path = index_path.with_name(f"{index_path.name}.reindex-{stamp}")
    new = Index(new_path)
    try:
        migrate(new.connection(), owner=owner or customer)
        _keep_tombstones(new, removed)
        with _previous_keys(index_path) as named:
            notes = _fill(new, store, keys, dated, analysers, readers, report,
                          on_object, removed, named)
        _apply_notes(new, notes, report, removed)
        check = reads.quick_check(new.connection())
        if check != "ok":
            raise IndexFailure(f"the rebuilt index failed its check: {check}")
        report.counts = reads.counts(new.connection())
        new.close()
        # Asked again: a node may have started and stopped meanwhile (each check saw
        # the index closed), or a command written to the index, whose rows, intake or
        # tombstones the swap would set aside with the previous index.  The intake
        # first: it opens the index, so that nothing of this process holds it when the
        # last check runs.
        _refuse_if_written(index_path, untouched)
        carried = _refuse_if_intake_holds(index_path, carry=True)
        read = written_state(index_path)  # as this process' reading left it
        _keep_carried(new_path, carried)
        # And again once the carried rows are copied (forwarding's queue may take
        # seconds): a command that opened, wrote and closed the index meanwhile would
        # have its rows set aside with the previous index.
        _refuse_if_written(index_path, read)
        _refuse_if_in_use(index_path)
        report.previous = _swap(new_path, index_path, stamp)
    except BaseException:
        new.close()
        _remove(new_path)
        raise
    report.seconds = time.monotonic() - started
    log.info("reindex: %d of %d objects indexed, %d skipped, %d rejected, %d duplicate "
             "UIDs, %.1f s", report.indexed, report.objects, len(report.skipped),
             report.rejected, len(report.duplicates), report.seconds)
    return report


#: Seconds since a rebuild's new index file was last written before a later rebuild
#: takes it for a leftover: another rebuild running has it open, or has just closed it
#: for its swap.
LEFTOVER_AGE = 3600.0


def _remove_leftovers(index_path: Path) -> int:
    """Remove the new index files of earlier rebuilds that were killed before their
    swap (a ``kill -9`` skips the clean-up of a failure), each unless a process has it
    open or wrote it within :data:`LEFTOVER_AGE` (another rebuild running); how many."""
    removed = 0
    for leftover in index_path.parent.glob(f"{index_path.name}.reindex-*"):
        if leftover.name.endswith(("-wal", "-shm")) or index_in_use(leftover):
            continue
        try:
            if time.time() - leftover.stat().st_mtime < LEFTOVER_AGE:
                continue
        except FileNotFoundError:
            continue
        _remove(leftover)
        removed += 1
    if removed:
        log.info("reindex: removed %d new index file(s) of earlier rebuilds cut short",
                 removed)
    return removed


def _refuse_links(store: FileStore) -> None:
    """Refuse a folder store holding symbolic links to folders: its listing does not
    follow them, so a rebuild would leave out every object behind one (a study folder
    moved to another disk and linked back) and the index would lose their rows."""
    count, found = store.linked_folders()
    if count:
        shown = ", ".join(found[:3]) + (", ..." if count > 3 else "")
        raise StorageError(
            f"the object store holds {count} symbolic link(s) to folders ({shown}), "
            "which pacs does not follow: put what they point to in their place (or "
            "remove them) and rebuild again; the index is left as it was")


def written_state(index_path: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a process writes to the index: the identity, size and
    modification time of its file and of its write-ahead log (an open that only reads
    leaves both as they were)."""
    found: list[tuple[int, int, int] | None] = []
    for path in (index_path, Path(f"{index_path}-wal")):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            found.append(None)
            continue
        found.append((info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(found)


def _refuse_if_written(index_path: Path, seen: tuple[tuple[int, int, int] | None, ...]
                       ) -> None:
    """Refuse the swap when the index is no longer as ``seen``
    (:func:`written_state`): another process wrote to it meanwhile."""
    if written_state(index_path) != seen:
        raise IndexFailure(
            f"the index {index_path} was written while it was rebuilt (a node or a "
            "pacs command used it): nothing swapped; run pacs reindex again with "
            "the node and other commands on this customer stopped")


def _refuse_if_in_use(index_path: Path) -> None:
    if index_in_use(index_path):
        raise IndexFailure(
            f"the index {index_path} is open in another process: stop the node serving "
            "this customer (and any pacs command on it) before rebuilding its index")


@dataclass(frozen=True)
class _Carried:
    """What the rebuilt index takes from the previous one besides its tombstones: the
    unsettled keys and the pending deletions of removed instances' objects, each with
    its time; the rows of the work waiting (``reads.CARRIED_TABLES``: storage
    commitment requests, forwarding's queue, removals and rejection notes a crash cut
    short, by table: their columns and rows); and
    the instances whose last change forwarding had not read yet (``None``: it never
    ran)."""

    unsettled: list[tuple[str, float]]
    deletions: list[tuple[str, float]]
    waiting: dict[str, tuple[list[str], list[tuple[object, ...]]]] = field(
        default_factory=dict)
    unfed: list[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.unsettled or self.deletions or self.unfed is not None
                    or any(rows for _columns, rows in self.waiting.values()))

    def highest_queued(self) -> int:
        """The highest change number of forwarding's carried queue (0: none): the
        previous index's, which the rebuilt one must not give again."""
        columns, rows = self.waiting.get("outbox", ([], []))
        if "change_seq" not in columns:
            return 0
        at = columns.index("change_seq")
        return max((seq for row in rows if isinstance(seq := row[at], int)), default=0)


def _refuse_if_intake_holds(index_path: Path, *, carry: bool = False) -> _Carried:
    """Refuse while the index's intake holds acknowledged objects the store lacks
    (:mod:`pacs.core.intake`): a rebuild from the store alone would drop them; or
    while removals a crash cut short wait for the node's start-up to finish them
    (:mod:`pacs.core.deletion`): the rebuild would drop them, or bring back what a
    rejection note not yet applied removes.  Otherwise, with ``carry``, what the
    rebuilt index carries over (:class:`_Carried`; read only then: forwarding's queue
    may be long).

    Only a table the index's schema does not have yet counts as empty; any other
    failure to read it refuses (a locked or damaged index may hold objects)."""
    if not index_path.exists():
        return _Carried([], [])
    conn = connect(index_path)
    try:
        present = reads.tables(conn)
        objects = reads.intake_objects(conn) if "intake_state" in present else 0
        if objects:
            raise IndexFailure(
                f"the intake of {index_path} holds {objects} acknowledged object(s) not "
                "yet in the object store: let the node's mover store them (or run "
                "'pacs reindex', which drains it first, with the store reachable; an "
                "object whose last write S3 did not answer waits there PACS_S3_SETTLE "
                "seconds)")
        unfinished = (reads.removals_pending_count(conn)
                      if {"removal_pending", "rejection_pending"} <= present else 0)
        if unfinished:
            # Their places name instances by change numbers the rebuild gives anew.
            raise IndexFailure(
                f"{unfinished} removal(s) of {index_path} were cut short: let the node's "
                "start-up finish them (or run 'pacs reindex', which finishes them first)")
        if not carry:
            return _Carried([], [])
        return _Carried(
            reads.unsettled_keys(conn) if "unsettled" in present else [],
            reads.deletion_keys(conn) if "object_deletion" in present else [],
            _waiting(conn, present),
            reads.unfed(conn) if "forward_cursor" in present else None)
    finally:
        conn.close()


def _waiting(conn: apsw.Connection, present: set[str]
             ) -> dict[str, tuple[list[str], list[tuple[object, ...]]]]:
    """The rows of those of ``reads.CARRIED_TABLES`` the previous index has, with
    their columns."""
    waiting = {}
    for table in reads.CARRIED_TABLES:
        if table in present:
            columns = reads.columns_of(conn, table)
            waiting[table] = (columns, reads.carried_rows(conn, table, columns))
    return waiting


def _tombstones(index_path: Path) -> dict[str, reads.TombstoneRow]:
    """The previous index's tombstones by SOP Instance UID (item 9); none without one
    (or one older than the table)."""
    if not index_path.exists():
        return {}
    conn = connect(index_path)
    try:
        if "tombstone" not in reads.tables(conn):
            return {}
        return {row.sop_uid: row for row in reads.tombstones(conn)}
    finally:
        conn.close()


def _owner(index_path: Path) -> str | None:
    """The customer the previous index records as its owner, kept by the rebuilt one
    (none without an index, or one that records none)."""
    if not index_path.exists():
        return None
    conn = connect(index_path)
    try:
        return reads.owner(conn) if "owner" in reads.tables(conn) else None
    finally:
        conn.close()


def _keep_tombstones(index: Index, removed: dict[str, reads.TombstoneRow]) -> None:
    """Write the previous index's tombstones into the new one."""
    if not removed:
        return
    with index.write() as conn:
        for row in removed.values():
            writer.add_tombstone(conn, row.sop_uid, row.study_uid, row.series_uid,
                                 (row.reason_code, row.reason_scheme), row.removed_by,
                                 row.removed_at)


def _keep_carried(new_path: Path, carried: _Carried) -> None:
    """Record what ``carried`` holds in the new index, synced before the swap: the
    unsettled keys; the pending deletions (the mover deletes their objects, unless a
    row names the key); the storage commitment requests and forwarding's queue as
    they were; and, when forwarding ran, its cursor at the newest change with the
    instances it had not read yet changed again after it, in their order, so that
    forwarding reads them (the rebuild numbered every instance anew)."""
    if not carried:
        return
    index = Index(new_path)
    try:
        with index.write(synced=True) as conn:
            for key, since in carried.unsettled:
                writer.unsettle(conn, key, since)
            for key, since in carried.deletions:
                writer.deletions_pending(conn, [key], since)
            for table, (columns, rows) in carried.waiting.items():
                # An older schema's columns that the present one still has.
                present = set(reads.columns_of(conn, table))
                kept = [n for n, c in enumerate(columns) if c in present]
                writer.carry_rows(conn, table, [columns[n] for n in kept],
                                  [tuple(row[n] for n in kept) for row in rows])
            if carried.unfed is not None:
                # Past the carried queue's numbers too: an instance numbered again
                # with one of them would be taken for the entry being sent.
                outbox.move_cursor(conn, max(outbox.head(conn), carried.highest_queued()))
                writer.changed_again(conn, carried.unfed)
    finally:
        index.close()


@dataclass(frozen=True)
class _Note:
    """A rejection note found in the store: its key, its patient
    (:func:`pacs.core.ingest.patient_key`), what it rejects, and when the store wrote
    it (``None``: not told)."""

    key: str
    patient: str
    rejection: Rejection
    stored: float | None

    @property
    def lets_back(self) -> bool:
        """Whether an instance it names may have been stored again after it: its reason
        lets one be (IHE RAD TF-2 4.66.4, :attr:`pacs.core.rejection.Reason.
        refuses_again`), and the store's times cannot prove the order (item 6 of the
        module docstring)."""
        return not self.rejection.reason.refuses_again


def _fill(index: Index, store: ObjectStore, keys: list[str], dated: dict[str, float],
          analysers: AnalyserPool, readers: int, report: Report,
          on_object: Callable[[], object] | None,
          removed: dict[str, reads.TombstoneRow] | None = None,
          named: Callable[[str], str | None] = lambda sop: None) -> list[_Note]:
    """Analyse every object and write its rows, in ``keys`` order, in batches; the
    rejection notes among them, in that order.  An object at the place of a removed
    instance (``removed``: item 9) is left out; of a UID's copies, the one the previous
    index names (``named``) is kept (item 2)."""
    removed = removed or {}
    batch: list[tuple[writer.InstanceRow, metadata.Prepared | None]] = []
    notes: list[_Note] = []
    where: dict[str, str] = {}  # SOP Instance UID -> key indexed
    for key, (size, analysis) in _analysed(store, keys, analysers, readers):
        if on_object is not None:
            on_object()
        reason = _refusal(key, analysis)
        if reason is not None or not isinstance(analysis, Analysis):
            report.skipped.append(Skipped(key, reason or "not analysed"))
            log.debug("reindex: %s not indexed: %s", key, reason)  # keys name studies
            continue
        sop = analysis.sop_instance_uid
        stone = removed.get(sop)
        if stone is not None and (stone.study_uid, stone.series_uid) == (
                analysis.study_uid, analysis.series_uid):
            report.removed += 1
            log.debug("reindex: %s not indexed: removed", key)
            continue
        if sop in where and not _later_kept(sop, where[sop], key, dated, named, report):
            continue  # the previous index names the copy indexed already
        where[sop] = key
        received = dated.get(key)
        batch.append((_row(analysis, key, size, received), analysis.metadata))
        report.indexed += 1
        if analysis.rejection is not None:
            notes.append(_Note(key, patient_key(analysis.values[Level.PATIENT]),
                               analysis.rejection, received))
        if len(batch) >= BATCH:
            _write(index, batch)
            batch = []
    _write(index, batch)
    return notes


def _later_kept(sop: str, earlier: str, later: str, dated: dict[str, float],
                named: Callable[[str], str | None], report: Report) -> bool:
    """Whether ``later``, a copy of ``sop`` met after ``earlier`` (the copy indexed so
    far) in the store's order, replaces it in the index (item 2), as recorded in
    ``report.duplicates`` (the key indexed last) and ``report.tied``."""
    copies = report.duplicates.setdefault(sop, [earlier])
    own = named(sop)
    if own == earlier:
        copies.insert(len(copies) - 1, later)
        return False
    copies.append(later)
    tied = own != later and dated.get(earlier) == dated.get(later)
    if tied and sop not in report.tied:
        report.tied.append(sop)
    elif not tied and sop in report.tied:
        report.tied.remove(sop)
    return True


@contextlib.contextmanager
def _previous_keys(index_path: Path) -> Iterator[Callable[[str], str | None]]:
    """The key the previous index names for a SOP Instance UID (``None`` when it names
    none, or there is no previous index), asked of it one UID at a time."""
    if not index_path.exists():
        yield lambda sop: None
        return
    conn = connect(index_path)
    try:
        if "instance" not in reads.tables(conn):
            yield lambda sop: None
            return

        def named(sop: str) -> str | None:
            found = reads.located(conn, [sop])
            return found[0].object_key if found else None

        yield named
    finally:
        conn.close()


def _apply_notes(index: Index, notes: list[_Note], report: Report,
                 removed: dict[str, reads.TombstoneRow] | None = None) -> None:
    """Apply each rejection note again, in store order, once every object is indexed
    (item 6 of the module docstring): the rows of what it rejects out, its tombstones
    in, as the removal wrote them, in the removal's chunks; a tombstone carried from
    the previous index (``removed``, item 9), which knows who removed it, is kept."""
    for note in notes:
        reason = note.rejection.reason
        when = _received_at(note.stored)
        for chunk in chunks(note.rejection.references):
            with index.write() as conn:
                rows, stones = _rejected(note, chunk, reads.located(
                    conn, [place.sop_uid for place in chunk]), report)
                stones = [place for place in stones if place.sop_uid not in (removed or {})]
                delete_rows(conn, rows, stones, (reason.code, reason.scheme),
                            UNKNOWN_SENDER, when)
            report.rejected += len(rows)
            report.indexed -= len(rows)


def _rejected(note: _Note, chunk: Iterable[Reference], indexed: Iterable[Located],
              report: Report) -> tuple[list[Located], list[Reference]]:
    """The rows a note removes among ``indexed`` and the tombstones it writes for the
    places of ``chunk``, by :meth:`pacs.core.deletion.Deleter.reject`'s rules: a UID
    not indexed gets its tombstone; an instance of another patient or at another
    place is left as it is; one that may have been sent again after the note
    (:attr:`_Note.lets_back`) stays, without a tombstone (counted in
    ``report.undecided``)."""
    found = {row.sop_uid: row for row in indexed}
    rows: list[Located] = []
    stones: list[Reference] = []
    for place in chunk:
        row = found.get(place.sop_uid)
        if row is None:
            stones.append(place)
        elif rejectable(note.patient, row, place):
            if note.lets_back:
                report.undecided += 1
                continue
            rows.append(row)
            stones.append(reference(row))
    return rows, stones


def _refusal(key: str, analysis: Analysis | Exception) -> str | None:
    """Why the object at ``key`` is not indexed, or ``None``."""
    if isinstance(analysis, NotFound):
        return "gone since it was listed"
    if not isinstance(analysis, Analysis):
        reason = str(analysis) if isinstance(analysis, PacsError) else type(analysis).__name__
        return f"not a readable instance: {reason}"
    if object_key(analysis.study_uid, analysis.series_uid,
                  analysis.sop_instance_uid) != key:
        return "its UIDs name another key"
    return None


def _row(analysis: Analysis, key: str, size: int,
         received: float | None) -> writer.InstanceRow:
    """The instance's index row, as ingest builds it, with what the store tells of its
    reception (and no calling AE title)."""
    return instance_row(analysis, key, size, received_at=_received_at(received))


def _received_at(stored: float | None) -> str:
    """A stored time as the index writes a received time (:data:`UNKNOWN_RECEIVED`:
    not told)."""
    return (UNKNOWN_RECEIVED if stored is None
            else datetime.fromtimestamp(stored, UTC).strftime(RECEIVED_FORMAT))


def _write(index: Index, batch: list[tuple[writer.InstanceRow,
                                           metadata.Prepared | None]]) -> None:
    if not batch:
        return
    with index.write() as conn:
        for row, prepared in batch:
            writer.upsert(conn, row)
            metadata.save(conn, row.values[Level.IMAGE]["sop_uid"] or "", prepared)


def _analysed(store: ObjectStore, keys: list[str], analysers: AnalyserPool,
              readers: int) -> Iterator[tuple[str, _Outcome]]:
    """Each key with its object's size and analysis, in order; objects are read by
    ``readers`` threads and analysed by the pool, a bounded number ahead."""
    window = max(2, 2 * max(readers, analysers.size))
    pending: deque[tuple[str, Future[_Outcome]]] = deque()
    remaining = iter(keys)
    with ThreadPoolExecutor(max_workers=max(1, readers),
                            thread_name_prefix="reindex-read") as pool:
        try:
            for key in remaining:
                pending.append((key, pool.submit(_read_and_analyse, store, key, analysers)))
                if len(pending) >= window:
                    break
            while pending:
                key, future = pending.popleft()
                outcome = future.result()  # a StorageError ends the rebuild
                following = next(remaining, None)
                if following is not None:
                    pending.append((following, pool.submit(_read_and_analyse, store,
                                                           following, analysers)))
                yield key, outcome
        finally:
            for _key, future in pending:
                future.cancel()


def _read_and_analyse(store: ObjectStore, key: str, analysers: AnalyserPool) -> _Outcome:
    """The object's size and analysis (a missing object, something that is no file of
    the store, an object over the analysers' ``max_object_bytes``, read no further:
    the error as its analysis; a failing store raises, naming the key, so that one
    object the store cannot give, a file of other permissions say, can be found)."""
    try:
        data = read_object(store, key, analysers.max_object_bytes)
    except (NotFound, ForeignObject, ObjectTooLarge) as exc:
        return 0, exc
    except StorageError as exc:
        raise StorageError(f"{key}: {exc}") from exc
    return len(data), analysers.submit(data).result()


def _swap(new_path: Path, index_path: Path, stamp: str) -> Path | None:
    """Put the new index in place with one rename; keep the previous one beside it.

    The previous file gets a second name first (a hard link, so that ``index_path``
    names a complete index at every moment), its ``-wal`` moves along (its committed
    transactions belong to it, and a stale one beside the new file would be replayed
    into it) and its ``-shm`` goes; then the new file is renamed over it.  With no
    previous file, a ``-wal`` left by one moved away (a damaged index put aside after
    a crash) is kept under another name for the same reason.
    """
    folder = index_path.parent
    previous: Path | None = None
    wal = Path(f"{index_path}-wal")
    if not index_path.exists() and wal.exists():
        os.replace(wal, Path(f"{wal}.before-reindex-{stamp}"))
        Path(f"{index_path}-shm").unlink(missing_ok=True)
    if index_path.exists():
        previous = index_path.with_name(f"{index_path.name}.before-reindex-{stamp}")
        try:
            os.link(index_path, previous)
        except OSError:
            # No hard links here: the previous index moves instead (for a moment, until
            # the rename below, there is no index file).
            os.replace(index_path, previous)
        if wal.exists():
            os.replace(wal, Path(f"{previous}-wal"))
        Path(f"{index_path}-shm").unlink(missing_ok=True)
    os.replace(new_path, index_path)
    for suffix in ("-wal", "-shm"):
        Path(f"{new_path}{suffix}").unlink(missing_ok=True)
    _fsync_folder(folder)
    return previous


def _remove(path: Path) -> None:
    """Remove a database file and its ``-wal`` / ``-shm``."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
