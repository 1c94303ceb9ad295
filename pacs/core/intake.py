"""The intake: acknowledged objects kept in the index until the object store has them.

An instance is acknowledged once one SQLite transaction holding its index rows *and*
its bytes (a row of the ``intake`` table) has committed: one WAL commit with
``synchronous=FULL``, shared by every thread storing at that moment
(:meth:`pacs.core.index.connection.Index.commit`).  The WAL is the journal; crash
consistency is SQLite's, and there is nothing to replay: after a crash the intake
still holds every acknowledged object not yet moved.

Two parts live here:

- :class:`IntakeStore`, the object store every reader gets (built in
  :mod:`pacs.core.services`): an object in the intake is read from there first (in
  place, SQLite's incremental blob I/O), so an acknowledged instance is readable at
  once (WADO-RS, frames, rendered, C-MOVE / C-GET, metadata, fsck, the duplicate
  comparison); every other key from the backend (folder or S3);
- :class:`Mover`, one per customer (an ``flock`` on ``intake.lock``), which writes the
  intake's objects to their keys in the backend, durably, oldest first and in batches,
  then deletes their rows - only a row that is still the one it copied, under the
  instances' ingest locks, so that an overwrite and a move never interleave - and
  keeps the DICOM JSON metadata of what it moved (:func:`pacs.core.metadata.prepare_bytes`:
  ingest leaves it to the mover, off the acknowledgement's path).  While objects keep
  arriving, the mover holds back (:class:`Hold`): a burst (a modality sending a study)
  is acknowledged with the cores to itself, and moved once it pauses.

A write the store did not answer (S3 timed out, or dropped the connection after the
request was sent: :class:`~pacs.core.errors.UnsettledWrite`) may still be carried out
by the store later, over whatever was written to the key since.  Its key is
*unsettled* (table ``unsettled``) for ``PACS_S3_SETTLE`` seconds: the object the index
names for it stays in the intake, where every reader finds it first, and is written to
the store again only once a late write could no longer land over it; ingest sends a
new object of that key through the intake whatever its size, and puts an overwritten
object whose replacement went unanswered back into the intake
(:mod:`pacs.core.ingest`).  A mover that dies (``kill -9``) may leave PUTs in flight
that nobody saw unanswered: the next mover finds the previous one's mark
(``intake_state.mover_active``) and makes every key then in the intake unsettled
(:meth:`Mover.begin`).

An object over :data:`BLOB_BYTES` (on S3, whose intake takes objects up to 64 MiB: a CT
slice) is kept as a file of the intake's folder (:class:`IntakeFiles`, ``<data>/intake``)
rather than as a blob: written and synced while it is analysed, as the folder store
writes it, and its row, committed with the index rows, holds no bytes.  Copied page by
page through the WAL, a 512 KB object cost about 1.4 times the CPU
(docs/architecture.md, "The intake").  The file is named by its
SOP Instance UID and checksum, never the name of another version of the instance, so
that a new version never overwrites acknowledged bytes before its own commit; a file
that no row names any more (moved, replaced, removed, or left by a crash before its
commit) is removed under the instance's ingest lock (:meth:`IntakeStore.tidy`,
:meth:`Mover.sweep`).

Objects over ``PACS_INTAKE_OBJECT_BYTES`` bypass the intake (written to the store
before their index row, :mod:`pacs.core.ingest`): copying them through the WAL and the
index file costs more than the fsyncs saved (the default per store:
:attr:`pacs.core.config.Settings.intake_limit`).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import io
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import apsw

from pacs.core import metadata
from pacs.core.dataset import valid_uid
from pacs.core.errors import (
    IndexFailure,
    IntakeFull,
    NotFound,
    PacsError,
    StorageError,
    UnsettledWrite,
)
from pacs.core.index import outbox, reads, writer
from pacs.core.index.connection import Index
from pacs.core.storage import (
    BatchPut,
    ObjectStore,
    Quarantine,
    local_path,
    open_ranged,
    open_seekable,
    put_many,
    usage,
)
from pacs.core.storage.filesystem import DurableFolders, FileStore

log = logging.getLogger(__name__)

#: Objects and bytes the mover copies per batch (one durability pass of the store, one
#: index transaction, the ingest locks of the batch's instances held meanwhile).
BATCH_OBJECTS = 64
BATCH_BYTES = 32 << 20
#: PUTs in flight at once when the store has no :class:`BatchPut` (S3: each PUT is a
#: round trip; a few in parallel fill the link).
PARALLEL_PUTS = 4
#: Seconds the mover waits after a batch that emptied the intake before it looks again:
#: under a steady stream, the next batch is then a full one (one durability pass and
#: one checkpoint for many objects, fewer fsyncs beside the ingest's own).
LINGER = 0.25
#: Batches between checkpoints while a backlog is moved (else one each time the mover
#: has caught up).
CHECKPOINT_BATCHES = 8
#: The longest wait after a store failure.
MAX_BACKOFF = 30.0
#: Seconds after an unanswered write of a key before the mover writes the key again
#: and forgets it, unless told otherwise (``PACS_S3_SETTLE``): longer than a store
#: takes to carry out a request it has received (S3 servers drop a request that does
#: not complete within minutes).
SETTLE_SECONDS = 600.0
#: Seconds a refused sender is asked to wait (STOW-RS ``Retry-After``).
RETRY_AFTER = 10
#: Seconds between two log lines about stores refused while the intake is full.
REFUSALS_LOG_INTERVAL = 10.0
#: Read-ahead of an intake object's stream (reads this large or larger go straight to
#: the blob).
_READ_BUFFER = 256 << 10
#: Name of the mover's lock file in the data folder.
LOCK_NAME = "intake.lock"
#: Objects of the intake up to this size are blobs of the index; larger ones are files
#: of the intake's folder (:class:`IntakeFiles`).
BLOB_BYTES = 256 << 10
#: Seconds after which a removal's pending object deletion is the mover's: before,
#: the removal itself is deleting it (a chunk of objects on a slow S3).
DELETION_GRACE = 300.0
#: Seconds after which rows passed over for a lost file are looked at again.
STUCK_RETRY = 600.0
#: Name of the intake's folder in the data folder.
FILES_FOLDER = "intake"
#: Seconds after which a temporary file of the intake's folder is a crash's leftover:
#: a write stages one for as long as the object's analysis and its commit take.
STALE_TEMPORARY_SECONDS = 3600.0
_FILE_NAME = re.compile(r"(?P<sop>[0-9.]{1,64})\.[0-9a-f]{64}\Z")


def file_name(key: str, checksum: str) -> str:
    """The name of the intake file of the object at ``key`` with ``checksum``."""
    return f"{_sop_of(key)}.{checksum}"


class IntakeFiles(FileStore):
    """The intake's folder: each object one file, named by :func:`file_name`, written
    as the folder store writes its objects (synced while it is analysed, then renamed
    and its folder synced: :class:`~pacs.core.storage.Staging`).

    Parameters
    ----------
    root : Path
        ``<data>/intake``, made (durably) when first written to.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # Made in the data folder, beside the index, as the first write needs it.
        self._folders = DurableFolders(root.parent)

    def _path(self, key: str) -> Path:
        # Names come from validated UIDs and hex checksums: never a path elsewhere.
        if _sop_of_file(key) is None:
            raise StorageError("refusing an intake file name not derived from a UID")
        return self.root / key

    def names(self, sop_uids: Collection[str] | None = None) -> list[str]:
        """The intake's files (temporary files excluded); only those of ``sop_uids``
        when given (a listing of the folder all the same: a prefix filter spares the
        other names' checks)."""
        try:
            listed = os.listdir(self.root)
            if sop_uids is not None:
                prefixes = tuple(f"{sop}." for sop in sop_uids)
                listed = [name for name in listed if name.startswith(prefixes)]
            return [name for name in listed if _sop_of_file(name)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list the intake's folder: {exc.strerror or exc}"
                               ) from exc

    def remove_quietly(self, name: str) -> None:
        """Remove an intake file no row names, without a folder fsync (a removal a
        crash undoes leaves a file no row names, which the sweep removes again); a
        failure is logged (the next sweep tries again)."""
        try:
            self._path(name).unlink(missing_ok=True)
        except (OSError, StorageError) as exc:
            log.warning("could not remove a moved or replaced intake file (%s)",
                        getattr(exc, "strerror", None) or exc)

    def remove_old_temporaries(self, older_than: float) -> int:
        """Remove the temporary files last written before ``older_than`` (``time.time()``):
        a crash's leftovers; the number removed."""
        removed = 0
        for path in self.temporaries():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    removed += 1
        return removed


