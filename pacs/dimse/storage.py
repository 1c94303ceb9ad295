"""The C-STORE SCP (PS3.4 B.2.3): store through the ingest path, then the status.

:func:`store` is the whole logic: the received data set becomes a Part 10 object
(:func:`part10`) that :meth:`pacs.core.ingest.Ingest.store_bytes` stores; Success is
returned only once the object and its index row are durable.  The seam writes the
response itself (:mod:`pacs.dimse.seam.services`); without the seam pynetdicom's
EVT_C_STORE handler returns the same status (:func:`pacs.dimse.handlers.handle_store`).

======  ====================================================================
0000    stored, or the same object was already stored, or kept-first policy
0117    invalid SOP Instance UID (also any other identifying UID)
0111    a different object under a stored UID and the policy is ``reject``, or
        the calling AE lacks the ``overwrite`` right (nothing is changed)
0124    the calling AE lacks the ``store`` right (:mod:`pacs.core.access`), or the
        ``reject`` right for an IOCM rejection note (nothing of it is stored)
A900    the command's SOP Class / Instance UIDs differ from the data set's
C000    the data set does not parse or is truncated
A700    over PACS_MAX_OBJECT_BYTES, or the store or the index failed (nothing
        half-written remains)
0110    any other failure
======  ====================================================================
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacs.core.access import OVERWRITE, REJECT, STORE
from pacs.core.errors import (
    Exhausted,
    InvalidInstance,
    NotAuthorized,
    ObjectTooLarge,
    PacsError,
    UnreadableData,
    logged_by_core,
)
from pacs.core.ingest import TRANSFER_ACTION, StoreResult
from pacs.dimse.status import (
    NOT_AUTHORIZED,
    SOP_CLASS_NOT_SUPPORTED,
    STORE_STATUS,
    SUCCESS,
    Status,
    status_for,
)

if TYPE_CHECKING:
    from pacs.core.services import Services
    from pacs.dimse.audit import AssociationAudit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE request (PS3.7 9.1.1) as the logic needs it.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid :
        Affected SOP Class UID (0000,0002) and Affected SOP Instance UID (0000,1000).
    transfer_syntax :
        The transfer syntax of the request's presentation context.
    abstract_syntax :
        The SOP Class of the request's presentation context.
    calling_ae_title :
        The sender's AE title.
    data_set :
        The data set as received (empty when it was not kept, see ``received``).
    received :
        Bytes of data set received; more than ``data_set`` holds when the data set
        passed ``limit`` while it arrived and was not kept.
    limit :
        PACS_MAX_OBJECT_BYTES.
    exhausted :
        The data set was dropped as it arrived: the worker held
        ``PACS_DIMSE_RECEIVE_BYTES`` of data sets already
        (:class:`pacs.dimse.limits.ReceiveBudget`).
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    abstract_syntax: str
    calling_ae_title: str
    data_set: bytes
    received: int
    limit: int
    exhausted: bool = False

    @property
    def too_large(self) -> bool:
        """The data set is over the object limit (answered A700, nothing stored)."""
        return self.limit > 0 and self.received > self.limit


def store(services: Services, request: StoreRequest,
          audit: AssociationAudit | None = None) -> Status:
    """Store the data set of a C-STORE request; the status to answer, also reported to
    the association's ``audit`` (:mod:`pacs.dimse.audit`) with the instance's study
    and the patient it names."""
    status, result = _store(services, request)
    if audit is not None:
        if result is None:
            audit.stored("", request.sop_class_uid, status)
        else:
            audit.stored(result.study_uid, request.sop_class_uid, status,
                         TRANSFER_ACTION[result.outcome], result.patient)
    return status


def _store(services: Services, request: StoreRequest) -> tuple[Status, StoreResult | None]:
    """The status, and what storing the instance did (``None`` on failure)."""
    calling = request.calling_ae_title
    if request.sop_class_uid != request.abstract_syntax:
        log.warning("C-STORE from %s refused: its SOP Class is not its context's", calling)
        return SOP_CLASS_NOT_SUPPORTED.with_comment(
            "the Affected SOP Class UID is not its presentation context's"), None
    policy = services.access
    if not policy.may(calling, STORE):
        log.warning("C-STORE from %s refused: the AE may not store", calling)
        return NOT_AUTHORIZED.with_comment("this AE may not store"), None
    if request.exhausted:
        log.warning("C-STORE from %s refused: the worker holds PACS_DIMSE_RECEIVE_BYTES "
                    "of data sets being received", calling)
        return status_for(STORE_STATUS, Exhausted(
            "the node is receiving too much at once; retry later")), None
    try:
        if request.too_large:
            raise ObjectTooLarge(f"a data set of {request.received} bytes, over "
                                 f"PACS_MAX_OBJECT_BYTES ({request.limit})")
        check_no_file_meta(request.data_set, request.transfer_syntax)
        result = services.ingest.store_bytes(
            part10(request), calling_ae=calling,
            expected=(request.sop_class_uid, request.sop_instance_uid),
            may_overwrite=policy.may(calling, OVERWRITE),
            may_reject=policy.may(calling, REJECT))
    except (InvalidInstance, NotAuthorized) as exc:
        log.warning("C-STORE from %s refused: %s", calling, exc)
        return status_for(STORE_STATUS, exc), None
    except PacsError as exc:  # a full intake: counted and logged by the ingest
        log.log(logging.DEBUG if logged_by_core(exc) else logging.ERROR,
                "C-STORE from %s failed: %s", calling, exc)
        return status_for(STORE_STATUS, exc), None
    except MemoryError as exc:
        return _out_of_memory(calling, exc), None
    except Exception as exc:
        log.exception("C-STORE from %s failed unexpectedly", calling)
        return status_for(STORE_STATUS, exc), None
    log.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling,
              result.outcome.value)
    return SUCCESS, result


def _out_of_memory(calling: str, exc: MemoryError) -> Status:
    """The status of a C-STORE that ran out of memory (a worker at its address space
    limit), logged as one line: the error's type says what happened, and nothing of the
    data set (a MemoryError's message may quote a size, never a value; it is left out
    all the same).  Its traceback helps a developer only, at DEBUG: at the default level
    a flood of stores into a full worker would otherwise log a trace per store."""
    found = status_for(STORE_STATUS, exc)
    log.error("C-STORE from %s failed: out of memory (MemoryError), answered %04X",
              calling, found.code)
    log.debug("C-STORE from %s: where the memory ran out", calling, exc_info=exc)
    return found


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


def check_no_file_meta(data_set: bytes | memoryview, transfer_syntax: str) -> None:
    """Refuse a data set that begins with File Meta Information elements.

    A data set holds no group 0002 element (PS3.5 7.1; PS3.4 C.4.1.1.3, note): the
    file meta of what is stored is the node's, from the command and the presentation
    context (:func:`part10`), and group 0002 elements after it would be read as more
    of it - another Transfer Syntax UID or SOP Instance UID than the data set's.  The
    elements are in ascending order (PS3.5 7.1.1): any such element comes first (in a
    deflated data set, inflated later, its elements are not read here).

    Raises
    ------
    UnreadableData
        The data set's first element is of group 0002 (C000).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # compressed bytes: their first two say nothing of a tag
    group = bytes(data_set[:2])
    if group == (b"\x00\x02" if transfer_syntax == ExplicitVRBigEndian else b"\x02\x00"):
        raise UnreadableData("the data set holds File Meta Information elements "
                             "(group 0002), which a data set does not (PS3.5 7.1)")


def part10(request: StoreRequest) -> bytes:
    """The received data set as a Part 10 object: preamble, file meta, data set bytes.

    The same bytes as pynetdicom's ``event.encoded_dataset(include_meta=True)``
    (the same file meta elements), built directly instead of through a pydicom
    data set and writer, which cost a noticeable share of a small instance's time.
    UIDs that are not ASCII are written with replacement characters; ingest then
    refuses them as invalid (0117).
    """
    elements = b"".join((_VERSION,
                         _element(0x0002, b"UI", _uid(request.sop_class_uid)),
                         _element(0x0003, b"UI", _uid(request.sop_instance_uid)),
                         _element(0x0010, b"UI", _uid(request.transfer_syntax)),
                         _IMPLEMENTATION))
    return b"".join((b"\0" * 128, b"DICM", struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4,
                                                       len(elements)),
                     elements, request.data_set))
