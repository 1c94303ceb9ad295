"""Compressed frames whose codestream declares another image than the data set's are
refused before any decoder runs (pacs.core.codestream; PS3.5 8.2): a decoder
allocates what the codestream declares, whatever Rows and Columns say."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from pacs.core import codestream, frames, metadata, transcode
from pacs.core.errors import UnreadableData
from tests.conftest import sample
from tests.factory import jpeg_frame, make_jpeg_instance

#: 20000 x 20000 grey declared by a 16 x 16 JPEG: 400 MB and seconds of a decoder's
#: work behind a header that declares 256 bytes.
BOMB = (20000, 20000)


def no_decoder(*_: Any, **__: Any) -> None:
    raise AssertionError("a decoder was called")


def layout_of(data: bytes) -> frames.Layout:
    """The frame layout ingest would record for ``data``."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    prepared = metadata.prepare_from_stream(io.BytesIO(data), syntax)
    doc = metadata.Document(ds.SOPInstanceUID, "key", syntax, prepared.pixel_offset,
                            prepared.pixel_length, prepared.json)
    return frames.layout(doc)


def first_frame(name: str) -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(sample(name))
    count = int(ds.get("NumberOfFrames") or 1)
    return next(generate_frames(ds.PixelData, number_of_frames=count)), ds


@pytest.mark.parametrize("name, expected", [
    ("SC_rgb_jpeg_dcmtk.dcm", codestream.Declared(100, 100, 3, 8)),  # JPEG baseline
    ("SC_rgb_jls_lossy_line.dcm", codestream.Declared(100, 100, 3, 8)),  # JPEG-LS
    ("JPEG2000.dcm", codestream.Declared(1024, 256, 1, 16)),  # JPEG 2000
])
def test_the_image_a_codestream_declares_is_read_from_its_header(
        name: str, expected: codestream.Declared) -> None:
    frame, ds = first_frame(name)
    assert codestream.declared(frame, str(ds.file_meta.TransferSyntaxUID)) == expected
    codestream.check(frame, str(ds.file_meta.TransferSyntaxUID), ds.Rows, ds.Columns,
                     ds.SamplesPerPixel, ds.BitsAllocated)


def test_a_jpeg_declaring_more_pixels_than_the_data_set_is_never_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_jpeg_instance(jpeg_frame(declared=BOMB))
    lay = layout_of(data)
    monkeypatch.setattr(frames, "pixel_array", no_decoder)
    monkeypatch.setattr(pydicom.Dataset, "decompress", no_decoder)
    with pytest.raises(UnreadableData, match="20000 x 20000"):
        frames.decoded(io.BytesIO(data), 1, lay, max_frame_bytes=1 << 20)
    with pytest.raises(UnreadableData, match="20000 x 20000"):
        list(frames.native_frames(io.BytesIO(data), lay, [1], max_frame_bytes=1 << 20))
    with pytest.raises(UnreadableData, match="20000 x 20000"):
        transcode.convert_to_bytes(data, ExplicitVRLittleEndian, max_frame_bytes=1 << 20)


def test_a_jpeg_2000_declaring_more_pixels_than_the_data_set_is_never_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frame, ds = first_frame("JPEG2000.dcm")
    changed = bytearray(frame)
    siz = changed.index(b"\xff\x4f\xff\x51") + 4
    struct.pack_into(">II", changed, siz + 4, 60000, 60000)  # Xsiz, Ysiz
    _refused_unread(ds, bytes(changed), monkeypatch, "60000 x 60000", 1 << 20)


def _refused_unread(ds: pydicom.Dataset, frame: bytes, monkeypatch: pytest.MonkeyPatch,
                    match: str, max_frame_bytes: int) -> None:
    """``ds`` with ``frame`` as its one frame is refused, never handed to a decoder, by
    the frame reader and by the conversion."""
    ds.PixelData = encapsulate([frame])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    monkeypatch.setattr(frames, "pixel_array", no_decoder)
    monkeypatch.setattr(pydicom.Dataset, "decompress", no_decoder)
    with pytest.raises(UnreadableData, match=match):
        frames.decoded(io.BytesIO(data), 1, layout_of(data), max_frame_bytes=max_frame_bytes)
    with pytest.raises(UnreadableData, match=match):
        transcode.convert(data, ExplicitVRLittleEndian, max_frame_bytes=max_frame_bytes)


def _jp2(rows: int, columns: int, skipped: bytes = b"") -> bytes:
    """A JP2 file (ISO/IEC 15444-1 I) of a ``rows`` x ``columns`` grey image, with a
    ``uuid`` box holding ``skipped`` after its File Type box (readers skip it)."""
    from openjpeg.utils import encode_array
    jp2 = encode_array(numpy.full((rows, columns), 200, numpy.uint8), codec_format=1)
    signature = struct.unpack_from(">I", jp2)[0]
    cut = signature + struct.unpack_from(">I", jp2, signature)[0]
    box = struct.pack(">I4s", 8 + 16 + len(skipped), b"uuid") + bytes(16) + skipped
    return jp2[:cut] + box + jp2[cut:]


def test_a_jp2_wrapped_frame_is_read_at_its_codestream_box() -> None:
    """PS3.5 A.4.4 leaves the JP2 file format out of a frame; one wrapped anyway is
    read where a decoder reads it (its ``jp2c`` box), never at a SIZ that a skipped
    box carries: a 64 x 64 one before a 2000 x 2000 codestream does not let the
    frame pass as 64 x 64."""
    small = _jp2(64, 64)
    assert codestream.declared(small, JPEG2000Lossless) == codestream.Declared(64, 64, 1, 8)
    bare = small[small.index(b"jp2c") + 4:]
    disguised = _jp2(2000, 2000, skipped=bare)
    assert codestream.declared(disguised, JPEG2000Lossless) == \
        codestream.Declared(2000, 2000, 1, 8)
    with pytest.raises(UnreadableData, match="2000 x 2000"):
        codestream.check(disguised, JPEG2000Lossless, 64, 64, 1, 8)


