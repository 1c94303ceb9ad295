"""pydicom helpers: read a Part 10 object's header, check it is whole, extract keys.

Ingest never decodes pixel data (malformed pixel data is where decoders break) and
never re-encodes: it reads the header with pydicom and walks the element lengths of the
data set to prove the object is complete.  The walk goes into the items of every
sequence (PS3.5 7.5, whichever way their lengths are encoded) and counts every header
it reads: a data set nested more than 64 levels deep, or holding more than
:data:`MAX_ELEMENTS` headers, is refused before pydicom reads it, since pydicom and
the metadata spend hundreds of bytes on each element, however small its value.

A deflated data set (Deflated Explicit VR Little Endian, PS3.5 A.5) is never inflated
whole: a few MB of deflate can stand for gigabytes.  It is inflated as a stream
(:class:`Inflater`, one chunk at a time, counted against the object size limit) while
the element lengths are walked (:func:`walk_deflated`); only the header before the
pixel data is kept, at most :data:`MAX_DEFLATED_HEADER` bytes, and that is all pydicom
reads.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterator, MutableSequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import cache, cached_property, lru_cache
from typing import Any, BinaryIO, Final, Literal, cast

import numpy as np
import pydicom
import pydicom.config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from pacs.core.attributes import ITEM_KEYS, Attribute, Level, case_folded_column, stored
from pacs.core.errors import InvalidUID, MediaDirectory, ObjectTooLarge, UnreadableData

#: PS3.5 9.1: components of digits separated by dots, no leading zero in a
#: multi-digit component, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def quiet_pydicom() -> None:
    """Stop pydicom's value validation on reading (process-wide, idempotent).

    Its warnings quote the offending value (``Invalid value for VR PN: '...'``), which
    puts patient data into the log at the default level; ingest validates what it needs
    (UIDs, completeness) itself and stores objects as received.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def valid_uid(value: str) -> bool:
    """True when ``value`` is a valid UID (PS3.5 9.1)."""
    return len(value) <= 64 and bool(_UID_RE.fullmatch(value))  # "$" alone allows a "\n"


def require_uid(value: Any, name: str) -> str:
    """Return ``value`` as a valid UID string or raise :class:`InvalidUID`."""
    text = str(value or "").strip("\0 ")
    if not valid_uid(text):
        raise InvalidUID(f"{name} is not a valid UID")
    return text


@dataclass(frozen=True)
class Identity:
    """Who an object is and how it is encoded, read from its own bytes.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid, study_uid, series_uid, transfer_syntax :
        Validated UIDs.
    dataset_offset :
        Where the data set starts in the Part 10 bytes (after the file meta).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    dataset_offset: int

    def identity(self) -> dict[str, Any]:
        """These fields by name (to build a subclass from another one)."""
        return {name: getattr(self, name) for name in Identity.__dataclass_fields__}


#: A walked element of the top level: (VR or ``None`` in implicit VR, value length as
#: encoded, value bytes, offset of the value in the data set).
_Walked = tuple[str | None, int, bytes, int]


class Elements:
    """The top level of a data set before its pixel data, as ingest reads it: each
    element's raw bytes by tag, and pydicom's data set built from them only when
    something needs more than raw bytes.

    A small instance's index values come from the raw bytes of a few dozen elements
    (:func:`extract`); pydicom's :class:`~pydicom.dataset.FileDataset` of the whole top
    level (a raw element and two tags per element, the encoding set attribute by
    attribute) took a third of its analysis.  It is built on first need: a value
    pydicom has to convert, a sequence, the DICOM JSON metadata (:attr:`dataset`).
    """

    def __init__(self, raw: dict[int, _Walked] | None, build: Callable[[], Dataset],
                 offset: int = 0, implicit: bool = False, little: bool = True) -> None:
        self._raw = raw
        self._build = build
        self._offset = offset
        self._implicit = implicit
        self._little = little

    @classmethod
    def of(cls, dataset: Dataset) -> Elements:
        """The elements of a data set pydicom has read already."""
        return cls(None, lambda: dataset)

    @property
    def raw(self) -> dict[int, _Walked] | None:
        """Each element as walked, by tag; ``None`` for a data set pydicom read."""
        return self._raw

    @property
    def little(self) -> bool:
        """True for a little endian encoding."""
        return self._little

    @cached_property
    def dataset(self) -> Dataset:
        """pydicom's data set of these elements (values decoded lazily by pydicom)."""
        return self._build()

    def get_item(self, tag: int) -> DataElement | RawDataElement | None:
        """The element of ``tag`` as read (raw), as ``Dataset.get_item`` gives it;
        ``None`` when absent."""
        if self._raw is None:
            element: DataElement | RawDataElement | None = self.dataset.get_item(
                BaseTag(tag))
            return element
        found = self._raw.get(int(tag))  # a pydicom tag compares slowly
        if found is None:
            return None
        vr, length, value, start = found
        return RawDataElement(BaseTag(tag), vr, length, value, self._offset + start,
                              self._implicit, self._little)

    def __getitem__(self, tag: int) -> DataElement:
        """The element of ``tag`` converted by pydicom (``KeyError`` when absent)."""
        return self.dataset[tag]

    @property
    def original_character_set(self) -> str | MutableSequence[str]:
        """The character set the values are encoded in (pydicom's encodings)."""
        return self.dataset.original_character_set


@dataclass(frozen=True)
class Instance(Identity):
    """What ingest needs to know about one received object: its identity and header.

    Attributes
    ----------
    elements :
        The data set without pixel data (:class:`Elements`; :attr:`header` as pydicom
        reads it).
    unambiguous :
        No top-level tag repeats, and none after the pixel data belongs before it
        (PS3.5 7.1 has them ascend, each once).  Ingest refuses an object that breaks
        this (:mod:`pacs.core.ingest`): the index reads the header, which stops at the
        pixel data, where readers of the object would take a later or repeated element
        (another Study or SOP Instance UID, another patient).  Elements merely out of
        order before the pixel data, which every reader sorts alike, are taken.
        Objects already stored are read as they are.
    pixel_mismatch :
        Why the Pixel Data's encoding contradicts the transfer syntax (encapsulated
        under a native one, or the other way round: PS3.5 A.4), ``None`` when it does
        not.  Ingest refuses such an object; one already stored is read as it is
        (``pacs reindex`` and ``pacs fsck`` keep what was acknowledged).
    """

    elements: Elements
    unambiguous: bool = True
    pixel_mismatch: str | None = None

    @property
    def header(self) -> Dataset:
        """The data set without pixel data, as pydicom reads it (values decoded
        lazily)."""
        return self.elements.dataset