def _sop_of_file(name: str) -> str | None:
    """The SOP Instance UID an intake file's name holds; ``None`` for another name."""
    match = _FILE_NAME.match(name)
    if match is None or not valid_uid(match["sop"]):
        return None
    return match["sop"]


class IntakeStore:
    """An :class:`~pacs.core.storage.ObjectStore` whose reads see the intake first.

    Parameters
    ----------
    backend : ObjectStore
        The customer's folder or S3 store.
    index : Index
        The customer's index (which holds the intake).
    files : IntakeFiles
        The intake's folder (its objects over :data:`BLOB_BYTES`).

    Notes
    -----
    ``put`` and ``delete`` (the :class:`~pacs.core.storage.ObjectStore` protocol's) act
    on the backend and remove the key's intake copy (in its own transaction): what
    ``open`` answers afterwards is what was put, or nothing.  Ingest and deletion remove
    the intake copy in the transaction of the index row instead
    (:func:`pacs.core.index.writer.intake_drop`,
    :func:`~pacs.core.index.writer.delete_instance`) and write or delete the backend's
    object themselves, as the mover does.  Capabilities: ``local_file`` gives ``None``
    for an intake object (read it with ``open``); ``open_ranged``, ``usage`` and
    ``quarantine`` are the backend's.  There is no batch put here: what writes in
    batches (the ingest's direct path, the mover) writes to ``backend``.
    """

    def __init__(self, backend: ObjectStore, index: Index, files: IntakeFiles) -> None:
        self.backend = backend
        self.index = index
        self.files = files

    def _entry(self, key: str) -> reads.IntakeEntry | None:
        return reads.intake_entry(self.index.connection(), key)

    def in_intake(self, key: str) -> bool:
        """True while the intake holds the object at ``key`` (read without the backend)."""
        return self._entry(key) is not None

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Write to the backend durably, then drop the key's older intake copy."""
        self.backend.put(key, source, length)
        self.forget(key)

    def forget(self, key: str) -> None:
        """Drop the intake's copy of ``key``, in a transaction of its own (its file
        too, when it has one)."""
        entry = self._entry(key)
        if entry is not None:
            with self.index.write() as conn:
                writer.intake_drop(conn, key)
            if entry.in_file:
                self.files.remove_quietly(file_name(key, entry.checksum))

    def open(self, key: str) -> BinaryIO:
        """The intake's copy when there is one, else the backend's object."""
        entry = self._entry(key)
        if entry is not None and entry.in_file:
            return self._open_file(entry)
        if entry is not None:
            blob = reads.intake_blob(self.index.connection(), entry.id)
            if blob is not None:
                return io.BufferedReader(IntakeReader(blob, entry, self), _READ_BUFFER)
        return self.backend.open(key)

    def _open_file(self, entry: reads.IntakeEntry) -> BinaryIO:
        """The intake file of ``entry``; when the mover removed it meanwhile, the
        object as the key holds it now (a file, once open, stays readable: the
        mover's removal never cuts a read short)."""
        try:
            return self.files.open(file_name(entry.object_key, entry.checksum))
        except NotFound:
            now = self._entry(entry.object_key)
            if now is not None and now.id == entry.id:
                raise  # the row names a file that is not there
            return self.open(entry.object_key)

    def tidy(self, sop_uids: Collection[str]) -> int:
        """Remove the intake files of ``sop_uids`` that no intake row names: older
        versions, and those of an instance moved or removed; the number removed.

        Under the UIDs' ingest locks, after the commit that changed their rows (the
        only intake row an instance can have is that of the key its index row
        names).  A failure is logged, not raised: the mover's :meth:`Mover.sweep`
        tries again.
        """
        try:
            found = [(name, sop) for name in self.files.names(sop_uids)
                     if (sop := _sop_of_file(name)) is not None and sop in sop_uids]
            kept = self._named({sop for _name, sop in found}) if found else set()
        except PacsError as exc:
            log.warning("could not tidy the intake's folder (%s)", exc)
            return 0
        strays = [name for name, _sop in found if name not in kept]
        for name in strays:
            self.files.remove_quietly(name)
        return len(strays)

    def _named(self, sop_uids: set[str]) -> set[str]:
        """The intake files the intake rows of ``sop_uids`` name."""
        conn = self.index.connection()
        named = set()
        for sop in sop_uids:
            stored = reads.lookup(conn, sop)
            entry = self._entry(stored.object_key) if stored is not None else None
            if entry is not None and entry.in_file:
                named.add(file_name(entry.object_key, entry.checksum))
        return named

    def size(self, key: str) -> int:
        """The intake's copy's size, else the backend's."""
        entry = self._entry(key)
        return entry.size if entry is not None else self.backend.size(key)

    def delete(self, key: str) -> None:
        """Remove the intake copy and the backend's object."""
        self.forget(key)
        self.backend.delete(key)

    def keys(self) -> Iterator[str]:
        """The backend's keys and the intake's, each once."""
        pending = set(reads.intake_keys(self.index.connection()))
        for key in self.backend.keys():  # noqa: SIM118 - a store, not a dict
            pending.discard(key)
            yield key
        yield from sorted(pending)

    def check(self, create: bool = True) -> None:
        """The backend's check."""
        self.backend.check(create)

    def close(self) -> None:
        """Close the backend and the intake's folder."""
        self.backend.close()
        self.files.close()

    # --- capabilities (pacs.core.storage) -------------------------------------------

    def local_file(self, key: str) -> Path | None:
        """The backend's file of ``key``; ``None`` while the object is in the intake
        or when the backend keeps no local files."""
        if self._entry(key) is not None:
            return None
        return local_path(self.backend, key)

    def open_ranged(self, key: str) -> BinaryIO:
        """The intake's copy when there is one (it seeks in place), else the backend's
        object opened for reads of its parts (:func:`pacs.core.storage.open_ranged`:
        ranged GETs on S3)."""
        if self._entry(key) is not None:
            return open_seekable(self, key)
        return open_ranged(self.backend, key)

    def usage(self) -> int:
        """Bytes in the backend (the intake's are in ``pacs status``'s backlog)."""
        return usage(self.backend)

    def quarantine(self, key: str, folder: str) -> str:
        """The backend's quarantine (objects in the intake are the index's own:
        repair never quarantines them)."""
        if not isinstance(self.backend, Quarantine):
            raise StorageError("this store cannot quarantine objects")
        return self.backend.quarantine(key, folder)


