"""C-FIND response identifiers written straight to bytes, read back with pydicom; values
longer than Explicit VR's 16-bit length fields are cut for the answer only."""

from __future__ import annotations

import io
import logging

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from pacs.dimse.encoding import MAX_SHORT_LENGTH, encode_identifier

pytestmark = pytest.mark.dimse

STUDY_UID = "1.2.826.0.1.3680043.10.543.70"
LONG_NAME = "LONGNAME" * 4000 + "^" + "GIVEN" * 3000  # 47 001 characters


def _elements(name: str, charset: str = "ISO_IR 192") -> list[tuple[int, str, object]]:
    return [(0x00080005, "CS", charset), (0x00080052, "CS", "STUDY"),
            (0x00100010, "PN", name), (0x00100020, "LO", "PID1"),
            (0x0020000D, "UI", STUDY_UID), (0x00201208, "IS", "12")]


def _read(data: bytes, implicit: bool) -> Dataset:
    ds = decode(io.BytesIO(data), implicit, True)
    assert ds is not None
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_short_values_are_written_as_given(implicit: bool) -> None:
    ds = _read(encode_identifier(_elements("DOE^JOHN"), ["ISO_IR 192"], implicit), implicit)
    assert str(ds.PatientName) == "DOE^JOHN"
    assert ds.PatientID == "PID1" and ds.StudyInstanceUID == STUDY_UID
    assert ds.NumberOfStudyRelatedInstances == 12


def test_implicit_vr_answers_a_long_value_whole() -> None:
    name = LONG_NAME * 2  # 94 002 bytes: more than 16 bits, fine for 32
    ds = _read(encode_identifier(_elements(name), ["ISO_IR 192"], True), True)
    assert str(ds.PatientName) == name


@pytest.mark.parametrize("name, charset", [
    (LONG_NAME * 2, "ISO_IR 192"),            # one byte per character
    ("Ä" * 40_000 + "^JÖRG", "ISO_IR 192"),   # two bytes per character: cut between them
    ("Ä" * 70_000, "ISO_IR 100"),             # Latin-1
])
def test_explicit_vr_cuts_a_value_to_its_length_field(name: str, charset: str,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    with caplog.at_level(logging.WARNING):
        data = encode_identifier(_elements(name, charset), [charset], False)
    ds = _read(data, False)
    sent = str(ds.PatientName)
    assert ds["PatientName"].VR == "PN"
    assert name.startswith(sent) and len(sent) > 30_000
    codec = "utf-8" if charset == "ISO_IR 192" else "latin-1"
    assert len(sent.encode(codec)) <= MAX_SHORT_LENGTH
    # Everything else of the answer is intact.
    assert ds.PatientID == "PID1" and ds.StudyInstanceUID == STUDY_UID
    assert ds.NumberOfStudyRelatedInstances == 12
    # The log names the study and the tag, never the value.
    assert STUDY_UID in caplog.text and "(0010,0010)" in caplog.text
    assert name[:20] not in caplog.text


def test_explicit_vr_cut_through_pydicoms_iso_2022_writer() -> None:
    charsets = ["", "ISO 2022 IR 87"]
    name = "ヤマダ^タロウ=" + "山田" * 30_000 + "^太郎"
    elements = _elements(name, "\\ISO 2022 IR 87")
    ds = _read(encode_identifier(elements, charsets, False), False)
    assert ds["PatientName"].VR == "PN"  # not UN, as pydicom would otherwise send it
    ds.PatientName.decode(["ISO 2022 IR 6", "ISO 2022 IR 87"])
    sent = str(ds.PatientName)
    assert name.startswith(sent) and len(sent) > 10_000
    assert ds.StudyInstanceUID == STUDY_UID


def test_explicit_vr_cuts_a_value_inside_a_sequence_item() -> None:
    description = "X" * 70_000
    elements = [
        *_elements("DOE^JOHN"),
        (0x00081032, "SQ", [[(0x00080100, "SH", "CODE1"), (0x00080104, "LO", description)]])]
    ds = _read(encode_identifier(elements, ["ISO_IR 192"], False), False)
    item = ds.ProcedureCodeSequence[0]
    assert item.CodeValue == "CODE1"
    assert description.startswith(item.CodeMeaning)
    assert len(item.CodeMeaning) == MAX_SHORT_LENGTH
    assert str(ds.PatientName) == "DOE^JOHN"


@pytest.mark.parametrize("implicit", [True, False])
def test_values_pydicom_cannot_convert_go_out_as_stored(implicit: bool) -> None:
    """Through pydicom's writer (ISO 2022): a stored DS that is no number and a CS
    outside the default repertoire must not fail the answer."""
    elements = [*_elements("ヤマダ^タロウ", "\\ISO 2022 IR 87"),
                (0x00101030, "DS", "NOTANUMBER"), (0x00080060, "CS", "ÇT")]
    ds = _read(encode_identifier(elements, ["", "ISO 2022 IR 87"], implicit), implicit)
    assert ds.get_item(0x00101030).value == b"NOTANUMBER"  # raw: pydicom would refuse it
    assert ds.Modality == "?T"
    assert ds.StudyInstanceUID == STUDY_UID and ds.NumberOfStudyRelatedInstances == 12
