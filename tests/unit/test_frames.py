"""Frames cut from native pixel data (``pacs.core.frames``): which bytes of the stored
object are read for a frame, and what comes out."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacs.core import dataset as dataset_module, frames as frames_module, metadata
from pacs.core.errors import CannotDecode, UnreadableData
from pacs.core.frames import (
    Layout,
    decoded,
    decoded_frames,
    layout,
    native_frames,
    stored_frames,
)
from tests.factory import (
    FRAME_SIDE,
    deflated_noise,
    grey_image,
    jpeg_frame,
    make_instance,
    make_jpeg_instance,
    multi_frame_native,
    part10,
)

#: 5 x 7 one-bit pixels: 35 bits a frame, so most frames start inside a byte.
ROWS, COLUMNS, FRAMES = 5, 7, 40
#: Bytes of the object before its pixel data value.
PREFIX = 132


class CountingReader(io.BytesIO):
    """An object's bytes; the size of every read recorded."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.reads.append(len(data))
        return data


def one_bit_layout(pixel_length: int) -> Layout:
    return Layout(transfer_syntax=str(ExplicitVRLittleEndian), rows=ROWS, columns=COLUMNS,
                  samples=1, bits_allocated=1, frames=FRAMES, photometric="MONOCHROME2",
                  pixel_offset=PREFIX, pixel_length=pixel_length)


def test_a_one_bit_frame_reads_only_the_bytes_that_hold_it() -> None:
    """PS3.5 8.1.1: the frames' bits follow each other; frame n is bits
    (n - 1) x 35 to n x 35 of the value, repacked from its first bit."""
    pixels = np.random.default_rng(7).integers(0, 2, size=(FRAMES, ROWS * COLUMNS),
                                               dtype=np.uint8)
    value = np.packbits(pixels.ravel(), bitorder="little").tobytes()
    source = CountingReader(b"\x55" * PREFIX + value + b"\xaa" * 64)
    lay = one_bit_layout(len(value))
    numbers = [2, 1, 40, 17, 23]
    got = [data for data, _ in native_frames(source, lay, numbers, max_frame_bytes=1)]
    assert got == [np.packbits(pixels[n - 1], bitorder="little").tobytes() for n in numbers]
    # 35 bits starting anywhere in a byte lie within 6 bytes: nothing else is read.
    assert len(source.reads) == len(numbers)
    assert max(source.reads) <= 6


def test_a_one_bit_frame_past_the_value_is_unreadable() -> None:
    value = bytes(ROWS * COLUMNS * FRAMES // 8)  # 175 bytes: the last frame ends at 1400 bits
    lay = one_bit_layout(len(value) - 1)
    source = CountingReader(bytes(PREFIX) + value)
    assert len(list(native_frames(source, lay, [39], max_frame_bytes=1))) == 1
    with pytest.raises(UnreadableData):
        list(native_frames(source, lay, [40], max_frame_bytes=1))


def encapsulated_file(tmp_path: Any, basic: list[int] | None = None,
                      lengths: list[int] | None = None) -> tuple[Any, Layout]:
    """Two 16 x 16 JPEG frames in a file, with a Basic Offset Table of ``basic`` or an
    Extended Offset Table whose lengths are ``lengths``; and their layout as ingest
    records it."""
    frame = jpeg_frame()
    ds = pydicom.dcmread(io.BytesIO(make_jpeg_instance(frame, NumberOfFrames=2)))
    if lengths is not None:
        value, offsets, _ = encapsulate_extended([frame, frame])
        ds.PixelData = value
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)
    else:
        ds.PixelData = encapsulate([frame, frame], has_bot=False)
        table = struct.pack(f"<{len(basic or [])}I", *(basic or []))
        ds.PixelData = (b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table
                        + ds.PixelData[8:])
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    prepared = metadata.prepare_from_stream(io.BytesIO(path.read_bytes()),
                                            str(ds.file_meta.TransferSyntaxUID))
    doc = metadata.Document(ds.SOPInstanceUID, "key", str(ds.file_meta.TransferSyntaxUID),
                            prepared.pixel_offset, prepared.pixel_length, prepared.json)
    return path, layout(doc)


