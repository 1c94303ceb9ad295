"""DIMSE service handlers: Event in, core call, status out.  No SQL and no paths here.

Each handler receives the :class:`~pacs.core.services.Services` of its process as an extra
argument (bound with ``evt_handlers``), never from a global.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacs.dimse import contexts, find, retrieve, storage

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from pacs.core.services import Services

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
    return storage.store_request(services, event.request, str(event.context.transfer_syntax),
                         event.assoc.requestor.ae_title)


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """Answer C-FIND extended negotiation (PS3.4 C.5.1.1.1) with what we support."""
    answers = {}
    for uid, info in (event.app_info or {}).items():
        if uid in contexts.FIND_MODELS:
            agreed = find.negotiated_find_options(info)
            answers[uid] = bytes([int(agreed.relational), 0, 0, 0,
                                  int(agreed.empty_value), int(agreed.multiple_value)])
    return answers


def bind(services: Services) -> list[tuple]:
    """The ``evt_handlers`` list for an association server."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services]),
        (evt.EVT_C_FIND, find.handle_find, [services]),
        # C-MOVE / C-GET run in retrieve.RetrieveServiceClass, which takes the services
        # from these bindings.
        (evt.EVT_C_MOVE, retrieve.handle_move, [services]),
        (evt.EVT_C_GET, retrieve.handle_get, [services]),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended),
    ]
