"""Frames cut from native pixel data (``pacs.core.frames``): which bytes of the stored
object are read for a frame, and what comes out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs.core.errors import UnreadableData
from pacs.core.frames import Layout, native_frames

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
