"""DIMSE service handlers: Event in, core call, status out.  No SQL and no paths here.

Each handler receives the :class:`~pacs.services.Services` of its process as an extra
argument (bound with ``evt_handlers``), never from a global.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt

from pacs.dimse import contexts, find, retrieve
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
        data = part10(event)
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


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """Answer C-FIND extended negotiation (PS3.4 C.5.1.1.1) with what we support."""
    answers = {}
    for uid, info in (event.app_info or {}).items():
        if uid in contexts.FIND_MODELS:
            agreed = find.negotiated_find_options(info)
            answers[uid] = bytes([int(agreed.relational), 0, 0, 0,
                                  int(agreed.empty_value), int(agreed.multiple_value)])
    return answers


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian file meta element (PS3.10 7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


_VERSION = _element(0x0001, b"OB", b"\x00\x01")
_IMPLEMENTATION = (_element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
                   + _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
                              .ljust(len(PYNETDICOM_IMPLEMENTATION_VERSION) + 1 & ~1)))


def part10(event: Event) -> bytes:
    """The received data set as a Part 10 object: preamble, file meta, data set bytes.

    The same bytes as pynetdicom's ``event.encoded_dataset(include_meta=True)``
    (the same file meta elements), built directly instead of through a pydicom
    data set and writer, which cost a noticeable share of a small instance's time.
    """
    request = event.request
    try:
        sop_class = _uid(str(request.AffectedSOPClassUID))
        sop_instance = _uid(str(request.AffectedSOPInstanceUID))
        syntax = _uid(str(event.context.transfer_syntax))
    except (UnicodeEncodeError, TypeError, AttributeError):
        return event.encoded_dataset(include_meta=True)  # let pydicom deal with oddities
    elements = b"".join((_VERSION, _element(0x0002, b"UI", sop_class),
                         _element(0x0003, b"UI", sop_instance),
                         _element(0x0010, b"UI", syntax), _IMPLEMENTATION))
    return b"".join((b"\0" * 128, b"DICM", struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4,
                                                       len(elements)),
                     elements, request.DataSet.getvalue()))


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
