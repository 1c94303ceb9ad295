"""Transfer syntax conversion for retrieval, when the peer cannot take what is stored.

Stored objects are never changed; a conversion produces a new encoding for one
transfer.  Only decompression to an uncompressed syntax is offered (as Orthanc does
over DIMSE): pydicom decodes the pixel data with pylibjpeg (JPEG, JPEG-LS, JPEG 2000,
HTJ2K, RLE) and re-encodes the data set.

A conversion decodes every frame and holds the whole decoded pixel data, so both are
checked from the header before anything is decoded (:class:`FrameTooLarge`): one frame
(:func:`pacs.core.frames.decoded_size`) within ``max_frame_bytes`` (``PACS_MAX_FRAME_BYTES``),
all of them within ``max_object_bytes`` (``PACS_MAX_OBJECT_BYTES``: the converted object
is an object like any other).  Each compressed frame's codestream must declare the
image the data set does before anything is decoded (:mod:`pacs.core.codestream`):
decoders allocate what the codestream says.  WADO-RS and C-MOVE / C-GET both convert
through here.
"""

from __future__ import annotations

import io
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs.core import codestream, metadata
from pacs.core.config import Settings
from pacs.core.dataset import read_header
from pacs.core.errors import FrameTooLarge, ObjectTooLarge, UnreadableData
from pacs.core.frames import check_decodable, decoded_size

#: Targets of a conversion, most preferred first.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: The ceilings for callers that do not pass theirs: the settings' defaults.
DEFAULT_MAX_FRAME_BYTES: int = Settings.max_frame_bytes
DEFAULT_MAX_OBJECT_BYTES: int = Settings.max_object_bytes

#: Rows, Columns, Samples per Pixel, Bits Allocated and Number of Frames: what the
#: declared decoded size follows from (in the header, and in the stored metadata).
_IMAGE_PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
                         "NumberOfFrames")
_ROWS = 0x00280010
_IMAGE_PIXEL_TAGS = (_ROWS, 0x00280011, 0x00280002, 0x00280100, 0x00280008)

_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
           DeflatedExplicitVRLittleEndian}


def can_convert(source: str, target: str) -> bool:
    """True when an object stored in ``source`` can be sent in ``target``."""
    if source == target:
        return True
    if target not in UNCOMPRESSED:
        return False
    if source in _NATIVE:
        return True
    try:
        return bool(get_decoder(UID(source)).is_available)
    except (NotImplementedError, ValueError):
        return False


