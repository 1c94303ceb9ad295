"""Rendered and thumbnail resources (PS3.18 10.4.1.1.4 and 10.4.1.1.6, Sup 203).

=============================================================  ===========================
route (below each prefix)                                      what is drawn
=============================================================  ===========================
/studies/{study}/rendered, …/thumbnail                         a representative image
/studies/{study}/series/{series}/rendered, …/thumbnail         a representative image
/studies/{study}/series/{series}/instances/{instance}          the first frame
/rendered, …/thumbnail
…/instances/{instance}/frames/{frames}/rendered, …/thumbnail   the first frame listed
=============================================================  ===========================

The representative image of a series is its middle image by Instance Number, and of a
study the middle image of its first series with images (:func:`pacs.core.metadata
.representative`): a middle slice shows more than the first one.

Images are drawn for presentation as PS3.18 8.3.5.1 and PS3.3 C.11 describe, with numpy
and Pillow: the Modality LUT (Rescale Slope / Intercept), then the VOI window (the
``window`` parameter, else the data set's first Window Center / Width, else the
frame's own minimum to maximum), linear, linear-exact or sigmoid (VOI LUT Function),
MONOCHROME1 inverted, colour passed through (palette colour through its LUT), and
scaled to the ``viewport``.  A stored value these steps need that does not say what
they need (a Rescale Slope that is not a number, a palette colour image without its
palette, an empty VOI LUT item) leaves the image undrawable: 406, as for pixels no
decoder here decodes (:class:`pacs.core.errors.CannotDecode`), never a failure of
the server's.  Parameters (8.3.5.1): ``quality`` (1-100, JPEG),
``viewport=vw,vh[,sx,sy,sw,sh]`` (crop to the source region, which must lie within
the image, then fit into vw x vh, keeping the aspect ratio),
``window=center,width[,function]``; ``annotation`` and ``iccprofile`` are accepted and
ignored.  A thumbnail is the same image fitted into
:data:`THUMBNAIL_SIZE` unless a viewport is given.

A Structured Report asked for by itself is rendered as text, ``text/html`` by default or
``text/plain`` (the Text category of Table 8.7.4-1; :mod:`adapters.dicomweb.report`).

Media types: ``image/jpeg`` (the default, 8.7.4), ``image/png`` and ``image/gif``
(both required for single-frame images, Table 8.7.4-1); an encapsulated
document (PDF, CDA…) is returned as itself when its type is accepted, streamed from
where it lies in the stored object (:mod:`pacs.core.documents`).  The ``accept``
query parameter replaces the Accept header (OHIF sends ``?accept=image/jpeg`` with a
multipart Accept for thumbnails).

Active content: the server selects the rendered media type (8.7.4), and a stored
document's MIME Type of Encapsulated Document (0042,0012) is whatever the sender
wrote - ``text/html``, ``image/svg+xml``, ``text/xml`` all run script in a browser,
``text/javascript`` in any page that includes it.
Run in this origin, which answers this host's browsers without credentials, such a
document could read and change every study.  So a document is never served inline:
always ``Content-Disposition: attachment`` (the browser saves it, also when it is
framed), under ``Content-Security-Policy: sandbox`` with nothing allowed
(:data:`adapters.dicomweb.app.DICOMWEB_POLICY`, on every DICOMweb answer) and
``nosniff``, with its stored type only when that type is one of the inert document
types (PDF, XML, plain text, 3D models; otherwise ``application/octet-stream``: a
stored ``text/javascript`` sent as itself would run as a script, a worker or a service
worker of this origin in any page that includes it, whatever its own response's
policy says).  PDF too: Chromium does not open its PDF viewer in a
sandboxed document, so inline with ``sandbox`` would not show, and inline without it
would run the PDF's scripts here; downloaded, it opens in the user's PDF reader.

Pixels are decoded only within ``PACS_MAX_FRAME_BYTES`` (:mod:`pacs.core.frames`), checked
from the stored metadata before the object is even opened, and drawn a band of rows at
a time (:func:`by_bands`), so that a request holds the frame, its 8-bit image and a
band's intermediates, not a dozen float copies of the frame.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import falcon
import numpy as np
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from adapters.dicomweb import accept, report, wado
from adapters.dicomweb.accept import Accept, MediaRange, Offer
from adapters.dicomweb.errors import Unacceptable
from pacs.core import documents, frames as pixels, metadata
from pacs.core.errors import CannotDecode, InvalidQuery
from pacs.core.services import Services

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
#: Media types of rendered images, the default first (PS3.18 8.7.4).
RENDERED_TYPES = (JPEG, PNG, GIF)
#: Pillow's format of each.
_FORMATS = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}
#: Longest side of a thumbnail without a viewport (OHIF's study browser draws ~128 px).
THUMBNAIL_SIZE = 128
#: JPEG quality when none is asked for.
DEFAULT_QUALITY = 90
#: Largest viewport side accepted (a bound on the memory one request may take).
MAX_VIEWPORT = 8192
#: Longest side an image is enlarged to, to fit a larger viewport: enlarging adds no
#: detail, and a 4 x 4 image drawn at 8192 x 8192 made a 200-byte request cost
#: seconds of a worker thread and megabytes of answer (the client scales it further).
MAX_ENLARGED = 2048

_RESCALE_SLOPE, _RESCALE_INTERCEPT = 0x00281053, 0x00281052
_WINDOW_CENTER, _WINDOW_WIDTH, _VOI_FUNCTION = 0x00281050, 0x00281051, 0x00281056
_PHOTOMETRIC, _BITS_STORED = 0x00280004, 0x00280101
#: Shared and Per-frame Functional Groups Sequences (PS3.3 C.7.6.16).
_SHARED_GROUPS, _PER_FRAME_GROUPS = "52009229", "52009230"
#: Modality LUT Sequence, VOI LUT Sequence (PS3.3 C.11.1, C.11.2).
_MODALITY_LUT, _VOI_LUT = "00283000", "00283010"
_DOCUMENT, _DOCUMENT_TYPE = "00420011", 0x00420012
_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
#: The narrowest window width drawn: frames are drawn in float32 (:func:`by_bands`),
#: where a width below float32's smallest normal number divides as 0 (or loses its
#: precision), and the pixels become NaN.  A narrower width is no window: refused as
#: a parameter, passed over in a data set (:func:`default_window`).
MIN_WIDTH = float(np.finfo(np.float32).tiny)
#: What a stored document is sent as when its declared type is not an inert one.
OCTET = "application/octet-stream"
#: The inert document types a stored document is sent as (its declared type, when one
#: of these), with their file name extensions (PS3.3 C.24.2).
_EXTENSIONS = {"application/pdf": "pdf", "text/xml": "xml", "application/xml": "xml",
               "text/plain": "txt", "model/stl": "stl", "model/obj": "obj",
               "model/mtl": "mtl"}


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and function."""

    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class Viewport:
    """PS3.18 8.3.5.1.3: the output size and an optional source region."""

    width: int
    height: int
    region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Params:
    """The rendering parameters of one request (PS3.18 8.3.5.1)."""

    quality: int = DEFAULT_QUALITY
    viewport: Viewport | None = None
    window: Window | None = None