def test_extended_offsets_past_the_object_are_refused_before_anything_is_read(
        tmp_path: Any) -> None:
    """PS3.5 A.4: the Extended Offset Table's 64-bit lengths are the sender's; a frame
    said to be 2^40 bytes long made the file's read ask for 2^40 bytes
    (MemoryError, a 500), whatever the object holds."""
    frame = jpeg_frame()
    path, lay = encapsulated_file(tmp_path, lengths=[len(frame), len(frame)])
    with open(path, "rb") as source:
        got = [data for data, _ in stored_frames(source, lay, [1, 2], max_frame_bytes=1)]
    assert got == [frame, frame]
    path, lay = encapsulated_file(tmp_path, lengths=[len(frame), 1 << 40])
    with open(path, "rb") as source:
        assert next(stored_frames(source, lay, [1], max_frame_bytes=1))[0] == frame
        with pytest.raises(UnreadableData, match="past the end of the object"):
            next(stored_frames(source, lay, [2], max_frame_bytes=1))
    path, lay = encapsulated_file(tmp_path, lengths=[len(frame)])
    with open(path, "rb") as source, pytest.raises(UnreadableData, match="does not list"):
        next(stored_frames(source, lay, [2], max_frame_bytes=1))


def test_a_basic_offset_past_the_fragments_is_no_frame(tmp_path: Any) -> None:
    """pydicom reads nothing there, which was sent as an empty frame."""
    frame = jpeg_frame()
    item = 8 + len(frame) + len(frame) % 2
    path, lay = encapsulated_file(tmp_path, basic=[0, item])
    with open(path, "rb") as source:
        assert next(stored_frames(source, lay, [2], max_frame_bytes=1))[0].rstrip(
            b"\0") == frame.rstrip(b"\0")
    path, lay = encapsulated_file(tmp_path, basic=[0, 1 << 30])
    with open(path, "rb") as source, pytest.raises(UnreadableData, match="no bytes"):
        next(stored_frames(source, lay, [2], max_frame_bytes=1))


@pytest.mark.parametrize("bits, rows, columns, samples", [
    (1, 5, 7, 1),  # 35 bits a frame: most start inside a byte
    (8, 6, 5, 3),
    (16, 4, 3, 1),
])
def test_deflated_frames_inflated_alone_are_the_frames_of_the_whole(
        bits: int, rows: int, columns: int, samples: int) -> None:
    """Each frame of a deflated data set, inflated alone, decodes to what pydicom
    makes of it from the whole data set (PS3.5 A.5, 8.1.1)."""
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    count = 9
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = rows, columns, samples, count
    if samples == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    rng = np.random.default_rng(1)
    if bits == 1:
        values = rng.integers(0, 2, size=count * rows * columns, dtype=np.uint8)
        ds.PixelData = np.packbits(values, bitorder="little").tobytes()
    else:
        size = count * rows * columns * samples
        ds.PixelData = rng.integers(0, 200, size=size).astype(f"<u{bits // 8}").tobytes()
    ds["PixelData"].VR = "OB" if bits <= 8 else "OW"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    syntax = str(DeflatedExplicitVRLittleEndian)
    prepared = metadata.prepare_from_stream(io.BytesIO(data), syntax)
    lay = layout(metadata.Document(ds.SOPInstanceUID, "key", syntax, prepared.pixel_offset,
                                   prepared.pixel_length, prepared.json))
    whole = pydicom.dcmread(io.BytesIO(data)).pixel_array
    for number in range(1, count + 1):
        assert np.array_equal(decoded(io.BytesIO(data), number, lay, 1 << 20),
                              whole[number - 1])



@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_native_frame_costs_a_frame_of_memory(syntax: str) -> None:
    """Frame 7 of 16 native frames (4 MiB): cut by range for WADO-RS frames, read alone
    by pydicom for a rendered view; neither reads the pixel data whole."""
    data = multi_frame_native(16, syntax)
    prepared = metadata.prepare_from_stream(io.BytesIO(data), syntax)
    lay = layout(metadata.Document("1.2.3", "k", syntax, prepared.pixel_offset,
                                   prepared.pixel_length, prepared.json))
    reads = (lambda: list(native_frames(io.BytesIO(data), lay, [7], max_frame_bytes=1 << 30)),
             lambda: decoded(io.BytesIO(data), 7, lay, 1 << 30))
    for read in reads:
        tracemalloc.start()
        try:
            read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * FRAME_SIDE * FRAME_SIDE, peak  # a frame is FRAME_SIDE x FRAME_SIDE bytes


