"""The upload folder: only complete files are taken, refusals are explained, stored
files become queryable through the same engine as C-FIND."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs.core.attributes import BY_KEYWORD, Level
from pacs.core.errors import StorageError
from pacs.core.query.matching import constraint
from pacs.core.query.model import Query
from pacs.core.services import Services
from pacs.node import uploads
from pacs.node.uploads import (
    REASON_SUFFIX,
    REJECTED,
    Disposition,
    UploadWatcher,
    open_for_writing,
    waits_for_rename,
)
from tests.conftest import nest_past_path_max, sample


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


def _nest(root: Path, levels: int) -> None:
    """``levels`` folders ``a`` nested in ``root`` (made relative to each other)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def _unnest(root: Path) -> None:
    """Remove the folders ``a`` nested in ``root``, deepest first (pytest's clean-up,
    ``shutil.rmtree``, recurses once per level too)."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        while True:
            try:
                fds.append(os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            except FileNotFoundError:
                break
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("a", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def test_a_tree_a_thousand_folders_deep_stops_neither_scans_nor_imports(
        services: Services, folder: Path, ct_bytes: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Python 3.11's ``os.walk`` recursed once per level: 1,200 nested folders (a path
    of 2.4 KB) raised RecursionError out of every scan, so no upload was taken again,
    and out of ``pacs import`` before its first file.  The walk keeps its own stack and
    goes ``MAX_DEPTH`` levels deep; below, the folder is reported once, like one that
    cannot be listed, and the file beside the tree is stored."""
    from pacs.cli import import_files
    from pacs.core.walk import MAX_DEPTH

    folder.mkdir(parents=True, exist_ok=True)
    given = tmp_path / "in"
    given.mkdir()
    try:
        _nest(folder, 1200)
        (folder / "ct.dcm").write_bytes(ct_bytes)
        watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
        with caplog.at_level(logging.WARNING, logger="pacs.node.uploads"):
            assert watcher.scan() == []
            assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
        assert f"more than {MAX_DEPTH} folder levels deep" in caplog.text
        unreadable: list[tuple[Path, str]] = []
        _nest(given, 1200)
        (given / "ct.dcm").write_bytes(ct_bytes)
        found = list(import_files((str(given),), unreadable))
        assert [path.name for path, _ in found] == ["ct.dcm"]
        assert len(unreadable) == 1 and "levels deep" in unreadable[0][1]
    finally:
        _unnest(folder)
        _unnest(given)