def _numbers(parts: Sequence[str], name: str) -> list[float]:
    """Decimal numbers, finite ones only: ``inf`` and ``1e400`` parse as floats, but no
    quality, size or window is infinite (PS3.18 8.3.5.1).

    Raises
    ------
    InvalidQuery
        A part that is not a number, or not a finite one.
    """
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise InvalidQuery(f"{name}: expected comma-separated numbers") from None
    if not all(math.isfinite(value) for value in values):
        raise InvalidQuery(f"{name}: expected finite numbers")
    return values


def _ints(text: str, name: str) -> list[int]:
    """Comma-separated :func:`_numbers` without their fractions (pixels and quality
    are whole)."""
    return [int(value) for value in _numbers(text.split(","), name)]


def parse_params(req: falcon.Request) -> Params:
    """The request's rendering parameters; 400 for values out of their range."""
    quality = DEFAULT_QUALITY
    if (text := req.get_param("quality")) is not None:
        values = _ints(text, "quality")
        if len(values) != 1 or not 1 <= values[0] <= 100:
            raise InvalidQuery("quality: a number from 1 to 100")
        quality = values[0]
    return Params(quality, _viewport(req.get_param("viewport")),
                  _window(req.get_param("window")))


def _viewport(text: str | None) -> Viewport | None:
    if text is None:
        return None
    values = _ints(text, "viewport")
    if len(values) not in (2, 6) or not all(0 < v <= MAX_VIEWPORT for v in values[:2]):
        raise InvalidQuery(f"viewport: vw,vh[,sx,sy,sw,sh] with sides 1 to {MAX_VIEWPORT}")
    region = tuple(values[2:]) if len(values) == 6 else None
    return Viewport(values[0], values[1], region)  # type: ignore[arg-type]


