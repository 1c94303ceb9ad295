"""THE attribute table: every key the index stores and the query engine matches.

One row per attribute: keyword, tag, level, VR, key type, column.  The index schema,
the value extraction at ingest, the query compiler and the response builders all read
this table; nothing else lists attributes.

Key types are those of the Patient Root and Study Root Query/Retrieve information
models (PS3.4 C.6.1.1 and C.6.2.1): ``U`` unique, ``R`` required, ``O`` optional.
Computed attributes are the additional Query/Retrieve attributes of PS3.4 C.3.4
(Table C.3-1); they have no column and are computed by the query compiler.

Attributes of patients are attributes of studies (PS3.4 C.3.2), and two studies of
one Patient ID may carry different names or birth dates.  A patient attribute marked
``per_study`` therefore has a column in two tables: the study row keeps the value as
sent in that study, which every query at STUDY level and below reads and matches
(:func:`table_of`); the patient row keeps the latest value received, so that the
Patient Root PATIENT level (PS3.4 C.6.1.1) answers one row per patient with the values
received last.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(enum.Enum):
    """Query/Retrieve levels (PS3.4 C.6), with the index table that holds each."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    IMAGE = "instance"

    # Members are singletons, equal only to themselves: hashed by identity in C, not by
    # Enum's hash of the name in Python (levels key the dictionaries of every ingest).
    __hash__ = object.__hash__

    @property
    def table(self) -> str:
        """The index table of this level."""
        return self.value

    @property
    def depth(self) -> int:
        """0 for PATIENT down to 3 for IMAGE."""
        return _DEPTH[self]


#: Each level's depth, in the order of the enumeration (read for every key of every
#: query: a table, not a search of the members).
_DEPTH = {level: depth for depth, level in enumerate(Level)}


@dataclass(frozen=True)
class Attribute:
    """One attribute of the index.

    Attributes
    ----------
    keyword, tag, vr :
        As in PS3.6.
    level :
        The entity that holds the value.
    key :
        ``U``, ``R`` or ``O`` (PS3.4 C.6.1.1 / C.6.2.1 tables).
    column :
        Index column, or ``None`` for computed attributes.
    multi :
        Values may be multiple (stored joined by ``\\``; PS3.4 C.2.2.3 matching).
    per_study :
        A patient attribute whose value each study row also holds, as sent in that
        study (PS3.4 C.3.2; see the module docstring and :func:`table_of`).
    """

    keyword: str
    tag: int
    level: Level
    vr: str
    key: str
    column: str | None
    multi: bool = False
    per_study: bool = False

    @property
    def computed(self) -> bool:
        """True for the computed attributes of PS3.4 C.3.4."""
        return self.column is None

    @property
    def matched(self) -> bool:
        """True when a value of this key is matched: every stored attribute, and the
        computed ones that summarise a stored one (:data:`MATCHED_AS`); the counts
        are returned, never matched."""
        return not self.computed or self.keyword in MATCHED_AS


#: Matching on a computed attribute is matching on the stored attribute it summarises.
MATCHED_AS = {"ModalitiesInStudy": "Modality", "SOPClassesInStudy": "SOPClassUID"}


P, S, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

