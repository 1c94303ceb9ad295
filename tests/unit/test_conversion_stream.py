"""Conversions written frame by frame (pacs.core.transcode.convert_into): the same
bytes as a whole conversion, about a frame of memory instead of several objects, and
the ceilings refused before anything is decoded or written."""

from __future__ import annotations

import io
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacs.core import transcode
from pacs.core.config import Settings
from pacs.core.errors import FrameTooLarge, UnreadableData
from pacs.core.query.model import InstanceRef
from pacs.core.storage import object_key
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import sender
from tests.conftest import sample
from tests.factory import (
    FRAME_SIDE,
    deflated_noise,
    multi_frame_image,
    multi_frame_jpeg,
    multi_frame_native,
    part10,
)


def _streamed(data: bytes, target: str, **limits: int) -> bytes:
    with tempfile.TemporaryFile() as out:
        transcode.convert_into(io.BytesIO(data), target, out, **limits)
        out.seek(0)
        return out.read()


def _into_file(data: bytes, target: str) -> None:
    with tempfile.TemporaryFile() as out:
        transcode.convert_into(io.BytesIO(data), target, out)


def _peak(work: Callable[[], Any]) -> int:
    """The most bytes Python and numpy held at once while ``work`` ran."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _conversions() -> list[Any]:
    """(sample, target syntax) for each of the two native syntaxes a sample is not
    stored in: a conversion to the syntax it has is no conversion."""
    pairs = []
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm",
                 "CT_small.dcm", "image_dfl.dcm", "MR_small_implicit.dcm",
                 "SC_rgb_dcmtk_+eb+cy+n1.dcm"):
        stored = pydicom.dcmread(sample(name), stop_before_pixels=True)
        pairs += [pytest.param(name, target, id=f"{name}-{target.name}")
                  for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                  if stored.file_meta.TransferSyntaxUID != target]
    return pairs


@pytest.mark.parametrize(("name", "target"), _conversions())
def test_the_streamed_conversion_is_the_whole_one(name: str, target: str) -> None:
    data = sample(name).read_bytes()
    assert _streamed(data, target) == transcode.convert_to_bytes(data, target)


@pytest.mark.parametrize("make", [multi_frame_jpeg, multi_frame_native])
def test_generated_multi_frame_objects_convert_the_same(make: Callable[[int], bytes]
                                                        ) -> None:
    data = make(3)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        assert _streamed(data, target) == transcode.convert_to_bytes(data, target)


def test_compressed_frames_are_decoded_one_at_a_time() -> None:
    data = multi_frame_jpeg(16)  # 4 MiB decoded
    decoded = FRAME_SIDE * FRAME_SIDE * 16
    peak = _peak(lambda: _into_file(data, ExplicitVRLittleEndian))
    # A whole conversion holds the frames, their join and the encoded object (3x and
    # more); this one a few frames' worth (256 KiB each: the array, its bytes, the
    # decoder's own buffers) and pydicom's header.
    assert peak < decoded // 3, peak


def test_native_pixel_data_is_copied_a_chunk_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = multi_frame_native(16)  # 4 MiB of pixel data
    monkeypatch.setattr(transcode, "COPY_CHUNK", 64 << 10)
    peak = _peak(lambda: _into_file(data, ImplicitVRLittleEndian))
    # Two chunks (one read while the last is let go) and pydicom's header.
    assert peak < 512 << 10, peak


def test_a_deflated_data_set_inflates_to_a_temporary_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = multi_frame_image(16)
    ds.PixelData = bytes(FRAME_SIDE * FRAME_SIDE * 16)  # 4 MiB of zeros: a few KB deflated
    data = part10(ds, DeflatedExplicitVRLittleEndian)
    streamed = _streamed(data, ExplicitVRLittleEndian)
    assert pydicom.dcmread(io.BytesIO(streamed)).PixelData == bytes(FRAME_SIDE * FRAME_SIDE * 16)
    # A chunk of inflated bytes at a time and zlib's window, then the copy's chunks:
    # not the 4 MiB it inflates to, nor several times them.
    monkeypatch.setattr(transcode, "COPY_CHUNK", 64 << 10)
    peak = _peak(lambda: _into_file(data, ExplicitVRLittleEndian))
    assert peak < 1 << 20, peak
    with pytest.raises(FrameTooLarge, match="PACS_MAX_OBJECT_BYTES"):
        _streamed(data, ExplicitVRLittleEndian, max_object_bytes=1 << 20)


def test_a_deflated_object_is_read_a_feed_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    data = deflated_noise(16)
    monkeypatch.setattr(transcode, "COPY_CHUNK", 64 << 10)
    peak = _peak(lambda: _into_file(data, ExplicitVRLittleEndian))
    assert peak < len(data) // 4, peak  # the stored 4 MiB were read whole


def test_the_ceilings_refuse_before_anything_is_written() -> None:
    data = multi_frame_jpeg(16)
    with tempfile.TemporaryFile() as out:
        with pytest.raises(FrameTooLarge, match="PACS_MAX_OBJECT_BYTES"):
            transcode.convert_into(io.BytesIO(data), ExplicitVRLittleEndian, out,
                                   max_object_bytes=FRAME_SIDE * FRAME_SIDE * 16 - 1)
        with pytest.raises(FrameTooLarge, match="PACS_MAX_FRAME_BYTES"):
            transcode.convert_into(io.BytesIO(data), ExplicitVRLittleEndian, out,
                                   max_frame_bytes=FRAME_SIDE * FRAME_SIDE - 1)
        assert out.tell() == 0


def test_a_sub_operation_converts_into_its_temporary_file() -> None:
    data = multi_frame_jpeg(2)
    stored = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    key = object_key(stored.StudyInstanceUID, stored.SeriesInstanceUID,
                     stored.SOPInstanceUID)
    store = MemoryStore()
    store.put(key, io.BytesIO(data), len(data))
    ref = InstanceRef(stored.StudyInstanceUID, stored.SeriesInstanceUID,
                      stored.SOPInstanceUID, CTImageStorage, JPEGBaseline8Bit, key, len(data))
    with sender.object_file(store, ref, ExplicitVRLittleEndian, Settings()) as path:
        assert path.read_bytes() == transcode.convert_to_bytes(data, ExplicitVRLittleEndian)
    small = Settings(max_object_bytes=FRAME_SIDE * FRAME_SIDE)  # two frames declared: refused
    with pytest.raises(FrameTooLarge), sender.object_file(store, ref, ExplicitVRLittleEndian,
                                                          small):
        pass


def _with_trailing(tag: int, size: int, syntax: str = DeflatedExplicitVRLittleEndian) -> bytes:
    """A one-frame object with an OB element of ``size`` zero bytes after its pixel data
    (deflated: a few hundred KB stored for 64 MiB)."""
    ds = multi_frame_image(1)
    ds.PixelData = bytes(FRAME_SIDE * FRAME_SIDE)
    ds.add_new(tag, "OB", bytes(size))
    return part10(ds, syntax)


def test_trailing_padding_is_copied_a_chunk_at_a_time() -> None:
    """Data Set Trailing Padding of 64 MiB after a 64 KiB image, deflated: converted
    with its padding, holding about a chunk of it, not the whole element (a 7 MB
    deflated object held 1.5 GB of it, read whole for each conversion)."""
    size = 64 << 20
    data = _with_trailing(0xFFFCFFFC, size)
    assert len(data) < 1 << 20
    converted = _streamed(data, ExplicitVRLittleEndian)
    assert converted.endswith(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, size)
                              + bytes(size))
    assert _peak(lambda: _into_file(data, ImplicitVRLittleEndian)) < 16 << 20


def test_a_large_element_after_the_pixel_data_refuses_the_conversion() -> None:
    """Other elements after the pixel data are read as a data set: more than
    MAX_TRAILING_BYTES of them refuse the conversion before they are read."""
    data = _with_trailing(0x7FE11010, transcode.MAX_TRAILING_BYTES + 2)

    def refused() -> None:
        with pytest.raises(UnreadableData, match="elements after the pixel data"):
            _into_file(data, ExplicitVRLittleEndian)

    assert _peak(refused) < 16 << 20


def test_an_extended_offset_table_past_the_pixel_data_refuses_the_conversion() -> None:
    """A length of 2^40 in the Extended Offset Table: pydicom would ask the allocator
    for it (MemoryError, answered as a failure to retry); refused as unreadable, as
    the frame it names is by WADO-RS."""
    ds = pydicom.dcmread(io.BytesIO(multi_frame_jpeg(1)))
    fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([fragment], has_bot=False)
    ds.ExtendedOffsetTable = struct.pack("<Q", 0)
    ds["ExtendedOffsetTable"].VR = "OV"
    ds.ExtendedOffsetTableLengths = struct.pack("<Q", 1 << 40)
    ds["ExtendedOffsetTableLengths"].VR = "OV"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    with pytest.raises(UnreadableData, match="places frame 1 past the end"):
        _into_file(out.getvalue(), ExplicitVRLittleEndian)


def test_an_extended_offset_table_of_another_vr_refuses_the_conversion() -> None:
    """The table written as numbers (FD) instead of OV bytes: unreadable, not a fault."""
    ds = pydicom.dcmread(io.BytesIO(multi_frame_jpeg(1)))
    ds.ExtendedOffsetTable = [0.0, 1e12]
    ds["ExtendedOffsetTable"].VR = "FD"
    ds.ExtendedOffsetTableLengths = struct.pack("<Q", 10)
    ds["ExtendedOffsetTableLengths"].VR = "OV"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    with pytest.raises(UnreadableData, match="Extended Offset Table"):
        _into_file(out.getvalue(), ExplicitVRLittleEndian)


@pytest.mark.parametrize("declared", [1, 3])
def test_frames_other_than_the_declared_number_refuse_the_conversion(declared: int) -> None:
    """Two RLE frames stored under a Number of Frames of 1 or 3: the converted
    object's Pixel Data would not hold the frames its Image Pixel module describes, so
    it is not made (a retrieval counts the instance failed, never sends it as whole)."""
    ds = pydicom.dcmread(sample("SC_rgb_rle_2frame.dcm"))
    ds.NumberOfFrames = declared
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnreadableData, match=f"holds 2 frames, not the {declared} declared"):
        _streamed(buffer.getvalue(), ExplicitVRLittleEndian)
