"""PS3.4 C.2.2.2 value syntax to constraints (table-driven)."""

from __future__ import annotations

import pytest

from pacs.core.attributes import BY_KEYWORD
from pacs.core.errors import InvalidQuery
from pacs.core.index.compiler import glob_literal, glob_wildcard
from pacs.core.query.matching import constraint
from pacs.core.query.model import Match


@pytest.mark.parametrize("keyword, raw, match, operands", [
    ("PatientID", "ABC", Match.SINGLE, ("ABC",)),
    ("PatientID", "A-B", Match.SINGLE, ("A-B",)),              # '-' literal outside DA/TM/DT
    ("PatientName", "DOE*", Match.WILDCARD, ("DOE*",)),
    ("PatientName", "D?E", Match.WILDCARD, ("D?E",)),
    ("StudyInstanceUID", "1.2\\1.3", Match.UID_LIST, ("1.2", "1.3")),
    ("StudyInstanceUID", "1.2", Match.SINGLE, ("1.2",)),
    ("StudyDate", "20150101-20151231", Match.RANGE, ("20150101", "20151231")),
    ("StudyDate", "20150101-", Match.RANGE, ("20150101", None)),
    ("StudyDate", "-20150101", Match.RANGE, (None, "20150101")),
    ("StudyDate", "2015", Match.RANGE, ("20150101", "20151231")),
    ("StudyDate", "201502", Match.RANGE, ("20150201", "20150231")),
    ("StudyDate", "20150301", Match.RANGE, ("20150301", "20150301")),
    ("StudyTime", "1010", Match.RANGE, ("101000", "101099.999999")),
    ("StudyTime", "080000-120000.5", Match.RANGE, ("080000", "120000.599999")),
    ("StudyTime", "10:10", Match.RANGE, ("101000", "101099.999999")),
    ("StudyTime", "235960", Match.RANGE, ("235960", "235960.999999")),  # a leap second
    # The first moment without its fraction's trailing zeros: a stored 120000 is the
    # same moment as 120000.0 and must not sort before it (C.2.2.2.5).
    ("StudyTime", "120000.0-120000.5", Match.RANGE, ("120000", "120000.599999")),
    ("StudyTime", "120000.250-", Match.RANGE, ("120000.25", None)),
])
def test_value_syntax(keyword: str, raw: str, match: Match, operands: tuple) -> None:
    found = constraint(BY_KEYWORD[keyword], raw)
    assert found is not None
    term = found.terms[0]
    assert term.match is match
    if match is Match.RANGE:
        assert (term.low, term.high) == operands
    elif match is Match.UID_LIST:
        assert term.uids == operands
    else:
        assert tuple(t.value for t in found.terms) == operands


@pytest.mark.parametrize("keyword, raw", [
    ("PatientName", ""), ("PatientName", "*"), ("StudyInstanceUID", "*"), ("StudyDate", ""),
    ("PatientID", "  "),
])
def test_universal(keyword: str, raw: str) -> None:
    assert constraint(BY_KEYWORD[keyword], raw) is None


def test_wildcards_only_on_wildcard_vrs() -> None:
    found = constraint(BY_KEYWORD["SeriesNumber"], "1*")  # IS: '*' is literal
    assert found is not None and found.terms[0].match is Match.SINGLE


def test_multiple_values() -> None:
    found = constraint(BY_KEYWORD["Modality"], "CT\\MR")
    assert found is not None and [t.value for t in found.terms] == ["CT", "MR"]
    assert not found.all_terms
    negotiated = constraint(BY_KEYWORD["ModalitiesInStudy"], "CT\\MR",
                            multiple_value_matching=True)
    assert negotiated is not None and negotiated.all_terms


@pytest.mark.parametrize("keyword, raw", [
    ("Modality", "CT\\MR"),                    # CS, VM 1
    ("StudyID", "S1\\S2"),                     # SH, VM 1
    ("StudyDate", "20200101\\20210101-"),      # DA: not a VR of C.2.2.2.8
    ("PatientName", "DOE^J*\\ROE^R*"),         # PN, VM 1
])
def test_multiple_value_matching_leaves_single_valued_keys_alternatives(
        keyword: str, raw: str) -> None:
    """C.2.2.2.8 applies to the VRs it names and a defined VM greater than one: any
    other key's values stay alternatives, negotiated or not (all of them would match
    nothing a single value holds)."""
    found = constraint(BY_KEYWORD[keyword], raw, multiple_value_matching=True)
    assert found is not None and len(found.terms) == 2 and not found.all_terms


def test_empty_value_matching_only_when_negotiated() -> None:
    assert constraint(BY_KEYWORD["AccessionNumber"], '""').terms[0].match is Match.SINGLE
    found = constraint(BY_KEYWORD["AccessionNumber"], '""', empty_value_matching=True)
    assert found is not None and found.terms[0].match is Match.EMPTY


@pytest.mark.parametrize("keyword, raw", [
    ("StudyDate", "2015-01-01"), ("StudyDate", "abc"), ("StudyDate", "20151231-20150101"),
    ("StudyTime", "25x"), ("StudyDate", "-"),
    # digits of other scripts are not digits of a DA / TM value; no month 13 or day 32
    ("StudyDate", "²²²²"), ("StudyTime", "1010.²"), ("StudyDate", "20151301-"),
    ("StudyDate", "-20150132"), ("StudyDate", "201500"), ("StudyDate", "20150100"),
    # PS3.5 Table 6.2-1: HH 00-23, MM 00-59, SS 00-60, in pairs, a fraction after SS
    ("StudyTime", "2460"), ("StudyTime", "99"), ("StudyTime", "123"),
    ("StudyTime", "1261-"), ("StudyTime", "-120061"), ("StudyTime", "1200.5"),
    ("StudyTime", "120000.1234567"),
])
def test_malformed_ranges(keyword: str, raw: str) -> None:
    with pytest.raises(InvalidQuery):
        constraint(BY_KEYWORD[keyword], raw)


def test_glob_escaping() -> None:
    assert glob_literal("a*b?[c]") == "a[*]b[?][[]c]"
    assert glob_wildcard("[A]B*") == "[[]A]B*"
