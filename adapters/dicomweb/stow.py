"""STOW-RS, the Store Instances transaction (PS3.18 10.5), over the core's ingest path.

The body is read as a stream (:mod:`adapters.dicomweb.multipart`).  Each part is
analysed as soon as it has arrived, in a helper process (:mod:`pacs.core.analysers`), and
stored in batches through :meth:`pacs.core.ingest.Ingest.store_batch`: the path C-STORE
takes, with the same durability (a part is listed as stored only once it is fsynced or
PUT and its index row committed) and the same failure codes.

Requests (PS3.18 10.5.1):

- ``POST /studies`` and ``POST /studies/{study}`` with
  ``multipart/related; type="application/dicom"; boundary=…`` (boundary quoted or
  bare, any chunking); a part without a Content-Type is taken as application/dicom;
- a single ``application/dicom`` body is taken as one part (a convenience that Google
  and Microsoft offer and dicomweb-client copes with);
- with a study in the URL, a part of another study is refused (FailureReason C409)
  and not stored;
- an IOCM rejection note removes the instances it names (:mod:`pacs.core.rejection`):
  it is taken only from a request that may remove data as ``DELETE`` may
  (``PACS_WEB_DELETE`` on and the ``admin`` role); from any other it is refused alone
  (FailureReason 0124, Refused: Not authorized) and nothing of it stored;
- a part that would replace a different object stored under its SOP Instance UID
  (``PACS_DUPLICATE_POLICY=overwrite``) takes the ``admin`` role, the counterpart of an
  AE's ``overwrite`` right: from a user without it the part is refused alone
  (FailureReason 0111, Duplicate SOP Instance) and the stored object kept.

Sizes (PS3.18 10.5.3): a body over ``PACS_MAX_REQUEST_BYTES`` is ``413`` - by its
Content-Length before anything is read, or, chunked, as soon as the bytes read pass
the limit (the part then being read is not stored; parts stored before it are
reported, like any body that breaks).  A part over ``PACS_MAX_OBJECT_BYTES`` is read
to its end but not kept (:mod:`adapters.dicomweb.multipart`): it fails alone, listed
in FailedSOPSequence with A700 when its UIDs can be read from its head; when they
cannot and nothing was stored before it, the request is ``413``.  A deflated part
that inflates past the limit fails with A700 the same way (:mod:`pacs.core.dataset`).

Responses (PS3.18 10.5.3, Store Instances Response Module), always
``application/dicom+json``: ``200`` when every part was stored, ``202`` when some
failed, ``409`` when none was stored; ReferencedSOPSequence lists the stored instances
with their RetrieveURL, FailedSOPSequence (only when not empty) the others with a
FailureReason from :data:`adapters.dicomweb.errors.TABLE`.  A body that is not
multipart, or a malformed body before any part completed, is ``400``/``415`` with a
reason; so is a body that ends short of its Content-Length or stops arriving (a single
``application/dicom`` object cut at an element boundary would otherwise read whole).
If the body breaks after some parts were stored, those stay stored and are reported,
and the break is one more failure.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import falcon
import pydicom
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from adapters.dicomweb import dicomjson, multipart, urls
from adapters.dicomweb.errors import (
    UNEXPECTED,
    StudyMismatch,
    Unacceptable,
    UnsupportedMedia,
    outcome_for,
    reason,
)
from adapters.dicomweb.negotiation import json_type
from adapters.http.audit import note_stored, requestor_of
from adapters.http.auth import Access
from pacs.core import audit
from pacs.core.analysers import Result
from pacs.core.audit import Participant
from pacs.core.dataset import (
    dataset_offset,
    inflated_head,
    meta_transfer_syntax,
    require_uid,
    valid_uid,
)
from pacs.core.errors import IncompleteBody, ObjectTooLarge, logged_by_core
from pacs.core.ingest import TRANSFER_ACTION, Analysis, Received, StoreResult
from pacs.core.services import Services

log = logging.getLogger(__name__)

#: The only part media type stored (PS3.18 10.5.1.1: binary Part 10 instances).
DICOM = "application/dicom"
#: The FailureReason of a part that is no DICOM object the node can read.
CANNOT_UNDERSTAND = 0xC000


class RequestTooLarge(ObjectTooLarge):
    """A request body over ``PACS_MAX_REQUEST_BYTES`` (413, like an object too large)."""


@dataclass(frozen=True)
class Stored:
    """A part stored (or already stored: the same object again is a success)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    #: What it did to the node's copy, as the audit trail says it (C, U or R).
    action: str = audit.CREATE
    #: The patient the instance names, whom its audit event names (``None``: unknown).
    patient: audit.Patient | None = None


