"""PS3.4 C.2.2.2: a key's value, as sent, becomes a :class:`Constraint`.

One small function per matching type; the VR decides which types apply:

- wildcards ``*`` and ``?`` only on AE CS LO LT PN SH ST UC UR UT (C.2.2.2.4);
- ranges only on DA TM DT (C.2.2.2.5); a ``-`` in any other VR is a literal character;
- a ``\\``-separated value is a UID list on UI (C.2.2.2.2), and on other VRs a list of
  values of which any may match (or all, with negotiated multiple-value matching, on an
  attribute of a VR of :data:`ALL_VALUES_VRS` whose values may be multiple,
  C.2.2.2.8), except on the text VRs of one value, :data:`ONE_TEXT_VRS`, where the
  backslash is a character of the value (PS3.5 Table 6.2-1).
"""

from __future__ import annotations

from pacs.core.attributes import Attribute
from pacs.core.errors import InvalidQuery
from pacs.core.query.model import Constraint, Match, Term

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
#: The VRs whose keys match all of their values with negotiated multiple value matching,
#: when the attribute's defined VM is greater than one (C.2.2.2.8); any other key's
#: values stay alternatives.
ALL_VALUES_VRS = frozenset({"AE", "AS", "AT", "CS", "LO", "PN", "SH", "UC"})

#: Text VRs whose value is one, backslashes included (PS3.5 Table 6.2-1: LT, ST, UT).
ONE_TEXT_VRS = frozenset({"LT", "ST", "UT"})

#: ``""`` (two QUOTATION MARKs): matches an empty or absent value (C.2.2.2.7).
EMPTY_VALUE = '""'


def constraint(attribute: Attribute, raw: str, *, empty_value_matching: bool = False,
               multiple_value_matching: bool = False) -> Constraint | None:
    """The constraint a raw key value asks for, or ``None`` for universal matching.

    Parameters
    ----------
    attribute : Attribute
        The key.
    raw : str
        The value as sent, multiple values joined by ``\\``.
    empty_value_matching, multiple_value_matching : bool
        Extended negotiation (DIMSE) or QIDO's ``emptyvaluematching``.

    Raises
    ------
    InvalidQuery
        A value that cannot be matched (a malformed range or UID list).
    """
    value = raw.strip(" \0")
    if universal(attribute, value):
        return None
    if value == EMPTY_VALUE and empty_value_matching:
        return Constraint(attribute, (Term(Match.EMPTY),))
    if attribute.vr == "UI":
        return uid_list(attribute, value)
    values = ([value] if attribute.vr in ONE_TEXT_VRS
              else [v.strip(" \0") for v in value.split("\\")])
    terms = tuple(term(attribute, v) for v in values if v)
    if not terms:
        return None
    every = (multiple_value_matching and attribute.multi and attribute.vr in ALL_VALUES_VRS
             and len(terms) > 1)
    return Constraint(attribute, terms, all_terms=every)


def universal(attribute: Attribute, value: str) -> bool:
    """C.2.2.2.3: a zero-length value matches everything; so does a lone ``*``.

    A lone ``*`` is defined only for wildcard VRs (C.2.2.2.4), but SCUs send it for UIDs
    and dates too: it is taken as universal everywhere, as dcm4chee does.
    """
    return value == "" or value == "*"


def uid_list(attribute: Attribute, value: str) -> Constraint:
    """C.2.2.2.2 (and single value matching of one UID, C.2.2.2.1)."""
    uids = tuple(u.strip(" \0") for u in value.split("\\") if u.strip(" \0"))
    if not uids:
        raise InvalidQuery(f"{attribute.keyword}: empty UID list")
    if len(uids) == 1:
        return Constraint(attribute, (Term(Match.SINGLE, value=uids[0]),))
    return Constraint(attribute, (Term(Match.UID_LIST, uids=uids),))


def term(attribute: Attribute, value: str) -> Term:
    """One value of a non-UID key: range, wildcard or single value."""
    if attribute.vr in RANGE_VRS:
        return date_time(attribute, value)
    if attribute.vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return Term(Match.WILDCARD, value=value)
    return Term(Match.SINGLE, value=value)


