"""The image a compressed frame declares, read from its codestream's own header.

A decoder allocates what the codestream's header says, not what the data set's Image
Pixel module says: a JPEG frame header (ISO/IEC 10918-1 B.2.2) or a JPEG 2000 SIZ
segment (ISO/IEC 15444-1 A.5.1) may declare 65535 x 65535 pixels in a few bytes,
behind Rows and Columns of 16, and the decoder then spends seconds and gigabytes
filling them before the result is found not to fit.  The ceilings of
``PACS_MAX_FRAME_BYTES`` are checked against the Image Pixel module
(:func:`pacs.core.frames.decoded_size`), so the codestream must agree with it before
any decoder runs.

PS3.5 8.2 requires that agreement: the Image Pixel module describes the pixel data as
decoded, and the encapsulated formats (8.2.1 JPEG, 8.2.3 JPEG-LS, 8.2.4 JPEG 2000,
8.2.8 HTJ2K) carry the same image.  A frame whose codestream declares other
dimensions or another number of components cannot be decoded into the frame the data
set describes, so it is refused unread (:class:`~pacs.core.errors.CannotDecode`) - what a decoder
would end with, minus the work.

A decoder's work also grows with parts of the image a header may multiply at no cost:
the tiles of a JPEG 2000 image (a SIZ of 1 x 1 tiles makes OpenJPEG keep state for
each of 65,280 tiles of a 256 x 255 image: 0.7 GB from an 886-byte object) and the
scans of a progressive JPEG (each scan a pass over the whole image: 5,000 scans of 33
bytes kept libjpeg busy 14 s for a 4096 x 4096 frame).  Both are bounded here
(:data:`MAX_SCANS`, :func:`max_tiles`), far above what encoders write.

RLE (PS3.5 G) is not read here: its decoder fills exactly Rows x Columns bytes per
segment and stops, whatever the segments would expand to.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from pacs.core.errors import CannotDecode


@dataclass(frozen=True)
class Declared:
    """What a codestream's header declares of its image; ``parts``: its scans (JPEG)
    or tiles (JPEG 2000)."""

    rows: int
    columns: int
    components: int
    precision: int
    parts: int = 1


#: Most scans of a JPEG frame (SOS markers, ISO/IEC 10918-1 B.2.3).  Sequential and
#: lossless frames have one per component at most (4); progressive encoders write
#: about ten per component.
MAX_SCANS = 100
#: Fewest pixels per tile, on average, of a JPEG 2000 image of more than
#: :data:`FEW_TILES` tiles (tiles of 64 x 64 pixels: encoders use 256 or more, or one
#: tile).
MIN_TILE_PIXELS = 64 * 64
#: Tiles allowed whatever the image's size.
FEW_TILES = 64


def max_tiles(rows: int, columns: int) -> int:
    """Most tiles allowed for an image of ``rows`` x ``columns`` pixels."""
    return max(FEW_TILES, -(-rows * columns // MIN_TILE_PIXELS))


# --- JPEG and JPEG-LS -----------------------------------------------------------------

#: Markers whose segment is a frame header: SOF0-3, 5-7, 9-11, 13-15 (ISO/IEC 10918-1
#: B.1.1.3), DHP (B.3.2, the same fields for a hierarchical image) and JPEG-LS SOF55
#: (ISO/IEC 14495-1 C.2.2).  Each holds Lf, P, Y, X, Nf in that order.
_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                            0xCD, 0xCE, 0xCF, 0xDE, 0xF7})
#: Markers without a length field (B.1.1.3): TEM, RST0-7, SOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
#: Markers that end the search: a scan (SOS) or the image (EOI) before any frame header.
_TOO_LATE = frozenset({0xDA, 0xD9})
_FRAME_HEADER = struct.Struct(">HBHHB")  # Lf, P, Y, X, Nf


def _jpeg(frame: bytes) -> Declared | None:
    """The frame header of a JPEG or JPEG-LS codestream, ``None`` when there is none
    before its first scan."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    position, size = 2, len(frame)
    while position + 2 <= size:
        if frame[position] != 0xFF:
            return None  # a marker must be here (B.1.1.2)
        marker = frame[position + 1]
        if marker == 0xFF:  # a fill byte before a marker (B.1.1.2)
            position += 1
        elif marker in _STANDALONE:
            position += 2
        elif marker in _TOO_LATE or position + 4 > size:
            return None
        elif marker in _FRAME_MARKERS:
            if position + 2 + _FRAME_HEADER.size > size:
                return None
            _, precision, rows, columns, components = _FRAME_HEADER.unpack_from(
                frame, position + 2)
            # In entropy-coded data a 0xFF byte is followed by 0x00 or a restart marker
            # (B.1.1.5; JPEG-LS: a byte below 0x80, ISO/IEC 14495-1 9.1): FF DA is SOS.
            return Declared(rows, columns, components, precision,
                            frame.count(b"\xff\xda", position))
        else:
            position += 2 + struct.unpack_from(">H", frame, position + 2)[0]
    return None


# --- JPEG 2000 and HTJ2K --------------------------------------------------------------

