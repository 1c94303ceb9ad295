"""WADO-RS, the Retrieve transaction (PS3.18 10.4), over the core's index and store.

=============================================================  ===========================
route (below each prefix)                                      resource (PS3.18)
=============================================================  ===========================
/studies/{study}                                               Study instances (10.4.1.1.1)
/studies/{study}/series/{series}                               Series instances
/studies/{study}/series/{series}/instances/{instance}          Instance
/studies/{study}[/series/{series}[/instances/{instance}]]      Metadata (10.4.1.1.2)
/metadata
/studies/{study}/series/{series}/instances/{instance}          Frames (10.4.1.1.3)
/frames/{frames}
/studies/{study}/series/{series}/instances/{instance}          Bulkdata (10.4.1.1.5), the
/bulkdata/{path}                                               BulkDataURIs of the metadata
…/bulkdata/7FE00010/frames/{frames}                            frames of the pixel data
…/rendered, …/thumbnail                                        :mod:`.rendered`
=============================================================  ===========================

Answers, each in the media type of the first acceptable alternative (best first) that
can be produced and that no ``q=0`` range rules out (:func:`adapters.dicomweb.accept
.choose`); single part for a single part alternative (``application/dicom``,
``application/*``), multipart/related for a multipart one or ``*/*``:

- instances: ``multipart/related; type="application/dicom"``, one part per instance,
  each ``Content-Type: application/dicom; transfer-syntax=<UID>``.  The transfer syntax
  comes from the Accept header (8.7.3.5.1): ``*`` sends the stored bytes; none asked
  means Explicit VR Little Endian (8.7.3.5.2, Table 8.7.3-2), converted when stored
  otherwise; a syntax that cannot be produced for every instance is ``406``.  Parts are
  streamed from the store, one chunk at a time; a conversion is written frame by frame
  to a temporary file (:func:`pacs.core.transcode.convert_into`) and sent from it.  A
  bare ``application/dicom`` (one part, no multipart) answers an instance only: for a
  study or series it is ignored, and ``406`` when nothing else is accepted (10.4.4);
- metadata: ``application/dicom+json`` (exactly), the JSON prepared at ingest
  (:mod:`pacs.core.metadata`) with absolute BulkDataURIs for this request's origin,
  streamed an instance at a time (:func:`pacs.core.metadata.iter_documents`);
- frames: ``multipart/related; type="application/octet-stream"`` (or an ``image/*``
  type for compressed data asked that way), each part stating
  ``transfer-syntax=<actual UID>``; uncompressed when none is asked for, as stored for
  ``transfer-syntax=*``.  ``type="*/*"`` (dicomweb-client's default) is answered with
  uncompressed frames, or stored ones when no decoder exists;
- bulk data: the value as ``application/octet-stream``; pixel data as its frames.  In
  multipart/related each part has the Content-Location of its BulkDataURI (10.4.3.3.5),
  a frame of the pixel data ``{BulkDataURI}/frames/{n}``;
- unknown study, series, instance or frame: ``404``; a malformed UID or frame list,
  or one that names a frame twice: ``400``.

Instances, frames and pixel data are streamed, one stored chunk or one frame in
memory at a time, with or without multipart.  What can refuse a
request is decided before the status line: the resources, the media types, the
declared sizes of whatever must be decoded (``PACS_MAX_FRAME_BYTES``,
``PACS_MAX_OBJECT_BYTES``, from the metadata kept in the index), and the first frame or
instance, read before answering.  A failure after that (a later frame that does not
read, the store failing) can only cut the response short: the connection is closed
before the end of the body (:func:`sent`).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, BinaryIO, NamedTuple, TypeVar, cast

import falcon
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from adapters.dicomweb import accept, multipart, urls
from adapters.dicomweb.accept import ANY, Accept, MediaRange, Offer, bulk_offer
from adapters.dicomweb.errors import Unacceptable
from adapters.dicomweb.negotiation import json_type
from adapters.dicomweb.numbers import IS_MAX, whole_number
from pacs.core import frames as pixels, metadata, transcode
from pacs.core.attributes import BY_KEYWORD, Level
from pacs.core.dataset import require_uid
from pacs.core.errors import (
    CannotDecode,
    FrameTooLarge,
    InvalidQuery,
    NotFound,
    PacsError,
    UnreadableData,
)
from pacs.core.jsonmodel import REPLACEABLE_VRS
from pacs.core.query.model import Constraint, InstanceRef, Match, Query, Term
from pacs.core.services import Services
from pacs.core.storage import open_ranged

log = logging.getLogger(__name__)

DICOM = "application/dicom"
OCTET = "application/octet-stream"
#: Bytes read from the store per chunk of a streamed instance.
CHUNK_BYTES = 1 << 20
#: Most frames in one Retrieve Frames request (a frame list is one URL path segment).
MAX_FRAMES = 10_000

_T = TypeVar("_T")

#: Image media types of compressed transfer syntaxes (PS3.18 Table 8.7.3-5).
IMAGE_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
#: ``transfer-syntax`` values of a frames request answered with uncompressed frames.
NATIVE_FRAME_SYNTAXES = (str(ExplicitVRLittleEndian), "1.2.840.10008.1.2")


# --- shared by the retrieve resources --------------------------------------------------

def instances(services: Services, study: str, series: str | None = None,
              instance: str | None = None) -> list[InstanceRef]:
    """The stored instances a path names, in the index's order; 404 when none.

    The list is small (UIDs and keys), so it is read whole before anything is sent:
    the status line can still say 404, and no index cursor stays open while a slow
    client reads a large study.
    """
    uids = {"StudyInstanceUID": require_uid(study, "StudyInstanceUID")}
    if series is not None:
        uids["SeriesInstanceUID"] = require_uid(series, "SeriesInstanceUID")
    if instance is not None:
        uids["SOPInstanceUID"] = require_uid(instance, "SOPInstanceUID")
    query = Query(level=Level.IMAGE, constraints=tuple(
        Constraint(BY_KEYWORD[k], (Term(Match.SINGLE, value=v),)) for k, v in uids.items()))
    found = list(services.engine.instances(query))
    if not found:
        raise NotFound("no such study, series or instance")
    return found


def one_document(services: Services, study: str, series: str,
                 instance: str) -> metadata.Document:
    """The stored metadata of one instance; 404 when it does not exist."""
    for uid, name in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"),
                      (instance, "SOPInstanceUID")):
        require_uid(uid, name)
    return metadata.documents(services.index, services.store, study, series, instance)[0]


def object_chunks(services: Services, key: str) -> Iterator[bytes]:
    """A stored object, streamed in :data:`CHUNK_BYTES` chunks."""
    with services.store.open(key) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk


def value_chunks(services: Services, key: str, offset: int,
                 length: int) -> Iterator[bytes]:
    """``length`` bytes of a stored object from ``offset``, :data:`CHUNK_BYTES` at a time.

    Raises
    ------
    UnreadableData
        When the object ends first.
    """
    with open_ranged(services.store, key) as source:
        source.seek(offset)
        while length > 0:
            chunk = source.read(min(CHUNK_BYTES, length))
            if not chunk:
                raise UnreadableData("the stored object is truncated")
            length -= len(chunk)
            yield chunk


def started(items: Iterable[_T]) -> Iterator[_T]:
    """``items``, its first one produced now, the others as they are sent.

    Whatever fails on the way to the first item (an object missing from the store, a
    first frame that does not read or decode, a conversion) is raised here, before the
    status line, and answered with its own status.  Memory: that one item.
    """
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return iter(())
    return _first_then(first, iterator)


def _first_then(first: _T, rest: Iterator[_T]) -> Iterator[_T]:
    yield first
    yield from rest


def sent(body: Iterable[bytes], what: str) -> Iterator[bytes]:
    """A response body as it is sent, once its status line is.

    A failure now can only cut the response short: the exception goes on to the HTTP
    server, which closes the connection (:mod:`pacs.node.httpworker`), so the client
    sees a multipart body without its close delimiter, or fewer bytes than the
    Content-Length - never a body that looks complete.  It is logged here, naming what
    was being sent, since the client is told nothing more.
    """
    try:
        yield from body
    except PacsError as exc:
        log.error("WADO-RS response cut short: %s: %s", what, exc)
        raise


def send_multipart(resp: falcon.Response, part_type: str,
                   parts: Iterable[tuple[dict[str, str], bytes | Iterable[bytes]]],
                   what: str) -> None:
    """Stream ``parts`` as ``multipart/related`` (PS3.18 8.7.3.3); ``what`` names the
    resource in the log should the body be cut short (:func:`sent`)."""
    boundary = multipart.new_boundary()
    resp.content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    resp.stream = sent(multipart.encode(parts, boundary), what)


# --- study, series and instance -------------------------------------------------------

class Choice(NamedTuple):
    """A way to send an instance: alone or in multipart/related, and in which transfer
    syntax."""

    single_part: bool
    syntax: str


def instance_choices(ranges: Accept, stored: str) -> tuple[Choice, ...]:
    """The ways an instance stored in ``stored`` may be sent, best first (8.7.3.5.1).

    The acceptable alternatives that can be produced, and that no ``q=0`` range rules
    out (:func:`adapters.dicomweb.accept.acceptable`), in the order of preference; none
    when there is none.  The first is sent unless its conversion fails on this
    instance's pixel data (:class:`~pacs.core.errors.CannotDecode`, or a declared size
    over a ceiling), when the next is tried.  Each choice says whether the instance
    goes alone or in multipart/related (10.4.4).
    """
    return tuple(Choice(media.single_part, syntax) for media, syntax
                 in accept.acceptable(ranges, lambda media: _instance_offers(media, stored)))


def instance_syntax(ranges: Accept, stored: str) -> str | None:
    """The transfer syntax of the first of :func:`instance_choices`; ``None`` when
    none can be produced."""
    choices = instance_choices(ranges, stored)
    return choices[0].syntax if choices else None


def _instance_offers(media: MediaRange, stored: str) -> Iterator[Offer[str]]:
    """What ``media`` allows of an instance stored in ``stored``: its transfer syntax
    (``*``: as stored; none: Explicit VR Little Endian, Table 8.7.3-2) when it can be
    produced, packaged as the alternative says."""
    if media.part_type not in ("", DICOM, ANY, "application/*"):
        return
    wanted = media.transfer_syntax
    target = stored if wanted == "*" else wanted or str(ExplicitVRLittleEndian)
    if wanted == "*" or transcode.can_convert(stored, target):
        yield bulk_offer(target, DICOM, not media.single_part, target)


class Instances:
    """Study, series and instance retrieval (PS3.18 10.4.1.1.1)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str,
               series: str | None = None, instance: str | None = None) -> None:
        """Every instance under the path, one part each, streamed."""
        refs = instances(self.services, study, series, instance)
        ranges = accept.from_request(req)
        if instance is None:
            ranges = multipart_ranges(ranges)
            if not ranges:
                raise Unacceptable("a study or series is sent as multipart/related only")
        plan = check_conversions(self.services, self._plan(refs, ranges), study, series,
                                 instance)
        # Each instance asked for just before it is read, as C-MOVE and C-GET do: one
        # removed since it was listed (a rejection, a deletion: its object stays
        # readable until deleted) is passed over, not sent.
        listed = ((ref, choices) for ref, choices in plan
                  if self.services.engine.still_listed(ref))
        head = next(listed, None)
        if head is None:
            raise NotFound("no such study, series or instance")
        ref, choices = head
        choice, first = self._made(ref, choices)
        if instance is not None and choice.single_part:
            resp.content_type = f"{DICOM}; transfer-syntax={choice.syntax}"
            if choice.syntax == ref.transfer_syntax:
                resp.content_length = ref.size
            resp.stream = sent(first, req.path)
            return
        rest = (self._part(ref, choices) for ref, choices in listed)
        send_multipart(resp, DICOM, chain([(self._headers(ref, choice.syntax), first)], rest),
                       req.path)

    @staticmethod
    def _plan(refs: Sequence[InstanceRef],
              ranges: Accept) -> list[tuple[InstanceRef, tuple[Choice, ...]]]:
        """Each instance with the ways it may be sent, best first.

        Raises
        ------
        Unacceptable
            When one of them cannot be sent in any accepted syntax.
        """
        plan = []
        # Chosen once per stored syntax (a study holds a few): the choice scans every
        # alternative of the Accept header, which a client may make thousands long.
        chosen: dict[str, tuple[Choice, ...]] = {}
        for ref in refs:
            if ref.transfer_syntax not in chosen:
                chosen[ref.transfer_syntax] = instance_choices(ranges, ref.transfer_syntax)
            choices = chosen[ref.transfer_syntax]
            if not choices:
                raise Unacceptable("no acceptable transfer syntax can be produced for every "
                                   "instance (stored syntaxes convert only to uncompressed)")
            plan.append((ref, choices))
        return plan

    def _made(self, ref: InstanceRef, choices: Sequence[Choice]
              ) -> tuple[Choice, Iterator[bytes]]:
        """The first of ``choices`` that can be made of ``ref``, with its content, its
        first chunk made already (a conversion is whole by then).

        Raises
        ------
        CannotDecode, FrameTooLarge
            The last choice's conversion failed on the instance's pixel data.
        """
        for position, choice in enumerate(choices):
            try:
                return choice, started(self._content(ref, choice.syntax))
            except (CannotDecode, FrameTooLarge):
                if position == len(choices) - 1:
                    raise
        raise AssertionError("an instance is planned with at least one choice")

    def _part(self, ref: InstanceRef, choices: Sequence[Choice]
              ) -> tuple[dict[str, str], Iterator[bytes]]:
        """A part after the first: its headers once its content has been made."""
        choice, content = self._made(ref, choices)
        return self._headers(ref, choice.syntax), content

    def _headers(self, ref: InstanceRef, syntax: str) -> dict[str, str]:
        headers = {"Content-Type": f"{DICOM}; transfer-syntax={syntax}"}
        if syntax == ref.transfer_syntax:
            headers["Content-Length"] = str(ref.size)
        return headers

    def _content(self, ref: InstanceRef, syntax: str) -> Iterator[bytes]:
        """The stored bytes, or the instance converted into a temporary file (frame by
        frame, :func:`pacs.core.transcode.convert_into`), sent a chunk at a time."""
        if syntax == ref.transfer_syntax:
            yield from object_chunks(self.services, ref.object_key)
            return
        settings = self.services.settings
        with tempfile.SpooledTemporaryFile(max_size=transcode.IN_MEMORY_BYTES) as out:
            with open_ranged(self.services.store, ref.object_key) as source:
                transcode.convert_into(source, syntax, cast(BinaryIO, out),
                                       settings.max_frame_bytes, settings.max_object_bytes)
            out.seek(0)
            while chunk := out.read(CHUNK_BYTES):
                yield chunk


