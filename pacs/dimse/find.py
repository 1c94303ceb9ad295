"""The C-FIND SCP (PS3.4 C.4.1): one pending response per match, sent page by page.

pynetdicom's own C-FIND flow takes a ``Dataset`` per match from the handler and encodes
it with pydicom; for a study list that was most of the time spent.  This flow runs the
query through the engine and writes each response identifier directly to bytes
(:mod:`pacs.dimse.encoding`), then hands the response to pynetdicom's DIMSE layer.

======  =========================================================================
FF00    a match, every requested key supported
FF01    a match, some requested optional keys are not supported (sent empty)
0000    matching complete
FE00    cancelled by C-CANCEL
A700    more matches than PACS_QUERY_MAX_ROWS, or the query ran too long
A900    the identifier breaks the model's level rules
C000    the identifier cannot be decoded or processed
======  =========================================================================
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from pacs.dimse import contexts, wire
from pacs.dimse.encoding import encode_identifier
from pacs.dimse.identifier import Negotiated, ResponseBuilder, to_find_query
from pacs.dimse.status import FIND_STATUS, status_for
from pacs.core.errors import Cancelled, InvalidQuery, PacsError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.presentation import PresentationContext
    from pynetdicom.service_class import QueryRetrieveServiceClass

    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Command Field of a C-FIND-RSP (PS3.7 E.1-1).
_C_FIND_RSP = 0x8020
#: Pending statuses (PS3.4 C.4.1.1.4): more responses follow.
_PENDING = frozenset({0xFF00, 0xFF01})

#: C-FIND extended negotiation we support (PS3.4 C.5.1.1.1): relational queries,
#: empty-value and multiple-value matching; not combined date-time or fuzzy matching.
SUPPORTED_FIND_OPTIONS = Negotiated(relational=True, empty_value=True, multiple_value=True)


def negotiated_find_options(requested: bytes | None) -> Negotiated:
    """What was agreed: what the SCU asked for and we support."""
    asked = Negotiated.from_info(requested)
    return Negotiated(
        relational=asked.relational and SUPPORTED_FIND_OPTIONS.relational,
        empty_value=asked.empty_value and SUPPORTED_FIND_OPTIONS.empty_value,
        multiple_value=asked.multiple_value and SUPPORTED_FIND_OPTIONS.multiple_value,
    )


def handle_find(event: object, services: Services) -> None:
    """EVT_C_FIND: binds ``services`` for the service class that calls :func:`serve_find`.

    pynetdicom never calls it once the service class is installed
    (:func:`pacs.dimse.retrieve.install`).
    """
    raise RuntimeError("C-FIND is served by pacs.dimse.find.serve_find; the Q/R service "
                       "class is not installed")


def serve_find(service: QueryRetrieveServiceClass, req: C_FIND,
               context: PresentationContext, services: Services) -> None:
    """Answer one C-FIND request on ``service``'s association."""
    cx_id = int(context.context_id or 0)
    syntax = context.transfer_syntax[0]
    uid = str(req.AffectedSOPClassUID)
    model = contexts.FIND_MODELS[uid]
    calling = service.assoc.requestor.ae_title
    message_id = int(req.MessageID or 0)

    commands: dict[int, bytes] = {}  # a status is sent with or without identifier, not both
    writer = wire.ResponseWriter(service.assoc, cx_id)

    def respond(status: int | Dataset, identifier: bytes | None = None) -> None:
        if isinstance(status, Dataset):
            command = wire.response_command(_C_FIND_RSP, uid, message_id, status.Status,
                                            False, status.get("ErrorComment"))
        else:
            command = commands.get(status)
            if command is None:  # one per status: only the identifier changes
                command = commands[status] = wire.response_command(
                    _C_FIND_RSP, uid, message_id, status, identifier is not None)
        # Pending responses may wait a moment in the writer; any other status is final.
        writer.message(command, identifier,
                       last=isinstance(status, Dataset) or status not in _PENDING)

    deadline = services.engine.deadline()  # PACS_QUERY_TIME_LIMIT: the whole query
    try:
        try:
            identifier = decode(req.Identifier, syntax.is_implicit_VR,
                                syntax.is_little_endian, syntax.is_deflated)
        except Exception:
            raise InvalidQuery("the identifier does not decode") from None
        negotiated = negotiated_find_options(
            service.assoc.requestor.sop_class_extended.get(uid))
        query, unsupported = to_find_query(identifier, model, negotiated)
        pending = 0xFF01 if unsupported else 0xFF00
        extra = [(int(tag), identifier[tag].VR) for tag in unsupported]
        builder = ResponseBuilder(query, model, services.settings.ae_title,
                                  _charset(identifier), extra)
        cancelled = CancelWatch(service.is_cancelled, int(req.MessageID))
        implicit = syntax.is_implicit_VR
        # Page by page: each read in its own short transaction and encoded before it is
        # sent, so that a slow reader holds neither the index nor the query's time.
        for page in services.engine.find_pages(query, cancelled=cancelled, deadline=deadline):
            answers = [encode_identifier(*builder.build(result), implicit) for result in page]
            deadline.check()
            with deadline.paused():
                for answer in answers:
                    if writer.broken:  # the requestor went away (the association is aborted)
                        return
                    if cancelled():
                        respond(0xFE00)
                        return
                    respond(pending, answer)
    except Cancelled:
        respond(0xFE00)
        return
    except PacsError as exc:
        log.warning("C-FIND from %s refused: %s", calling, exc)
        respond(status_for(FIND_STATUS, exc))
        return
    except Exception as exc:  # a bug must not leave the peer without an answer
        log.exception("C-FIND from %s failed unexpectedly", calling)
        respond(status_for(FIND_STATUS, exc))
        return
    respond(0x0000)


class CancelWatch:
    """True once a C-CANCEL for one request has arrived (PS3.4 C.4.1.2.3, C.4.2.3.1).

    pynetdicom's ``is_cancelled`` forgets the C-CANCEL once it has answered true; the
    query engine and the response or sub-operation loop both ask, so the answer is
    kept here.  C-FIND, C-MOVE and C-GET all watch through this class.
    """

    def __init__(self, is_cancelled: Callable[[int], bool], msg_id: int) -> None:
        self._is_cancelled = is_cancelled
        self._msg_id = msg_id
        self.seen = False

    def __call__(self) -> bool:
        if not self.seen and self._is_cancelled(self._msg_id):
            self.seen = True
        return self.seen


def _charset(identifier: Dataset) -> list[str] | None:
    value = identifier.get("SpecificCharacterSet")
    if not value:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]
