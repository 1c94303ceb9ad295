"""Whole numbers of DICOMweb paths and query parameters: ASCII digits, bounded."""

from __future__ import annotations

import pytest

from adapters.dicomweb.numbers import INT64_MAX, IS_MAX, whole_number


@pytest.mark.parametrize("text, maximum, expected", [
    ("0", 10, 0),
    ("10", 10, 10),
    ("0000000000000000000000000000007", 10, 7),  # leading zeros are not digits counted
    (str(INT64_MAX), INT64_MAX, INT64_MAX),
    (str(IS_MAX), IS_MAX, IS_MAX),
    ("11", 10, None),
    (str(INT64_MAX + 1), INT64_MAX, None),
    ("9" * 5000, INT64_MAX, None),  # refused by its length, before int() reads it
    ("0" * 5000 + "1", INT64_MAX, 1),  # past int()'s 4,300 digits: read without them
    ("0" * 5000, INT64_MAX, 0),
    ("", 10, None),
    ("\u00b2", 10, None),  # superscript two: str.isdigit() is true, int() fails
    ("\u0663", 10, None),  # Arabic-Indic three: int() reads it, no URI allows it
    ("+1", 10, None),
    ("-1", 10, None),
    (" 1", 10, None),
    ("1\n", 10, None),
    ("1e3", 10_000, None),
])
def test_whole_number(text: str, maximum: int, expected: int | None) -> None:
    assert whole_number(text, maximum) == expected
