"""Index text to the DICOM JSON model (PS3.18 F.2): one converter per attribute."""

from __future__ import annotations

import json

import pytest

from adapters.dicomweb.dicomjson import FIELDS, Renderer, dumps, person_name


@pytest.mark.parametrize("keyword, text, element", [
    ("PatientName", "DOE^JOHN", {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}),
    ("PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう",
     {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                              "Phonetic": "やまだ^たろう"}]}),
    ("PatientName", "=山田^太郎", {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}),
    ("OperatorsName", "A^B\\\\C^D", {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, None,
                                                            {"Alphabetic": "C^D"}]}),
    ("PatientName", None, {"vr": "PN"}),
    ("PatientName", "", {"vr": "PN"}),
    ("SeriesNumber", "7", {"vr": "IS", "Value": [7]}),
    ("SeriesNumber", " 7 ", {"vr": "IS", "Value": [7]}),
    ("SeriesNumber", "seven", {"vr": "IS"}),
    ("PatientWeight", "70.5", {"vr": "DS", "Value": [70.5]}),
    ("PatientWeight", "70", {"vr": "DS", "Value": [70]}),
    ("PatientWeight", "1e2", {"vr": "DS", "Value": [100.0]}),
    ("PatientWeight", "NaN", {"vr": "DS"}),
    ("Rows", "512", {"vr": "US", "Value": [512]}),
    ("ModalitiesInStudy", "CT\\SR", {"vr": "CS", "Value": ["CT", "SR"]}),
    ("ImageType", "ORIGINAL\\\\AXIAL", {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}),
    ("PatientComments", "a\\b", {"vr": "LT", "Value": ["a\\b"]}),  # LT is single-valued
    ("StudyInstanceUID", "1.2.3", {"vr": "UI", "Value": ["1.2.3"]}),
])
def test_elements(keyword: str, text: str | None, element: dict) -> None:
    assert FIELDS[keyword].element(text) == element


def test_person_name_drops_empty_groups() -> None:
    assert person_name("A^B==C") == {"Alphabetic": "A^B", "Phonetic": "C"}


def test_renderer_orders_keys_by_tag_and_adds_extras() -> None:
    render = Renderer(["StudyInstanceUID", "PatientName", "StudyDate"],
                      constants={"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}},
                      computed={"00081190": lambda row: {"vr": "UR",
                                                         "Value": [row["StudyInstanceUID"]]}})
    row = render.row({"StudyInstanceUID": "1.2", "PatientName": None, "StudyDate": "20200101"})
    assert list(row) == ["00080005", "00080020", "00081190", "00100010", "0020000D"]
    assert row["00081190"]["Value"] == ["1.2"]


def test_dumps_is_compact_utf8() -> None:
    data = dumps([{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Ψ"}]}}])
    assert "Ψ".encode() in data and b" " not in data
    assert json.loads(data)[0]["00100010"]["Value"][0]["Alphabetic"] == "Ψ"