class IntakeReader(io.RawIOBase):
    """An intake object read in place (SQLite incremental blob I/O), seekable.

    When the mover deletes the row while it is read (the object is in the backend
    then), the rest is read from the backend; when a newer version replaced the row,
    the read fails (:class:`StorageError`) rather than mix two versions.
    """

    def __init__(self, blob: apsw.Blob, entry: reads.IntakeEntry, store: IntakeStore
                 ) -> None:
        super().__init__()
        #: What a reader (pydicom) may name the stream by: the object's key.
        self.name = entry.object_key
        self._blob: apsw.Blob | None = blob
        self._entry = entry
        self._store = store
        self._fallback: BinaryIO | None = None
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position,
                io.SEEK_END: self._entry.size}[whence]
        self._position = max(0, base + offset)
        if self._fallback is not None:
            self._fallback.seek(self._position)
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._entry.size - self._position)
        if wanted <= 0:
            return 0
        if self._blob is not None:
            try:
                self._blob.seek(self._position)
                self._blob.read_into(view, 0, wanted)
            except apsw.AbortError:
                self._switch_to_backend()
            else:
                self._position += wanted
                return wanted
        if self._fallback is None:  # closed
            raise ValueError("read of a closed intake object")
        count = self._fallback.readinto(view[:wanted])  # type: ignore[attr-defined]
        self._position += count
        return int(count)

    def _switch_to_backend(self) -> None:
        """The row changed under the read: moved (read on from the backend) or
        replaced by a newer version (fail)."""
        self._close_blob()
        now = self._store._entry(self._entry.object_key)
        if now is not None and now.id != self._entry.id:
            raise StorageError("the object was replaced while it was read")
        stream = self._store.backend.open(self._entry.object_key)
        try:
            stream.seek(self._position)
        except (OSError, io.UnsupportedOperation):
            stream.read(self._position)  # a stream that cannot seek: skip ahead
        self._fallback = stream

    def _close_blob(self) -> None:
        if self._blob is not None:
            with contextlib.suppress(apsw.Error):
                self._blob.close()
            self._blob = None

    def close(self) -> None:
        self._close_blob()
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        super().close()


