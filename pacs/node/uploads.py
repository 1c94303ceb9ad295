"""The customer's upload folder: files dropped there are stored like a C-STORE.

Other DICOM tools (a storescp, a CD import, a user copying files) write into
``customer/<CUSTOMER>/uploads`` (``PACS_UPLOADS_DIR``).  A watcher polls it, since
inotify does not see writes made through a bind mount from another host or container,
and every complete file goes through :meth:`pacs.core.ingest.Ingest.store_bytes`, the one
ingest path, with the same durability and the same refusals.

When is a file complete?  There is no portable signal, so three rules together:

1. names that say "not yet" are left alone: dot-files, ``*.part``, ``*.tmp`` (and
   ``*.partial``, ``*.crdownload``), the usual write-then-rename conventions;
2. its size and modification time are the same in two consecutive scans (a writer
   still busy changes them);
3. no process has it open for writing (read from ``/proc/*/fd`` and ``fdinfo``, where
   this process may see the writer: the same host or container, same user or root).

A writer the watcher cannot see (another host, another container) that stalls for
longer than one poll interval is indistinguishable from a finished one; such writers
should use rule 1 (write ``name.part``, rename when done), as ``storescp`` and
``rsync`` do.

Afterwards:

- stored (or already stored, byte for byte): deleted, or moved to ``archive/``
  (``PACS_UPLOADS_AFTER_STORE``);
- refused (not DICOM Part 10, truncated, invalid UIDs, a duplicate the policy refuses,
  or a different duplicate the policy discards): moved to ``rejected/`` with
  ``<name>.reason.txt`` beside it;
- our own failure (store or index unavailable), a file or folder that cannot be read
  (its permissions), or a move to ``archive/`` or ``rejected/`` that fails (a full
  disk): left in place and tried again every scan (a stored one is stored again as
  unchanged), a WARNING logged once for it while it stays.

Files larger than ``PACS_MAX_OBJECT_BYTES`` are rejected by their size, unread.  A file
rewritten after it was read (its size, times or inode differ from what was read) is
neither deleted nor archived: it is left for the next scans, which store the new
content once it is stable.

No link is ever followed below the upload folder: every path is reached one component
at a time from the folder's descriptor with ``O_NOFOLLOW``, so a symbolic link (to
``/etc/passwd``, or to a file or folder anywhere) is moved to ``rejected/`` as the link
itself, with its reason; its target is never read, moved or deleted.  The same holds
for ``archive/`` and ``rejected/`` (a link planted there is refused, not written
through), and for the reason files.

Sub-folders are walked (a dropped folder tree works); ``archive/`` and ``rejected/``
keep the relative path of each file.  Each scan that stored or rejected files is in the
audit trail: a Data Import event (PS3.15 A.5.3.5) per patient the stored instances
named, the node's watcher as its requestor and the upload folder as its source media,
with counts, never file names.  Logs give counts, not file names (which may
carry patient names); names are logged at DEBUG only, and a reason file names its
file on one line (bytes that are not UTF-8 and control characters escaped).  A fault
of the code on one file leaves that file for the next scan; the others are handled.
A stop ends a scan between two files.

Run by ``pacs serve`` as its own process (``python -m pacs.node.uploads``), so that it
opens its own index connection and store client, as every worker does.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":
    # Run by `pacs serve`, which stops it with SIGTERM.  A Ctrl-C reaches the whole
    # process group, possibly while the imports below are still running: ignore it until
    # main() installs its own handler, so that it does not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from pacs.core import audit
from pacs.core.audit import AuditTrail, ImportAudit
from pacs.core.config import Settings
from pacs.core.errors import InvalidInstance, PacsError, logged_by_core
from pacs.core.ingest import IMPORTED, Ingest, Outcome
from pacs.core.logs import shown
from pacs.core.services import Services
from pacs.core.storage import folder_below, read_bounded
from pacs.core.walk import walk

#: Named, not ``__name__``: the module also runs as ``__main__`` (``python -m``).
log = logging.getLogger("pacs.node.uploads")

#: Sub-folders of the upload folder that the watcher writes and never scans.
ARCHIVE = "archive"
REJECTED = "rejected"
#: Suffixes of files still being written by their convention (case-insensitive).
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")
#: The suffix of the file explaining a rejection.
REASON_SUFFIX = ".reason.txt"
#: The UserName of the node as the requestor of the upload folder's Data Import events
#: (its UserID is the node's AE title, as in every event the node writes itself).
WATCHER_NAME = "upload folder watcher"

#: An uploaded file: never through a link, and never blocking (a FIFO put in its place).
_UPLOAD = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Disposition(enum.Enum):
    """What became of one uploaded file."""

    STORED = "stored"
    REJECTED = "rejected"
    RETRY = "retry"  # our failure: left in place for the next scan


@dataclass(frozen=True)
class Handled:
    """One file the watcher acted on."""

    path: Path
    disposition: Disposition
    reason: str = ""


@dataclass(frozen=True)
class _Seen:
    """What a scan saw of a file: it is stable when the next scan sees the same."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class _Identity:
    """A file's identity and version: any write or replacement changes one of these."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> _Identity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                   info.st_ctime_ns)

    def renamed(self, info: os.stat_result) -> bool:
        """True when ``info`` is of this file, renamed since (a rename changes the
        file's ctime, nothing else of these)."""
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) == (
            self.device, self.inode, self.size, self.mtime_ns)