@dataclass(frozen=True)
class Failed:
    """A part not stored, with whatever UIDs could be read from it."""

    sop_class_uid: str
    sop_instance_uid: str
    reason: int
    #: Why, for the log's summary of the request (never sent, never patient data).
    detail: str = field(default="", compare=False)
    #: A failure of ours (the store, the index), not of the part: logged at ERROR.
    ours: bool = field(default=False, compare=False)


@dataclass
class Report:
    """The outcome of every part, in the order received."""

    stored: list[Stored] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """No part at all."""
        return not self.stored and not self.failed

    def summary(self) -> str:
        """The failures by FailureReason, each with the first one's detail: one log
        line for a request, however many of its parts failed."""
        first: dict[int, str] = {}
        counts: dict[int, int] = {}
        for failed in self.failed:
            first.setdefault(failed.reason, failed.detail)
            counts[failed.reason] = counts.get(failed.reason, 0) + 1
        return "; ".join(f"{reason:04X} x {count}" + (f" ({first[reason]})"
                                                      if first[reason] else "")
                         for reason, count in counts.items())

    def status(self) -> str:
        """200 all stored, 202 some failed, none stored: 400 when every part was bad
        syntax (no DICOM object that can be read, C000), else 409 (a conflict: another
        study, a refused or rejected instance, no room; PS3.18 10.5.3.1)."""
        if not self.failed:
            return falcon.HTTP_200
        if self.stored:
            return falcon.HTTP_202
        if all(failed.reason == CANNOT_UNDERSTAND for failed in self.failed):
            return falcon.HTTP_400
        return falcon.HTTP_409

    def response(self, root: str, study: str | None) -> dicomjson.JsonDataset:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON."""
        body: dicomjson.JsonDataset = {}
        studies = {s.study_uid for s in self.stored}
        # Retrieve URL is Type 2: empty when the instances are of no one study.
        body["00081190"] = (dicomjson.constant(
            "UR", urls.study_url(root, study or next(iter(studies))))
            if study is not None or len(studies) == 1 else {"vr": "UR"})
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [_failed_item(f) for f in self.failed]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [_stored_item(s, root)
                                                      for s in self.stored]}
        return body


#: Parts stored together, with one durability point (see ``Store._store_all``).
BATCH_PARTS = 16
#: Bytes of parts gathered into one batch at most; a larger part is a batch alone.
BATCH_BYTES = 32 << 20


def _uid(value: str) -> dicomjson.JsonElement:
    return dicomjson.constant("UI", value) if value else {"vr": "UI"}


def _stored_item(stored: Stored, root: str) -> dicomjson.JsonDataset:
    return {
        "00081150": _uid(stored.sop_class_uid),
        "00081155": _uid(stored.sop_instance_uid),
        "00081190": dicomjson.constant("UR", urls.instance_url(
            root, stored.study_uid, stored.series_uid, stored.sop_instance_uid)),
    }


def _failed_item(failed: Failed) -> dicomjson.JsonDataset:
    # Both UIDs are sent even when unknown: clients read them off every item.
    return {
        "00081150": _uid(failed.sop_class_uid),
        "00081155": _uid(failed.sop_instance_uid),
        "00081197": dicomjson.constant("US", failed.reason),
    }


#: Inflated bytes of a deflated part read to find its UIDs (they are near the start).
PEEK_INFLATED_BYTES = 1 << 20


def peek_uids(data: bytes) -> tuple[str, str]:
    """SOP Class and Instance UID of a part, best effort (for failure reports only).

    A deflated data set is inflated only as far as :data:`PEEK_INFLATED_BYTES`: the
    part may be a deflate bomb refused for its inflated size.
    """
    try:
        offset = dataset_offset(data) if data[128:132] == b"DICM" else 0
        if offset and meta_transfer_syntax(data, offset) == DeflatedExplicitVRLittleEndian:
            head = inflated_head(memoryview(data)[offset:], PEEK_INFLATED_BYTES)
            # Up to the pixel data: fragments of undefined length cut off by the head
            # would otherwise have to be walked to their (missing) end.
            header = read_dataset(io.BytesIO(head), is_implicit_VR=False,
                                  is_little_endian=True, stop_when=_at_pixel_data,
                                  specific_tags=[Tag(0x00080016), Tag(0x00080018)])
        else:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class = str(header.get("SOPClassUID", "") or "").strip("\0 ")
        sop_instance = str(header.get("SOPInstanceUID", "") or "").strip("\0 ")
    except Exception:  # noqa: BLE001 - an unreadable part is reported without UIDs
        return "", ""
    return (sop_class if valid_uid(sop_class) else "",
            sop_instance if valid_uid(sop_instance) else "")


class _Counted:
    """A request body that raises :class:`RequestTooLarge` once more than ``limit``
    bytes have been read from it (a chunked body announces no size)."""

    def __init__(self, stream: multipart.Readable, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        chunk = self.stream.read(size)
        self.count += len(chunk)
        if self.count > self.limit:
            raise RequestTooLarge(f"the request body is larger than {self.limit} bytes")
        return chunk


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)


def body_stream(req: falcon.Request, max_request_bytes: int) -> multipart.Readable:
    """The request body, counted against ``max_request_bytes``; a chunked body has no
    Content-Length and is read to its end.

    Raises
    ------
    RequestTooLarge
        The Content-Length says more than ``max_request_bytes``: nothing is read.
    """
    if req.content_length is not None and req.content_length > max_request_bytes:
        raise RequestTooLarge(f"the request body is larger than {max_request_bytes} bytes")
    stream = req.bounded_stream if req.content_length is not None else req.stream
    return _Counted(stream, max_request_bytes)


def single_part(stream: multipart.Readable,
                max_part_bytes: int = multipart.MAX_PART_BYTES,
                declared: int | None = None,
                spool_dir: str | None = None) -> Iterator[multipart.Part]:
    """A whole ``application/dicom`` body as one part (spooled; over ``max_part_bytes``
    read to its end and yielded ``oversize``, with its head only).

    Raises
    ------
    IncompleteBody
        The body ended before the ``declared`` Content-Length: a Part 10 object cut
        at an element boundary still reads as a whole one, so its length is the only
        proof that it is all there (a multipart body has its closing boundary).
    """
    # Handed to the Part yielded below, which closes it.
    spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
        max_size=multipart.SPOOL_MEMORY_BYTES, dir=spool_dir)
    size = 0
    head = b""
    try:
        while chunk := stream.read(multipart.CHUNK_BYTES):
            size += len(chunk)
            if head:
                continue  # over the limit: counted, not kept
            if size > max_part_bytes:
                spool.write(chunk)
                spool.seek(0)
                head = spool.read(multipart.OVERSIZE_HEAD_BYTES)
                spool.close()
                continue
            spool.write(chunk)
        if declared is not None and size < declared:
            raise IncompleteBody(f"the body ended after {size} of its {declared} bytes")
    except BaseException:
        spool.close()
        raise
    if head:
        yield multipart.Part({"content-type": DICOM}, io.BytesIO(head), size, oversize=True)
        return
    spool.seek(0)
    yield multipart.Part({"content-type": DICOM}, spool, size)


def parts_of(req: falcon.Request, max_part_bytes: int = multipart.MAX_PART_BYTES,
             max_request_bytes: int | None = None,
             spool_dir: str | None = None) -> Iterator[multipart.Part]:
    """The parts of a STOW-RS body, by its Content-Type; a part too large to keep in
    memory goes to a temporary file in ``spool_dir`` (the data folder: the disk the
    node has room on, not a ``/tmp`` that may be memory).

    Raises
    ------
    UnsupportedMedia
        Not multipart/related of application/dicom, nor application/dicom, or a
        Content-Encoding (415).
    MultipartError
        No usable boundary (400).
    RequestTooLarge
        A Content-Length over ``max_request_bytes`` (413).
    """
    limit = max_request_bytes if max_request_bytes is not None else 1 << 62
    coding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if coding != "identity":
        # Read as it came, a compressed body is no DICOM (RFC 9110 8.4, 15.5.16).
        raise UnsupportedMedia("a body with a Content-Encoding is not accepted; send it "
                               "as is")
    kind, params = multipart.media_type(req.content_type or "")
    if kind == DICOM:
        return single_part(body_stream(req, limit), max_part_bytes, req.content_length,
                           spool_dir)
    if kind != "multipart/related":
        raise UnsupportedMedia("STOW-RS takes multipart/related; type=\"application/dicom\"")
    part_type = multipart.media_type(params.get("type", DICOM))[0]
    if part_type != DICOM:
        raise UnsupportedMedia(f"parts of type {part_type} are not supported; "
                               "send application/dicom")
    boundary = multipart.boundary_of(req.content_type or "")
    return multipart.read_parts(body_stream(req, limit), boundary,
                                max_part_bytes=max_part_bytes, spool_dir=spool_dir)


class Store:
    """``POST /studies`` and ``POST /studies/{study}``.

    Parameters
    ----------
    services : Services
        The ingest path.
    prefix : str
        Where the service is mounted (for Retrieve URLs).
    """

    def __init__(self, services: Services, prefix: str) -> None:
        self.services = services
        self.prefix = prefix

    def on_post(self, req: falcon.Request, resp: falcon.Response,
                study: str | None = None) -> None:
        """Store Instances (PS3.18 10.5); see the module docstring for the answers."""
        if study is not None:
            study = require_uid(study, "StudyInstanceUID in the path")
        answered_as = json_type(req)
        if answered_as is None:
            raise Unacceptable("STOW-RS answers with application/dicom+json only")
        # Back-pressure before the body is read: 503 with Retry-After.
        self.services.ingest.check_room()
        settings = self.services.settings
        report = self._store_all(parts_of(req, settings.max_object_bytes,
                                          settings.max_request_bytes,
                                          str(settings.data_dir)), study,
                                 _Storer.of(req, Access.of(self.services)))
        if report.failed:  # one line, however many parts failed
            level = logging.ERROR if any(f.ours for f in report.failed) else logging.WARNING
            log.log(level, "STOW-RS: %d stored, %d failed: %s", len(report.stored),
                    len(report.failed), report.summary())
        else:
            log.info("STOW-RS: %d stored", len(report.stored))
        note_stored(req, ((s.study_uid, s.sop_class_uid, s.action, s.patient)
                          for s in report.stored))
        resp.status = report.status()
        resp.content_type = answered_as
        resp.data = dicomjson.dumps(report.response(urls.service_root(req, self.prefix), study))

    def _store_all(self, parts: Iterator[multipart.Part], study: str | None,
                   storer: _Storer) -> Report:
        """Store the parts in batches as they arrive; the answer lists them in body order.

        A batch (up to :data:`BATCH_PARTS` parts or :data:`BATCH_BYTES`) goes through
        :meth:`pacs.core.ingest.Ingest.store_batch`: every object fsynced together and indexed
        in one transaction, none reported stored before that.  One fsync of each file
        plus one per folder and one index commit for the batch, against a file, a folder
        and an index fsync per part.  Three things overlap: this thread reads parts, the
        analyser helpers parse them (:meth:`_examine`), and the pool's thread stores the
        previous batch.  At most two batches are held in memory.

        Raises
        ------
        MultipartError, IncompleteBody
            A malformed or cut-off body before any part completed, or a body with no
            parts.
        ObjectTooLarge
            The body passed ``PACS_MAX_REQUEST_BYTES`` (:class:`RequestTooLarge`), or
            a part too large to tell which instance it was, before any part was stored.
        """
        report = Report()
        pending: list[Future[list[Stored | Failed]]] = []
        batch: list[_Part] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stow") as pool:

            def submit() -> None:
                if batch:
                    _collect(pending, report, keep=1)
                    pending.append(pool.submit(self._store_batch, list(batch), storer))
                    batch.clear()

            try:
                for part in parts:
                    try:
                        if part.oversize:
                            oversize = self._oversize(part.read(), study)
                            if oversize is None:  # which instance is unknown
                                submit()
                                _collect(pending, report, keep=0)
                                _refuse_unknown_oversize(report, part.size)
                                continue
                            batch.append(oversize)
                        else:
                            batch.append(self._examine(part.content_type, part.read(),
                                                       study))
                    finally:
                        part.close()
                    if (len(batch) >= BATCH_PARTS
                            or sum(len(part.data) for part in batch) >= BATCH_BYTES):
                        submit()
                submit()
            except (multipart.MultipartError, IncompleteBody, RequestTooLarge) as exc:
                submit()  # the parts that did arrive whole are stored
                _collect(pending, report, keep=0)
                if report.empty or (isinstance(exc, RequestTooLarge) and not report.stored):
                    raise
                log.warning("STOW-RS body broke after %d part(s): %s",
                            len(report.stored) + len(report.failed), exc)
                report.failed.append(Failed("", "", outcome_for(exc).failure_reason,
                                            reason(exc)))
            except Exception as exc:
                # Anything else (the temporary folder gone, no thread for a batch) after
                # parts were stored: those are answered and audited as stored (PS3.18
                # 10.5.3), the break a failure of ours; before, it was a 500 that named
                # none of them.
                submit()
                _collect(pending, report, keep=0)
                if not report.stored:
                    raise
                log.error("STOW-RS body failed after %d part(s) (%s)",
                          len(report.stored) + len(report.failed), type(exc).__name__)
                log.debug("the failure", exc_info=exc)
                outcome = outcome_for(exc)
                report.failed.append(Failed("", "", outcome.failure_reason, outcome.title,
                                            ours=True))
            finally:
                _collect(pending, report, keep=0)
        if report.empty:
            raise multipart.MultipartError("the body holds no parts")
        return report

    def _oversize(self, head: bytes, study: str | None) -> _Part | None:
        """A part over ``PACS_MAX_OBJECT_BYTES`` as a failure (A700) when its UIDs can
        be read from its head (PS3.18 10.5.3: it is listed in FailedSOPSequence);
        ``None`` when they cannot."""
        if not all(peek_uids(head)):
            return None
        refused: Future[Result] = Future()
        refused.set_result(ObjectTooLarge(
            f"the instance is larger than {self.services.settings.max_object_bytes} bytes"))
        return _Part(head, refused, study)

    def _examine(self, content_type: str, data: bytes, study: str | None) -> _Part:
        """A part, with its analysis under way in a helper process (while this thread
        reads the next parts and the previous batch is written)."""
        if content_type not in ("", DICOM):
            refused: Future[Result] = Future()
            # Its type is the client's text: not repeated into the log.
            refused.set_result(UnsupportedMedia("a part of a type other than "
                                                "application/dicom"))
            return _Part(data, refused, study)
        return _Part(data, self.services.analysers.submit(data), study)

    def _store_batch(self, batch: list[_Part], storer: _Storer) -> list[Stored | Failed]:
        """Store one batch of parts; each part's outcome (never raises for content),
        with what ``storer`` may do."""
        parts = [part.received() for part in batch]
        accepted = [part for part in parts if isinstance(part.analysis, Analysis)]
        results: Sequence[StoreResult | BaseException]
        try:
            results = self.services.ingest.store_batch(
                accepted, calling_ae="", may_overwrite=storer.may_overwrite,
                may_reject=storer.rejecter is not None, requestor=storer.rejecter)
        except Exception as exc:  # noqa: BLE001 - a whole batch's failure fails each part
            results = [exc] * len(accepted)
        outcomes = iter(results)
        return [_stored(part.data, next(outcomes)) if isinstance(part.analysis, Analysis)
                else _failed(part.data, part.analysis) for part in parts]


@dataclass(frozen=True)
class _Storer:
    """What the request's user may do beyond storing new instances: replace a
    different object under a stored SOP Instance UID (refused 0111 otherwise), and
    apply a rejection note (``rejecter``, the user and address the audit trail names
    as removing what it rejects; ``None``: a note is refused, 0124)."""

    may_overwrite: bool
    rejecter: Participant | None

    @classmethod
    def of(cls, req: falcon.Request, access: Access) -> _Storer:
        """The storer ``req`` is: a note removes data (what ``DELETE`` needs), a
        replacement the object it replaces (the ``admin`` role)."""
        return cls(access.may_overwrite(req),
                   requestor_of(req) if access.may_reject(req) else None)


@dataclass(frozen=True)
class _Part:
    """A part as read: its bytes, its analysis to come, and the study of the URL."""

    data: bytes
    analysis: Future[Result]
    study: str | None

    def received(self) -> Received:
        """The part analysed (waits for the analysis); a part of another study than the
        URL's is refused (PS3.18 10.5.1)."""
        analysis = self.analysis.result()
        if (self.study is not None and isinstance(analysis, Analysis)
                and analysis.study_uid != self.study):
            analysis = StudyMismatch("the instance belongs to another study than the URL's")
        return Received(self.data, analysis)


