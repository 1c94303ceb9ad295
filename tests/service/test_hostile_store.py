"""``pacs reindex`` and ``pacs fsck`` over a folder store that holds what no write of
the node leaves: links, FIFOs, devices, files larger than any object.  Nothing is
opened in a way that waits, no link is followed, no object is read past
``PACS_MAX_OBJECT_BYTES``, and each is reported rather than indexed."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import BinaryIO

import pytest

from pacs.core import config
from pacs.core.analysers import AnalyserPool
from pacs.core.errors import ForeignObject, ObjectTooLarge
from pacs.core.reconcile import Action, Problem, reconcile
from pacs.core.reindex import rebuild
from pacs.core.services import build, drain
from pacs.core.storage import is_object_key, object_key, read_bounded, read_object
from pacs.core.storage.filesystem import FileStore
from tests.factory import make_instance

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = STUDY + ".1"
#: The SOP Instance UIDs of the hostile entries, by what is at their key.
HOSTILE = {"fifo": SERIES + ".1", "link to a fifo": SERIES + ".2",
           "link to /dev/zero": SERIES + ".3", "link outside": SERIES + ".4",
           "too large": SERIES + ".5"}


def _key(sop: str) -> str:
    return object_key(STUDY, SERIES, sop)


def _plant(root: Path, outside: Path) -> dict[str, str]:
    """The hostile entries at object keys; their keys by kind."""
    (root / STUDY / SERIES).mkdir(parents=True, exist_ok=True)
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    os.mkfifo(root / _key(HOSTILE["fifo"]))
    (root / _key(HOSTILE["link to a fifo"])).symlink_to(outside / "fifo")
    (root / _key(HOSTILE["link to /dev/zero"])).symlink_to("/dev/zero")
    linked = make_instance(StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                           SOPInstanceUID=HOSTILE["link outside"])
    (outside / "linked.dcm").write_bytes(linked)
    (root / _key(HOSTILE["link outside"])).symlink_to(outside / "linked.dcm")
    with open(root / _key(HOSTILE["too large"]), "wb") as large:
        large.write(bytes(128) + b"DICM")  # a Part 10 head: read on, to the limit
        large.truncate(8 << 20)  # sparse: past the limit below without using the disk
    return {kind: _key(sop) for kind, sop in HOSTILE.items()}


@pytest.fixture
def limited(settings: config.Settings) -> config.Settings:
    return settings.with_overrides(max_object_bytes=4 << 20)


def test_reindex_reports_what_it_cannot_use_and_indexes_the_rest(
        limited: config.Settings, tmp_path: Path) -> None:
    services = build(limited)
    services.ingest.store_bytes(make_instance())
    drain(services)
    services.close()
    planted = _plant(limited.objects_dir, tmp_path / "outside")
    store = FileStore(limited.objects_dir)
    report = rebuild(limited.index_path, store,
                     AnalyserPool(0, limited.max_object_bytes), readers=2)
    assert report.indexed == 1
    reasons = {skipped.key: skipped.reason for skipped in report.skipped}
    assert set(reasons) == set(planted.values())
    for kind in ("fifo", "link to a fifo", "link to /dev/zero", "link outside"):
        assert "not a regular file" in reasons[planted[kind]], kind
    assert "PACS_MAX_OBJECT_BYTES" in reasons[planted["too large"]]


def test_fsck_reports_what_it_cannot_use_and_moves_it_aside_as_it_is(
        limited: config.Settings, tmp_path: Path) -> None:
    services = build(limited)
    try:
        services.ingest.store_bytes(make_instance())
        drain(services)
        planted = _plant(limited.objects_dir, tmp_path / "outside")
        report = reconcile(services, repair=True)
    finally:
        services.close()
    found = {f.key: f for f in report.findings}
    assert set(found) == set(planted.values())
    assert {(f.problem, f.action, f.done) for f in found.values()} == {
        (Problem.UNREADABLE, Action.QUARANTINE, True)}
    moved = Path(found[planted["link outside"]].moved_to)
    assert moved.is_symlink() and (tmp_path / "outside" / "linked.dcm").is_file()
    assert "PACS_MAX_OBJECT_BYTES" in found[planted["too large"]].note


def test_a_key_that_climbs_out_of_the_store_is_refused() -> None:
    for key in ("../1.2/3.dcm", "../../..dcm", "1.2/../3.dcm", "1..2/3/4.dcm",
                "1/2/3.dcm\n", ".1/2/3.dcm"):
        assert not is_object_key(key), key
    assert is_object_key(_key(SERIES + ".9"))


def test_a_link_at_a_key_is_not_read_through(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    (tmp_path / "objects" / STUDY / SERIES).mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"not the store's")
    (tmp_path / "objects" / _key(SERIES + ".9")).symlink_to(tmp_path / "secret")
    with pytest.raises(ForeignObject):
        store.open(_key(SERIES + ".9"))
    # Nor handed out as a file to send by its path (C-GET, C-MOVE).
    assert store.local_file(_key(SERIES + ".9")) is None
    os.mkfifo(tmp_path / "objects" / _key(SERIES + ".8"))
    assert store.local_file(_key(SERIES + ".8")) is None
    assert store.local_file(_key(SERIES + ".7")) == tmp_path / "objects" / _key(SERIES + ".7")


def test_an_indexed_object_replaced_by_a_link_is_reported_and_left(
        limited: config.Settings, tmp_path: Path) -> None:
    services = build(limited)
    try:
        data = make_instance(StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                             SOPInstanceUID=SERIES + ".8")
        services.ingest.store_bytes(data)
        drain(services)
        path = limited.objects_dir / _key(SERIES + ".8")
        (tmp_path / "copy.dcm").write_bytes(data)
        path.unlink()
        path.symlink_to(tmp_path / "copy.dcm")
        report = reconcile(services, repair=True)
    finally:
        services.close()
    assert not report.ok and report.findings == []
    assert report.errors == [f"{_key(SERIES + '.8')}: not a regular file (a link, FIFO, "
                             "socket or device the store never wrote); not read"]
    assert path.is_symlink()


def test_fsck_reads_an_indexed_object_no_further_than_its_acknowledged_size(
        limited: config.Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An indexed object grown by 1 GiB (sparse): its checksum is not taken over the
    whole of it; fsck reads past the row's size by one chunk at most, and reports it
    damaged (too large to be a later write of the instance)."""
    services = build(limited)
    read: list[int] = []
    opened = FileStore.open

    def counted(store: FileStore, key: str) -> BinaryIO:
        stream = opened(store, key)
        real = stream.read

        def read_counted(size: int = -1) -> bytes:
            chunk = real(size)
            read.append(len(chunk))
            return chunk

        stream.read = read_counted  # type: ignore[method-assign]
        return stream

    try:
        data = make_instance(StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                             SOPInstanceUID=SERIES + ".7")
        services.ingest.store_bytes(data)
        drain(services)
        with open(limited.objects_dir / _key(SERIES + ".7"), "ab") as grown:
            grown.truncate(len(data) + (1 << 30))
        monkeypatch.setattr(FileStore, "open", counted)
        report = reconcile(services, repair=True)
    finally:
        services.close()
    assert [(f.problem, f.action) for f in report.findings] == [(Problem.DAMAGED,
                                                                Action.NONE)]
    assert "PACS_MAX_OBJECT_BYTES" in report.findings[0].note
    assert sum(read) < 3 * (len(data) + (1 << 20)) + (4 << 20) + 1