def check_conversions(services: Services,
                      plan: Sequence[tuple[InstanceRef, tuple[Choice, ...]]],
                      study: str, series: str | None, instance: str | None
                      ) -> list[tuple[InstanceRef, tuple[Choice, ...]]]:
    """``plan`` without the conversions that would be refused while the answer is sent.

    A conversion decodes a whole instance, within ``PACS_MAX_FRAME_BYTES`` a frame and
    ``PACS_MAX_OBJECT_BYTES`` in all (:mod:`pacs.core.transcode`); the sizes it checks
    follow from the Image Pixel values of the metadata kept in the index, read here a
    batch at a time for the instances whose first choice is a conversion.  An
    instance declared over a ceiling keeps the choices that send it as stored.

    Raises
    ------
    FrameTooLarge
        When one of them is declared over a ceiling and has no other choice.
    """
    converted = {ref.sop_uid for ref, choices in plan
                 if choices[0].syntax != ref.transfer_syntax}
    if not converted:
        return list(plan)
    index, store, settings = services.index, services.store, services.settings
    keys = metadata.instance_keys(index, study, series, instance)
    refused: dict[str, FrameTooLarge] = {}
    for doc in metadata.iter_documents(index, store, keys):
        if doc.sop_uid in converted:
            try:
                transcode.check_metadata(metadata.parse(doc.json), settings.max_frame_bytes,
                                         settings.max_object_bytes)
            except FrameTooLarge as exc:
                refused[doc.sop_uid] = exc
    kept = []
    for ref, choices in plan:
        if ref.sop_uid in refused:
            choices = tuple(c for c in choices if c.syntax == ref.transfer_syntax)
            if not choices:
                raise refused[ref.sop_uid]
        kept.append((ref, choices))
    return kept


