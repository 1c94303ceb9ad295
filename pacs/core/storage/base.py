"""The object store's interface, its optional capabilities and the key layout (see
:mod:`pacs.core.storage`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, cast, runtime_checkable

from pacs.core.dataset import valid_uid
from pacs.core.errors import NotFound, ObjectTooLarge, StorageError

#: A forward-only stream that must seek is copied to memory up to this size, to disk
#: beyond (:func:`open_ranged`'s fallback).
SPOOL_BYTES = 32 << 20

#: Names of quarantine folders (one per repair run).
_QUARANTINE_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def object_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The object key of an instance; every part must be a valid UID (PS3.5 9.1)."""
    for uid in (study_uid, series_uid, sop_uid):
        if not valid_uid(uid):
            raise ValueError("object keys are built from valid UIDs only")
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def is_object_key(key: str) -> bool:
    """True for keys of the form :func:`object_key` builds: three valid UIDs, so no
    part is ``..`` or ``.`` and no key names a path outside the store."""
    parts = key.split("/")
    return (len(parts) == 3 and parts[2].endswith(".dcm")
            and all(valid_uid(part) for part in (*parts[:2], parts[2][:-4])))


def quarantine_folder(folder: str) -> str:
    """``folder`` when it is a safe name for a quarantine folder, else StorageError."""
    if not _QUARANTINE_FOLDER_RE.match(folder):
        raise StorageError("refusing a quarantine folder name with unsafe characters")
    return folder


class ObjectStore(Protocol):
    """What every object store does, and all the core may assume.

    Faster or backend-specific operations are optional capabilities (below), asked
    for explicitly (``isinstance(store, LocalFiles)``), each with a plain fallback
    here (:func:`put_many`, :func:`local_path`, :func:`usage`, :func:`open_ranged`).
    """

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Store ``length`` bytes read from ``source`` under ``key``, durably.

        A :class:`~pacs.core.errors.StorageError` means the new bytes are not durable;
        they may already be what ``key`` holds (a folder's fsync failing after the
        rename, an S3 PUT completing after its timeout), so a caller that replaced an
        object puts the previous one back.
        """

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object's bytes; the caller closes it.

        A missing key raises :class:`~pacs.core.errors.NotFound`.
        """

    def size(self, key: str) -> int:
        """The object's size in bytes, from the store's metadata (a stat, a HEAD);
        a missing key raises :class:`~pacs.core.errors.NotFound`."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    def keys(self) -> Iterator[str]:
        """Every object key of this customer's area."""

    def check(self, create: bool = True) -> None:
        """Raise :class:`pacs.core.errors.ConfigError` when the store cannot be used.

        ``create``: make the store's folder or bucket when it is missing (a node
        starting on a new data folder); otherwise a missing one is an error, for a
        check that must change nothing (``pacs fsck``: a folder not mounted or a
        mistyped bucket is reported, not replaced by an empty one).
        """

    def close(self) -> None:
        """Release connections."""


# --- optional capabilities ---------------------------------------------------------------

@runtime_checkable
class LocalFiles(Protocol):
    """Objects are files on this machine: a sender may hand the kernel the file itself
    (``sendfile``, ``mmap``) instead of copying the bytes through a stream."""

    def local_file(self, key: str) -> Path | None:
        """The object's file; it may be missing when the object is gone.  ``None``
        when this object is not a local file (yet): read it with ``open``."""


@runtime_checkable
class RandomAccess(Protocol):
    """Parts of an object are read without the rest: a caller that seeks (to a frame,
    a header, a bulk data value) fetches about what it reads, where :meth:`ObjectStore.open`
    of a remote object streams all of it."""

    def open_ranged(self, key: str) -> BinaryIO:
        """A seekable stream of the object's bytes; the caller closes it.

        Reads outside a bounded buffer fetch their range from the store.  A missing
        key raises :class:`~pacs.core.errors.NotFound` here or at the first read.
        """


@runtime_checkable
class ModifiedTimes(Protocol):
    """The store tells when each object was last written, for all of them at once (an
    S3 listing carries each object's ``LastModified``)."""

    def modified_times(self) -> Iterator[tuple[str, float]]:
        """``(key, POSIX time of its last write)`` for every object key."""


@runtime_checkable
class LateWrites(Protocol):
    """A write the store did not answer may still be carried out later
    (:class:`~pacs.core.errors.UnsettledWrite`, S3): the store calls
    ``on_unanswered(key)`` before it raises one, so that whoever owns the index records
    the key as unsettled (:func:`pacs.core.intake.record_unsettled`, wired by
    :func:`pacs.core.services.build`), whichever caller wrote."""

    on_unanswered: Callable[[str], None] | None


@runtime_checkable
class BatchPut(Protocol):
    """Several puts share one durability point (a folder store fsyncs them together)."""

    def put_many(self, items: Sequence[tuple[str, bytes]],
                 modified: Sequence[float] | None = None) -> list[StorageError | None]:
        """Store several objects, each as :meth:`ObjectStore.put` would, all durable on
        return; a failure concerns its own item only.  Each item's failure or ``None``.

        ``modified``: each item's modification time (POSIX seconds) instead of the
        time of the write: when it was acknowledged, for an object written after
        others acknowledged later (the intake's mover), so that the store's times keep
        the order of acknowledgement (:mod:`pacs.core.reindex` rebuilds in it)."""


