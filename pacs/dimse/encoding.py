"""Encode C-FIND response identifiers straight to bytes.

A response identifier holds a handful of short text values; building a pydicom
``Dataset`` and encoding it cost about half a millisecond per response, most of a large
C-FIND's time.  This writes the elements directly (PS3.5 section 7: tag, VR and length,
then the value padded to even length), in tag order, for the two little endian transfer
syntaxes Q/R contexts use.  A response in one term without code extensions (a
single-byte one, ISO 2022 or not, ISO_IR 192, GB18030) is written here; one with code
extensions, which need escape sequences, goes through pydicom's encoder instead.

A single-byte term is written in a codec of exactly its repertoire, one byte per
character (:data:`SINGLE_BYTE_CODECS`): pydicom's codecs are wider for two of them, and
would label Latin-1 bytes ISO_IR 6 and Shift-JIS kanji ISO_IR 13.

A value longer than its length field can say (Explicit VR gives most VRs a 16-bit
length, PS3.5 7.1.2, while Implicit VR and the index allow far more) is cut, for this
answer only, to the longest whole-character prefix that fits: one such value would
otherwise fail every listing that includes it.  The stored object is not changed and
QIDO-RS / WADO-RS (JSON, without length fields) answer it in full.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom import charset, config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

#: VRs whose value length field is 4 bytes in explicit VR (PS3.5 Table 7.1-1).
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
#: VRs whose text follows the Specific Character Set (PS3.5 6.1.2.3).
_TEXT = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
#: Value, component group and component delimiters of a person name (PS3.5 6.2.1).
_PN_DELIMITERS = re.compile(r"[\\^=]")
_BINARY = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}
#: Longest value a 16-bit length field holds, padded to even length (PS3.5 7.1.2).
#: 32-bit lengths need no check: SQLite's longest text (10^9 bytes) fits them.
MAX_SHORT_LENGTH = 0xFFFE
#: Most bytes one character takes in any character set here (UTF-8 and GB18030: 4;
#: ISO 2022: 2, plus escape sequences when the code element changes).
_MAX_BYTES_PER_CHARACTER = 6
#: Single-byte terms of Specific Character Set by ISO-IR number (PS3.3 C.12.1.1.2,
#: Tables C.12-2 and C.12-3), with the Python codec of the node's responses.  For
#: ISO-IR 6 that is ASCII, the default repertoire, where pydicom has Latin-1; for
#: ISO-IR 13 (JIS X 0201) Shift-JIS, of which only its one-byte characters are in
#: the repertoire (:func:`in_repertoire`).
_SINGLE_BYTE_IR = {"6": "ascii", "13": "shift_jis", "100": "latin_1", "101": "iso8859_2",
                   "109": "iso8859_3", "110": "iso8859_4", "126": "iso_ir_126",
                   "127": "iso_ir_127", "138": "iso_ir_138", "144": "iso_ir_144",
                   "148": "iso_ir_148", "166": "iso_ir_166"}
#: Each single-byte term, with or without code extensions, and its codec; the empty
#: value is the default repertoire (PS3.3 C.12.1.1.2).
SINGLE_BYTE_CODECS: dict[str, str] = {"": "ascii"} | {
    f"{prefix} {number}": codec for number, codec in _SINGLE_BYTE_IR.items()
    for prefix in ("ISO_IR", "ISO 2022 IR")}
_ONE_BYTE_CODECS = frozenset(SINGLE_BYTE_CODECS.values())
#: Unique keys that name an answer in the log, deepest first (never patient data).
_NAMING_UIDS = ((0x00080018, "instance"), (0x0020000E, "series"), (0x0020000D, "study"))

log = logging.getLogger(__name__)


class _TooLong(Exception):
    """A value does not fit its 16-bit length field: the answer is encoded again, cut."""


def simple_codec(charsets: Sequence[str]) -> str | None:
    """The Python codec for a character set without code extensions, else ``None``.

    One single-byte term, ISO 2022 or not, needs no escape sequence (its code elements
    are those designated at the start of every value, PS3.5 6.1.2.5.3): its codec of
    :data:`SINGLE_BYTE_CODECS`.  One other term of ISO 2022 is left to pydicom.
    """
    if len(charsets) != 1:
        return None
    term = charsets[0]
    if term in SINGLE_BYTE_CODECS:
        return SINGLE_BYTE_CODECS[term]
    return None if term.startswith("ISO 2022") else charset.python_encoding.get(term)


def in_repertoire(character: str, term: str) -> bool:
    """Whether one term of Specific Character Set holds ``character`` (PS3.5 6.1.2).

    A single-byte term holds what its codec writes in one byte (Shift-JIS writes
    kanji in two, JIS X 0201 has none); a multi-byte term what its pydicom encoder
    writes (pydicom's own, strict, for JIS X 0208 and 0212).  An unknown term holds
    nothing.
    """
    single = SINGLE_BYTE_CODECS.get(term)
    codec = single or charset.python_encoding.get(term)
    if codec is None:
        return False
    try:
        encoded = _strict_encode(character, codec)
    except (UnicodeError, LookupError):
        return False
    return single is None or len(encoded) == 1


def _strict_encode(text: str, codec: str) -> bytes:
    """``text`` in ``codec``, through pydicom's encoder of it when it has one (those of
    JIS X 0201, 0208 and 0212 refuse what Python's codecs would write in another set)."""
    encoder = charset.custom_encoders.get(codec)
    return encoder(text) if encoder is not None else text.encode(codec)


def _value_bytes(vr: str, value: str | None, codec: str) -> bytes:
    """A value's bytes, padded to even length.

    Raises
    ------
    UnicodeEncodeError
        A text value outside the repertoire of ``codec`` (a single-byte term's codec
        writing a character in more than one byte counts as outside).
    """
    if value is None or value == "":
        return b""
    if vr in _BINARY:
        parts = value.split("\\")
        return b"".join(struct.pack(_BINARY[vr], int(p)) for p in parts if p.strip())
    raw = value.encode(codec if vr in _TEXT else "ascii")
    if vr in _TEXT and codec in _ONE_BYTE_CODECS and len(raw) != len(value):
        raise UnicodeEncodeError(codec, value, 0, len(value), "not one byte per character")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in _LONG:
        return struct.pack("<HH2s2xI", group, element, vr.encode(), len(value)) + value
    if len(value) > MAX_SHORT_LENGTH:
        raise _TooLong
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
    if codec is not None:
        try:
            return _encode_elements(ordered, codec, implicit)
        except UnicodeEncodeError:
            pass
        except _TooLong:
            try:
                return _encode_elements(fit_lengths(ordered, charsets), codec, implicit)
            except UnicodeEncodeError:
                pass
    return _encode_with_pydicom(ordered, charsets, implicit)


def _encode_elements(elements: Iterable[tuple[int, str, Any]], codec: str,
                     implicit: bool) -> bytes:
    return b"".join(
        _element(tag, vr, _sequence_bytes(value, codec, implicit) if vr == "SQ"
                 else _value_bytes(vr, value, codec), implicit)
        for tag, vr, value in elements)


def _sequence_bytes(items: list[Any] | None, codec: str, implicit: bool) -> bytes:
    """Items of defined length (PS3.5 7.5): (FFFE,E000), length, the item's elements."""
    encoded = []
    for item in items or []:
        body = _encode_elements(sorted(item), codec, implicit)
        encoded.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body)
    return b"".join(encoded)