ATTRIBUTES: tuple[Attribute, ...] = (
    # Patient level (PS3.4 Table C.6-1; in Study Root these sit at STUDY level, C.6-5):
    # each one with a column is kept per study as well (PS3.4 C.3.2).
    Attribute("PatientName", 0x00100010, P, "PN", "R", "patient_name", per_study=True),
    Attribute("PatientID", 0x00100020, P, "LO", "U", "patient_id", per_study=True),
    Attribute("IssuerOfPatientID", 0x00100021, P, "LO", "O", "issuer_of_patient_id",
              per_study=True),
    Attribute("PatientBirthDate", 0x00100030, P, "DA", "O", "patient_birth_date",
              per_study=True),
    Attribute("PatientBirthTime", 0x00100032, P, "TM", "O", "patient_birth_time",
              per_study=True),
    Attribute("PatientSex", 0x00100040, P, "CS", "O", "patient_sex", per_study=True),
    Attribute("OtherPatientIDs", 0x00101000, P, "LO", "O", "other_patient_ids",
              multi=True, per_study=True),
    Attribute("EthnicGroup", 0x00102160, P, "SH", "O", "ethnic_group", per_study=True),
    Attribute("PatientComments", 0x00104000, P, "LT", "O", "patient_comments",
              per_study=True),
    Attribute("NumberOfPatientRelatedStudies", 0x00201200, P, "IS", "O", None),
    Attribute("NumberOfPatientRelatedSeries", 0x00201202, P, "IS", "O", None),
    Attribute("NumberOfPatientRelatedInstances", 0x00201204, P, "IS", "O", None),
    # Study level (PS3.4 Table C.6-2).
    Attribute("StudyInstanceUID", 0x0020000D, S, "UI", "U", "study_uid"),
    Attribute("StudyDate", 0x00080020, S, "DA", "R", "study_date"),
    Attribute("StudyTime", 0x00080030, S, "TM", "R", "study_time"),
    Attribute("AccessionNumber", 0x00080050, S, "SH", "R", "accession_number"),
    Attribute("StudyID", 0x00200010, S, "SH", "R", "study_id"),
    Attribute("ReferringPhysicianName", 0x00080090, S, "PN", "O", "referring_physician_name"),
    Attribute("StudyDescription", 0x00081030, S, "LO", "O", "study_description"),
    Attribute("NameOfPhysiciansReadingStudy", 0x00081060, S, "PN", "O",
              "physicians_reading_study", multi=True),
    Attribute("AdmittingDiagnosesDescription", 0x00081080, S, "LO", "O",
              "admitting_diagnoses", multi=True),
    Attribute("PatientAge", 0x00101010, S, "AS", "O", "patient_age"),
    Attribute("PatientSize", 0x00101020, S, "DS", "O", "patient_size"),
    Attribute("PatientWeight", 0x00101030, S, "DS", "O", "patient_weight"),
    Attribute("TimezoneOffsetFromUTC", 0x00080201, S, "SH", "O", "timezone_offset"),
    Attribute("ProcedureCodeSequence", 0x00081032, S, "SQ", "O", "procedure_codes"),
    Attribute("ModalitiesInStudy", 0x00080061, S, "CS", "O", None, multi=True),
    Attribute("SOPClassesInStudy", 0x00080062, S, "UI", "O", None, multi=True),
    Attribute("NumberOfStudyRelatedSeries", 0x00201206, S, "IS", "O", None),
    Attribute("NumberOfStudyRelatedInstances", 0x00201208, S, "IS", "O", None),
    # Series level (PS3.4 Table C.6-3).
    Attribute("SeriesInstanceUID", 0x0020000E, SE, "UI", "U", "series_uid"),
    Attribute("Modality", 0x00080060, SE, "CS", "R", "modality"),
    Attribute("SeriesNumber", 0x00200011, SE, "IS", "R", "series_number"),
    Attribute("SeriesDescription", 0x0008103E, SE, "LO", "O", "series_description"),
    Attribute("SeriesDate", 0x00080021, SE, "DA", "O", "series_date"),
    Attribute("SeriesTime", 0x00080031, SE, "TM", "O", "series_time"),
    Attribute("BodyPartExamined", 0x00180015, SE, "CS", "O", "body_part_examined"),
    Attribute("ProtocolName", 0x00181030, SE, "LO", "O", "protocol_name"),
    Attribute("Laterality", 0x00200060, SE, "CS", "O", "laterality"),
    Attribute("PerformedProcedureStepStartDate", 0x00400244, SE, "DA", "O", "pps_start_date"),
    Attribute("PerformedProcedureStepStartTime", 0x00400245, SE, "TM", "O", "pps_start_time"),
    Attribute("InstitutionName", 0x00080080, SE, "LO", "O", "institution_name"),
    Attribute("StationName", 0x00081010, SE, "SH", "O", "station_name"),
    Attribute("Manufacturer", 0x00080070, SE, "LO", "O", "manufacturer"),
    Attribute("OperatorsName", 0x00081070, SE, "PN", "O", "operators_name", multi=True),
    Attribute("PerformingPhysicianName", 0x00081050, SE, "PN", "O",
              "performing_physician_name", multi=True),
    Attribute("RequestAttributesSequence", 0x00400275, SE, "SQ", "O", "request_attributes"),
    Attribute("NumberOfSeriesRelatedInstances", 0x00201209, SE, "IS", "O", None),
    # Composite object instance level (PS3.4 Table C.6-4).
    Attribute("SOPInstanceUID", 0x00080018, IM, "UI", "U", "sop_uid"),
    Attribute("InstanceNumber", 0x00200013, IM, "IS", "R", "instance_number"),
    Attribute("SOPClassUID", 0x00080016, IM, "UI", "O", "sop_class_uid"),
    Attribute("ContentDate", 0x00080023, IM, "DA", "O", "content_date"),
    Attribute("ContentTime", 0x00080033, IM, "TM", "O", "content_time"),
    Attribute("AcquisitionNumber", 0x00200012, IM, "IS", "O", "acquisition_number"),
    Attribute("ImageType", 0x00080008, IM, "CS", "O", "image_type", multi=True),
    Attribute("NumberOfFrames", 0x00280008, IM, "IS", "O", "number_of_frames"),
    Attribute("Rows", 0x00280010, IM, "US", "O", "rows"),
    Attribute("Columns", 0x00280011, IM, "US", "O", "columns"),
    Attribute("BitsAllocated", 0x00280100, IM, "US", "O", "bits_allocated"),
    Attribute("PhotometricInterpretation", 0x00280004, IM, "CS", "O", "photometric"),
    Attribute("CompletionFlag", 0x0040A491, IM, "CS", "O", "completion_flag"),
    Attribute("VerificationFlag", 0x0040A493, IM, "CS", "O", "verification_flag"),
)