def multipart_ranges(ranges: Accept) -> Accept:
    """The alternatives a study or series can be answered with: multipart ones.

    PS3.18 10.4.4: a single part media type (``application/dicom`` without
    ``multipart/related``) is for individual Instance Resources only; for other
    resources the origin server ignores it, and when no media type remains answers
    406 (Not Acceptable, 8.7.8.1).  ``*/*`` stays: it admits ``multipart/related``.
    """
    return ranges.only(lambda media: media.multipart or media.kind == ANY)


# --- metadata -------------------------------------------------------------------------

class Metadata:
    """Retrieve Metadata (PS3.18 10.4.1.1.2) from the JSON prepared at ingest."""

    def __init__(self, services: Services, prefix: str) -> None:
        self.services = services
        self.prefix = prefix

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str,
               series: str | None = None, instance: str | None = None) -> None:
        """A JSON array with one object per instance."""
        answered_as = json_type(req)
        if answered_as is None:
            raise Unacceptable("metadata is available as application/dicom+json only")
        for uid, name in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"),
                          (instance, "SOPInstanceUID")):
            if uid is not None:
                require_uid(uid, name)
        keys = metadata.instance_keys(self.services.index, study, series, instance)
        resp.content_type = answered_as
        chunks = _json_chunks(self.services, keys, urls.service_root(req, self.prefix))
        first = next(chunks)
        second = next(chunks, None)
        if second is None:  # one chunk: sent with its Content-Length
            resp.data = first
            return
        resp.stream = sent(chain([first, second], chunks), req.path)


