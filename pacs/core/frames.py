"""Frames of a stored instance: as stored, or decoded to native pixels.

What Retrieve Frames (PS3.18 10.4.1.1.3 and 8.7.3.5.2) and the rendered resources need,
free of any protocol.  Frames are cut straight from the stored object, located by the
pixel data position that ingest recorded (:mod:`pacs.core.metadata`):

- native (uncompressed little endian) pixel data: frame ``n`` is a byte range, read
  with one seek, nothing else of the object is read or parsed;
- encapsulated pixel data: the frame's fragments, found through the Basic (or
  Extended) Offset Table by pydicom's encapsulation helpers, reading only the offset
  table and the frame's items (an Extended Offset Table the metadata keeps as a
  BulkDataURI is read from the stored header); without an offset table pydicom walks
  every fragment's item header, so :func:`open_frames` gives it a local copy of the
  object, and the frames of one request are found in one such walk
  (:class:`FrameIndex`): asked one by one, each frame walked the fragments before it
  again, and all 4,000 frames of a 40 KB object took 12 s.  Frames sent as stored and
  frames decoded are found the same way, and a decoder is handed the very bytes found
  and checked (:func:`_decoded_fragments`);
- a deflated data set (PS3.5 A.5): the frames' bytes inflated from the stream by one
  inflater, nothing after the last of them (:func:`_inflated_frames`), decoded by
  pydicom with the header when asked for decoded;
- anything else (big endian data sets, or objects without a recorded position), and
  any compressed frame asked for uncompressed: decoded by pydicom (pylibjpeg codecs)
  one frame at a time.

Native frames are sent as Explicit VR Little Endian (1.2.840.10008.1.2.1): the pixel
bytes of every little endian uncompressed syntax are the same.  Decoded colour frames
come out as RGB (pydicom converts YCbCr), as with dcm4chee and Orthanc.

Nothing is decoded whose declared size is over the caller's ``max_frame_bytes``
(``PACS_MAX_FRAME_BYTES``): Rows x Columns x Samples per Pixel x bytes per sample
(ceil(Bits Allocated / 8)) for one frame, times Number of Frames when the whole pixel
data is read (a big endian data set), checked before any decoder runs or
any buffer is allocated (:class:`FrameTooLarge`).  A header may declare a 65535 x
65535 RGB frame (12 GB) in a few bytes; so may a compressed frame's own codestream,
which is what its decoder allocates, so it must declare the image the header does
(:mod:`pacs.core.codestream`).  :func:`check_frames` makes the same checks
before any frame is read, so that a retrieval refuses them in its status line.  The
sizes are numbers of the metadata, which holds what the sender wrote: one that is not
a number describes no frame (:func:`number_value`, :class:`CannotDecode`).
"""

from __future__ import annotations

import base64
import io
import math
import re
import struct
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs.core import codestream, dataset, metadata
from pacs.core.errors import CannotDecode, FrameTooLarge, NotFound, UnreadableData
from pacs.core.storage import open_ranged, spooled_copy
from pacs.core.storage.ranged import RangedReader

if TYPE_CHECKING:
    from pacs.core.metadata import Document
    from pacs.core.storage import ObjectStore

#: Uncompressed little endian syntaxes whose pixel data is sent as stored.
NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

#: The syntax of every native frame this module produces.
NATIVE_SYNTAX = str(ExplicitVRLittleEndian)

_ROWS, _COLUMNS, _SAMPLES, _BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_FRAMES, _PHOTOMETRIC = 0x00280008, 0x00280004
_EXTENDED_OFFSETS, _EXTENDED_LENGTHS = 0x7FE00001, 0x7FE00002
_PIXEL_DATA = "7FE00010"

#: The item tag (FFFE,E000) of the Basic Offset Table and of each fragment, as stored
#: (encapsulated pixel data is little endian, PS3.5 A.4).
_ITEM_TAG = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class Layout:
    """Where and how an instance's frames are stored.

    Attributes
    ----------
    transfer_syntax :
        As stored.
    rows, columns, samples, bits_allocated, frames, photometric :
        Image Pixel module values (PS3.3 C.7.6.3) and Number of Frames.
    pixel_offset, pixel_length :
        The pixel data value's position in the object (``None`` when unknown) and
        length (:data:`pacs.core.metadata.UNDEFINED_LENGTH` when encapsulated).
    extended_offsets :
        The Extended Offset Table and its lengths, when inline in the metadata.
    extended_stored :
        The metadata names the Extended Offset Table by a BulkDataURI (a table of more
        than 128 frames, :data:`pacs.core.jsonmodel.BULK_DATA_THRESHOLD`): it is read
        from the stored object when a frame is looked up (:class:`FrameIndex`).
    pixel_vr :
        The pixel data's VR (``OB``, ``OW``; empty when unknown): a big endian
        encoding swaps the bytes of each 16-bit word of an OW value (PS3.5 A.3), 8-bit
        samples included.
    """

    transfer_syntax: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    photometric: str
    pixel_offset: int | None
    pixel_length: int | None
    extended_offsets: tuple[bytes, bytes] | None = None
    pixel_vr: str = ""
    extended_stored: bool = False

    @property
    def encapsulated(self) -> bool:
        """True when the pixel data is encapsulated (compressed, PS3.5 A.4)."""
        return self.pixel_length == metadata.UNDEFINED_LENGTH

    @property
    def sliceable(self) -> bool:
        """True when native frames can be cut from the stored bytes directly."""
        return (self.pixel_offset is not None and not self.encapsulated
                and self.transfer_syntax in NATIVE)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of one decoded frame (:func:`decoded_size`)."""
        return decoded_size(self.rows, self.columns, self.samples, self.bits_allocated)

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame (PS3.5 8.1.1; 4:2:2 YCbCr holds two samples)."""
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples
        return self.rows * self.columns * samples * self.bits_allocated


