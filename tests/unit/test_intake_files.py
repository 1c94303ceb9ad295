"""The intake's files (:class:`pacs.core.intake.IntakeFiles`): an object over
``BLOB_BYTES`` acknowledged through the intake is a synced file of its own name before
the one commit that holds its rows, readable at once, moved like a blob, and no file
outlives the row that names it (moved, replaced, removed, a commit that failed, a
crash's leftovers)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable

import apsw
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from pacs.core import audit
from pacs.core.deletion import Target, reference
from pacs.core.errors import IndexFailure, IntakeFull
from pacs.core.index import reads
from pacs.core.index.connection import Index
from pacs.core.ingest import Ingest, Received
from pacs.core.intake import BLOB_BYTES, FILES_FOLDER, file_name
from pacs.core.services import Services, drain, mover
from pacs.core.storage.memory import MemoryStore
from tests.conftest import sample
from tests.unit.test_intake import read_across_a_move

SOP = "1.2.826.0.1.3680043.8.498.7"
NODE = audit.Participant("test", True)


def large(sop: str = SOP, fill: int = 1, **changes: str) -> bytes:
    """A CT object of 512 x 512 pixels (over ``BLOB_BYTES``)."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes([fill]) * (512 * 512 * 2)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert len(data) > BLOB_BYTES
    return data


def files(services: Services) -> list[str]:
    folder = services.settings.data_dir / FILES_FOLDER
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def read(services: Services, key: str) -> bytes:
    with services.store.open(key) as stream:
        return stream.read()


@pytest.fixture
def node(make_services: Callable[..., Services]) -> Services:
    """A node on a store without local files, whose intake takes CT slices (as S3's)."""
    return make_services(store=MemoryStore(), intake_object_bytes=64 << 20)


def _key(services: Services, sop: str = SOP) -> str:
    found = reads.lookup(services.index.connection(), sop)
    assert found is not None
    return found.object_key


def test_the_file_is_synced_and_named_before_the_one_commit_of_its_rows(
        node: Services) -> None:
    data = large()
    seen: list[tuple[str, list[str], str]] = []
    conn = node.index.connection()
    level = conn.pragma("synchronous")

    def committed() -> bool:
        seen.append(("commit", files(node), "FULL" if level == 2 else str(level)))
        return False

    conn.set_commit_hook(committed)
    node.ingest.store_bytes(data)
    conn.set_commit_hook(None)
    key = _key(node)
    name = file_name(key, reads.lookup(conn, SOP).checksum)  # type: ignore[union-attr]
    assert seen == [("commit", [name], "FULL")]
    entry = reads.intake_entry(conn, key)
    assert entry is not None and entry.in_file and entry.size == len(data)
    assert (node.settings.data_dir / FILES_FOLDER / name).read_bytes() == data
    assert read(node, key) == data  # read your writes
    assert node.store.backend.objects == {}  # type: ignore[attr-defined]


def test_a_small_object_stays_a_blob(node: Services) -> None:
    data = dcmread(sample("CT_small.dcm"))
    out = DicomBytesIO()
    data.save_as(out, enforce_file_format=True)
    node.ingest.store_bytes(out.getvalue())
    [key] = reads.intake_keys(node.index.connection())
    entry = reads.intake_entry(node.index.connection(), key)
    assert entry is not None and not entry.in_file
    assert files(node) == []


def test_the_mover_puts_it_then_removes_row_and_file(node: Services) -> None:
    data = large()
    node.ingest.store_bytes(data)
    key = _key(node)
    assert drain(node) == 1
    assert node.store.backend.objects[key] == data  # type: ignore[attr-defined]
    assert reads.intake_keys(node.index.connection()) == []
    assert files(node) == []
    assert read(node, key) == data


def test_a_read_outlives_the_move_of_its_file(node: Services) -> None:
    """A file once open stays readable when the mover removes it."""
    read_across_a_move(node, large())
    assert files(node) == []