def _window(text: str | None) -> Window | None:
    if text is None:
        return None
    parts = text.split(",")
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    if len(parts) < 2:
        raise InvalidQuery("window: center,width[,function]")
    center, width = _numbers(parts[:2], "window")
    if len(parts) > 3 or width < MIN_WIDTH or function not in _FUNCTIONS:
        raise InvalidQuery(f"window: width >= {MIN_WIDTH:.3g} and function linear, "
                           "linear-exact or sigmoid")
    return Window(center, width, function)


def choose_media(ranges: Accept, document: str | None = None,
                 offered: Sequence[str] = RENDERED_TYPES) -> str:
    """The media type to answer with (PS3.18 8.7.4): of ``offered`` (an image: JPEG
    unless PNG or GIF is preferred; a report: :data:`report.REPORT_TYPES`), the first
    the client accepts and does not rule out (``image/jpeg;q=0, */*`` gets PNG,
    :func:`adapters.dicomweb.accept.choose`); a document's own type for a document;
    406 when none is left."""
    if document:
        offered = (document,)

    def offers(media: MediaRange) -> Iterator[Offer[str]]:
        if not media.multipart:  # rendered answers are single parts
            yield from (Offer(kind, kind) for kind in offered if media.allows(kind))

    choice = accept.choose(ranges, offers)
    if choice is None:
        raise Unacceptable(f"rendered as {', '.join(offered)} only")
    return choice[1]


# --- drawing --------------------------------------------------------------------------

def voi(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2: map values through a window to 0..255."""
    center, width = window.center, window.width
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif window.function == "linear-exact":
        out = ((values - center) / width + 0.5) * 255.0
    else:
        width = max(width, 1.0)  # C.11.2.1.2.1: width >= 1 for LINEAR
        out = ((values - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def default_window(doc: dict[str, Any], array: np.ndarray, slope: float = 1.0,
                   intercept: float = 0.0) -> Window:
    """The data set's first window, else the range of the frame's values through the
    Modality LUT (PS3.3 C.11.2), found from the stored values' own extremes (the LUT
    is linear) without converting the frame.  A stored window whose center or width
    is not a number is passed over, as one too narrow is: it is a suggestion of the
    sender's (PS3.3 C.11.2.1.2), and the frame can be drawn without it."""
    center, width = _suggested(doc, _WINDOW_CENTER), _suggested(doc, _WINDOW_WIDTH)
    function = str(metadata.value(doc, _VOI_FUNCTION, "LINEAR")).lower().replace("_", "-")
    if center is not None and width is not None and width >= MIN_WIDTH:
        return Window(float(center), float(width),
                      function if function in _FUNCTIONS else "linear")
    extremes = np.array([array.min(), array.max()]).astype(np.float32) * slope + intercept
    low, high = float(extremes.min()), float(extremes.max())
    return Window((low + high) / 2 + 0.5, max(high - low, 1.0) + 1, "linear")