def _json_chunks(services: Services, keys: Sequence[int], root: str) -> Iterator[bytes]:
    """The JSON array (PS3.18 F.2.1) of the instances' metadata, built an instance at
    a time (:func:`pacs.core.metadata.iter_documents`) and sent in chunks of about
    :data:`CHUNK_BYTES`: an answer holds a batch of documents and a chunk, never the
    whole study."""
    pending: list[bytes] = []
    held = 0
    opening = b"["
    for doc in metadata.iter_documents(services.index, services.store, keys):
        pending.append(opening + metadata.absolute_bulk_data_uris(doc.json, root).encode())
        opening = b","
        held += len(pending[-1])
        if held >= CHUNK_BYTES:
            yield b"".join(pending)
            pending, held = [], 0
    pending.append(b"[]" if opening == b"[" else b"]")
    yield b"".join(pending)


# --- frames ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FramePlan:
    """How frames are sent: as stored or decoded, and each part's media type."""

    stored: bool
    part_type: str
    multipart: bool = True


def frame_numbers(text: str) -> list[int]:
    """``1,3,5`` → ``[1, 3, 5]`` (PS3.18 10.4.1.1.3: a comma list of 1-based numbers).

    Raises
    ------
    InvalidQuery
        When the list is empty, malformed, or too long.
    """
    parts = text.split(",")
    if len(parts) > MAX_FRAMES:
        raise InvalidQuery(f"frames: at most {MAX_FRAMES} frame numbers in one request")
    return [_frame_number(part) for part in parts]


