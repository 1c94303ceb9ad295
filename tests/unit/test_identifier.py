"""C-FIND / C-MOVE / C-GET identifiers to queries, C-FIND extended negotiation bytes, and
the character set of C-FIND responses (pacs.dimse.identifier, pacs.dimse.encoding)."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from pacs.core.errors import InvalidQuery
from pacs.core.query.model import Match, Query
from pacs.dimse import encoding, handlers
from pacs.dimse.identifier import (
    PATIENT_ROOT,
    STUDY_ROOT,
    Negotiated,
    response_charset,
    to_find_query,
    to_retrieve_query,
)

pytestmark = pytest.mark.dimse

PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


def _identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    with config.disable_value_validation():  # wildcards in UIDs are the point of some
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


def _patient_terms(query: Query) -> list[tuple[Match, str | None]]:
    [found] = [c for c in query.constraints if c.attribute.keyword == "PatientID"]
    return [(term.match, term.value) for term in found.terms]


# --- Patient ID in Study Root C-FIND (PS3.4 C.6.2.1) ---------------------------------------

@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
@pytest.mark.parametrize(("value", "terms"), [
    ("P?", [(Match.WILDCARD, "P?")]),
    ("P*1", [(Match.WILDCARD, "P*1")]),
    ("P1\\P3", [(Match.SINGLE, "P1"), (Match.SINGLE, "P3")]),
])
def test_study_root_matches_patient_id_as_a_required_key(level: str, value: str,
                                                         terms: list[object]) -> None:
    """Study Root has no Patient level: Patient ID is a Required Key of the Study level
    (Table C.6-5), with wildcards and lists like any other LO key."""
    query, _ = to_find_query(_identifier(level, PatientID=value), STUDY_ROOT)
    assert _patient_terms(query) == terms
    assert query.required == ("PatientID",)  # held empty, it matches any (C.2.2.1.2)
    patient_root, _ = to_find_query(_identifier(level, PatientID="P1"), PATIENT_ROOT)
    assert patient_root.required == ()


@pytest.mark.parametrize("value", ["P?", "P*1", "P1\\P3", "P*", "*P"])
def test_patient_root_keeps_patient_id_one_value_above_the_query_level(value: str) -> None:
    with pytest.raises(InvalidQuery, match="PatientID"):
        to_find_query(_identifier("STUDY", PatientID=value), PATIENT_ROOT)


def test_study_root_keeps_the_study_uid_one_value_above_the_query_level() -> None:
    with pytest.raises(InvalidQuery, match="StudyInstanceUID"):
        to_find_query(_identifier("SERIES", StudyInstanceUID="1.2.3\\1.2.4"), STUDY_ROOT)


# --- retrieve identifiers: unique keys by value (PS3.4 C.4.2.1.4.1, C.4.3.1.3.1) -------------

@pytest.mark.parametrize(("model", "level", "keys"), [
    (PATIENT_ROOT, "PATIENT", {"PatientID": "P*"}),
    (PATIENT_ROOT, "PATIENT", {"PatientID": "?*"}),
    (PATIENT_ROOT, "PATIENT", {"PatientID": "P1\\P?"}),
    (PATIENT_ROOT, "STUDY", {"PatientID": "P?", "StudyInstanceUID": "1.2.3"}),
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": "1.2.*"}),
    (STUDY_ROOT, "IMAGE", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1",
                           "SOPInstanceUID": ["1.2.3.1.1", "1.2.3.1.?"]}),
])
def test_retrieve_refuses_wildcards_in_unique_keys(model: str, level: str,
                                                   keys: dict[str, object]) -> None:
    with pytest.raises(InvalidQuery, match="wildcard"):
        to_retrieve_query(_identifier(level, **keys), model)


def test_retrieve_matches_patient_ids_by_value() -> None:
    query = to_retrieve_query(_identifier("PATIENT", PatientID="P1\\P3"), PATIENT_ROOT)
    assert _patient_terms(query) == [(Match.SINGLE, "P1"), (Match.SINGLE, "P3")]


# --- C-FIND extended negotiation (PS3.4 C.5.1.1, Tables C.5-1 and C.5-2) ----------------------

@pytest.mark.parametrize(("info", "expected"), [
    (b"\x01", Negotiated(relational=True)),
    (b"\x00\x00\x00\x00\x01", Negotiated()),                       # Enhanced Multi-Frame
    (b"\x00\x00\x00\x00\x00\x01", Negotiated(empty_value=True)),
    (b"\x00\x00\x00\x00\x00\x00\x01", Negotiated(multiple_value=True)),
    (b"\x01" * 7, Negotiated(True, True, True, True, True)),
])
def test_find_options_are_read_at_their_item_bytes(info: bytes, expected: Negotiated) -> None:
    assert Negotiated.from_info(info) == expected


@pytest.mark.parametrize(("offered", "answered"), [
    (b"\x01", b"\x01"),                                  # one byte offered, one answered
    (b"\x01" * 7, b"\x01\x00\x00\x00\x00\x01\x01"),      # no EMF conversion, no date-time
    (b"\x00\x00\x00\x00\x01\x01", b"\x00\x00\x00\x00\x00\x01"),
    (b"\x01" * 9, b"\x01\x00\x00\x00\x00\x01\x01"),      # bytes past Table C.5-2: not known
])
def test_the_handler_answers_what_is_supported_of_the_offer(offered: bytes,
                                                            answered: bytes) -> None:
    event = cast(Any, SimpleNamespace(app_info={PATIENT_FIND: offered}))
    assert handlers.handle_sop_extended(event) == {PATIENT_FIND: answered}


# --- the response's Specific Character Set (PS3.4 C.4.1.1.3.2, PS3.5 6.1) ---------------------

@pytest.mark.parametrize(("requested", "value", "answered"), [
    (["ISO 2022 IR 6"], "Müller^Jörg", ["ISO_IR 192"]),        # default repertoire: ASCII
    (["ISO_IR 6"], "Müller^Jörg", ["ISO_IR 192"]),
    ([""], "Müller^Jörg", ["ISO_IR 192"]),
    (["ISO_IR 6"], "MUELLER^JOERG", ["ISO_IR 6"]),
    (["ISO_IR 100"], "Müller^Jörg", ["ISO_IR 100"]),
    (["ISO_IR 13"], "ﾔﾏﾀﾞ^ﾀﾛｳ", ["ISO_IR 13"]),                 # JIS X 0201: one byte each
    (["ISO_IR 13"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎", ["ISO_IR 192"]),       # kanji are not in it
    (["ISO 2022 IR 13"], "山田", ["ISO_IR 192"]),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎", ["ISO 2022 IR 13",
                                                             "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", ["", "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 87"], "Müller", ["ISO_IR 192"]),
    # pydicom would write the Latin-1 letter under ISO-IR 6, without ESC - A
    (["ISO 2022 IR 6", "ISO 2022 IR 100"], "Müller", ["ISO_IR 192"]),
    (["ISO 2022 IR 6", "ISO 2022 IR 126"], "Διονυσιος", ["ISO 2022 IR 6",
                                                        "ISO 2022 IR 126"]),
])
def test_the_response_charset_holds_every_value_in_its_repertoire(
        requested: list[str], value: str, answered: list[str]) -> None:
    assert response_charset(["P1", value], requested) == answered


@pytest.mark.parametrize(("character", "term", "held"), [
    ("ü", "ISO_IR 6", False), ("ü", "ISO 2022 IR 6", False), ("ü", "", False),
    ("ü", "ISO_IR 100", True), ("ｱ", "ISO_IR 13", True), ("山", "ISO_IR 13", False),
    ("山", "ISO 2022 IR 87", True), ("ｱ", "ISO 2022 IR 87", False), ("ü", "NO SUCH", False),
])
def test_each_term_holds_its_own_repertoire(character: str, term: str, held: bool) -> None:
    assert encoding.in_repertoire(character, term) is held


@pytest.mark.parametrize(("charsets", "value", "expected"), [
    (["ISO_IR 13"], "ﾔﾏﾀﾞ^ﾀﾛｳ", "ﾔﾏﾀﾞ^ﾀﾛｳ".encode("shift_jis")),
    (["ISO 2022 IR 13"], "ｱ ﾃｽﾄ", "ｱ ﾃｽﾄ".encode("shift_jis")),   # romaji and kana mixed
    (["ISO_IR 6"], "DOE^JOHN", b"DOE^JOHN"),
])
def test_single_byte_terms_are_written_one_byte_per_character(
        charsets: list[str], value: str, expected: bytes) -> None:
    data = encoding.encode_identifier(
        [(0x00080005, "CS", charsets[0]), (0x00100010, "PN", value)], charsets, implicit=True)
    ds = decode(io.BytesIO(data), True, True)
    assert ds is not None
    assert ds.get_item("PatientName").value.rstrip(b" ") == expected
