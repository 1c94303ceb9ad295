"""Transfer syntax conversion for retrieval, when the peer cannot take what is stored.

Stored objects are never changed; a conversion produces a new encoding for one
transfer.  Only decompression to an uncompressed syntax is offered (as Orthanc does
over DIMSE): pydicom decodes the pixel data with pylibjpeg (JPEG, JPEG-LS, JPEG 2000,
HTJ2K, RLE) and re-encodes the data set.
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

from pacs.errors import UnreadableData

#: Targets of a conversion, most preferred first.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

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


def convert(data: bytes, target: str) -> Dataset:
    """Decode a stored Part 10 object into a data set to be encoded in ``target``.

    Raises
    ------
    UnreadableData
        When the object or its pixel data cannot be decoded.
    """
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        if dataset.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in dataset:
            # Same instance in another transfer syntax: keep its SOP Instance UID
            # (pydicom 3 generates a new one by default).
            dataset.decompress(generate_instance_uid=False)
        dataset.file_meta.TransferSyntaxUID = UID(target)
    except Exception as exc:
        raise UnreadableData(f"cannot convert to {target}: {type(exc).__name__}") from None
    return dataset


def convert_to_bytes(data: bytes, target: str) -> bytes:
    """:func:`convert`, encoded as a Part 10 object (for WADO-RS)."""
    dataset = convert(data, target)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