def check_size(data: bytes, max_frame_bytes: int,
               max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> None:
    """Refuse a conversion whose decoded pixel data would be too large.

    Raises
    ------
    FrameTooLarge
        One frame (Rows x Columns x Samples per Pixel x bytes per sample) is over
        ``max_frame_bytes``, or all of them (x Number of Frames) over ``max_object_bytes``.
    UnreadableData
        The header does not parse.
    """
    try:
        header = read_header(data)
    except ObjectTooLarge as exc:  # a deflated header over its ceiling
        raise FrameTooLarge(str(exc)) from None
    if "Rows" not in header:
        return  # no image: nothing to decode
    try:
        rows, columns, samples, bits, frames = (header.get(k) for k in _IMAGE_PIXEL_KEYWORDS)
    except (TypeError, ValueError):
        raise UnreadableData("the Image Pixel module does not parse") from None
    check_declared(rows, columns, samples, bits, frames, max_frame_bytes, max_object_bytes)


def check_metadata(parsed: dict[str, Any], max_frame_bytes: int,
                   max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> None:
    """:func:`check_size` from an instance's stored metadata (its DICOM JSON, parsed:
    :mod:`pacs.core.metadata`) instead of its bytes: what a retrieval can check for
    every instance it will convert before it sends anything.

    Raises
    ------
    FrameTooLarge, UnreadableData
        As :func:`check_size`.
    """
    if f"{_ROWS:08X}" not in parsed:
        return  # no image: nothing to decode
    rows, columns, samples, bits, frames = (metadata.value(parsed, t) for t in _IMAGE_PIXEL_TAGS)
    check_declared(rows, columns, samples, bits, frames, max_frame_bytes, max_object_bytes)


def check_declared(rows: Any, columns: Any, samples: Any, bits_allocated: Any,
                   frames: Any, max_frame_bytes: int, max_object_bytes: int) -> None:
    """The ceilings of a conversion, from the declared Image Pixel values (absent or
    empty ones count as pydicom's defaults would: no rows, one sample of 8 bits, one
    frame).

    Raises
    ------
    FrameTooLarge
        As :func:`check_size`.
    UnreadableData
        A value that is not a number.
    """
    try:
        frame = decoded_size(int(rows or 0), int(columns or 0), int(samples or 1),
                             int(bits_allocated or 8))
        count = max(int(frames or 1), 1)
    except (TypeError, ValueError):
        raise UnreadableData("the Image Pixel module does not parse") from None
    check_decodable(frame, max_frame_bytes)
    if frame * count > max_object_bytes:
        raise FrameTooLarge(f"the {count} frames to decode declare {frame * count} bytes, "
                            f"more than the {max_object_bytes} allowed "
                            "(PACS_MAX_OBJECT_BYTES)")


def convert(data: bytes, target: str, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
            max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> Dataset:
    """Decode a stored Part 10 object into a data set to be encoded in ``target``.

    Raises
    ------
    FrameTooLarge
        A frame declares more than ``max_frame_bytes`` decoded, or all frames more
        than ``max_object_bytes`` (checked before anything is decoded).
    UnreadableData
        When the object or its pixel data cannot be decoded.
    """
    check_size(data, max_frame_bytes, max_object_bytes)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData(f"cannot convert to {target}: {type(exc).__name__}") from None
    check_codestreams(dataset)
    try:
        if dataset.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in dataset:
            # Same instance in another transfer syntax: keep its SOP Instance UID
            # (pydicom 3 generates a new one by default).
            dataset.decompress(generate_instance_uid=False)
        dataset.file_meta.TransferSyntaxUID = UID(target)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise UnreadableData(f"cannot convert to {target}: {type(exc).__name__}") from None
    return dataset


def check_codestreams(dataset: Dataset) -> None:
    """Refuse a conversion whose compressed frames declare, in their codestreams,
    another image than the data set's (:func:`pacs.core.codestream.check`): the
    decoder would allocate what they declare.  Every frame is checked before any is
    decoded, one frame's bytes at a time.

    Raises
    ------
    UnreadableData
        A frame whose codestream disagrees, or fragments that do not parse.
    """
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    if not codestream.declares(syntax) or "PixelData" not in dataset:
        return
    try:
        rows, columns, samples, bits, count = (
            int(dataset.get(keyword) or default) for keyword, default in _DECODED_DEFAULTS)
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths) if (
            "ExtendedOffsetTable" in dataset
            and "ExtendedOffsetTableLengths" in dataset) else None
        frames = generate_frames(dataset.PixelData, number_of_frames=max(count, 1),
                                 extended_offsets=extended)
        for frame in frames:
            codestream.check(frame, syntax, rows, columns, samples, bits)
    except (TypeError, ValueError, KeyError) as exc:
        raise UnreadableData(f"the encapsulated pixel data does not parse: "
                             f"{type(exc).__name__}") from None


#: Image Pixel keywords a codestream is checked against, with pydicom's defaults.
_DECODED_DEFAULTS = (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1),
                     ("BitsAllocated", 8), ("NumberOfFrames", 1))


def convert_to_bytes(data: bytes, target: str,
                     max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                     max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> bytes:
    """:func:`convert`, encoded as a Part 10 object (for WADO-RS, C-MOVE and C-GET)."""
    dataset = convert(data, target, max_frame_bytes, max_object_bytes)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