def _suggested(doc: dict[str, Any], tag: int) -> float | None:
    """The number of a stored window's element; ``None`` when absent or not one."""
    try:
        return pixels.number_value(doc, tag, None)
    except CannotDecode:
        return None


#: Pixels drawn at a time (:func:`by_bands`): the float and integer intermediates of
#: drawing a frame take a few times this, not a few times the frame.
BAND_PIXELS = 1 << 18


def by_bands(array: np.ndarray, draw_band: Callable[[np.ndarray], np.ndarray],
             shape: tuple[int, ...]) -> np.ndarray:
    """``draw_band`` applied to bands of ``array``'s rows, into one 8-bit image of
    ``shape``.

    A frame within ``PACS_MAX_FRAME_BYTES`` is drawn in float32 (four bytes a value)
    through several intermediate arrays: done on the whole frame at once that is a
    dozen times the frame's own bytes for 8-bit pixels.  Drawn a band of rows at a
    time, memory stays at the frame, the 8-bit image and one band's intermediates;
    every value is computed as it would be at once (each output pixel depends on its
    input pixel alone).
    """
    out = np.empty(shape, np.uint8)
    rows = array.shape[0]
    step = max(1, BAND_PIXELS // max(1, array[:1].size))
    for start in range(0, rows, step):
        out[start:start + step] = draw_band(array[start:start + step])
    return out


def grey(array: np.ndarray, doc: dict[str, Any], window: Window | None) -> np.ndarray:
    """A monochrome frame to 8 bits for display: Modality LUT, VOI, MONOCHROME1."""
    slope = float(pixels.number_value(doc, _RESCALE_SLOPE, 1.0) or 1.0)
    intercept = float(pixels.number_value(doc, _RESCALE_INTERCEPT, 0.0))
    chosen = window or default_window(doc, array, slope, intercept)
    # PS3.3 C.7.6.3.1.2: MONOCHROME1's minimum is white.
    inverted = metadata.value(doc, _PHOTOMETRIC) == "MONOCHROME1"

    def band(part: np.ndarray) -> np.ndarray:
        out = voi(part.astype(np.float32) * slope + intercept, chosen)
        return 255 - out if inverted else out

    return by_bands(array, band, array.shape)


def colour(array: np.ndarray, doc: dict[str, Any],
           lut: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """A colour frame (RGB after decoding, or palette indices with their ``lut``) to
    8 bits per sample."""
    if array.dtype == np.uint8 and lut is None:
        return array[..., :3]
    stored = pixels.whole_value(doc, _BITS_STORED, 8) or 8

    def band(part: np.ndarray) -> np.ndarray:
        samples = lut(part) if lut is not None else part
        # A palette's entries fill their 8 or 16 bits (PS3.3 C.7.6.3.1.5); other
        # samples Bits Stored.
        bits = 8 * samples.dtype.itemsize if lut is not None else stored
        shifted: np.ndarray = np.clip(
            samples[..., :3].astype(np.int64) >> max(bits - 8, 0), 0, 255)
        return shifted.astype(np.uint8)

    return by_bands(array, band, (*array.shape[:2], 3))


def source_box(region: tuple[int, int, int, int], width: int,
               height: int) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) of a viewport's source region in an
    image of ``width`` x ``height`` pixels.

    PS3.18 8.3.5.1.3 places the region in the source image: ``sx,sy`` its corner from
    the image's top left, ``sw,sh`` its extent (a negative one flips it).  It says
    nothing of pixels outside the image, so a region that leaves the image, or has no
    extent, asks for something the image does not hold and is refused (400) rather
    than clipped: clipping would draw another region, at another scale, than the one
    asked for, without saying so.  Within the image, the crop is never larger than the
    decoded frame (PACS_MAX_FRAME_BYTES), whatever numbers the request holds.

    Raises
    ------
    InvalidQuery
        When the region is empty or not within the image.
    """
    sx, sy, sw, sh = region
    left, right = sorted((sx, sx + sw))
    top, bottom = sorted((sy, sy + sh))
    if sw == 0 or sh == 0 or left < 0 or top < 0 or right > width or bottom > height:
        raise InvalidQuery(f"viewport: the source region sx,sy,sw,sh must be within the "
                           f"image ({width} x {height} pixels) and not empty")
    return left, top, right, bottom


def fit(image: Image.Image, viewport: Viewport | None, limit: int | None) -> Image.Image:
    """Crop to the viewport's source region, then scale into its size (or ``limit``),
    the aspect ratio kept (PS3.18 8.3.5.1.3); an image smaller than the viewport is
    enlarged only up to :data:`MAX_ENLARGED` pixels on its longer side.

    Raises
    ------
    InvalidQuery
        A source region that is not within the image (:func:`source_box`).
    """
    if viewport is not None and viewport.region is not None:
        sw, sh = viewport.region[2:]
        image = image.crop(source_box(viewport.region, image.width, image.height))
        if sw < 0:  # PS3.18 8.3.5.1.3: a negative extent flips the region
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if viewport is not None:
        width, height = viewport.width, viewport.height
    elif limit is not None:
        width = height = limit
        if image.width <= limit and image.height <= limit:
            return image
    else:
        return image
    scale = min(width / image.width, height / image.height)
    if scale > 1:  # enlarged at most to MAX_ENLARGED, never shrunk for it
        scale = min(scale, max(1.0, MAX_ENLARGED / max(image.width, image.height)))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image


def frame_view(doc: dict[str, Any], number: int) -> dict[str, Any]:
    """The instance's metadata as frame ``number`` sees it: the attributes of its
    functional groups (PS3.3 C.7.6.16: the shared ones, then the frame's own, which
    win), such as Frame VOI LUT (window) and Pixel Value Transformation (rescale),
    over those of the data set's top level, where enhanced objects keep neither."""
    view = dict(doc)
    for key, index in ((_SHARED_GROUPS, 0), (_PER_FRAME_GROUPS, number - 1)):
        items = doc.get(key, {}).get("Value") or []
        item = items[index] if 0 <= index < len(items) else None
        for group in (item or {}).values():
            for macro in group.get("Value") or () if isinstance(group, dict) else ():
                if isinstance(macro, dict):
                    view.update(macro)
    return view


def lut_applied(array: np.ndarray, doc: dict[str, Any], header: Any,
                window: Window | None) -> tuple[np.ndarray, dict[str, Any]]:
    """A monochrome frame through its Modality LUT Sequence and, unless a window is
    asked for or the data set has one, its VOI LUT Sequence (PS3.3 C.11.1, C.11.2:
    tables, not the linear rescale and window :func:`grey` applies), with the view
    :func:`grey` then draws it by: the table's output fills its own range."""
    if header is None or (_MODALITY_LUT not in doc and _VOI_LUT not in doc):
        return array, doc
    # The Modality LUT, table or rescale, always before the VOI (C.11.1): applied here,
    # so not again by grey().
    values = tabled(lambda: apply_modality_lut(array, header), "Modality LUT")
    view = {k: v for k, v in doc.items()
            if k not in (f"{_RESCALE_INTERCEPT:08X}", f"{_RESCALE_SLOPE:08X}")}
    if _VOI_LUT in doc and window is None and metadata.value(doc, _WINDOW_CENTER) is None:
        values, top = tabled(lambda: _voi_table(values, header), "VOI LUT")
        view.update({f"{_WINDOW_CENTER:08X}": {"vr": "DS", "Value": [top / 2]},
                     f"{_WINDOW_WIDTH:08X}": {"vr": "DS", "Value": [top]},
                     f"{_VOI_FUNCTION:08X}": {"vr": "CS", "Value": ["LINEAR_EXACT"]}})
    return np.asarray(values), view


def _voi_table(values: np.ndarray, header: Any) -> tuple[np.ndarray, float]:
    """``values`` through the data set's first VOI LUT (PS3.3 C.11.2), and the largest
    value the table gives, 2^bits - 1 (its LUT Descriptor's third value): what is
    shown."""
    out = apply_voi_lut(values.astype(np.int64) if values.dtype.kind == "f" else values,
                        header, prefer_lut=True)
    return out, float(2 ** int(header.VOILUTSequence[0].LUTDescriptor[2]) - 1)


_Tabled = TypeVar("_Tabled")


def tabled(apply: Callable[[], _Tabled], table: str) -> _Tabled:
    """``apply()``, which applies a lookup table of the stored header (PS3.3 C.7.6.3.1.5
    Palette Color, C.11.1 Modality LUT, C.11.2 VOI LUT) through pydicom.

    The tables are what the sender wrote, and ingest does not check them: a Palette
    Color image without its palette, a VOI LUT Sequence whose item is empty.  pydicom
    then raises what it meets (``ValueError``, ``AttributeError``, ``IndexError``…):
    the image cannot be drawn, which is the stored object's state, not a failure here.

    Raises
    ------
    CannotDecode
        The table is missing or does not apply.
    """
    try:
        return apply()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad tables
        raise CannotDecode(f"the {table} of the data set cannot be applied: "
                           f"{type(exc).__name__}") from None


def draw(array: np.ndarray, doc: dict[str, Any], params: Params,
         header: Any = None) -> Image.Image:
    """A decoded frame as an 8-bit image ready to encode."""
    photometric = metadata.value(doc, _PHOTOMETRIC, "")
    if photometric == "PALETTE COLOR" and header is not None:
        # The LUT's samples are 8 or 16 bits, three per index: applied band by band.
        return Image.fromarray(tabled(lambda: colour(array, doc, lambda part: (
            apply_color_lut(part, header))), "Palette Color Lookup Table"), "RGB")
    if array.ndim == 3:
        return Image.fromarray(colour(array, doc), "RGB")
    array, doc = lut_applied(array, doc, header, params.window)
    return Image.fromarray(grey(array, doc, params.window), "L")


def encode(image: Image.Image, media: str, quality: int) -> bytes:
    """JPEG, PNG or GIF bytes (a colour GIF through a 256-colour palette)."""
    out = io.BytesIO()
    if media == JPEG:
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format=_FORMATS[media])
    return out.getvalue()