# --- back-pressure ---------------------------------------------------------------------

def room_left(index: Index, max_bytes: int) -> int:
    """Bytes the intake may still take within ``max_bytes`` (0 or less: none)."""
    return max_bytes - reads.intake_bytes(index.connection())


def fits(size: int, room: int, max_bytes: int) -> bool:
    """Whether an object of ``size`` bytes fits in the intake with ``room`` bytes left
    of ``max_bytes``: within the room, or alone in an empty intake (an object larger
    than the limit would never be taken otherwise; the intake then holds it alone)."""
    return size <= room or (room >= max_bytes and room > 0)


def intake_full() -> IntakeFull:
    """The refusal of an object the intake has no room for."""
    return IntakeFull("the node cannot take more objects until its object store has "
                      "caught up; retry later")


def check_room(index: Index, max_bytes: int, size: int = 0) -> None:
    """Refuse a new object of ``size`` bytes (0: not known yet) the intake has no room
    for (:func:`fits`): ``max_bytes`` bounds what it holds, whatever the objects'
    sizes.

    Raises
    ------
    IntakeFull
        The backlog is at the limit (the store is slow or down).
    """
    require_room(index.connection(), max_bytes, size)


def require_room(conn: apsw.Connection, max_bytes: int, size: int = 0) -> None:
    """:func:`check_room` on ``conn``: within a write transaction, where one writer at
    a time adds to the intake, an exact bound (:func:`pacs.core.ingest._indexing`).

    Raises
    ------
    IntakeFull
        The backlog is at the limit.
    """
    room = max_bytes - reads.intake_bytes(conn)
    if room <= 0 or not fits(size, room, max_bytes):
        raise intake_full()


