"""The customer's upload folder: files dropped there are stored like a C-STORE.

Other DICOM tools (a storescp, a CD import, a user copying files) write into
``customer/<CUSTOMER>/uploads`` (``PACS_UPLOADS_DIR``).  A watcher polls it, since
inotify does not see writes made through a bind mount from another host or container,
and every complete file goes through :meth:`pacs.ingest.Ingest.store_bytes`, the one
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
- our own failure (store or index unavailable): left in place and tried again.

Sub-folders are walked (a dropped folder tree works); ``archive/`` and ``rejected/``
keep the relative path of each file.  Logs give counts, not file names (which may
carry patient names); names are logged at DEBUG only.

Run by ``pacs serve`` as its own process (``python -m pacs.uploads``), so that it
opens its own index connection and store client, as every worker does.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":
    # Run by `pacs serve`, which stops it with SIGTERM.  A Ctrl-C reaches the whole
    # process group, possibly while the imports below are still running: ignore it until
    # main() installs its own handler, so that it does not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from pacs.errors import InvalidInstance, PacsError  # noqa: E402
from pacs.ingest import Ingest, Outcome  # noqa: E402

#: Named, not ``__name__``: the module also runs as ``__main__`` (``python -m``).
log = logging.getLogger("pacs.uploads")

#: Sub-folders of the upload folder that the watcher writes and never scans.
ARCHIVE = "archive"
REJECTED = "rejected"
#: Suffixes of files still being written by their convention (case-insensitive).
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")
#: The suffix of the file explaining a rejection.
REASON_SUFFIX = ".reason.txt"


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


def waits_for_rename(name: str) -> bool:
    """True for names that a writer renames once done (dot-files, ``*.part``, ...)."""
    return name.startswith(".") or name.lower().endswith(IN_PROGRESS_SUFFIXES)


def open_for_writing(paths: Iterable[Path]) -> set[Path]:
    """Those of ``paths`` that some visible process has open for writing.

    Reads ``/proc/<pid>/fd/*`` links and the ``flags`` line of ``fdinfo``.  Processes
    this one may not inspect (other users, other PID namespaces) are not seen; where
    ``/proc`` does not exist the answer is the empty set.
    """
    wanted = {os.path.realpath(p): p for p in paths}
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


def _free_name(path: Path) -> Path:
    """``path``, or ``path`` with ``.1``, ``.2`` ... inserted when it exists."""
    if not path.exists() and not path.is_symlink():
        return path
    for n in range(1, 100_000):
        candidate = path.with_name(f"{path.name}.{n}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise FileExistsError(path)


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
    """

    def __init__(self, ingest: Ingest, folder: Path, after_store: str = "delete",
                 writers: Callable[[Iterable[Path]], set[Path]] = open_for_writing) -> None:
        if after_store not in ("delete", "archive"):
            raise ValueError(f"after_store must be delete or archive, not {after_store!r}")
        self.ingest = ingest
        self.folder = folder
        self.after_store = after_store
        self.writers = writers
        self._previous: dict[Path, _Seen] = {}
        folder.mkdir(parents=True, exist_ok=True)

    # -- one scan ---------------------------------------------------------------------

    def scan(self) -> list[Handled]:
        """Look once: ingest every file that was already there, unchanged, last scan.

        Returns
        -------
        list of Handled
            The files acted on in this scan (none that are still waiting).
        """
        current: dict[Path, _Seen] = {}
        stable: list[Path] = []
        for path, seen in self._candidates():
            current[path] = seen
            if self._previous.get(path) == seen:
                stable.append(path)
        self._previous = current
        busy = self.writers(stable) if stable else set()
        handled = [self._handle(path) for path in stable if path not in busy]
        for item in handled:
            if item.disposition is not Disposition.RETRY:
                # Gone from the folder: a new file under this name starts afresh.
                self._previous.pop(item.path, None)
        return handled

    def _candidates(self) -> Iterator[tuple[Path, _Seen]]:
        """Every file below the folder that may be an upload, with what it looks like."""
        for dirpath, dirs, files in os.walk(self.folder):
            here = Path(dirpath)
            if here == self.folder:
                dirs[:] = [d for d in dirs if d not in (ARCHIVE, REJECTED)]
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if waits_for_rename(name):
                    continue
                path = here / name
                try:
                    info = path.lstat()
                except OSError:  # removed meanwhile
                    continue
                yield path, _Seen(info.st_size, info.st_mtime_ns, info.st_ino)

    # -- one file ---------------------------------------------------------------------

    def _handle(self, path: Path) -> Handled:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return Handled(path, Disposition.RETRY, "vanished")
        if not stat.S_ISREG(info.st_mode):
            # A link could point anywhere on this machine: never read through it.
            return self._reject(path, "not a regular file (links are not followed)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read an uploaded file (%s); will retry", exc.strerror)
            return Handled(path, Disposition.RETRY, str(exc))
        try:
            result = self.ingest.store_bytes(data, calling_ae="")
        except InvalidInstance as exc:
            return self._reject(path, str(exc))
        except PacsError as exc:
            log.warning("could not store an uploaded file (%s); will retry", exc)
            return Handled(path, Disposition.RETRY, str(exc))
        if result.outcome is Outcome.KEPT_FIRST:
            return self._reject(path, "a different object is already stored under this "
                                      "SOP Instance UID; kept the first "
                                      "(PACS_DUPLICATE_POLICY=keep)")
        self._done(path)
        return Handled(path, Disposition.STORED)

    def _relative(self, path: Path) -> Path:
        return path.relative_to(self.folder)

    def _done(self, path: Path) -> None:
        """Delete or archive a stored file (it is durably in the store already)."""
        try:
            if self.after_store == "archive":
                target = _free_name(self.folder / ARCHIVE / self._relative(path))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
            else:
                path.unlink()
        except OSError as exc:
            # Stored all the same; a file left behind is stored again as unchanged.
            log.warning("stored an uploaded file but could not %s it: %s",
                        self.after_store, exc.strerror)

    def _reject(self, path: Path, reason: str) -> Handled:
        """Move a refused file to ``rejected/`` and write why beside it."""
        log.debug("rejected upload %s: %s", path, reason)
        try:
            target = _free_name(self.folder / REJECTED / self._relative(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            target.with_name(target.name + REASON_SUFFIX).write_text(
                f"file: {self._relative(path).as_posix()}\nrejected: {when}\n"
                f"reason: {reason}\n", encoding="utf-8")
        except OSError as exc:
            log.error("could not move a rejected upload aside: %s", exc.strerror)
            return Handled(path, Disposition.RETRY, reason)
        return Handled(path, Disposition.REJECTED, reason)

    # -- the loop ---------------------------------------------------------------------

    def run(self, stopping: threading.Event, interval: float) -> None:
        """Scan every ``interval`` seconds until ``stopping`` is set.

        A scan that fails unexpectedly is logged and the loop goes on: the folder
        must never stop being watched because of one bad file.
        """
        log.info("watching the upload folder %s every %g s", self.folder, interval)
        while not stopping.is_set():
            try:
                handled = self.scan()
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
    """``python -m pacs.uploads``: watch the configured folder until SIGTERM/SIGINT."""
    from pacs import config
    from pacs.cli import LOG_FORMAT
    from pacs.services import build

    settings = config.load()
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format=LOG_FORMAT, stream=sys.stderr)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        services = build(settings)
    except PacsError as exc:
        log.error("upload watcher cannot start: %s", exc)
        return 1
    try:
        watcher = UploadWatcher(services.ingest, settings.uploads_dir,
                                settings.uploads_after_store)
        watcher.run(stopping, settings.uploads_poll)
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
