"""Storage Commitment Push Model SCP (PS3.4 Annex J): the N-ACTION and the
N-EVENT-REPORT's data set, as plain functions.

:func:`accept` answers a Storage Commitment Request (N-ACTION, PS3.4 J.3.2): it checks
the request, records it durably in the queue (:class:`pacs.core.commitment.Commitments`)
and only then answers Success; the referenced instances are verified and the result
reported afterwards (:mod:`pacs.dimse.reports`).  :func:`event_information` is the
Storage Commitment Result's Event Information (PS3.4 J.3.3, Table J.3-2).  pynetdicom's
public handlers (:func:`pacs.dimse.handlers.handle_n_action`) feed :func:`accept`
with the seam and without it: the seam replaces no part of this service.

N-ACTION statuses (PS3.7 10.1.4.1.10):

* ``0124`` (Refused: not authorized, a general status, PS3.7 C.5.21) the calling AE
  lacks the ``store`` right of the called customer's access rules
  (:mod:`pacs.core.access`): a requestor asks about instances it stored, so it needs
  the right to store them; checked before the request is read, and nothing is
  recorded or reported;
* ``0122`` (Refused: SOP Class not supported) the request came on a presentation
  context of another abstract syntax than the Push Model (a message's SOP Class is
  its context's, PS3.8 9.3.2.2): recorded, its result could not go back there;
* ``0118`` the Requested SOP Class is not the Push Model, ``0112`` the Requested SOP
  Instance is not its well-known instance (PS3.4 J.3.5), ``0123`` an Action Type ID
  other than 1;
* ``0115`` Action Information missing or unreadable, no Transaction UID, no reference,
  a UID that is not one (PS3.5 9.1), or the Transaction UID of a waiting request of
  the requestor's with other references (one Transaction UID names one request; a
  request repeating one that waits, references and all, is answered Success and by
  that one's report);
* ``0213`` more than ``PACS_COMMITMENT_MAX_REFERENCES`` references, or
  ``PACS_COMMITMENT_MAX_PENDING`` results waiting already;
* ``0110`` the request could not be recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pacs.core.access import STORE, AccessPolicy
from pacs.core.commitment import (
    PUSH_MODEL,
    PUSH_MODEL_INSTANCE,
    Commitments,
    Pending,
    Reference,
    Request,
    Result,
)
from pacs.core.dataset import valid_uid
from pacs.core.errors import PacsError
from pacs.dimse.audit import AssociationAudit
from pacs.dimse.identifier import read_data_set
from pacs.dimse.status import (
    COMMITMENT_STATUS,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORIZED,
    RESOURCE_LIMITATION,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    Status,
    status_for,
)

log = logging.getLogger(__name__)

#: The Action Type ID of a Storage Commitment Request (PS3.4 J.3.2, Table J.3-1).
REQUEST_STORAGE_COMMITMENT = 1

#: Encoded bytes one reference may take: an item (8 + 8 delimiter bytes) holding what
#: PS3.4 Table J.3-1 lets it hold: the Referenced SOP Class and Instance UIDs and the
#: optional Storage Media File-Set UID, of at most 64 bytes each, and Storage Media
#: File-Set ID, an SH of at most 16 (each with at most 12 bytes of header).
REFERENCE_BYTES = 16 + 3 * (12 + 64) + (12 + 16)


@dataclass(frozen=True)
class ActionRequest:
    """An N-ACTION request (PS3.7 10.1.4.1) as the logic takes it.

    Attributes
    ----------
    message_id :
        Message ID (0000,0110).
    sop_class_uid, sop_instance_uid :
        Requested SOP Class UID (0000,0003) and Requested SOP Instance UID (0000,1001).
    action_type :
        Action Type ID (0000,1008), ``None`` when absent.
    action_information :
        The Action Information data set as received (``None``: none was sent).
    received :
        Bytes of Action Information that arrived (the seam keeps none past the object
        limit, :class:`pacs.dimse.limits.CappedBuffer`).
    transfer_syntax :
        The transfer syntax of the request's presentation context.
    calling_ae_title :
        The requestor's AE title.
    called_ae_title :
        The node's AE title on the association (the customer's title it was called by).
    abstract_syntax :
        The abstract syntax of the request's presentation context.
    calling_address :
        The requestor's network address (``""``: not known).
    """

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    action_type: int | None
    action_information: bytes | None
    received: int
    transfer_syntax: str
    calling_ae_title: str
    called_ae_title: str = ""
    abstract_syntax: str = PUSH_MODEL
    calling_address: str = ""


class Reports(Protocol):
    """Who delivers the results of recorded requests (:class:`pacs.dimse.reports.Reporter`),
    told by the association's handlers."""

    def expect(self, assoc: Any, message_id: int, pending: Pending) -> None:
        """A request was recorded; its N-ACTION response (``message_id``) follows."""

    def answered(self, assoc: Any, message_id: int) -> None:
        """The N-ACTION response ``message_id`` of ``assoc`` is on its way."""

    def associated(self, assoc: Any) -> None:
        """``assoc`` is established: results may go on it when it is its requestor's."""