def _frame_number(text: str) -> int:
    """One frame number: ASCII digits up to :data:`~adapters.dicomweb.numbers.IS_MAX`
    (Number of Frames is an IS, so no frame has a larger number).  Zero and numbers
    past the instance's frames parse, and are answered 404 by the frame check.

    Raises
    ------
    InvalidQuery
        When ``text`` is not such a number.
    """
    number = whole_number(text.strip(), IS_MAX)
    if number is None:
        raise InvalidQuery(f"frames must be a comma-separated list of frame numbers "
                           f"(digits 0-9, at most {IS_MAX})")
    return number


def frame_plan(ranges: Accept, lay: pixels.Layout) -> FramePlan | None:
    """Choose how to send an instance's frames (PS3.18 8.7.3.5.2, Table 8.7.3-5).

    ``application/octet-stream`` without a syntax, or with an uncompressed one, gets
    uncompressed frames (decoded when stored compressed); ``transfer-syntax=*`` or the
    stored syntax gets the stored frames; ``image/*`` types get stored compressed
    frames of their kind; ``*/*`` gets uncompressed frames, or stored ones when no
    decoder exists or uncompressed ones are ruled out (``q=0``,
    :func:`adapters.dicomweb.accept.choose`), or when the instance's frames do not
    decode here or are declared over the ceiling (:func:`send_frames` falls back on
    the next of :func:`frame_plans`).  Single part for a single part
    alternative (a bare octet-stream or image type), else multipart/related.
    """
    plans = frame_plans(ranges, lay)
    return plans[0] if plans else None


def frame_plans(ranges: Accept, lay: pixels.Layout) -> tuple[FramePlan, ...]:
    """Every way :func:`frame_plan` could send the frames, best first: the others are
    tried when decoding fails on the instance's pixel data (:func:`send_frames`)."""
    native_ok = not lay.encapsulated or pixels.can_decode(lay.transfer_syntax)
    return tuple(plan for _, plan in accept.acceptable(ranges, lambda media: (
        bulk_offer(plan, plan.part_type, plan.multipart,
                   pixels.frame_syntax(lay, plan.stored))
        for plan in _frame_plans(media, lay, native_ok))))


def _frame_plans(media: MediaRange, lay: pixels.Layout,
                 native_ok: bool) -> Iterator[FramePlan]:
    """The ways ``media`` allows to send ``lay``'s frames, best first
    (:func:`frame_plan`); ``native_ok``: uncompressed frames can be produced."""
    stored = lay.transfer_syntax
    image = IMAGE_TYPES.get(stored) if lay.encapsulated else None
    content, wanted = media.part_type, media.transfer_syntax
    parted = not media.single_part
    if content in ("", OCTET, ANY, "application/*"):
        if wanted == "*" or (wanted == stored and lay.encapsulated):
            yield FramePlan(True, OCTET, parted)
        if (wanted is None or wanted in NATIVE_FRAME_SYNTAXES) and native_ok:
            yield FramePlan(False, OCTET, parted)
        if wanted is None and content == ANY:
            yield FramePlan(True, OCTET, parted)
    elif (image is not None and content in (image, "image/*", "image/")
          and wanted in (None, "*", stored)):
        yield FramePlan(True, image, parted)