def test_an_overwrite_in_place_keeps_the_old_file_until_its_own_commit(
        node: Services) -> None:
    """The new version has a file of its own name: the acknowledged bytes are never
    overwritten before the commit that replaces them; then the old file goes."""
    first, second = large(fill=1), large(fill=2)
    node.ingest.store_bytes(first)
    [old_name] = files(node)
    seen: list[list[str]] = []
    conn = node.index.connection()
    conn.set_commit_hook(lambda: seen.append(files(node)) or False)
    node.ingest.store_bytes(second)
    conn.set_commit_hook(None)
    assert len(seen) == 1 and old_name in seen[0] and len(seen[0]) == 2
    key = _key(node)
    assert files(node) == [file_name(key, reads.lookup(conn, SOP).checksum)]  # type: ignore[union-attr]
    assert read(node, key) == second
    drain(node)
    assert node.store.backend.objects[key] == second  # type: ignore[attr-defined]


def test_a_moved_instance_leaves_no_file_behind(node: Services) -> None:
    node.ingest.store_bytes(large())
    node.ingest.store_bytes(large(SeriesInstanceUID="1.2.826.0.1.3680043.8.498.99"))
    key = _key(node)
    assert key.split("/")[1] == "1.2.826.0.1.3680043.8.498.99"
    assert reads.intake_keys(node.index.connection()) == [key]
    assert len(files(node)) == 1


def test_a_failed_commit_leaves_no_file(node: Services,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: Index, work: Callable[[apsw.Connection], None]) -> None:
        raise IndexFailure("index commit failed: disk I/O error")

    monkeypatch.setattr(Index, "commit", failing)
    with pytest.raises(IndexFailure):
        node.ingest.store_bytes(large())
    assert files(node) == []
    assert reads.lookup(node.index.connection(), SOP) is None


def test_a_removal_takes_the_file_with_the_rows(node: Services) -> None:
    node.ingest.store_bytes(large())
    key = _key(node)
    study, series = key.split("/")[:2]
    rows = node.deleter.plan([Target(study, series)])
    removal = node.deleter.remove([reference(row) for row in rows], NODE,
                                  audit.APPLICATION_SERVER)
    assert removal.instances == 1
    assert files(node) == [] and reads.intake_keys(node.index.connection()) == []


def test_a_stow_batch_writes_its_files_before_its_commit(node: Services) -> None:
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in (11, 12)]
    items = [Received.of(large(uid), None) for uid in uids]
    results = node.ingest.store_batch(items)
    assert [result.sop_instance_uid for result in results] == uids  # type: ignore[union-attr]
    assert len(files(node)) == 2
    for uid, item in zip(uids, items, strict=True):
        assert read(node, _key(node, uid)) == item.data
    assert drain(node) == 2 and files(node) == []


def test_the_sweep_removes_what_no_row_names_and_old_temporaries(node: Services) -> None:
    node.ingest.store_bytes(large())
    [kept] = files(node)
    folder = node.settings.data_dir / FILES_FOLDER
    stray = folder / file_name("1.2/1.3/1.2.826.0.1.3680043.8.498.5.dcm", "ab" * 32)
    stray.write_bytes(b"left by a crash before its commit")
    old, young = folder / ".tmp-0123456789abcdef", folder / ".tmp-fedcba9876543210"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (folder / "not-an-intake-file").write_bytes(b"z")
    node.store.backend.objects["elsewhere"] = b""  # type: ignore[attr-defined]

    removed = mover(node).sweep()
    assert removed == 2
    assert sorted(os.listdir(folder)) == sorted([kept, young.name, "not-an-intake-file"])
    assert read(node, _key(node)) == large()


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_lost_file_is_reported_passed_over_and_never_put(node: Services,
                                                          damage: str) -> None:
    """Its row stays (nothing of it is in the store), the mover's error says so, and
    the objects after it are moved all the same."""
    from pacs.core.errors import NotFound

    node.ingest.store_bytes(large())
    key = _key(node)
    [name] = files(node)
    path = node.settings.data_dir / FILES_FOLDER / name
    if damage == "missing":
        path.unlink()
        with pytest.raises(NotFound):
            node.store.open(key)
    else:
        path.write_bytes(b"not what was acknowledged")
    after = large("1.2.826.0.1.3680043.8.498.8")
    node.ingest.store_bytes(after)
    assert drain(node) == 1
    assert node.store.backend.objects == {_key(node, "1.2.826.0.1.3680043.8.498.8"): after}  # type: ignore[attr-defined]
    assert reads.intake_keys(node.index.connection()) == [key]
    state = reads.intake_state(node.index.connection())
    assert state.mover_error is not None and "whose file" in state.mover_error