def _stored(data: bytes, result: StoreResult | BaseException) -> Stored | Failed:
    if isinstance(result, BaseException):
        return _failed(data, result)
    return Stored(result.sop_class_uid, result.sop_instance_uid, result.study_uid,
                  result.series_uid, TRANSFER_ACTION[result.outcome], result.patient)


def _failed(data: bytes, exc: BaseException) -> Failed:
    """A part not stored.  Logged with the request's summary (:meth:`Report.summary`),
    not a line per part (a request may hold thousands); a defect of ours alone is
    logged here, with its traceback (never patient data)."""
    outcome = outcome_for(exc)
    if outcome is UNEXPECTED:
        log.error("STOW-RS part not stored: %s", exc, exc_info=exc)
    else:
        log.debug("STOW-RS part not stored: %s", exc)
    core = logged_by_core(exc)  # a full intake: counted and logged by the ingest
    return Failed(*peek_uids(data), outcome.failure_reason, "" if core else reason(exc),
                  outcome.status.startswith("5") and not core)


def _refuse_unknown_oversize(report: Report, size: int) -> None:
    """A part too large whose UIDs are unknown: the request is 413 when nothing was
    stored before it; otherwise it is one more failure (the stored parts must be
    reported as stored)."""
    exc = ObjectTooLarge(f"a part of {size} bytes is larger than the object size limit")
    if not report.stored:
        raise exc
    report.failed.append(Failed("", "", outcome_for(exc).failure_reason, str(exc)))


def _collect(pending: list[Future[list[Stored | Failed]]], report: Report,
             keep: int) -> None:
    """Wait for the oldest batches until at most ``keep`` are in flight; record them."""
    while len(pending) > keep:
        for outcome in pending.pop(0).result():
            if isinstance(outcome, Stored):
                report.stored.append(outcome)
            else:
                report.failed.append(outcome)