class Staged(Protocol):
    """An object's bytes on their way to durability before their key is known
    (:class:`Staging`)."""

    def place(self, key: str) -> None:
        """Make the staged bytes the object at ``key``, durably, as :meth:`ObjectStore.put`
        would (once; waits for the staging to finish).

        Raises
        ------
        StorageError
            The staging or the placing failed: the object at ``key`` is not durable,
            and may have been replaced (a rename whose folder fsync failed), as with a
            failed :meth:`ObjectStore.put`; the caller restores what it had.
        """

    def discard(self) -> None:
        """Forget bytes never placed (nothing once placed); never raises."""


@runtime_checkable
class Staging(Protocol):
    """A store can write an object's bytes durably while its caller still reads them,
    and give them their key afterwards: ingest hands a large object over as it starts
    analysing it, and what is left once the key is known is a rename and a folder
    fsync."""

    def stage(self, data: bytes) -> Staged:
        """Start writing ``data`` durably; failures surface at :meth:`Staged.place`."""


@runtime_checkable
class Usage(Protocol):
    """The bytes of the customer's area are known cheaper than a size per key (an S3
    listing carries every object's size)."""

    def usage(self) -> int:
        """Bytes stored in this customer's area."""


@runtime_checkable
class Quarantine(Protocol):
    """Objects can be taken out of service without being deleted (``pacs fsck``)."""

    def quarantine(self, key: str, folder: str) -> str:
        """Move the object out of the keys into the quarantine area, under ``folder``.

        The object no longer exists at ``key`` (nor in :meth:`ObjectStore.keys`), its
        bytes are kept under ``quarantine/<folder>/<key>``.  Returns that place (a path
        or an object name) for the report.  A missing key raises
        :class:`~pacs.core.errors.NotFound`.
        """


def put_many(store: ObjectStore, items: Sequence[tuple[str, bytes]],
             modified: Sequence[float] | None = None) -> list[StorageError | None]:
    """:meth:`BatchPut.put_many` when the store has it (with ``modified``), else
    :meth:`ObjectStore.put` of each item (durable one by one, dated by the store)."""
    if isinstance(store, BatchPut):
        return store.put_many(items, modified)
    return put_each(store, items)


def put_each(store: ObjectStore, items: Sequence[tuple[str, bytes]]
             ) -> list[StorageError | None]:
    """Each item put by itself; each item's failure or ``None``."""
    failures: list[StorageError | None] = []
    for key, data in items:
        try:
            store.put(key, io.BytesIO(data), len(data))
        except StorageError as exc:
            failures.append(exc)
        else:
            failures.append(None)
    return failures


class _PutWhenPlaced:
    """The fallback of :class:`Staging`: the bytes are kept and put when placed."""

    def __init__(self, store: ObjectStore, data: bytes) -> None:
        self.store = store
        self.data = data

    def place(self, key: str) -> None:
        self.store.put(key, io.BytesIO(self.data), len(self.data))

    def discard(self) -> None:
        """Nothing was written."""


@contextmanager
def staged(store: ObjectStore, data: bytes) -> Iterator[Staged]:
    """``data`` staged in ``store`` (:class:`Staging`; else put when placed) for the
    block, and discarded at its end unless placed."""
    handle: Staged = store.stage(data) if isinstance(store, Staging) \
        else _PutWhenPlaced(store, data)
    try:
        yield handle
    finally:
        handle.discard()


def local_path(store: ObjectStore, key: str) -> Path | None:
    """The object's file when the store keeps local files (:class:`LocalFiles`), else
    ``None``: read it with :meth:`ObjectStore.open`."""
    return store.local_file(key) if isinstance(store, LocalFiles) else None


def open_ranged(store: ObjectStore, key: str) -> BinaryIO:
    """A seekable stream of the object for a caller that reads parts of it (frames,
    headers, bulk data): :meth:`RandomAccess.open_ranged` when the store has it, else
    :meth:`ObjectStore.open` when that seeks (a file, bytes in memory), else a copy of
    the whole object (in memory up to :data:`SPOOL_BYTES`, on disk beyond).

    Raises
    ------
    NotFound
        When there is no such object (with :class:`RandomAccess`, maybe only at the
        first read).
    StorageError
        When the store fails.
    """
    if isinstance(store, RandomAccess):
        return store.open_ranged(key)
    return open_seekable(store, key)


def open_seekable(store: ObjectStore, key: str) -> BinaryIO:
    """:meth:`ObjectStore.open` when its stream seeks, else a copy of the whole object
    (:func:`spooled_copy`): :func:`open_ranged` of a store without ranged reads."""
    stream = store.open(key)
    return stream if _seeks(stream) else spooled_copy(stream)