@pytest.mark.parametrize("frame", [
    b"\x00" + b"\xff\x4f\xff\x51" + bytes(60),  # a SIZ not at the start
    b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s", 4, b"uuid"),  # a box too short
    b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s", 8, b"jp2c") + b"\xff\x4f",
], ids=["siz-not-at-start", "box-too-short", "codestream-cut"])
def test_a_jpeg_2000_frame_without_its_header_where_a_decoder_reads_is_refused(
        frame: bytes) -> None:
    with pytest.raises(UnreadableData, match="no image header"):
        codestream.check(frame, JPEG2000Lossless, 16, 16, 1, 8)


@pytest.mark.parametrize("frame", [
    b"",
    b"\xff\xd8\xff\xda\x00\x02",  # a scan before any frame header
    b"\xff\xd8\xff\xe0\xff\xff",  # a segment longer than the frame
    b"\xff\xd8\x00\xc0",  # no marker where one must be
])
def test_a_jpeg_without_a_frame_header_is_refused_unread(frame: bytes) -> None:
    with pytest.raises(UnreadableData, match="no image header"):
        codestream.check(frame, JPEGBaseline8Bit, 16, 16, 1, 8)


@pytest.mark.parametrize("rows, columns, samples", [(16, 17, 1), (15, 16, 1), (16, 16, 3)])
def test_other_dimensions_or_components_refuse_the_frame(rows: int, columns: int,
                                                         samples: int) -> None:
    with pytest.raises(UnreadableData, match=r"PS3\.5 8\.2"):
        codestream.check(jpeg_frame(), JPEGBaseline8Bit, rows, columns, samples, 8)


def test_samples_wider_than_bits_allocated_refuse_the_frame() -> None:
    """A decoded sample takes ceil(precision / 8) bytes: 8 bits fit Bits Allocated 1
    (a decoded bit image is a byte a pixel), 12 bits do not fit 8."""
    frame = bytearray(jpeg_frame())
    codestream.check(bytes(frame), JPEGBaseline8Bit, 16, 16, 1, 1)
    frame[frame.index(b"\xff\xc0") + 4] = 12  # P
    codestream.check(bytes(frame), JPEGBaseline8Bit, 16, 16, 1, 16)
    with pytest.raises(UnreadableData, match=r"PS3\.5 8\.2"):
        codestream.check(bytes(frame), JPEGBaseline8Bit, 16, 16, 1, 8)


def test_a_frame_that_agrees_is_decoded() -> None:
    data = make_jpeg_instance(jpeg_frame())
    array = frames.decoded(io.BytesIO(data), 1, layout_of(data), max_frame_bytes=256)
    assert array.shape == (16, 16) and abs(int(array.mean()) - 100) <= 2
    converted = pydicom.dcmread(io.BytesIO(transcode.convert_to_bytes(
        data, ExplicitVRLittleEndian, max_frame_bytes=256)))
    assert len(converted.PixelData) == 256


def test_a_jpeg_2000_of_tiny_tiles_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image as the data set says, in 1 x 1 tiles (XTsiz, YTsiz): OpenJPEG keeps
    state for each tile, 0.7 GB for 65,280 tiles of a 256 x 255 image from a header of
    a few bytes.  Refused before any decoder; the same image in 64 x 64 tiles passes."""
    frame, ds = first_frame("JPEG2000.dcm")
    syntax = str(ds.file_meta.TransferSyntaxUID)
    siz = frame.index(b"\xff\x4f\xff\x51") + 4

    def tiled(width: int, height: int) -> bytes:
        changed = bytearray(frame)
        struct.pack_into(">IIII", changed, siz + 20, width, height, 0, 0)
        return bytes(changed)

    args = (syntax, ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated)
    found = codestream.declared(tiled(1, 1), syntax)
    assert found is not None and found.parts == ds.Rows * ds.Columns
    with pytest.raises(UnreadableData, match=f"{ds.Rows * ds.Columns} tiles"):
        codestream.check(tiled(1, 1), *args)
    codestream.check(tiled(64, 64), *args)  # 64 tiles
    with pytest.raises(UnreadableData):  # no tile size: no header a decoder can use
        codestream.check(tiled(0, 64), *args)
    _refused_unread(ds, tiled(1, 1), monkeypatch, "tiles", 1 << 24)


def test_a_jpeg_of_too_many_scans_is_refused_unread() -> None:
    """A frame whose scans repeat (each a pass of a progressive decoder over the whole
    image: 5,000 made a 4096 x 4096 frame take 14 s) is refused before any decoder;
    the frame as encoded passes."""
    frame, ds = first_frame("SC_rgb_jpeg_dcmtk.dcm")
    syntax = str(ds.file_meta.TransferSyntaxUID)
    args = (syntax, ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated)
    scan = frame.index(b"\xff\xda")
    end = frame.rindex(b"\xff\xd9")
    repeated = frame[:scan] + frame[scan:end] * (codestream.MAX_SCANS + 1) + frame[end:]
    codestream.check(frame, *args)
    with pytest.raises(UnreadableData, match=f"{codestream.MAX_SCANS + 1} scans"):
        codestream.check(repeated, *args)