def decoded_size(rows: int, columns: int, samples: int, bits_allocated: int,
                 frames: int = 1) -> int:
    """Declared bytes of decoded pixels: Rows x Columns x Samples per Pixel x
    ceil(Bits Allocated / 8) x ``frames`` (PS3.3 C.7.6.3; what a decoder allocates)."""
    return (max(rows, 0) * max(columns, 0) * max(samples, 1)
            * max(-(-bits_allocated // 8), 1) * max(frames, 1))


def check_decodable(size: int, max_frame_bytes: int) -> None:
    """Raise :class:`FrameTooLarge` when ``size`` decoded bytes are over the ceiling."""
    if size > max_frame_bytes:
        raise FrameTooLarge(f"the pixels to decode declare {size} bytes, more than the "
                            f"{max_frame_bytes} allowed (PACS_MAX_FRAME_BYTES)")


def layout(doc: Document, parsed: dict[str, Any] | None = None) -> Layout:
    """The frame layout of an instance from its stored metadata.

    Raises
    ------
    NotFound
        When the instance has no pixel data (PS3.18 10.4.1.1.3: no frames to send).
    CannotDecode
        An Image Pixel module value that is not a whole number (:func:`whole_value`).
    """
    data = parsed if parsed is not None else metadata.parse(doc.json)
    rows = whole_value(data, _ROWS, 0) if _PIXEL_DATA in data else 0
    if not rows:
        raise NotFound("the instance has no pixel data")
    return Layout(
        transfer_syntax=doc.transfer_syntax,
        rows=rows,
        columns=whole_value(data, _COLUMNS, 0),
        samples=whole_value(data, _SAMPLES, 1),
        bits_allocated=whole_value(data, _BITS, 8),
        frames=max(1, whole_value(data, _FRAMES, 1)),
        photometric=str(metadata.value(data, _PHOTOMETRIC, "")),
        pixel_offset=doc.pixel_offset,
        pixel_length=doc.pixel_length,
        extended_offsets=_extended_offsets(data),
        pixel_vr=str(data[_PIXEL_DATA].get("vr", "")),
        extended_stored=any("BulkDataURI" in data.get(f"{tag:08X}", {})
                            for tag in (_EXTENDED_OFFSETS, _EXTENDED_LENGTHS)),
    )


#: A number as an IS or DS value writes it (PS3.5 6.2): a sign, digits with a
#: fraction, an exponent.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

_Default = TypeVar("_Default", int, float, None)


def number_value(data: dict[str, Any], tag: int, default: _Default) -> float | _Default:
    """The first value of element ``tag`` of an instance's metadata as a finite number;
    ``default`` when the element is absent or empty.

    The metadata holds each value under the VR its sender wrote it with, and ingest
    takes an object whose Rows is an LO of ``abc`` or whose Rescale Slope is not a
    decimal string: such a value describes no image (PS3.3 C.7.6.3, C.11.1), so what
    needs it (frames, a rendered view) cannot be made, though the object may still be
    sent as stored.  Every number read from the metadata to cut, decode or draw a
    frame is read here.

    Raises
    ------
    CannotDecode
        The value is neither a JSON number nor a string that writes one, or it is not
        finite.
    """
    value = metadata.value(data, tag)
    if value is None or value == "":
        return default
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value)):
        raise CannotDecode(f"{_named(tag)} is not a number: the pixel data it "
                           "describes cannot be read")
    return value


def whole_value(data: dict[str, Any], tag: int, default: int) -> int:
    """:func:`number_value` of an element whose values are counts (Rows, Bits
    Allocated, Number of Frames).

    Raises
    ------
    CannotDecode
        The value is not a number, or not a whole one.
    """
    value = number_value(data, tag, default)
    if isinstance(value, float) and not value.is_integer():
        raise CannotDecode(f"{_named(tag)} is not a whole number: the pixel data it "
                           "describes cannot be read")
    return int(value)


def _named(tag: int) -> str:
    """An element's keyword and tag, for a reason (never its value)."""
    return f"{keyword_for_tag(tag) or 'the element'} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _extended_offsets(data: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The Extended Offset Table (PS3.5 A.4.1) when the metadata holds it inline."""
    offsets = data.get(f"{_EXTENDED_OFFSETS:08X}", {}).get("InlineBinary")
    lengths = data.get(f"{_EXTENDED_LENGTHS:08X}", {}).get("InlineBinary")
    if offsets and lengths:
        return base64.b64decode(offsets), base64.b64decode(lengths)
    return None


def _stored_extended_offsets(source: BinaryIO) -> tuple[bytes, bytes] | None:
    """The Extended Offset Table and its lengths as the stored object holds them
    (PS3.5 A.4.1), for metadata that names them by a BulkDataURI: read with the
    header, which they belong to (they precede the pixel data).

    Raises
    ------
    UnreadableData
        A table that is not binary (PS3.3 C.7.6.3: both are OV).
    """
    header = read_header(source)
    offsets, lengths = header.get(_EXTENDED_OFFSETS), header.get(_EXTENDED_LENGTHS)
    if offsets is None or lengths is None or not offsets.value or not lengths.value:
        return None
    if not isinstance(offsets.value, bytes) or not isinstance(lengths.value, bytes):
        raise UnreadableData("the Extended Offset Table does not parse")
    return offsets.value, lengths.value


#: Float Pixel Data and Double Float Pixel Data: pixel data elements without frames of
#: their own here, sent as bulk data values.
FLOAT_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009})