def date_time(attribute: Attribute, value: str) -> Term:
    """C.2.2.2.5 range matching on DA, TM and DT, with open ends and partial values.

    A single value is matched as the range it stands for, so a partial time ``1010``
    matches 10:10:00 to 10:10:59.999999, and a partial date ``2015`` the whole year.
    """
    low_text, sep, high_text = value.partition("-")
    if attribute.vr == "DT" and sep and _looks_like_offset(value):
        low_text, sep, high_text = value, "", ""
    elif "-" in high_text:
        raise InvalidQuery(f"{attribute.keyword}: malformed range")
    if not sep:
        low_text = high_text = value
    low = _normalise(attribute, low_text.strip(), upper=False) if low_text.strip() else None
    high = _normalise(attribute, high_text.strip(), upper=True) if high_text.strip() else None
    if low is None and high is None:
        raise InvalidQuery(f"{attribute.keyword}: a range needs at least one end")
    if low is not None and high is not None and low > high and attribute.vr != "TM":
        raise InvalidQuery(f"{attribute.keyword}: range start after its end")
    return Term(Match.RANGE, low=low, high=high)


def _looks_like_offset(value: str) -> bool:
    # DT values may carry a "-HHMM" UTC offset: "20150101120000-0500" is one value.
    head, _, tail = value.rpartition("-")
    return len(tail) == 4 and _digits(tail) and len(head) >= 8 and _digits(head)


def _digits(text: str) -> bool:
    """Only the digits 0-9 (``str.isdigit`` is true of ``²`` and other scripts' digits,
    which no DA, TM or DT value holds, PS3.5 6.2)."""
    return text.isascii() and text.isdigit()


def _valid_month_day(digits: str) -> bool:
    """The month (and day) of a DA value of 6 or 8 digits exist: 01-12, 01-31."""
    return ((len(digits) < 6 or 1 <= int(digits[4:6]) <= 12)
            and (len(digits) < 8 or 1 <= int(digits[6:8]) <= 31))


def _valid_time(digits: str, fraction: str) -> bool:
    """A TM value's digits (PS3.5 Table 6.2-1): HH, HHMM or HHMMSS of an hour 00-23, a
    minute 00-59 and a second 00-60 (a leap second), a fraction of at most six digits
    only after the seconds."""
    if len(digits) not in (2, 4, 6) or len(fraction) > 6 or (fraction and len(digits) < 6):
        return False
    limits = (23, 59, 60)
    return all(int(digits[i:i + 2]) <= limits[i // 2] for i in range(0, len(digits), 2))


_DIGITS = {"DA": 8, "TM": 6, "DT": 14}
_DATE_END = {4: "1231", 6: "31", 8: ""}


def _normalise(attribute: Attribute, text: str, upper: bool) -> str:
    """Pad a partial DA / TM / DT value to the first (or last) moment it stands for.

    Index values are compared as strings, which orders DA, TM and DT correctly once
    both sides have the same layout.
    """
    vr = attribute.vr
    if vr == "DA":
        digits = text.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
        if (not _digits(digits) or len(digits) not in _DATE_END
                or not _valid_month_day(digits)):
            raise InvalidQuery(f"{attribute.keyword}: not a DA value")
        if upper:
            return digits + _DATE_END[len(digits)]
        return digits + "0101"[len(digits) - 4:]
    whole, _, fraction = text.replace(":", "").partition(".")
    if vr == "DT":
        whole = whole.split("+")[0]
    size = _DIGITS[vr]
    if (not _digits(whole) or len(whole) > size or (fraction and not _digits(fraction))
            or (vr == "TM" and not _valid_time(whole, fraction))):
        raise InvalidQuery(f"{attribute.keyword}: not a {vr} value")
    if upper:
        return whole + "9" * (size - len(whole)) + "." + (fraction + "999999")[:6]
    # A first moment's fraction without its trailing zeros: compared as text, a stored
    # 120000 sorts before 120000.0, the same moment (C.2.2.2.5: <time1>- matches it).
    fraction = fraction.rstrip("0")
    return whole + "0" * (size - len(whole)) + ("." + fraction if fraction else "")