#: SOC then SIZ (ISO/IEC 15444-1 A.4.1, A.5.1): how every codestream begins.
_SOC_SIZ = b"\xff\x4f\xff\x51"
#: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz.
_SIZ = struct.Struct(">HHIIIIIIIIH")
#: The JPEG 2000 signature box (ISO/IEC 15444-1 I.5.1) that begins a JP2 file.
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_BOX = struct.Struct(">I4s")  # LBox, TBox (I.4)


def _codestream_start(frame: bytes) -> int | None:
    """Where the codestream a decoder reads begins: at the start of a bare codestream
    (PS3.5 A.4.4 leaves the JP2 file format out of a frame), or, for an encoder that
    wrapped it anyway, where the JP2 file's first Contiguous Codestream box (``jp2c``,
    I.5.4) begins, reached box by box (I.4).  Never the first SOC and SIZ found
    anywhere: a box a reader skips could carry a small SIZ before the real one."""
    if frame.startswith(_SOC_SIZ):
        return 0
    if not frame.startswith(_JP2_SIGNATURE):
        return None
    position, size = 0, len(frame)
    while position + _BOX.size <= size:
        length, kind = _BOX.unpack_from(frame, position)
        header = _BOX.size
        if length == 1:  # XLBox: a 64-bit length follows
            if position + 16 > size:
                return None
            length, header = struct.unpack_from(">Q", frame, position + 8)[0], 16
        elif length == 0:  # the box runs to the end
            length = size - position
        if kind == b"jp2c":
            start = position + header
            return start if frame.startswith(_SOC_SIZ, start) else None
        if length < header:
            return None
        position += length
    return None


def _jpeg2000(frame: bytes) -> Declared | None:
    """The image and component sizes of a JPEG 2000 codestream's SIZ segment."""
    start = _codestream_start(frame)
    if start is None or start + 4 + _SIZ.size > len(frame):
        return None
    fields = _SIZ.unpack_from(frame, start + 4)
    columns, rows, x_offset, y_offset, components = (
        fields[2], fields[3], fields[4], fields[5], fields[10])
    tile_width, tile_height, tile_x, tile_y = fields[6:10]
    depths = frame[start + 4 + _SIZ.size:start + 4 + _SIZ.size + 3 * components:3]
    if len(depths) != components or not tile_width or not tile_height:
        return None
    # Ssiz: bit depth minus one in its low 7 bits, the sign in its high bit (A.5.1).
    precision = max(((depth & 0x7F) + 1 for depth in depths), default=0)
    # Tiles across and down (B.3, equation B-5).
    tiles = (-(-max(columns - tile_x, 0) // tile_width)
             * -(-max(rows - tile_y, 0) // tile_height))
    return Declared(max(rows - y_offset, 0), max(columns - x_offset, 0), components,
                    precision, tiles)


#: How the image a frame declares is read, per transfer syntax whose decoders allocate
#: from the codestream.
_JPEG_SYNTAXES = frozenset((JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                            JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless))
_READERS: dict[str, Callable[[bytes], Declared | None]] = {
    **dict.fromkeys(_JPEG_SYNTAXES, _jpeg),
    **dict.fromkeys((JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC,
                     HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K), _jpeg2000),
}


def declares(transfer_syntax: str) -> bool:
    """True when frames of ``transfer_syntax`` are checked here (:data:`_READERS`)."""
    return transfer_syntax in _READERS


def declared(frame: bytes, transfer_syntax: str) -> Declared | None:
    """What the codestream of ``frame`` declares, ``None`` when ``transfer_syntax`` is
    not read here (:data:`_READERS`) or the header is not found."""
    reader = _READERS.get(transfer_syntax)
    return reader(frame) if reader is not None else None


def check(frame: bytes, transfer_syntax: str, rows: int, columns: int,
          samples: int, bits_allocated: int) -> None:
    """Refuse a compressed frame whose codestream declares another image than the data
    set's Image Pixel module (module docstring; PS3.5 8.2).

    Raises
    ------
    CannotDecode
        The codestream's header is missing, or its rows, columns or components differ
        from Rows, Columns and Samples per Pixel, or its samples are wider than Bits
        Allocated, or it has more scans or tiles than allowed (module docstring).
    """
    if transfer_syntax not in _READERS:
        return
    found = declared(frame, transfer_syntax)
    if found is None:
        raise CannotDecode("the compressed frame has no image header")
    if ((found.rows, found.columns, found.components) != (rows, columns, samples)
            or -(-found.precision // 8) > max(-(-bits_allocated // 8), 1)):
        raise CannotDecode(
            f"the compressed frame declares {found.columns} x {found.rows} pixels of "
            f"{found.components} x {found.precision} bits, the data set {columns} x "
            f"{rows} of {samples} x {bits_allocated} (PS3.5 8.2)")
    if transfer_syntax in _JPEG_SYNTAXES and found.parts > MAX_SCANS:
        raise CannotDecode(f"the compressed frame has {found.parts} scans, more than "
                             f"{MAX_SCANS}")
    if transfer_syntax not in _JPEG_SYNTAXES and found.parts > max_tiles(rows, columns):
        raise CannotDecode(f"the compressed frame has {found.parts} tiles, more than "
                             f"{max_tiles(rows, columns)} for its {columns} x {rows} "
                             "pixels")


__all__ = ["MAX_SCANS", "Declared", "check", "declared", "declares", "max_tiles"]
