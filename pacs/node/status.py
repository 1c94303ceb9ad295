"""The text of ``pacs status``: a health check plus what an operator looks for next.

Counts first (``patient: N`` ... one per line, as before), then the index, the store,
the disk, the storage commitment results waiting, the upload folder and the viewer
files.
"""

from __future__ import annotations

import os
from pathlib import Path

from pacs.core.config import Settings
from pacs.core.health import Health
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
    for dirpath, dirs, files in os.walk(folder):
        if Path(dirpath) == folder:
            dirs[:] = [d for d in dirs if d not in skip_top]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        count += sum(1 for f in files
                     if not waits_for_rename(f) and not f.endswith(REASON_SUFFIX))
    return count


def describe(settings: Settings, found: Health) -> list[str]:
    """The lines ``pacs status`` prints."""
    lines = [f"{level}: {count}" for level, count in found.counts.items()]
    lines.append(f"index: {found.index} ({settings.index_path})")
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
    lines.append(f"storage commitment: {found.commitments_waiting} result(s) waiting for "
                 "delivery")
    uploads = settings.uploads_dir
    lines.append(f"uploads: {_count_files(uploads, (ARCHIVE, REJECTED))} waiting, "
                 f"{_count_files(uploads / REJECTED)} rejected ({uploads})")
    viewer = find(settings)
    lines.append(f"viewer: {viewer}" if viewer else f"viewer: {missing_message(settings)}")
    return lines