def test_a_move_whose_row_removal_was_lost_is_finished_without_a_put(
        node: Services) -> None:
    """The store holds the object with the row's checksum and the file is gone (a
    power failure after the file's removal, before the row's was on disk): the row
    goes, nothing is put again."""
    data = large()
    node.ingest.store_bytes(data)
    key = _key(node)
    [name] = files(node)
    node.store.backend.put(key, io.BytesIO(data), len(data))
    (node.settings.data_dir / FILES_FOLDER / name).unlink()
    puts: list[str] = []
    backend = node.store.backend
    original = backend.put
    backend.put = lambda k, source, length: (puts.append(k), original(k, source, length))  # type: ignore[method-assign]
    assert mover(node).move_batch() == 1
    assert puts == [] and reads.intake_keys(node.index.connection()) == []
    assert read(node, key) == data


def test_the_mover_syncs_the_removal_of_rows_before_their_files_go(
        node: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    node.ingest.store_bytes(large())
    asked: list[bool] = []
    write = Index.write

    def recorded(self: Index, synced: bool = False):  # type: ignore[no-untyped-def]
        asked.append(synced)
        return write(self, synced)

    monkeypatch.setattr(Index, "write", recorded)
    assert mover(node).move_batch() == 1
    assert asked == [True] and files(node) == []


def test_a_commit_that_went_through_keeps_its_file(node: Services,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that failed to say it committed: the file its row names stays."""
    commit = Index.commit

    def committed_then_failed(self: Index, work: Callable[[apsw.Connection], None]) -> None:
        commit(self, work)
        raise IndexFailure("index commit failed: disk I/O error")

    monkeypatch.setattr(Index, "commit", committed_then_failed)
    data = large()
    with pytest.raises(IndexFailure):
        node.ingest.store_bytes(data)
    monkeypatch.undo()
    assert len(files(node)) == 1 and read(node, _key(node)) == data


def test_names_are_uid_and_checksum_only(node: Services) -> None:
    from pacs.core.errors import StorageError

    for bad in ("../x", "1.2.3", "1.2.3." + "g" * 64, "01.2." + "a" * 64):
        with pytest.raises(StorageError):
            node.store.files.open(bad)


def test_an_object_not_staged_is_written_to_its_file_before_the_commit(
        node: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext

    from pacs.core import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "staged", lambda _store, _data: nullcontext())
    data = large()
    node.ingest.store_bytes(data)
    [name] = files(node)
    assert (node.settings.data_dir / FILES_FOLDER / name).read_bytes() == data
    assert read(node, _key(node)) == data


def test_the_start_up_clean_up_removes_the_intake_folder_s_temporaries(
        node: Services) -> None:
    """Before any worker runs, a temporary file is an interrupted write's, however
    young (a DIMSE worker killed while it staged a slice)."""
    from pacs.core.reconcile import reconcile

    node.ingest.store_bytes(large())
    folder = node.settings.data_dir / FILES_FOLDER
    (folder / ".tmp-0123456789abcdef").write_bytes(b"cut short")
    report = reconcile(node, full=False)
    assert report.temporaries == 1
    assert len(files(node)) == 1 and read(node, _key(node)) == large()


def test_the_commit_asks_a_large_object_s_room_again(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores in flight at once all pass the check before their commits (here: one
    that passed while another's file was taking the last room); each intake file's
    room is asked again in its transaction, so the intake holds no more than
    ``PACS_INTAKE_MAX_BYTES`` and the refused file is gone, in one store and in a
    STOW-RS batch."""
    first = large()
    services = make_services(store=MemoryStore(), intake_object_bytes=64 << 20,
                             intake_max_bytes=len(first))
    services.ingest.store_bytes(first)
    monkeypatch.setattr(Ingest, "check_room", lambda *_args: None)
    with pytest.raises(IntakeFull):
        services.ingest.store_bytes(large("1.2.826.0.1.3680043.8.498.8", fill=2))
    monkeypatch.setattr(Ingest, "_room", lambda _self: None)
    [result] = services.ingest.store_batch(
        [Received.of(large("1.2.826.0.1.3680043.8.498.9", fill=3))])
    assert isinstance(result, IntakeFull)
    conn = services.index.connection()
    assert reads.intake_bytes(conn) == len(first)
    assert len(files(services)) == 1
    assert reads.lookup(conn, "1.2.826.0.1.3680043.8.498.8") is None
    # Both counted: the first reported at once, the second waiting for the interval.
    assert services.ingest.refusals._pending == 1