class Frames:
    """Retrieve Frames (PS3.18 10.4.1.1.3)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str, series: str,
               instance: str, frames: str) -> None:
        """The listed frames, one part each, in the order asked."""
        numbers = frame_numbers(frames)
        check_distinct(numbers)
        doc = one_document(self.services, study, series, instance)
        lay = pixels.layout(doc)
        pixels.check_numbers(lay, numbers)
        plans = frame_plans(accept.from_request(req), lay)
        if not plans:
            raise Unacceptable("the frames cannot be sent in any accepted media type")
        send_frames(self.services, resp, doc, lay, numbers, plans, req.path)


def check_distinct(numbers: Sequence[int]) -> None:
    """Refuse a frame list that names a frame twice.

    PS3.18 6.5.4 (RetrieveFrames, as the 2017 editions number it): the frame list is
    "a comma or %2C separated list of one or more non duplicate frame numbers".  A
    repeated number would also make one request send one frame any number of times.

    Raises
    ------
    InvalidQuery
        When a number is repeated (400).
    """
    if len(set(numbers)) != len(numbers):
        raise InvalidQuery("the frame list names a frame more than once")


def send_frames(services: Services, resp: falcon.Response, doc: metadata.Document,
                lay: pixels.Layout, numbers: Sequence[int], plans: Sequence[FramePlan],
                what: str, location: str | None = None) -> None:
    """Answer with frames, streamed: one frame in memory at a time.

    What can refuse the request is decided before the status line: the frame numbers
    and media type (by the caller), the declared size of every frame to decode
    (:func:`pacs.core.frames.check_frames`: Rows, Columns, Samples per Pixel, Bits
    Allocated and Number of Frames of the metadata), that native frames cut from the
    stored value lie within it, and the first frame, read now
    (:func:`started`); the first of ``plans`` that passes them is sent (a frame that no
    decoder here decodes, or one declared over the ceiling, leaves the next way of
    sending the frames the client accepts, stored ones).  Without multipart the frames
    are one body (for native pixel data, the pixel data value itself), with its
    Content-Length when the frames are cut from the stored bytes.  ``what`` names the
    resource in the log should the body be cut short (:func:`sent`).  With a
    ``location`` (the BulkDataURI of the pixel data), each part has the
    Content-Location of its frame (:func:`frame_location`).
    """
    plan, frames = _first_sendable(services, doc, lay, numbers, plans)
    syntax = pixels.frame_syntax(lay, plan.stored)
    if not plan.multipart:
        resp.content_type = f"{plan.part_type}; transfer-syntax={syntax}"
        length = pixels.frame_length(lay, plan.stored)
        if length is not None:
            resp.content_length = length * len(numbers)
        resp.stream = sent(frames, what)
        return
    send_multipart(resp, plan.part_type,
                   ((_frame_headers(plan, syntax, data, location, number), data)
                    for number, data in zip(numbers, frames, strict=True)), what)


def _first_sendable(services: Services, doc: metadata.Document, lay: pixels.Layout,
                    numbers: Sequence[int], plans: Sequence[FramePlan]
                    ) -> tuple[FramePlan, Iterator[bytes]]:
    """The first of ``plans`` whose frames pass their checks and whose first frame is
    made, with the frames (:func:`send_frames`).

    Raises
    ------
    CannotDecode, FrameTooLarge
        The last plan's frames cannot be made.
    """
    for position, plan in enumerate(plans):
        try:
            pixels.check_frames(lay, plan.stored, services.settings.max_frame_bytes, numbers)
            return plan, started(_frames(services, doc, lay, numbers, plan.stored))
        except (CannotDecode, FrameTooLarge):
            if position == len(plans) - 1:
                raise
    raise AssertionError("frames are sent by at least one plan")


def _frame_headers(plan: FramePlan, syntax: str, data: bytes, location: str | None,
                   number: int) -> dict[str, str]:
    headers = {"Content-Type": f"{plan.part_type}; transfer-syntax={syntax}",
               "Content-Length": str(len(data))}
    if location is not None:
        headers["Content-Location"] = frame_location(location, number)
    return headers


def frame_location(pixel_data_uri: str, number: int) -> str:
    """Where frame ``number`` of the pixel data at ``pixel_data_uri`` is:
    ``{BulkDataURI}/frames/{number}`` (PS3.18 2014c 6.5.3.2.2), which
    :class:`Bulkdata` answers with that frame."""
    return f"{pixel_data_uri}/frames/{number}"


def _frames(services: Services, doc: metadata.Document, lay: pixels.Layout,
            numbers: Sequence[int], stored: bool) -> Iterator[bytes]:
    """The frames' bytes, one at a time, read from the object opened once."""
    with pixels.open_frames(services.store, doc.object_key, lay) as source:
        limit = services.settings.max_frame_bytes
        read = pixels.stored_frames if stored else pixels.native_frames
        for data, _ in read(source, lay, numbers, max_frame_bytes=limit):
            yield data


# --- bulkdata -------------------------------------------------------------------------

#: Pixel Data (7FE0,0010): answered as its frames.
PIXEL_DATA = 0x7FE00010