class _Skip(Exception):
    """A file that is not handled now: its :class:`Handled` says what instead."""

    def __init__(self, handled: Handled) -> None:
        super().__init__(handled.reason)
        self.handled = handled


def _exists(name: str, folder: int) -> bool:
    """True when ``name`` is taken in the folder (a dangling link too)."""
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def waits_for_rename(name: str) -> bool:
    """True for names that a writer renames once done (dot-files, ``*.part``, ...)."""
    return name.startswith(".") or name.lower().endswith(IN_PROGRESS_SUFFIXES)


def open_for_writing(paths: Iterable[Path]) -> set[Path]:
    """Those of ``paths`` that some visible process has open for writing.

    Reads ``/proc/<pid>/fd/*`` links and the ``flags`` line of ``fdinfo``.  Processes
    this one may not inspect (other users, other PID namespaces) are not seen; where
    ``/proc`` does not exist the answer is the empty set.
    """
    # The folder resolved, the name not: /proc names a file by its resolved path, and
    # a link is never the file some process writes (a link to /dev/null would
    # otherwise wait for ever for every daemon to close it).
    wanted = {os.path.join(os.path.realpath(p.parent), p.name): p for p in paths}
    busy: set[Path] = set()
    if not wanted:
        return busy
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return busy
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target not in wanted:
                continue
            if _writable_fd(pid, fd):
                busy.add(wanted[target])
    return busy


