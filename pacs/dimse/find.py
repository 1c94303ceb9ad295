"""The C-FIND SCP (PS3.4 C.4.1): one pending response per match, page by page.

The query runs through the engine and each response identifier is written straight to
bytes (:mod:`pacs.dimse.encoding`); :func:`find_responses` yields the responses, which
the seam writes to the socket (:func:`serve_find`) and pynetdicom's EVT_C_FIND handler
hands to pynetdicom when the seam is off (:func:`pacs.dimse.handlers.handle_find`).

======  =========================================================================
FF00    a match, every requested key supported
FF01    a match, some requested optional keys are not supported (the first
        :data:`ECHOED_UNSUPPORTED` of them sent empty)
0000    matching complete
FE00    cancelled by C-CANCEL
A700    more matches than PACS_QUERY_MAX_ROWS, the query ran too long, or the index
        failed
A900    the identifier does not decode, or breaks the model's level rules
0124    the calling AE lacks the ``find`` right (:mod:`pacs.core.access`)
0122    the Affected SOP Class UID is not its presentation context's (:func:`off_context`)
C000    the query holds more values than one may (``QueryTooLarge``)
======  =========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs.core.access import FIND
from pacs.core.errors import Cancelled, InvalidQuery, PacsError, QueryTooLarge
from pacs.dimse import contexts
from pacs.dimse.audit import AssociationAudit, keys_of
from pacs.dimse.connection import Request, Responder
from pacs.dimse.encoding import encode_identifier
from pacs.dimse.identifier import (
    INSTANCE_AVAILABILITY,
    Negotiated,
    ResponseBuilder,
    read_data_set,
    to_find_query,
)
from pacs.dimse.limits import IDENTIFIER_CEILING
from pacs.dimse.status import (
    CANCEL,
    FIND_STATUS,
    NOT_AUTHORIZED,
    PENDING,
    PENDING_UNSUPPORTED_KEYS,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    Status,
    status_for,
)

if TYPE_CHECKING:
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Unsupported keys of an identifier sent back, empty, in each answer (the first ones).
#: PS3.4 C.4.1.1.3.2 asks only for FF01 when optional keys are not supported; echoing
#: every one, a requestor naming thousands of unknown elements in its 64 KiB identifier
#: would make every answer thousands of elements long (3.5 ms to encode, 64 KB to send).
ECHOED_UNSUPPORTED = 64

#: C-FIND extended negotiation we support (PS3.4 C.5.1.1.1): relational queries,
#: empty-value and multiple-value matching; not combined date-time or fuzzy matching.
SUPPORTED_FIND_OPTIONS = Negotiated(relational=True, empty_value=True, multiple_value=True)

#: One response: its status and, for a match, the identifier's bytes.
Response = tuple[Status, bytes | None]


def negotiated_find_options(requested: bytes | None) -> Negotiated:
    """What was agreed: what the SCU asked for and we support."""
    asked = Negotiated.from_info(requested)
    return Negotiated(
        relational=asked.relational and SUPPORTED_FIND_OPTIONS.relational,
        empty_value=asked.empty_value and SUPPORTED_FIND_OPTIONS.empty_value,
        multiple_value=asked.multiple_value and SUPPORTED_FIND_OPTIONS.multiple_value,
    )


def decode_identifier(request: Request) -> Dataset:
    """The request's identifier as a data set, read in its context's transfer syntax
    (:func:`pacs.dimse.identifier.read_data_set`).

    Raises
    ------
    QueryTooLarge
        It was longer than :data:`pacs.dimse.limits.IDENTIFIER_CEILING` (not kept).
    InvalidQuery
        It does not decode.
    """
    if request.identifier_received:
        raise QueryTooLarge(f"an identifier over {IDENTIFIER_CEILING} bytes")
    try:
        return read_data_set(request.identifier, request.transfer_syntax)
    except Exception:  # noqa: BLE001 - whatever pydicom raises is a bad identifier
        raise InvalidQuery("the identifier does not decode") from None


def find_responses(request: Request, services: Services, cancelled: Callable[[], bool],
                   audit: AssociationAudit | None = None,
                   page_end: Callable[[], None] | None = None
                   ) -> Generator[Response, None, None]:
    """The responses to one C-FIND request, the final one last; the request and its
    final status (``None``: the consumer stopped first) go to the association's
    ``audit`` (:mod:`pacs.dimse.audit`) once it ends.  ``page_end`` is called after the
    last match of each page, before the next page is read: a consumer that gathers
    responses into larger writes sends them then, rather than when the next page is
    ready (the requestor sees them, and may cancel, meanwhile).
    """
    identifier = _decoded(request)
    responses = _responses(request, identifier, services, cancelled, page_end)
    if audit is None:
        yield from responses
        return
    final: Status | None = None
    try:
        for status, answer in responses:
            if not status.is_pending:
                final = status
            yield status, answer
    finally:
        responses.close()
        audit.queried(request, keys_of(identifier) if isinstance(identifier, Dataset)
                      else [], final)


def off_context(request: Request, service: str) -> Status | None:
    """0122 (Refused: SOP Class not supported, PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
    when the request's Affected SOP Class UID is not its presentation context's:
    the information model a request is served in is the one negotiated for its
    context (PS3.7 9.1.2.1, PS3.8 7.1.1.13), never another; else ``None``."""
    if not request.abstract_syntax or request.sop_class_uid == request.abstract_syntax:
        return None
    log.warning("%s from %s refused: its SOP Class is not its context's", service,
                request.calling_ae_title)
    return SOP_CLASS_NOT_SUPPORTED.with_comment(
        "the Affected SOP Class UID is not its presentation context's")


def _decoded(request: Request) -> Dataset | InvalidQuery:
    """The request's identifier, decoded once for the query and its audit record; why
    not when it cannot be."""
    try:
        return decode_identifier(request)
    except InvalidQuery as exc:
        return exc


def _responses(request: Request, identifier: Dataset | InvalidQuery, services: Services,
               cancelled: Callable[[], bool], page_end: Callable[[], None] | None
               ) -> Generator[Response, None, None]:
    """The responses of :func:`find_responses` to ``request``, whose identifier is
    ``identifier`` (or why it could not be read).

    The query's time limit (PACS_QUERY_TIME_LIMIT) counts the reading and encoding of
    each page, not the time the consumer takes between two responses: the responses of
    a page are yielded while the deadline is paused, so that a slow reader holds
    neither the index nor the query's time.  A consumer that stops early (the requestor
    went away) closes the generator, which ends the query.
    """
    refused = off_context(request, "C-FIND")
    if refused is not None:
        yield refused, None
        return
    if not services.access.may(request.calling_ae_title, FIND):
        log.warning("C-FIND from %s refused: the AE may not query", request.calling_ae_title)
        yield NOT_AUTHORIZED.with_comment("this AE may not query"), None
        return
    deadline = services.engine.deadline()
    try:
        if isinstance(identifier, InvalidQuery):
            raise identifier
        model = contexts.FIND_MODELS[request.sop_class_uid]
        negotiated = negotiated_find_options(request.extended_negotiation)
        query, unsupported = to_find_query(identifier, model, negotiated)
        pending = PENDING_UNSUPPORTED_KEYS if unsupported else PENDING
        # Standard elements first: private ones (odd groups) must not crowd them out.
        echoed = sorted(unsupported, key=lambda tag: (tag >> 16) & 1)[:ECHOED_UNSUPPORTED]
        extra = [(int(tag), identifier[tag].VR) for tag in echoed]
        builder = ResponseBuilder(query, model, services.settings.ae_title,
                                  _charset(identifier), extra,
                                  availability=INSTANCE_AVAILABILITY in identifier)
        implicit = UID(request.transfer_syntax).is_implicit_VR
        for page in services.engine.find_pages(query, cancelled=cancelled, deadline=deadline):
            answers = []
            for result in page:  # the time limit holds for each answer, not each page
                answers.append(encode_identifier(*builder.build(result), implicit))
                deadline.check()
                if cancelled():
                    raise Cancelled("the query was cancelled")
            with deadline.paused():
                for answer in answers:
                    if cancelled():
                        yield CANCEL, None
                        return
                    yield pending, answer
                if page_end is not None:
                    page_end()
    except Cancelled:
        yield CANCEL, None
        return
    except PacsError as exc:
        log.warning("C-FIND from %s refused: %s", request.calling_ae_title, exc)
        yield status_for(FIND_STATUS, exc), None
        return
    except Exception as exc:
        log.exception("C-FIND from %s failed unexpectedly", request.calling_ae_title)
        yield status_for(FIND_STATUS, exc), None
        return
    yield SUCCESS, None


def serve_find(responder: Responder, request: Request, services: Services,
               audit: AssociationAudit | None = None,
               page_end: Callable[[], None] | None = None) -> None:
    """Answer one C-FIND request through ``responder``; stop when it is gone.
    ``page_end``: as for :func:`find_responses`."""
    def stopped() -> bool:
        # A C-CANCEL (PS3.4 C.4.1.2.3), or the requestor gone (an abort, the connection
        # closed): matching and encoding stop either way, not at the time limit.
        return responder.cancelled() or not responder.alive

    responses = find_responses(request, services, stopped, audit, page_end)
    try:
        for status, identifier in responses:
            if not responder.alive:  # the requestor went away (the association aborted)
                return
            responder.send_response(status, identifier)
    finally:
        responses.close()  # ends the query's statement now, not at garbage collection


def _charset(identifier: Dataset) -> list[str] | None:
    value = identifier.get("SpecificCharacterSet")
    if not value:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]