class Bulkdata:
    """Retrieve Bulkdata (PS3.18 10.4.1.1.5) at the BulkDataURIs of the metadata.

    The path is the element's place in the data set: ``7FE00010`` at the top level,
    ``00880200/1/7FE00010`` inside item 1 of a sequence.  Pixel data is answered as
    its frames (as the Frames resource would, one part per frame), all of them or
    those of ``7FE00010/frames/{frames}``; any other value as its bytes, little endian,
    in one ``application/octet-stream`` part (or alone when the alternative that allows
    it is single part, ``application/octet-stream`` without multipart).  Float and
    Double Float Pixel Data are streamed from the stored object, where ingest found
    them (they follow the header the other values are read from).

    PS3.18 10.4.3.3.5: bulk data in a multipart response has a Content-Location that
    corresponds to the BulkDataURI of its element in the metadata: that URI, absolute
    (:mod:`adapters.dicomweb.urls`), and for a frame of the pixel data, the frame's
    (:func:`frame_location`).
    """

    def __init__(self, services: Services, prefix: str = "") -> None:
        self.services = services
        self.prefix = prefix

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str, series: str,
               instance: str, path: str) -> None:
        """The value at ``path``."""
        element, _, listed = path.strip("/").partition("/frames/")
        steps = _bulk_path(element)
        if listed and steps != [PIXEL_DATA]:
            raise NotFound("no such bulk data")  # only the pixel data has frames
        doc = one_document(self.services, study, series, instance)
        ranges = accept.from_request(req)
        root = urls.service_root(req, self.prefix)
        location = (f"{urls.instance_url(root, study, series, instance)}/bulkdata/"
                    f"{_bulk_text(steps)}")
        if steps == [PIXEL_DATA]:
            self._pixel_data(req, resp, doc, ranges, listed, location)
        else:
            self._element(req, resp, doc, steps, ranges, location)

    def _pixel_data(self, req: falcon.Request, resp: falcon.Response,
                    doc: metadata.Document, ranges: Accept, listed: str,
                    location: str) -> None:
        """The frames of the pixel data: ``listed`` (a frame list), or all of them."""
        lay = pixels.layout(doc)
        numbers: Sequence[int] = range(1, lay.frames + 1)
        if listed:
            numbers = frame_numbers(listed)
            check_distinct(numbers)
            pixels.check_numbers(lay, numbers)
        plans = frame_plans(ranges, lay)
        if not plans:
            raise Unacceptable("the pixel data cannot be sent in any accepted type")
        send_frames(self.services, resp, doc, lay, numbers, plans, req.path, location)

    def _element(self, req: falcon.Request, resp: falcon.Response, doc: metadata.Document,
                 steps: Sequence[int], ranges: Accept, location: str) -> None:
        """The value of any other element, in multipart/related or alone as the
        alternative that allows ``application/octet-stream`` says (PS3.18 8.7.3.5)."""
        choice = accept.choose(ranges, _octet_offers)
        if choice is None:
            raise Unacceptable("bulk data is sent as application/octet-stream")
        body: bytes | Iterator[bytes]
        if len(steps) == 1 and steps[0] in pixels.FLOAT_PIXEL_TAGS:
            offset, length = pixels.pixel_value_place(doc, steps[0])
            body = started(value_chunks(self.services, doc.object_key, offset, length))
        else:
            body = self._value(doc, steps)
            length = len(body)
        multipart = choice[1]
        if multipart:
            send_multipart(resp, OCTET, [({"Content-Type": OCTET, "Content-Length": str(length),
                                           "Content-Location": location}, body)], req.path)
            return
        resp.content_type = OCTET
        if isinstance(body, bytes):
            resp.data = body
            return
        resp.content_length = length
        resp.stream = sent(body, req.path)

    def _value(self, doc: metadata.Document, steps: Sequence[int]) -> bytes:
        # The header is enough (the metadata lists no element after the pixel data),
        # and a deflated one is read without inflating the pixel data.
        with open_ranged(self.services.store, doc.object_key) as source:
            dataset = pixels.read_header(source)
        return _element_bytes(dataset, steps)


#: A tag in a bulk data path: eight hex digits, nothing else (``int(text, 16)`` would
#: also take a sign, spaces, underscores and digits of other scripts).
_BULK_TAG = re.compile(r"[0-9A-Fa-f]{8}")


def _octet_offers(media: MediaRange) -> Iterator[Offer[bool]]:
    """``application/octet-stream`` when ``media`` allows it, in multipart/related
    (``True``) or alone, as the alternative is packaged."""
    if media.allows(OCTET):
        yield bulk_offer(not media.single_part, OCTET, not media.single_part)