def test_a_file_rewritten_after_the_writers_were_looked_for_is_not_taken_half(
        services: Services, folder: Path, ct_bytes: bytes) -> None:
    """``cp new ct.dcm`` over a file the scans found stable, after the look for writers
    and before the file is read: it was read half written and moved to rejected/,
    where the writer finished it, never stored.  What is read must be what the scans
    saw; otherwise the next scans decide again."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct.dcm"
    path.write_bytes(b"an older upload, complete")
    rewriting = [True]

    def writers(paths: Iterable[Path]) -> set[Path]:
        if rewriting[0]:
            path.write_bytes(ct_bytes[:5000])  # truncated, being written
        return set()

    watcher = UploadWatcher(services.ingest, folder, writers=writers)
    assert watcher.scan() == []
    assert [(h.disposition, h.reason) for h in watcher.scan()] == [
        (Disposition.RETRY, "changed since it was seen")]
    assert path.exists() and not (folder / "rejected").exists()
    rewriting[0] = False
    path.write_bytes(ct_bytes)  # the writer finished
    assert watcher.scan() == []
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]


@pytest.mark.parametrize("planted", ["a link named archive", "a file named rejected",
                                     "an upload named archive"])
def test_what_stands_where_the_node_keeps_its_folders_is_out_of_the_way(
        services: Services, folder: Path, ct_bytes: bytes, tmp_path: Path,
        planted: str) -> None:
    """A link named ``archive`` (or ``rejected``) kept every archiving (the stored file
    stored again at every other scan, each an audit event) or every rejection from
    being done: it is moved to rejected/ with its reason, and the node's own folders
    made.  A file of such a name is an upload like any other, taken out of its own
    way before it is moved: rejected, or stored and archived."""
    folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "elsewhere").mkdir()
    expected = {"ct.dcm": Disposition.STORED, "junk.dcm": Disposition.REJECTED}
    if planted == "a link named archive":
        (folder / "archive").symlink_to(tmp_path / "elsewhere")
    elif planted == "a file named rejected":
        (folder / REJECTED).write_bytes(b"not a folder")
        # Met before it: rejected/ cannot be made yet, then in the scan after.
        expected.update({REJECTED: Disposition.REJECTED, "junk.dcm": Disposition.RETRY})
    else:
        (folder / "archive").write_bytes(ct_bytes)
        expected["archive"] = Disposition.STORED
    (folder / "junk.dcm").write_bytes(b"not DICOM at all" * 10)
    (folder / "ct.dcm").write_bytes(ct_bytes)
    watcher = UploadWatcher(services.ingest, folder, after_store="archive",
                            writers=nobody_writes)
    assert watcher.scan() == []
    assert {h.path.name: h.disposition for h in watcher.scan()} == expected
    if expected["junk.dcm"] is Disposition.RETRY:
        assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert (folder / REJECTED).is_dir() and not (folder / REJECTED).is_symlink()
    assert (folder / REJECTED / ("junk.dcm" + REASON_SUFFIX)).exists()
    if planted == "a link named archive":
        assert (folder / REJECTED / "archive").is_symlink()
    elif planted == "a file named rejected":
        assert (folder / REJECTED / REJECTED).read_bytes() == b"not a folder"
    else:
        assert (folder / "archive" / "archive").read_bytes() == ct_bytes
    assert (folder / "archive" / "ct.dcm").exists() and not (folder / "ct.dcm").exists()
    assert not list((tmp_path / "elsewhere").iterdir())
    assert watcher.scan() == [] and watcher.scan() == []


def test_a_folder_too_deep_for_the_walk_is_said_for_each_one(tmp_path: Path) -> None:
    """Every folder the walk does not enter for its depth is reported, not the first
    of them alone (``pacs import`` lists each as not imported)."""
    from pacs.core.walk import walk

    deepest = tmp_path.joinpath(*["d"] * 3)
    for name in ("a", "b", "c"):
        (deepest / name).mkdir(parents=True)
        (deepest / name / "x.dcm").write_bytes(b"x")
    skipped: list[OSError] = []
    assert [files for _, _, files in walk(tmp_path, skipped.append, max_depth=3)] == [
        [], [], [], []]
    assert sorted(Path(str(exc.filename)).name for exc in skipped) == ["a", "b", "c"]


def test_a_file_put_in_place_of_a_stored_one_is_neither_deleted_nor_lost(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer's ``mv new.dcm ct.dcm`` lands between the store of ``ct.dcm`` and its
    deletion: the check of the name and then an unlink deleted the new file unread.
    The file is renamed aside first and that entry checked: the new one goes back, and
    the next scans store it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct.dcm"
    path.write_bytes(ct_bytes)
    other = sample("MR_small.dcm").read_bytes()
    real_rename, real_unlink = os.rename, os.unlink
    pending = [True]

    def replace_first(real: Callable[..., None]) -> Callable[..., None]:
        def step(name: object, *args: object, **kwargs: object) -> None:
            if name == "ct.dcm" and pending:  # the writer's mv, just before this step
                pending.clear()
                (folder / ".new.dcm").write_bytes(other)
                real_rename(folder / ".new.dcm", path)
            real(name, *args, **kwargs)
        return step

    monkeypatch.setattr(uploads.os, "rename", replace_first(real_rename))
    monkeypatch.setattr(uploads.os, "unlink", replace_first(real_unlink))
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    assert watcher.scan() == []
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert path.read_bytes() == other
    assert watcher.scan() == []
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert not path.exists()
    assert study_uids(services, str(pydicom.dcmread(sample("MR_small.dcm")).StudyInstanceUID))


def test_an_archived_name_taken_meanwhile_is_not_replaced(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two watchers archiving files whose names, cut to fit, are one: the second
    ``rename`` replaced the first's archived file.  The move links under the free name
    (refused when taken meanwhile, then the next one), then unlinks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "archived").write_bytes(b"archived by the other watcher")
    (folder / "upload").write_bytes(b"this one")
    free_name = uploads._free_name
    stale = iter(["archived"])  # what the other watcher's move had not taken yet

    def racing(name: str, at: int, *suffixes: str) -> str:
        return next(stale, None) or free_name(name, at, *suffixes)

    monkeypatch.setattr(uploads, "_free_name", racing)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert uploads._move_new("upload", "archived", fd, fd) == "archived.1"
    finally:
        os.close(fd)
    assert (folder / "archived").read_bytes() == b"archived by the other watcher"
    assert (folder / "archived.1").read_bytes() == b"this one"
    assert not (folder / "upload").exists()


def test_a_file_system_without_hard_links_still_archives_and_rejects(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """FAT or a network share refuses ``link``: the move falls back to ``rename``."""
    def no_links(*_: object, **__: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(uploads.os, "link", no_links)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ct.dcm").write_bytes(ct_bytes)
    (folder / "junk.dcm").write_bytes(b"not DICOM at all")
    watcher = UploadWatcher(services.ingest, folder, after_store="archive",
                            writers=nobody_writes)
    assert watcher.scan() == []
    assert sorted(h.disposition.value for h in watcher.scan()) == ["rejected", "stored"]
    assert (folder / "archive" / "ct.dcm").exists()
    assert (folder / "rejected" / "junk.dcm").exists()


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


def _break_the_store(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of the store fails (until ``monkeypatch.undo()``)."""
    def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("store unavailable")

    monkeypatch.setattr(services.store.backend, "put", broken)
    monkeypatch.setattr(services.store.backend, "stage", broken)


