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
through here, with :func:`convert_into`: the converted object is written to a file
frame by frame, so that a conversion holds about a frame, never the object whole in
its stored, decoded and encoded forms at once.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs.core import codestream, metadata
from pacs.core.config import Settings
from pacs.core.dataset import (
    HEAD_PROBE_BYTES,
    LONG_VRS,
    dataset_offset,
    inflated_copy,
    meta_transfer_syntax,
    read_header,
)
from pacs.core.errors import CannotDecode, FrameTooLarge, ObjectTooLarge, UnreadableData
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
        if dataset.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
            _to_little_endian(dataset)
        if dataset.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in dataset:
            # Same instance in another transfer syntax: keep its SOP Instance UID
            # (pydicom 3 generates a new one by default).
            dataset.decompress(generate_instance_uid=False)
        dataset.file_meta.TransferSyntaxUID = UID(target)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise CannotDecode(f"cannot convert to {target}: {type(exc).__name__}") from None
    return dataset


#: Bytes of one unit of each binary VR whose value a big endian encoding stores in
#: that order (PS3.5 A.3, Table 6.2-1).
_UNITS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _to_little_endian(dataset: Dataset) -> None:
    """Make a data set read from Explicit VR Big Endian writable as little endian.

    pydicom encodes the values it decodes (numbers, text, tags) in whatever byte
    order it writes, but writes a binary value (Pixel Data, LUT Data, Overlay Data:
    OW, OF, OL, OD, OV) as its bytes: each unit of those is swapped here, in items of
    sequences too.  pydicom refuses to write a data set read big endian as little
    endian; done with its values, it is marked read little endian.
    """
    def swap(elements: Dataset) -> None:
        for element in elements:  # decodes every raw element, in this byte order
            if element.VR == "SQ":
                for item in element.value or ():
                    swap(item)
            elif element.VR in _UNITS and isinstance(element.value, bytes | bytearray):
                unit = _UNITS[element.VR]
                whole = len(element.value) - len(element.value) % unit
                element.value = (np.frombuffer(element.value[:whole], dtype=f">u{unit}")
                                 .astype(f"<u{unit}").tobytes() + element.value[whole:])

    swap(dataset)
    dataset.set_original_encoding(False, True, dataset.original_character_set)


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


# --- conversion as a stream ------------------------------------------------------------

#: Pixel data elements (PS3.5 7.1): where the header read stops.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Item and Sequence Delimitation Item tags of encapsulated pixel data (PS3.5 A.4), as
#: read little endian.
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
#: Bytes copied at a time when native pixel data is copied across.
COPY_CHUNK = 1 << 20
#: Most bytes of elements after the pixel data that a conversion writes (it reads them
#: as a data set, in memory); Data Set Trailing Padding is left out whatever its size.
MAX_TRAILING_BYTES = 64 << 20
#: Data Set Trailing Padding (FFFC,FFFC): its value has no significance (PS3.10 7.2).
_TRAILING_PADDING = 0xFFFCFFFC
#: The converted object WADO-RS sends is kept in memory up to this size, on disk
#: beyond (a spooled copy briefly holds twice its size as it moves to disk).
IN_MEMORY_BYTES = 1 << 20


@dataclass
class _Source:
    """A stored object opened for a conversion: its parts up to the pixel data.

    Attributes
    ----------
    header :
        The file meta and the data set before the pixel data (pydicom raw elements).
    body :
        The data set's bytes (the stored ones, or a deflated one's inflated copy),
        positioned at the pixel data element or where the header ended.
    syntax :
        How ``body`` is encoded (a deflated data set inflates to explicit VR little
        endian, PS3.5 A.5).
    """

    header: FileDataset
    body: BinaryIO
    syntax: UID


def convert_into(source: BinaryIO, target: str, out: BinaryIO,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES) -> None:
    """Write the stored Part 10 object ``source`` (seekable) into ``out`` (seekable,
    a temporary file) as a Part 10 object in ``target``, holding about one frame at a
    time: the object :func:`convert_to_bytes` makes in memory, its values written as
    stored where pydicom has not converted them.

    The header is read and written by pydicom; native pixel data is copied across
    :data:`COPY_CHUNK` bytes at a time; compressed frames are checked
    (:func:`check_codestreams`'s rule, one frame's bytes at a time), then decoded and
    written one by one; a deflated data set is inflated to a temporary copy within
    ``max_object_bytes`` first.  A big endian data set (a retired syntax, PS3.5 A.3)
    is converted whole in memory (:func:`convert_to_bytes`).

    Raises
    ------
    FrameTooLarge
        As :func:`convert` (checked before anything is decoded or written), or a
        deflated data set inflating past ``max_object_bytes``.
    UnreadableData
        When the object or its pixel data cannot be read or decoded.
    """
    with ExitStack() as stack:
        parsed = _opened(source, stack, max_object_bytes)
        if parsed is None:
            source.seek(0)
            out.write(convert_to_bytes(source.read(), target, max_frame_bytes,
                                       max_object_bytes))
            return
        if "Rows" in parsed.header:
            rows, columns, samples, bits, frames = (parsed.header.get(keyword)
                                                    for keyword in _IMAGE_PIXEL_KEYWORDS)
            check_declared(rows, columns, samples, bits, frames, max_frame_bytes,
                           max_object_bytes)
        _written(parsed, UID(target), out)


