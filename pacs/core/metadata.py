"""DICOM JSON metadata of instances: built once, kept in the index, read for WADO-RS.

A Retrieve Metadata request (PS3.18 10.4.1.1.2 and 10.4.3.3.2) must never parse every
file of a series: each instance's metadata is encoded once in the DICOM JSON model
(PS3.18 Annex F) and written to the ``instance_metadata`` table.  A series then answers
with one indexed query and a string join.  When it is encoded depends on the path the
object took at ingest (:mod:`pacs.core.ingest`):

- written to the store directly (over ``PACS_INTAKE_OBJECT_BYTES``), or analysed by
  STOW-RS's helper processes: at ingest, in the same index transaction as its instance
  row;
- otherwise acknowledged through the intake (a small C-STORE, import or upload-folder
  file): by the intake's mover, from the bytes it moves (:func:`prepare_bytes`), in
  the transaction that removes the intake row.  The acknowledgement does not wait for
  it: encoding it cost as much CPU as the rest of the analysis of a small instance;
- otherwise (requested before the mover got to it, an object whose JSON did not
  encode, an older index): on first request, from the stored object (or its intake
  copy), by :func:`documents`, which keeps it.

Large binary values (the pixel data, and OB/OD/OF/OL/OV/OW/UN values longer than
:data:`BULK_DATA_THRESHOLD` bytes) are not inlined: they get a ``BulkDataURI``
(PS3.18 F.2.2).  The URI is stored relative to the service root
(``studies/{s}/series/{se}/instances/{i}/bulkdata/{path}``) because the public origin
is only known per request; :func:`absolute_bulk_data_uris` prefixes it when serving.

Speed matters here (every C-STORE and STOW pays it), so the JSON comes from
:mod:`pacs.core.jsonmodel`, which converts pydicom's raw elements directly, and orjson.

The pixel data element is not in the header ingest reads (``stop_before_pixels``); its
position is read from the bytes, recorded as ``pixel_offset`` / ``pixel_length`` for
frame retrieval, and listed in the JSON with its BulkDataURI.  Elements after the pixel
data (trailing padding, digital signatures) are not listed.

Instances without a row (stored before this table existed, or whose row a migration
dropped to encode it again) get theirs from the stored object on first request:
:func:`documents` builds it and backfills the table.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import apsw
import orjson
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from pacs.core import jsonmodel
from pacs.core.dataset import read_part10
from pacs.core.errors import NotFound, PacsError, UnreadableData
from pacs.core.index import reads, writer
from pacs.core.jsonmodel import BULK_DATA_THRESHOLD, PIXEL_TAGS
from pacs.core.storage import open_ranged

if TYPE_CHECKING:
    from pacs.core.dataset import Instance
    from pacs.core.index.connection import Index
    from pacs.core.storage import ObjectStore

log = logging.getLogger(__name__)

#: Undefined length (encapsulated pixel data, PS3.5 A.4).
UNDEFINED_LENGTH = -1

_PIXEL_VRS = {0x7FE00008: "OF", 0x7FE00009: "OD"}

#: Most documents read per query.
BATCH = reads.MAX_KEYS
#: Most bytes of stored JSON read per query (unless one document is larger): what a
#: large study's metadata answer holds at once, whatever its instances hold.
BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class Prepared:
    """An instance's metadata, ready to be written with its index row.

    Attributes
    ----------
    json :
        The DICOM JSON object of the instance (BulkDataURIs relative to the service root).
    pixel_offset :
        Where the pixel data element's value starts in the stored object, if known.
    pixel_length :
        Its length, or :data:`UNDEFINED_LENGTH` for encapsulated pixel data.
    """

    json: str
    pixel_offset: int | None
    pixel_length: int | None


@dataclass(frozen=True)
class Document:
    """One instance's stored metadata, as read for a request.

    ``pixel_offset`` / ``pixel_length`` locate the pixel data in the stored object
    (``None`` when unknown); ``json`` is the DICOM JSON object text.
    """

    sop_uid: str
    object_key: str
    transfer_syntax: str
    pixel_offset: int | None
    pixel_length: int | None
    json: str


# --- building (at ingest) --------------------------------------------------------------

def prepare(instance: Instance, data: bytes) -> Prepared | None:
    """Encode an instance's metadata for :func:`save`; ``None`` if it cannot be encoded.

    Never raises: the object was already accepted by ingest, and a data set whose
    metadata does not encode is still stored (its metadata is built again, with
    pydicom's own encoder, when first requested).

    Parameters
    ----------
    instance : Instance
        The parsed header (``pacs.core.dataset.read_part10``).
    data : bytes
        The Part 10 object as stored.
    """
    try:
        if instance.transfer_syntax == DeflatedExplicitVRLittleEndian:
            # The header came from a bounded walk of the deflate stream
            # (pacs.core.dataset.walk_deflated): never inflate the whole data set here.
            pixel = _deflated_pixels(instance.header)
        else:
            pixel = _pixel_element(instance.header, data, instance.transfer_syntax)
        if pixel is None and _looks_like_an_image(instance) and (
                instance.transfer_syntax != DeflatedExplicitVRLittleEndian):
            # The header reader did not leave its position at the pixel data (or the
            # data set is deflated): parse again, slower but certain.
            return prepare_from_stream(io.BytesIO(data), instance.transfer_syntax)
        text = encode(instance.header, instance.study_uid, instance.series_uid,
                      instance.sop_instance_uid, instance.transfer_syntax, pixel)
    except Exception:  # metadata must never fail an ingest (logged)
        log.warning("could not encode the metadata of an instance at ingest; "
                    "it will be built on first request", exc_info=True)
        return None
    offset, length = (pixel.offset, pixel.length) if pixel else (None, None)
    return Prepared(text, offset, length)


def prepare_bytes(data: bytes) -> Prepared | None:
    """:func:`prepare` for an object already acknowledged, from its bytes alone (the
    intake's mover, :mod:`pacs.core.intake`); ``None`` when its header does not read
    again or its metadata does not encode (built on first request then).  Never
    raises."""
    try:
        instance = read_part10(data)
    except Exception:  # an accepted object: never fails the move (logged)
        log.warning("could not read an acknowledged object's header for its metadata; "
                    "it will be built on first request", exc_info=True)
        return None
    return prepare(instance, data)


def _looks_like_an_image(instance: Instance) -> bool:
    """True when the header has the Image Pixel module's Rows (PS3.3 C.7.6.3)."""
    return 0x00280010 in instance.header


def save(conn: apsw.Connection, sop_uid: str, prepared: Prepared | None) -> None:
    """Write the metadata of an instance whose row was just upserted (same transaction).

    ``None`` removes any metadata of an older object under the same UID, so that it is
    rebuilt from the new object on first request.
    """
    if prepared is None:
        writer.drop_metadata(conn, sop_uid)
        return
    writer.save_metadata(conn, sop_uid, prepared.json, prepared.pixel_offset,
                         prepared.pixel_length)


@dataclass(frozen=True)
class _Pixel:
    """The pixel data element: tag, VR, and its value's place (``None``: unknown)."""

    tag: int
    vr: str
    offset: int | None
    length: int | None


def _pixel_element(header: Dataset, data: bytes, transfer_syntax: str) -> _Pixel | None:
    """Locate the pixel data element where pydicom stopped reading the header.

    ``dcmread(stop_before_pixels=True)`` leaves its buffer at the start of the pixel
    data element (pydicom rewinds to the element's tag); the element's own header then
    gives its VR and length.  Deflated data sets have no such position in the stored
    bytes, and a data set without pixel data ends there instead.
    """
    buffer = getattr(header, "buffer", None)
    if buffer is None or transfer_syntax == DeflatedExplicitVRLittleEndian:
        return None
    position = buffer.tell()
    return pixel_element_at(data[position:position + 12], position, len(data),
                            transfer_syntax)


def pixel_element_at(head: bytes, position: int, total: int,
                     transfer_syntax: str) -> _Pixel | None:
    """The pixel data element whose header ``head`` starts at ``position``, if any.

    ``total`` is the object's size: a value running past it is not trusted.
    """
    order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    if len(head) < 8:
        return None
    group, element = struct.unpack_from(order + "HH", head)
    tag = (group << 16) | element
    if tag not in PIXEL_TAGS:
        return None
    if transfer_syntax == ImplicitVRLittleEndian:
        length = struct.unpack_from("<I", head, 4)[0]
        # PS3.5 A.1: implicit VR pixel data is OW; float pixel data keeps its own VR.
        vr, value = _PIXEL_VRS.get(tag, "OW"), position + 8
    else:
        if len(head) < 12:
            return None
        vr = head[4:6].decode("ascii", "replace")
        length = struct.unpack_from(order + "I", head, 8)[0]
        value = position + 12
    if length == 0xFFFFFFFF:
        return _Pixel(tag, vr, value, UNDEFINED_LENGTH)
    if value + length > total:
        return None
    return _Pixel(tag, vr, value, length)


def encode(header: Dataset, study_uid: str, series_uid: str, sop_uid: str,
           transfer_syntax: str, pixel: _Pixel | None = None) -> str:
    """The DICOM JSON object (PS3.18 F.2) of a header, as compact text.

    ``AvailableTransferSyntaxUID`` (0008,3002) is added with the stored transfer syntax
    (as dcm4chee does) so that a client knows what ``transfer-syntax=*`` will send.
    """
    base = f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata"
    little = transfer_syntax != ExplicitVRBigEndian
    result = jsonmodel.to_json(header, base, little)
    result["00083002"] = {"vr": "UI", "Value": [transfer_syntax]}
    if "00080005" in result:
        # The JSON text is Unicode whatever the object's character set (PS3.18 F.2).
        result["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    if pixel is not None:
        key = f"{pixel.tag:08X}"
        result[key] = {"vr": pixel.vr, "BulkDataURI": f"{base}/{key}"}
    # orjson: a tenth of json.dumps's time, which ingest pays for every instance.
    return orjson.dumps(result, option=orjson.OPT_SORT_KEYS).decode()


# --- reading (for WADO-RS) -------------------------------------------------------------

def documents(index: Index, store: ObjectStore, study_uid: str,
              series_uid: str | None = None, sop_uid: str | None = None) -> list[Document]:
    """The stored metadata of every instance of a study, series or instance.

    Instances without a row (stored before the table existed, or whose metadata did
    not encode at ingest) are built from their stored object and backfilled.

    Raises
    ------
    NotFound
        When nothing matches.
    """
    return fetch(index, store, instance_keys(index, study_uid, series_uid, sop_uid))


def instance_keys(index: Index, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[int]:
    """The index keys of the instances a study, series or instance path names, in
    series then arrival order.

    Raises
    ------
    NotFound
        When nothing matches.
    """
    keys = reads.instance_keys(index.connection(), study_uid, series_uid, sop_uid)
    if not keys:
        raise NotFound("no such study, series or instance")
    return keys


def fetch(index: Index, store: ObjectStore, keys: Sequence[int]) -> list[Document]:
    """The documents of ``keys`` (at most :data:`BATCH` per query), in their order."""
    found: dict[int, Document] = {}
    for start in range(0, len(keys), BATCH):
        for row in reads.metadata_rows(index.connection(), keys[start:start + BATCH]):
            found[row[0]] = _document(index, store, row)
    return [found[pk] for pk in keys if pk in found]


def iter_documents(index: Index, store: ObjectStore, keys: Sequence[int]
                   ) -> Iterator[Document]:
    """The documents of ``keys``, in their order, read in batches of at most
    :data:`BATCH` documents and :data:`BATCH_BYTES` of JSON (a batch holds at least
    one): a study of many instances, or of large ones, is never held whole."""
    for start in range(0, len(keys), BATCH):
        for batch in _byte_batches(index, keys[start:start + BATCH]):
            yield from fetch(index, store, batch)


def _byte_batches(index: Index, keys: Sequence[int]) -> Iterator[list[int]]:
    """``keys`` (at most :data:`BATCH`) cut into runs of at most :data:`BATCH_BYTES`
    of stored JSON, each of one key at least."""
    sizes = reads.metadata_sizes(index.connection(), keys)
    batch: list[int] = []
    held = 0
    for pk in keys:
        size = sizes.get(pk, 0)
        if batch and held + size > BATCH_BYTES:
            yield batch
            batch, held = [], 0
        batch.append(pk)
        held += size
    if batch:
        yield batch


def _document(index: Index, store: ObjectStore, row: reads.MetadataRow) -> Document:
    """An index row as a document, backfilled when it has no JSON."""
    pk, sop, key, checksum, ts, offset, length, text = row
    if text is None:
        return _backfill(index, store, pk, sop, key, checksum, ts)
    return Document(sop, key, ts, offset, length, text)


def _backfill(index: Index, store: ObjectStore, pk: int, sop_uid: str, key: str,
              checksum: str, transfer_syntax: str) -> Document:
    """Build one instance's metadata from its stored object and keep it."""
    with open_ranged(store, key) as source:
        prepared = prepare_from_stream(source, transfer_syntax)
    with index.write() as conn:
        writer.backfill_metadata(conn, pk, checksum, prepared.json, prepared.pixel_offset,
                                 prepared.pixel_length)
    return Document(sop_uid, key, transfer_syntax, prepared.pixel_offset,
                    prepared.pixel_length, prepared.json)


def prepare_from_stream(source: BinaryIO, transfer_syntax: str) -> Prepared:
    """:func:`prepare` for a stored object read from a seekable stream.

    Falls back to pydicom's own JSON encoder when the fast one fails, so that any
    object that pydicom reads has metadata.

    Raises
    ------
    UnreadableData
        When the stored object does not parse.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        header = _deflated_header(source)
        pixel = _deflated_pixels(header)
        study, series, sop = (str(header.get(k, "")) for k in (
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    else:
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True)
            position = source.tell()
            head = source.read(12)
            total = source.seek(0, 2)
            study, series, sop = (str(header.get(k, "")) for k in (
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for malformed input
            raise UnreadableData(
                f"stored object does not parse: {type(exc).__name__}") from None
        pixel = pixel_element_at(head, position, total, transfer_syntax)
    try:
        text = encode(header, study, series, sop, transfer_syntax, pixel)
    except Exception:  # noqa: BLE001 - fall back to pydicom's encoder
        text = _pydicom_json(header, study, series, sop)
    if pixel is None:
        return Prepared(text, None, None)
    return Prepared(text, pixel.offset, pixel.length)


def _deflated_header(source: BinaryIO) -> Dataset:
    """The header of a stored deflated object, read as ingest reads it: the deflate
    stream walked in chunks, only the part before the pixel data kept
    (:func:`pacs.core.dataset.read_part10`), never the whole data set inflated.

    Raises
    ------
    UnreadableData
        When the stored object does not parse.
    """
    source.seek(0)
    try:
        return read_part10(source.read()).header
    except PacsError as exc:
        raise UnreadableData(f"stored object does not parse: {exc}") from None


def _deflated_pixels(header: Dataset) -> _Pixel | None:
    """Pixel data of a deflated image: listed, with no place in the stored bytes.

    Its place is inside the deflate stream, so each frame is inflated from it
    (:func:`pacs.core.dataset.inflated_pixels`); the header is enough to know it is an
    image (Rows, PS3.3 C.7.6.3).
    """
    if "Rows" not in header:
        return None
    return _Pixel(0x7FE00010, "OB" if _bits_allocated(header) <= 8 else "OW", None, None)


def _bits_allocated(header: Dataset) -> int:
    """Bits Allocated as the header holds it, 16 when it holds no one whole number (a
    sender's list, or text: the metadata of an object ingest took must still be made,
    or its study's WADO-RS metadata fails)."""
    value = header.get("BitsAllocated", 16)
    try:
        return int(value) if value not in (None, "") else 16
    except (TypeError, ValueError):
        return 16


def _pydicom_json(header: Dataset, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """pydicom's DICOM JSON of ``header``, for what :func:`encode` cannot encode, within
    the same inline value budget (:func:`pacs.core.jsonmodel.fallback_json`)."""
    base = f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata"
    result = jsonmodel.fallback_json(header, base)
    return orjson.dumps(result, option=orjson.OPT_SORT_KEYS).decode()


def absolute_bulk_data_uris(text: str, base_url: str) -> str:
    """Prefix every stored (relative) BulkDataURI of a JSON text with ``base_url``.

    In compact JSON an unescaped ``"BulkDataURI":"`` can only be that key: quotes
    inside string values are always escaped.
    """
    return text.replace('"BulkDataURI":"', f'"BulkDataURI":"{base_url.rstrip("/")}/')


def json_array(docs: Sequence[Document], base_url: str) -> str:
    """The metadata of several instances as one JSON array (PS3.18 F.2.1)."""
    return absolute_bulk_data_uris("[" + ",".join(d.json for d in docs) + "]", base_url)


def representative(index: Index, study_uid: str, series_uid: str | None = None) -> str:
    """The SOP Instance UID that stands for a series or study in a rendered view.

    The middle image (by Instance Number) of the series, or of the study's first series
    (by Series Number) that has images: a middle slice shows more anatomy than the
    first one.

    Raises
    ------
    NotFound
        When the series or study has no image.
    """
    images = reads.first_series_images(index.connection(), study_uid, series_uid)
    if not images:
        raise NotFound("no image in this study or series")
    return images[len(images) // 2]


def parse(text: str) -> dict[str, Any]:
    """One stored JSON object, parsed."""
    return orjson.loads(text)  # type: ignore[no-any-return]


def value(doc: dict[str, Any], tag: int, default: Any = None) -> Any:
    """The first value of an element of a parsed JSON object."""
    values = doc.get(f"{tag:08X}", {}).get("Value")
    return values[0] if values else default


def values(doc: dict[str, Any], tag: int) -> list[Any]:
    """Every value of an element of a parsed JSON object."""
    return list(doc.get(f"{tag:08X}", {}).get("Value") or [])


__all__ = [
    "BATCH", "BATCH_BYTES", "BULK_DATA_THRESHOLD", "Document", "Prepared",
    "absolute_bulk_data_uris", "documents", "encode", "fetch", "instance_keys",
    "iter_documents", "json_array", "parse", "prepare",
    "prepare_from_stream", "representative", "save", "value", "values",
]