# --- resources ------------------------------------------------------------------------

class Rendered:
    """Rendered (``thumbnail=False``) or Thumbnail resources at every level."""

    def __init__(self, services: Services, thumbnail: bool) -> None:
        self.services = services
        self.thumbnail = thumbnail

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str,
               series: str | None = None, instance: str | None = None,
               frames: str | None = None) -> None:
        """The image (or document) of the path, as JPEG or PNG."""
        ranges = accept.from_request(req)
        params = parse_params(req)
        doc = self._document(study, series, instance)
        parsed = metadata.parse(doc.json)
        if instance is not None and frames is None and not self.thumbnail \
                and report.is_report(parsed):
            media = choose_media(ranges, offered=report.REPORT_TYPES)
            text = report.as_html(parsed) if media == report.TEXT_HTML \
                else report.as_text(parsed)
            resp.content_type = f"{media}; charset=utf-8"
            resp.data = text.encode()
            return
        document_type = self._document_type(parsed, instance, frames)
        media = choose_media(ranges, document_type)
        if media == document_type:
            stored = documents.open_document(self.services.store, doc.object_key,
                                             self.services.settings.max_object_bytes)
            send_document(resp, media, stored, req.path)
            return
        number = wado.frame_numbers(frames)[0] if frames else 1
        lay = pixels.layout(doc, parsed)
        pixels.check_numbers(lay, [number])
        limit = self.services.settings.max_frame_bytes
        pixels.check_decodable(lay.decoded_bytes, limit)  # before the object is opened
        if params.viewport is not None and params.viewport.region is not None:
            source_box(params.viewport.region, lay.columns, lay.rows)  # before decoding
        image = self._image(doc, parsed, lay, number, params)
        resp.content_type = media
        resp.data = encode(image, media, params.quality)

    def _document(self, study: str, series: str | None,
                  instance: str | None) -> metadata.Document:
        wado.require_uid(study, "StudyInstanceUID")
        if series is not None:
            wado.require_uid(series, "SeriesInstanceUID")
        if instance is None:
            instance = metadata.representative(self.services.index, study, series)
        else:
            wado.require_uid(instance, "SOPInstanceUID")
        return metadata.documents(self.services.index, self.services.store, study,
                                  series, instance)[0]

    def _document_type(self, parsed: dict[str, Any], instance: str | None,
                       frames: str | None) -> str | None:
        """The MIME type of an encapsulated document instance asked for by itself."""
        if instance is None or frames is not None or self.thumbnail:
            return None
        if _DOCUMENT not in parsed:
            return None
        kind = metadata.value(parsed, _DOCUMENT_TYPE)
        return document_media_type(str(kind)) if kind else OCTET

    def _image(self, doc: metadata.Document, parsed: dict[str, Any], lay: pixels.Layout,
               number: int, params: Params) -> Image.Image:
        with pixels.open_frames(self.services.store, doc.object_key, lay) as source:
            array = pixels.decoded(source, number, lay,
                                   self.services.settings.max_frame_bytes)
            view = frame_view(parsed, number)
            # The header (pydicom's) only where a table is applied: its values are
            # bulk data in the metadata.
            tables = (metadata.value(view, _PHOTOMETRIC) == "PALETTE COLOR"
                      or _MODALITY_LUT in view or _VOI_LUT in view)
            header = pixels.read_header(source) if tables else None
        image = draw(array, view, params, header)
        return fit(image, params.viewport, THUMBNAIL_SIZE if self.thumbnail else None)