def pixel_value_place(doc: Document, tag: int) -> tuple[int, int]:
    """Where the value of pixel data element ``tag`` lies in the stored object:
    ``(offset, length)``.

    Ingest records the place of the object's pixel data element, whichever of Float,
    Double Float or Pixel Data it is, and the metadata lists that element under its
    own tag (:mod:`pacs.core.metadata`).

    Raises
    ------
    NotFound
        The metadata lists no such element, or its value has no place in the stored
        bytes (encapsulated, or inside a deflated data set).
    """
    listed = f"{tag:08X}" in metadata.parse(doc.json)
    if (not listed or doc.pixel_offset is None or doc.pixel_length is None
            or doc.pixel_length == metadata.UNDEFINED_LENGTH):
        raise NotFound("no such bulk data")
    return doc.pixel_offset, doc.pixel_length


def check_numbers(lay: Layout, numbers: Sequence[int]) -> None:
    """Raise :class:`NotFound` unless every frame number is within 1..frames."""
    for number in numbers:
        if not 1 <= number <= lay.frames:
            raise NotFound(f"frame {number} does not exist (the instance has {lay.frames})")


def open_frames(store: ObjectStore, key: str, lay: Layout) -> BinaryIO:
    """The stored object, opened to read frames of; the caller closes it.

    A seekable stream that reads only what it is asked for
    (:func:`pacs.core.storage.open_ranged`: a file, or ranged GETs on S3).  Encapsulated
    pixel data with neither an Extended nor a non-empty Basic Offset Table (PS3.5 A.4)
    has its frames found by walking every fragment's item header, a request each when
    read in ranges: such an object is copied instead, read whole as one stream
    (:func:`pacs.core.storage.spooled_copy` of :meth:`ObjectStore.open`).  An Extended
    Offset Table the metadata names by a BulkDataURI is read from the object's header
    (:class:`FrameIndex`): no walk.
    """
    source = open_ranged(store, key)
    try:
        walked = (isinstance(source, RangedReader) and lay.encapsulated
                  and lay.extended_offsets is None and not lay.extended_stored
                  and not _basic_offsets(source, lay))
    except BaseException:
        source.close()
        raise
    if not walked:
        return source
    source.close()
    return spooled_copy(store.open(key))


def _basic_offsets(source: BinaryIO, lay: Layout) -> bool:
    """False when the Basic Offset Table item is empty; true otherwise (an item that is
    not one is reported by pydicom when the frame is read)."""
    if lay.pixel_offset is None:
        return True
    source.seek(lay.pixel_offset)
    head = source.read(8)
    return len(head) < 8 or head[:4] != _ITEM_TAG or head[4:] != bytes(4)


#: How a frame is produced: its fragments as stored (encapsulated), cut from the stored
#: native pixel data, cut from big endian pixel data and its samples' bytes swapped,
#: inflated from a deflated data set, or decoded by pydicom.  The three native ways
#: send the frame as stored, samples untouched (PS3.5 8.1.1, 8.2: its Planar
#: Configuration, Photometric Interpretation and bits beyond Bits Stored as the
#: metadata says); only a decoded frame is pydicom's processed pixels.
Production = Literal["fragments", "slice", "swap", "inflate", "decode"]


