"""Store one instance: the single ingest path of C-STORE, ``pacs import``, STOW-RS and
the upload folder.

Order of operations, which is what makes a success durable (docs/architecture.md,
"Guarantees"):

0. refuse at once while the intake is full (:class:`~pacs.core.errors.IntakeFull`,
   back-pressure: the object store is slow or down);
1. read the header and prove the object whole (no pixel decoding, no re-encoding), and
   compute what the index needs (:func:`analyse`, before any lock); the DICOM JSON
   metadata of an object acknowledged through the intake is left to the mover, which
   builds it from the bytes it moves (:mod:`pacs.core.metadata`), off the path of the
   acknowledgement;
2. under a lock on the SOP Instance UID, decide what a repeated UID means;
3. commit, in one transaction (WAL, ``synchronous=FULL``, the commit shared with every
   thread storing meanwhile), the index rows *and* the object's bytes in the intake
   (:mod:`pacs.core.intake`), dropping the intake copy of a key the instance left; an
   object over :data:`~pacs.core.intake.BLOB_BYTES` is staged as a file of the intake
   while step 1 reads it, placed under its own name (a rename, a folder fsync) before
   the commit, which records it without its bytes (a failed commit removes the file
   unless a row names it);
4. for an IOCM rejection note, once the lock is released, remove what it rejects
   (:attr:`Ingest.on_rejection`, :mod:`pacs.core.deletion`);
5. only then report success; the intake's mover writes the object to its key in the
   store later, and every read sees the intake copy until then.

An object over ``PACS_INTAKE_OBJECT_BYTES`` (or every object, when it is 0) takes the
direct path instead: 0a. hand the bytes to the store, which starts making them durable
while step 1 reads them (:class:`~pacs.core.storage.Staging`: the folder store writes
a temporary file with ``O_DSYNC`` in a thread); 3a. place the object at its key durably
(rename and folder fsync, or a completed put: fsync + rename, or an S3 PUT), 3b.
commit the index rows (dropping any older intake copy of the key), then 4 and 5.  What
was staged and not placed (a refused object, a duplicate) is removed.  A failure in 3a
leaves nothing; a failure in 3b removes the object written in 3a.  A crash between 3a
and 3b leaves an object the index does not list; a crash before 3a, a temporary file
(removed at start).  An object that replaces the acknowledged one at the same key (the
same UIDs, other content) goes through the intake whatever its size (up to the
intake's largest blob): placed directly, it would destroy the acknowledged bytes before
its own commit.

After the commit, the old object of a moved instance (new study or series UID) is
deleted from the store; a crash just before leaves it.  The index never lists an
object that neither the intake nor the store holds.  ``pacs fsck --repair``
(:mod:`pacs.core.reconcile`) indexes a stored object no row names only when its UID has
no row, and otherwise quarantines it: the row is what was acknowledged.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import apsw

from pacs.core import audit, metadata, rejection, uidlocks
from pacs.core.attributes import Level
from pacs.core.audit import Participant
from pacs.core.config import SQLITE_MAX_BLOB
from pacs.core.dataset import (
    DECODING_ERRORS,
    Identity,
    dataset_offset,
    extract,
    meta_value,
    read_part10,
    require_uid,
)
from pacs.core.errors import (
    DuplicateRejected,
    IndexFailure,
    IntakeFull,
    InvalidInstance,
    NotAuthorized,
    NotFound,
    ObjectTooLarge,
    PacsError,
    RejectedInstance,
    UIDMismatch,
    UnreadableData,
    UnsettledWrite,
    WriteNotMade,
)
from pacs.core.index import reads, writer
from pacs.core.index.connection import Index
from pacs.core.intake import (
    BLOB_BYTES,
    IntakeStore,
    Refusals,
    check_room,
    file_name,
    fits,
    intake_full,
    require_room,
    room_left,
)
from pacs.core.offload import Offload
from pacs.core.storage import Staged, folder_below, object_key, put_many, read_bounded, staged

log = logging.getLogger(__name__)

#: The file of the per-UID locks, in the lock folder.
LOCK_FILE = "uids.lock"


class Outcome(enum.Enum):
    """What storing an object did."""

    STORED = "stored"
    REPLACED = "replaced"  # a different object under a known UID replaced, by policy
    UNCHANGED = "unchanged"  # the same object was already stored
    KEPT_FIRST = "kept"  # a different object under a known UID, discarded by policy


#: The EventActionCode of the DICOM Instances Transferred event that records a store
#: of each outcome (PS3.15 A.5.3.7): C when the node held no copy of the instance, U
#: when it alters the copy it holds, R when it holds a copy and keeps it unchanged.
TRANSFER_ACTION = {Outcome.STORED: audit.CREATE, Outcome.REPLACED: audit.UPDATE,
                   Outcome.UNCHANGED: audit.READ, Outcome.KEPT_FIRST: audit.READ}
#: Whether a store of each outcome imported its file's instance, for the Data Import
#: event (PS3.15 A.5.3.5) of ``pacs import`` and the upload folder: a different object
#: that the duplicate policy discarded (kept the first) was not; it counts as failed.
IMPORTED = {Outcome.STORED: True, Outcome.REPLACED: True, Outcome.UNCHANGED: True,
            Outcome.KEPT_FIRST: False}


def record_import(record: audit.ImportAudit, result: StoreResult) -> None:
    """Count the store of one file in its import's Data Import events."""
    if IMPORTED[result.outcome]:
        record.stored(result.study_uid, result.sop_class_uid, result.patient,
                      result.outcome.value)
    else:
        record.failed()


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one ingest, with the object's identifying UIDs and the patient it
    names (its Patient ID and issuer: whom the audit trail says the instance is of,
    which the index, keeping one patient per study, may not tell)."""

    outcome: Outcome
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient: audit.Patient


def _refuses_here(found: reads.Tombstone, analysis: Identity) -> bool:
    """Whether a tombstone refuses the object ``analysis`` describes: its reason
    refuses the UID for good, at the study and series of the object."""
    return (rejection.refuses_again(found.reason_code, found.reason_scheme)
            and (found.study_uid, found.series_uid) == (analysis.study_uid,
                                                        analysis.series_uid))


def rejected_by(found: reads.Tombstone) -> RejectedInstance:
    """The refusal of an instance a rejection note removed for good."""
    return RejectedInstance(  # within the 64 characters of an Error Comment
        f"rejected ({found.reason_code}, {found.reason_scheme}) by an IOCM rejection note")


@dataclass(frozen=True)
class Analysis(Identity):
    """What ingest needs to know of an object, read from its bytes alone.

    Computed by :func:`analyse`, a pure function of the bytes (no index, no store),
    before any lock is taken.

    Attributes
    ----------
    values :
        Index values by level and column (:func:`pacs.core.dataset.extract`).
    checksum :
        SHA-256 of the bytes, hex.
    metadata :
        The instance's DICOM JSON, prepared for WADO-RS (``None``: built on request).
    rejection :
        What the object rejects when it is an IOCM rejection note
        (:mod:`pacs.core.rejection`), else ``None``.
    unambiguous :
        No top-level tag repeats, and none after the pixel data belongs before it
        (:attr:`pacs.core.dataset.Instance.unambiguous`); ingest refuses one that is
        not (:func:`_ambiguity`).
    pixel_mismatch :
        :attr:`pacs.core.dataset.Instance.pixel_mismatch`; ingest refuses an object
        that has one (:func:`_ambiguity`).
    """

    values: dict[Level, dict[str, str | None]]
    checksum: str
    metadata: metadata.Prepared | None
    rejection: rejection.Rejection | None = None
    unambiguous: bool = True
    pixel_mismatch: str | None = None


def analyse(data: bytes, expected: tuple[str, str] | None = None,
            max_object_bytes: int | None = None, *, describe: bool = True,
            checksum: Callable[[], str] | None = None) -> Analysis:
    """Read, check and describe one Part 10 object (step 1 of the module docstring).

    Parameters
    ----------
    data : bytes
        The object as received (preamble, file meta and data set).
    expected : (SOP Class UID, SOP Instance UID), optional
        The UIDs of the C-STORE command, which must agree with the data set
        (PS3.4 B.2.3; Orthanc checks the same).
    max_object_bytes : int, optional
        ``PACS_MAX_OBJECT_BYTES``: the largest object, as received and, for a deflated
        data set, once inflated (``None``: no limit).
    describe : bool
        Encode the DICOM JSON metadata too (``False``: ``metadata`` is ``None``, built
        later by the intake's mover or on first request).
    checksum : callable, optional
        Gives the SHA-256 of ``data`` (hex), computed meanwhile elsewhere
        (:meth:`Ingest.digest`); called once the header is read.  ``None``: computed
        here.

    Raises
    ------
    InvalidInstance
        Unreadable data, invalid UIDs, a UID mismatch, an object too large
        (:class:`ObjectTooLarge`), or a rejection note that cannot be applied
        (:class:`~pacs.core.errors.InvalidRejection`).
    """
    if expected is not None:
        expected = (require_uid(expected[0], "Affected SOP Class UID"),
                    require_uid(expected[1], "Affected SOP Instance UID"))
    instance = read_part10(data, max_object_bytes)
    if expected is not None and expected != (instance.sop_class_uid,
                                             instance.sop_instance_uid):
        raise UIDMismatch("the command's SOP Class/Instance UIDs differ from the data set's")
    # The metadata first: extract() reads the walked bytes, but leaves an element
    # pydicom had to convert decoded in the header, and the JSON encoder reads raw
    # elements faster (and as stored).  Both leave out a value that does not decode;
    # the object is stored as sent.
    prepared = metadata.prepare(instance, data) if describe else None
    values = {level: extract(instance.elements, level) for level in Level}
    try:
        note = rejection.rejection_of(instance)
    except DECODING_ERRORS as exc:  # a note must be read whole to be applied
        raise UnreadableData(f"an element's value does not decode ({type(exc).__name__})"
                             ) from None
    # Validated UIDs, not whatever pydicom decoded (padding, NULs).
    values[Level.STUDY]["study_uid"] = instance.study_uid
    values[Level.SERIES]["series_uid"] = instance.series_uid
    values[Level.IMAGE]["sop_uid"] = instance.sop_instance_uid
    values[Level.IMAGE]["sop_class_uid"] = instance.sop_class_uid
    return Analysis(
        **instance.identity(),
        values=values,
        checksum=checksum() if checksum is not None else sha256(data),
        metadata=prepared,
        rejection=note,
        unambiguous=instance.unambiguous,
        pixel_mismatch=instance.pixel_mismatch,
    )


def sha256(data: bytes) -> str:
    """The checksum the index keeps of an object: SHA-256, hex."""
    return hashlib.sha256(data).hexdigest()


#: Objects from this size on are hashed in a thread while their header is read
#: (:meth:`Ingest.digest`); below it the thread's hand-over costs more than it saves.
DIGEST_OFFLOAD_BYTES = 128 << 10
#: Objects hashed at once by those threads (one per association storing a large one).
DIGEST_THREADS = 4


@dataclass(frozen=True)
class Received:
    """An object as received, with its analysis or the reason it cannot be stored."""

    data: bytes
    analysis: Analysis | Exception

    @classmethod
    def of(cls, data: bytes, max_object_bytes: int | None = None) -> Received:
        """Analyse ``data`` here (:func:`try_analyse`)."""
        return cls(data, try_analyse(data, max_object_bytes))


def try_analyse(data: bytes, max_object_bytes: int | None = None) -> Analysis | Exception:
    """:func:`analyse`, with its exception returned: a refusal (:class:`PacsError`), or
    a fault that fails this object alone."""
    try:
        return analyse(data, max_object_bytes=max_object_bytes)
    except Exception as exc:  # noqa: BLE001 - reported as this object's outcome
        return exc


#: Objects from this size on replace another at its key directly, over the acknowledged
#: bytes (``SQLITE_MAX_BLOB``: the intake cannot hold them); a smaller one replacing
#: another at its key goes through the intake (:meth:`Ingest._journal`).  Only such an
#: object can leave a crash window where the key holds a newer, unacknowledged version
#: (:mod:`pacs.core.reconcile`, window (d)).
DIRECT_OVERWRITE_BYTES = SQLITE_MAX_BLOB


#: What ingest calls once a rejection note is durably stored (or found stored
#: already): the note's analysis and who sent it (:mod:`pacs.core.deletion`).
RejectionHook = Callable[[Analysis, Participant], None]


class Ingest:
    """The ingest path, bound to one index and one store.

    Parameters
    ----------
    index, store :
        The customer's index and object store (reads see the intake first).
    duplicate_policy : {"overwrite", "keep", "reject"}
        What to do with a different object under a stored SOP Instance UID.
    lock_dir : Path
        A local folder for the per-UID locks (shared by every process of the node).
    max_object_bytes : int, optional
        ``PACS_MAX_OBJECT_BYTES``: larger objects (as received, or a deflated data set
        once inflated) are refused with :class:`ObjectTooLarge`; ``None``: no limit.
    intake_object_bytes : int
        ``PACS_INTAKE_OBJECT_BYTES``: objects up to this size are acknowledged through
        the intake, larger ones take the direct path; 0: no intake.
    intake_max_bytes : int, optional
        ``PACS_INTAKE_MAX_BYTES``: the intake's backlog at which objects for it are
        refused (:class:`~pacs.core.errors.IntakeFull`); ``None``: no limit.
    lock_wait : float, optional
        Seconds a store or removal waits for the per-UID locks it needs
        (:meth:`uid_locks`) before it fails with
        :class:`~pacs.core.errors.InstanceLocked`; ``None``: as long as it takes.

    Attributes
    ----------
    refusals : Refusals
        The log of stores refused while the intake is full (counted, at most one line
        per interval); the edges translate :class:`~pacs.core.errors.IntakeFull`
        without logging it.
    on_rejection : RejectionHook or None
        Applies an IOCM rejection note once it is stored (set by the composition
        root, :func:`pacs.core.services.build`); called after the note's lock is
        released, so that it can take the locks of the instances it removes.  Its
        failure is the store's: the sender is told, and the note sent again (a no-op
        for the note itself) applies it then.
    on_refused_rejection : RejectionHook or None
        Told of a rejection note refused because its sender may not remove data (the
        composition root records it as a Security Alert), before the refusal is
        raised; its own failure never changes the refusal.
    """

    def __init__(self, index: Index, store: IntakeStore, duplicate_policy: str,
                 lock_dir: Path, max_object_bytes: int | None = None, *,
                 intake_object_bytes: int = 0, intake_max_bytes: int | None = None,
                 lock_wait: float | None = None) -> None:
        self.index = index
        self.store = store
        self.duplicate_policy = duplicate_policy
        self.lock_dir = lock_dir
        self.max_object_bytes = max_object_bytes
        self.intake_object_bytes = intake_object_bytes
        self.intake_max_bytes = intake_max_bytes
        self.lock_wait = lock_wait
        self.on_rejection: RejectionHook | None = None
        self.on_refused_rejection: RejectionHook | None = None
        self.refusals = Refusals()
        self._digests = Offload(DIGEST_THREADS, "ingest-digest")
        lock_dir.mkdir(parents=True, exist_ok=True)

    def journaled(self, size: int) -> bool:
        """True when an object of ``size`` bytes is acknowledged through the intake."""
        return size <= self.intake_object_bytes

    def filed(self, size: int) -> bool:
        """True when an object of ``size`` bytes is acknowledged through the intake as
        a file of its folder (:data:`pacs.core.intake.BLOB_BYTES`)."""
        return BLOB_BYTES < size <= self.intake_object_bytes

    def check_room(self, size: int | None = None) -> None:
        """Step 0: refuse an object for the intake while the intake is full.

        Parameters
        ----------
        size : int, optional
            The object's size; ``None``: not known yet (a STOW-RS body before it is
            read), refused whenever the intake is in use and full.

        Raises
        ------
        IntakeFull
            The intake holds ``intake_max_bytes`` or more (counted in
            :attr:`refusals`).
        """
        try:
            self._check_room(size)
        except IntakeFull:
            self.refusals.refused()
            raise

    def _room(self) -> int | None:
        """Bytes the intake may still take (:func:`pacs.core.intake.room_left`), or
        ``None`` when it is not bounded or not used."""
        if self.intake_max_bytes is None or self.intake_object_bytes <= 0:
            return None
        return room_left(self.index, self.intake_max_bytes)

    def _check_room(self, size: int | None) -> None:
        """:meth:`check_room`, the refusal not counted."""
        wanted = self.intake_object_bytes > 0 if size is None else self.journaled(size)
        if self.intake_max_bytes is not None and wanted:
            check_room(self.index, self.intake_max_bytes, size or 0)
            self.refusals.settled()

    def store_bytes(self, data: bytes, *, calling_ae: str = "",
                    expected: tuple[str, str] | None = None,
                    may_overwrite: bool = True, may_reject: bool = True,
                    requestor: Participant | None = None) -> StoreResult:
        """Store one Part 10 object.

        Parameters
        ----------
        data, expected :
            As for :func:`analyse`.
        calling_ae : str
            Who sent it, recorded in the index.
        may_overwrite : bool
            The sender may replace a different object stored under the same SOP
            Instance UID (the ``overwrite`` right, :mod:`pacs.core.access`); when it may
            not, the ``overwrite`` policy refuses it as ``reject`` does.
        may_reject : bool
            The sender may remove data with an IOCM rejection note (the ``reject``
            right of an AE, the ``admin`` role of a user); when it may not, a note is
            refused (:class:`NotAuthorized`) and nothing of it stored.
        requestor : Participant, optional
            Who the audit trail names as removing what a rejection note rejects (a
            DICOMweb user and address); by default the calling AE.

        Raises
        ------
        InvalidInstance
            Unreadable data, invalid UIDs, UID mismatch, a rejected duplicate, an
            object over ``max_object_bytes`` (:class:`ObjectTooLarge`), or an instance
            a rejection note removed (:class:`RejectedInstance`).
        NotAuthorized
            A rejection note from a sender that may not reject.
        IntakeFull
            The intake is full (refused before the object is read).
        StorageError, IndexFailure
            The store or the index failed; nothing of the object remains (for a
            rejection note: it is stored, and what it rejects may not all be removed).
        """
        self.check_room(len(data))
        return self._store_bytes(data, calling_ae, expected, may_overwrite, may_reject,
                                 requestor)

    def _store_bytes(self, data: bytes, calling_ae: str,
                     expected: tuple[str, str] | None = None,
                     may_overwrite: bool = True, may_reject: bool = True,
                     requestor: Participant | None = None) -> StoreResult:
        """:meth:`store_bytes` once the intake has room for ``data``."""
        self._check_size(len(data))
        direct = not self.journaled(len(data))
        # An object for the direct path, or for a file of the intake, is staged first:
        # the store makes its bytes durable while they are analysed, and what is left
        # once the key is known is a rename (:class:`~pacs.core.storage.Staging`).
        target = (self.store.backend if direct
                  else self.store.files if self.filed(len(data)) else None)
        with staged(target, data) if target is not None else nullcontext() as staging:
            # Through the intake, the metadata is the mover's work (module docstring).
            analysis = analyse(data, expected, self.max_object_bytes, describe=direct,
                               checksum=self.digest(data))
            # A C-STORE's file meta is made from its command (``expected``), which the
            # data set was checked against: only a file as sent has its own to check.
            if expected is None and (mismatch := _meta_mismatch(data, analysis)) is not None:
                raise mismatch
            if (ambiguity := _ambiguity(analysis)) is not None:
                raise ambiguity
            if (refused := _rejection_refusal(analysis, may_reject)) is not None:
                self._refused_rejection(analysis, calling_ae, requestor)
                raise refused  # before any lock; what was staged is removed
            with self.uid_lock(analysis.sop_instance_uid), self._counted_refusal():
                outcome = self._store_locked(analysis, data, calling_ae, requestor,
                                             may_overwrite,
                                             staging)
        self._apply_rejection(analysis, outcome, calling_ae, requestor)
        result = _result(outcome, analysis)
        if outcome is Outcome.KEPT_FIRST:
            result = _kept_at(result, self.index.connection())
        return result

    @contextmanager
    def _counted_refusal(self) -> Iterator[None]:
        """Count a refusal of the intake's exact bound, raised by the commit
        (:func:`_indexing`), as :meth:`check_room` counts its own."""
        try:
            yield
        except IntakeFull:
            self.refusals.refused()
            raise

    def digest(self, data: bytes) -> Callable[[], str] | None:
        """The SHA-256 of a large object, started in a thread (``hashlib`` releases the
        GIL, :mod:`pacs.core.offload`) while the caller reads its header; ``None`` for
        an object small enough to hash in passing."""
        if len(data) < DIGEST_OFFLOAD_BYTES:
            return None
        return self._digests.start(sha256, data).result

    def close(self) -> None:
        """Stop the threads that hash large objects."""
        self._digests.close()

    def _check_size(self, size: int) -> None:
        """Refuse an object over ``max_object_bytes`` before it is read or written."""
        if self.max_object_bytes is not None and size > self.max_object_bytes:
            raise ObjectTooLarge(f"the object is larger than {self.max_object_bytes} bytes")

    def _apply_rejection(self, analysis: Analysis, outcome: Outcome, calling_ae: str,
                         requestor: Participant | None) -> None:
        """The hook of a rejection note stored now or before (not one discarded by
        the duplicate policy): what it rejects is removed after the note is durable,
        by ``requestor`` (by default the calling AE); then the note's pending row, which
        its commit wrote, is dropped (a crash before leaves it to be finished:
        :func:`pacs.core.reconcile.reconcile`)."""
        if (analysis.rejection is not None and self.on_rejection is not None
                and outcome is not Outcome.KEPT_FIRST):
            self.on_rejection(analysis, sender(calling_ae, requestor))
            with self.index.write() as conn:
                writer.rejection_done(conn, analysis.sop_instance_uid)

    def _refused_rejection(self, analysis: Analysis, calling_ae: str,
                           requestor: Participant | None) -> None:
        """Tell :attr:`on_refused_rejection` of a note refused to ``requestor`` (by
        default the calling AE); whatever happens to it, the refusal stands."""
        if self.on_refused_rejection is None:
            return
        try:
            self.on_refused_rejection(analysis, sender(calling_ae, requestor))
        except Exception:  # the refusal is what the sender must hear
            log.error("the refused rejection note could not be reported", exc_info=True)

    def store_file(self, path: Path, *, calling_ae: str = "",
                   follow_links: bool = True, within: Path | None = None) -> StoreResult:
        """:meth:`store_bytes` of a file (``pacs import``), refused by its size before
        it is read when it is over ``max_object_bytes``.

        Only a regular file is read: a FIFO would block its reader until some writer
        came, and a device (``/dev/zero``) never ends; neither is opened in a way that
        waits, and never read.  At most ``max_object_bytes`` + 1 bytes are read, so a
        file that grows past the limit meanwhile is refused as too large rather than
        read on.

        Parameters
        ----------
        path : Path
            The file.
        calling_ae : str
            As for :meth:`store_bytes`.
        follow_links : bool
            False: a symbolic link is refused, its target never read (files found by
            walking a folder, which may hold links to anywhere).
        within : Path, optional
            The folder ``path`` was found in by a walk: ``path`` is opened from it one
            name at a time, none of them followed when it is a link, so that a folder
            on the way swapped for a link after the walk listed it (to another
            customer's objects, say) is refused rather than followed.

        Raises
        ------
        OSError
            The file cannot be read.
        InvalidInstance
            Not a regular file, or a link while ``follow_links`` is false; and as
            :meth:`store_bytes`.
        IntakeFull, StorageError, IndexFailure
            As :meth:`store_bytes`.
        """
        opened = (_open_regular(path, follow_links) if within is None
                  else _open_below(within, path))
        with opened as file:
            size = os.fstat(file.fileno()).st_size
            self._check_size(size)
            self.check_room(size)  # before the file is read
            data = read_bounded(file, self.max_object_bytes)
        self._check_size(len(data))  # grown past the limit while it was read
        if len(data) != size:  # written meanwhile: its room is that of what was read
            self.check_room(len(data))
        return self._store_bytes(data, calling_ae)

    def store_batch(self, items: Sequence[Received], *, calling_ae: str = "",
                    may_overwrite: bool = True, may_reject: bool = True,
                    requestor: Participant | None = None,
                    ) -> list[StoreResult | BaseException]:
        """Store several Part 10 objects with one durability point (STOW-RS parts).

        Each object gets what :meth:`store_bytes` would give it - its result, or the
        exception it would raise - but the objects are indexed (and put in the intake)
        in one transaction (:meth:`Index.commit_all`), those too large for the intake
        fsynced together before it (:func:`pacs.core.storage.put_many`), and none is
        reported stored before all of that is durable.  A SOP Instance UID repeated
        within the batch is stored after it, one at a time, so that it meets the first
        as a duplicate.

        The objects come analysed (:meth:`Received.of`), so that a caller can analyse
        the next ones while a batch is written: analysis is most of an object's CPU,
        and writing is mostly waiting for the disk.  An object over
        ``max_object_bytes`` is refused (:class:`ObjectTooLarge`) whatever its
        analysis says; the caller's analysis must have been given the same limit for
        the inflated size of deflated data sets.  ``may_overwrite``, ``may_reject`` and
        ``requestor`` as for :meth:`store_bytes`.

        A rejection note ends its batch: the parts after it are stored once it has been
        applied, as they would be if sent after it, so that a note removes what came
        before it and an instance sent again after it is judged by its tombstone (kept
        after a 113039 note, refused after a 113001), never stored and then removed.
        """
        cut = next((number for number, item in enumerate(items[:-1])
                    if isinstance(item.analysis, Analysis)
                    and item.analysis.rejection is not None), None)
        if cut is not None:
            head, tail = items[:cut + 1], items[cut + 1:]
            return [*self.store_batch(head, calling_ae=calling_ae,
                                      may_overwrite=may_overwrite, may_reject=may_reject,
                                      requestor=requestor),
                    *self.store_batch(tail, calling_ae=calling_ae,
                                      may_overwrite=may_overwrite, may_reject=may_reject,
                                      requestor=requestor)]
        results: list[StoreResult | BaseException | None] = [None] * len(items)
        analysed: dict[int, Analysis] = {}
        seen: set[str] = set()
        later: list[int] = []
        limit = self.max_object_bytes
        room = self._room()
        full = intake_full()
        for number, item in enumerate(items):
            analysis = item.analysis
            if limit is not None and len(item.data) > limit:
                results[number] = ObjectTooLarge(f"the object is larger than {limit} bytes")
            elif room is not None and self.journaled(len(item.data)) and not fits(
                    len(item.data), room, self.intake_max_bytes or 0):
                results[number] = full
            elif not isinstance(analysis, Analysis):
                results[number] = analysis
            elif (mismatch := _meta_mismatch(item.data, analysis)) is not None:
                results[number] = mismatch
            elif (ambiguity := _ambiguity(analysis)) is not None:
                results[number] = ambiguity
            elif (refused := _rejection_refusal(analysis, may_reject)) is not None:
                self._refused_rejection(analysis, calling_ae, requestor)
                results[number] = refused
            elif analysis.sop_instance_uid in seen:
                later.append(number)
            else:
                seen.add(analysis.sop_instance_uid)
                analysed[number] = analysis
                if room is not None and self.journaled(len(item.data)):
                    room -= len(item.data)  # its room taken for the parts after it
        no_room = sum(1 for result in results if result is full)
        if no_room:  # one refusal per part refused
            self.refusals.refused(no_room)
        elif room is not None:
            self.refusals.settled()
        data = [item.data for item in items]
        with self.uid_locks(list(seen)):
            self._store_analysed(data, analysed, calling_ae, requestor, may_overwrite,
                                 results)
        # The repeats before the batch's note (which ends it): sent before it, stored
        # before it is applied, so that it removes them as it would one by one.
        for number in later:
            try:
                results[number] = self.store_bytes(
                    data[number], calling_ae=calling_ae, may_overwrite=may_overwrite,
                    may_reject=may_reject, requestor=requestor)
            except Exception as exc:  # noqa: BLE001 - reported as this object's failure
                results[number] = exc
        for number, analysis in analysed.items():
            result = results[number]
            if isinstance(result, StoreResult):
                try:
                    self._apply_rejection(analysis, result.outcome, calling_ae, requestor)
                except Exception as exc:  # noqa: BLE001 - reported as this note's failure
                    results[number] = exc
        return [result if result is not None else IndexFailure("not stored")
                for result in results]

    def _store_analysed(self, items: Sequence[bytes], analysed: dict[int, Analysis],
                        calling_ae: str, requestor: Participant | None,
                        may_overwrite: bool,
                        results: list[StoreResult | BaseException | None]) -> None:
        """The batch under its locks: decide, write all, index all, undo what failed."""
        plans: dict[int, _Plan] = {}
        for number, analysis in analysed.items():
            try:
                outcome, plan = self._decide(analysis, items[number], may_overwrite)
            except PacsError as exc:
                results[number] = exc
                continue
            if plan is None:
                result = _result(outcome, analysis)
                results[number] = (_kept_at(result, self.index.connection())
                                   if outcome is Outcome.KEPT_FIRST else result)
            else:
                plans[number] = plan
        direct = [n for n in plans if not plans[n].journal]
        failures = put_many(self.store.backend, [(plans[n].key, items[n]) for n in direct])
        filed = [n for n in plans if plans[n].in_file]
        if filed:
            failures += put_many(self.store.files,
                                 [(plans[n].file, items[n]) for n in filed])
        written = [n for n in plans if plans[n].journal and not plans[n].in_file]
        for number, failure in zip(direct + filed, failures, strict=True):
            if failure is not None and number in direct:
                # It may have replaced the previous object: undone.
                self._undo_put(plans[number].key, plans[number].existing,
                               plans[number].previous, failure)
            if failure is not None:
                results[number] = failure
            else:
                written.append(number)
        errors = self.index.commit_all([
            self._index_work(analysed[n], plans[n], items[n], calling_ae, requestor)
            for n in written])
        for number, error in zip(written, errors, strict=True):
            plan = plans[number]
            if error is not None:
                # Unless the commit went through before the failure (as in
                # _store_locked): the row names this object now.
                if number in direct and not self._indexed_as(analysed[number], plan.key):
                    self._undo_put(plan.key, plan.existing, plan.previous)
                if plan.in_file:  # unless a row names it after all
                    self.store.tidy({plan.sop_uid})
                results[number] = error
            else:
                self._forget_moved(plan)
                results[number] = _result(plan.outcome, analysed[number])
        # The intake's refusals of the decisions and the commit (those of the check
        # before them are counted by store_batch).
        if full := sum(1 for n in analysed if isinstance(results[n], IntakeFull)):
            self.refusals.refused(full)

    def _store_locked(self, analysis: Analysis, data: bytes, calling_ae: str,
                      requestor: Participant | None, may_overwrite: bool,
                      staging: Staged | None) -> Outcome:
        """Decide, then commit (through the intake), or place the staged object at its
        key and commit (the direct path)."""
        if (self.journaled(len(data)) and not self.filed(len(data))
                and self._store_unseen(analysis, data, calling_ae, requestor)):
            return Outcome.STORED
        outcome, plan = self._decide(analysis, data, may_overwrite)
        if plan is None:
            return outcome
        work = self._index_work(analysis, plan, data, calling_ae, requestor)
        if plan.in_file:
            self._commit_filed(plan, data, work, staging)
        elif staging is None or plan.journal:
            self.index.commit(work)  # nothing was written before: nothing to undo
        else:
            try:
                # A place that fails may have renamed the object over the previous one
                # already (its folder's fsync failed after): undone like a failed commit.
                staging.place(plan.key)
                self.index.commit(work)
            except BaseException as exc:
                # Unless the commit went through before the failure (an interrupt, a
                # Ctrl-C of pacs import, after SQLite's COMMIT): the row names this
                # object now, and an undo would leave it naming none.
                if not self._indexed_as(analysis, plan.key):
                    self._undo_put(plan.key, plan.existing, plan.previous, exc)
                raise
        self._forget_moved(plan)
        return plan.outcome

    def _store_unseen(self, analysis: Analysis, data: bytes, calling_ae: str,
                      requestor: Participant | None) -> bool:
        """Store an object for the intake's blobs in one transaction, the lookup that
        finds its UID unseen (no row, no tombstone) inside it; False, nothing
        written, when the UID was seen: :meth:`_decide` then decides in full.

        The common case of ingest - a new instance - at the cost of one transaction
        instead of a read, then a write: every transaction a DIMSE worker begins after
        another process' commit reads the index's pages again (SQLite drops its cache
        when the WAL changed).  Under the UID's ingest lock no other writer can index
        it between the lookup and the commit, so the plan is the one :meth:`_decide`
        makes for an unseen UID whose object goes through the intake.
        """
        key = object_key(analysis.study_uid, analysis.series_uid, analysis.sop_instance_uid)
        work = self._index_work(analysis, _Plan(key, None, None), data, calling_ae,
                                requestor)
        uid = analysis.sop_instance_uid

        def index_unseen(conn: apsw.Connection) -> None:
            if reads.lookup_with_tombstone(conn, uid) != (None, None):
                raise _Seen  # rolled back: nothing of this piece is written
            work(conn)

        try:
            self.index.commit(index_unseen)
        except _Seen:
            return False
        return True

    def _commit_filed(self, plan: _Plan, data: bytes, work: Callable[[apsw.Connection], None],
                      staging: Staged | None) -> None:
        """The intake file of ``plan`` placed (written, when nothing was staged), then
        ``work`` committed; the file removed when either fails.  Its name is its own:
        no acknowledged object is overwritten (:mod:`pacs.core.intake`)."""
        try:
            if staging is not None:
                staging.place(plan.file)
            elif (failure := put_many(self.store.files, [(plan.file, data)])[0]) is not None:
                raise failure
            self.index.commit(work)
        except BaseException:
            # Unless a row names it after all (a commit that went through, then failed
            # to say so).
            self.store.tidy({plan.sop_uid})
            raise

    def _decide(self, analysis: Analysis, data: bytes,
                may_overwrite: bool = True) -> tuple[Outcome, _Plan | None]:
        """What a repeated UID means (step 2): an outcome, or a plan to store.

        Raises
        ------
        DuplicateRejected
            A different object under a stored UID, with the ``reject`` policy, or with
            ``overwrite`` from a sender that may not overwrite.
        """
        conn = self.index.connection()
        existing, found = reads.lookup_with_tombstone(conn, analysis.sop_instance_uid)
        previous: bytes | None = None
        revived = False
        if existing is None:
            revived = self._removed_before(found, analysis)
        else:
            if existing.checksum == analysis.checksum:
                return Outcome.UNCHANGED, None
            previous = self._read_quietly(existing.object_key)
            # The same bytes in another transfer syntax are another data set (PS3.10
            # 7.1: the syntax says how they are read).
            if (previous is not None and existing.transfer_syntax == analysis.transfer_syntax
                    and _same_dataset(previous, data, analysis.dataset_offset)):
                return Outcome.UNCHANGED, None
            elsewhere = existing.object_key != object_key(
                analysis.study_uid, analysis.series_uid, analysis.sop_instance_uid)
            # The UID stored elsewhere, now sent where a rejection note removed it.
            if elsewhere and found is not None and _refuses_here(found, analysis):
                raise rejected_by(found)
            if self.duplicate_policy == "keep":
                return Outcome.KEPT_FIRST, None
            if self.duplicate_policy == "reject":
                raise DuplicateRejected(
                    "a different object is stored under this SOP Instance UID")
            if not may_overwrite:
                raise DuplicateRejected(
                    "a different object is stored; the sender may not overwrite")
        key = object_key(analysis.study_uid, analysis.series_uid, analysis.sop_instance_uid)
        in_place = existing is not None and existing.object_key == key
        journal = self._journal(conn, key, len(data), in_place)
        filed = journal and self.filed(len(data))
        plan = _Plan(key, existing, previous, revived, journal,
                     file_name(key, analysis.checksum) if filed else "")
        return plan.outcome, plan

    def _journal(self, conn: apsw.Connection, key: str, size: int,
                 in_place: bool = False) -> bool:
        """True when the object of ``key`` goes through the intake: it is small
        enough; or it replaces the acknowledged object at the same key (``in_place``):
        written there directly, it would destroy the acknowledged bytes before the
        commit that makes it acknowledged, and a crash or a failed commit between the
        two would lose both versions' guarantee; through the intake, the commit
        replaces the one with the other at once, and the mover writes it over the old
        object afterwards; or its key is unsettled - a write of the store that went
        unanswered may still land at the key, so an object written there directly now
        could be overwritten by it; through the intake it is written only once that
        can no longer happen (:mod:`pacs.core.intake`).  An object over the intake's
        largest blob (``SQLITE_MAX_BLOB``) takes the direct path whatever it replaces.

        Raises
        ------
        IntakeFull
            The intake is full, for an object of an unsettled key or one replacing
            another in place.
        """
        if self.journaled(size):
            return True
        if size >= DIRECT_OVERWRITE_BYTES or not (in_place or reads.unsettled(conn, key)):
            return False
        if self.intake_max_bytes is not None:
            check_room(self.index, self.intake_max_bytes, size)
        return True

    @staticmethod
    def _removed_before(found: reads.Tombstone | None, analysis: Analysis) -> bool:
        """True when the UID was removed before (``found``: its tombstone) and may be
        stored again; its tombstone goes with the commit of the new row.  An object
        under a UID a rejection note refuses, but at another study or series than the
        note placed it, is not the rejected instance (a note's error never reaches
        another patient's images, whichever arrives first): stored, the tombstone
        kept.

        Raises
        ------
        RejectedInstance
            A rejection note removed it, at its study and series, for a reason that
            refuses it for good (:func:`pacs.core.rejection.refuses_again`).
        """
        if found is None:
            return False
        if not rejection.refuses_again(found.reason_code, found.reason_scheme):
            return True
        if _refuses_here(found, analysis):
            raise rejected_by(found)
        return False

    def _index_work(self, analysis: Analysis, plan: _Plan, data: bytes, calling_ae: str,
                    requestor: Participant | None) -> Callable[[apsw.Connection], None]:
        """The index rows of an object to store, as a piece of (group) commit work
        (:func:`_indexing`): with its bytes in the intake when it is small enough, the
        intake copy of the key it moved from dropped, the end of its tombstone when
        it was removed before, and, for a rejection note, its removals pending."""
        left = (plan.existing.object_key if plan.existing is not None
                and plan.existing.object_key != plan.key else None)
        pending = (sender(calling_ae, requestor) if analysis.rejection is not None
                   else None)
        # A large object's room is asked again in its transaction, exactly: the check
        # before it (check_room) lets every store then in flight through, and an intake
        # file may be 64 MiB.  A blob's is not (a read less on the path of every small
        # instance): its overshoot stays within the stores in flight x BLOB_BYTES.
        exact = (self.intake_max_bytes if plan.journal and len(data) > BLOB_BYTES
                 else None)
        return _indexing(instance_row(analysis, plan.key, len(data), calling_ae=calling_ae),
                         analysis, data if plan.journal else None, left,
                         plan.revived, new=plan.existing is None, pending=pending,
                         in_file=plan.in_file, room_of=exact)

    def _forget_moved(self, plan: _Plan) -> None:
        """After the commit: an object that moved (new study or series UID) leaves its
        old object unlisted (its intake copy went with the commit, its deletion was
        recorded pending in it); remove it, and the intake file of a version the commit
        replaced."""
        if plan.existing is None:
            return
        if plan.existing.object_key != plan.key:
            self._delete_moved_from(plan.existing.object_key)
        self.store.tidy({plan.existing.sop_uid})

    def _indexed_as(self, analysis: Analysis, key: str) -> bool:
        """True when the index names ``key`` with this object's checksum for its SOP
        Instance UID: its commit went through (asked under the UID's ingest lock, after
        a failure; False when the index cannot say, as before any commit)."""
        try:
            found = reads.lookup(self.index.connection(), analysis.sop_instance_uid)
        except PacsError:
            return False
        return (found is not None and found.object_key == key
                and found.checksum == analysis.checksum)

    def _undo_put(self, key: str, existing: reads.StoredInstance | None,
                  previous: bytes | None, failure: BaseException | None = None) -> None:
        """After a failed write or commit, leave the store as the index still
        describes it: the previous object back at its key, or no object at a new key.
        After a write the store did not answer (``failure``), which it may carry out
        later, see :meth:`_unsettle`; after one it refused or never received, nothing is
        to undo (an undo then would fail as the write did, with the store down)."""
        if isinstance(failure, WriteNotMade):
            return
        if isinstance(failure, UnsettledWrite) and self._keep_in_intake(key, existing,
                                                                        previous):
            return
        backend = self.store.backend  # the intake is as the failed commit left it
        try:
            if existing is not None and existing.object_key == key and previous is not None:
                backend.put(key, io.BytesIO(previous), len(previous))
            elif existing is None or existing.object_key != key:
                backend.delete(key)
        except PacsError:
            log.exception("could not undo an object write after a failed write or index "
                          "commit; run 'pacs fsck'")

    def _keep_in_intake(self, key: str, existing: reads.StoredInstance | None,
                        previous: bytes | None) -> bool:
        """After a write of ``key`` the store did not answer (it recorded the key
        unsettled, :mod:`pacs.core.intake`): when the write replaced an object the
        index still names, that object back in the intake (read first, moved to the
        store again once the key has settled) rather than written back now, where the
        late write could land over it.  False when the object must still be put back
        or the key emptied (:meth:`_undo_put`)."""
        if (existing is None or existing.object_key != key or previous is None
                or len(previous) >= SQLITE_MAX_BLOB):
            return False
        try:
            with self.index.write() as conn:
                writer.intake_add(conn, key, previous, existing.checksum, time.time())
        except PacsError:
            log.exception("could not keep a replaced object in the intake")
            return False
        return True

    def _read_quietly(self, key: str) -> bytes | None:
        try:
            with self.store.open(key) as stream:
                return stream.read()
        except (NotFound, PacsError):
            return None

    def _delete_moved_from(self, key: str) -> None:
        """Delete the object an instance moved from, and forget its pending deletion;
        a failure leaves it recorded, for the intake's mover
        (:meth:`pacs.core.intake.Mover.delete_removed`, which deletes only a key that
        no row names by then)."""
        try:
            self.store.backend.delete(key)
            with self.index.write() as conn:
                writer.deletions_done(conn, [key])
        except PacsError as exc:
            log.warning("could not delete the object a moved instance left (%s); the "
                        "intake's mover will", exc)

    def uid_lock(self, sop_uid: str) -> AbstractContextManager[None]:
        """The lock under which ingest decides and writes an instance of this SOP
        Instance UID: exclusive, shared by every process of the node, threads included
        (:mod:`pacs.core.uidlocks`), waited for at most :attr:`lock_wait`.  Repair
        (:mod:`pacs.core.reconcile`) decides under it too."""
        return self.uid_locks([sop_uid])

    def index_stored(self, analysis: Analysis, key: str, size: int,
                     calling_ae: str = "") -> None:
        """Index an object that is already stored at ``key``, as it is (step 4 alone).

        For repair, which finds objects written but never indexed; the caller holds
        :meth:`uid_lock`.  A rejection note's removals are recorded as pending with it,
        as a store records them, for the caller to apply
        (:func:`pacs.core.reconcile.reconcile`).

        Raises
        ------
        IndexFailure
            When the commit failed (nothing of the row is kept).
        """
        pending = sender(calling_ae, None) if analysis.rejection is not None else None
        self.index.commit(_indexing(instance_row(analysis, key, size, calling_ae=calling_ae),
                                    analysis, None, None, pending=pending))

    def uid_locks(self, sop_uids: Sequence[str], *, bounded: bool = True
                  ) -> AbstractContextManager[None]:
        """The locks of several UIDs (:meth:`uid_lock`, :mod:`pacs.core.uidlocks`); a
        deletion takes them too, and the intake's mover holds those of a batch while
        it moves it.

        ``bounded``: wait at most :attr:`lock_wait`, then raise
        :class:`~pacs.core.errors.InstanceLocked` - for whoever answers a peer (a
        store, a removal), which must fail before the peer's timeout rather than wait
        behind a holder stuck on a stalled object store.  The mover, which answers
        nobody, waits unbounded.
        """
        return uidlocks.held(self.lock_dir / LOCK_FILE, sop_uids,
                             self.lock_wait if bounded else None)


class _Seen(Exception):
    """The UID has a row or a tombstone: :meth:`Ingest._store_unseen` gives way."""


@dataclass(frozen=True)
class _Plan:
    """An object to write: its key, and what it replaces (for undo and clean-up)."""

    key: str
    existing: reads.StoredInstance | None
    previous: bytes | None
    revived: bool = False  # the UID has a tombstone, dropped with the commit
    journal: bool = True  # acknowledged through the intake, not written directly
    file: str = ""  # the name of its intake file, if it is kept as one

    @property
    def in_file(self) -> bool:
        """Acknowledged through the intake as a file of its folder."""
        return bool(self.file)

    @property
    def sop_uid(self) -> str:
        """The SOP Instance UID its key names."""
        return self.key.rsplit("/", 1)[-1].removesuffix(".dcm")

    @property
    def outcome(self) -> Outcome:
        """What writing it does: a plan with an indexed instance replaces a
        different object (the same one is unchanged, and needs no plan)."""
        return Outcome.STORED if self.existing is None else Outcome.REPLACED


def _meta_mismatch(data: bytes, analysis: Analysis) -> UIDMismatch | None:
    """Why an object sent as a Part 10 file (STOW-RS, an import, an upload) is not one
    instance: its file meta names another SOP Class or Instance UID than its data set
    (PS3.10 7.1), and would be served naming it; ``None`` when they agree (or the meta
    names none).  Checked when an object is received, not when a stored one is read
    again (repair and rebuild keep what was acknowledged)."""
    named = (meta_value(data, analysis.dataset_offset, 0x00020002),
             meta_value(data, analysis.dataset_offset, 0x00020003))
    mine = (analysis.sop_class_uid, analysis.sop_instance_uid)
    if any(found and found != own for found, own in zip(named, mine, strict=True)):
        return UIDMismatch("the file meta names another SOP Class or Instance UID than "
                           "the data set (PS3.10 7.1)")
    return None


def _indexing(row: writer.InstanceRow, analysis: Analysis, intake: bytes | None,
              left: str | None, revived: bool = False, *, new: bool = False,
              pending: Participant | None = None, in_file: bool = False,
              room_of: int | None = None) -> Callable[[apsw.Connection], None]:
    """The writes of one instance's commit: its index rows and metadata; its bytes in
    the intake (``intake``; only its row when ``in_file``: the bytes are a file of the
    intake's folder), or else any older intake copy of its key dropped (the
    store holds the object the row names); the intake copy of the key it moved from
    (``left``) dropped; its tombstone dropped when it was removed before
    (``revived``).  ``new``: the instance has no row (decided under its ingest lock,
    which the commit is made under), so no former parents or metadata to drop.
    ``pending``: a rejection note's sender; its removals are recorded as pending with
    the note, until :meth:`Ingest._apply_rejection` has done them.  ``room_of``: the
    intake's bound (``PACS_INTAKE_MAX_BYTES``), which ``intake`` must fit in, asked
    in the transaction (:class:`IntakeFull`, nothing of the piece kept)."""

    def index_it(conn: apsw.Connection) -> None:
        if intake is not None and room_of is not None:
            require_room(conn, room_of, len(intake))
        writer.upsert(conn, row, new=new)
        if analysis.metadata is not None or not new:
            metadata.save(conn, analysis.sop_instance_uid, analysis.metadata)
        if intake is not None and in_file:
            writer.intake_add_file(conn, row.object_key, len(intake), analysis.checksum,
                                   time.time())
        elif intake is not None:
            writer.intake_add(conn, row.object_key, intake, analysis.checksum, time.time())
        else:
            writer.intake_drop(conn, row.object_key)
        if left is not None:
            # Its object is deleted after the commit; recorded here, a deletion that
            # fails, or a crash first, leaves it to the intake's mover.
            writer.intake_drop(conn, left)
            writer.deletions_pending(conn, [left], time.time())
        if revived:
            writer.drop_tombstone(conn, analysis.sop_instance_uid)
        if pending is not None:
            writer.rejection_pending(conn, analysis.sop_instance_uid, pending.user_id,
                                     pending.address, time.time())

    return index_it


#: Opening a file to store: never waiting (a FIFO without a writer opens at once).
_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def sender(calling_ae: str, requestor: Participant | None) -> Participant:
    """Who sent an object: the ``requestor`` (a DICOMweb user), by default the calling
    AE title."""
    return requestor or Participant(calling_ae.strip() or "(none)", True)


def _ambiguity(analysis: Analysis) -> UnreadableData | None:
    """The refusal of an object that readers would not read as ingest does: its top
    level ambiguous - a tag repeated, or an element of the header after the pixel data
    (PS3.5 7.1: ascending, each once; the index reads the header, which stops at the
    pixel data, readers of the object would take the later element: another Study or
    SOP Instance UID, another Patient ID) - or its Pixel Data encoded otherwise than
    its transfer syntax says, or native and shorter than its frames
    (:attr:`pacs.core.dataset.Instance.pixel_mismatch`).
    Objects already stored are read as they are (``pacs reindex``, ``pacs fsck``)."""
    if analysis.pixel_mismatch is not None:
        return UnreadableData(analysis.pixel_mismatch)
    if analysis.unambiguous:
        return None
    return UnreadableData("a top-level element repeated, or placed after the pixel data "
                          "(PS3.5 7.1: ascending tags, each once)")


def _rejection_refusal(analysis: Analysis, may_reject: bool) -> NotAuthorized | None:
    """The refusal of an IOCM rejection note from a sender that may not remove data
    (``None``: anything else, or a sender that may)."""
    if analysis.rejection is None or may_reject:
        return None
    return NotAuthorized("a rejection note removes data, which this sender may not do")


def _open_regular(path: Path, follow_links: bool, folder: int | None = None
                  ) -> io.BufferedReader:
    """``path`` (relative to the open ``folder`` when given) opened for reading when it
    is a regular file (see :meth:`Ingest.store_file`).

    Raises
    ------
    InvalidInstance
        A FIFO, socket, device or folder; a link when not ``follow_links``.
    OSError
        It cannot be opened.
    """
    flags = _OPEN_FILE if follow_links else _OPEN_FILE | os.O_NOFOLLOW
    # Looked at before it is opened: opening some devices has effects (a tape rewinds).
    mode = os.stat(path, dir_fd=folder, follow_symlinks=follow_links).st_mode
    if stat.S_ISLNK(mode):
        raise InvalidInstance("a link, not followed")
    if not stat.S_ISREG(mode):
        raise InvalidInstance("not a regular file (a FIFO, socket, device or folder); not read")
    try:
        fd = os.open(path, flags, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or a socket
            raise InvalidInstance("a link or not a regular file; not read") from None
        raise
    file = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after it was looked at
        file.close()
        raise InvalidInstance("not a regular file (a FIFO, socket, device or folder); not read")
    return file


def _open_below(folder: Path, path: Path) -> io.BufferedReader:
    """``path``, a regular file below ``folder``, opened from ``folder`` one name at a
    time, no link followed (the folder itself is, as the operator named it).

    Raises
    ------
    InvalidInstance
        A link on the way or at the end; a FIFO, socket, device or folder.
    OSError
        It cannot be opened.
    """
    *folders, name = path.relative_to(folder).parts
    try:
        with folder_below(folder, folders, follow_root=True) as fd:
            return _open_regular(Path(name), follow_links=False, folder=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a folder swapped after the walk
            raise InvalidInstance("a folder on its path is a link; not followed") from None
        raise


def _result(outcome: Outcome, analysis: Analysis) -> StoreResult:
    patient = analysis.values[Level.PATIENT]
    return StoreResult(outcome, analysis.sop_class_uid, analysis.sop_instance_uid,
                       analysis.study_uid, analysis.series_uid,
                       audit.Patient(patient.get("patient_id") or "",
                                     patient.get("issuer_of_patient_id") or ""))


def _kept_at(result: StoreResult, conn: apsw.Connection) -> StoreResult:
    """``result`` of an object the duplicate policy discarded (``keep``), at the study
    and series of the object it kept, which may be elsewhere: where the instance is
    (a STOW-RS answer's Retrieve URL names it)."""
    kept = reads.located(conn, [result.sop_instance_uid])
    if not kept:
        return result
    return replace(result, study_uid=kept[0].study_uid, series_uid=kept[0].series_uid)


#: ``received_at`` of the index: UTC, microseconds.
RECEIVED_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def instance_row(analysis: Analysis, key: str, size: int, *, calling_ae: str = "",
                 received_at: str | None = None) -> writer.InstanceRow:
    """The index row of a stored object: its analysis, where and how large it is, who
    sent it and when (``None``: now; ``pacs reindex`` gives the store's time)."""
    return writer.InstanceRow(
        patient_key=patient_key(analysis.values[Level.PATIENT]),
        values=analysis.values,
        object_key=key,
        size=size,
        checksum=analysis.checksum,
        transfer_syntax=analysis.transfer_syntax,
        received_at=(datetime.now(UTC).strftime(RECEIVED_FORMAT) if received_at is None
                     else received_at),
        calling_ae=calling_ae.strip(),
    )


def patient_key(values: dict[str, str | None]) -> str:
    """The identity of a patient: Patient ID with its issuer.

    Objects without a Patient ID are grouped by name and birth date instead, so that
    unrelated anonymous patients are not merged into one.
    """
    patient_id = values.get("patient_id") or ""
    issuer = values.get("issuer_of_patient_id") or ""
    if patient_id:
        return f"{patient_id}\x1f{issuer}"
    return "\x1f".join(("", issuer, values.get("patient_name") or "",
                        values.get("patient_birth_date") or ""))


def _same_dataset(stored: bytes, received: bytes, received_offset: int) -> bool:
    """True when two objects carry the same data set (their file meta may differ)."""
    return stored[dataset_offset(stored):] == received[received_offset:]
