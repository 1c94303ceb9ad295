"""DIMSE service handlers: Event in, core call, status out.  No SQL and no paths here.

Each handler receives the :class:`~pacs.services.Services` of its process as an extra
argument (bound with ``evt_handlers``), never from a global.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacs.dimse.status import STORE_STATUS, status_for
from pacs.errors import InvalidInstance, PacsError

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


def bind(services: Services) -> list[tuple]:
    """The ``evt_handlers`` list for an association server."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services]),
    ]