class Refusals:
    """The log of stores refused while the intake is full (:func:`check_room`).

    A flood of refused stores (every C-STORE of every association, every STOW-RS
    part, while the object store is down) would be a flood of log lines; here they
    are counted, and a WARNING with the count goes out at the first refusal and then
    at most once per ``interval``: at a refusal, or at the first object taken again
    (:meth:`settled`).  Counts only, no UIDs.  One per
    :class:`~pacs.core.ingest.Ingest`: per customer, in each process.

    Parameters
    ----------
    interval : float
        Least seconds between two lines.
    clock : callable
        Monotonic seconds (tests give their own).
    """

    def __init__(self, interval: float = REFUSALS_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._last: float | None = None  # when the last line went out

    def refused(self, count: int = 1) -> None:
        """Count ``count`` stores refused; log them with those not reported yet, unless
        a line went out less than ``interval`` ago."""
        with self._lock:
            self._pending += count
            reported = self._take()
        if reported:
            log.warning("the intake is full (PACS_INTAKE_MAX_BYTES): %d store(s) refused "
                        "since the last report; the object store has not caught up",
                        reported)

    def settled(self) -> None:
        """An object is taken again: log the refusals not reported yet, unless a line
        went out less than ``interval`` ago (they go out with the next one then)."""
        if not self._pending:  # the usual case: no lock taken
            return
        with self._lock:
            reported = self._take()
        if reported:
            log.warning("the intake takes objects again; %d store(s) refused since the "
                        "last report", reported)

    def _take(self) -> int:
        """The count to log now (0: nothing, or too soon), reset; under the lock."""
        now = self._clock()
        if not self._pending or (self._last is not None
                                 and now - self._last < self.interval):
            return 0
        reported, self._pending, self._last = self._pending, 0, now
        return reported


# --- the mover -------------------------------------------------------------------------

#: The ingest's per-UID locks for several SOP Instance UIDs at once
#: (:meth:`pacs.core.ingest.Ingest.uid_locks`).
UidLocks = Callable[[list[str]], AbstractContextManager[None]]


@dataclass(frozen=True)
class Hold:
    """When the mover leaves the intake alone while objects keep arriving.

    Moving competes with ingest for the cores (the store's writes, the S3 client and
    server, the metadata) and for the index's write lock; the objects are durable in
    the intake already.  So while instances are stored (in the intake or directly)
    since the mover's last look (:data:`LINGER` ago), the mover waits, unless the
    backlog is old or large: its oldest object arrived ``seconds`` ago or more, or it
    holds ``bytes`` or more.  Past either bound it moves as before, beside the ingest,
    oldest first: the lag of the object store behind the acknowledgements stays within
    ``seconds`` (plus the time to move ``bytes``), and the intake keeps room for the
    rest of a burst before back-pressure refuses stores.

    Parameters
    ----------
    seconds : float
        ``PACS_INTAKE_MOVER_HOLD``; 0: never hold.
    bytes : int
        Half of ``PACS_INTAKE_MAX_BYTES``.
    """

    seconds: float = 0.0
    bytes: int = 0

    def holds(self, backlog: reads.IntakeState, arriving: bool, now: float) -> bool:
        """True when the mover should wait rather than move ``backlog`` now."""
        if not arriving or self.seconds <= 0 or backlog.objects == 0:
            return False
        young = backlog.oldest is None or now - backlog.oldest < self.seconds
        return young and backlog.bytes < self.bytes


class _Read(enum.Enum):
    """What the mover found of an intake row other than its bytes."""

    GONE = "the row was replaced or removed"
    STORED = "the store holds its object already"
    STUCK = "its file is missing or damaged, and the store does not hold it"


@dataclass
class MoverState:
    """What the mover did so far (for its log and tests)."""

    moved: int = 0
    batches: int = 0
    failures: int = 0
    holds: int = 0


class Mover:
    """Moves the intake's objects to the backend store (see the module docstring).

    Parameters
    ----------
    index : Index
        The customer's index.  The mover's own commits (row deletes) need no sync: a
        delete lost in a crash only repeats an identical put.
    store : IntakeStore
        The store whose intake is drained.
    uid_locks : callable
        The ingest's per-UID locks (:meth:`pacs.core.ingest.Ingest.uid_locks`).
    hold : Hold
        When :meth:`run` waits while objects keep arriving (never, by default).
    settle : float
        Seconds after an unanswered write of a key before it is written again
        (:data:`SETTLE_SECONDS`).
    late_writes : bool
        The store may carry out a write after the writer saw it fail or died (S3):
        :meth:`begin` then looks for a mover that died with writes in flight.
    """

    def __init__(self, index: Index, store: IntakeStore, uid_locks: UidLocks,
                 hold: Hold = Hold(), settle: float = SETTLE_SECONDS,
                 late_writes: bool = False) -> None:
        self.index = index
        self.store = store
        self.uid_locks = uid_locks
        self.hold = hold
        self.settle = settle
        self.late_writes = late_writes
        self._begun = False
        self.state = MoverState()
        #: The index's last change number (``instance.change_seq``) at the last look.
        self._head: int | None = None
        # True at first: the first batch that succeeds clears an error a previous
        # mover left recorded.
        self._failing = True
        self._threads: ThreadPoolExecutor | None = None
        #: Rows whose file is missing or damaged and not in the store (id -> size):
        #: passed over, and looked at again :data:`STUCK_RETRY` after the first.
        self._stuck: dict[int, int] = {}
        self._stuck_since = 0.0
        #: What the mover reports of them (``pacs status``), beside a store's failure.
        self._stuck_error: str | None = None
        #: When the removed instances' objects may be tried again (monotonic), and
        #: the wait after the last failure.
        self._deletions_after = 0.0
        self._deletions_backoff = 0.0

    def move_batch(self) -> int:
        """Move the oldest batch of the intake; the number of rows it removed.

        Under the per-UID locks of the whole batch (:mod:`pacs.core.uidlocks`: no other
        UID waits for them), the batch is put durably - a store with
        :class:`~pacs.core.storage.BatchPut` (the folder) in one durability pass, any
        other (S3) one object per PUT, :data:`PARALLEL_PUTS` at once, none started
        once one has failed - and the rows of what was put are removed in one index
        transaction: the mover takes SQLite's write lock, which the ingest's commits
        wait for, once per batch.  A key whose last write went unanswered less than
        :attr:`settle` seconds ago waits; one that failed unanswered now is recorded
        so (see the module docstring).

        Raises
        ------
        PacsError
            The store (or the index) failed: the rows stay, to be tried again.
        """
        settled_before = time.time() - self.settle
        if self._stuck and time.monotonic() - self._stuck_since > STUCK_RETRY:
            self._stuck.clear()  # looked at again (an operator may have mended them)
            self._stuck_error = None
            self._failing = True  # the next batch that succeeds clears what was shown
        batch = reads.intake_batch(self.index.connection(), 0, BATCH_OBJECTS, BATCH_BYTES,
                                   settled_before, self._stuck.keys())
        if not batch:
            return 0
        removed, error = self._move(batch, settled_before)
        self.state.moved += removed
        self.state.batches += 1
        if error is not None:
            raise error
        return removed

    def _move(self, entries: list[reads.IntakeEntry], settled_before: float
              ) -> tuple[int, StorageError | None]:
        """Check, put and delete ``entries`` under their UIDs' locks: the rows removed,
        and the first failure of the store.  A key put now whose unanswered write was
        before ``settled_before`` is settled (one whose put goes unanswered now the
        store records itself, :func:`record_unsettled`)."""
        with self.uid_locks([_sop_of(entry.object_key) for entry in entries]):
            current: list[tuple[reads.IntakeEntry, bytes]] = []
            stored: list[reads.IntakeEntry] = []  # in the store already
            for entry in entries:
                data = self._read(entry)
                if isinstance(data, bytes):
                    current.append((entry, data))
                elif data is _Read.STORED:
                    stored.append(entry)
            failures = self._put([(entry.object_key, data) for entry, data in current],
                                 [entry.received_at for entry, _data in current])
            # Those after the puts stopped (a failure) stay in the intake, as they are.
            moved = [(entry, data) for (entry, data), failure
                     in zip(current[:len(failures)], failures, strict=True)
                     if failure is None]
            removed = self._remove_rows(moved, stored, settled_before)
        return len(removed), next((failure for failure in failures if failure is not None),
                                  None)

    def _remove_rows(self, moved: list[tuple[reads.IntakeEntry, bytes]],
                     stored: list[reads.IntakeEntry], settled_before: float
                     ) -> list[reads.IntakeEntry]:
        """Remove the rows of what is in the store now (only rows still the same), with
        the metadata of what was moved; then the files of those removed.  A commit
        that removes rows of files is synced before the files go: lost in a power
        failure, it would leave rows naming files no longer there."""
        done = [entry for entry, _data in moved] + stored
        if not done:
            return []
        described = self._describe(moved)
        settling = reads.any_unsettled(self.index.connection())
        removed: list[reads.IntakeEntry] = []
        with self.index.write(synced=any(entry.in_file for entry in done)) as conn:
            for entry in done:
                if writer.intake_moved(conn, entry.id):
                    removed.append(entry)
                if settling:
                    writer.settled(conn, entry.object_key, settled_before)
            for pk, checksum, prepared in described:
                writer.backfill_metadata(conn, pk, checksum, prepared.json,
                                         prepared.pixel_offset, prepared.pixel_length)
        for entry in removed:  # a crash before leaves them to sweep()
            if entry.in_file:
                self.store.files.remove_quietly(file_name(entry.object_key, entry.checksum))
        return removed

    def _put(self, items: list[tuple[str, bytes]], acknowledged: list[float]
             ) -> list[StorageError | None]:
        """The failure or ``None`` of each item put, in order: the folder's batch (all
        of it, each object dated when it was ``acknowledged``: it is written after
        objects acknowledged later, written directly, and :mod:`pacs.core.reindex`
        rebuilds in the store's order), or parallel PUTs up to the first failure
        (:meth:`_put_parallel`; S3 dates them itself)."""
        if isinstance(self.store.backend, BatchPut) or len(items) < 2:
            return put_many(self.store.backend, items, acknowledged)
        return self._put_parallel(items)

    def _put_parallel(self, items: list[tuple[str, bytes]]) -> list[StorageError | None]:
        """PUT the items, :data:`PARALLEL_PUTS` at a time, in order, and start no more
        once one has failed: the outcomes of those started (a prefix of ``items``).

        A failing store (S3 stalled: each PUT waits for its timeout) then costs the
        batch one round of timeouts, not one per object, while the batch's per-UID
        locks are held; the objects not started wait in the intake for the next
        batch.
        """
        store = self.store.backend
        outcomes: dict[int, Future[StorageError | None]] = {}
        running: set[Future[StorageError | None]] = set()
        for number, item in enumerate(items):
            if len(running) >= PARALLEL_PUTS:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                if any(future.result() is not None for future in done):
                    break
            future = self._pool().submit(_put_one, store, item)
            outcomes[number] = future
            running.add(future)
        wait(running)
        return [outcomes[number].result() for number in range(len(outcomes))]

    def begin(self) -> None:
        """Before the first batch, on a store with late writes: mark that a mover runs,
        and when the last one did not stop cleanly (killed with PUTs in flight, which
        S3 may still carry out, over a newer object written since), make every key of
        the intake unsettled, so that none is written before such a PUT could land.

        Raises
        ------
        IndexFailure
            The mark could not be read or written (the mover does not start).
        """
        if not self.late_writes:
            return
        with self.index.write(synced=True) as conn:  # a crash must not lose the mark
            marked = writer.mover_started(conn, time.time())
        self._begun = True
        if marked:
            log.warning("intake mover: the last one stopped with writes in flight; %d "
                        "object(s) wait %g s in the intake before they are written again",
                        marked, self.settle)

    def finish(self) -> None:
        """After the last batch (no write in flight): clear the mark of :meth:`begin`."""
        if not self._begun:
            return
        try:
            with self.index.write() as conn:
                writer.mover_stopped(conn)
            self._begun = False
        except IndexFailure:
            log.exception("intake mover: cannot record its stop")

    def settle_old(self) -> None:
        """Forget the unsettled keys whose intake holds nothing (a write that failed
        unanswered and that nothing acknowledged since) once they have settled."""
        try:
            with self.index.write() as conn:
                writer.settle_old(conn, time.time() - self.settle)
        except IndexFailure:
            log.exception("intake mover: cannot forget settled keys")

    def _describe(self, moved: list[tuple[reads.IntakeEntry, bytes]]
                  ) -> list[tuple[int, str, metadata.Prepared]]:
        """The DICOM JSON metadata of the moved objects whose instances have none yet
        (ingest leaves it to the mover, :mod:`pacs.core.metadata`): (index key,
        checksum, metadata) of each, kept only if the row still names that object."""
        lacking = reads.undescribed(self.index.connection(),
                                    [_sop_of(entry.object_key) for entry, _data in moved])
        described = []
        for entry, data in moved:
            pk, checksum = lacking.get(_sop_of(entry.object_key), (0, ""))
            if checksum == entry.checksum and (prepared := metadata.prepare_bytes(data)):
                described.append((pk, checksum, prepared))
        return described

    def _pool(self) -> ThreadPoolExecutor:
        """Threads that put objects in parallel on a store without :class:`BatchPut` (kept
        between batches)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=PARALLEL_PUTS,
                                               thread_name_prefix="intake-mover")
        return self._threads

    def close(self) -> None:
        """Stop the mover's threads."""
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None

    def _read(self, entry: reads.IntakeEntry) -> bytes | _Read:
        """The row's bytes; :attr:`_Read.GONE` when it is no longer the current row
        (an overwrite replaced it, or the instance was deleted, since it was listed);
        for a file, :meth:`_read_file`'s."""
        if entry.in_file:
            if not reads.intake_current(self.index.connection(), entry.id):
                return _Read.GONE
            return self._read_file(entry)
        blob = reads.intake_blob(self.index.connection(), entry.id)
        if blob is None:
            return _Read.GONE
        with contextlib.closing(blob):
            return bytes(blob.read())

    def _read_file(self, entry: reads.IntakeEntry) -> bytes | _Read:
        """The bytes of the row's file, checked against its checksum.  A file that is
        missing or differs: :attr:`_Read.STORED` when the store holds the object with
        that checksum (its move done, the row's removal lost), else
        :attr:`_Read.STUCK` - the row is passed over for :data:`STUCK_RETRY`, and
        reported (an ERROR line, the mover's error in ``pacs status``).

        Raises
        ------
        PacsError
            The store failed while it was asked for the object.
        """
        name = file_name(entry.object_key, entry.checksum)
        try:  # a file that cannot be read now (EIO, EMFILE) fails the batch: tried again
            with self.store.files.open(name) as stream:
                data = stream.read()
            if hashlib.sha256(data).hexdigest() == entry.checksum:
                return data
            problem = "differs from what was acknowledged"
        except NotFound:
            problem = "is missing"
        if self._stored(entry):
            return _Read.STORED
        if not self._stuck:
            self._stuck_since = time.monotonic()
        self._stuck[entry.id] = entry.size
        self._stuck_error = (f"{len(self._stuck)} acknowledged object(s) of the intake "
                             f"whose file {problem}, which the store does not hold; they "
                             "stay in the intake (restore the file, or remove the instance)")
        log.error("intake mover: an acknowledged object's intake file %s, and the store "
                  "does not hold it; it stays in the intake", problem)
        self._report(None)
        return _Read.STUCK

    def _stored(self, entry: reads.IntakeEntry) -> bool:
        """True when the store holds the object of ``entry`` with its checksum."""
        try:
            with self.store.backend.open(entry.object_key) as stream:
                digest = hashlib.sha256()
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        except NotFound:
            return False
        return digest.hexdigest() == entry.checksum

    def delete_removed(self) -> int:
        """Delete from the store the objects of removed instances that their removal
        left there (the store failed, or a crash came first: ``object_deletion``,
        :mod:`pacs.core.deletion`): one batch, oldest first, of those recorded at
        least :data:`DELETION_GRACE` ago (a younger one is its removal's own, deleted
        by it now), each under its instance's ingest lock and only while it is still
        pending and no row names its key (an instance stored again at the same key
        keeps its new object); the number of keys done.  A key the store refuses to
        delete goes behind the others; the rest are tried.  An unsettled key is deleted
        and goes behind the others too, still pending: a write of it that the store left
        unanswered may land after this deletion, and only once the key has settled is
        its deletion done for good.

        Raises
        ------
        PacsError
            The store failed (the first failure, once the batch is through; at once
            for a deletion it did not answer): the keys not done stay recorded.
        """
        keys = reads.pending_deletions(self.index.connection(), BATCH_OBJECTS,
                                       time.time() - DELETION_GRACE)
        if not keys:
            return 0
        done: list[str] = []
        later: list[str] = []  # failed, or at an unsettled key
        failure: PacsError | None = None
        with self.uid_locks([_sop_of(key) for key in keys]):
            try:
                conn = self.index.connection()
                for key in sorted(reads.deletions_pending_of(conn, keys)):
                    stored = reads.lookup(conn, _sop_of(key))
                    named = stored is not None and stored.object_key == key
                    try:
                        if not named and reads.intake_entry(conn, key) is None:
                            self.store.backend.delete(key)
                    except UnsettledWrite:
                        raise  # the store is not answering: no more now
                    except PacsError as exc:
                        later.append(key)
                        failure = failure or exc
                        continue
                    (later if reads.unsettled(conn, key) else done).append(key)
            finally:
                if done or later:
                    with self.index.write() as conn:
                        writer.deletions_done(conn, done)
                        writer.deletions_later(conn, later, time.time())
        if failure is not None:
            raise failure
        return len(done)

    def _delete_all_removed(self) -> None:
        """:meth:`delete_removed` until none is left or the store fails (logged)."""
        try:
            while self.delete_removed():
                pass
        except PacsError as exc:
            log.warning("intake mover: could not delete a removed instance's object "
                        "(%s); the rest are deleted by the next mover", exc)

    def _delete_removed_quietly(self) -> None:
        """One batch of :meth:`delete_removed`, unless the store failed less than the
        back-off ago (logged once per failure; tried again after a growing wait)."""
        if time.monotonic() < self._deletions_after:
            return
        try:
            self.delete_removed()
        except PacsError as exc:
            self._deletions_backoff = min(MAX_BACKOFF, max(1.0, self._deletions_backoff * 2))
            self._deletions_after = time.monotonic() + self._deletions_backoff
            log.warning("intake mover: could not delete a removed instance's object (%s); "
                        "trying again in %g s", exc, self._deletions_backoff)
        else:
            self._deletions_backoff = 0.0

    def sweep(self) -> int:
        """Remove the intake files no row names (the mover's own removals a crash
        interrupted, those of a replaced or removed instance whose removal failed, a
        write's file whose commit never happened), each under its instance's ingest
        lock, and temporary files older than :data:`STALE_TEMPORARY_SECONDS`; the
        number of files removed."""
        files = self.store.files
        removed = files.remove_old_temporaries(time.time() - STALE_TEMPORARY_SECONDS)
        names = files.names()
        if not names:
            return removed
        named = {file_name(key, checksum)
                 for key, checksum in reads.intake_files(self.index.connection())}
        strays = sorted({sop for name in names if name not in named
                         and (sop := _sop_of_file(name)) is not None})
        for start in range(0, len(strays), BATCH_OBJECTS):
            chunk = strays[start:start + BATCH_OBJECTS]
            with self.uid_locks(chunk):  # a write of theirs may be between file and commit
                removed += self.store.tidy(set(chunk))
        return removed

    def checkpoint(self) -> None:
        """A passive WAL checkpoint: copy committed pages into the index file without
        waiting for readers, off the ingest's critical path."""
        with contextlib.suppress(apsw.Error):
            self.index.connection().wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)

    def drain(self) -> int:
        """Move until the intake is empty; the number of objects moved.

        Raises
        ------
        PacsError
            The store failed (what was moved before stays moved).
        """
        try:
            self.begin()
            total = self._move_until(math.inf)
            self._sweep_quietly()
            self._delete_all_removed()  # within begin() and finish(), as every write
        finally:
            self.close()
            self.finish()
        self.checkpoint()
        return total

    def run(self, stopping: Callable[[], bool], drain_for: float = 0.0) -> None:
        """Move until ``stopping()``: batches while there is work, a short wait when
        the intake is empty or while :attr:`hold` holds it (instances arriving),
        growing waits while the store fails (ingest goes on into the intake
        meanwhile, up to ``PACS_INTAKE_MAX_BYTES``).  Once stopped, move on for up
        to ``drain_for`` seconds, without holding back, while the intake holds
        objects and the store takes them (:meth:`drain_until`)."""
        try:
            self.begin()
            self.settle_old()
            self._sweep_quietly()
            self._delete_removed_quietly()
            self._run(stopping)
            self.drain_until(time.monotonic() + drain_for)
        finally:
            self.close()
            self.finish()

    def drain_until(self, deadline: float) -> None:
        """Move batches until the intake is empty, the store fails or ``deadline``
        (``time.monotonic()``) has passed.  What is left stays in the intake, durable,
        for the next mover."""
        try:
            self._move_until(deadline)
        except PacsError as exc:
            log.warning("intake mover: the object store failed (%s); the rest stays "
                        "in the intake", exc)
        self.checkpoint()
        with contextlib.suppress(PacsError):  # a count for the log, not worth failing
            left = reads.intake_state(self.index.connection()).objects
            if left:
                log.warning("intake mover: stopped with %d object(s) in the intake; "
                            "they are moved after the next start", left)

    def _move_until(self, deadline: float) -> int:
        """Batches until the intake is empty or ``deadline`` (``time.monotonic()``) has
        passed; the number of objects moved.  A store failure raises
        (:class:`PacsError`)."""
        total = 0
        while time.monotonic() < deadline and (moved := self.move_batch()):
            total += moved
        return total

    def _arriving(self) -> bool:
        """True when an instance was stored since the last call (through the intake or
        not: a CT series written directly wants the cores as much)."""
        head = outbox.head(self.index.connection())
        arriving, self._head = head != self._head, head
        return arriving

    def _run(self, stopping: Callable[[], bool]) -> None:
        backoff = 0.0
        while not stopping():
            backlog = reads.intake_state(self.index.connection())
            if self.hold.holds(backlog, self._arriving(), time.time()):
                self.state.holds += 1
                _sleep(LINGER, stopping)
                continue
            try:
                moved = self.move_batch()
            except PacsError as exc:
                self.state.failures += 1
                backoff = min(MAX_BACKOFF, max(0.5, backoff * 2))
                self._report(str(exc))
                log.error("intake mover: the object store failed (%s); retrying in %g s",
                          exc, backoff)
                _sleep(backoff, stopping)
                continue
            backlog = reads.intake_state(self.index.connection())
            if moved or not backlog.unsettled:
                # The store took objects, or nothing waits on it: a batch that found
                # nothing to move because every row left waits for its unanswered key
                # to settle proves nothing of the store, and the next failure waits
                # longer still (each try that times out leaves more keys unanswered).
                backoff = 0.0
                if self._failing:
                    self._report(None)
            # Rows passed over are no backlog to move.
            waiting = (backlog.objects - len(self._stuck),
                       backlog.bytes - sum(self._stuck.values()))
            if not moved:  # nothing to move (what waits is unsettled): look again later
                if backlog.unsettled:  # a deletion may wait for its key to settle
                    self.settle_old()
                self._delete_removed_quietly()
                _sleep(LINGER, stopping)
            elif waiting[0] < BATCH_OBJECTS and waiting[1] < BATCH_BYTES:
                # Caught up: settled keys forgotten, stray intake files removed, the
                # WAL's pages into the index file.
                if backlog.unsettled:
                    self.settle_old()
                self._sweep_quietly()
                self._delete_removed_quietly()
                self.checkpoint()
                _sleep(LINGER, stopping)
            elif self.state.batches % CHECKPOINT_BATCHES == 0:
                self.checkpoint()  # a backlog: now and then meanwhile

    def _sweep_quietly(self) -> None:
        """:meth:`sweep`; a failure is logged (the next sweep tries again)."""
        try:
            if removed := self.sweep():
                log.info("intake mover: removed %d intake file(s) no row names", removed)
        except PacsError as exc:
            log.warning("intake mover: could not sweep the intake's folder (%s)", exc)

    def _report(self, error: str | None) -> None:
        """Record the last error of the store (or its end) for ``pacs status``, with
        that of rows passed over (which stays while they are)."""
        self._failing = error is not None
        shown = "; ".join(part for part in (error, self._stuck_error) if part) or None
        try:
            with self.index.write() as conn:
                writer.intake_mover_error(conn, shown, time.time() if shown else None)
        except IndexFailure:
            log.exception("intake mover: cannot record its state")