def _writable_fd(pid: str, fd: str) -> bool:
    """True when the descriptor was opened write-only or read-write."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
                    return (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        pass
    # Unknown: assume it is being written, so the file waits for another scan.
    return True


#: The longest file name, in bytes, of the usual Linux file systems (NAME_MAX).
NAME_MAX = 255
#: Room kept for the ``.1`` ... ``.99999`` of :func:`_free_name`.
_NUMBER_ROOM = 6


def _free_name(name: str, folder: int, *suffixes: str) -> str:
    """``name``, or ``name`` with ``.1``, ``.2`` ... appended, free in ``folder`` with
    each of ``suffixes`` appended too.

    A name too long for a number and a suffix after it (a reason file's name is the
    file's and ``.reason.txt``) is cut to fit :data:`NAME_MAX`: the reason file keeps
    the whole name, and a file that could not be moved aside would be read again at
    every scan.
    """
    room = NAME_MAX - _NUMBER_ROOM - max((len(os.fsencode(s)) for s in suffixes), default=0)
    if len(os.fsencode(name)) > room:
        name = os.fsdecode(os.fsencode(name)[:room])  # bytes cut anywhere re-encode alike
    for n in range(100_000):
        candidate = f"{name}.{n}" if n else name
        if not any(_exists(candidate + suffix, folder) for suffix in ("", *suffixes)):
            return candidate
    raise FileExistsError(name)


#: What a file being moved aside is named meanwhile (a crash then leaves it where the
#: next scans find it).
TAKEN_SUFFIX = ".taken"


def _take(name: str, folder: int, identity: _Identity | None) -> str | None:
    """Rename ``name`` of ``folder`` out of writers' way and return its new name, when
    it is still the file that was read (``identity``; ``None``: not read, a link,
    whose own entry is what is moved); otherwise ``None``, the file left under a name
    of its own.  A check of the name and then a rename could move or delete a file a
    writer put there between the two (``mv`` of a new upload under a name used
    before); the renamed entry is what is checked.

    Raises
    ------
    OSError
        The rename failed.
    """
    if identity is not None:
        try:
            if _Identity.of(os.stat(name, dir_fd=folder, follow_symlinks=False)) != identity:
                return None  # rewritten (its ctime too) or replaced: left as it is
        except FileNotFoundError:
            return None
    taken = _free_name(name + TAKEN_SUFFIX, folder)
    os.rename(name, taken, src_dir_fd=folder, dst_dir_fd=folder)
    try:
        found = os.stat(taken, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if identity is None or identity.renamed(found):
        return taken
    _move_new(taken, name, folder, folder)  # another file: back, for the next scans
    return None


@contextmanager
def _given_back(taken: str, name: str, folder: int) -> Iterator[None]:
    """A file :func:`_take` renamed goes back under ``name`` (or the first free name
    after it) when the block fails to move it on, so that the next scans find it."""
    try:
        yield
    except OSError:
        with contextlib.suppress(OSError):
            _move_new(taken, name, folder, folder)
        raise


def _move_new(name: str, wanted: str, folder: int, to: int, *suffixes: str) -> str:
    """Move ``name`` of ``folder`` to ``to``, named ``wanted`` or the first free name
    after it (:func:`_free_name`, with ``suffixes`` free too), never over an entry
    another writer made there meanwhile (``rename`` replaces one): linked under the
    new name, the next one tried when it is taken, then unlinked.  The new name.

    Raises
    ------
    OSError
        The entry cannot be linked (a folder) or unlinked.
    """
    for _ in range(100):
        new = _free_name(wanted, to, *suffixes)
        try:
            os.link(name, new, src_dir_fd=folder, dst_dir_fd=to, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINKS or stat.S_ISDIR(
                    os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                raise  # a folder is never moved (one swapped in for a file)
            # A file system without hard links (FAT, some network shares): renamed,
            # over an entry made between the look for a free name and the rename.
            os.rename(name, new, src_dir_fd=folder, dst_dir_fd=to)
            return new
        os.unlink(name, dir_fd=folder)
        return new
    raise FileExistsError(errno.EEXIST, "no free name", wanted)


#: ``link`` errors of a file system that has no hard links.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class UploadWatcher:
    """Scan an upload folder and ingest the complete files it holds.

    Parameters
    ----------
    ingest : Ingest
        The node's ingest path.
    folder : Path
        The upload folder (created when missing).
    after_store : {"delete", "archive"}
        What to do with a stored file.
    writers : callable, optional
        Given candidate paths, returns those still open for writing
        (:func:`open_for_writing` by default; tests replace it).
    max_object_bytes : int, optional
        ``PACS_MAX_OBJECT_BYTES``: larger files are rejected unread; ``None``: no limit.
    trail : AuditTrail, optional
        The node's audit trail, for the Data Import events of each scan; ``None``:
        none are written.
    """

    def __init__(self, ingest: Ingest, folder: Path, after_store: str = "delete",
                 writers: Callable[[Iterable[Path]], set[Path]] = open_for_writing,
                 max_object_bytes: int | None = None,
                 trail: AuditTrail | None = None) -> None:
        if after_store not in ("delete", "archive"):
            raise ValueError(f"after_store must be delete or archive, not {after_store!r}")
        self.ingest = ingest
        self.folder = folder
        self.after_store = after_store
        self.writers = writers
        self.max_object_bytes = max_object_bytes
        self.trail = trail
        self._importing: ImportAudit | None = None  # the scan's, while it runs
        self._previous: dict[Path, _Seen] = {}
        # Files and folders a WARNING was logged for, while they stay as they are: a
        # file left for the next scan is tried every scan, but said once.
        self._warned: set[Path] = set()
        #: Files stored that could not be deleted or archived, as they were read: their
        #: removal is tried again, not their store (nor its audit event).
        self._left: dict[Path, _Identity] = {}
        self._unlisted: set[Path] = set()  # folders this scan could not list
        folder.mkdir(parents=True, exist_ok=True)
        # Where the folder is, as the node checked it apart from every other customer's
        # at start (pacs.core.customers): it is scanned only while it is still there.
        self._real = os.path.realpath(folder)

    # -- one scan ---------------------------------------------------------------------

    def scan(self, stopping: threading.Event | None = None) -> list[Handled]:
        """Look once: ingest every file that was already there, unchanged, last scan.

        Parameters
        ----------
        stopping : threading.Event, optional
            Once set, the scan ends before the next file (a stop is not held up by
            thousands of files; those left are taken by the next scan).

        Returns
        -------
        list of Handled
            The files acted on in this scan (none that are still waiting).
        """
        current: dict[Path, _Seen] = {}
        stable: list[Path] = []
        self._unlisted = set()
        for path, seen in self._candidates():
            current[path] = seen
            if self._previous.get(path) == seen:
                stable.append(path)
        self._previous = current
        self._warned &= current.keys() | self._unlisted
        self._left = {path: left for path, left in self._left.items() if path in current}
        busy = self.writers(stable) if stable else set()
        handled: list[Handled] = []
        self._importing = self._import_audit()
        try:
            for path in stable:
                if stopping is not None and stopping.is_set():
                    break
                if path not in busy:
                    handled.append(self._handle_safely(path))
                    if handled[-1].disposition is Disposition.REJECTED and \
                            self._importing is not None:
                        self._importing.failed()
        finally:
            # Files left for the next scan (our failure) are in the event of the scan
            # that stores or rejects them: a store down for hours does not add an event
            # at every scan.
            if self._importing is not None:
                self._importing.write()
            self._importing = None
        for item in handled:
            if item.disposition is not Disposition.RETRY:
                # Gone from the folder: a new file under this name starts afresh.
                self._previous.pop(item.path, None)
        return handled

    def _import_audit(self) -> ImportAudit | None:
        """What records the scan's Data Import events (PS3.15 A.5.3.5): the node's
        watcher imports, from the upload folder (its configured path, no file's name)."""
        if self.trail is None or not self.trail.enabled:
            return None
        watcher = self.trail.node(requestor=True)
        return ImportAudit(self.trail, [replace(watcher, user_name=WATCHER_NAME)],
                           audit.source_media(self.folder.absolute().as_uri()),
                           "upload folder")

    def _candidates(self) -> Iterator[tuple[Path, _Seen]]:
        """Every file below the folder that may be an upload, with what it looks like;
        none while the folder is a link or leads elsewhere than at start (swapped for
        a link to another customer's upload folder, whose files would be stored as
        this customer's)."""
        if self.folder.is_symlink() or os.path.realpath(self.folder) != self._real:
            self._unlisted.add(self.folder)  # said once while it stays so
            self._warn_once(self.folder, "the upload folder is now a link or leads "
                                         "elsewhere than when the node started; not scanned")
            return
        for name in (REJECTED, ARCHIVE):
            self._clear(name)
        for dirpath, dirs, files in walk(self.folder, onerror=self._unlistable):
            here = Path(dirpath)
            if here == self.folder:
                dirs[:] = [d for d in dirs if d not in (ARCHIVE, REJECTED)]
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            # os.walk lists links to folders with the folders (and does not enter them):
            # they are candidates like any other link, to be moved aside as links.
            links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
            dirs[:] = [d for d in dirs if d not in links]
            for name in sorted(files + links):
                if waits_for_rename(name):
                    continue
                path = here / name
                try:
                    info = path.lstat()
                except OSError:  # removed meanwhile
                    continue
                yield path, _Seen(info.st_size, info.st_mtime_ns, info.st_ino)

    def _clear(self, name: str) -> None:
        """Move aside a link (or another entry that is neither a file nor a folder)
        where the node keeps its own folder ``name`` (``archive``, ``rejected``): it
        kept every rejection, or every archiving, from being done, and is no upload
        (a file of that name is one: it goes its way, taken out of its own way first,
        :func:`_take`).  It goes to ``rejected/``, with its reason."""
        try:
            with folder_below(self.folder, ()) as folder:
                try:
                    mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    return
                if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                    return
                hidden = _free_name(f".{name}.not-a-folder", folder)
                os.rename(name, hidden, src_dir_fd=folder, dst_dir_fd=folder)
                with _given_back(hidden, name, folder), \
                        folder_below(self.folder, (REJECTED,), create=True) as to:
                    kept = _move_new(hidden, name, folder, to, REASON_SUFFIX)
                    self._explain(to, kept + REASON_SUFFIX, self.folder / name,
                                  f"a link where the node keeps its {name}/ folder")
        except FileNotFoundError:  # no upload folder (yet), or taken away meanwhile
            return
        except OSError as exc:
            self._warn_once(self.folder / name, "cannot move aside the link %s of the "
                                                "upload folder (%s)", name, exc.strerror)
            return
        log.warning("moved aside a link where the upload folder's %s/ goes to %s/", name,
                    REJECTED)

    def _unlistable(self, exc: OSError) -> None:
        """A folder the walk cannot list (its permissions, a path past ``PATH_MAX``):
        what it holds waits, and the operator is told once."""
        folder = Path(exc.filename or self.folder)
        self._unlisted.add(folder)
        self._warn_once(folder, "cannot list a folder below the upload folder (%s); what "
                                "it holds waits", exc.strerror)

    def _warn_once(self, path: Path, message: str, *args: object) -> None:
        """``message`` at WARNING the first time for ``path``, at DEBUG while it stays
        (the next scans try it again)."""
        level = logging.DEBUG if path in self._warned else logging.WARNING
        self._warned.add(path)
        log.log(level, message, *args)

    # -- one file ---------------------------------------------------------------------

    def _handle_safely(self, path: Path) -> Handled:
        """:meth:`_handle`, a fault of the code on one file (not of the file: those are
        rejections) left to the next scan, so that the files after it are handled.

        The fault is logged with its traceback the first time, at DEBUG while the file
        stays (as :meth:`_warn_once`): a file that meets it again at every scan must
        not grow the log by a traceback per scan."""
        try:
            return self._handle(path)
        except Exception as exc:
            first = path not in self._warned
            self._warned.add(path)
            log.log(logging.ERROR if first else logging.DEBUG,
                    "could not handle an uploaded file; will retry", exc_info=True)
            return Handled(path, Disposition.RETRY, type(exc).__name__)

    def _handle(self, path: Path) -> Handled:
        left = self._left.pop(path, None)
        if left is not None:  # stored already: only its removal is done again
            return self._done(path, left)
        try:
            data, identity = self._read(path)
            result = self.ingest.store_bytes(data, calling_ae="")
        except _Skip as skip:
            return skip.handled
        except InvalidInstance as exc:
            return self._reject(path, str(exc), identity)
        except PacsError as exc:  # a full intake: counted and logged by the ingest
            log.log(logging.DEBUG if logged_by_core(exc) else logging.WARNING,
                    "could not store an uploaded file (%s); will retry", exc)
            return Handled(path, Disposition.RETRY, str(exc))
        finally:
            data = b""  # the object's bytes are not kept while the file is moved
        if self._importing is not None and IMPORTED[result.outcome]:
            self._importing.stored(result.study_uid, result.sop_class_uid, result.patient,
                                   result.outcome.value)
        if result.outcome is Outcome.KEPT_FIRST:
            return self._reject(path, "a different object is already stored under this "
                                      "SOP Instance UID; kept the first "
                                      "(PACS_DUPLICATE_POLICY=keep)", identity)
        return self._done(path, identity)

    def _read(self, path: Path) -> tuple[bytes, _Identity]:
        """The file's bytes and the identity of what was read, without following links.

        Raises
        ------
        _Skip
            A link or not a regular file, larger than ``max_object_bytes`` (both
            rejected), gone, unreadable or changed while it was read (retried).
        """
        parts = self._relative(path).parts
        try:
            with folder_below(self.folder, parts[:-1]) as folder:
                mode = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):  # a file swapped for a folder: the walk takes it
                    raise _Skip(Handled(path, Disposition.RETRY, "a folder now"))
                if not stat.S_ISREG(mode):
                    raise OSError(errno.ELOOP, "not a regular file")  # never opened
                fd = os.open(parts[-1], _UPLOAD, dir_fd=folder)
        except FileNotFoundError:
            raise _Skip(Handled(path, Disposition.RETRY, "vanished")) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                # A link (or a socket) where a file or folder was: never read through.
                raise _Skip(self._reject(path, "a link or not a regular file (links are "
                                               "not followed)")) from None
            self._warn_once(path, "cannot read an uploaded file (%s); will retry",
                            exc.strerror)
            raise _Skip(Handled(path, Disposition.RETRY, str(exc))) from None
        with os.fdopen(fd, "rb") as file:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise _Skip(self._reject(path, "not a regular file"))
            seen = self._previous.get(path)
            if seen is not None and seen != _Seen(before.st_size, before.st_mtime_ns,
                                                  before.st_ino):
                # Rewritten since the scans that found it stable and no writer on it
                # (``cp`` over it truncates it first): its next scans decide again.
                raise _Skip(Handled(path, Disposition.RETRY, "changed since it was seen"))
            limit = self.max_object_bytes
            if limit is not None and before.st_size > limit:
                raise _Skip(self._reject(
                    path, f"larger than PACS_MAX_OBJECT_BYTES ({before.st_size} > {limit} "
                          f"bytes); not read", _Identity.of(before)))
            try:
                data = read_bounded(file, limit)
            except OSError as exc:
                self._warn_once(path, "cannot read an uploaded file (%s); will retry",
                                exc.strerror)
                raise _Skip(Handled(path, Disposition.RETRY, str(exc))) from None
            identity = _Identity.of(os.fstat(fd))
        if identity != _Identity.of(before) or len(data) != identity.size:
            raise _Skip(Handled(path, Disposition.RETRY, "changed while it was read"))
        return data, identity

    def _relative(self, path: Path) -> Path:
        return path.relative_to(self.folder)

    def _done(self, path: Path, identity: _Identity) -> Handled:
        """Delete or archive a stored file (it is durably in the store already), unless
        it was rewritten or replaced since it was read: then the new content waits for
        the next scans."""
        parts = self._relative(path).parts
        try:
            with folder_below(self.folder, parts[:-1]) as folder:
                taken = _take(parts[-1], folder, identity)
                if taken is None:
                    log.info("an uploaded file changed after it was stored; it is left "
                             "for the next scan")
                    return Handled(path, Disposition.RETRY, "changed after it was read")
                with _given_back(taken, parts[-1], folder):
                    if self.after_store == "archive":
                        with folder_below(self.folder, (ARCHIVE, *parts[:-1]),
                                          create=True) as to:
                            _move_new(taken, parts[-1], folder, to)
                    else:
                        os.unlink(taken, dir_fd=folder)
        except OSError as exc:
            # Stored all the same: the next scans try its removal again (given back
            # under its name, the file has a new ctime).
            again = self._as_left(path, identity)
            if again is not None:
                self._left[path] = again
            self._warn_once(path, "stored an uploaded file but could not %s it: %s",
                            self.after_store, exc.strerror)
        return Handled(path, Disposition.STORED)

    def _as_left(self, path: Path, identity: _Identity) -> _Identity | None:
        """The identity of ``path`` now, when it is the file read as ``identity`` (moved
        and given back since); ``None`` otherwise."""
        parts = self._relative(path).parts
        try:
            with folder_below(self.folder, parts[:-1]) as folder:
                info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except OSError:
            return None
        return _Identity.of(info) if identity.renamed(info) else None

    def _reject(self, path: Path, reason: str, identity: _Identity | None = None) -> Handled:
        """Move a refused file (or link, as itself) to ``rejected/`` and write why
        beside it; a file rewritten since it was read is left for the next scans."""
        log.debug("rejected upload %s: %s", path, reason)
        parts = self._relative(path).parts
        try:
            with folder_below(self.folder, parts[:-1]) as folder:
                taken = _take(parts[-1], folder, identity)
                if taken is None:
                    return Handled(path, Disposition.RETRY, "changed after it was read")
                with _given_back(taken, parts[-1], folder), \
                        folder_below(self.folder, (REJECTED, *parts[:-1]), create=True) as to:
                    name = _move_new(taken, parts[-1], folder, to, REASON_SUFFIX)
                    self._explain(to, name + REASON_SUFFIX, path, reason)
        except OSError as exc:
            self._warn_once(path, "could not move a rejected upload aside: %s",
                            exc.strerror)
            return Handled(path, Disposition.RETRY, reason)
        return Handled(path, Disposition.REJECTED, reason)

    def _explain(self, folder: int, name: str, path: Path, reason: str) -> None:
        """:meth:`_write_reason`; the file is in ``rejected/`` already, so a reason that
        cannot be written (a full disk) is logged, and the file stays rejected."""
        try:
            self._write_reason(folder, name, path, reason)
        except OSError as exc:
            log.error("moved an upload to %s/ but could not write its reason: %s",
                      REJECTED, exc.strerror)

    def _write_reason(self, folder: int, name: str, path: Path, reason: str) -> None:
        """The reason file: a new file, never written through a link."""
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644, dir_fd=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"file: {shown(self._relative(path).as_posix())}\n"
                      f"rejected: {when}\nreason: {reason}\n")

    # -- the loop ---------------------------------------------------------------------

    def run(self, stopping: threading.Event, interval: float) -> None:
        """Scan every ``interval`` seconds until ``stopping`` is set.

        A scan that fails unexpectedly is logged and the loop goes on: the folder
        must never stop being watched because of one bad file.
        """
        log.info("watching the upload folder %s every %g s", self.folder, interval)
        while not stopping.is_set():
            try:
                handled = self.scan(stopping)
            except Exception:
                log.exception("upload folder scan failed")
                handled = []
            _log_summary(handled)
            stopping.wait(interval)


def _log_summary(handled: list[Handled]) -> None:
    stored = sum(h.disposition is Disposition.STORED for h in handled)
    rejected = sum(h.disposition is Disposition.REJECTED for h in handled)
    if stored or rejected:
        log.info("uploads: stored %d, rejected %d (see %s/)", stored, rejected, REJECTED)


def main() -> int:
    """``python -m pacs.node.uploads``: watch the configured folder until SIGTERM/SIGINT."""
    from pacs.node.companions import companion_main

    def watch(settings: Settings, services: Services, stopping: threading.Event) -> None:
        UploadWatcher(services.ingest, settings.uploads_dir, settings.uploads_after_store,
                      max_object_bytes=settings.max_object_bytes, trail=services.audit,
                      ).run(stopping, settings.uploads_poll)

    return companion_main("upload watcher", watch)


if __name__ == "__main__":
    sys.exit(main())