def _encode_with_pydicom(elements: list[tuple[int, str, str | None]],
                         charsets: Sequence[str], implicit: bool) -> bytes:
    """The general path: pydicom's writer, which knows ISO 2022 escape sequences."""
    if not implicit:  # pydicom would send an over-long value as UN instead
        elements = fit_lengths(elements, charsets)
    dataset = _dataset(elements, implicit)
    dataset.SpecificCharacterSet = list(charsets) if len(charsets) > 1 else charsets[0]
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = implicit
    write_dataset(out, dataset)
    return out.getvalue()


def _dataset(elements: Iterable[tuple[int, str, Any]], implicit: bool) -> Dataset:
    """The elements as a pydicom data set.

    Only the text of the Specific Character Set goes through pydicom's conversion, and
    unvalidated; every other value is written as the bytes the direct path writes: a
    stored value pydicom cannot convert (``DS`` text that is no number) must not fail
    the answer, and pydicom's errors and warnings would quote it into the log.
    """
    dataset = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ":
            items = [_dataset(item, implicit) for item in value or []]
            dataset.add(DataElement(tag, vr, items, validation_mode=config.IGNORE))
        elif vr in _TEXT:
            dataset.add(DataElement(tag, vr, _typed(vr, value), validation_mode=config.IGNORE))
        else:
            raw = _ascii_bytes(vr, value)
            dataset[tag] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, implicit, True)
    return dataset


