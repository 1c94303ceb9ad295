"""Crash consistency: make the index and the store agree again.

A crash between the object write and the index commit leaves an object the index does
not list (never the reverse, by the ingest order).  :func:`reconcile` re-indexes such
objects through the ingest path (they are complete, durable objects, so a peer that did
not get its acknowledgement loses nothing by resending), drops index rows whose object
is gone, and removes temporary files of interrupted writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pacs.errors import InvalidInstance, PacsError
from pacs.index import writer
from pacs.services import Services
from pacs.storage.filesystem import FileStore

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a reconciliation found and did."""

    reindexed: int = 0
    removed_orphans: int = 0
    dropped_rows: int = 0
    temporaries: int = 0
    errors: list[str] = field(default_factory=list)


def reconcile(services: Services, full: bool = True) -> Report:
    """Bring index and store into agreement; see the module docstring.

    Parameters
    ----------
    full : bool
        Also list every stored object (expensive on a large bucket); otherwise only
        temporary files are cleaned.
    """
    report = Report()
    if isinstance(services.store, FileStore):
        report.temporaries = services.store.remove_stale_temporaries()
    if not full:
        return report
    indexed = writer.all_objects(services.index.connection())
    for key in services.store.keys():
        if key in indexed:
            continue
        _reindex(services, key, report)
    for key, (sop_uid, _checksum, _size) in indexed.items():
        if not services.store.exists(key):
            with services.index.write() as conn:
                writer.delete_instance(conn, sop_uid)
            report.dropped_rows += 1
    return report


def _reindex(services: Services, key: str, report: Report) -> None:
    try:
        with services.store.open(key) as stream:
            data = stream.read()
        result = services.ingest.store_bytes(data, calling_ae="")
        report.reindexed += 1
        if services.store.exists(key) and key != _key_of(services, result.sop_instance_uid):
            services.store.delete(key)
    except InvalidInstance as exc:
        log.warning("removing an unreadable stored object: %s", exc)
        services.store.delete(key)
        report.removed_orphans += 1
    except PacsError as exc:
        report.errors.append(f"{key}: {exc}")


def _key_of(services: Services, sop_uid: str) -> str | None:
    stored = writer.lookup(services.index.connection(), sop_uid)
    return stored.object_key if stored else None