#: Media Storage SOP Class UID of a DICOMDIR (PS3.4 Annex I, PS3.10 8.6).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def read_part10(data: bytes | memoryview, max_object_bytes: int | None = None) -> Instance:
    """Parse a Part 10 object's header and prove the data set is complete.

    Parameters
    ----------
    data :
        The object as received.
    max_object_bytes :
        Largest object accepted, as received and, for a deflated data set, once
        inflated (``PACS_MAX_OBJECT_BYTES``); ``None`` for no limit.

    Raises
    ------
    UnreadableData
        Not a Part 10 object, a header that does not parse, or a truncated data set.
    ObjectTooLarge
        Larger than ``max_object_bytes`` (as received or inflated), or a deflated data
        set whose header before the pixel data is larger than
        :data:`MAX_DEFLATED_HEADER`.
    InvalidUID
        A SOP Class, SOP Instance, Study or Series Instance UID that is not valid.
    MediaDirectory
        A DICOMDIR, by its file meta's Media Storage SOP Class UID.
    """
    buffer = bytes(data) if isinstance(data, memoryview) else data
    if max_object_bytes is not None and len(buffer) > max_object_bytes:
        raise ObjectTooLarge(f"the object is larger than {max_object_bytes} bytes")
    if len(buffer) < 132 or buffer[128:132] != b"DICM":
        raise UnreadableData("not a DICOM Part 10 object (no preamble and DICM prefix)")
    offset = dataset_offset(buffer)
    if meta_value(buffer, offset, 0x00020002) == MEDIA_STORAGE_DIRECTORY:
        raise MediaDirectory("a DICOMDIR (a medium's directory), not an instance")
    found = meta_transfer_syntax(buffer, offset)
    elements: Elements | None
    pixel_mismatch: str | None = None
    if found == DeflatedExplicitVRLittleEndian:
        header, unambiguous = _read_deflated(buffer[:offset], memoryview(buffer)[offset:],
                                         max_object_bytes)
        elements = Elements.of(header)
        transfer_syntax = str(DeflatedExplicitVRLittleEndian)
    else:
        if found is None:
            raise UnreadableData("the file meta has no Transfer Syntax UID")
        transfer_syntax = require_uid(found, "TransferSyntaxUID")
        elements, unambiguous, pixel_mismatch = _walked_header(buffer, offset,
                                                               transfer_syntax)
        if elements is None:
            # An encoding the walk leaves to pydicom (an unknown transfer syntax, an
            # undefined length outside a sequence): the walk proves it whole and
            # counts its elements (MAX_ELEMENTS) before pydicom reads it.
            unambiguous = check_complete(memoryview(buffer)[offset:], transfer_syntax)
            try:
                elements = Elements.of(
                    pydicom.dcmread(io.BytesIO(buffer), stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
                raise UnreadableData(
                    f"the data set does not parse: {type(exc).__name__}") from None
    try:
        sop_class, sop_instance, study, series = (
            _uid_value(elements, tag) for tag in _IDENTIFYING_TAGS)
    except Exception:  # noqa: BLE001 - any failure to decode a UID value
        raise UnreadableData("the identifying attributes do not parse") from None
    return Instance(
        elements=elements,
        sop_class_uid=require_uid(sop_class, "SOPClassUID"),
        sop_instance_uid=require_uid(sop_instance, "SOPInstanceUID"),
        study_uid=require_uid(study, "StudyInstanceUID"),
        series_uid=require_uid(series, "SeriesInstanceUID"),
        transfer_syntax=transfer_syntax,
        dataset_offset=offset,
        unambiguous=unambiguous,
        pixel_mismatch=pixel_mismatch,
    )


#: What pydicom raises for an element whose value it cannot decode: an unknown VR
#: (NotImplementedError), bytes or text its VR does not allow, a term of Specific
#: Character Set with a NUL (ValueError, UnicodeError), an unknown codec (LookupError),
#: a binary value of the wrong length (struct.error).  An index value that does not
#: decode is indexed as unknown; a character set or a rejection note that does not
#: makes the object unreadable (:class:`UnreadableData`).
DECODING_ERRORS = (NotImplementedError, ValueError, LookupError, struct.error, OverflowError)

#: SOP Class, SOP Instance, Study and Series Instance UID.
_IDENTIFYING_TAGS = tuple(BaseTag(tag) for tag in (0x00080016, 0x00080018, 0x0020000D,
                                                  0x0020000E))


def _uid_value(header: Dataset | Elements, tag: BaseTag) -> Any:
    """A UI element's value, from its raw bytes when pydicom has not converted it (as
    pydicom would: the default character repertoire, PS3.5 6.1.2.2), else as converted;
    ``""`` when absent.  :func:`require_uid` validates it."""
    element: DataElement | RawDataElement | None = header.get_item(tag)
    if element is None:
        return ""
    if type(element) is RawDataElement and isinstance(element.value, bytes):
        return element.value.decode("latin_1")
    return header[tag].value


#: Bytes at the start of an object that hold its file meta (and so its transfer
#: syntax) in practice.
HEAD_PROBE_BYTES = 64 << 10


def read_header(buffer: bytes) -> Dataset:
    """The header (data set without pixel data) of a stored Part 10 object, as pydicom
    reads it with ``stop_before_pixels``, but never inflating a deflated data set
    whole (:func:`walk_deflated`).

    Raises
    ------
    UnreadableData
        When it does not parse.
    ObjectTooLarge
        A deflated header over :data:`MAX_DEFLATED_HEADER`.
    """
    offset = dataset_offset(buffer)
    if meta_transfer_syntax(buffer, offset) == DeflatedExplicitVRLittleEndian:
        return _read_deflated(buffer[:offset], memoryview(buffer)[offset:], None)[0]
    try:
        return pydicom.dcmread(io.BytesIO(buffer), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for malformed input
        raise UnreadableData(f"the data set does not parse: {type(exc).__name__}") from None


def meta_transfer_syntax(buffer: bytes, offset: int) -> str | None:
    """The Transfer Syntax UID (0002,0010) of the file meta that ends at ``offset``,
    read from the bytes (explicit VR little endian, PS3.10 7.1); ``None`` if absent."""
    return meta_value(buffer, offset, 0x00020010)


def meta_value(buffer: bytes, offset: int, tag: int) -> str | None:
    """The text of element ``tag`` of the file meta that ends at ``offset`` (explicit
    VR little endian, PS3.10 7.1), without its padding; ``None`` if absent."""
    end = min(offset, len(buffer))
    position = 132
    while position + 12 <= end:
        group, element = struct.unpack_from("<HH", buffer, position)
        if buffer[position + 4:position + 6] in LONG_VRS:
            start, length = position + 12, struct.unpack_from("<I", buffer, position + 8)[0]
        else:
            start, length = position + 8, struct.unpack_from("<H", buffer, position + 6)[0]
        if (group << 16) | element == tag:
            return buffer[start:start + length].decode("ascii", "replace").strip("\0 ")
        position = start + length
    return None


def read_deflated_header(source: BinaryIO, head: bytes, offset: int) -> FileDataset:
    """:func:`read_header` of a stored deflated object read from ``source``: ``head``
    holds its file meta, which ends at ``offset``; the deflate stream is read a feed at
    a time, so the stored object is never held whole either.

    Raises
    ------
    UnreadableData
        When it does not parse.
    ObjectTooLarge
        A header over :data:`MAX_DEFLATED_HEADER`.
    """
    source.seek(offset)
    return _read_deflated(head[:offset], source, None)[0]


def _read_deflated(meta_bytes: bytes, deflated: memoryview | BinaryIO,
                   max_object_bytes: int | None) -> tuple[FileDataset, bool]:
    """The header of a deflated object (``meta_bytes``: preamble and file meta), proven
    whole, inflated no further than needed, and whether its top level is unambiguous
    (:attr:`Instance.unambiguous`).

    The walk (:func:`walk_deflated`) proves the data set complete and keeps the bytes
    before the pixel data; pydicom reads only those, as the explicit VR little endian
    data set they are (PS3.5 A.5), and the file meta from the object itself.
    """
    walked = walk_deflated(deflated, max_object_bytes)
    try:
        source = io.BytesIO(meta_bytes)
        source.seek(132)
        meta = FileMetaDataset(read_dataset(source, is_implicit_VR=False,
                                            is_little_endian=True,
                                            stop_when=_not_file_meta))
        dataset = read_dataset(io.BytesIO(walked.header), is_implicit_VR=False,
                               is_little_endian=True)
        header = FileDataset(io.BytesIO(walked.header), dataset, preamble=meta_bytes[:128],
                             file_meta=meta, is_implicit_VR=False, is_little_endian=True)
        # Decode values as pydicom would after inflating the whole data set.
        header.set_original_encoding(False, True, dataset.original_character_set)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for malformed input
        raise UnreadableData(f"the data set does not parse: {type(exc).__name__}") from None
    return header, walked.unambiguous


def _not_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def dataset_offset(buffer: bytes) -> int:
    """Offset of the data set: after the file meta group (always explicit VR LE)."""
    position = 132
    while position + 8 <= len(buffer):
        group = struct.unpack_from("<H", buffer, position)[0]
        if group != 0x0002:
            return position
        vr = buffer[position + 4:position + 6]
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", buffer, position + 8)[0]
            position += 12 + length
        else:
            length = struct.unpack_from("<H", buffer, position + 6)[0]
            position += 8 + length
    return position


#: VRs whose explicit length is 32 bits, after two reserved bytes (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


#: Most element, item and delimiter headers a data set may hold, at every depth.
#: Each costs pydicom a few hundred bytes as it is read, and its DICOM JSON as many
#: again: 1.7 million private LO elements of two characters (16 MiB) took 5.6 s and
#: 864 MB to read and 1.6 GB to encode, so that objects within any object limit could
#: take gigabytes each.  The largest real headers (an RT Structure Set of 50 000
#: contours, an enhanced multi-frame image's per-frame groups) hold a few hundred
#: thousand; more is refused like an object too large.
MAX_ELEMENTS = 1 << 20


def _too_many(limit: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"the data set holds more than {limit} elements")


#: Top-level tags :class:`TopLevel` keeps (256 KiB).
TOP_LEVEL_KEPT = 1 << 16


class TopLevel:
    """The tags of a data set's top level as a walk meets them: unambiguous while no
    tag repeats and none after the pixel data sorts before it (:attr:`Instance.
    unambiguous`).

    The tags are kept 4 bytes each, the first :data:`TOP_LEVEL_KEPT` of them (real
    objects have hundreds at the top level; a walk may meet ``MAX_ELEMENTS``), and
    looked through for a repeat only when they did not all ascend, the usual case; a
    top level of more that does not ascend counts as ambiguous.
    """

    def __init__(self) -> None:
        self._tags = array("I")
        self._previous = -1
        self._disordered = False
        self._late = False  # a header element after the pixel data
        self._pixels: int | None = None

    def see(self, tag: int) -> None:
        """The next top-level tag."""
        if tag <= self._previous:
            self._disordered = True
            if self._pixels is not None and tag < self._pixels:
                self._late = True
        self._previous = tag
        if len(self._tags) < TOP_LEVEL_KEPT:
            self._tags.append(tag)
        if self._pixels is None and tag in _PIXEL_TAGS:
            self._pixels = tag

    @property
    def unambiguous(self) -> bool:
        """No tag repeated, none of the header after the pixel data."""
        if self._late:
            return False
        if not self._disordered:
            return True
        if len(self._tags) >= TOP_LEVEL_KEPT:
            return False
        tags = np.frombuffer(self._tags, dtype=np.uint32)
        return len(np.unique(tags)) == len(tags)


class _Walker:
    """Walks element lengths of an encoded data set to prove it is not truncated, and
    counts its headers (:data:`MAX_ELEMENTS`), sequences of defined length included."""

    def __init__(self, data: memoryview, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.size = len(data)
        self.limit = self.headers_left = MAX_ELEMENTS
        #: The top level, as far as walked (:class:`TopLevel`).
        self.tags = TopLevel()
        self.little = little
        order = "<" if little else ">"
        # Compiled once: a walk reads tens of headers per object (ingest's hot path).
        self._tag_length = struct.Struct(order + "HHI")  # implicit VR, items, delimiters
        self._short = struct.Struct(order + "HH2sH")  # explicit VR, 16-bit length
        self._long = struct.Struct(order + "HH2s2xI")  # explicit VR, 32-bit length

    def _need(self, position: int, size: int) -> None:
        if position + size > self.size:
            raise UnreadableData("the data set is truncated")

    def _header(self, position: int) -> tuple[int, bytes | None, int, int]:
        """Return (tag, VR, value length, header size) at ``position``.

        Raises
        ------
        ObjectTooLarge
            One header more than :data:`MAX_ELEMENTS` allows.
        """
        if position + 8 > self.size:
            raise UnreadableData("the data set is truncated")
        self.headers_left -= 1
        if self.headers_left < 0:
            raise _too_many(self.limit)
        if self.implicit:
            group, element, length = self._tag_length.unpack_from(self.data, position)
            return (group << 16) | element, None, length, 8
        group, element, vr, length = self._short.unpack_from(self.data, position)
        if group == 0xFFFE:  # items and delimiters have no VR (PS3.5 7.5)
            group, element, length = self._tag_length.unpack_from(self.data, position)
            return (group << 16) | element, None, length, 8
        if vr in LONG_VRS:
            if position + 12 > self.size:
                raise UnreadableData("the data set is truncated")
            return (group << 16) | element, vr, self._long.unpack_from(
                self.data, position)[3], 12
        return (group << 16) | element, vr, length, 8

    def dataset(self, position: int, end: int | None, depth: int = 0) -> int:
        """Walk elements from ``position`` to ``end`` (or an item delimiter)."""
        if depth > 64:
            raise UnreadableData("sequences nested too deeply")
        limit = len(self.data) if end is None else end
        while position < limit:
            tag, vr, length, size = self._header(position)
            position += size
            if depth == 0:  # the top level (items' data sets are walked one deeper)
                self.tags.see(tag)
            if tag == _ITEM_END:
                if end is not None:
                    raise UnreadableData("unexpected item delimiter")
                return position
            if vr is not None and _switches_readers(vr):
                raise _unknown_vr()
            if length == _UNDEFINED:
                position = self._undefined(position, depth, _undefined_kind(tag, vr))
            else:
                self._need(position, length)
                if vr == b"SQ" or (vr is None and _sequence_tag(tag)):
                    self._items(position, position + length, depth)
                position += length
        if position != limit:
            raise UnreadableData("an element overruns its item")
        return position

    def top_level(self) -> tuple[dict[int, _Walked], int] | None:
        """Walk the whole data set (as :meth:`dataset`), keeping its top-level elements
        before the pixel data: ``(VR, length, value, value offset)`` by tag (the last
        of a repeated tag, which ingest refuses), and the offset where the pixel data
        element (or the end) is; ``None`` when an element needs pydicom's own reading
        (see :func:`_walked_header`), or the header holds more than
        :data:`TOP_LEVEL_KEPT` elements (:func:`check_complete` then walks it counting
        only)."""
        data, end = self.data, len(self.data)
        kept: dict[int, _Walked] = {}
        position, pixel_at = 0, None
        see = self.tags.see
        while position < end:
            start = position
            tag, vr_bytes, length, size = self._header(position)
            position += size
            see(tag)  # the walk goes on whatever it finds: ingest refuses, readers read
            if tag >> 16 == 0xFFFE:
                return None  # an item or delimiter outside a sequence: malformed
            vr = None if vr_bytes is None else _VR_NAMES.get(vr_bytes)
            if vr_bytes is not None and vr is None:
                if _switches_readers(vr_bytes):
                    raise _unknown_vr()
                return None  # a VR of letters this walk does not know: pydicom's reading
            if length == _UNDEFINED:
                kind = _undefined_kind(tag, vr_bytes)
                if pixel_at is None and tag not in _PIXEL_TAGS and (
                        vr or _dictionary_vr(tag)) != "SQ":
                    return None  # a sequence of UN or private items: pydicom's reading
                value_end = self._undefined(position, 0, kind)
                # The items, without the sequence delimiter (pydicom reads to the end).
                value_length = value_end - 8 - position
            else:
                self._need(position, length)
                value_end, value_length = position + length, length
                if vr == "SQ" or (vr_bytes is None and _sequence_tag(tag)):
                    self._items(position, value_end, 0)
            if pixel_at is None:
                if tag in _PIXEL_TAGS:
                    pixel_at = start
                elif len(kept) >= TOP_LEVEL_KEPT:
                    # Wider than any real header (hundreds of elements): kept, a million
                    # tiny ones would cost hundreds of MB before the count refuses them.
                    return None
                else:
                    kept[tag] = (vr, length, bytes(data[position:position + value_length]),
                                 position)
            position = value_end
        if position != end:
            raise UnreadableData("an element overruns its item")
        return kept, end if pixel_at is None else pixel_at

    def _items(self, position: int, end: int, depth: int) -> None:
        """Walk the items of a sequence of defined length, from ``position`` to
        ``end``: their elements count, and nest, like those of undefined length."""
        while position < end:
            tag, _, item_length, size = self._header(position)
            position += size
            if tag != _ITEM:
                raise UnreadableData("malformed sequence")
            if item_length == _UNDEFINED:
                position = self.dataset(position, None, depth + 1)
            else:
                self._need(position, item_length)
                position = self.dataset(position, position + item_length, depth + 1)
        if position != end:
            raise UnreadableData("an item overruns its sequence")

    def _undefined(self, position: int, depth: int, kind: _Undefined) -> int:
        """Walk the items of a sequence of undefined length (``kind``: their elements
        counted, and nested, as any), or the fragments of encapsulated pixel data."""
        while True:
            tag, _, length, size = self._header(position)
            position += size
            if tag == _SEQ_END:
                return position
            if tag != _ITEM:
                raise UnreadableData("malformed sequence or pixel data fragments")
            if kind is _Undefined.FRAGMENTS:
                if length == _UNDEFINED:
                    raise UnreadableData("a pixel data fragment of undefined length")
                self._need(position, length)
                position += length
                continue
            with self._items_in(kind):
                if length == _UNDEFINED:
                    position = self.dataset(position, None, depth + 1)
                else:
                    self._need(position, length)
                    position = self.dataset(position, position + length, depth + 1)

    @contextmanager
    def _items_in(self, kind: _Undefined) -> Iterator[None]:
        """The items of a UN sequence read in implicit VR little endian (PS3.5 6.2.2),
        any other in the data set's own encoding."""
        if kind is not _Undefined.UN_SEQUENCE or self.implicit:
            yield
            return
        if not self.little:
            raise UnreadableData("a UN sequence in a big endian data set")
        self.implicit = True
        try:
            yield
        finally:
            self.implicit = False


def check_complete(dataset: memoryview, transfer_syntax: str,
                   max_inflated: int | None = None) -> bool:
    """Raise :class:`UnreadableData` unless the encoded data set is whole; return
    whether its top level is unambiguous (:attr:`Instance.unambiguous`).

    Every element's value must fit in the bytes received and the last one must end
    exactly at the end of the object.  A deflated data set is walked as a stream
    (:func:`walk_deflated`), inflating at most ``max_inflated`` bytes
    (:class:`ObjectTooLarge` beyond).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return walk_deflated(dataset, max_inflated, header_limit=None).unambiguous
    walker = _Walker(
        dataset,
        implicit=transfer_syntax == ImplicitVRLittleEndian,
        little=transfer_syntax != ExplicitVRBigEndian,
    )
    walker.dataset(0, len(dataset))
    return walker.tags.unambiguous


#: Transfer syntaxes whose data set :func:`_walked_header` reads: (implicit VR, little
#: endian).  Any other (deflated, encapsulated or not) has the encoding of explicit VR
#: little endian (PS3.5 A.4, 10.1) unless it is deflated, which has its own reader.
_NATIVE_ENCODINGS: dict[str, tuple[bool, bool]] = {
    ImplicitVRLittleEndian: (True, True), ExplicitVRBigEndian: (False, False)}
#: VRs a walked element may have (PS3.5 6.2); anything else is left to pydicom.
_KNOWN_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
    "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
    "UL", "UN", "UR", "US", "UT", "UV"})
#: The same, by their two bytes as encoded.
_VR_NAMES = {vr.encode("ascii"): vr for vr in _KNOWN_VRS}


class _Undefined(Enum):
    """What an element of undefined length holds."""

    SEQUENCE = "items of a sequence"
    UN_SEQUENCE = "items of a sequence of VR UN, in implicit VR little endian"
    FRAGMENTS = "fragments of encapsulated pixel data"


def _undefined_kind(tag: int, vr: bytes | None) -> _Undefined:
    """What an element of undefined length (``vr`` None: implicit VR) holds: items of a
    sequence (VR SQ; in implicit VR a tag the dictionary makes one, or does not know,
    PS3.5 7.5.1, 6.2.2), of a UN sequence (6.2.2), or pixel data fragments (A.4).

    Raises
    ------
    UnreadableData
        Any other element: PS3.5 7.1.2 allows undefined length to these alone, and what
        follows one would be read by one reader as its value and by another as items
        or elements (a value that hides elements from this walk, or indexes others).
    """
    if tag in _PIXEL_TAGS:
        return _Undefined.FRAGMENTS
    if vr == b"SQ" or (vr is None and (_sequence_tag(tag) or _dictionary_vr(tag)
                                       in (None, "UN"))):
        return _Undefined.SEQUENCE
    if vr == b"UN":
        return _Undefined.UN_SEQUENCE
    raise UnreadableData("an element of undefined length that is not a sequence "
                         "(PS3.5 7.1.2)")


def _switches_readers(vr: bytes) -> bool:
    """True for VR bytes that are not two capital letters: pydicom then reads the data
    set on in implicit VR, where this walk reads a 16-bit length, and the two would
    see different elements (a VR of letters it does not know, both read alike)."""
    return vr not in _VR_NAMES and not b"AA" <= vr <= b"ZZ"


def _unknown_vr() -> UnreadableData:
    """The refusal of an element whose explicit VR is not two capital letters (PS3.5
    6.2): its length would be each reader's guess."""
    return UnreadableData("an element whose VR is not two capital letters (PS3.5 6.2)")


@lru_cache(maxsize=4096)
def _sequence_tag(tag: int) -> bool:
    """True when the dictionary makes ``tag`` a sequence (looked up once per tag: the
    walk of an implicit VR data set asks for every element)."""
    return _dictionary_vr(tag) == "SQ"


def _dictionary_vr(tag: int) -> str | None:
    """The VR the data dictionary gives ``tag`` (implicit VR data sets), if any."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _walked_header(buffer: bytes, offset: int,
                   transfer_syntax: str) -> tuple[Elements | None, bool, str | None]:
    """The header (the data set before its pixel data) of a Part 10 object, read by the
    walk that proves the data set whole (:class:`_Walker`), in one pass.

    The header holds the raw elements (:class:`Elements`); its pydicom data set, built
    when first needed, holds them as ``dcmread(stop_before_pixels=True)`` leaves them:
    the same values at a fraction of the time (pydicom's reader decodes every sequence
    and the file meta on the way, most of a small instance's ingest CPU).  That data
    set's ``buffer`` is positioned at the pixel data element, as pydicom's is
    (:func:`pacs.core.metadata.prepare` reads it there).  ``None`` when the data set
    holds what pydicom should interpret itself: an unknown VR, or an undefined length
    on an element that is not a sequence.  With it, whether the top level is
    unambiguous (:attr:`Instance.unambiguous`; ``True`` with ``None``), and why the
    Pixel Data's encoding contradicts the syntax (:attr:`Instance.pixel_mismatch`).

    Raises
    ------
    UnreadableData
        When the data set is truncated or malformed (:func:`check_complete`), or its
        Specific Character Set does not decode.
    """
    known = transfer_syntax in _NATIVE_ENCODINGS or UID(transfer_syntax).is_transfer_syntax
    if transfer_syntax == DeflatedExplicitVRLittleEndian or not known:
        return None, True, None
    implicit, little = _NATIVE_ENCODINGS.get(transfer_syntax, (False, True))
    walker = _Walker(memoryview(buffer)[offset:], implicit, little)
    walked = walker.top_level()
    if walked is None:
        return None, True, None
    raw, pixel_at = walked
    pixel_mismatch = _pixel_mismatch(walker, pixel_at, transfer_syntax, raw, little)
    # The character set is read now, whatever needs the data set later: one that does
    # not decode makes the object unreadable.
    charset = raw.get(_SPECIFIC_CHARACTER_SET)
    try:
        encodings = list(_encodings(None if charset is None else charset[:3],
                                    implicit, little))
    except DECODING_ERRORS as exc:  # a NUL in a term, a value that is not text
        raise UnreadableData("the Specific Character Set does not decode "
                             f"({type(exc).__name__})") from None

    def build() -> Dataset:
        position = io.BytesIO(buffer)
        position.seek(offset + pixel_at)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = UID(transfer_syntax)
        header = FileDataset(position, {
            BaseTag(tag): RawDataElement(BaseTag(tag), vr, length, value, offset + start,
                                         implicit, little)
            for tag, (vr, length, value, start) in raw.items()},
            preamble=buffer[:128], file_meta=meta, is_implicit_VR=implicit,
            is_little_endian=little)
        # As dcmread records it: the encoding read, for a writer that keeps it.
        header.set_original_encoding(implicit, little, encodings)
        return header

    return (Elements(raw, build, offset, implicit, little), walker.tags.unambiguous,
            pixel_mismatch)


@lru_cache(maxsize=64)
def _encapsulates(transfer_syntax: str) -> bool:
    """Whether ``transfer_syntax`` encapsulates Pixel Data (pydicom's table; asked once
    per syntax: a UID object each time costs more than the rest of the check)."""
    return bool(UID(transfer_syntax).is_encapsulated)


def _pixel_mismatch(walker: _Walker, pixel_at: int, transfer_syntax: str,
                    header: dict[int, _Walked], little: bool) -> str | None:
    """Why Pixel Data (7FE0,0010) cannot be read as its object declares it, or
    ``None``: encapsulated, of undefined length, under a syntax that encapsulates it,
    of a defined length under a native one (PS3.5 A.4, A.1), and native, at least as
    long as the frames the ``header``'s image attributes declare (PS3.5 8.1.1).
    Stored, such an object is read by no one as it was meant: a decoder takes native
    bytes for a codestream, a reader of native frames takes the items' headers for
    pixels, or finds its last frames cut off (longer is read: padding, PS3.5 8.1.1)."""
    if pixel_at >= len(walker.data):
        return None
    tag, _, length, _ = walker._header(pixel_at)
    if tag != _PIXEL_DATA:
        return None
    encapsulated = _encapsulates(transfer_syntax)
    if (length == _UNDEFINED) != encapsulated:
        found, wanted = ("native", "encapsulated") if encapsulated else (
            "encapsulated", "native")
        return (f"the Pixel Data is {found} where its transfer syntax has it {wanted} "
                "(PS3.5 A.4)")
    declared = None if encapsulated else _native_bytes(header, little)
    if declared is not None and length < declared:
        return (f"the Pixel Data holds {length} bytes where the image attributes declare "
                f"{declared} (PS3.5 8.1.1)")
    return None


#: Rows, Columns, Samples per Pixel, Bits Allocated (US), Number of Frames (IS),
#: Photometric Interpretation (CS).
_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_FRAMES, _PHOTOMETRIC = 0x00280008, 0x00280004


def _native_bytes(header: dict[int, _Walked], little: bool) -> int | None:
    """The bytes of native Pixel Data the image attributes of ``header`` (as walked)
    declare, or ``None`` when one is missing or does not read (nothing to check
    against): Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of
    Frames, bits packed when one bit is allocated (PS3.5 8.1.1, 8.2); two samples'
    worth per pixel for YBR_FULL_422 and YBR_PARTIAL_422 (PS3.3 C.7.6.3.1.2)."""
    order = "<" if little else ">"
    numbers = []
    for tag in (_ROWS, _COLUMNS, _BITS_ALLOCATED):
        found = header.get(tag)
        if found is None or len(found[2]) != 2:
            return None
        numbers.append(struct.unpack(order + "H", found[2])[0])
    rows, columns, bits = numbers
    samples = header.get(_SAMPLES)
    per_pixel = struct.unpack(order + "H", samples[2])[0] if samples is not None \
        and len(samples[2]) == 2 else 1
    photometric = header.get(_PHOTOMETRIC)
    if photometric is not None:
        name = photometric[2].strip(b" \0")
        if name.endswith(b"_422"):  # YBR_FULL_422, the retired YBR_PARTIAL_422
            per_pixel = 2
        elif name.endswith(b"_420"):  # compressed only (PS3.3 C.7.6.3.1.2)
            return None
    frames = 1
    if (found := header.get(_FRAMES)) is not None:
        text = found[2].strip(b" \0")
        if not text.isdigit():
            return None
        frames = int(text)
    if bits not in (1, 8, 16, 32, 64):
        return None
    values = int(rows) * int(columns) * int(per_pixel) * frames
    return (values + 7) // 8 if bits == 1 else values * (bits // 8)


#: Longest Specific Character Set value whose encodings are kept between objects: a
#: real one is a few terms of at most 16 bytes (PS3.5 6.2, CS); a longer one, as long
#: as an implicit VR length lets a sender make it, is converted for its object alone.
CACHED_CHARSET_BYTES = 256


def _encodings(charset: tuple[str | None, int, bytes] | None, implicit: bool,
               little: bool) -> tuple[str, ...]:
    """Python's encodings of a Specific Character Set element as encoded (VR, length,
    value), as pydicom reads them; computed once per value (objects of one source
    share it, and pydicom builds a data set to convert it) unless it is longer than
    :data:`CACHED_CHARSET_BYTES`."""
    if charset is not None and len(charset[2]) > CACHED_CHARSET_BYTES:
        return _converted_encodings(charset, implicit, little)
    return _cached_encodings(charset, implicit, little)


def _converted_encodings(charset: tuple[str | None, int, bytes] | None, implicit: bool,
                         little: bool) -> tuple[str, ...]:
    """:func:`_encodings`, computed."""
    if charset is None:
        return tuple(convert_encodings(None))
    element = RawDataElement(_SPECIFIC_CHARACTER_SET, *charset, 0, implicit, little)
    return tuple(convert_encodings(
        Dataset({_SPECIFIC_CHARACTER_SET: element})[_SPECIFIC_CHARACTER_SET].value))


_cached_encodings = lru_cache(maxsize=64)(_converted_encodings)


# --- deflated data sets (PS3.5 A.5), as a stream -------------------------------------

#: Inflated bytes produced per zlib call: the most of a deflated data set held at once
#: while it is walked (beside the header kept for pydicom).
INFLATE_CHUNK = 1 << 20
#: Deflated bytes given to zlib per call (its unconsumed input is copied each call).
_FEED_BYTES = 1 << 16
#: Largest header (the data set before its pixel data) of a deflated object that is
#: kept for pydicom.  Real deflated objects are structured reports and small images
#: whose header is a few KB; a larger one is refused (:class:`ObjectTooLarge`) rather
#: than held in memory.
MAX_DEFLATED_HEADER = 64 << 20
#: Pixel data tags (PS3.5 7.1: Float, Double Float and Pixel Data), where pydicom's
#: ``stop_before_pixels`` stops.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


class Inflater:
    """A raw deflate stream inflated chunk by chunk, its output counted.

    Parameters
    ----------
    deflated :
        The deflated bytes: a view (nothing is copied but one feed at a time), or a
        stream at their first byte, read one feed at a time.
    limit :
        Most inflated bytes allowed (:class:`ObjectTooLarge` past it); ``None``: any.
    chunk :
        Most inflated bytes returned by one :meth:`read`.
    """

    def __init__(self, deflated: memoryview | BinaryIO, limit: int | None,
                 chunk: int = INFLATE_CHUNK) -> None:
        self._feeds = (_slices(deflated) if isinstance(deflated, memoryview)
                       else _reads(deflated))
        self._exhausted = False
        self._pending: bytes | memoryview = b""
        self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self.limit = limit
        self.chunk = chunk
        #: Inflated bytes produced so far.
        self.inflated = 0

    def read(self) -> bytes:
        """The next inflated bytes (at most ``chunk``); ``b""`` once the deflate stream
        has ended.  Bytes after its end (PS3.5 A.5 allows a pad byte) are ignored.

        Raises
        ------
        UnreadableData
            The deflate stream is corrupt, or the object ends before it does.
        ObjectTooLarge
            More than ``limit`` bytes inflated.
        """
        while not self._zlib.eof:
            if not self._pending and not self._exhausted:
                self._pending = next(self._feeds, b"")
                self._exhausted = not self._pending
            try:
                # Also without new input: zlib may hold output back for max_length.
                out = self._zlib.decompress(self._pending, self.chunk)
            except zlib.error:
                raise UnreadableData("the deflated data set does not inflate") from None
            self._pending = self._zlib.unconsumed_tail
            if out:
                self.inflated += len(out)
                if self.limit is not None and self.inflated > self.limit:
                    raise ObjectTooLarge(
                        f"the deflated data set inflates to more than {self.limit} bytes")
                return out
            if not self._pending and self._exhausted and not self._zlib.eof:
                raise UnreadableData("the deflated data set is truncated")
        return b""


def _slices(view: memoryview) -> Iterator[memoryview]:
    """``view`` a feed at a time."""
    for at in range(0, len(view), _FEED_BYTES):
        yield view[at:at + _FEED_BYTES]


def _reads(stream: BinaryIO) -> Iterator[bytes]:
    """The rest of ``stream``, a feed at a time."""
    while piece := stream.read(_FEED_BYTES):
        yield piece


@contextmanager
def inflated_copy(source: BinaryIO, offset: int, limit: int | None,
                  chunk: int = INFLATE_CHUNK) -> Iterator[BinaryIO]:
    """The deflated data set (PS3.5 A.5) that starts at ``offset`` of ``source``,
    inflated ``chunk`` bytes at a time into a temporary file, at its start: a few KB
    stored may inflate to ``PACS_MAX_OBJECT_BYTES``, which is never held in memory.

    Raises
    ------
    ObjectTooLarge
        It inflates past ``limit``.
    UnreadableData
        The deflate stream is corrupt or truncated.
    """
    source.seek(offset)
    inflater = Inflater(source, limit, chunk)
    with tempfile.TemporaryFile() as copy:
        while piece := inflater.read():
            copy.write(piece)
        copy.seek(0)
        yield cast(BinaryIO, copy)


class _InflatedReader:
    """Exact reads and skips over an :class:`Inflater`, keeping what was read up to
    :meth:`stop_keeping` (the header for pydicom), at most ``keep_limit`` bytes
    (``None``: keep nothing)."""

    def __init__(self, inflater: Inflater, keep_limit: int | None) -> None:
        self.inflater = inflater
        self.chunk = b""
        self.offset = 0
        #: Position in the inflated data set.
        self.position = 0
        self.kept = bytearray()
        self.keeping = keep_limit is not None
        self.keep_limit = keep_limit or 0

    def at_end(self) -> bool:
        """True when the data set has no more bytes (the deflate stream ended)."""
        return self.offset >= len(self.chunk) and not self._refill()

    def _refill(self) -> bool:
        self.chunk, self.offset = self.inflater.read(), 0
        return bool(self.chunk)

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes (:class:`UnreadableData` when the data set ends)."""
        if self.offset + size <= len(self.chunk):  # the usual case: one slice
            data = self.chunk[self.offset:self.offset + size]
            self.offset += size
        else:
            pieces = []
            wanted = size
            while wanted:
                if self.offset >= len(self.chunk) and not self._refill():
                    raise UnreadableData("the data set is truncated")
                piece = self.chunk[self.offset:self.offset + wanted]
                self.offset += len(piece)
                wanted -= len(piece)
                pieces.append(piece)
            data = b"".join(pieces)
        self._advance(data)
        return data

    def skip(self, size: int) -> None:
        """Pass ``size`` bytes, one chunk at a time."""
        while size:
            if self.offset >= len(self.chunk) and not self._refill():
                raise UnreadableData("the data set is truncated")
            step = min(size, len(self.chunk) - self.offset)
            if self.keeping:
                self._advance(self.chunk[self.offset:self.offset + step])
            else:
                self.position += step
            self.offset += step
            size -= step

    def _advance(self, data: bytes) -> None:
        self.position += len(data)
        if self.keeping:
            self.check_kept(self.position)
            self.kept += data

    def check_kept(self, end: int) -> None:
        """:class:`ObjectTooLarge` if keeping up to position ``end`` is too much."""
        if self.keeping and end > self.keep_limit:
            raise ObjectTooLarge("the header (before the pixel data) of the deflated "
                                 f"data set is larger than {self.keep_limit} bytes")

    def stop_keeping(self, at: int) -> None:
        """Keep nothing after position ``at`` (where the pixel data element starts)."""
        if self.keeping:
            del self.kept[at:]
            self.keeping = False


class _StreamWalker:
    """:class:`_Walker`'s walk over an inflated stream (explicit VR little endian):
    element headers are read and counted (:data:`MAX_ELEMENTS`), values skipped, the
    items of sequences walked."""

    def __init__(self, reader: _InflatedReader, limit: int | None) -> None:
        self.reader = reader
        self.limit = limit
        self.elements = self.headers_left = MAX_ELEMENTS
        #: The top level (:class:`TopLevel`).
        self.tags = TopLevel()
        #: Within the items of a UN sequence: implicit VR (PS3.5 6.2.2).
        self.implicit = False

    def header(self) -> tuple[int, bytes | None, int]:
        """(tag, VR, value length) of the next element or item (no VR for items and
        delimiters)."""
        self.headers_left -= 1
        if self.headers_left < 0:
            raise _too_many(self.elements)
        head = self.reader.read(8)
        group, element = struct.unpack_from("<HH", head)
        tag = (group << 16) | element
        if group == 0xFFFE or self.implicit:
            return tag, None, struct.unpack_from("<I", head, 4)[0]
        vr = head[4:6]
        if _switches_readers(vr):
            raise _unknown_vr()
        if vr in LONG_VRS:
            return tag, vr, struct.unpack("<I", self.reader.read(4))[0]
        return tag, vr, struct.unpack_from("<H", head, 6)[0]

    def _skip(self, length: int) -> None:
        """Pass a value of defined length, refusing at once one that cannot fit."""
        self._check_end(self.reader.position + length)
        self.reader.skip(length)

    def _check_end(self, end: int) -> None:
        if self.limit is not None and end > self.limit:
            raise ObjectTooLarge(
                f"the deflated data set inflates to more than {self.limit} bytes")
        self.reader.check_kept(end)

    def top(self) -> None:
        """Walk the top-level data set to the end of the stream."""
        reader = self.reader
        while not reader.at_end():
            start = reader.position
            tag, vr, length = self.header()
            self.tags.see(tag)
            if tag in _PIXEL_TAGS:
                reader.stop_keeping(start)
            if tag == _ITEM_END:
                raise UnreadableData("unexpected item delimiter")
            self.value(tag, vr, length, 0)

    def value(self, tag: int, vr: bytes | None, length: int, depth: int) -> None:
        """Pass a value: a sequence's items walked, anything else skipped."""
        if length == _UNDEFINED:
            self._undefined(depth, _undefined_kind(tag, vr))
        elif vr == b"SQ" or (vr is None and _sequence_tag(tag)):
            self._defined_items(self.reader.position + length, depth)
        else:
            self._skip(length)

    def _item(self, depth: int, end: int | None = None) -> None:
        """An item's elements, up to its delimiter (``end`` None) or to ``end``."""
        if depth > 64:
            raise UnreadableData("sequences nested too deeply")
        while end is None or self.reader.position < end:
            tag, vr, length = self.header()
            if tag == _ITEM_END:
                if end is not None:
                    raise UnreadableData("unexpected item delimiter")
                return
            self.value(tag, vr, length, depth)
        if self.reader.position != end:
            raise UnreadableData("an element overruns its item")

    def _defined_items(self, end: int, depth: int) -> None:
        """The items of a sequence of defined length, which ends at ``end``."""
        self._check_end(end)
        while self.reader.position < end:
            tag, _, length = self.header()
            if tag != _ITEM:
                raise UnreadableData("malformed sequence")
            if length == _UNDEFINED:
                self._item(depth + 1)
            else:
                self._check_end(self.reader.position + length)
                self._item(depth + 1, self.reader.position + length)
        if self.reader.position != end:
            raise UnreadableData("an item overruns its sequence")

    def _undefined(self, depth: int, kind: _Undefined) -> None:
        """Items of a sequence (of ``kind``) or fragments of encapsulated pixel data."""
        while True:
            tag, _, length = self.header()
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise UnreadableData("malformed sequence or pixel data fragments")
            if kind is _Undefined.FRAGMENTS:
                if length == _UNDEFINED:
                    raise UnreadableData("a pixel data fragment of undefined length")
                self._skip(length)
                continue
            implicit, self.implicit = self.implicit, (
                self.implicit or kind is _Undefined.UN_SEQUENCE)
            try:
                if length == _UNDEFINED:
                    self._item(depth + 1)
                else:
                    self._check_end(self.reader.position + length)
                    self._item(depth + 1, self.reader.position + length)
            finally:
                self.implicit = implicit


class InflatedPixels:
    """The top-level Pixel Data value of a deflated data set (native pixel data,
    PS3.5 A.5), read forward through one inflater.

    Ranges read in ascending order of their start cost one inflation of the data set
    as far as the last of them, however many there are: every frame of a multi-frame
    object is its frames' bytes inflated once, not the data set from its start again
    for each.  A range may begin inside the one read before it (frames of 1-bit pixels
    share a byte, PS3.5 8.1.1).  Memory stays at a chunk and the bytes returned,
    whatever the data set inflates to before or after them.

    Parameters
    ----------
    deflated :
        The data set as stored (after the file meta): a view, or a stream at its first
        byte, read a feed at a time and by nothing else until the last range is read.
    """

    def __init__(self, deflated: memoryview | BinaryIO) -> None:
        self._reader = _InflatedReader(Inflater(deflated, None), None)
        #: The value's length, once its element header is read.
        self._length: int | None = None
        #: Position in the value of the next byte the inflater gives.
        self._at = 0
        #: The last range read, from its start: what the next range may begin inside.
        self._last = b""
        self._last_start = 0

    def read(self, start: int, size: int) -> bytes:
        """Bytes ``start`` to ``start + size`` of the value.

        Raises
        ------
        UnreadableData
            No native Pixel Data (7FE0,0010) at the top level, a value shorter than
            asked, or a stream that does not inflate.
        ValueError
            ``start`` is before the last range's start (ranges are read forward).
        """
        if self._length is None:
            self._length = self._find()
        if start < self._last_start:
            raise ValueError("the pixel data is read forward only")
        if start + size > self._length:
            raise UnreadableData("the pixel data is shorter than its frames")
        held = self._last[start - self._last_start:size + start - self._last_start] \
            if start < self._at else b""
        if len(held) == size:
            return held
        self._reader.skip(max(start - self._at, 0))
        data = held + self._reader.read(size - len(held))
        self._at = start + size
        self._last, self._last_start = data, start
        return data

    def _find(self) -> int:
        """Inflate as far as the Pixel Data value; its length."""
        walker = _StreamWalker(self._reader, None)
        while not self._reader.at_end():
            tag, vr, length = walker.header()
            if tag == _PIXEL_DATA:
                if length == _UNDEFINED:
                    raise UnreadableData("the deflated data set's pixel data is encapsulated")
                return length
            if tag == _ITEM_END:
                raise UnreadableData("unexpected item delimiter")
            walker.value(tag, vr, length, 0)
        raise UnreadableData("the deflated data set has no pixel data")


def inflated_pixels(deflated: memoryview | BinaryIO, start: int, size: int) -> bytes:
    """Bytes ``start`` to ``start + size`` of the top-level Pixel Data value of a
    deflated data set, inflating the stream only up to them (:class:`InflatedPixels`).

    Raises
    ------
    UnreadableData
        No native Pixel Data (7FE0,0010) at the top level, a value shorter than asked,
        or a stream that does not inflate.
    """
    return InflatedPixels(deflated).read(start, size)


_PIXEL_DATA = 0x7FE00010


def inflated_head(deflated: memoryview, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) a deflated data set inflates to, inflating
    no more than that: enough to read its first elements from a data set that may be
    refused (a deflate bomb must not be inflated to say which instance it was).
    ``b""`` when the stream does not inflate."""
    inflater = Inflater(deflated, None, chunk=size)
    pieces: list[bytes] = []
    got = 0
    try:
        while got < size and (piece := inflater.read()):
            pieces.append(piece[:size - got])
            got += len(pieces[-1])
            inflater.chunk = size - got or 1
    except UnreadableData:
        pass
    return b"".join(pieces)


@dataclass(frozen=True)
class DeflatedWalk:
    """What :func:`walk_deflated` found.

    Attributes
    ----------
    header :
        The inflated data set up to its top-level pixel data element (all of it when
        it has none); empty when not asked for.
    inflated :
        The inflated data set's size.
    unambiguous :
        Its top level is unambiguous (:attr:`Instance.unambiguous`).
    """

    header: bytes
    inflated: int
    unambiguous: bool = True


def walk_deflated(deflated: memoryview | BinaryIO, max_inflated: int | None,
                  header_limit: int | None = MAX_DEFLATED_HEADER) -> DeflatedWalk:
    """Prove a deflated data set whole while inflating it as a stream.

    Memory stays at a chunk (:data:`INFLATE_CHUNK`) plus the header kept, whatever the
    data set inflates to.

    Parameters
    ----------
    deflated :
        The data set as stored (after the file meta).
    max_inflated :
        Most bytes it may inflate to (``None``: any).
    header_limit :
        Most header bytes kept (``None``: keep none).

    Raises
    ------
    UnreadableData
        A corrupt or truncated deflate stream, or a truncated or malformed data set.
    ObjectTooLarge
        It inflates (or an element says it would inflate) past ``max_inflated``, or
        its header is larger than ``header_limit``.
    """
    reader = _InflatedReader(Inflater(deflated, max_inflated), header_limit)
    walker = _StreamWalker(reader, max_inflated)
    walker.top()
    return DeflatedWalk(bytes(reader.kept), reader.position, walker.tags.unambiguous)


def _text(value: Any) -> str | None:
    """A stored value as index text: multiple values joined by ``\\``, blanks as None."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        parts = [str(v).strip() for v in value]
        text = "\\".join(parts)
        return text if any(parts) else None
    if isinstance(value, bytes | Dataset):
        return None
    text = str(value).strip(" \0")
    return text or None


def fold(text: str | None) -> str | None:
    """Case-fold a PN value for case-insensitive matching (PS3.4 C.2.2.2.1)."""
    return text.upper() if text is not None else None


@cache
def _columns(level: Level) -> tuple[tuple[Attribute, BaseTag, str, str | None], ...]:
    """(attribute, its pydicom tag, column, case-folded column) of ``level``, computed
    once (``Dataset.get_item`` takes a pydicom tag as it is, without converting it)."""
    return tuple((a, BaseTag(a.tag), a.column or "", case_folded_column(a))
                 for a in stored(level))


#: Most bytes of one element's value that are indexed.  A value's bytes cost far
#: more as Python values than as bytes: in implicit VR (32-bit lengths, PS3.5 7.1.3) a
#: Patient's Name of 32 MiB of backslashes took 3.1 s and 544 MB to index.  A longer
#: value is indexed by its first values within this many bytes (a name of 70 000
#: characters is indexed whole).
MAX_INDEX_VALUE_BYTES = 1 << 20


def extract(header: Dataset | Elements, level: Level) -> dict[str, str | None]:
    """Index values of ``level`` from a header (pydicom's, or as ingest reads it), by
    column (unique key included)."""
    values: dict[str, str | None] = {}
    codec = _simple_codec(header)
    walked, little = ((header.raw, header.little) if isinstance(header, Elements)
                      else (None, True))
    for attribute, tag, column, folded in _columns(level):
        value: str | Literal[_Undecoded.TOKEN] | None = _UNDECODED
        if walked is not None:
            # Straight from the walked bytes, the usual case (ingest's hot path): no
            # element object is made for it.
            found = walked.get(attribute.tag)
            if found is None:
                value = None
            elif (attribute.vr != "SQ" and found[0] in (None, attribute.vr)
                  and len(found[2]) <= MAX_INDEX_VALUE_BYTES):
                value = _bytes_text(found[2], little, attribute, codec)
                if value is not None and value is not _UNDECODED:
                    value = _dicom_form(value, attribute)
        if value is _UNDECODED:
            value = _element_value(header, attribute, tag, codec)
        values[column] = value
        if folded:
            values[folded] = fold(value)
    return values


def _element_value(header: Dataset | Elements, attribute: Attribute, tag: BaseTag,
                   codec: str | None) -> str | None:
    """The index text of ``attribute`` from its element in ``header`` (``None`` when
    absent, or when pydicom cannot read it: an unknown VR, say, indexed as unknown as
    any value that does not decode), through pydicom when its raw bytes do not say
    it."""
    try:
        element: DataElement | RawDataElement | None = header.get_item(tag)
    except DECODING_ERRORS:
        return None
    if element is None:
        return None
    source: Dataset | Elements = header
    if type(element) is RawDataElement and attribute.vr != "SQ":
        source, element = _bounded(header, element)
    return _value(source, attribute, codec, element)


def _bounded(header: Dataset | Elements, raw: RawDataElement
             ) -> tuple[Dataset | Elements, RawDataElement]:
    """``raw`` cut to its values within :data:`MAX_INDEX_VALUE_BYTES` (at the last
    value separator), with a data set of its own that holds it and the character set
    (for pydicom, should it decode the value); ``header`` and ``raw`` themselves when
    short enough."""
    value = raw.value
    if not isinstance(value, bytes) or len(value) <= MAX_INDEX_VALUE_BYTES:
        return header, raw
    value = value[:MAX_INDEX_VALUE_BYTES]
    separator = value.rfind(b"\\")
    value = value[:separator] if separator > 0 else value
    short = raw._replace(value=value, length=len(value))
    elements: dict[BaseTag, DataElement | RawDataElement] = {BaseTag(raw.tag): short}
    charset = header.get_item(_SPECIFIC_CHARACTER_SET)
    if charset is not None:
        elements[_SPECIFIC_CHARACTER_SET] = charset
    own = Dataset(elements)
    own.set_original_encoding(raw.is_implicit_VR, raw.is_little_endian,
                              header.original_character_set)
    return own, short


#: VRs whose values are plain ASCII, whatever the character set: indexed straight from
#: the raw bytes, without pydicom's conversion and validation (most of a small
#: instance's extraction time).  The result is what the pydicom path gives.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "TM", "UI"})
#: VRs whose values are text in the Specific Character Set (PS3.5 6.1.2.3), read the
#: same way when that character set is one a single Python codec decodes without code
#: extensions (see :data:`_SIMPLE_CODECS`); anything else goes through pydicom.
_CHARSET_VRS = frozenset({"LO", "SH", "PN", "LT", "ST", "UC"})
#: Specific Character Set values (PS3.3 C.12.1.1.2) whose bytes one codec decodes and
#: in which 0x5C is always the value separator (never the trail byte of a character).
#: No value (the default repertoire) decodes as pydicom does, as Latin-1.
_SIMPLE_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1",
                  "ISO_IR 192": "utf_8"}
class _Undecoded(Enum):
    """The one value of :data:`_UNDECODED` (an enum member, so that a type checker
    narrows ``text is _UNDECODED``)."""

    TOKEN = 0


#: :func:`_raw_text`'s answer when pydicom has to decode the value.
_UNDECODED: Final = _Undecoded.TOKEN
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)


def _simple_codec(header: Dataset | Elements) -> str | None:
    """The codec of the header's character set when it is one of :data:`_SIMPLE_CODECS`."""
    # pydicom types get_item as returning a converted element; it returns the raw one
    # (or None) as read.
    element: DataElement | RawDataElement | None = header.get_item(_SPECIFIC_CHARACTER_SET)
    if element is None:
        return "latin_1"
    value = element.value  # raw bytes, or already converted by pydicom (str or list)
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None  # several values: code extensions (ISO 2022)
    return _SIMPLE_CODECS.get(value.strip(" \0"))


def _raw_text(header: Dataset, attribute: Attribute,
              codec: str | None = None) -> str | Literal[_Undecoded.TOKEN] | None:
    """A text element's index text from its raw bytes, or ``_UNDECODED``.

    ASCII VRs always; character-set VRs when ``codec`` is known.
    """
    return _element_text(header.get_item(BaseTag(attribute.tag)), attribute, codec)


def _element_text(raw: DataElement | RawDataElement | None, attribute: Attribute,
                  codec: str | None) -> str | Literal[_Undecoded.TOKEN] | None:
    """:func:`_raw_text` of an element as ``Dataset.get_item`` gives it (raw unless
    something converted it already; pydicom types it as a converted element)."""
    if (type(raw) is not RawDataElement or not isinstance(raw.value, bytes)
            or raw.VR not in (None, attribute.vr)):
        return _UNDECODED
    return _bytes_text(raw.value, raw.is_little_endian, attribute, codec)


def _bytes_text(value: bytes, little: bool, attribute: Attribute,
                codec: str | None) -> str | Literal[_Undecoded.TOKEN] | None:
    """:func:`_element_text` of an element's raw ``value`` (of the attribute's VR)."""
    vr = attribute.vr
    if vr in _BINARY_INTEGERS:
        return _binary_text(value, vr, little)
    if vr in _ASCII_VRS:
        encoding = "ascii"
    elif vr in _CHARSET_VRS and codec is not None and b"\x1b" not in value:
        # An ESC starts a code extension (PS3.5 6.1.2.5.3), which pydicom interprets.
        encoding = codec
    else:
        return _UNDECODED
    try:
        text = value.decode(encoding)
    except UnicodeDecodeError:
        return _UNDECODED
    if vr == "PN":
        # As pydicom's PersonName: empty trailing component groups dropped ("A^B=" is A^B).
        text = "\\".join(v.rstrip("=") for v in text.rstrip("\0 ").split("\\"))
    elif vr in ("LT", "ST", "UT"):
        # Single-valued: a backslash is text here (PS3.5 6.2), not a separator.
        return text.strip(" \0") or None
    joined = _joined(text)
    if vr == "IS" and joined is not None and not all(
            _INTEGER_STRING.fullmatch(part) for part in joined.split("\\")):
        return _UNDECODED  # an odd integer string ("1.0", blanks, garbage): pydicom's
    return joined


def _joined(text: str) -> str | None:
    """Values separated by ``\\``, each stripped, joined again (``None``: all blank)."""
    if "\\" in text:
        parts = [part.strip(" \0").strip() for part in text.split("\\")]
        return "\\".join(parts) if any(parts) else None
    return text.strip(" \0") or None


#: Binary integer VRs indexed from their raw bytes (PS3.5 6.2): one value's struct code.
_BINARY_INTEGERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
#: An IS value pydicom reads to the same text (PS3.5 6.2: an optional sign, digits).
_INTEGER_STRING = re.compile(r"[+-]?[0-9]+")


def _binary_text(value: bytes, vr: str,
                 little: bool) -> str | Literal[_Undecoded.TOKEN] | None:
    """A US, SS, UL or SL value as pydicom converts it, values joined by ``\\``."""
    code = _BINARY_INTEGERS[vr]
    size = struct.calcsize(code)
    if not value or len(value) % size:
        return _UNDECODED  # empty or odd: pydicom's conversion decides
    count = len(value) // size
    numbers = struct.unpack(f"{'<' if little else '>'}{count}{code}", value)
    return "\\".join(str(number) for number in numbers)


def _sequence(header: Dataset | Elements, attribute: Attribute) -> str | None:
    """A sequence's items, with the item keys we match on, as JSON (C.2.2.2.6)."""
    try:
        items = header[attribute.tag].value or []
        kept = [{key.keyword: text for key in ITEM_KEYS[attribute.keyword]
                 if key.tag in item and (text := _item_text(item, key)) is not None}
                for item in items]
    except Exception:  # noqa: BLE001 - indexed as unknown; the object is stored as sent
        return None
    return json.dumps(kept, ensure_ascii=False) if any(kept) else None


def _item_text(item: Dataset, key: Attribute) -> str | None:
    """An item key's index text, within :data:`MAX_INDEX_VALUE_BYTES` like any other."""
    raw: DataElement | RawDataElement | None = item.get_item(BaseTag(key.tag))
    source: Dataset | Elements = item
    if type(raw) is RawDataElement:
        source, _ = _bounded(item, raw)
    return _text(source[key.tag].value)


def _value(header: Dataset | Elements, attribute: Attribute, codec: str | None,
           element: DataElement | RawDataElement) -> str | None:
    """The index text of ``attribute``, whose ``element`` the header holds."""
    if attribute.vr == "SQ":
        return _sequence(header, attribute)
    text = _element_text(element, attribute, codec)
    if text is _UNDECODED:
        # A value that does not decode (an unknown VR is found out when pydicom
        # converts the raw element, here) is indexed as unknown rather than refusing
        # the whole object: the object itself is stored as sent.
        try:
            decoded = header[attribute.tag]
        except (KeyError, *DECODING_ERRORS):
            return None
        try:
            text = _text(decoded.value)
        except Exception:  # noqa: BLE001 - any decoding failure of the value
            return None
    return None if text is None else _dicom_form(text, attribute)


def _dicom_form(text: str, attribute: Attribute) -> str:
    """An index text in its DICOM form: ACR-NEMA style dates and times (1997.04.24,
    10:30:00) without their separators, so that ranges compare."""
    separator = _SEPARATORS.get(attribute.vr)
    return text if separator is None else text.replace(separator, "")


_SEPARATORS = {"DA": ".", "TM": ":"}
