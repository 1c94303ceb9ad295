"""Build small, valid Part 10 objects with chosen attributes (for known query answers)."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_instance(**attributes: object) -> bytes:
    """A CT Image Storage object (4x4 pixels) with ``attributes`` set by keyword.

    UIDs not given are generated; ``SpecificCharacterSet`` defaults to ISO_IR 192.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.PatientName = "DOE^JOHN"
    ds.StudyDate = "20150101"
    ds.StudyTime = "101010"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