#: Item attributes kept for each sequence attribute (PS3.4 C.2.2.2.6 sequence matching).
#: Their ``column`` is the key of the item in the stored JSON (the keyword).
ITEM_KEYS: dict[str, tuple[Attribute, ...]] = {
    "ProcedureCodeSequence": (
        Attribute("CodeValue", 0x00080100, S, "SH", "O", "CodeValue"),
        Attribute("CodingSchemeDesignator", 0x00080102, S, "SH", "O", "CodingSchemeDesignator"),
        Attribute("CodingSchemeVersion", 0x00080103, S, "SH", "O", "CodingSchemeVersion"),
        Attribute("CodeMeaning", 0x00080104, S, "LO", "O", "CodeMeaning"),
    ),
    "RequestAttributesSequence": (
        Attribute("AccessionNumber", 0x00080050, SE, "SH", "O", "AccessionNumber"),
        Attribute("RequestedProcedureID", 0x00401001, SE, "SH", "O", "RequestedProcedureID"),
        Attribute("ScheduledProcedureStepID", 0x00400009, SE, "SH", "O",
                  "ScheduledProcedureStepID"),
        Attribute("RequestedProcedureDescription", 0x00321060, SE, "LO", "O",
                  "RequestedProcedureDescription"),
        Attribute("ScheduledProcedureStepDescription", 0x00400007, SE, "LO", "O",
                  "ScheduledProcedureStepDescription"),
    ),
}

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}

#: Keys Required in the Study Root model (PS3.4 Table C.6-5) that the table, which
#: marks the key type of the Patient Root model, marks otherwise: Patient ID, Unique at
#: the PATIENT level there (Table C.6-1), Required at the STUDY level here.
STUDY_ROOT_REQUIRED: tuple[str, ...] = ("PatientID",)
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}

#: The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
UNIQUE_KEY: dict[Level, Attribute] = {
    a.level: a for a in ATTRIBUTES if a.key == "U"
}

# The hierarchy of the index, declared once: the schema, the writer and the query
# compiler read it.

#: The level above each level but PATIENT (PS3.4 C.6: patient, study, series, image).
PARENT: dict[Level, Level] = {level: list(Level)[level.depth - 1]
                              for level in Level if level is not Level.PATIENT}
#: The column of a row that names its parent's row (``study.patient_pk``).
PARENT_KEY: dict[Level, str] = {level: f"{parent.table}_pk" for level, parent in PARENT.items()}
#: The column that identifies a row of each level: its unique key's column; the patient
#: has no UID, so its key is derived at ingest (``pacs.core.ingest.patient_key``).
IDENTITY: dict[Level, str] = {
    level: "patient_key" if level is Level.PATIENT else str(UNIQUE_KEY[level].column)
    for level in Level
}


def stored(level: Level) -> tuple[Attribute, ...]:
    """The attributes of ``level`` that have an index column, in table order."""
    return tuple(a for a in ATTRIBUTES if a.level is level and not a.computed)


def table_attributes(level: Level) -> tuple[Attribute, ...]:
    """The attributes with a column in ``level``'s table: its own (:func:`stored`) and,
    in the study table, the study's copies of the ``per_study`` patient attributes."""
    own = stored(level)
    if level is not Level.STUDY:
        return own
    return tuple(a for a in stored(Level.PATIENT) if a.per_study) + own


def table_of(attribute: Attribute, query_level: Level) -> Level:
    """The level whose table holds the value of ``attribute`` that a query at
    ``query_level`` reads and matches.

    At STUDY level and below, a ``per_study`` patient attribute is the study's own
    value (PS3.4 C.3.2; in Study Root the patient's keys are keys of the study,
    C.6.2.1); at PATIENT level it is the patient row's latest value (C.6.1.1).
    """
    if attribute.per_study and query_level.depth >= Level.STUDY.depth:
        return Level.STUDY
    return attribute.level


def case_folded_column(attribute: Attribute) -> str | None:
    """The companion column holding a case-folded copy of a PN value, if any.

    PN values are matched case-insensitively by default (PS3.4 C.2.2.2.1 lets the SCP
    choose, and Orthanc and dcm4chee both do so); the folded copy keeps that an index
    lookup instead of a function call per row.
    """
    return f"{attribute.column}_folded" if attribute.vr == "PN" and attribute.column else None
