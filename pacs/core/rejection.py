"""IOCM rejection notes: what a Key Object Selection Document titled with a rejection
reason asks the archive to remove.

IHE Imaging Object Change Management (RAD TF-1 37, RAD TF-2 4.66) has a Change
Requester send a Key Object Selection Document (SOP Class
1.2.840.10008.5.1.4.1.1.88.59, PS3.3 A.35.4) whose root Concept Name Code Sequence
(0040,A043), the document title, is one of PS3.16 CID 7010 "Key Object Selection
Document Title" that means rejection:

======  ======  =====================================  ===============================
code    scheme  meaning                                 sent again afterwards
======  ======  =====================================  ===============================
113001  DCM     Rejected for Quality Reasons            refused (A771 / HTTP 409)
113037  DCM     Rejected for Patient Safety Reasons     refused
113038  DCM     Incorrect Modality Worklist Entry       refused
113039  DCM     Data Retention Policy Expired           accepted: stored again
======  ======  =====================================  ===============================

The instances it rejects are those of its Current Requested Procedure Evidence
Sequence (0040,A375): per study, per series (Referenced Series Sequence), the
Referenced SOP Sequence (PS3.3 C.17.2).  RAD TF-2 4.66.4 says the Image Manager "shall
not accept subsequent occurrence" of instances hidden for patient safety or a wrong
worklist entry, and may stop applying a retention expiry to instances received again;
quality rejections are refused again too, as dcm4chee-arc does by default (a
modality that re-sends its whole study would otherwise bring the rejected image back).
The note itself is an ordinary instance: stored, found and retrieved as any other.

This module only reads the note (:func:`rejection_of`, called by the ingest's analysis);
:mod:`pacs.core.deletion` applies it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs.core.dataset import Instance, require_uid
from pacs.core.errors import InvalidRejection, InvalidUID

#: Key Object Selection Document Storage (PS3.4 B.5).
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"

#: The most instances one note may reject: the note is applied while its sender waits
#: for the answer, and this bounds that work (a CT study of several thousand images
#: fits; a larger change is sent as several notes).
MAX_REFERENCES = 10_000

#: The status of an instance sent again after a rejection that refuses it: C-STORE
#: status and STOW-RS Failure Reason, as dcm4chee-arc answers it (an A7xx code, which
#: other SCUs may read as out of resources: a forwarding destination that answers it
#: refuses the instance for good, :mod:`pacs.core.forwarding`).
REFUSED_AGAIN = 0xA771


@dataclass(frozen=True)
class Reason:
    """A coded rejection reason (CID 7010): code value, coding scheme, meaning."""

    code: str
    scheme: str
    meaning: str

    @property
    def refuses_again(self) -> bool:
        """True when instances rejected for this reason are refused when sent again
        (see the module docstring)."""
        return self != DATA_RETENTION_EXPIRED

    def __str__(self) -> str:
        return f"({self.code}, {self.scheme}, \"{self.meaning}\")"


QUALITY = Reason("113001", "DCM", "Rejected for Quality Reasons")
PATIENT_SAFETY = Reason("113037", "DCM", "Rejected for Patient Safety Reasons")
WRONG_WORKLIST_ENTRY = Reason("113038", "DCM", "Incorrect Modality Worklist Entry")
DATA_RETENTION_EXPIRED = Reason("113039", "DCM", "Data Retention Policy Expired")

#: The rejection titles of CID 7010, by (code value, coding scheme designator).
REASONS: dict[tuple[str, str], Reason] = {
    (reason.code, reason.scheme): reason
    for reason in (QUALITY, PATIENT_SAFETY, WRONG_WORKLIST_ENTRY, DATA_RETENTION_EXPIRED)}


def reason_of(code: str, scheme: str) -> Reason | None:
    """The rejection reason with this code value and scheme, or ``None``."""
    return REASONS.get((code.strip(), scheme.strip()))


def refuses_again(code: str, scheme: str) -> bool:
    """True when a tombstone's reason (empty for a plain deletion) refuses the instance
    when it is sent again."""
    reason = reason_of(code, scheme)
    return reason is not None and reason.refuses_again


@dataclass(frozen=True)
class Reference:
    """One instance a note rejects, by the UIDs of its place in the hierarchy."""

    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Rejection:
    """What a rejection note asks: its reason, and the instances it names."""

    reason: Reason
    references: tuple[Reference, ...]


def rejection_of(instance: Instance) -> Rejection | None:
    """The rejection a received object asks for, or ``None`` when it is no rejection
    note (another SOP class, or a Key Object Selection with another title).

    Parameters
    ----------
    instance : Instance
        The object read (a Key Object Selection has no pixel data); its header is
        read only when it is a Key Object Selection, and a note never rejects itself.

    Raises
    ------
    InvalidRejection
        A rejection note with an invalid UID in its evidence, or more than
        :data:`MAX_REFERENCES` references.
    """
    if instance.sop_class_uid != KEY_OBJECT_SELECTION:
        return None
    header, sop_uid = instance.header, instance.sop_instance_uid
    titles = _items(header, "ConceptNameCodeSequence")
    if len(titles) != 1:
        return None
    reason = reason_of(str(titles[0].get("CodeValue", "")),
                       str(titles[0].get("CodingSchemeDesignator", "")))
    if reason is None:
        return None
    references: dict[str, Reference] = {}
    try:
        for reference in _evidence(header):
            if reference.sop_uid != sop_uid:
                references.setdefault(reference.sop_uid, reference)
            if len(references) > MAX_REFERENCES:
                raise InvalidRejection(
                    f"the rejection note references more than {MAX_REFERENCES} instances")
    except InvalidUID as exc:
        raise InvalidRejection(f"rejection note: {exc}") from None
    return Rejection(reason, tuple(references.values()))


def _items(dataset: Dataset, keyword: str) -> list[Dataset]:
    """The items of sequence ``keyword`` of ``dataset``.

    Raises
    ------
    InvalidRejection
        The element is not a sequence of items (text where a sequence belongs: it
        failed as a defect of the node's, its traceback logged for each such note).
    """
    value = dataset.get(keyword)
    if not value:
        return []
    if not isinstance(value, Sequence) or not all(
            isinstance(item, Dataset) for item in value):
        raise InvalidRejection(f"rejection note: {keyword} is not a sequence of items")
    return list(value)


def _evidence(header: Dataset) -> Iterator[Reference]:
    """The Current Requested Procedure Evidence Sequence's references (PS3.3
    C.17.2.1), each UID validated."""
    for study in _items(header, "CurrentRequestedProcedureEvidenceSequence"):
        study_uid = require_uid(study.get("StudyInstanceUID"), "a referenced Study UID")
        for series in _items(study, "ReferencedSeriesSequence"):
            series_uid = require_uid(series.get("SeriesInstanceUID"),
                                     "a referenced Series UID")
            for item in _items(series, "ReferencedSOPSequence"):
                yield Reference(study_uid, series_uid, require_uid(
                    item.get("ReferencedSOPInstanceUID"), "a Referenced SOP Instance UID"))
