"""PACS_MAX_FRAME_BYTES: declared decoded sizes are checked before any decoder runs
(pacs.core.frames, pacs.core.transcode - the conversions of WADO-RS, C-MOVE and C-GET)."""

from __future__ import annotations

import io
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs.core import transcode
from pacs.core.errors import FrameTooLarge
from pacs.core.frames import decoded_size
from tests.conftest import sample


def encoded(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_decoded_size_is_rows_columns_samples_bytes_frames() -> None:
    assert decoded_size(65535, 65535, 3, 8) == 65535 * 65535 * 3
    assert decoded_size(512, 512, 1, 12) == 512 * 512 * 2  # ceil(12 / 8) bytes
    assert decoded_size(512, 512, 1, 1) == 512 * 512  # 1-bit pixels decode to bytes
    assert decoded_size(10, 10, 1, 16, frames=4) == 800


def test_a_conversion_declared_over_the_ceiling_decodes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(sample("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, 100 x 100 RGB
    ds.NumberOfFrames = 80_000  # 2.4 GB decoded (30 KB a frame), declared in a few bytes
    data = encoded(ds)

    def no_decoding(*_: Any, **__: Any) -> None:
        raise AssertionError("the pixel data was decoded")

    monkeypatch.setattr(pydicom.Dataset, "decompress", no_decoding)
    with pytest.raises(FrameTooLarge, match="PACS_MAX_OBJECT_BYTES"):  # the defaults
        transcode.convert_to_bytes(data, ExplicitVRLittleEndian)
    with pytest.raises(FrameTooLarge, match="PACS_MAX_FRAME_BYTES"):  # one frame
        transcode.convert(data, ExplicitVRLittleEndian, max_frame_bytes=100 * 100 * 3 - 1)
    with pytest.raises(FrameTooLarge, match="PACS_MAX_OBJECT_BYTES"):  # all of them
        transcode.convert(data, ExplicitVRLittleEndian, max_frame_bytes=100 * 100 * 3,
                          max_object_bytes=100 * 100 * 3 * 1000)


def test_a_conversion_within_the_ceiling_is_made() -> None:
    data = sample("SC_rgb_jpeg_dcmtk.dcm").read_bytes()
    out = transcode.convert_to_bytes(data, ExplicitVRLittleEndian,
                                     max_frame_bytes=100 * 100 * 3)
    converted = pydicom.dcmread(io.BytesIO(out))
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(converted.PixelData) == 100 * 100 * 3
    with pytest.raises(FrameTooLarge):
        transcode.convert(data, ExplicitVRLittleEndian, max_frame_bytes=100 * 100 * 3 - 1)
