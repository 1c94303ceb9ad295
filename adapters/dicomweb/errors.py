"""THE table from exceptions to HTTP statuses and STOW-RS failure reasons.

Registered once with ``app.add_error_handler`` (see :func:`register`): resources raise
the core's exceptions (:mod:`pacs.core.errors`) or the adapter's own, and this module alone
decides the answer.  A client's mistake always gets a 4xx with a short reason; only a
failure of ours (store, index, a bug) gets a 5xx, and a bug's traceback goes to the log,
never to the client.  Reasons name attributes, never values (no patient data).

STOW-RS failure reasons (PS3.18 10.5.3, Table 10.5.3-2, which uses the C-STORE codes of
PS3.4 Table B.2-1) come from the same rows, so a part refused by STOW gets the code a
C-STORE of the same object would get.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import falcon

from adapters.dicomweb.multipart import MultipartError
from pacs.core import errors
from pacs.core.intake import RETRY_AFTER
from pacs.core.rejection import REFUSED_AGAIN

log = logging.getLogger(__name__)


class StudyMismatch(errors.InvalidInstance):
    """A STOW-RS part whose Study Instance UID differs from the one in the URL
    (PS3.18 10.5.1: every instance must belong to the target study)."""


class Unacceptable(errors.PacsError):
    """The client accepts no media type this resource can answer with (406)."""


class UnsupportedMedia(errors.PacsError):
    """A request body of a media type the resource does not take (415)."""


@dataclass(frozen=True)
class Outcome:
    """How one kind of failure is answered."""

    status: str
    failure_reason: int  # STOW-RS FailureReason (0008,1197)
    title: str


#: Most specific first; the first row whose exception type matches wins.
TABLE: tuple[tuple[type[BaseException], Outcome], ...] = (
    # A part's study differs from the URL's.  C409 sits in C-STORE's Cxxx "cannot
    # understand" range; dcm4chee-arc uses the same code for the same case.
    (StudyMismatch, Outcome(falcon.HTTP_409, 0xC409, "Study Instance UID mismatch")),
    (errors.InvalidUID, Outcome(falcon.HTTP_400, 0x0117, "Invalid UID")),
    (errors.UIDMismatch, Outcome(falcon.HTTP_400, 0xA900, "UID mismatch")),
    # A retrieval that needs stored pixel data decoded that no decoder here decodes:
    # no acceptable representation can be made (the alternatives the Accept header
    # allows are tried first, adapters/dicomweb/wado.py).
    (errors.CannotDecode, Outcome(falcon.HTTP_406, 0xC000, "Cannot decode the stored pixels")),
    (errors.UnreadableData, Outcome(falcon.HTTP_400, 0xC000, "Unreadable data")),
    (errors.DuplicateRejected, Outcome(falcon.HTTP_409, 0x0111, "Duplicate SOP Instance")),
    (errors.ObjectTooLarge, Outcome(falcon.HTTP_413, 0xA700, "Object too large")),
    # An instance an IOCM rejection note removed, sent again (IHE RAD TF-2 4.66.4);
    # dcm4chee-arc's code.
    (errors.RejectedInstance, Outcome(falcon.HTTP_409, REFUSED_AGAIN, "Rejected instance")),
    (errors.InvalidRejection, Outcome(falcon.HTTP_400, 0xC000, "Invalid rejection note")),
    # A rejection note from a user who may not remove data (PS3.7 C.5.21).
    (errors.NotAuthorized, Outcome(falcon.HTTP_403, 0x0124, "Not authorized")),
    (errors.InvalidInstance, Outcome(falcon.HTTP_400, 0xC000, "Invalid instance")),
    (MultipartError, Outcome(falcon.HTTP_400, 0xC000, "Malformed multipart body")),
    (errors.IncompleteBody, Outcome(falcon.HTTP_400, 0xC000, "Incomplete request body")),
    # More values than one query may hold: the client's to split (a client error,
    # not 413, which here says the matches are too many).
    (errors.QueryTooLarge, Outcome(falcon.HTTP_400, 0xC000, "Query too large")),
    (errors.InvalidQuery, Outcome(falcon.HTTP_400, 0xC000, "Invalid query")),
    (errors.NotFound, Outcome(falcon.HTTP_404, 0x0110, "Not found")),
    # The frame exists but is too large to decode here (PACS_MAX_FRAME_BYTES).
    (errors.FrameTooLarge, Outcome(falcon.HTTP_400, 0x0110, "Frame too large to decode")),
    (Unacceptable, Outcome(falcon.HTTP_406, 0x0110, "Not acceptable")),
    (UnsupportedMedia, Outcome(falcon.HTTP_415, 0xC000, "Unsupported media type")),
    # Too many matches or too long a query: the client must narrow it.
    (errors.QueryLimitExceeded, Outcome(falcon.HTTP_413, 0xA700, "Query too broad")),
    (errors.Cancelled, Outcome(falcon.HTTP_503, 0xA700, "Cancelled")),
    (errors.StorageError, Outcome(falcon.HTTP_503, 0xA700, "Storage unavailable")),
    (errors.IntakeFull, Outcome(falcon.HTTP_503, 0xA700, "Busy: objects waiting for the store")),
    (errors.IndexFailure, Outcome(falcon.HTTP_503, 0xA700, "Index unavailable")),
    # The worker at its thread or address space limit: it may succeed later.
    (errors.Exhausted, Outcome(falcon.HTTP_503, 0xA700, "Out of threads")),
    (MemoryError, Outcome(falcon.HTTP_503, 0xA700, "Out of memory")),
)

#: Anything else is a bug of ours: Processing failure (PS3.7 C.5.2).
UNEXPECTED = Outcome(falcon.HTTP_500, 0x0110, "Internal error")

#: A stored object that does not read as the instance it was stored as, met while it
#: is retrieved: the node's failure (a damaged store), not the client's request.
DAMAGED = Outcome(falcon.HTTP_500, 0x0110, "Stored object unreadable")

#: Methods that only read what is stored.
_READS = frozenset({"GET", "HEAD"})


def outcome_for(exc: BaseException, reading: bool = False) -> Outcome:
    """The row of :data:`TABLE` for ``exc`` (:data:`UNEXPECTED` when none matches);
    ``reading``: raised by a request that only reads, where unreadable data is a stored
    object's (:data:`DAMAGED`), not a sent one's."""
    if (reading and isinstance(exc, errors.UnreadableData)
            and not isinstance(exc, errors.CannotDecode)):
        return DAMAGED
    return next((outcome for kind, outcome in TABLE if isinstance(exc, kind)), UNEXPECTED)


def reason(exc: BaseException) -> str:
    """The short reason sent to the client (the core's messages carry no values)."""
    return str(exc) or outcome_for(exc).title


def handle(req: falcon.Request, resp: falcon.Response, exc: BaseException,
           params: Mapping[str, Any]) -> None:
    """Falcon error handler: answer ``exc`` from :data:`TABLE`.

    Raises
    ------
    falcon.HTTPError
        Always; falcon serializes it with :func:`serialize`.
    """
    outcome = outcome_for(exc, reading=req.method in _READS)
    if outcome is UNEXPECTED:
        log.exception("%s %s failed unexpectedly", req.method, req.path)
        raise falcon.HTTPError(outcome.status, title=outcome.title)
    if outcome.status.startswith("5"):  # a full intake: counted and logged by the ingest
        log.log(logging.DEBUG if errors.logged_by_core(exc) else logging.ERROR,
                "%s %s failed: %s", req.method, req.path, exc)
    headers = None
    if outcome.status == falcon.HTTP_503:
        wait = RETRY_AFTER if isinstance(exc, errors.IntakeFull) else 5
        headers = {"Retry-After": str(wait)}
    raise falcon.HTTPError(outcome.status, title=outcome.title, description=reason(exc),
                           headers=headers)


def serialize(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Every error body is a small JSON object ``{"title", "description"}``.

    Falcon's default picks the body by the Accept header and sends none when the
    client asked only for ``multipart/related``; a reason is more useful than nothing.
    """
    resp.content_type = falcon.MEDIA_JSON
    resp.data = exc.to_json()


def register(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    """Install the table's handler for every exception and the JSON serializer."""
    # Falcon's own HTTPError handler stays more specific than this catch-all, so its
    # errors (unknown route, 405, bad headers) keep their statuses.
    app.add_error_handler(Exception, handle)
    app.set_error_serializer(serialize)