def test_a_store_failure_leaves_the_file_for_the_next_scan(
        make_services: Callable[..., Services], folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    services = make_services(intake_object_bytes=0)  # the direct path: the store writes
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "ct.dcm").write_bytes(ct_bytes)
    _break_the_store(services, monkeypatch)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert (folder / "ct.dcm").exists() and not (folder / "rejected").exists()
    monkeypatch.undo()
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]


def test_each_scan_that_stored_or_rejected_files_is_a_data_import_event(
        make_services: Callable[..., Services], tmp_path: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.15 A.5.3.5: the node's watcher (its AE title) imports from the upload folder
    (its path, the Source Media), one event per patient with the study and its SOP
    class counted, outcome 4 when a file was rejected.  No file name is written; a scan
    that leaves its files for the next one (our failure) or finds none writes none."""
    from tests.auditcheck import problems, read_trail, requestor

    services = make_services(intake_object_bytes=0)
    folder = tmp_path / "uploads"
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes,
                            trail=services.audit)
    trail = services.audit.log.path
    assert trail is not None
    watcher.scan()
    watcher.scan()
    (folder / "DOE^JOHN.dcm").write_bytes(ct_bytes)
    _break_the_store(services, monkeypatch)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    (folder / "junk.dcm").write_bytes(b"junk")
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert read_trail(trail) == []
    monkeypatch.undo()
    assert sorted(h.disposition.value for h in watcher.scan()) == ["rejected", "stored"]
    (event,) = read_trail(trail)
    assert problems(event) == []
    assert event["EventIdentification"]["EventID"]["originalText"] == "Import"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert requestor(event) == {
        "UserID": services.settings.ae_title, "UserName": uploads.WATCHER_NAME,
        "UserIsRequestor": True, "RoleIDCode": {
            "csd-code": "110152", "codeSystemName": "DCM",
            "originalText": "Destination Role ID"}}
    assert event["ActiveParticipant"][-1]["UserID"] == folder.absolute().as_uri()
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    study, patient = event["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == ct.StudyInstanceUID
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": ct.SOPClassUID, "NumberOfInstances": 1}]
    assert patient["ParticipantObjectID"].split("^")[0] == ct.PatientID
    assert b"DOE" not in trail.read_bytes() and b".dcm" not in trail.read_bytes()


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


def test_a_file_rewritten_after_it_was_read_is_left_for_the_next_scan(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewritten in place between the read and the delete: the new content is not lost
    (neither deleted nor archived); later scans store it."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    path = folder / "ct.dcm"
    path.write_bytes(ct_bytes)
    other = pydicom.dcmread(sample("CT_small.dcm"))
    other.StudyInstanceUID = "1.2.826.0.1.3680043.10.543.99"
    other.SOPInstanceUID = "1.2.826.0.1.3680043.10.543.99.1"
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    store = services.ingest.store_bytes

    def store_then_rewrite(data: bytes, **kwargs: object) -> object:
        result = store(data, **kwargs)
        other.save_as(path)  # the same name and inode, new content
        return result

    watcher.scan()
    monkeypatch.setattr(services.ingest, "store_bytes", store_then_rewrite)
    handled = watcher.scan()
    assert [(h.disposition, h.reason) for h in handled] == [
        (Disposition.RETRY, "changed after it was read")]
    assert pydicom.dcmread(path).StudyInstanceUID == other.StudyInstanceUID
    monkeypatch.undo()
    assert watcher.scan() == []  # changed since the last look: once more
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert not path.exists()
    assert study_uids(services, other.StudyInstanceUID) == [other.StudyInstanceUID]


@pytest.mark.parametrize("after_store", ["archive", "delete"])
def test_a_file_replaced_after_it_was_read_is_not_moved(
        services: Services, folder: Path, ct_bytes: bytes, after_store: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = UploadWatcher(services.ingest, folder, after_store=after_store,
                            writers=nobody_writes)
    path = folder / "ct.dcm"
    path.write_bytes(ct_bytes)
    store = services.ingest.store_bytes

    def store_then_replace(data: bytes, **kwargs: object) -> object:
        result = store(data, **kwargs)
        (folder / "new.tmp").write_bytes(b"a newer upload under the same name")
        os.replace(folder / "new.tmp", path)  # write-then-rename over it
        return result

    watcher.scan()
    monkeypatch.setattr(services.ingest, "store_bytes", store_then_replace)
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert path.read_bytes() == b"a newer upload under the same name"
    assert not (folder / "archive").exists()


def _never_stored(services: Services, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    stored: list[bytes] = []
    monkeypatch.setattr(services.ingest, "store_bytes",
                        lambda data, **kwargs: stored.append(data))
    return stored


def test_a_link_to_a_system_file_is_moved_aside_as_a_link_never_read(
        services: Services, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    stored = _never_stored(services, monkeypatch)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "passwd.dcm").symlink_to("/etc/passwd")
    watcher.scan()
    handled = watcher.scan()
    assert [h.disposition for h in handled] == [Disposition.REJECTED]
    assert "link" in handled[0].reason
    assert stored == [] and Path("/etc/passwd").read_bytes() == passwd
    moved = folder / "rejected" / "sub" / "passwd.dcm"
    assert moved.is_symlink() and os.readlink(moved) == "/etc/passwd"
    assert "links are not followed" in (
        folder / "rejected" / "sub" / ("passwd.dcm" + REASON_SUFFIX)).read_text()


def test_a_linked_folder_is_not_entered(services: Services, folder: Path, tmp_path: Path,
                                        ct_bytes: bytes, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ct.dcm").write_bytes(ct_bytes)
    stored = _never_stored(services, monkeypatch)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "cd").symlink_to(outside)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert stored == [] and (outside / "ct.dcm").read_bytes() == ct_bytes
    assert (folder / "rejected" / "cd").is_symlink()


def test_a_folder_swapped_for_a_link_is_not_read_through(
        services: Services, folder: Path, tmp_path: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder replaced by a link between the scan and the read: the read, reached
    one component at a time without following links, never gets through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ct.dcm").write_bytes(ct_bytes)
    stored = _never_stored(services, monkeypatch)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "cd").mkdir(parents=True)
    (folder / "cd" / "ct.dcm").write_bytes(ct_bytes)
    watcher.scan()
    candidates = list(watcher._candidates())
    (folder / "cd" / "ct.dcm").unlink()
    (folder / "cd").rmdir()
    (folder / "cd").symlink_to(outside)
    monkeypatch.setattr(watcher, "_candidates", lambda: iter(candidates))
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert stored == [] and (outside / "ct.dcm").read_bytes() == ct_bytes


def test_links_planted_in_rejected_are_not_written_through(
        services: Services, folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "rejected").symlink_to(outside)
    (folder / "junk.dcm").write_bytes(b"not DICOM")
    watcher.scan()
    # The link itself moved aside (into a real rejected/), nothing written through it.
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert list(outside.iterdir()) == [] and not (folder / "junk.dcm").exists()
    assert (folder / "rejected" / "rejected").is_symlink()
    # A reason file's name taken by a link: the rejected file gets another name.
    (folder / "more.dcm").write_bytes(b"not DICOM either")
    (folder / "rejected" / ("more.dcm" + REASON_SUFFIX)).symlink_to(outside / "written")
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert not (outside / "written").exists()
    assert "not a DICOM" in (folder / "rejected" / ("more.dcm.1" + REASON_SUFFIX)).read_text()


def test_a_file_over_the_object_limit_is_rejected_unread(
        services: Services, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8 GiB (sparse) upload with PACS_MAX_OBJECT_BYTES at 2 GiB: refused by its size,
    never read (reading it would take 8 GiB of memory)."""
    stored = _never_stored(services, monkeypatch)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes,
                            max_object_bytes=2 * 2**30)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "huge.dcm", "wb") as huge:
        huge.truncate(8 * 2**30)
    watcher.scan()
    handled = watcher.scan()
    assert [h.disposition for h in handled] == [Disposition.REJECTED]
    assert "PACS_MAX_OBJECT_BYTES" in handled[0].reason and stored == []
    assert (folder / "rejected" / "huge.dcm").stat().st_size == 8 * 2**30
    assert "PACS_MAX_OBJECT_BYTES" in (
        folder / "rejected" / ("huge.dcm" + REASON_SUFFIX)).read_text()