def document_media_type(declared: str) -> str:
    """The type a stored document is sent as: its declared MIME type without
    parameters, lower-cased, when it is one of the inert document types
    (:data:`_EXTENSIONS`: PDF, CDA's XML, plain text, the 3D model types of PS3.3
    A.85-A.87); :data:`OCTET` for any other.  The value is the sender's: a type a
    browser runs when a page includes it (``text/javascript`` as a script, a worker
    or a service worker, ``text/css`` as a style sheet, ``application/wasm``) would
    run in this origin whatever the response's own sandbox says, and ``nosniff``
    only holds a browser to the type sent."""
    kind = declared.split(";", 1)[0].strip().lower()
    return kind if kind in _EXTENSIONS else OCTET


def send_document(resp: falcon.Response, media: str, stored: documents.StoredDocument,
                  what: str) -> None:
    """A stored document as a download, never run in this origin (module docstring),
    streamed from the store a chunk at a time (``what`` names it in the log should the
    body be cut short, :func:`adapters.dicomweb.wado.sent`)."""
    resp.content_type = media
    name = f"document.{_EXTENSIONS.get(media, 'bin')}"
    resp.set_header("Content-Disposition", f'attachment; filename="{name}"')
    resp.content_length = stored.length
    resp.stream = wado.sent(wado.started(stored.chunks(wado.CHUNK_BYTES)), what)


def add_routes(app: Any, services: Services, prefix: str) -> None:
    """Register rendered and thumbnail resources at every level under ``prefix``."""
    study = prefix + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    frames = instance + "/frames/{frames}"
    for suffix, thumbnail in (("/rendered", False), ("/thumbnail", True)):
        resource = Rendered(services, thumbnail)
        for base in (study, series, instance, frames):
            app.add_route(base + suffix, resource)


__all__ = ["Rendered", "add_routes", "choose_media", "document_media_type", "draw",
           "parse_params", "send_document", "voi"]
