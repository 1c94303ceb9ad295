"""The upload folder: only complete files are taken, refusals are explained, stored
files become queryable through the same engine as C-FIND."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest

from pacs.attributes import BY_KEYWORD, Level
from pacs.errors import StorageError
from pacs.query.matching import constraint
from pacs.query.model import Query
from pacs.services import Services
from pacs.uploads import (
    REASON_SUFFIX,
    Disposition,
    UploadWatcher,
    open_for_writing,
    waits_for_rename,
)
from tests.conftest import sample


def nobody_writes(paths: Iterable[Path]) -> set[Path]:
    """A writer check that sees no writer (the stability rule alone decides)."""
    return set()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def ct_bytes() -> bytes:
    return sample("CT_small.dcm").read_bytes()


def study_uids(services: Services, study_uid: str) -> list[str]:
    """Studies the query engine finds for one Study Instance UID."""
    key = BY_KEYWORD["StudyInstanceUID"]
    found = constraint(key, study_uid)
    assert found is not None
    query = Query(level=Level.STUDY, constraints=(found,), return_keys=(key,))
    return [r.values["StudyInstanceUID"] or "" for r in services.engine.find(query)]


def test_a_file_still_open_for_writing_is_not_taken(services: Services, folder: Path,
                                                    ct_bytes: bytes) -> None:
    watcher = UploadWatcher(services.ingest, folder)  # the real /proc writer check
    path = folder / "ct.dcm"
    with open(path, "wb") as writer:
        writer.write(ct_bytes[: len(ct_bytes) // 2])
        writer.flush()
        # Unchanged between scans, but this process holds it open for writing.
        assert open_for_writing([path]) == {path}
        for _ in range(3):
            assert watcher.scan() == []
        writer.write(ct_bytes[len(ct_bytes) // 2:])
    assert open_for_writing([path]) == set()
    assert watcher.scan() == []  # changed since the last scan: one more look
    handled = watcher.scan()
    assert [h.disposition for h in handled] == [Disposition.STORED]
    assert not path.exists()  # PACS_UPLOADS_AFTER_STORE=delete
    assert study_uids(services, str(pydicom.dcmread(sample("CT_small.dcm")).StudyInstanceUID))


def test_a_growing_file_waits_until_it_stops_changing(services: Services, folder: Path,
                                                      ct_bytes: bytes) -> None:
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    path = folder / "ct.dcm"
    path.write_bytes(ct_bytes[:1000])
    assert watcher.scan() == []
    with open(path, "ab") as more:
        more.write(ct_bytes[1000:20000])
    assert watcher.scan() == []  # grew since the last scan
    with open(path, "ab") as rest:
        rest.write(ct_bytes[20000:])
    assert watcher.scan() == []
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]


@pytest.mark.parametrize("name", [".hidden.dcm", "ct.dcm.part", "ct.tmp", "CT.PART"])
def test_names_of_unfinished_writes_are_left_alone(services: Services, folder: Path,
                                                   ct_bytes: bytes, name: str) -> None:
    assert waits_for_rename(name)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / name).write_bytes(ct_bytes)
    for _ in range(3):
        assert watcher.scan() == []
    assert (folder / name).read_bytes() == ct_bytes


def test_garbage_is_moved_aside_with_its_reason(services: Services, folder: Path,
                                                ct_bytes: bytes) -> None:
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    (folder / "sub" / "cut.dcm").write_bytes(ct_bytes[:-5000])  # complete but truncated
    watcher.scan()
    handled = {h.path.name: h for h in watcher.scan()}
    assert {n: h.disposition for n, h in handled.items()} == {
        "notes.txt": Disposition.REJECTED, "cut.dcm": Disposition.REJECTED}
    rejected = folder / "rejected"
    assert (rejected / "notes.txt").read_text() == "not an image"
    reason = (rejected / ("notes.txt" + REASON_SUFFIX)).read_text()
    assert "not a DICOM Part 10 object" in reason and "file: notes.txt" in reason
    assert (rejected / "sub" / "cut.dcm").read_bytes() == ct_bytes[:-5000]
    assert (rejected / "sub" / ("cut.dcm" + REASON_SUFFIX)).read_text()
    assert not (folder / "notes.txt").exists()
    # Rejected files are never taken again, and nothing was indexed.
    assert watcher.scan() == [] and watcher.scan() == []
    assert list(services.engine.find(Query(level=Level.STUDY))) == []


def test_a_valid_file_becomes_queryable_and_is_archived(services: Services, folder: Path,
                                                         ct_bytes: bytes) -> None:
    watcher = UploadWatcher(services.ingest, folder, after_store="archive",
                            writers=nobody_writes)
    (folder / "cd" / "DICOM").mkdir(parents=True)
    (folder / "cd" / "DICOM" / "IM0001").write_bytes(ct_bytes)
    study = str(pydicom.dcmread(sample("CT_small.dcm")).StudyInstanceUID)
    assert study_uids(services, study) == []
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert study_uids(services, study) == [study]
    assert (folder / "archive" / "cd" / "DICOM" / "IM0001").read_bytes() == ct_bytes
    # The same file dropped again is stored as unchanged, archived under a free name.
    (folder / "IM0001").write_bytes(ct_bytes)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert (folder / "archive" / "IM0001").exists()


def test_a_store_failure_leaves_the_file_for_the_next_scan(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "ct.dcm").write_bytes(ct_bytes)

    def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("store unavailable")

    monkeypatch.setattr(services.store, "put", broken)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert (folder / "ct.dcm").exists() and not (folder / "rejected").exists()
    monkeypatch.undo()
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]


def test_a_different_duplicate_kept_out_by_policy_is_rejected(
        make_services: object, folder: Path, ct_bytes: bytes) -> None:
    services = make_services(duplicate_policy="keep")  # type: ignore[operator]
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    services.ingest.store_bytes(ct_bytes)
    changed = pydicom.dcmread(sample("CT_small.dcm"))
    changed.PatientName = "Other^Name"
    changed.save_as(folder / "changed.dcm")
    watcher.scan()
    handled = watcher.scan()
    assert [h.disposition for h in handled] == [Disposition.REJECTED]
    assert "kept the first" in handled[0].reason
    assert (folder / "rejected" / "changed.dcm").exists()


def test_links_are_not_followed(services: Services, folder: Path, tmp_path: Path,
                                ct_bytes: bytes) -> None:
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(ct_bytes)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "link.dcm").symlink_to(outside)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert outside.read_bytes() == ct_bytes
    assert (folder / "rejected" / "link.dcm").is_symlink()
