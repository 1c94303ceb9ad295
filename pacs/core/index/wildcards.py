"""Wildcard matching that SQLite's GLOB cannot say, as the SQL function
``dicom_wildcard`` every index connection has (:func:`pacs.core.index.connection.connect`;
the query compiler calls it, :mod:`pacs.core.index.compiler`).

GLOB's ``*`` runs over any character: over the ``\\`` between the values of a
multi-valued attribute, and over the ``=`` between the component groups of a person's
name, so that ``P*L`` matched ``ORIGINAL\\PRIMARY\\AXIAL`` and ``=山田*`` no name.  The
compiler keeps a GLOB that the index can use to narrow the rows, and asks this function
for the rule.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any


def wildcard_matches(*arguments: Any) -> bool:
    """``dicom_wildcard(stored, value, multi, person)``: :func:`matches`, as SQLite
    calls it."""
    stored, value, multi, person = arguments
    return matches(stored, str(value), bool(multi), bool(person))


def matches(stored: str | None, value: str, multi: bool, person: bool) -> bool:
    """Whether ``stored`` matches the wildcard ``value`` (PS3.4 C.2.2.2.4: ``*`` any
    run of characters, ``?`` one, anything else itself), one value at a time for a
    multi-valued attribute (C.2.2.3); for a person's name, a value naming component
    groups with ``=`` (PS3.5 6.2.1) is matched group by group (``=山田*``: the
    ideographic group; an empty group matches any), one without against the whole name
    (the alphabetic group first, as the index's prefix matching has it)."""
    if stored is None:
        return False
    grouped = person and "=" in value
    groups = value.split("=") if grouped else [value]
    for one in stored.split("\\") if multi else [stored]:
        have = one.split("=") if grouped else [one]
        have += [""] * (len(groups) - len(have))
        if all(not pattern or _wildcard(pattern).fullmatch(part)
               for pattern, part in zip(groups, have, strict=False)):
            return True
    return False


@lru_cache(maxsize=256)
def _wildcard(value: str) -> re.Pattern[str]:
    """A DICOM wildcard value as a regular expression."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in value), re.DOTALL)