def _ascii_bytes(vr: str, value: str | None) -> bytes:
    """A value of the default repertoire; a stored character outside it becomes ``?``."""
    try:
        return _value_bytes(vr, value, "ascii")
    except UnicodeEncodeError:
        return _value_bytes(vr, (value or "").encode("ascii", "replace").decode(), "ascii")


def _typed(vr: str, value: str | None) -> object:
    if value is None or value == "":
        return None
    parts = value.split("\\")
    if vr == "PN":
        names = [PersonName(p, validation_mode=config.IGNORE) for p in parts]
        return names if len(names) > 1 else names[0]
    return parts if len(parts) > 1 else value


def fit_lengths(elements: list[tuple[int, str, Any]], charsets: Sequence[str]
                ) -> list[tuple[int, str, Any]]:
    """``elements`` with every value that Explicit VR cannot hold cut to fit.

    Each such value keeps its longest whole-character prefix whose encoding (in
    ``charsets``) fits :data:`MAX_SHORT_LENGTH` bytes; sequence items are fitted alike.
    Every cut is logged with the answer's deepest UID and the attribute's tag, never a
    value.
    """
    fitted: list[tuple[int, str, Any]] = []
    for tag, vr, value in elements:
        if vr == "SQ":
            value = [fit_lengths(sorted(item), charsets) for item in value or []]
        elif vr not in _LONG and value and len(value) * _MAX_BYTES_PER_CHARACTER > MAX_SHORT_LENGTH:
            size = _encoded_size(vr, value, charsets)
            if size > MAX_SHORT_LENGTH:
                value = _prefix(vr, value, charsets)
                log.warning("a C-FIND answer's (%04X,%04X) of %s is %d bytes, more than "
                            "Explicit VR's 16-bit length holds: sent cut to its first %d "
                            "characters", tag >> 16, tag & 0xFFFF, _naming(elements), size,
                            len(value))
        fitted.append((tag, vr, value))
    return fitted


def _encoded_size(vr: str, text: str, charsets: Sequence[str]) -> int:
    """Bytes of ``text`` as the answer encodes it (before padding)."""
    if vr in _BINARY:
        return len(_value_bytes(vr, text, "ascii")) if text else 0
    if vr not in _TEXT:
        return len(text.encode("ascii", "replace"))
    encodings = charset.convert_encodings(list(charsets) or ["ISO_IR 6"])
    if vr == "PN":
        # As pydicom writes a name: each component on its own (code extensions start
        # afresh after each delimiter, PS3.5 6.1.2.5.3), delimiters as one byte.
        parts = _PN_DELIMITERS.split(text)
        return sum(len(charset.encode_string(p, encodings)) for p in parts) + len(parts) - 1
    return len(charset.encode_string(text, encodings))


def _prefix(vr: str, text: str, charsets: Sequence[str]) -> str:
    """The longest prefix of ``text`` whose encoding fits :data:`MAX_SHORT_LENGTH`.

    A bisection on the number of characters: each character takes at least one byte,
    so the answer is at most :data:`MAX_SHORT_LENGTH` characters long.
    """
    fits, too_long = 0, min(len(text), MAX_SHORT_LENGTH) + 1
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if _encoded_size(vr, text[:middle], charsets) <= MAX_SHORT_LENGTH:
            fits = middle
        else:
            too_long = middle
    return text[:fits]


def _naming(elements: Iterable[tuple[int, str, Any]]) -> str:
    """The answer's entity for the log: its deepest UID (patients have none)."""
    uids = {tag: value for tag, _, value in elements if tag in dict(_NAMING_UIDS)}
    for tag, level in _NAMING_UIDS:
        if uids.get(tag):
            return f"{level} {uids[tag]}"
    return "a patient"