def spooled_copy(stream: BinaryIO) -> BinaryIO:
    """A seekable copy of the rest of ``stream`` (in memory up to :data:`SPOOL_BYTES`,
    on disk beyond), at its start; ``stream`` is closed.  The caller closes the copy."""
    with stream:
        copy = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - the caller closes it
        try:
            shutil.copyfileobj(stream, copy, 1 << 20)
        except BaseException:
            copy.close()
            raise
    copy.seek(0)
    return cast(BinaryIO, copy)


def _seeks(stream: BinaryIO) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, ValueError):
        return False


def usage(store: ObjectStore) -> int:
    """Bytes stored in the customer's area: :meth:`Usage.usage`, else the sum of every
    key's size."""
    if isinstance(store, Usage):
        return store.usage()
    every = store.keys()
    return sum(store.size(key) for key in every)


#: Bytes read at a time by :func:`digest`.
DIGEST_CHUNK = 1 << 20


def digest(store: ObjectStore, key: str, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 (hex) and size of a stored object, read through :meth:`ObjectStore.open`
    in chunks (the index records the same digest at ingest).

    With ``limit``, reading stops once more than ``limit`` bytes are read: the size
    given is then past ``limit`` and the digest is of what was read, so an object
    compared with an acknowledged size is never read far past it (a file grown by a
    terabyte is not hashed whole to find it differs).

    Raises
    ------
    NotFound
        When the object is missing.
    StorageError
        When the store fails.
    """
    hashed = hashlib.sha256()
    size = 0
    with store.open(key) as stream:
        while chunk := stream.read(DIGEST_CHUNK):
            hashed.update(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                break
    return hashed.hexdigest(), size


#: A folder on the way to a file, never through a link.
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def folder_below(root: Path, parts: Sequence[str], *, follow_root: bool = False,
                 create: bool = False) -> Iterator[int]:
    """A descriptor of ``root/parts...``, each part opened from the one before with
    ``O_NOFOLLOW``, and the root's last component too unless ``follow_root`` (an
    operator named it): a folder swapped for a link on the way is refused, not
    followed, whenever the swap happened.

    Parameters
    ----------
    create : bool
        Make each missing part.

    Raises
    ------
    OSError
        A part is missing (unless ``create``), or a link (``ELOOP``) or not a folder
        (``ENOTDIR``).
    """
    fd = os.open(root, _FOLDER & ~os.O_NOFOLLOW if follow_root else _FOLDER)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            inner = os.open(part, _FOLDER, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def read_bounded(stream: BinaryIO, limit: int | None) -> bytes:
    """All of ``stream``, but never more than ``limit`` + 1 bytes (``None``: all).

    A Python file's ``read(n)`` allocates ``n`` bytes before it reads: ``read(limit +
    1)`` of a 10-byte file under the default 2 GiB limit asks for 2 GiB, which a host
    without memory overcommit refuses.  So a file's size is asked first and only that
    much (and one byte, to see it grew) is read; what it grew by meanwhile is read
    after, within ``limit``.
    """
    if limit is None:
        return stream.read()
    expected = _file_size(stream)
    if expected is None or expected >= limit:
        return stream.read(limit + 1)
    data = stream.read(expected + 1)
    if len(data) <= expected:
        return data
    return data + stream.read(limit - expected)  # grown while it was read


def _file_size(stream: BinaryIO) -> int | None:
    """The size of the regular file behind ``stream``, ``None`` when it has none."""
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation included
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


#: Bytes of a Part 10 object's preamble and ``DICM`` prefix (PS3.10 7.1).
PART10_HEAD = 132


def read_object(store: ObjectStore, key: str, limit: int | None) -> bytes:
    """The whole object, read through :meth:`ObjectStore.open` up to ``limit`` + 1
    bytes: an object larger than any the node accepts (``PACS_MAX_OBJECT_BYTES``) is
    never held whole by the tools that read every object (``pacs reindex``, ``pacs
    fsck``).  Of something that is no Part 10 object (no ``DICM`` prefix: a file
    copied into the store, a sparse file of gigabytes) only its first
    :data:`PART10_HEAD` bytes are read, which say so to the analysis.

    Raises
    ------
    ObjectTooLarge
        The object is larger than ``limit`` bytes.
    NotFound, StorageError
        As :meth:`ObjectStore.open`.
    """
    with store.open(key) as stream:
        data = stream.read(PART10_HEAD)
        if len(data) == PART10_HEAD and data[128:] == b"DICM":
            rest = None if limit is None else max(0, limit - PART10_HEAD)
            data += read_bounded(stream, rest)
    if limit is not None and len(data) > limit:
        raise ObjectTooLarge(f"larger than PACS_MAX_OBJECT_BYTES ({limit} bytes); not "
                             "read further")
    return data


def exists(store: ObjectStore, key: str) -> bool:
    """True when the object exists (its size is known).

    Raises
    ------
    StorageError
        When the key is refused or the store fails.
    """
    try:
        store.size(key)
    except NotFound:
        return False
    return True