def test_a_deflated_frame_reads_the_stored_object_a_feed_at_a_time(tmp_path: Path) -> None:
    """Frame 2 of 16 deflated frames of noise (4 MiB stored, in a file: a BytesIO
    hands its whole buffer over uncopied): the stored bytes are read as far as the
    frame, a feed at a time, not whole."""
    data = deflated_noise(16)
    stored = tmp_path / "deflated.dcm"
    stored.write_bytes(data)
    prepared = metadata.prepare_from_stream(io.BytesIO(data), DeflatedExplicitVRLittleEndian)
    lay = layout(metadata.Document("1.2.3", "k", DeflatedExplicitVRLittleEndian,
                                   prepared.pixel_offset, prepared.pixel_length,
                                   prepared.json))
    tracemalloc.start()
    try:
        with stored.open("rb") as source:
            frame = decoded(source, 2, lay, 1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frame.nbytes == FRAME_SIDE * FRAME_SIDE
    assert peak < len(data) // 4, peak


def _frames_of(count: int, eoi: bool = False) -> list[bytes]:
    """``count`` frames of even length without 0xFF bytes (ending with an EOI marker
    when ``eoi``), so that only the markers meant to end frames can be found."""
    rng = np.random.default_rng(count)
    frames = []
    for _ in range(count):
        body = rng.integers(0, 255, size=int(rng.integers(20, 60)) * 2, dtype=np.uint8)
        data = body.tobytes()
        frames.append(data[:-2] + b"\xff\xd9" if eoi else data)
    return frames


_DELIMITER_ITEM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _encapsulated(frames: list[bytes], per_frame: int, bot: bool, extended: bool = False
                  ) -> tuple[bytes, Layout]:
    extended_offsets = None
    if extended:
        value, offsets, lengths = encapsulate_extended(frames)
        extended_offsets = (offsets, lengths)
    else:
        value = encapsulate(frames, fragments_per_frame=per_frame, has_bot=bot)
    lay = Layout(transfer_syntax="1.2.840.10008.1.2.4.50", rows=8, columns=8, samples=1,
                 bits_allocated=8, frames=len(frames), photometric="MONOCHROME2",
                 pixel_offset=0, pixel_length=metadata.UNDEFINED_LENGTH,
                 extended_offsets=extended_offsets)
    return value + _DELIMITER_ITEM, lay


@pytest.mark.parametrize("count, per_frame, bot, eoi, extended", [
    (30, 1, True, False, False), (30, 1, False, False, False),
    (30, 3, True, False, False), (30, 3, False, True, False),
    (1, 4, False, False, False), (30, 1, False, False, True)],
    ids=["one each, basic table", "one each, no table", "three each, basic table",
         "three each, no table, EOI markers", "one frame of four", "extended table"])
def test_many_frames_are_found_as_pydicom_finds_each(
        count: int, per_frame: int, bot: bool, eoi: bool, extended: bool) -> None:
    """Frames asked for together are found in one walk of the items, grouped into
    fragments by pydicom's rules for one frame (PS3.5 A.4): the same bytes, frame by
    frame, in any order."""
    frames = _frames_of(count, eoi)
    value, lay = _encapsulated(frames, per_frame, bot, extended)
    numbers = list(range(count, 0, -1))
    together = [data for data, _ in stored_frames(io.BytesIO(value), lay, numbers,
                                                  max_frame_bytes=1)]
    alone = [next(stored_frames(io.BytesIO(value), lay, [n], max_frame_bytes=1))[0]
             for n in numbers]
    assert together == alone
    assert [data.rstrip(b"\0") for data in together] == [
        frames[n - 1].rstrip(b"\0") for n in numbers]


def test_all_frames_of_an_object_are_read_in_one_walk() -> None:
    """Without an offset table, finding frame n walked the item headers of every
    fragment before it: all 400 frames took 322,400 reads.  Now each header is read once,
    and each frame once."""
    frames = _frames_of(400)
    value, lay = _encapsulated(frames, 1, bot=False)
    source = CountingReader(value)
    got = [data for data, _ in stored_frames(source, lay, range(1, 401), max_frame_bytes=1)]
    assert got == frames
    assert len(source.reads) <= 2 * 400 + 3


def test_frames_placed_by_an_offset_table_are_read_without_a_walk() -> None:
    """With a Basic Offset Table each frame is found through it: two frames of 2,000
    cost a few reads, not a read of every item header."""
    value, lay = _encapsulated(_frames_of(2000), 1, bot=True)
    source = CountingReader(value)
    assert len(list(stored_frames(source, lay, [1, 2], max_frame_bytes=1))) == 2
    assert len(source.reads) <= 12


@pytest.mark.parametrize("damage", ["undefined length", "past the end"])
def test_an_item_that_cannot_be_read_as_declared_is_unreadable(damage: str) -> None:
    """An item of undefined length (0xFFFFFFFF), or one longer than the object, is not
    read as declared (a read of 4 GiB asks the allocator for it first): the request is
    refused.  One frame alone (through pydicom) is refused too for an undefined length
    (one past the end pydicom reads short; ingest refuses such an object)."""
    frames = _frames_of(3)
    value, lay = _encapsulated(frames, 1, bot=False)
    third = 8 + 8 + len(frames[0]) + 8 + len(frames[1])  # the third fragment's header
    length = 0xFFFFFFFF if damage == "undefined length" else len(value)
    damaged = value[:third + 4] + struct.pack("<I", length) + value[third + 8:]
    with pytest.raises(UnreadableData):
        list(stored_frames(io.BytesIO(damaged), lay, [2, 3], max_frame_bytes=1))
    if damage == "undefined length":
        with pytest.raises(UnreadableData):
            list(stored_frames(io.BytesIO(damaged), lay, [3], max_frame_bytes=1))


def test_an_offset_table_longer_than_the_object_is_unreadable() -> None:
    """A Basic Offset Table item declaring 400 bytes in an object of 18: pydicom's
    unpacking fails with ``struct.error``, which reached the client as a 500."""
    value = b"\xfe\xff\x00\xe0" + struct.pack("<I", 400) + bytes(10)
    lay = Layout(transfer_syntax="1.2.840.10008.1.2.4.50", rows=8, columns=8, samples=1,
                 bits_allocated=8, frames=2, photometric="MONOCHROME2", pixel_offset=0,
                 pixel_length=metadata.UNDEFINED_LENGTH)
    for numbers in ([1], [1, 2]):
        with pytest.raises(UnreadableData):
            list(stored_frames(io.BytesIO(value), lay, numbers, max_frame_bytes=1))


def _document_of(data: bytes, syntax: str) -> metadata.Document:
    """The metadata ingest records for the Part 10 object ``data``."""
    prepared = metadata.prepare_from_stream(io.BytesIO(data), syntax)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return metadata.Document(ds.SOPInstanceUID, "key", syntax, prepared.pixel_offset,
                             prepared.pixel_length, prepared.json)


def _even(data: bytes) -> bytes:
    return data + b"\0" * (len(data) % 2)


def _placed_by_extended_table(count: int) -> tuple[bytes, bytes, bytes]:
    """``count`` 8 x 8 JPEG frames and one more fragment after them, a codestream
    declaring 64 x 64 pixels, which the Extended Offset Table makes frame 1 (PS3.5
    A.4: the table, not the order of the fragments, places each frame); the object,
    the small frame and the other."""
    small, other = _even(jpeg_frame(8)), _even(jpeg_frame(8, declared=(64, 64)))
    fragments = [small] * count + [other]
    ds = grey_image(8, 8, NumberOfFrames=count)
    ds.PixelData = encapsulate(fragments, has_bot=False)
    ds["PixelData"].VR = "OB"
    positions = np.cumsum([0] + [8 + len(f) for f in fragments[:-1]]).tolist()
    offsets = [positions[-1], *positions[1:count]]
    lengths = [len(other)] + [len(small)] * (count - 1)
    ds.ExtendedOffsetTable = struct.pack(f"<{count}Q", *offsets)
    ds.ExtendedOffsetTableLengths = struct.pack(f"<{count}Q", *lengths)
    return part10(ds, JPEGBaseline8Bit), small, other


def test_an_extended_offset_table_out_of_the_metadata_places_every_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of 200 frames (1,600 bytes) is a BulkDataURI in the metadata.  It was
    taken for no table: the frames were found by the order of the fragments, and
    frame 1's codestream checked there, while pydicom decoded the frame the table
    places from the stored object, unchecked (a 72 KB object decoded 16,000 x 16,000
    pixels).  The table is read from the stored header instead, and the decoder gets
    the bytes the check passed, never another look-up of its own."""
    data, small, other = _placed_by_extended_table(200)
    lay = layout(_document_of(data, str(JPEGBaseline8Bit)))
    assert lay.extended_offsets is None  # a BulkDataURI in the metadata
    as_stored = [frame for frame, _ in stored_frames(io.BytesIO(data), lay, [1, 2, 200],
                                                     max_frame_bytes=1)]
    assert as_stored == [other, small, small]
    given: list[int] = []
    decode = frames_module.pixel_array

    def spy(source: Any, **options: Any) -> np.ndarray:
        given.append(options["index"])
        return decode(source, **options)

    monkeypatch.setattr(frames_module, "pixel_array", spy)
    with pytest.raises(CannotDecode, match="declares 64 x 64"):
        decoded(io.BytesIO(data), 1, lay, 1 << 20)
    assert given == []  # refused unread
    assert abs(int(decoded(io.BytesIO(data), 2, lay, 1 << 20).mean()) - 100) <= 2


def test_decoded_frames_without_an_offset_table_are_found_in_one_walk() -> None:
    """Without an offset table, decoding frame n walked the item headers of every
    fragment before it twice (pydicom's look-up for the check, then the decoder's):
    all 300 frames took about 180,000 reads.  The frames of a request are found in
    one walk, each decoded from the bytes found."""
    count = 300
    ds = grey_image(8, 8, NumberOfFrames=count)
    ds.PixelData = encapsulate([_even(jpeg_frame(8))] * count, has_bot=False)
    ds["PixelData"].VR = "OB"
    data = part10(ds, JPEGBaseline8Bit)
    lay = layout(_document_of(data, str(JPEGBaseline8Bit)))
    source = CountingReader(data)
    got = [frame for frame, _ in native_frames(source, lay, range(1, count + 1),
                                               max_frame_bytes=1 << 20)]
    assert len(got) == count and all(len(frame) == 64 for frame in got)
    assert all(abs(int(np.frombuffer(frame, np.uint8).mean()) - 100) <= 2 for frame in got)
    assert len(source.reads) < 10 * count, len(source.reads)


class CountingInflater(dataset_module.Inflater):
    """The core's inflater, every construction counted."""

    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        CountingInflater.made += 1


@pytest.mark.parametrize("bits", [1, 8])
@pytest.mark.parametrize("order", ["ascending", "any"])
def test_the_frames_of_a_deflated_object_are_inflated_once(
        monkeypatch: pytest.MonkeyPatch, bits: int, order: str) -> None:
    """Each frame of a deflated data set inflated it from its start again (and its
    header too): all 400 frames of an object took 116 s.  The frames of a request
    come from one inflater, as far as the last; those asked out of order too, through
    a temporary file (PS3.5 A.5, 8.1.1: 1-bit frames share bytes)."""
    count, rows, columns = 24, 5, 7
    ds = grey_image(rows, columns, NumberOfFrames=count)
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    values = np.random.default_rng(bits).integers(0, 2 if bits == 1 else 256,
                                                  size=count * rows * columns)
    ds.PixelData = (np.packbits(values.astype(np.uint8), bitorder="little").tobytes()
                    if bits == 1 else values.astype(np.uint8).tobytes())
    data = part10(ds, DeflatedExplicitVRLittleEndian)
    lay = layout(_document_of(data, str(DeflatedExplicitVRLittleEndian)))
    numbers = list(range(1, count + 1)) if order == "ascending" else [9, 2, 24, 1, 10, 3]
    alone = [next(stored_frames(io.BytesIO(data), lay, [n], max_frame_bytes=1 << 20))[0]
             for n in numbers]
    monkeypatch.setattr(dataset_module, "Inflater", CountingInflater)
    CountingInflater.made = 0
    together = [frame for frame, _ in stored_frames(io.BytesIO(data), lay, numbers,
                                                    max_frame_bytes=1 << 20)]
    assert together == alone
    assert CountingInflater.made == 1
    CountingInflater.made = 0
    arrays = list(decoded_frames(io.BytesIO(data), lay, numbers, 1 << 20))
    assert CountingInflater.made == 2  # the header, then the frames
    whole = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert all(np.array_equal(array, whole[n - 1]) for array, n in zip(arrays, numbers,
                                                                       strict=True))
