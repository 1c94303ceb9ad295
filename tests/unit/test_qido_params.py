"""QIDO-RS parameters to a Query: keyword or tag, lists, includefield, paging, flags."""

from __future__ import annotations

import pytest

from adapters.dicomweb import search
from pacs.core.attributes import BY_KEYWORD, Level
from pacs.core.errors import InvalidQuery, InvalidUID
from pacs.core.query.model import Match, Query


def parse(params: dict[str, str | list[str]] | None = None,
          target: search.Target = search.STUDIES, path: dict[str, str] | None = None,
          default_limit: int = 100, max_limit: int = 1000) -> tuple[Query, search.Paging]:
    given = {k: v if isinstance(v, list) else [v] for k, v in (params or {}).items()}
    return search.parse(given, target, path or {}, default_limit=default_limit,
                        max_limit=max_limit)


def keywords(query: Query) -> set[str]:
    return {a.keyword for a in query.return_keys}


def test_keyword_and_tag_name_the_same_constraint() -> None:
    by_keyword, _ = parse({"PatientID": "P1"})
    by_tag, _ = parse({"00100020": "P1"})
    assert by_keyword.constraints == by_tag.constraints


@pytest.mark.parametrize("value", ["1.2.3,1.2.4", "1.2.3\\1.2.4", "1.2.3, 1.2.4"])
def test_uid_lists(value: str) -> None:
    query, _ = parse({"StudyInstanceUID": value})
    (constraint,) = query.constraints
    assert constraint.terms[0].match is Match.UID_LIST
    assert constraint.terms[0].uids == ("1.2.3", "1.2.4")


def test_comma_is_literal_outside_uids() -> None:
    query, _ = parse({"StudyDescription": "a,b"})
    assert query.constraints[0].terms[0].value == "a,b"


def test_path_uids_become_single_value_constraints() -> None:
    query, _ = parse({}, search.SERIES_INSTANCES,
                     {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"})
    assert [c.attribute.keyword for c in query.constraints] == [
        "StudyInstanceUID", "SeriesInstanceUID"]
    assert query.level is Level.IMAGE


def test_defaults_follow_the_scope() -> None:
    studies, _ = parse()
    assert set(search.DEFAULTS[Level.STUDY]) <= keywords(studies)
    all_series, _ = parse({}, search.ALL_SERIES)
    assert set(search.DEFAULTS[Level.STUDY]) | set(search.DEFAULTS[Level.SERIES]) <= keywords(
        all_series)
    nested, _ = parse({}, search.STUDY_SERIES, {"StudyInstanceUID": "1.2"})
    assert "PatientName" not in keywords(nested)
    assert "StudyInstanceUID" in keywords(nested)


def test_includefield_forms_and_all() -> None:
    query, _ = parse({"includefield": ["StudyDescription,00081060", "PatientComments"]})
    assert {"StudyDescription", "NameOfPhysiciansReadingStudy", "PatientComments"} <= keywords(
        query)
    everything, _ = parse({"includefield": "all"}, search.STUDY_SERIES,
                          {"StudyInstanceUID": "1.2"})
    assert {a.keyword for a in BY_KEYWORD.values() if a.level.depth <= 2} <= keywords(everything)


@pytest.mark.parametrize("params, limit, offset, clamped", [
    ({}, 100, 0, False),
    ({"limit": "5", "offset": "10"}, 5, 10, False),
    ({"limit": "5000"}, 1000, 0, True),
    # The largest page SQLite's 64-bit LIMIT / OFFSET can be asked for.
    ({"offset": str(2**63 - 1), "limit": str(2**63 - 1)}, 1000, 2**63 - 1, True),
    ({"offset": " 007 "}, 100, 7, False),
])
def test_paging(params: dict[str, str], limit: int, offset: int, clamped: bool) -> None:
    query, paging = parse(dict(params))
    assert (paging.limit, paging.offset, paging.clamped) == (limit, offset, clamped)
    assert (query.limit, query.offset) == (limit, offset)


def test_default_limit_never_exceeds_the_maximum() -> None:
    assert parse(default_limit=5000, max_limit=10)[1].limit == 10


def test_flags() -> None:
    query, _ = parse({"PatientName": "do", "fuzzymatching": "TRUE"})
    assert query.fuzzy
    query, _ = parse({"AccessionNumber": '""', "emptyvaluematching": "true"})
    assert query.constraints[0].terms[0].match is Match.EMPTY


@pytest.mark.parametrize("params", [
    {"limit": "-1"}, {"limit": "x"}, {"offset": "1.5"}, {"fuzzymatching": "yes"},
    # Digits int() refuses, or reads although no URI allows them, and numbers past
    # SQLite's 64-bit integers.
    {"offset": "\u00b2"}, {"limit": "\u00b2"}, {"offset": "\u0663"},
    {"offset": str(2**63)}, {"limit": str(2**63)}, {"offset": "9" * 5000},
    {"NoSuchKeyword": "1"}, {"12345678": "1"}, {"BodyPartThickness": "1"},
    {"ReferencedStudySequence.StudyInstanceUID": "1"}, {"includefield": "NoSuchKeyword"},
    {"includefield": "ReferencedStudySequence.StudyInstanceUID"},
    {"StudyDate": "2015-01-01"},
])
def test_refused(params: dict[str, str]) -> None:
    with pytest.raises(InvalidQuery):
        parse(dict(params))


def test_malformed_path_uid() -> None:
    with pytest.raises(InvalidUID, match="valid UID"):
        parse({}, search.STUDY_SERIES, {"StudyInstanceUID": "1.02"})


def test_returned_but_never_matched() -> None:
    query, _ = parse({"SpecificCharacterSet": "ISO_IR 100", "TimezoneOffsetFromUTC": "+0100",
                      "00080056": "ONLINE"})
    assert query.constraints == ()
