"""Build small, valid Part 10 objects with chosen attributes (for known query answers)."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)


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
    return part10(ds)


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 object in ``transfer_syntax`` (Explicit VR Little Endian)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def relabelled(part10_bytes: bytes, transfer_syntax: str) -> bytes:
    """A Part 10 object with another Transfer Syntax UID in its file meta, its data set
    the same bytes (what a sender that labels its data wrongly sends)."""
    meta = dcmread(io.BytesIO(part10_bytes), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset_bytes(part10_bytes)


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 object: what follows the file meta group.

    Independent of the code under test: file meta elements are always explicit VR
    little endian, so they can be walked by their lengths.
    """
    assert part10[128:132] == b"DICM", "not a Part 10 object"
    position = 132
    while position + 8 <= len(part10):
        if int.from_bytes(part10[position:position + 2], "little") != 0x0002:
            break
        vr = part10[position + 4:position + 6]
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                  b"UR", b"UT", b"UV"):
            position += 12 + int.from_bytes(part10[position + 8:position + 12], "little")
        else:
            position += 8 + int.from_bytes(part10[position + 6:position + 8], "little")
    return part10[position:]


def uid_list_of_length(uids: list[str], length: int) -> list[str]:
    """``uids`` followed by made-up UIDs (matching nothing stored) such that the list,
    joined by ``\\``, is exactly ``length`` characters long: an even ``length`` is then
    the element's value length as encoded (PS3.5 7.1), with no padding."""
    head = len("\\".join(uids))
    # Fillers of 32 characters each (33 with their separator), then one last UID of
    # between 20 and 52 characters.
    count = (length - head - 1 - 20) // 33
    fillers = [f"1.2.826.0.1.3680043.8.498.{100000 + n}" for n in range(count)]
    last = length - head - 33 * count - 1
    listed = [*uids, *fillers, "1.2." + "9" * (last - 4)]
    assert len("\\".join(listed)) == length
    return listed


#: Key Object Selection Document Storage (PS3.4 B.5).
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def make_rejection_note(references: list[tuple[str, str, str, str]], *,
                        code: str = "113001", scheme: str = "DCM",
                        meaning: str = "Rejected for Quality Reasons",
                        **attributes: object) -> bytes:
    """An IOCM rejection note: a Key Object Selection Document (PS3.3 A.35.4, TID 2010)
    titled ``(code, scheme, meaning)`` (PS3.16 CID 7010) that lists ``references``
    (Study, Series, SOP Instance and SOP Class UIDs) in its Current Requested Procedure
    Evidence Sequence and as IMAGE content items.

    The note is in the study of the first reference, in a series of its own, for the
    patient ``attributes`` name (``PatientID`` P1 and ``PatientName`` DOE^JOHN, as
    :func:`make_instance`); UIDs not given are generated.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = references[0][0] if references else generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.PatientID = "P1"
    ds.PatientName = "DOE^JOHN"
    ds.StudyDate = "20150101"
    ds.StudyTime = "101010"
    ds.ContentDate = "20150102"
    ds.ContentTime = "101010"
    ds.InstanceNumber = 1
    ds.SeriesNumber = 999
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, scheme, meaning
    ds.ConceptNameCodeSequence = [title]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    studies: dict[str, dict[str, list[Dataset]]] = {}
    content = []
    for study_uid, series_uid, sop_uid, sop_class in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        studies.setdefault(study_uid, {}).setdefault(series_uid, []).append(item)
        image = Dataset()
        image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = sop_class
        referenced.ReferencedSOPInstanceUID = sop_uid
        image.ReferencedSOPSequence = [referenced]
        content.append(image)
    evidence = []
    for study_uid, series in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, items in series.items():
            entry = Dataset()
            entry.SeriesInstanceUID = series_uid
            entry.ReferencedSOPSequence = items
            study.ReferencedSeriesSequence.append(entry)
        evidence.append(study)
    ds.CurrentRequestedProcedureEvidenceSequence = evidence
    ds.ContentSequence = content
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return part10(ds)


def jpeg_frame(size: int = 16, declared: tuple[int, int] | None = None) -> bytes:
    """A baseline JPEG of ``size`` x ``size`` grey pixels whose frame header (ISO/IEC
    10918-1 B.2.2) declares ``declared`` (width, height) instead, when given: its
    scan then holds far fewer pixels than a decoder fills."""
    out = io.BytesIO()
    Image.fromarray(np.full((size, size), 100, np.uint8), "L").save(out, format="JPEG")
    data = bytearray(out.getvalue())
    if declared is not None:
        at = data.index(b"\xff\xc0")  # SOF0: FFC0, Lf, P, Y, X
        struct.pack_into(">HH", data, at + 5, declared[1], declared[0])
    return bytes(data)


def make_jpeg_instance(frame: bytes, rows: int = 16, columns: int = 16,
                       **attributes: object) -> bytes:
    """A CT Image Storage object in JPEG Baseline holding ``frame`` as its one frame,
    its Image Pixel module declaring ``rows`` x ``columns`` 8-bit grey pixels."""
    ds = grey_image(rows, columns, PatientID="P1")
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return part10(ds, JPEGBaseline8Bit)


def grey_image(rows: int, columns: int, **attributes: object) -> Dataset:
    """A CT data set of ``rows`` x ``columns`` 8-bit grey pixels, new UIDs, without its
    pixel data."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


#: Rows and columns of the generated multi-frame images: 256 KiB a 8-bit frame.
FRAME_SIDE = 512


def multi_frame_image(frames: int, **attributes: object) -> Dataset:
    """A CT data set of ``frames`` 8-bit frames of :data:`FRAME_SIDE` x :data:`FRAME_SIDE`
    pixels, without its pixel data."""
    return grey_image(FRAME_SIDE, FRAME_SIDE, NumberOfFrames=frames, **attributes)


def multi_frame_jpeg(frames: int) -> bytes:
    """A multi-frame JPEG Baseline object: a few KB stored, 256 KiB a frame decoded."""
    out = io.BytesIO()
    Image.fromarray(np.full((FRAME_SIDE, FRAME_SIDE), 90, np.uint8), "L").save(out, format="JPEG")
    ds = multi_frame_image(frames)
    ds.PixelData = encapsulate([out.getvalue()] * frames)
    ds["PixelData"].VR = "OB"
    return part10(ds, JPEGBaseline8Bit)


def multi_frame_native(frames: int, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A multi-frame object of native pixel data (256 KiB a frame), then trailing
    padding (FFFC,FFFC) after the pixel data."""
    ds = multi_frame_image(frames)
    ds.PixelData = np.arange(FRAME_SIDE * FRAME_SIDE * frames, dtype=np.uint8).tobytes()
    ds.add_new(0xFFFCFFFC, "OB", bytes(8))
    return part10(ds, syntax)


def deflated_noise(frames: int) -> bytes:
    """A deflated object of noise: about as large stored as inflated (256 KiB a frame)."""
    ds = multi_frame_image(frames)
    ds.PixelData = np.random.default_rng(7).bytes(FRAME_SIDE * FRAME_SIDE * frames)
    return part10(ds, DeflatedExplicitVRLittleEndian)
