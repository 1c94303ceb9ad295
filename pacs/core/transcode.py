"""Transfer syntax conversion for retrieval, when the peer cannot take what is stored.

Stored objects are never changed; a conversion produces a new encoding for one
transfer.  Only decompression to an uncompressed syntax is offered (as Orthanc does
over DIMSE): pydicom decodes the pixel data with pylibjpeg (JPEG, JPEG-LS, JPEG 2000,
HTJ2K, RLE) and re-encodes the data set.

A conversion decodes every frame and holds the whole decoded pixel data, so both are
checked from the header before anything is decoded (:class:`FrameTooLarge`): one frame
(:func:`pacs.core.frames.decoded_size`) within ``max_frame_bytes`` (``PACS_MAX_FRAME_BYTES``),
all of them within ``max_object_bytes`` (``PACS_MAX_OBJECT_BYTES``: the converted object
is an object like any other).  WADO-RS and C-MOVE / C-GET both convert through here.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs.core.config import Settings
from pacs.core.dataset import read_header
from pacs.core.errors import FrameTooLarge, ObjectTooLarge, UnreadableData
from pacs.core.frames import check_decodable, decoded_size

#: Targets of a conversion, most preferred first.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: The ceilings for callers that do not pass theirs: the settings' defaults.
DEFAULT_MAX_FRAME_BYTES: int = Settings.max_frame_bytes
DEFAULT_MAX_OBJECT_BYTES: int = Settings.max_object_bytes

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
        frame = decoded_size(int(header.get("Rows") or 0), int(header.get("Columns") or 0),
                             int(header.get("SamplesPerPixel") or 1),
                             int(header.get("BitsAllocated") or 8))
        frames = max(int(header.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        raise UnreadableData("the Image Pixel module does not parse") from None
    check_decodable(frame, max_frame_bytes)
    if frame * frames > max_object_bytes:
        raise FrameTooLarge(f"the {frames} frames to decode declare {frame * frames} bytes, "
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
        if dataset.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in dataset:
            # Same instance in another transfer syntax: keep its SOP Instance UID
            # (pydicom 3 generates a new one by default).
            dataset.decompress(generate_instance_uid=False)
        dataset.file_meta.TransferSyntaxUID = UID(target)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise UnreadableData(f"cannot convert to {target}: {type(exc).__name__}") from None
    return dataset


def convert_to_bytes(data: bytes, target: str,
                     max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                     max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> bytes:
    """:func:`convert`, encoded as a Part 10 object (for WADO-RS, C-MOVE and C-GET)."""
    dataset = convert(data, target, max_frame_bytes, max_object_bytes)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
