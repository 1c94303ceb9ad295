"""The C-STORE SCP flow (PS3.4 B.2.3): store, then answer with a pre-encoded response.

pynetdicom's Storage service class wraps every request in an event, validates the
handler's status and encodes the response command with pydicom; for small instances
that was a sixth of the time per instance.  This class stores through
:func:`store_request` (the same code the EVT_C_STORE handler runs)
and sends the response command written directly (:mod:`pacs.dimse.wire`).  Success is
still only sent after the object and its index row are durable.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.service_class import StorageServiceClass

from pacs.dimse import wire
from pacs.dimse.limits import CappedBuffer
from pacs.dimse.status import STORE_STATUS, status_for
from pacs.core.errors import InvalidInstance, ObjectTooLarge, PacsError

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import PresentationContext

    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Command Field of a C-STORE-RSP (PS3.7 E.1-1).
C_STORE_RSP = 0x8001
SUCCESS = 0x0000


def store_request(services: Services, request: C_STORE, syntax: str,
                  calling: str) -> int | Dataset:
    """Store the data set of a C-STORE request; the status to answer (see
    :func:`handle_store`)."""
    try:
        _require_kept(request)
        data = part10(request, syntax)
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


def _require_kept(request: C_STORE) -> None:
    """Raise ObjectTooLarge when the request's data set passed PACS_MAX_OBJECT_BYTES
    while it arrived: its bytes were not kept (:class:`pacs.dimse.limits.CappedBuffer`),
    and it is answered A700 with nothing stored."""
    data_set = request.DataSet
    if isinstance(data_set, CappedBuffer) and data_set.overflowed:
        raise ObjectTooLarge(f"a data set of {data_set.received} bytes, over "
                             f"PACS_MAX_OBJECT_BYTES ({data_set.limit})")


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian file meta element (PS3.10 7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


_VERSION = _element(0x0001, b"OB", b"\x00\x01")
_IMPLEMENTATION = (_element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
                   + _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
                              .ljust(len(PYNETDICOM_IMPLEMENTATION_VERSION) + 1 & ~1)))


def part10(request: C_STORE, syntax: str) -> bytes:
    """The received data set as a Part 10 object: preamble, file meta, data set bytes.

    The same bytes as pynetdicom's ``event.encoded_dataset(include_meta=True)``
    (the same file meta elements), built directly instead of through a pydicom
    data set and writer, which cost a noticeable share of a small instance's time.
    UIDs that are not ASCII are written with replacement characters; ingest then
    refuses them as invalid (0117).
    """
    elements = b"".join((_VERSION,
                         _element(0x0002, b"UI", _uid(str(request.AffectedSOPClassUID or ""))),
                         _element(0x0003, b"UI", _uid(str(request.AffectedSOPInstanceUID or ""))),
                         _element(0x0010, b"UI", _uid(syntax)), _IMPLEMENTATION))
    return b"".join((b"\0" * 128, b"DICM", struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4,
                                                       len(elements)),
                     elements, request.DataSet.getvalue()))




def bound_services(assoc: Association, event: evt.EventType) -> Services:
    """The services bound to ``event`` by :func:`pacs.dimse.handlers.bind`."""
    bound: Any = assoc.get_handlers(event)
    handler, args = bound if isinstance(bound, tuple) else (None, None)
    if handler is None or not args:
        raise RuntimeError(f"no services bound to {event.name}")
    return args[0]  # type: ignore[no-any-return]


class StoreServiceClass(StorageServiceClass):
    """Storage SCP answering with pre-encoded responses (see the module docstring)."""

    def SCP(self, req: C_STORE, context: PresentationContext) -> None:  # noqa: N802
        """Store the request's data set, then send the C-STORE response."""
        bound: Any = self.assoc.get_handlers(evt.EVT_C_STORE)
        if not (isinstance(bound, tuple) and bound[1]):
            # Not a pacs node (another AE in this process, e.g. a test peer): the
            # patch is process-wide, so fall back to pynetdicom's own flow.
            super().SCP(req, context)
            return
        services = bound[1][0]
        status = store_request(services, req, str(context.transfer_syntax[0]),
                               self.assoc.requestor.ae_title)
        if not self.assoc.is_established:
            return  # aborted meanwhile: nobody to answer
        if isinstance(status, Dataset):
            code, comment = int(status.Status), status.get("ErrorComment")
        else:
            code, comment = int(status), None
        command = wire.response_command(
            C_STORE_RSP, str(req.AffectedSOPClassUID or ""), int(req.MessageID or 0), code,
            False, comment, sop_instance_uid=str(req.AffectedSOPInstanceUID or ""))
        wire.ResponseWriter(self.assoc, int(context.context_id or 0)).message(command, last=True)


def answer_invalid_store(assoc: Association, msg: Any, context_id: int) -> bool:
    """Answer a C-STORE request pynetdicom would drop; True when it was answered.

    pynetdicom ignores a C-STORE-RQ that lacks a required command field (an empty
    Affected SOP Instance UID, say): no response and no abort, so the sender waits for
    its DIMSE timeout, forever with dcmtk's defaults.  It gets 0117 (Invalid SOP
    Instance, PS3.7 C.5.7) here instead.
    """
    from pynetdicom.dimse_primitives import C_STORE

    if not isinstance(msg, C_STORE) or msg.is_valid_request or msg.MessageID is None:
        return False
    command = wire.response_command(
        C_STORE_RSP, str(msg.AffectedSOPClassUID or ""), int(msg.MessageID), 0x0117, False,
        "the command's Affected SOP Instance UID is missing or invalid",
        sop_instance_uid=str(msg.AffectedSOPInstanceUID or "") or None)
    wire.ResponseWriter(assoc, context_id).message(command, last=True)
    return True
