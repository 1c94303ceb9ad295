"""Deflated data sets (PS3.5 A.5) inflated as a stream: the walk, its limits, and the
header pydicom gets (pacs.core.dataset.walk_deflated / read_part10)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from pacs.core import metadata
from pacs.core.dataset import (
    INFLATE_CHUNK,
    Inflater,
    check_complete,
    read_part10,
    walk_deflated,
)
from pacs.core.errors import ObjectTooLarge, UnreadableData
from pacs.core.ingest import analyse
from tests.conftest import sample


def deflate(raw: bytes) -> bytes:
    """Raw deflate (no zlib header), as PS3.5 A.5 prescribes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def header_elements() -> bytes:
    """A small explicit VR LE data set with the four identifying UIDs."""
    def ui(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" * (len(raw) % 2)

    return (element(0x0008, 0x0016, b"UI", ui("1.2.840.10008.5.1.4.1.1.7"))
            + element(0x0008, 0x0018, b"UI", ui("1.2.3.4"))
            + element(0x0010, 0x0010, b"PN", b"DOE^JOHN")
            + element(0x0020, 0x000D, b"UI", ui("1.2.3.1"))
            + element(0x0020, 0x000E, b"UI", ui("1.2.3.2")))


def part10(dataset: bytes) -> bytes:
    """A Part 10 object whose file meta says Deflated Explicit VR LE, around the given
    (already deflated) data set bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset


def zeros_element(size: int, tag: tuple[int, int] = (0x0009, 0x1010)) -> bytes:
    """An OB element of ``size`` zero bytes (a private one by default)."""
    return struct.pack("<HH2sHI", tag[0], tag[1], b"OB", 0, size) + b"\0" * size


# --- the inflater ---------------------------------------------------------------------

def test_inflater_returns_chunks_and_counts() -> None:
    raw = bytes(range(256)) * 20_000  # 5 MB
    inflater = Inflater(memoryview(deflate(raw)), limit=None, chunk=1 << 16)
    pieces = []
    while piece := inflater.read():
        assert len(piece) <= 1 << 16
        pieces.append(piece)
    assert b"".join(pieces) == raw
    assert inflater.inflated == len(raw)


def test_inflater_stops_at_its_limit() -> None:
    inflater = Inflater(memoryview(deflate(b"\0" * (10 << 20))), limit=1 << 20,
                        chunk=1 << 16)
    with pytest.raises(ObjectTooLarge):
        while inflater.read():
            pass
    assert inflater.inflated <= (1 << 20) + (1 << 16)


def test_inflater_exact_limit_is_accepted() -> None:
    raw = b"\1" * 123_457
    inflater = Inflater(memoryview(deflate(raw)), limit=len(raw))
    assert inflater.read() == raw
    assert inflater.read() == b""


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_inflater_refuses_broken_streams(damage: str) -> None:
    stream = deflate(bytes(range(256)) * 4000)
    broken = stream[:len(stream) // 2] if damage == "truncated" else b"\xff" * 64 + stream
    inflater = Inflater(memoryview(broken), limit=None)
    with pytest.raises(UnreadableData):
        while inflater.read():
            pass


def test_bytes_after_the_deflate_stream_are_ignored() -> None:
    raw = header_elements()
    assert walk_deflated(memoryview(deflate(raw) + b"\0"), None).inflated == len(raw)


# --- the walk -------------------------------------------------------------------------

def test_walk_keeps_the_header_up_to_the_pixel_data() -> None:
    head = header_elements()
    pixels = element(0x7FE0, 0x0010, b"OW", b"\1\2" * 5000)
    trailer = element(0xFFFC, 0xFFFC, b"OB", b"\0" * 8)  # data set trailing padding
    walked = walk_deflated(memoryview(deflate(head + pixels + trailer)), None)
    assert walked.header == head
    assert walked.inflated == len(head) + len(pixels) + len(trailer)


def test_walk_keeps_everything_without_pixel_data() -> None:
    head = header_elements()
    assert walk_deflated(memoryview(deflate(head)), None).header == head


@pytest.mark.parametrize("cut", [1, 5, 9, 100])
def test_walk_refuses_a_truncated_data_set(cut: int) -> None:
    raw = header_elements() + element(0x7FE0, 0x0010, b"OW", b"\1\2" * 500)
    with pytest.raises(UnreadableData, match="truncated"):
        walk_deflated(memoryview(deflate(raw[:-cut])), None)


def test_walk_refuses_a_stray_item_delimiter() -> None:
    raw = header_elements() + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    with pytest.raises(UnreadableData):
        walk_deflated(memoryview(deflate(raw)), None)


def test_walk_follows_undefined_length_sequences_and_fragments() -> None:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    sequence = (struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
                + element(0x0008, 0x1150, b"UI", b"1.2\0") + item_end + seq_end)
    fragments = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # empty Basic Offset Table
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd" + seq_end)
    raw = header_elements() + sequence + fragments
    walked = walk_deflated(memoryview(deflate(raw)), None)
    assert walked.header == header_elements() + sequence
    with pytest.raises(UnreadableData):
        walk_deflated(memoryview(deflate(raw[:-8])), None)  # no sequence delimiter


def test_walk_over_its_limit_is_too_large() -> None:
    # Encapsulated fragments of undefined total length: only counting can tell.
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    fragment = struct.pack("<HHI", 0xFFFE, 0xE000, 1 << 20) + b"\0" * (1 << 20)
    raw = (header_elements() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
           + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + fragment * 8 + seq_end)
    stream = memoryview(deflate(raw))
    assert walk_deflated(stream, len(raw)).inflated == len(raw)  # exactly the limit
    with pytest.raises(ObjectTooLarge):
        walk_deflated(stream, len(raw) - 1)
    with pytest.raises(ObjectTooLarge):
        walk_deflated(stream, 4 << 20)


def test_an_element_longer_than_the_limit_is_refused_before_inflating() -> None:
    # Declares 1 GB and holds 16 bytes: refused from the declared length alone.
    raw = header_elements() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                          1 << 30) + b"\0" * 16
    with pytest.raises(ObjectTooLarge):
        walk_deflated(memoryview(deflate(raw)), 1 << 20)


def test_a_header_over_its_ceiling_is_too_large() -> None:
    raw = header_elements() + zeros_element(2 << 20)
    with pytest.raises(ObjectTooLarge, match="header"):
        walk_deflated(memoryview(deflate(raw)), None, header_limit=1 << 20)
    # Without a header to keep (check_complete), only the object limit applies.
    check_complete(memoryview(deflate(raw)), DeflatedExplicitVRLittleEndian)


def test_the_walk_of_a_bomb_holds_a_chunk_not_the_data_set() -> None:
    raw_size = 64 << 20
    stream = deflate(header_elements()
                     + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, raw_size)
                     + b"\0" * raw_size)
    assert len(stream) < raw_size // 500
    tracemalloc.start()
    try:
        walked = walk_deflated(memoryview(stream), None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert walked.inflated > raw_size
    assert peak < 4 * INFLATE_CHUNK


# --- read_part10 and ingest -----------------------------------------------------------

def test_read_part10_of_a_deflated_object_matches_pydicom() -> None:
    data = sample("image_dfl.dcm").read_bytes()
    ours = read_part10(data, max_object_bytes=1 << 30).header
    theirs = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert ours.file_meta == theirs.file_meta
    assert [e.tag for e in ours] == [e.tag for e in theirs]
    for elem in theirs:
        assert ours[elem.tag].value == elem.value, elem.keyword


def test_deflated_metadata_is_what_a_full_read_gives() -> None:
    data = sample("image_dfl.dcm").read_bytes()
    prepared = metadata.prepare(read_part10(data), data)
    assert prepared is not None
    full = metadata.prepare_from_stream(io.BytesIO(data), DeflatedExplicitVRLittleEndian)
    assert prepared.json == full.json


def test_a_deflate_bomb_is_refused_by_ingest_analysis() -> None:
    sop = generate_uid()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    raw = pydicom.filebase.DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(raw, ds)
    body = raw.getvalue()
    bomb = part10(deflate(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 8 << 20)
                          + b"\0" * (8 << 20)))
    assert len(bomb) < 64 << 10
    with pytest.raises(ObjectTooLarge):
        analyse(bomb, max_object_bytes=4 << 20)
    assert analyse(bomb, max_object_bytes=16 << 20).sop_instance_uid == sop
    with pytest.raises(ObjectTooLarge):  # the size as received counts too
        analyse(bomb, max_object_bytes=len(bomb) - 1)
