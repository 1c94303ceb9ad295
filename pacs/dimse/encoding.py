"""Encode C-FIND response identifiers straight to bytes.

A response identifier holds a handful of short text values; building a pydicom
``Dataset`` and encoding it cost about half a millisecond per response, most of a large
C-FIND's time.  This writes the elements directly (PS3.5 section 7: tag, VR and length,
then the value padded to even length), in tag order, for the two little endian transfer
syntaxes Q/R contexts use.  Character sets other than the single-byte ISO_IR ones,
ISO_IR 192 and GB18030 (the ISO 2022 code extensions, which need escape sequences) go
through pydicom's encoder instead.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom import charset
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.valuerep import PersonName

#: VRs whose value length field is 4 bytes in explicit VR (PS3.5 Table 7.1-1).
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
#: VRs whose text follows the Specific Character Set (PS3.5 6.1.2.3).
_TEXT = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_BINARY = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}


def simple_codec(charsets: Sequence[str]) -> str | None:
    """The Python codec for a character set without code extensions, else ``None``."""
    if len(charsets) != 1 or charsets[0].startswith("ISO 2022"):
        return None
    name = charsets[0] or "ISO_IR 6"
    return charset.python_encoding.get(name)


def _value_bytes(vr: str, value: str | None, codec: str) -> bytes:
    if value is None or value == "":
        return b""
    if vr in _BINARY:
        parts = value.split("\\")
        return b"".join(struct.pack(_BINARY[vr], int(p)) for p in parts if p.strip())
    raw = value.encode(codec if vr in _TEXT else "ascii")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in _LONG:
        return struct.pack("<HH2s2xI", group, element, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def encode_identifier(elements: Iterable[tuple[int, str, str | None]],
                      charsets: Sequence[str], implicit: bool) -> bytes:
    """Encode ``(tag, VR, text)`` elements as a data set in little endian.

    Parameters
    ----------
    elements :
        The values as index text (multiple values joined by ``\\``); ``None`` or ``""``
        is an empty value.  SpecificCharacterSet must be among them when needed.
    charsets :
        The response's Specific Character Set values.
    implicit :
        Implicit VR Little Endian (else Explicit VR Little Endian).
    """
    ordered = sorted(elements)
    codec = simple_codec(charsets)
    if codec is None:
        return _encode_with_pydicom(ordered, charsets, implicit)
    try:
        return _encode_elements(ordered, codec, implicit)
    except UnicodeEncodeError:
        return _encode_with_pydicom(ordered, charsets, implicit)


def _encode_elements(elements: Iterable[tuple[int, str, Any]], codec: str,
                     implicit: bool) -> bytes:
    return b"".join(
        _element(tag, vr, _sequence_bytes(value, codec, implicit) if vr == "SQ"
                 else _value_bytes(vr, value, codec), implicit)
        for tag, vr, value in elements)


def _sequence_bytes(items: list | None, codec: str, implicit: bool) -> bytes:
    """Items of defined length (PS3.5 7.5): (FFFE,E000), length, the item's elements."""
    encoded = []
    for item in items or []:
        body = _encode_elements(sorted(item), codec, implicit)
        encoded.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body)
    return b"".join(encoded)


def _encode_with_pydicom(elements: list[tuple[int, str, str | None]],
                         charsets: Sequence[str], implicit: bool) -> bytes:
    """The general path: pydicom's writer, which knows ISO 2022 escape sequences."""
    dataset = _dataset(elements)
    dataset.SpecificCharacterSet = list(charsets) if len(charsets) > 1 else charsets[0]
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = implicit
    write_dataset(out, dataset)
    return out.getvalue()


def _dataset(elements: Iterable[tuple[int, str, Any]]) -> Dataset:
    dataset = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ":
            dataset.add_new(tag, vr, [_dataset(item) for item in value or []])
        else:
            dataset.add_new(tag, vr, _typed(vr, value))
    return dataset


def _typed(vr: str, value: str | None) -> object:
    if value is None or value == "":
        return None
    if vr in _BINARY:
        return [int(p) for p in value.split("\\")] if "\\" in value else int(value)
    parts = value.split("\\")
    if vr == "PN":
        names = [PersonName(p) for p in parts]
        return names if len(names) > 1 else names[0]
    return parts if len(parts) > 1 else value