def production(lay: Layout, stored: bool) -> Production:
    """How the frames of ``lay`` are produced, as stored (``stored``) or native.

    Decided once per request, so that what is checked before answering
    (:func:`check_frames`, :func:`frame_syntax`, :func:`frame_length`) is what
    :func:`stored_frames` and :func:`native_frames` then do.
    """
    if stored and lay.encapsulated and lay.pixel_offset is not None:
        return "fragments"
    if lay.sliceable:
        return "slice"
    if not lay.encapsulated and lay.pixel_offset is not None and (
            lay.transfer_syntax == ExplicitVRBigEndian):
        return "swap"
    if not lay.encapsulated and lay.transfer_syntax == DeflatedExplicitVRLittleEndian:
        return "inflate"
    return "decode"


def frame_syntax(lay: Layout, stored: bool) -> str:
    """The transfer syntax every frame is sent in: the stored one for stored
    fragments, :data:`NATIVE_SYNTAX` for native frames (cut or decoded)."""
    return lay.transfer_syntax if production(lay, stored) == "fragments" else NATIVE_SYNTAX


def frame_length(lay: Layout, stored: bool) -> int | None:
    """Bytes of each frame when known before any is read (frames cut from native pixel
    data: ceil(frame bits / 8)); ``None`` for fragments and decoded frames."""
    return -(-lay.frame_bits // 8) if production(lay, stored) in ("slice", "swap") else None


def check_frames(lay: Layout, stored: bool, max_frame_bytes: int,
                 numbers: Sequence[int] = ()) -> None:
    """Refuse now what :func:`decoded` or :func:`_slice` would refuse frame by frame,
    from the declared sizes alone (module docstring): a response can still say so in
    its status line.

    Raises
    ------
    FrameTooLarge
        The frames are decoded and one is declared larger than ``max_frame_bytes``.
    UnreadableData
        The frames ``numbers`` are cut from native pixel data that does not hold them
        all, or whose frames have no bits (:func:`check_sliced`).
    """
    how = production(lay, stored)
    if how in ("slice", "swap"):
        check_sliced(lay, numbers)
    if how not in ("decode", "inflate"):
        return
    check_decodable(lay.decoded_bytes, max_frame_bytes)


def check_sliced(lay: Layout, numbers: Sequence[int]) -> None:
    """Refuse native frames the stored value does not hold, before any is sent.

    PS3.5 8.1.1: native pixel data is the frames' bits one after the other, Rows x
    Columns x Samples per Pixel x Bits Allocated each.  Number of Frames is a number
    in the header: one far beyond the value's length (2^31 frames of a one-frame
    image) would let an answer of every frame start with a status of 200 and a
    Content-Length of terabytes, then break off at the first missing frame; frames of
    no bits (Columns or Bits Allocated of 0) are empty parts, as many as the header
    declares.

    Raises
    ------
    UnreadableData
        A frame of no bits, or a frame of ``numbers`` that ends past the value.
    """
    length = lay.pixel_length or 0
    if lay.frame_bits <= 0:
        raise UnreadableData("the native pixel data declares frames of no pixels")
    # All the frames of a range (bulk data) are checked by its last without walking it.
    last = (numbers[-1] if numbers else 0) if isinstance(numbers, range) else max(
        numbers, default=0)
    if -(-last * lay.frame_bits // 8) > length:
        raise UnreadableData(f"the pixel data holds fewer than the {last} frames asked "
                             f"for ({length} bytes, {lay.frame_bits} bits a frame)")


def stored_frames(source: BinaryIO, lay: Layout, numbers: Sequence[int], *,
                  max_frame_bytes: int) -> Iterator[tuple[bytes, str]]:
    """Frames as stored: ``(bytes, transfer syntax UID)`` per frame number.

    ``source`` is the stored object, seekable.  Native frames of syntaxes that cannot
    be sent as stored (deflated, big endian) are sent as native little endian frames,
    their samples as stored (:data:`Production`).
    """
    yield from _produced(source, lay, numbers, True, max_frame_bytes)


def native_frames(source: BinaryIO, lay: Layout, numbers: Sequence[int], *,
                  max_frame_bytes: int) -> Iterator[tuple[bytes, str]]:
    """Frames as uncompressed Explicit VR Little Endian pixels (decoded if need be,
    within ``max_frame_bytes``)."""
    yield from _produced(source, lay, numbers, False, max_frame_bytes)


def _produced(source: BinaryIO, lay: Layout, numbers: Sequence[int], stored: bool,
              max_frame_bytes: int) -> Iterator[tuple[bytes, str]]:
    """Each frame of ``numbers``, produced as :func:`production` says, one at a time.

    The frames of one request share what finds them: one :class:`FrameIndex` (one walk
    of the fragments, or one offset table), one inflater of a deflated data set
    (:func:`_inflated_frames`), one header for the decoder.
    """
    how, syntax = production(lay, stored), frame_syntax(lay, stored)
    if how == "fragments":
        index = FrameIndex(source, lay)
        yield from ((index.frame(number), syntax) for number in numbers)
    elif how == "inflate":
        check_decodable(lay.decoded_bytes, max_frame_bytes)
        yield from ((frame, syntax) for frame in _inflated_frames(source, lay, numbers))
    elif how == "decode":
        yield from ((native_bytes(array), syntax)
                    for array in decoded_frames(source, lay, numbers, max_frame_bytes))
    else:
        for number in numbers:
            frame = _slice(source, lay, number)
            yield (_little_endian(frame, lay) if how == "swap" else frame), syntax


def _slice(source: BinaryIO, lay: Layout, number: int) -> bytes:
    """Frame ``number`` of native pixel data, read with one seek."""
    assert lay.pixel_offset is not None and lay.pixel_length is not None
    bits = lay.frame_bits
    if bits % 8:
        return _bit_frame(source, lay, number)
    size = bits // 8
    start = (number - 1) * size
    if start + size > lay.pixel_length:
        raise UnreadableData("the pixel data is shorter than its frames")
    source.seek(lay.pixel_offset + start)
    data = source.read(size)
    if len(data) != size:
        raise UnreadableData("the stored object is truncated")
    return data


def _little_endian(frame: bytes, lay: Layout) -> bytes:
    """A frame of big endian native pixel data in little endian order (PS3.5 A.3):
    the bytes of each 16-bit word of an OW value swapped (8-bit samples too), an OB
    value as it is, and one of unknown VR by its samples."""
    size = {"OW": 2, "OB": 1}.get(lay.pixel_vr, lay.bits_allocated // 8)
    if size <= 1 or lay.frame_bits % 8 or len(frame) % size:
        return frame
    return np.frombuffer(frame, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def _bit_frame(source: BinaryIO, lay: Layout, number: int) -> bytes:
    """A frame of 1-bit pixels whose size is not whole bytes (PS3.5 8.1.1): frames
    follow each other bit after bit, so one may start inside a byte.  Only the bytes
    that hold the frame's bits are read and unpacked (eight times their size), then
    repacked from the frame's first bit."""
    assert lay.pixel_offset is not None and lay.pixel_length is not None
    size = lay.frame_bits
    first = (number - 1) * size
    start, end = first // 8, -(-(first + size) // 8)
    if end > lay.pixel_length:
        raise UnreadableData("the pixel data is shorter than its frames")
    source.seek(lay.pixel_offset + start)
    data = source.read(end - start)
    if len(data) != end - start:
        raise UnreadableData("the stored object is truncated")
    return _repacked(data, first - start * 8, size)


def _repacked(data: bytes, skip: int, size: int) -> bytes:
    """``size`` bits of ``data`` from bit ``skip`` on, packed from the first byte
    (PS3.5 8.1.1: bits fill bytes from the least significant one)."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    return np.packbits(bits[skip:skip + size], bitorder="little").tobytes()


def _fragments(source: BinaryIO, lay: Layout, number: int) -> bytes:
    """Frame ``number`` of encapsulated pixel data: its fragments' bytes, joined.

    Raises
    ------
    UnreadableData
        The fragments do not parse, the Extended Offset Table places the frame past
        the object (:func:`_check_extended`), or the frame has no bytes (an offset
        table entry outside the pixel data: every frame is at least one fragment,
        PS3.5 A.4).
    """
    assert lay.pixel_offset is not None
    if lay.extended_offsets is not None:
        _check_extended(source, lay, number)
    source.seek(lay.pixel_offset)
    try:
        data = get_frame(source, number - 1, number_of_frames=lay.frames,
                         extended_offsets=lay.extended_offsets)
    except (ValueError, KeyError, struct.error) as exc:  # struct: a table cut short
        raise UnreadableData(f"the encapsulated pixel data does not parse: {exc}") from None
    if not data:
        raise UnreadableData(f"frame {number} has no bytes where the offset table "
                             "places it")
    return data


#: One entry of the Extended Offset Table or of its lengths: 64-bit little endian
#: (PS3.3 C.7.6.3.1.8, PS3.5 A.4).
_EXTENDED_ENTRY = struct.Struct("<Q")
#: An item header of encapsulated pixel data: tag (group, element) and length
#: (PS3.5 A.4, 7.5); the tags of an item and of the sequence delimiter.
_ITEM_HEAD = struct.Struct("<HHI")
_ITEM, _DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
#: The last bytes of a JPEG, JPEG-LS or JPEG 2000 codestream (EOI / EOC): where pydicom
#: ends a frame of several fragments without an offset table, in a fragment's last
#: ten bytes.
_EOI, _EOI_WINDOW = b"\xff\xd9", 10


class FrameIndex:
    """Where each frame of encapsulated pixel data without an offset table lies, found
    once for the frames of one request.

    Without a Basic or Extended Offset Table pydicom's ``get_frame`` walks the item
    header of every fragment before the frame, for each frame asked for: all frames of
    an object took time in the square of their number.  Here the headers are read in
    one pass (the fragments' bytes skipped) and each frame is then read with a seek per
    fragment, grouped by pydicom's rules (PS3.5 A.4): one fragment per frame when there
    are as many, all of them for one frame, else up to a fragment whose last bytes hold
    an EOI marker.  Two numbers are kept per fragment, which ingest bounds
    (``MAX_ELEMENTS``).  An object with an offset table is read through pydicom
    (:func:`_fragments`): its table places each frame without a walk.  An Extended
    Offset Table the metadata names by a BulkDataURI (:attr:`Layout.extended_stored`)
    is read from the stored object's header first: with one, the Basic Offset Table is
    empty and the table, not the order of the fragments, says where each frame is
    (PS3.5 A.4), for the frames sent as stored and those decoded alike.

    Raises
    ------
    UnreadableData
        (from :meth:`frame`) The items do not parse (an undefined length, a tag that is
        not an item, one past the end of the object), the frame is not there, or it
        has no bytes.
    """

    def __init__(self, source: BinaryIO, lay: Layout) -> None:
        self.source = source
        self.lay = lay
        self._walked = False
        self._tabled = lay.extended_offsets is not None
        self._positions = array("Q")
        self._lengths = array("Q")
        # Per frame, the index of its first fragment; one more at the end.
        self._starts: Sequence[int] = ()

    def frame(self, number: int) -> bytes:
        """Frame ``number`` (1-based): its fragments' bytes, joined."""
        if not self._walked and not self._tabled:
            self._find()
        if self._tabled:
            return _fragments(self.source, self.lay, number)
        if not 1 <= number < len(self._starts):
            raise UnreadableData(f"the encapsulated pixel data holds no frame {number}")
        parts = []
        for at in range(self._starts[number - 1], self._starts[number]):
            self.source.seek(self._positions[at])
            parts.append(self.source.read(self._lengths[at]))
        data = b"".join(parts)
        if not data:
            raise UnreadableData(f"frame {number} has no bytes")
        return data

    def _find(self) -> None:
        """Take the stored Extended Offset Table the metadata names, or else walk."""
        if self.lay.extended_stored:
            table = _stored_extended_offsets(self.source)
            if table is not None:
                self.lay = replace(self.lay, extended_offsets=table)
                self._tabled = True
                return
        self._walk()

    def _walk(self) -> None:
        """Read the offset table's header and every item's; group them into frames."""
        assert self.lay.pixel_offset is not None
        self._walked = True
        size = self.source.seek(0, io.SEEK_END)
        self.source.seek(self.lay.pixel_offset)
        group, element, length = self._head(self.lay.pixel_offset, size)
        if (group, element) != _ITEM:
            raise UnreadableData("the encapsulated pixel data does not begin with an "
                                 "offset table item")
        if length:
            self._tabled = True
            return
        at = self.lay.pixel_offset + _ITEM_HEAD.size
        while at + _ITEM_HEAD.size <= size:
            self.source.seek(at)
            group, element, length = self._head(at, size)
            if (group, element) == _DELIMITER:
                break
            if (group, element) != _ITEM:
                raise UnreadableData("the encapsulated pixel data does not parse: "
                                     f"({group:04X},{element:04X}) where an item belongs")
            self._positions.append(at + _ITEM_HEAD.size)
            self._lengths.append(length)
            at += _ITEM_HEAD.size + length
        count, frames = len(self._positions), max(self.lay.frames, 1)
        if count == 1 or frames == 1:
            self._starts = (0, count)
        elif count == frames:
            self._starts = range(count + 1)
        else:
            self._starts = self._by_markers()

    def _head(self, at: int, size: int) -> tuple[int, int, int]:
        """The item header at ``at``; its value must be of defined length and within
        the object (``size`` bytes): it is read as declared."""
        head = self.source.read(_ITEM_HEAD.size)
        if len(head) < _ITEM_HEAD.size:
            raise UnreadableData("the stored object is truncated")
        group, element, length = _ITEM_HEAD.unpack(head)
        if length == metadata.UNDEFINED_LENGTH or at + _ITEM_HEAD.size + length > size:
            raise UnreadableData("the encapsulated pixel data does not parse: an item of "
                                 "undefined length or past the end of the object")
        return group, element, length

    def _by_markers(self) -> array[int]:
        """Frames that end with the fragment whose last bytes hold an EOI marker; the
        fragments after the last such one are one more frame."""
        starts = array("Q", [0])
        for number, (position, length) in enumerate(zip(self._positions, self._lengths,
                                                        strict=True)):
            tail = min(length, _EOI_WINDOW)
            self.source.seek(position + length - tail)
            if _EOI in self.source.read(tail):
                starts.append(number + 1)
        if starts[-1] != len(self._positions):
            starts.append(len(self._positions))
        return starts


def _check_extended(source: BinaryIO, lay: Layout, number: int) -> None:
    """Refuse frame ``number`` unless the Extended Offset Table places it within the
    stored object.

    The table's entries are 64-bit numbers the sender chose: pydicom reads a frame's
    length as given, and a file's ``read`` of 2^40 bytes asks the allocator for them
    first (a ``MemoryError``), whatever the file holds.

    Raises
    ------
    UnreadableData
        The table lists fewer frames than ``number``, or places its bytes past the end.
    """
    assert lay.extended_offsets is not None and lay.pixel_offset is not None
    offsets, lengths = lay.extended_offsets
    at = _EXTENDED_ENTRY.size * (number - 1)
    if at + _EXTENDED_ENTRY.size > min(len(offsets), len(lengths)):
        raise UnreadableData(f"the Extended Offset Table does not list frame {number}")
    offset = _EXTENDED_ENTRY.unpack_from(offsets, at)[0]
    length = _EXTENDED_ENTRY.unpack_from(lengths, at)[0]
    # The Basic Offset Table's item header, read first by get_frame too: on a ranged
    # stream this fetch also learns the object's size, so the seek to the end is free.
    source.seek(lay.pixel_offset)
    source.read(8)
    if offset + length > source.seek(0, io.SEEK_END) - lay.pixel_offset:
        raise UnreadableData(f"the Extended Offset Table places frame {number} past the "
                             "end of the object (PS3.5 A.4)")


def decoded(source: BinaryIO, number: int, lay: Layout, max_frame_bytes: int) -> np.ndarray:
    """Frame ``number`` decoded by pydicom (any syntax it has a decoder for):
    :func:`decoded_frames` of that frame alone, which says what it raises."""
    return next(decoded_frames(source, lay, [number], max_frame_bytes))


def decoded_frames(source: BinaryIO, lay: Layout, numbers: Sequence[int],
                   max_frame_bytes: int) -> Iterator[np.ndarray]:
    """Frames ``numbers`` decoded by pydicom, one at a time, in the order asked.

    Encapsulated frames are found by one :class:`FrameIndex` and each is decoded from
    the bytes found, once its codestream has been checked (:func:`_decoded_fragments`);
    a deflated data set's frames come from one inflater (:func:`_inflated_frames`); a
    big endian one is read whole.  The declared sizes are checked first (module
    docstring).

    Raises
    ------
    FrameTooLarge
        A frame (or, when the whole pixel data must be read, all the frames) is
        declared larger than ``max_frame_bytes``.
    UnreadableData
        When a frame cannot be decoded.
    """
    check_decodable(lay.decoded_bytes, max_frame_bytes)
    if lay.encapsulated:
        yield from _decoded_fragments(source, lay, numbers)
    elif codestream.declares(lay.transfer_syntax):
        # Compressed frames are decoded only once their codestream is checked, which
        # needs their fragments where ingest found them.
        raise UnreadableData("the compressed pixel data is not encapsulated where "
                             "ingest recorded it")
    elif lay.transfer_syntax == DeflatedExplicitVRLittleEndian:
        yield from _decoded_deflated(source, lay, numbers)
    else:
        yield from (_decoded_native(source, number, lay, max_frame_bytes)
                    for number in numbers)


def _decoded_native(source: BinaryIO, number: int, lay: Layout,
                    max_frame_bytes: int) -> np.ndarray:
    """Frame ``number`` of native pixel data pydicom reads alone from the file, or from
    the whole data set (big endian) within its ceiling."""
    try:
        source.seek(0)
        return pixel_array(source, index=number - 1)
    except Exception:  # noqa: BLE001 - retry from the whole data set, below
        pass
    check_decodable(lay.decoded_bytes * lay.frames, max_frame_bytes)
    try:
        source.seek(0)
        return pixel_array(pydicom.dcmread(source), index=number - 1)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise CannotDecode(f"the frame cannot be decoded: {type(exc).__name__}") from None


def _decoded_deflated(source: BinaryIO, lay: Layout,
                      numbers: Sequence[int]) -> Iterator[np.ndarray]:
    """Frames ``numbers`` of a deflated data set, inflated no further than their bytes
    (:func:`_inflated_frames`) and decoded by pydicom with the header, read once.

    The stored object is small, what it inflates to need not be: up to
    ``PACS_MAX_OBJECT_BYTES``, before or after the pixel data, which pydicom's reading
    of the whole data set held in memory for every frame asked for.  The stored bytes
    are read a feed at a time too, as far as the last frame.
    """
    header = _single_frame_header(read_header(source), lay)
    vr = "OW" if lay.bits_allocated > 8 else "OB"
    for frame in _inflated_frames(source, lay, numbers):
        header.add_new(0x7FE00010, vr, frame)
        yield _pixels_of(header)


def _inflated_frames(source: BinaryIO, lay: Layout,
                     numbers: Sequence[int]) -> Iterator[bytes]:
    """Frames ``numbers`` of a deflated data set, their native bytes as stored.

    One inflater (:class:`pacs.core.dataset.InflatedPixels`) reads frames asked in
    ascending order (all of them, for the pixel data's bulk data) as far as the last:
    each inflating the data set from its start made every frame of a 400-frame object
    cost as much as the object, 116 s for one request.  Frames asked in another order
    are inflated once as far as the last, into a temporary file (memory stays at a
    chunk; the file at the pixel data ingest accepted within
    ``PACS_MAX_OBJECT_BYTES``), and cut from it.
    """
    source.seek(0)
    source.seek(dataset.dataset_offset(source.read(dataset.HEAD_PROBE_BYTES)))
    value = dataset.InflatedPixels(source)
    places = [_bit_range(lay, number) for number in numbers]
    if all(one[1] <= two[1] for one, two in pairwise(places)):
        for first, start, end in places:
            yield _frame_bits(value.read(start, end - start), lay, first - start * 8)
        return
    low, high = min(place[1] for place in places), max(place[2] for place in places)
    with tempfile.TemporaryFile() as copy:
        for at in range(low, high, dataset.INFLATE_CHUNK):
            copy.write(value.read(at, min(dataset.INFLATE_CHUNK, high - at)))
        for first, start, end in places:
            copy.seek(start - low)
            yield _frame_bits(copy.read(end - start), lay, first - start * 8)


def _bit_range(lay: Layout, number: int) -> tuple[int, int, int]:
    """Where frame ``number`` of native pixel data lies in its value: its first bit,
    and the bytes that hold it, from ``start`` to ``end`` (PS3.5 8.1.1: frames follow
    each other bit after bit)."""
    first = (number - 1) * lay.frame_bits
    return first, first // 8, -(-(first + lay.frame_bits) // 8)


def _frame_bits(data: bytes, lay: Layout, skip: int) -> bytes:
    """A frame's bytes: ``data`` as read, or repacked from bit ``skip`` when frames are
    not whole bytes."""
    return _repacked(data, skip, lay.frame_bits) if lay.frame_bits % 8 else data


def _decoded_fragments(source: BinaryIO, lay: Layout,
                       numbers: Sequence[int]) -> Iterator[np.ndarray]:
    """Frames ``numbers`` of encapsulated pixel data, each decoded once its codestream
    has been found to declare the frame the data set describes
    (:func:`pacs.core.codestream.check`): a decoder allocates what the codestream
    declares.

    The decoder gets the bytes that were checked, and nothing else: the frames found
    by one :class:`FrameIndex` (one walk without an offset table, else the table the
    stored object holds), never pydicom's own look-up in the stored object, which reads
    an Extended Offset Table the check did not see and, without a table, walked every
    fragment before each frame again.  Only the frames asked for are read, never the
    whole pixel data.
    """
    index = FrameIndex(source, lay)
    header: pydicom.Dataset | None = None
    for number in numbers:
        frame = index.frame(number)
        codestream.check(frame, lay.transfer_syntax, lay.rows, lay.columns, lay.samples,
                         lay.bits_allocated)
        if header is None:
            header = _single_frame_header(read_header(source), lay)
        # PS3.5 A.4: one frame, one fragment, after an empty Basic Offset Table.
        header.add_new(0x7FE00010, "OB", encapsulate([frame], has_bot=False))
        yield _pixels_of(header)


def _single_frame_header(header: pydicom.Dataset, lay: Layout) -> pydicom.Dataset:
    """The stored object's header as that of a data set of one frame, the frame to
    decode to be added as its pixel data: no offset table of the stored frames, the
    stored transfer syntax."""
    for tag in (_EXTENDED_OFFSETS, _EXTENDED_LENGTHS):
        header.pop(tag, None)
    header.NumberOfFrames = 1
    header.file_meta.TransferSyntaxUID = UID(lay.transfer_syntax)
    return header


def _pixels_of(header: pydicom.Dataset) -> np.ndarray:
    """The one frame of ``header``'s pixel data, decoded by pydicom."""
    try:
        return pixel_array(header, index=0)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise CannotDecode(f"the frame cannot be decoded: {type(exc).__name__}") from None


def native_bytes(array: np.ndarray) -> bytes:
    """Pixels as native little endian bytes, samples interleaved (PS3.5 8.2)."""
    if array.dtype == np.bool_:
        return np.packbits(array.ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def can_decode(transfer_syntax: str) -> bool:
    """True when pydicom has a working decoder for ``transfer_syntax``."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def read_header(source: BinaryIO) -> pydicom.Dataset:
    """The stored object's data set without pixel data (for rendering parameters); a
    deflated one is never inflated whole (:func:`pacs.core.dataset.read_header`)."""
    source.seek(0)
    head = source.read(dataset.HEAD_PROBE_BYTES)
    offset = dataset.dataset_offset(head)
    if (offset < len(head) and dataset.meta_transfer_syntax(head, offset)
            == DeflatedExplicitVRLittleEndian):
        return dataset.read_deflated_header(source, head, offset)
    source.seek(0)
    try:
        return pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for malformed input
        raise UnreadableData(f"stored object does not parse: {type(exc).__name__}") from None