def _bulk_text(steps: Sequence[int]) -> str:
    """``[0x00880200, 1, 0x7FE00010]`` → ``00880200/1/7FE00010``, as the metadata writes
    a BulkDataURI's path (:func:`pacs.core.jsonmodel.to_json`)."""
    return "/".join(f"{step:08X}" if position % 2 == 0 else str(step)
                    for position, step in enumerate(steps))


def _bulk_path(path: str) -> list[int]:
    """``00880200/1/7FE00010`` → tags and 1-based item numbers, alternating.

    A path this node cannot have written is a resource that does not exist: 404, as
    for any other unknown BulkDataURI.  Item numbers are ASCII digits, bounded like
    every other number (:mod:`adapters.dicomweb.numbers`).

    Raises
    ------
    NotFound
        A part that is not a tag where a tag belongs, or not an item number from 1
        where one belongs, or a path that ends on an item.
    """
    parts = path.strip("/").split("/")
    steps: list[int] = []
    for position, part in enumerate(parts):
        step = _bulk_step(part, tag=position % 2 == 0)
        if step is None:
            raise NotFound("no such bulk data")
        steps.append(step)
    if len(steps) % 2 == 0:
        raise NotFound("no such bulk data")
    return steps


def _bulk_step(part: str, tag: bool) -> int | None:
    """One part of a bulk data path: a tag (``tag``) or an item number from 1."""
    if tag:
        return int(part, 16) if _BULK_TAG.fullmatch(part) else None
    number = whole_number(part, IS_MAX)
    return number if number else None  # items count from 1


def _element_bytes(dataset: pydicom.Dataset, steps: Sequence[int]) -> bytes:
    """The encoded value of the element ``steps`` leads to.

    Every step but the last goes into an item of a sequence.  A path through an
    element that is not a sequence (a name, a multi-valued code string) names no
    element: 404 like an absent one.  It is the resource that does not exist (PS3.18
    10.4.1.1.5: a BulkDataURI names one element of one instance), not a request the
    server cannot parse, which is what 400 would say.

    Raises
    ------
    NotFound
        No element at the path, or one without a binary value.
    """
    current = dataset
    for tag, number in zip(steps[0:-1:2], steps[1::2], strict=True):
        current = _item(current, tag, number)
    # As read, before pydicom converts it: a text or number value the metadata
    # references (PS3.18 10.4.3.3.2, pacs.core.jsonmodel.INLINE_VALUE_BYTES) is sent
    # as its bytes, never turned into values first.
    raw: DataElement | RawDataElement | None = current.get_item(steps[-1])
    if raw is None:
        raise NotFound("no such bulk data")
    if type(raw) is RawDataElement and isinstance(raw.value, bytes) and _replaceable(raw):
        return raw.value
    element = current[steps[-1]]
    if isinstance(element.value, bytes):
        return element.value
    raise NotFound("the element holds no bulk data")


def _replaceable(raw: RawDataElement) -> bool:
    """True when a raw element's VR (implicit VR: the dictionary's) is one whose value
    metadata may reference as bulk data (PS3.18 10.4.3.3.2); a name, a code string or
    a sequence is not bulk data."""
    try:
        vr = raw.VR or str(dictionary_VR(raw.tag))
    except KeyError:
        return True  # a private element of implicit VR: UN, bytes
    return all(kind in REPLACEABLE_VRS for kind in vr.split(" or "))


def _item(dataset: pydicom.Dataset, tag: int, number: int) -> pydicom.Dataset:
    """Item ``number`` (from 1) of the sequence ``tag`` of ``dataset``.

    Raises
    ------
    NotFound
        When ``tag`` is absent, is not a sequence, or has fewer items.
    """
    element = dataset.get(tag)
    if element is None or not isinstance(element.value, PydicomSequence):
        raise NotFound("no such bulk data")
    if not 1 <= number <= len(element.value):
        raise NotFound("no such bulk data")
    item: pydicom.Dataset = element.value[number - 1]
    return item


# --- routes ---------------------------------------------------------------------------

def add_routes(app: Any, services: Services, prefix: str) -> None:
    """Register every WADO-RS resource under ``prefix`` ("" or "/dicom-web").

    ``app`` is a falcon app, or anything with its ``add_route``.
    """
    study = prefix + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    retrieve, meta = Instances(services), Metadata(services, prefix)
    for template in (study, series, instance):
        app.add_route(template, retrieve)
        app.add_route(template + "/metadata", meta)
    app.add_route(instance + "/frames/{frames}", Frames(services))
    app.add_route(instance + "/bulkdata/{path:path}", Bulkdata(services, prefix))


__all__ = ["Bulkdata", "Frames", "Instances", "Metadata", "add_routes", "frame_numbers",
           "frame_plan", "instance_syntax"]