def test_a_name_that_is_not_utf8_is_rejected_and_the_scan_goes_on(
        services: Services, folder: Path, ct_bytes: bytes) -> None:
    """A name with a byte UTF-8 cannot decode and a newline: its reason file names it
    on one line, escaped, and the files after it are still handled."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    odd = "a\udcff\nb.dcm"  # the bytes a, 0xFF, newline, b.dcm, as Python names them
    (folder / odd).write_bytes(b"junk")
    (folder / "z.dcm").write_bytes(ct_bytes)
    watcher.scan()
    handled = {h.path.name: h.disposition for h in watcher.scan()}
    assert handled == {odd: Disposition.REJECTED, "z.dcm": Disposition.STORED}
    reason = (folder / "rejected" / ("a\udcff\nb.dcm" + REASON_SUFFIX)).read_text()
    assert reason.splitlines()[0] == "file: a\\xff\\nb.dcm"


def test_an_unexpected_failure_on_one_file_leaves_the_others_handled(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "a.dcm").write_bytes(b"first")
    (folder / "b.dcm").write_bytes(ct_bytes)
    store = services.ingest.store_bytes

    def fails_on_the_first(data: bytes, **kwargs: object) -> object:
        if data == b"first":
            raise RuntimeError("a fault of the code, not of the file")
        return store(data, **kwargs)

    monkeypatch.setattr(services.ingest, "store_bytes", fails_on_the_first)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY,
                                                        Disposition.STORED]
    assert (folder / "a.dcm").exists() and not (folder / "b.dcm").exists()


def test_a_fault_met_at_every_scan_logs_its_traceback_once(
        services: Services, folder: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "a.dcm").write_bytes(b"first")

    def fails(data: bytes, **kwargs: object) -> object:
        raise RuntimeError("a fault of the code, not of the file")

    monkeypatch.setattr(services.ingest, "store_bytes", fails)
    with caplog.at_level(logging.INFO, logger="pacs.node.uploads"):
        for _ in range(6):
            watcher.scan()
    faults = [r for r in caplog.records if r.getMessage().startswith("could not handle")]
    assert [r.levelname for r in faults] == ["ERROR"] and faults[0].exc_info


def test_a_name_too_long_for_its_reason_file_is_rejected_under_a_shorter_one(
        services: Services, folder: Path) -> None:
    """Its reason file could not be named after it (name and ``.reason.txt`` over 255
    bytes): the file moves aside under a name cut to fit, its reason names it whole,
    and it is not read again."""
    long = "\u00e9" * 121 + ".dcm"  # 246 bytes in UTF-8
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / long).write_bytes(b"junk")
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    moved = sorted(p.name for p in (folder / "rejected").iterdir())
    assert len(moved) == 2 and all(len(os.fsencode(name)) <= 255 for name in moved)
    reason = next(name for name in moved if name.endswith(REASON_SUFFIX))
    assert (folder / "rejected" / reason).read_text().splitlines()[0] == f"file: {long}"
    assert watcher.scan() == [] and not (folder / long).exists()


def _with_byte_change(data: bytes, old: bytes, new: bytes) -> bytes:
    at = data.index(old)
    return data[:at] + new + data[at + len(new):]


def test_a_value_that_does_not_decode_is_indexed_as_unknown_and_stored(
        services: Services, folder: Path, ct_bytes: bytes) -> None:
    """Modality with a VR pydicom does not know (ZZ): stored as sent, its Modality
    unknown in the index; a Specific Character Set with a NUL in a term: rejected as
    unreadable, with its reason (neither is retried at every scan)."""
    header = pydicom.dcmread(sample("CT_small.dcm"))
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    odd_vr = _with_byte_change(ct_bytes, b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00ZZ")
    (folder / "vr.dcm").write_bytes(odd_vr)
    charset = header.SpecificCharacterSet
    assert charset == "ISO_IR 100"
    nul = _with_byte_change(ct_bytes, b"ISO_IR 100", b"ISO_IR\x00100")
    (folder / "sub").mkdir()
    (folder / "sub" / "charset.dcm").write_bytes(nul)
    watcher.scan()
    handled = {h.path.name: h.disposition for h in watcher.scan()}
    assert handled == {"vr.dcm": Disposition.STORED, "charset.dcm": Disposition.REJECTED}
    assert study_uids(services, header.StudyInstanceUID) == [header.StudyInstanceUID]
    reason = (folder / "rejected" / "sub" / ("charset.dcm" + REASON_SUFFIX)).read_text()
    assert "Specific Character Set does not decode" in reason
    assert watcher.scan() == []


def test_a_reason_that_cannot_be_written_still_reports_the_move(
        services: Services, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Moved to rejected/ but the reason file fails (a full disk): the file is where
    the report says, rejected, not reported as left in place."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "junk.dcm").write_bytes(b"junk")

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(watcher, "_write_reason", disk_full)
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert (folder / "rejected" / "junk.dcm").exists()


def test_a_link_to_a_device_others_write_is_rejected(services: Services,
                                                      folder: Path) -> None:
    """With the real writer check: /dev/null is open for writing by many processes, but
    a link to it is a link, moved aside; it does not wait for ever for them to close it."""
    watcher = UploadWatcher(services.ingest, folder)
    (folder / "null.dcm").symlink_to("/dev/null")
    with open("/dev/null", "wb"):
        watcher.scan()
        assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_fifo_or_socket_is_rejected_unopened(services: Services, folder: Path,
                                                kind: str) -> None:
    """A FIFO without a writer would block an ordinary open for ever."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    if kind == "fifo":
        os.mkfifo(folder / "odd.dcm")
    else:
        socket.socket(socket.AF_UNIX).bind(str(folder / "odd.dcm"))
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.REJECTED]
    assert not (folder / "odd.dcm").exists()
    assert "not a regular file" in (folder / "rejected" / ("odd.dcm" + REASON_SUFFIX)
                                    ).read_text()