def record_unsettled(index: Index, key: str) -> None:
    """Record that a write of ``key`` went unanswered now (the store's
    ``on_unanswered``, :class:`pacs.core.storage.LateWrites`), on disk before the
    failure reaches its caller: whoever wrote, and whatever it does next, the key is
    written again only once that write can no longer land.

    Raises
    ------
    IndexFailure
        It could not be recorded.
    """
    with index.write(synced=True) as conn:
        writer.unsettle(conn, key, time.time())


def _put_one(store: ObjectStore, item: tuple[str, bytes]) -> StorageError | None:
    """One item put by itself: its failure or ``None``."""
    return put_many(store, [item])[0]


def _sleep(seconds: float, stopping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stopping() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))


def _sop_of(key: str) -> str:
    """The SOP Instance UID a key names (``<study>/<series>/<sop>.dcm``)."""
    return key.rsplit("/", 1)[-1].removesuffix(".dcm")


@contextlib.contextmanager
def mover_lock(data_dir: Path, wait: bool) -> Iterator[bool]:
    """The one-mover-per-customer lock (``flock`` on ``<data>/intake.lock``): yields
    True when held; with ``wait`` false, False at once when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


__all__ = ["BATCH_BYTES", "BATCH_OBJECTS", "BLOB_BYTES", "Hold", "IntakeFiles", "IntakeReader",
           "IntakeStore", "Mover", "Refusals", "check_room", "file_name", "fits", "intake_full",
           "mover_lock", "room_left"]
