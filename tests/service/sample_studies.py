"""A small, varied archive for query tests: five studies of four patients built from
pydicom's bundled files (never downloaded), each with known UIDs and values.

=====  ==========================  ========  ========  =====================  =========
study  patient (PatientID)         date      modality  series (instances)     notes
=====  ==========================  ========  ========  =====================  =========
chest  DOE^JOHN (P1)               20150310  CT, SR    CT (3), SR (1)         ACC1
head   DOE^JOHN (P1)               20160704  MR        MR (2)                 ACC2
knee   Doe^Jane (P2)               20151231  MR        MR (1)                 lower case
greek  Διονύσιος (P3), ideographic  20170101  CT        CT (1)                 UTF-8 PN
blank  SMITH^ANNA (P4)             (none)    OT        OT (1)                 no date
=====  ==========================  ========  ========  =====================  =========
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from pacs.core.services import Services
from tests.conftest import sample

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
OT_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


@dataclass
class Series:
    """One series: its UID, modality and instance UIDs."""

    uid: str
    modality: str
    instances: list[str] = field(default_factory=list)


@dataclass
class Study:
    """One study of the archive."""

    name: str
    uid: str
    patient_id: str
    patient_name: str
    date: str
    accession: str
    series: list[Series] = field(default_factory=list)

    @property
    def instances(self) -> list[str]:
        return [sop for s in self.series for sop in s.instances]


@dataclass
class Archive:
    """The studies by name, plus every object's bytes by SOP Instance UID."""

    studies: dict[str, Study]
    objects: dict[str, bytes]

    def __getitem__(self, name: str) -> Study:
        return self.studies[name]

    def all_series(self) -> Iterator[tuple[Study, Series]]:
        for study in self.studies.values():
            for series in study.series:
                yield study, series


#: name: (PatientID, PatientName, StudyDate, Accession, [(modality, count)], base file)
LAYOUT: dict[str, tuple[str, str, str, str, list[tuple[str, int]], str]] = {
    "chest": ("P1", "DOE^JOHN", "20150310", "ACC1", [("CT", 3), ("SR", 1)], "CT_small.dcm"),
    "head": ("P1", "DOE^JOHN", "20160704", "ACC2", [("MR", 2)], "MR_small.dcm"),
    "knee": ("P2", "Doe^Jane", "20151231", "ACC3", [("MR", 1)], "MR_small.dcm"),
    "greek": ("P3", "Διονύσιος^Ανδρέας=山田^太郎=やまだ^たろう", "20170101", "ACC4",
              [("CT", 1)], "CT_small.dcm"),
    "blank": ("P4", "SMITH^ANNA", "", "", [("OT", 1)], "CT_small.dcm"),
}

_SOP_CLASS = {"SR": SR_CLASS, "OT": OT_CLASS}


def _instance(base: FileDataset, study: Study, series: Series, number: int) -> bytes:
    ds = base.copy()
    ds.file_meta = FileMetaDataset(base.file_meta)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.AccessionNumber = study.accession
    ds.StudyDescription = f"{study.name} study"
    ds.SeriesInstanceUID = series.uid
    ds.Modality = series.modality
    ds.SeriesNumber = len(study.series)
    ds.InstanceNumber = number
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    if series.modality in _SOP_CLASS:
        ds.SOPClassUID = _SOP_CLASS[series.modality]
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    series.instances.append(sop)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def build_archive() -> Archive:
    """Create the archive's objects (new UIDs on every call)."""
    studies: dict[str, Study] = {}
    objects: dict[str, bytes] = {}
    for name, (pid, patient, date, accession, layout, base_name) in LAYOUT.items():
        base = dcmread(sample(base_name))
        study = Study(name, generate_uid(), pid, patient, date, accession)
        studies[name] = study
        for modality, count in layout:
            series = Series(generate_uid(), modality)
            study.series.append(series)
            for number in range(1, count + 1):
                data = _instance(base, study, series, number)
                objects[series.instances[-1]] = data
    return Archive(studies, objects)


def load(services: Services) -> Archive:
    """Build the archive and store it through the ingest path."""
    archive = build_archive()
    for data in archive.objects.values():
        services.ingest.store_bytes(data, calling_ae="TEST")
    return archive
