"""DIMSE service handlers: Event in, core call, status out.  No SQL and no paths here.

Each handler receives the :class:`~pacs.services.Services` of its process as an extra
argument (bound with ``evt_handlers``), never from a global.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacs.dimse import contexts
from pacs.dimse.identifier import Negotiated, empty_keys, to_find_query, to_response
from pacs.dimse.status import FIND_STATUS, STORE_STATUS, status_for
from pacs.errors import Cancelled, InvalidInstance, PacsError

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from pacs.services import Services

log = logging.getLogger(__name__)

SUCCESS = 0x0000


def handle_echo(event: Event) -> int:
    """C-ECHO (PS3.4 A.4): always Success."""
    return SUCCESS


def handle_store(event: Event, services: Services) -> int | Dataset:
    """C-STORE (PS3.4 B.2.3): Success only once the object and its index row are durable.

    ======  ====================================================================
    0000    stored, or the same object was already stored, or kept-first policy
    0117    invalid SOP Instance UID (also any other identifying UID)
    0111    a different object under a stored UID and the policy is ``reject``
    A900    the command's SOP Class / Instance UIDs differ from the data set's
    C000    the data set does not parse or is truncated
    A700    the store or the index failed (nothing half-written remains)
    0110    any other failure
    ======  ====================================================================
    """
    request = event.request
    calling = event.assoc.requestor.ae_title
    try:
        data = event.encoded_dataset(include_meta=True)
        result = services.ingest.store_bytes(
            data, calling_ae=calling,
            expected=(str(request.AffectedSOPClassUID or ""),
                      str(request.AffectedSOPInstanceUID or "")))
    except InvalidInstance as exc:
        log.warning("C-STORE from %s refused: %s", calling, exc)
        return status_for(STORE_STATUS, exc)
    except PacsError as exc:
        log.error("C-STORE from %s failed: %s", calling, exc)
        return status_for(STORE_STATUS, exc)
    except Exception as exc:  # a bug must not take the association down
        log.exception("C-STORE from %s failed unexpectedly", calling)
        return status_for(STORE_STATUS, exc)
    log.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling,
              result.outcome.value)
    return SUCCESS


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


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """Answer C-FIND extended negotiation (PS3.4 C.5.1.1.1) with what we support."""
    answers = {}
    for uid, info in (event.app_info or {}).items():
        if uid in contexts.FIND_MODELS:
            agreed = negotiated_find_options(info)
            answers[uid] = bytes([int(agreed.relational), 0, 0, 0,
                                  int(agreed.empty_value), int(agreed.multiple_value)])
    return answers


def handle_find(event: Event, services: Services) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND (PS3.4 C.4.1): one pending response per match, streamed.

    ======  ====================================================================
    FF00    a match, every requested key supported
    FF01    a match, some requested optional keys are not supported (sent empty)
    0000    matching complete (sent by pynetdicom after the last match)
    FE00    cancelled by C-CANCEL
    A700    more matches than PACS_QUERY_MAX_ROWS, or the query ran too long
    A900    the identifier breaks the model's level rules
    C000    the identifier cannot be processed
    ======  ====================================================================
    """
    uid = str(event.request.AffectedSOPClassUID)
    model = contexts.FIND_MODELS[uid]
    try:
        identifier = event.identifier
        negotiated = negotiated_find_options(event.assoc.requestor.sop_class_extended.get(uid))
        query, unsupported = to_find_query(identifier, model, negotiated)
        pending = 0xFF01 if unsupported else 0xFF00
        requested_charset = _charset(identifier)
        matches = services.engine.find(query, cancelled=lambda: bool(event.is_cancelled))
        for result in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            response = to_response(result, query, model, services.settings.ae_title,
                                   requested_charset)
            empty_keys(response, identifier, unsupported)
            yield pending, response
    except Cancelled:
        yield 0xFE00, None
    except PacsError as exc:
        log.warning("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
        yield status_for(FIND_STATUS, exc), None
    except Exception as exc:
        log.exception("C-FIND failed unexpectedly")
        yield status_for(FIND_STATUS, exc), None


def _charset(identifier: Dataset) -> list[str] | None:
    value = identifier.get("SpecificCharacterSet")
    if not value:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def bind(services: Services) -> list[tuple]:
    """The ``evt_handlers`` list for an association server."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services]),
        (evt.EVT_C_FIND, handle_find, [services]),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended),
    ]
