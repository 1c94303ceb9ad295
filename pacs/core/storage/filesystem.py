"""The default object store: a folder inside the customer's data folder.

Writes go to a temporary file in the target folder, are fsynced, renamed into place
atomically, and the folder is fsynced so that the rename itself survives a crash (a
folder created for it is fsynced in its parent too).  A staged object
(:meth:`FileStore.stage`) is written durably by a thread of the store (one ``O_DSYNC``
write) into a temporary file at the root while ingest analyses it, and renamed into
place once its key is known.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from pacs.core.errors import ConfigError, ForeignObject, NotFound, StorageError, StoreMissing
from pacs.core.logs import shown
from pacs.core.offload import Offload
from pacs.core.storage.base import Staged, is_object_key, quarantine_folder

_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
#: Opening an object: never through a link at its key, never waiting (a FIFO).
_OPEN_OBJECT = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOREIGN = ("not a regular file (a link, FIFO, socket or device the store never wrote); "
            "not read")
#: Threads that fsync the files of one put_many together, and that write staged
#: objects (as many as associations storing large objects at once, beyond which they
#: wait their turn).
_SYNC_THREADS = 4


class FileStore:
    """Objects as files under ``root``, at the path their key names.

    Capabilities (:mod:`pacs.core.storage`): :class:`~pacs.core.storage.LocalFiles`,
    :class:`~pacs.core.storage.BatchPut`, :class:`~pacs.core.storage.Staging` and
    :class:`~pacs.core.storage.Quarantine`.

    Parameters
    ----------
    root : Path
        The folder of this customer's objects.
    quarantine_root : Path, optional
        Where :meth:`quarantine` moves objects; ``quarantine`` beside ``root`` (in the
        customer's data folder) by default.
    """

    def __init__(self, root: Path, quarantine_root: Path | None = None) -> None:
        self.root = root
        self.quarantine_root = quarantine_root or root.parent / "quarantine"
        self._stagers = Offload(_SYNC_THREADS, "store-stage")
        self._folders = DurableFolders(root)
        # The quarantine's own folder is made in the customer's folder when first used.
        self._quarantine_folders = DurableFolders(self.quarantine_root.parent)

    def _path(self, key: str) -> Path:
        # Keys come from validated UIDs; refuse anything else so that no value from
        # the network can ever name a path outside the root.
        if not is_object_key(key):
            raise StorageError("refusing an object key that is not derived from UIDs")
        return self.root / key

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Write atomically and durably; see the module docstring."""
        path = self._path(key)
        tmp_name = None
        try:
            self._folders.make(path.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as out:
                copied = _copy(source, out, length)
                if copied != length:
                    raise StorageError(f"short write: {copied} of {length} bytes")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                _unlink_quietly(tmp_name)

    def put_many(self, items: Sequence[tuple[str, bytes]],
                 modified: Sequence[float] | None = None) -> list[StorageError | None]:
        """Write several objects with one durability point (same guarantees as :meth:`put`).

        Each object is written to its temporary file; then all are fsynced together (a
        few threads: fsync releases the GIL, and the disk merges concurrent flushes),
        renamed into place, and each folder is fsynced once.  Against one fsync of the
        file and one of its folder per object, a STOW-RS of 50 CT instances spent a
        quarter less time and CPU.  An object that fails leaves nothing behind.  With
        ``modified``, each file's modification time is set once it is in place, before
        its folder's fsync, which commits it with the renames (a temporary file dated
        back would look like an interrupted write's to ``pacs fsck``;
        :meth:`pacs.core.storage.BatchPut.put_many`).
        """
        failures: list[StorageError | None] = [None] * len(items)
        staged: dict[int, tuple[Path, str]] = {}
        try:
            for number, (key, data) in enumerate(items):
                try:
                    staged[number] = self._stage(key, data)
                except StorageError as exc:
                    failures[number] = exc

            def flush(number: int) -> None:
                _path, tmp_name = staged[number]
                fd = os.open(tmp_name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            with ThreadPoolExecutor(max_workers=_SYNC_THREADS) as pool:
                results = {number: pool.submit(flush, number) for number in staged}
            folders: set[Path] = set()
            for number, future in results.items():
                path, tmp_name = staged[number]
                try:
                    future.result()
                    os.replace(tmp_name, path)
                    if modified is not None:
                        _date(path, modified[number])
                    folders.add(path.parent)
                except OSError as exc:
                    failures[number] = StorageError(
                        f"cannot write object: {exc.strerror or exc}")
                    continue
                del staged[number]  # renamed: nothing temporary left for it
            for folder in folders:
                try:
                    _fsync_dir(folder)
                except OSError as exc:
                    # The renames into it may not survive a crash: none is durable.
                    for number, (key, _) in enumerate(items):
                        if failures[number] is None and self._path(key).parent == folder:
                            failures[number] = StorageError(
                                f"cannot write object: {exc.strerror or exc}")
        finally:
            for _, tmp_name in staged.values():
                _unlink_quietly(tmp_name)
        return failures

    def _stage(self, key: str, data: bytes) -> tuple[Path, str]:
        """Write ``data`` to a temporary file beside its final place; (path, temp)."""
        path = self._path(key)
        try:
            self._folders.make(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc
        return path, _temporary(path.parent, data)

    def stage(self, data: bytes) -> Staged:
        """Write ``data`` durably to a temporary file at the root, in a thread of the
        store, while the caller goes on: the :class:`~pacs.core.storage.Staging`
        capability (:meth:`_StagedFile.place` renames it into place).

        The file is opened with ``O_DSYNC``, so that one ``write`` call both writes and
        syncs it, without the GIL (:mod:`pacs.core.offload`): a thread that had to come
        back for an ``fsync`` would wait for the GIL while the caller analyses, and
        nothing would overlap.  The thread begins when the caller next lets go of the
        GIL: ingest starts the object's hash at once, whose hand-over serves both.
        """
        written: Future[str]
        try:
            self._folders.make(self.root)
            fd, tmp_name = _synced_temporary(self.root)
        except OSError as exc:
            written = Future()
            written.set_exception(
                StorageError(f"cannot write object: {exc.strerror or exc}"))
            return _StagedFile(self, written)
        try:
            return _StagedFile(self, self._stagers.submit(_write_synced, fd, tmp_name, data))
        except BaseException:  # no thread to write it (Exhausted): nothing left behind
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def open(self, key: str) -> BinaryIO:
        """Open the object for reading: a regular file, never through a link and never
        waiting (a FIFO put at a key opens at once, and is refused).

        Raises
        ------
        NotFound
            No such object.
        ForeignObject
            A link, FIFO, socket or device is at the key.
        StorageError
            It cannot be opened.
        """
        try:
            fd = os.open(self._path(key), _OPEN_OBJECT)
        except FileNotFoundError:
            raise NotFound("no such object") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a socket
                raise ForeignObject(_FOREIGN) from None
            raise StorageError(f"cannot read object: {exc.strerror or exc}") from exc
        file = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            file.close()
            raise ForeignObject(_FOREIGN)
        return file

    def size(self, key: str) -> int:
        """The size of what is at the key (of a link itself, not of its target)."""
        try:
            return self._path(key).lstat().st_size
        except FileNotFoundError:
            raise NotFound("no such object") from None
        except OSError as exc:
            raise StorageError(f"cannot read object: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the object and fsync its folder."""
        path = self._path(key)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete object: {exc.strerror or exc}") from exc

    def local_file(self, key: str) -> Path | None:
        """The object's file (objects are files here): the
        :class:`~pacs.core.storage.LocalFiles` capability.  ``None`` when something
        other than a regular file is at the key (a link, a FIFO): a caller then reads
        it with :meth:`open`, which refuses it, rather than opening the path itself
        (C-GET and C-MOVE send a file by its path)."""
        path = self._path(key)
        try:
            mode = path.lstat().st_mode
        except OSError:
            return path  # missing: the caller's own open says so
        return path if stat.S_ISREG(mode) else None

    def keys(self) -> Iterator[str]:
        """Every stored key (temporary files excluded)."""
        if not self.root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                if is_object_key(key):
                    yield key

    def strays(self, examples: int = 20) -> tuple[int, list[str]]:
        """Files below the root that are neither objects (at a key) nor temporary
        files, put there by something else (objects copied to another depth, a note):
        their number and the first ``examples`` of their paths (relative), so that the
        tools that read every object say what they did not read, in bounded memory."""
        def files() -> Iterator[str]:
            for dirpath, _dirs, names in os.walk(self.root):
                for name in names:
                    path = os.path.relpath(os.path.join(dirpath, name), self.root)
                    if not name.startswith(_TMP_PREFIX) and not is_object_key(path):
                        yield path

        return _counted(files(), examples) if self.root.is_dir() else (0, [])

    def linked_folders(self, examples: int = 20) -> tuple[int, list[str]]:
        """Symbolic links to folders below the root: their number and the first
        ``examples`` of their paths (relative).  The node never makes one, and
        :meth:`keys` does not follow them (a link to a folder could loop, or lead out
        of the store), so the objects behind one are not listed at all: a tool that
        rebuilds from the listing must know they exist.  (A link at a key is listed,
        and refused when opened: :class:`~pacs.core.errors.ForeignObject`.)"""
        def links() -> Iterator[str]:
            for dirpath, dirs, _files in os.walk(self.root):
                for name in dirs:
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path):
                        yield os.path.relpath(path, self.root)

        return _counted(links(), examples) if self.root.is_dir() else (0, [])

    def quarantine(self, key: str, folder: str) -> str:
        """Move the object to ``<quarantine_root>/<folder>/<key>``; return that path.

        A rename when both folders are on one file system (atomic, both folders
        fsynced); otherwise a durable copy first, and only then the removal.

        Raises
        ------
        NotFound
            When there is no such object.
        StorageError
            When it cannot be moved (it stays where it was), or the place is taken.
        """
        source = self._path(key)
        target = self.quarantine_root / quarantine_folder(folder) / key
        try:
            self._quarantine_folders.make(target.parent)
            if target.exists():
                raise StorageError("the quarantine already holds this object")
            try:
                os.rename(source, target)
            except FileNotFoundError:
                raise NotFound("no such object") from None
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_across(source, target)
                # The copy's name durable before the original goes: the two file
                # systems commit their journals apart, and the unlink alone may reach
                # the disk before a crash.
                _fsync_dir(target.parent)
                source.unlink()
            _fsync_dir(target.parent)
            _fsync_dir(source.parent)
        except OSError as exc:
            raise StorageError(f"cannot quarantine object: {exc.strerror or exc}") from exc
        return str(target)

    @staticmethod
    def _copy_across(source: Path, target: Path) -> None:
        """Copy to another file system durably: temporary file, fsync, rename."""
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as stream:
                shutil.copyfileobj(stream, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            _unlink_quietly(tmp_name)
            raise

    def temporaries(self) -> list[Path]:
        """The temporary files of writes in progress or interrupted by a crash."""
        if not self.root.is_dir():
            return []
        return [Path(dirpath) / name for dirpath, _dirs, files in os.walk(self.root)
                for name in files if name.startswith(_TMP_PREFIX)]

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a crash mid-write, and the folders left empty
        (those of removed studies and series); return how many temporary files.

        Only while nothing writes (at start-up): a write in progress has a temporary
        file, and a writer of another process may know a folder it is about to write
        into (:class:`DurableFolders`), which a deletion therefore leaves in place even
        when it empties it; nothing else removes folders.
        """
        if not self.root.is_dir():
            return 0
        removed = 0
        emptied: set[str] = set()
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            kept = False
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    _unlink_quietly(os.path.join(dirpath, name))
                    removed += 1
                else:
                    kept = True
            if kept or dirpath == str(self.root) or any(
                    os.path.join(dirpath, name) not in emptied for name in dirs):
                continue
            with contextlib.suppress(OSError):  # a link or a file the walk did not list
                os.rmdir(dirpath)
                emptied.add(dirpath)
        return removed

    def check(self, create: bool = True) -> None:
        """The folder must exist (created when missing, with ``create``) and be
        writable."""
        try:
            present = self.root.is_dir()
        except OSError as exc:  # EIO, ESTALE, EACCES: Path.is_dir raises those
            raise StorageError(f"the object folder {self.root} cannot be reached: "
                               f"{exc.strerror or exc}") from exc
        if not create and not present:
            raise StoreMissing(f"the object folder {self.root} does not exist (not "
                              "mounted? check PACS_DATA_DIR and PACS_STORAGE)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the object folder {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"the object folder {self.root} is not writable")

    def free_bytes(self) -> int:
        """Free space on the folder's file system."""
        return shutil.disk_usage(self.root).free

    def close(self) -> None:
        """Stop the staging threads (once what they write is written)."""
        self._stagers.close()


def stray_lines(count: int, first: list[str]) -> Iterator[str]:
    """The report's lines on files of the store not at an object key (none: no line)."""
    if count:
        yield (f"{count} file(s) in the object folder are not at an object key "
               "(<study>/<series>/<sop>.dcm) and were not read:")
        yield from (f"  {shown(path)}" for path in first)
        if count > len(first):
            yield f"  … and {count - len(first)} more"


class _StagedFile:
    """An object staged by :meth:`FileStore.stage`: its temporary file, being written."""

    def __init__(self, store: FileStore, written: Future[str]) -> None:
        self._store = store
        self._written = written
        self._done = False  # placed or discarded

    def place(self, key: str) -> None:
        """Wait for the temporary file's durable write, rename it to ``key``'s path and
        fsync its folder: the object is then durable, as :meth:`FileStore.put` leaves
        it."""
        path = self._store._path(key)
        tmp_name = self._written.result()  # its StorageError, if the write failed
        try:
            self._store._folders.make(path.parent)
            os.replace(tmp_name, path)
            self._done = True
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Remove the temporary file, waiting for its write to end: nothing is left
        once the caller goes on."""
        if not self._done:
            self._done = True
            if self._written.exception() is None:
                _unlink_quietly(self._written.result())


def _temporary(folder: Path, data: bytes) -> str:
    """A new temporary file in ``folder`` holding ``data``, not synced; its name.
    Nothing is left when it fails."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
    except OSError as exc:
        raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as exc:
        _unlink_quietly(tmp_name)
        raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc
    return tmp_name


def _synced_temporary(folder: Path) -> tuple[int, str]:
    """A new temporary file in ``folder``, open for writes that are durable when they
    return (``O_DSYNC``: data and size, as ``fdatasync``): (descriptor, name)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC | os.O_CLOEXEC
    for _ in range(100):
        name = os.path.join(folder, _TMP_PREFIX + secrets.token_hex(8))
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _date(path: Path, modified: float) -> None:
    """Set ``path``'s modification time; a failure leaves the time of the write (it
    orders a rebuild, :mod:`pacs.core.reindex`, and guards nothing)."""
    at = int(modified * 1e9)
    with contextlib.suppress(OSError):
        os.utime(path, ns=(at, at))


def _write_synced(fd: int, tmp_name: str, data: bytes) -> str:
    """Write ``data`` to the ``O_DSYNC`` file ``fd`` and close it (its name returned).
    Nothing is left when it fails."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quietly(tmp_name)
        raise StorageError(f"cannot write object: {exc.strerror or exc}") from exc
    return tmp_name


class DurableFolders:
    """The folders a store knows to be durable in their parents, so that an object
    renamed into one survives a crash with its whole path.

    A folder found already there may be another writer's (a process of the node)
    that has made it and not yet fsynced its parent: its parent is fsynced once, then
    the folder is remembered (up to ``limit`` of them; forgetting costs one more
    fsync of a clean folder, never durability).  Folders are made under ``root``
    only: a missing root is a volume not mounted, which a write must not make anew
    (only :meth:`FileStore.check` may, for a new node).
    """

    def __init__(self, root: Path, limit: int = 4096) -> None:
        self.root = root
        self._known: dict[Path, None] = {}
        self._limit = limit

    def make(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents under :attr:`root`, durably.

        Raises
        ------
        OSError
            The root is missing, or a folder cannot be made or synced.
        """
        if folder in self._known:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the folder is missing (not mounted?)",
                                    str(self.root))
        found = _make_folders(folder, self._known)
        if len(self._known) >= self._limit - 1:
            self._known.clear()
        self._known[found] = None
        self._known[folder] = None


def _make_folders(folder: Path, durable: Container[Path] = ()) -> Path:
    """Create ``folder`` and its missing parents, each fsynced in its parent, and so is
    the nearest that was there already, unless known ``durable``: another writer may
    have made it and not fsynced it yet (a study folder made by one worker, its new
    series folder by another).  Returns that nearest folder."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    if folder not in durable:
        _fsync_dir(folder.parent)
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another writer meanwhile,
            new.mkdir()                             # perhaps not yet fsynced: fsync it
        _fsync_dir(new.parent)
    return folder


def _copy(source: BinaryIO, out: BinaryIO, length: int) -> int:
    copied = 0
    while copied < length:
        chunk = source.read(min(_CHUNK, length - copied))
        if not chunk:
            break
        out.write(chunk)
        copied += len(chunk)
    return copied


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


def _counted(paths: Iterable[str], examples: int) -> tuple[int, list[str]]:
    """How many ``paths`` there are, and the first ``examples`` of them (bounded memory
    however many)."""
    count = 0
    found: list[str] = []
    for path in paths:
        count += 1
        if len(found) < examples:
            found.append(path)
    return count, found
