"""Index text to the DICOM JSON model (PS3.18 F.2): one converter per attribute."""

from __future__ import annotations

import json

import pytest

from adapters.dicomweb.dicomjson import FIELDS, Renderer, dumps
from pacs.core.jsonmodel import element, number, person_name


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
    ("PatientWeight", "1e2", {"vr": "DS", "Value": [100]}),
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
    assert person_name("==") is None


@pytest.mark.parametrize(("vr", "text", "value"), [
    ("DS", "70", 70), ("DS", "70.0", 70), ("DS", "7e1", 70), ("DS", "0.50", 0.5),
    ("DS", " 12 ", 12), ("DS", "+5", 5), ("DS", "-0", 0), ("DS", "-0.0", 0),
    ("DS", ".5", 0.5), ("DS", "5.", 5), ("DS", "-1.25E-3", -0.00125),
    ("DS", "1e16", 1e16), ("DS", "9007199254740993", 9007199254740992.0),
    ("DS", "1e999", None), ("DS", "NaN", None), ("DS", "inf", None), ("DS", "1_0", None),
    ("DS", "\u0661\u0662", None), ("DS", "0x10", None), ("DS", "1,5", None), ("DS", "", None),
    ("DS", ".", None), ("DS", "e5", None),
    ("IS", "7", 7), ("IS", " 7", 7), ("IS", "+7", 7), ("IS", "-0", 0), ("IS", "7.0", 7),
    ("IS", "7.5", None), ("IS", "1e20", None), ("US", "512", 512), ("FD", "0.25", 0.25),
])
def test_numbers(vr: str, text: str, value: float | None) -> None:
    """PS3.18 F.2.3: the JSON number a DS / IS text states (PS3.5 6.2 grammar)."""
    got = number(vr, text)
    assert got == value and type(got) is type(value)


def test_numbers_keep_their_place_and_an_all_null_element_has_no_value() -> None:
    assert element("DS", "1\\\\x\\2.5") == {"vr": "DS", "Value": [1, None, None, 2.5]}
    assert element("IS", "x\\") == {"vr": "IS"}
    assert element("CS", "\\") == {"vr": "CS"}


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