class Refused(Exception):
    """An N-ACTION refused with :attr:`status`."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status.with_comment(reason)


def max_action_bytes(max_references: int) -> int:
    """Bytes of Action Information read at most: ``max_references`` references and a
    little more (a Transaction UID, the sequence's header, a few optional attributes)."""
    return 4096 + REFERENCE_BYTES * max_references


def request_of(action: ActionRequest, max_references: int) -> Request:
    """The Storage Commitment Request an N-ACTION carries (its Transaction UID empty
    when absent or invalid; the queue refuses it, :meth:`Commitments.check`).

    Raises
    ------
    Refused
        With the N-ACTION status (module docstring).
    """
    if action.abstract_syntax != PUSH_MODEL:
        # A message's SOP Class is its presentation context's (PS3.7 10.1.4, PS3.8
        # 9.3.2.2): a request on another context (Verification, a storage class) was
        # recorded, its result then undeliverable there.
        raise Refused(SOP_CLASS_NOT_SUPPORTED,
                      "not on a Storage Commitment Push Model presentation context")
    if action.sop_class_uid != PUSH_MODEL:
        raise Refused(NO_SUCH_SOP_CLASS, "not the Storage Commitment Push Model SOP Class")
    if action.sop_instance_uid != PUSH_MODEL_INSTANCE:
        raise Refused(NO_SUCH_SOP_INSTANCE, "not the Push Model's well-known instance")
    if action.action_type != REQUEST_STORAGE_COMMITMENT:
        raise Refused(NO_SUCH_ACTION, "Action Type ID must be 1")
    if action.received > max_action_bytes(max_references):
        raise Refused(RESOURCE_LIMITATION, f"more than {max_references} references")
    if not action.action_information:
        raise Refused(INVALID_ARGUMENT_VALUE, "no Action Information")
    try:
        information = read_data_set(action.action_information, action.transfer_syntax)
        transaction = _uid(information.get("TransactionUID"))
        references = tuple(Reference(_uid(item.get("ReferencedSOPClassUID")),
                                     _uid(item.get("ReferencedSOPInstanceUID")))
                           for item in information.get("ReferencedSOPSequence") or [])
    except Exception:  # noqa: BLE001 - whatever pydicom raises is a bad argument
        raise Refused(INVALID_ARGUMENT_VALUE, "the Action Information does not decode"
                      ) from None
    if any(not (ref.sop_class_uid and ref.sop_instance_uid) for ref in references):
        raise Refused(INVALID_ARGUMENT_VALUE, "a reference without valid SOP Class and "
                                              "Instance UIDs")
    return Request(action.calling_ae_title.strip(), transaction, references,
                   action.called_ae_title.strip(), action.calling_address)


def _uid(value: object) -> str:
    """A UID value as text, ``""`` when absent or not a valid UID."""
    text = str(value or "").strip("\0 ")
    return text if valid_uid(text) else ""


def not_authorized(access: AccessPolicy, calling_ae: str) -> Refused | None:
    """0124 when ``calling_ae`` lacks the ``store`` right (module docstring)."""
    if access.may(calling_ae, STORE):
        return None
    return Refused(NOT_AUTHORIZED, "this AE may not store, so it may not ask for "
                                   "storage commitment")


def accept(commitments: Commitments, access: AccessPolicy, action: ActionRequest,
           audit: AssociationAudit | None = None) -> tuple[Status, Pending | None]:
    """Answer a Storage Commitment Request: its status, and the request recorded and
    claimed by the caller when it is Success (PS3.4 J.3.2.1.3: Success means the
    request was received and will be processed; none is claimed when the request
    repeats one that waits, whose report answers it).

    ``commitments`` and ``access`` are the called customer's: its queue, whose
    verification looks in its index and store only, and its access rules.  The request
    is durable before Success is returned; the association's ``audit`` gets the request
    and its status.
    """
    pending: Pending | None = None
    references = 0
    try:
        refused = not_authorized(access, action.calling_ae_title)
        if refused is not None:
            raise refused
        request = request_of(action, commitments.max_references)
        references = len(request.references)
        pending = commitments.record(request)
        status = SUCCESS
        log.info("storage commitment request from %s: %d instance(s)%s",
                 action.calling_ae_title, references,
                 "" if pending is not None else ", the same as one that waits")
    except Refused as refused:
        status = refused.status
    except PacsError as exc:
        status = status_for(COMMITMENT_STATUS, exc)
    except Exception as exc:  # answered with a status, never a crash
        log.exception("storage commitment request from %s failed unexpectedly",
                      action.calling_ae_title)
        status = status_for(COMMITMENT_STATUS, exc)
    if status != SUCCESS:
        log.warning("storage commitment request from %s refused: %04X %s",
                    action.calling_ae_title, status.code, status.comment or "")
    if audit is not None:
        audit.commitment_requested(references, status)
    return status, pending


def event_information(transaction_uid: str, result: Result, retrieve_ae: str) -> Dataset:
    """The Event Information of a Storage Commitment Result (PS3.4 J.3.3, Table J.3-2):
    the Transaction UID, the committed instances (Referenced SOP Sequence, retrievable
    from ``retrieve_ae``) and the failed ones with their Failure Reason (Failed SOP
    Sequence)."""
    information = Dataset()
    information.TransactionUID = transaction_uid
    if result.committed:
        # Outside the sequence: every committed instance is retrievable from the node.
        information.RetrieveAETitle = retrieve_ae
        information.ReferencedSOPSequence = _items(result.committed)
    if result.failed:
        failed = _items([ref for ref, _ in result.failed])
        for item, (_, reason) in zip(failed, result.failed, strict=True):
            item.FailureReason = reason
        information.FailedSOPSequence = failed
    return information


def _items(references: Sequence[Reference]) -> DicomSequence:
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    return DicomSequence(items)
