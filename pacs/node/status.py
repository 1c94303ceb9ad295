"""The text of ``pacs status``: a health check plus what an operator looks for next.

Counts first (``patient: N`` ... one per line), then the index, the store, the disk,
the intake's backlog, the storage commitment results waiting, each forwarding
destination's backlog, whether the audit trail can be written, the upload folder and
the viewer files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from pacs.core import audit
from pacs.core.config import Settings
from pacs.core.health import Health
from pacs.core.index.connection import WAL_SIZE_LIMIT
from pacs.core.index.outbox import Backlog
from pacs.core.routes import shown
from pacs.core.walk import walk
from pacs.node.uploads import ARCHIVE, REASON_SUFFIX, REJECTED, waits_for_rename
from pacs.node.viewer import find, missing_message


def human(size: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``unknown``."""
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # not reached


def _count_files(folder: Path, skip_top: tuple[str, ...] = ()) -> int:
    """Files below ``folder`` that the watcher would consider, or rejected ones."""
    if not folder.is_dir():
        return 0
    count = 0
    for dirpath, dirs, files in walk(folder):
        if Path(dirpath) == folder:
            dirs[:] = [d for d in dirs if d not in skip_top]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        count += sum(1 for f in files
                     if not waits_for_rename(f) and not f.endswith(REASON_SUFFIX))
    return count


def _age(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``."""
    whole = int(max(seconds, 0))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "",
             f"{minutes} min" if minutes else "", f"{secs} s"]
    return " ".join(p for p in parts if p)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def forwarding_lines(settings: Settings, backlogs: Sequence[Backlog],
                     now: float | None = None) -> list[str]:
    """One line per forwarding destination (those of the routes, and any other with
    entries left): backlog, oldest entry's age, failed instances, last success, last
    error."""
    now = time.time() if now is None else now
    by_name = {b.destination: b for b in backlogs}
    names = list(dict.fromkeys([shown(r.destination) for r in settings.routes]
                               + list(by_name)))
    lines = []
    for name in names:
        found = by_name.get(name) or Backlog(name, 0, None, 0, "", None, None, 0.0)
        line = f"forwarding to {name}: {found.waiting} waiting"
        if found.oldest_queued_at is not None:
            line += f" (oldest {_age(now - found.oldest_queued_at)})"
        if found.waiting > settings.forward_max_outbox:
            line += ", OVER PACS_FORWARD_MAX_OUTBOX"
        line += f", {found.failed} refused; last success {_when(found.last_success_at)}"
        if found.last_error:
            line += f"; last error {_when(found.last_error_at)}: {found.last_error}"
        if found.next_attempt > now:
            line += f"; next attempt in {_age(found.next_attempt - now)}"
        lines.append(line)
    return lines


def _intake_line(settings: Settings, found: Health) -> str:
    """The intake's backlog: acknowledged objects not yet in the store."""
    line = (f"intake: {found.intake_objects} object(s), {human(found.intake_bytes)} waiting "
            f"for the store (limit {human(settings.intake_max_bytes)})")
    if found.intake_oldest_seconds is not None:
        line += f", oldest {found.intake_oldest_seconds:.0f} s"
    if found.intake_unsettled:
        line += (f"; {found.intake_unsettled} unanswered by the store, waiting "
                 "PACS_S3_SETTLE")
    if found.intake_error:
        line += f"; mover failing: {found.intake_error}"
    return line


def _wal_note(wal_bytes: int) -> str:
    """A word on the index's write-ahead log when it has grown past what checkpoints
    leave (:data:`pacs.core.index.connection.WAL_SIZE_LIMIT`): a reader holds it."""
    if wal_bytes <= WAL_SIZE_LIMIT:
        return ""
    return (f"; write-ahead log {human(wal_bytes)}: a reader (another process?) keeps an "
            "old snapshot open, and the log grows until it ends")


def _audit_line(settings: Settings, found: Health) -> str:
    """The audit trail's line: whether it can be written (it fails open: a trail that
    cannot be written stops nothing, so this line is where an operator sees it)."""
    if found.audit == "off":
        return "audit trail: off"
    where = audit.audit_path(settings.audit_log, settings.data_dir)
    line = f"audit trail: {found.audit} ({where})"
    if found.audit_events_lost:
        line += f"; {found.audit_events_lost} event(s) lost by this process"
    return line


def describe(settings: Settings, found: Health) -> list[str]:
    """The lines ``pacs status`` prints."""
    lines = [f"{level}: {count}" for level, count in found.counts.items()]
    lines.append(f"index: {found.index} ({settings.index_path})"
                 + _wal_note(found.index_wal_bytes))
    if found.store_reachable:
        where = (str(settings.objects_dir) if settings.storage == "file" else
                 f"{settings.s3_endpoint} bucket {settings.s3_bucket}, prefix "
                 f"{settings.customer}/")
        lines.append(f"store: {settings.storage}, reachable ({where}), "
                     f"{found.store_bytes if found.store_bytes is not None else 'unknown'} "
                     f"bytes ({human(found.store_bytes)}); indexed "
                     f"{human(found.indexed_bytes)}")
    else:
        lines.append(f"store: {settings.storage}, NOT reachable: {found.store_error}")
    lines.append(f"disk free: {human(found.disk_free_bytes)} ({settings.data_dir})")
    lines.append(_intake_line(settings, found))
    lines.append(f"storage commitment: {found.commitments_waiting} result(s) waiting for "
                 "delivery")
    if found.removals_pending:
        lines.append(f"removals: {found.removals_pending} asked for and not finished "
                     "(running, or cut short: finished at the node's next start)")
    if found.deletions_pending:
        lines.append(f"deletions: {found.deletions_pending} object(s) of removed instances "
                     "still in the store (deleted by the intake's mover once the store "
                     "answers)")
    lines += forwarding_lines(settings, found.forwarding)
    lines.append(_audit_line(settings, found))
    uploads = settings.uploads_dir
    lines.append(f"uploads: {_count_files(uploads, (ARCHIVE, REJECTED))} waiting, "
                 f"{_count_files(uploads / REJECTED)} rejected ({uploads})")
    viewer = find(settings)
    lines.append(f"viewer: {viewer}" if viewer else f"viewer: {missing_message(settings)}")
    return lines