def test_files_not_at_an_object_key_are_reported_not_read(
        limited: config.Settings) -> None:
    """Objects copied to the wrong depth, a note, a name with a newline: neither fsck
    nor reindex reads them, and both say so (fsck leaves them: no repair by guessing);
    temporary files are not among them."""
    services = build(limited)
    try:
        services.ingest.store_bytes(make_instance())
        drain(services)
        root = limited.objects_dir
        data = make_instance(StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
                             SOPInstanceUID=SERIES + ".6")
        (root / (SERIES + ".6.dcm")).write_bytes(data)  # flattened by a copy
        (root / STUDY).mkdir()
        (root / STUDY / "notes\n.txt").write_text("x")
        (root / STUDY / ".tmp-interrupted").write_bytes(b"x")
        report = reconcile(services, repair=True)
    finally:
        services.close()
    strays = [SERIES + ".6.dcm", STUDY + "/notes\\n.txt"]
    assert report.ok and report.strays[0] == 2
    lines = list(report.lines())
    assert sorted(line.strip() for line in lines if line.startswith("  ")) == strays
    assert (root / (SERIES + ".6.dcm")).exists()
    rebuilt = rebuild(limited.index_path, FileStore(root),
                      AnalyserPool(0, limited.max_object_bytes))
    assert rebuilt.indexed == 1 and rebuilt.strays[0] == 2
    assert sorted(line.strip() for line in rebuilt.lines() if line.startswith("  ")
                  ) == strays
    assert rebuilt.as_json()["strays"]["count"] == 2


def test_a_small_object_is_read_without_asking_for_the_limit(tmp_path: Path) -> None:
    """``read(limit + 1)`` allocates ``limit`` bytes first: 1 GiB for a 10-byte file."""
    store = FileStore(tmp_path / "objects")
    key = _key(SERIES + ".9")
    (tmp_path / "objects" / STUDY / SERIES).mkdir(parents=True)
    (tmp_path / "objects" / key).write_bytes(b"0123456789")
    tracemalloc.start()
    try:
        assert read_object(store, key, 1 << 30) == b"0123456789"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_what_is_no_part10_object_is_read_no_further_than_its_head(tmp_path: Path) -> None:
    """A sparse file of 1 GiB at an object key (nothing on disk, no DICM prefix): the
    tools that read every object read its first 132 bytes, which say it is none, and
    hold nothing more; a Part 10 object is read whole."""
    store = FileStore(tmp_path / "objects")
    (tmp_path / "objects" / STUDY / SERIES).mkdir(parents=True)
    sparse, small = _key(SERIES + ".7"), _key(SERIES + ".8")
    with open(tmp_path / "objects" / sparse, "wb") as out:
        out.truncate(1 << 30)
    part10 = bytes(128) + b"DICM" + b"rest of the object"
    (tmp_path / "objects" / small).write_bytes(part10)
    tracemalloc.start()
    try:
        assert read_object(store, sparse, 2 << 30) == bytes(132)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert read_object(store, small, 2 << 30) == part10
    with pytest.raises(ObjectTooLarge):
        read_object(store, small, 140)


def test_a_file_grown_while_read_is_read_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    with open(path, "rb") as stream:
        with open(path, "ab") as more:
            more.write(b"y" * 100)
        assert read_bounded(stream, 50) == b"x" * 10 + b"y" * 41
    with open(path, "rb") as stream:
        assert read_bounded(stream, 1000) == b"x" * 10 + b"y" * 100