def _opened(source: BinaryIO, stack: ExitStack, max_object_bytes: int) -> _Source | None:
    """The object's header and body (:class:`_Source`); ``None`` for a big endian data
    set.  A deflated body's inflated copy is closed with ``stack``.

    Raises
    ------
    UnreadableData, FrameTooLarge
        As :func:`convert_into`.
    """
    source.seek(0)
    head = source.read(HEAD_PROBE_BYTES)
    offset = dataset_offset(head)
    stored = meta_transfer_syntax(head, offset)
    if stored is None or offset >= len(head):
        raise UnreadableData("the file meta does not parse")
    if stored == ExplicitVRBigEndian:
        return None
    body, syntax = source, UID(stored)
    if syntax == DeflatedExplicitVRLittleEndian:
        body = stack.enter_context(_inflated(source, offset, max_object_bytes))
        syntax = ExplicitVRLittleEndian
    else:
        source.seek(offset)
    try:
        meta = FileMetaDataset(read_dataset(io.BytesIO(head[132:offset]), False, True))
        meta.TransferSyntaxUID = UID(stored)
        data = read_dataset(body, syntax.is_implicit_VR, True, stop_when=_at_pixels)
        header = FileDataset(io.BytesIO(), data, preamble=head[:128], file_meta=meta,
                             is_implicit_VR=syntax.is_implicit_VR, is_little_endian=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData(f"the data set does not parse: {type(exc).__name__}") from None
    return _Source(header, body, syntax)


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


@contextmanager
def _inflated(source: BinaryIO, offset: int, limit: int) -> Iterator[BinaryIO]:
    """:func:`pacs.core.dataset.inflated_copy`, its limit reported as a conversion's
    (:class:`FrameTooLarge`, ``PACS_MAX_OBJECT_BYTES``)."""
    try:
        with inflated_copy(source, offset, limit, COPY_CHUNK) as copy:
            yield copy
    except ObjectTooLarge as exc:
        raise FrameTooLarge(f"{exc} (PACS_MAX_OBJECT_BYTES)") from None


def _written(parsed: _Source, target: UID, out: BinaryIO) -> None:
    """The converted object written to ``out``: header, pixel data, what follows it."""
    body, syntax = parsed.body, parsed.syntax
    at = body.tell()
    pixel = metadata.pixel_element_at(body.read(12), at, body.seek(0, io.SEEK_END),
                                      str(syntax))
    header = parsed.header
    header.file_meta.TransferSyntaxUID = target
    if pixel is None or pixel.offset is None or pixel.length is None:
        if body.seek(at) != body.seek(0, io.SEEK_END):
            raise UnreadableData("the data set does not parse after its header")
        _write_header(header, out)
        return
    implicit = target.is_implicit_VR
    if pixel.length == metadata.UNDEFINED_LENGTH:
        body.seek(pixel.offset)
        end = _decoded_into(header, body, syntax, implicit, out)
    else:
        _write_header(header, out)
        out.write(_element_head(pixel.tag, pixel.vr, pixel.length, implicit))
        end = _copied(body, pixel.offset, pixel.length, out)
    _write_trailing(header, body, end, syntax, out)


def _write_header(header: FileDataset, out: BinaryIO) -> None:
    """Preamble, file meta and the data set before its pixel data, as pydicom writes
    them (``enforce_file_format``, in the file meta's transfer syntax)."""
    try:
        pydicom.dcmwrite(out, header, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData(f"the data set cannot be encoded: {type(exc).__name__}") from None


def _element_head(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    """An element's tag and length (and VR when explicit: OB, OW, OF and OD have a
    32-bit length after two reserved bytes, PS3.5 7.1.2)."""
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)


def _copied(body: BinaryIO, offset: int, length: int, out: BinaryIO) -> int:
    """Native pixel data copied as it is (the pixel bytes of every little endian
    syntax are the same); where the value ends."""
    body.seek(offset)
    left = length
    while left:
        chunk = body.read(min(COPY_CHUNK, left))
        if not chunk:
            raise UnreadableData("the stored object is truncated")
        out.write(chunk)
        left -= len(chunk)
    return offset + length


def _write_trailing(header: FileDataset, body: BinaryIO, end: int, syntax: UID,
                    out: BinaryIO) -> None:
    """The elements after the pixel data, if any, in the target syntax: read as a data
    set up to Data Set Trailing Padding, within :data:`MAX_TRAILING_BYTES`; the padding
    itself copied a chunk at a time (a deflated object of 7 MB held 1.5 GB of it, read
    whole for each conversion).

    Raises
    ------
    UnreadableData
        They do not parse, or hold more than :data:`MAX_TRAILING_BYTES`.
    """
    body.seek(end)
    read = 0

    def stop(tag: BaseTag, _vr: str | None, length: int) -> bool:
        nonlocal read
        if tag == _TRAILING_PADDING:
            return True
        read += 0 if length == 0xFFFFFFFF else length
        if read > MAX_TRAILING_BYTES:
            raise ObjectTooLarge(f"more than {MAX_TRAILING_BYTES} bytes of elements after "
                                 "the pixel data")
        return False

    try:
        rest = read_dataset(body, syntax.is_implicit_VR, True, stop_when=stop)
        if len(rest):
            rest.set_original_encoding(syntax.is_implicit_VR, True,
                                       header.get("SpecificCharacterSet"))
            fp = DicomFileLike(out)
            fp.is_little_endian = True
            fp.is_implicit_VR = header.file_meta.TransferSyntaxUID.is_implicit_VR
            write_dataset(fp, rest, header.get("SpecificCharacterSet") or default_encoding)
        _copy_padding(body, syntax, header.file_meta.TransferSyntaxUID.is_implicit_VR, out)
    except ObjectTooLarge as exc:
        raise UnreadableData(f"cannot convert: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData("the elements after the pixel data do not parse: "
                             f"{type(exc).__name__}") from None


def _copy_padding(body: BinaryIO, syntax: UID, implicit: bool, out: BinaryIO) -> None:
    """Data Set Trailing Padding where ``body`` stands (nothing: none), written in the
    target encoding (``implicit`` or explicit VR little endian) with its value copied
    a chunk at a time; whatever follows it is left out (the padding is last, PS3.10
    7.2)."""
    head = body.read(8)
    if len(head) < 8:
        return
    group, number = struct.unpack_from("<HH", head)
    if (group << 16 | number) != _TRAILING_PADDING:
        raise ValueError("not Data Set Trailing Padding")
    if syntax.is_implicit_VR:
        length = struct.unpack_from("<I", head, 4)[0]
    elif head[4:6] in LONG_VRS:
        length = struct.unpack("<I", body.read(4))[0]
    else:
        length = struct.unpack_from("<H", head, 6)[0]
    if length == 0xFFFFFFFF:
        raise ValueError("Data Set Trailing Padding of undefined length")
    out.write(_element_head(_TRAILING_PADDING, "OB", length, implicit))
    _copied(body, body.tell(), length, out)


def _decoded_into(header: FileDataset, body: BinaryIO, syntax: UID, implicit: bool,
                  out: BinaryIO) -> int:
    """Encapsulated pixel data (``body`` at its value) decoded frame by frame and
    written native after the header, as pydicom's ``decompress`` would make it
    (colour as RGB, the Image Pixel module of the decoded frames); where the
    encapsulated value ends.

    Every frame's codestream is checked before any is decoded
    (:func:`pacs.core.codestream.check`); the element's length, known once every frame
    is written, is written last.
    """
    start = body.tell()
    options = _pixel_options(header, syntax)
    _check_frames(body, header, syntax, options)
    body.seek(start)
    frames = _decoded_frames(body, syntax, options)
    first = next(frames, None)  # its Image Pixel values go in the header, written first
    if first is None:
        raise UnreadableData("the encapsulated pixel data holds no frame")
    _describe(header, first[1], options["number_of_frames"])
    _write_header(header, out)
    at = out.tell()
    vr = "OB" if int(header.BitsAllocated) <= 8 else "OW"
    out.write(_element_head(0x7FE00010, vr, 0, implicit))
    arrays = chain([first[0]], (frame for frame, _ in frames))
    del first  # not held while the other frames are decoded
    length = _write_frames(arrays, out, options["number_of_frames"])
    out.seek(at)
    out.write(_element_head(0x7FE00010, vr, length, implicit))
    out.seek(0, io.SEEK_END)
    return _encapsulated_end(body, start)


def _pixel_options(header: FileDataset, syntax: UID) -> dict[str, Any]:
    """pydicom's decoding options from the header (Image Pixel module, offsets)."""
    try:
        options = as_pixel_options(header)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData(f"the Image Pixel module does not parse: "
                             f"{type(exc).__name__}") from None
    options["transfer_syntax_uid"] = syntax
    options["number_of_frames"] = max(int(options.get("number_of_frames") or 1), 1)
    return options


def _check_frames(body: BinaryIO, header: FileDataset, syntax: UID,
                  options: dict[str, Any]) -> None:
    """:func:`check_codestreams` over the stored stream, one frame's bytes at a time.

    Raises
    ------
    UnreadableData
        As :func:`check_codestreams`.
    """
    if not codestream.declares(str(syntax)):
        return
    rows, columns, samples, bits, _ = (int(header.get(keyword) or default)
                                       for keyword, default in _DECODED_DEFAULTS)
    start = body.tell()
    _check_extended_table(options.get("extended_offsets"), body.seek(0, io.SEEK_END) - start)
    body.seek(start)
    try:
        for frame in generate_frames(body, number_of_frames=options["number_of_frames"],
                                     extended_offsets=options.get("extended_offsets")):
            codestream.check(frame, str(syntax), rows, columns, samples, bits)
    except (TypeError, ValueError, KeyError) as exc:
        raise UnreadableData(f"the encapsulated pixel data does not parse: "
                             f"{type(exc).__name__}") from None


def _check_extended_table(extended: tuple[bytes, bytes] | None, available: int) -> None:
    """Refuse an Extended Offset Table that places a frame past the ``available`` bytes
    of the pixel data's value: pydicom reads a frame's length as the table gives it,
    and a read of 2^40 bytes asks the allocator for them first (a MemoryError, which a
    client would be told to retry), as :func:`pacs.core.frames._check_extended` refuses
    for one frame.

    Raises
    ------
    UnreadableData
        An entry past the end, or tables that do not parse.
    """
    if extended is None:
        return
    try:
        offsets, lengths = (bytes(table) for table in extended)
    except (TypeError, ValueError):  # not bytes: encoded with another VR than OV
        raise UnreadableData("the Extended Offset Table does not parse") from None
    if len(offsets) % 8 or len(lengths) % 8:
        raise UnreadableData("the Extended Offset Table does not parse")
    for number, ((offset,), (length,)) in enumerate(
            zip(struct.iter_unpack("<Q", offsets), struct.iter_unpack("<Q", lengths),
                strict=False), start=1):
        if offset + length > available:
            raise UnreadableData(f"the Extended Offset Table places frame {number} past "
                                 "the end of the pixel data")


def _decoded_frames(body: BinaryIO, syntax: UID, options: dict[str, Any]
                    ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Each frame decoded by pydicom from the stream, with the Image Pixel values that
    describe it (YCbCr converted to RGB, as ``decompress`` does)."""
    try:
        yield from get_decoder(syntax).iter_array(body, as_rgb=True, **options)
    except UnreadableData:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds for bad data
        raise CannotDecode(f"cannot convert: {type(exc).__name__}") from None


def _describe(header: FileDataset, pixel_module: dict[str, Any], frames: int) -> None:
    """The Image Pixel values of decoded frames, as pydicom's ``decompress`` sets them."""
    header.PhotometricInterpretation = pixel_module["photometric_interpretation"]
    if int(pixel_module["samples_per_pixel"]) > 1:
        header.PlanarConfiguration = int(pixel_module["planar_configuration"])
    if "NumberOfFrames" in header or frames > 1:
        header.NumberOfFrames = frames


def _write_frames(frames: Iterator[Any], out: BinaryIO, declared: int) -> int:
    """Decoded frames written one by one (padded to an even length, PS3.5 7.1.1);
    the value's length.

    Raises
    ------
    UnreadableData
        The value would pass a 32-bit length (PS3.5 7.1.2).
    CannotDecode
        The frames decoded are not the ``declared`` Number of Frames: an object whose
        Pixel Data would not hold the frames its Image Pixel module describes (PS3.3
        C.7.6.3) is not made (the stored one may still be sent).
    """
    length = count = 0
    for frame in frames:
        data = frame.tobytes()
        length += len(data)
        count += 1
        if length >= 0xFFFFFFFF:
            raise UnreadableData("the decoded pixel data is longer than a value may be")
        out.write(data)
    if count != declared:
        raise CannotDecode(f"the encapsulated pixel data holds {count} frames, not the "
                           f"{declared} declared")
    if length % 2:
        out.write(b"\x00")
        length += 1
    return length


def _encapsulated_end(body: BinaryIO, start: int) -> int:
    """Where the encapsulated value at ``start`` ends: after its Sequence Delimitation
    Item, found by walking the items' headers (PS3.5 A.4).

    Raises
    ------
    UnreadableData
        An item header that is not one, or no delimiter before the end.
    """
    body.seek(start)
    while len(head := body.read(8)) == 8:
        group, element, length = struct.unpack("<HHI", head)
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            return body.tell()
        if tag != _ITEM:
            break
        body.seek(length, io.SEEK_CUR)
    raise UnreadableData("the encapsulated pixel data has no sequence delimiter")
