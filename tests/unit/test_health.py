"""The health check (``GET /health``, ``pacs status``) reads the index through its named
reads and the store through its interface, with a plain fallback for ``usage``."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from pacs.core import audit, health
from pacs.core.audit import AuditLog, AuditTrail, Source
from pacs.core.errors import ConfigError
from pacs.core.services import Services, drain
from pacs.core.storage.memory import MemoryStore
from pacs.node import status
from pacs.node.status import describe
from tests.factory import make_instance


def test_quick_and_thorough_checks_count_and_measure(services: Services) -> None:
    data = make_instance()
    services.ingest.store_bytes(data)
    quick = health.check(services)
    assert quick.ok and quick.index == "ok"
    assert quick.counts == {"patient": 1, "study": 1, "series": 1, "instance": 1}
    assert quick.indexed_bytes == len(data)
    assert quick.store_bytes is None  # the quick check never lists the store
    assert (quick.intake_objects, quick.intake_bytes) == (1, len(data))  # not moved yet
    assert quick.intake_oldest_seconds is not None and quick.intake_error is None
    thorough = health.check(services, thorough=True)
    assert thorough.ok and thorough.index == "ok"
    assert thorough.store_bytes == 0
    assert drain(services) == 1
    thorough = health.check(services, thorough=True)
    assert thorough.store_bytes == len(data)
    assert (thorough.intake_objects, thorough.intake_bytes) == (0, 0)
    assert thorough.intake_oldest_seconds is None
    assert thorough.as_json()["status"] == "ok"


class _Plain:
    """The core interface of a store and nothing else (no ``usage`` capability)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        self.inner.put(key, source, length)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self) -> Iterator[str]:
        return self.inner.keys()

    def check(self, create: bool = True) -> None:
        """Always usable."""

    def close(self) -> None:
        """Nothing to release."""


def test_a_store_without_usage_is_measured_by_its_sizes(
        make_services: Callable[..., Services]) -> None:
    services = make_services(store=_Plain())
    data = make_instance()
    services.ingest.store_bytes(data)
    drain(services)
    found = health.check(services, thorough=True)
    assert found.ok and found.store_bytes == len(data)


def test_a_missing_objects_folder_is_reported_not_made(
        make_services: Callable[..., Services]) -> None:
    services = make_services()
    folder = services.settings.objects_dir
    assert folder.is_dir()
    folder.rmdir()
    found = health.check(services)
    assert not found.ok and not found.store_reachable and "not mounted" in found.store_error
    assert not folder.exists()


def test_an_unusable_store_and_a_broken_index_are_reported(
        make_services: Callable[..., Services]) -> None:
    store = MemoryStore()
    services = make_services(store=store)

    def refuse(create: bool = True) -> None:
        raise ConfigError("the bucket is gone")

    store.check = refuse  # type: ignore[method-assign]
    services.index.connection().execute("DROP TABLE instance_metadata")
    services.index.connection().execute("DROP TABLE instance")
    found = health.check(services, thorough=True)
    assert not found.ok and not found.store_reachable
    assert found.store_error == "the bucket is gone"
    assert found.index.startswith("error: IndexFailure")
    assert found.as_json()["status"] == "unhealthy"


def test_an_unwritable_audit_trail_is_reported_without_making_the_node_unhealthy(
        services: Services, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the trail's folder should be")
    services.audit = AuditTrail(AuditLog(blocker / "audit.jsonl"), Source("PACS", "x"))
    services.audit.security_alert(audit.APPLICATION_SERVER, audit.NODE_AUTHENTICATION,
                                  "association rejected", audit.MINOR_FAILURE)
    found = health.check(services)
    assert found.ok and found.audit.startswith("cannot be written")
    assert found.audit_events_lost == 1
    lines = describe(services.settings, found)
    assert any(line.startswith("audit trail: cannot be written") and "1 event(s) lost"
               in line for line in lines)


def test_the_write_ahead_log_is_measured_and_explained_past_its_limit(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reports the index's write-ahead log as its file's size; ``pacs status``
    says what holds it once it is past what checkpoints cut it back to (a reader with
    an old snapshot: checkpoints cannot copy past it, and every commit adds to it)."""
    services.ingest.store_bytes(make_instance())
    found = health.check(services)
    wal = Path(f"{services.settings.index_path}-wal")
    assert found.index_wal_bytes == wal.stat().st_size > 0
    (line,) = [line for line in describe(services.settings, found) if line.startswith("index:")]
    assert "snapshot" not in line
    monkeypatch.setattr(status, "WAL_SIZE_LIMIT", found.index_wal_bytes - 1)
    (line,) = [line for line in describe(services.settings, found) if line.startswith("index:")]
    assert "keeps an old snapshot open" in line


def test_a_folder_that_cannot_be_reached_is_reported_not_raised(
        tmp_path: Path, make_services: Callable[..., Services],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO or ESTALE from the object folder (a dead NFS mount) makes ``Path.is_dir``
    raise, where ENOENT makes it false: the health check reports the store as failing
    (503 on /health, unhealthy in pacs status), it does not fail itself (a 500)."""
    from pacs.core.storage.filesystem import FileStore
    services = make_services(store=FileStore(tmp_path / "objects"))
    services.store.check()
    real = Path.is_dir

    def stale(path: Path) -> bool:
        if path == tmp_path / "objects":
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path)

    monkeypatch.setattr(Path, "is_dir", stale)
    found = health.check(services)
    assert not found.ok
    assert "Stale file handle" in (found.store_error or "")


def test_a_removal_not_finished_is_counted(services: Services) -> None:
    """A ``pacs delete`` killed half-way leaves its removal pending until the node's
    next start finishes it; meanwhile what it names is still served: the status says
    so (``pacs status``, ``/health``)."""
    from pacs.core.index import writer

    assert health.check(services).removals_pending == 0
    with services.index.write() as conn:
        writer.removal_pending(conn, "admin", "", "110150", "", "[]", 0.0)
    found = health.check(services)
    assert found.removals_pending == 1 and found.as_json()["removals_pending"] == 1
    assert any(line.startswith("removals: 1 asked for and not finished")
               for line in describe(services.settings, found))


def test_objects_of_removed_instances_left_in_the_store_are_counted(
        services: Services) -> None:
    """A removal whose object deletions failed: the intake's mover deletes them once
    the store answers; meanwhile ``pacs status`` and ``/health`` count them."""
    from pacs.core.index import writer

    assert health.check(services).deletions_pending == 0
    with services.index.write() as conn:
        writer.deletions_pending(conn, ["1.2/1.3/1.4.dcm", "1.2/1.3/1.5.dcm"], 0.0)
    found = health.check(services)
    assert found.deletions_pending == 2 and found.as_json()["deletions_pending"] == 2
    assert any(line.startswith("deletions: 2 object(s) of removed instances")
               for line in describe(services.settings, found))