def test_a_file_that_cannot_be_read_is_warned_about_once(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Unreadable (its permissions): left in place and tried again every scan, but one
    WARNING line, not one per scan."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "closed.dcm").write_bytes(ct_bytes)
    real_open = os.open

    def denied(name: object, flags: int, *args: object, **kwargs: object) -> int:
        if name == "closed.dcm":
            raise PermissionError(13, "Permission denied")
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(uploads.os, "open", denied)
    with caplog.at_level(logging.DEBUG, logger="pacs.node.uploads"):
        for _ in range(4):
            watcher.scan()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "cannot read an uploaded file (Permission denied); will retry"]
    assert (folder / "closed.dcm").exists()


def test_the_upload_folder_swapped_for_a_link_to_another_is_not_scanned(
        services: Services, folder: Path, tmp_path: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The upload folder itself replaced, while the node runs, by a link to another
    customer's upload folder: nothing of that folder is stored as this customer's (nor
    deleted from it), said once; read through the paths listed before the swap, each
    file is refused at the link.  Back in place, the folder is scanned again."""
    other = tmp_path / "other-customer"
    other.mkdir()
    (other / "ct.dcm").write_bytes(ct_bytes)
    stored = _never_stored(services, monkeypatch)
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "mine.dcm").write_bytes(ct_bytes)
    watcher.scan()
    listed = list(watcher._candidates())
    folder.rename(tmp_path / "put-aside")
    folder.symlink_to(other)
    with caplog.at_level(logging.INFO, logger="pacs.node.uploads"):
        for _ in range(3):
            assert watcher.scan() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "the upload folder is now a link or leads elsewhere than when the node started; "
        "not scanned"]
    with monkeypatch.context() as patched:
        patched.setattr(watcher, "_candidates",
                        lambda: iter([(folder / "ct.dcm", listed[0][1])]))
        watcher._previous = {folder / "ct.dcm": listed[0][1]}
        assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert stored == [] and (other / "ct.dcm").read_bytes() == ct_bytes
    folder.unlink()
    (tmp_path / "put-aside").rename(folder)
    assert [h.path.name for h in watcher.scan()] == []  # seen once: waits for a second
    assert len(watcher._previous) == 1


def test_a_folder_that_cannot_be_listed_is_warned_about_once(
        services: Services, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Folders nested past PATH_MAX: the deepest cannot be listed; said once, not
    passed over in silence, nor said every scan."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    nest_past_path_max(folder)
    with caplog.at_level(logging.INFO, logger="pacs.node.uploads"):
        for _ in range(3):
            assert watcher.scan() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "cannot list a folder below the upload folder (File name too long); what it "
        "holds waits"]


def test_a_scan_stops_between_files_when_asked(services: Services, folder: Path,
                                               ct_bytes: bytes) -> None:
    """Thousands of files in one scan do not hold up a stop: it ends between files."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    for number in range(3):
        (folder / f"{number}.dcm").write_bytes(ct_bytes)
    watcher.scan()
    stopping = threading.Event()
    stopping.set()
    assert watcher.scan(stopping) == []
    assert len(list(folder.glob("*.dcm"))) == 3


def test_a_file_swapped_for_a_folder_is_not_moved_aside(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced by a folder of new uploads between the scan and the read: the
    folder is left to be walked, not moved to rejected/ with all it holds."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes)
    (folder / "cd").write_bytes(b"x")
    watcher.scan()
    candidates = list(watcher._candidates())
    (folder / "cd").unlink()
    (folder / "cd").mkdir()
    (folder / "cd" / "ct.dcm").write_bytes(ct_bytes)
    monkeypatch.setattr(watcher, "_candidates", lambda: iter(candidates))
    assert [h.disposition for h in watcher.scan()] == [Disposition.RETRY]
    assert (folder / "cd" / "ct.dcm").exists() and not (folder / "rejected").exists()


def test_a_full_disk_while_archiving_loses_nothing(
        services: Services, folder: Path, ct_bytes: bytes,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Stored, then the move to archive/ fails (no space for its folder): the file stays
    in the upload folder, its move tried again by later scans (said once), and archived
    once there is room.  It is not stored again: each store was a Data Import event
    of the audit trail, one every other scan for as long as the move failed."""
    watcher = UploadWatcher(services.ingest, folder, after_store="archive",
                            writers=nobody_writes)
    (folder / "cd").mkdir()
    (folder / "cd" / "ct.dcm").write_bytes(ct_bytes)
    stores: list[bytes] = []
    store = services.ingest.store_bytes

    def counted(data: bytes, **kwargs: Any) -> Any:
        stores.append(data)
        return store(data, **kwargs)

    monkeypatch.setattr(services.ingest, "store_bytes", counted)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uploads.os, "mkdir", no_space)
    with caplog.at_level(logging.INFO, logger="pacs.node.uploads"):
        for _ in range(3):
            watcher.scan()
            assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert (folder / "cd" / "ct.dcm").read_bytes() == ct_bytes
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "stored an uploaded file but could not archive it: No space left on device"]
    monkeypatch.undo()
    watcher.scan()
    assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
    assert (folder / "archive" / "cd" / "ct.dcm").read_bytes() == ct_bytes
    assert not (folder / "cd" / "ct.dcm").exists()
    assert len(stores) == 1


def test_a_small_upload_is_read_without_asking_for_the_limit(
        services: Services, folder: Path, ct_bytes: bytes) -> None:
    """With ``PACS_MAX_OBJECT_BYTES`` at 1 GiB, a 40 KB upload asks for about its size,
    not for the limit (which a host without memory overcommit refuses)."""
    watcher = UploadWatcher(services.ingest, folder, writers=nobody_writes,
                            max_object_bytes=1 << 30)
    (folder / "ct.dcm").write_bytes(ct_bytes)
    watcher.scan()
    tracemalloc.start()
    try:
        assert [h.disposition for h in watcher.scan()] == [Disposition.STORED]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
