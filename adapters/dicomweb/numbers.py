"""Whole numbers written in DICOMweb paths and query parameters: ASCII digits only,
within a stated bound.

``str.isdigit`` is not the test: it is true of ``²`` and other characters that
``int`` refuses, and ``int`` reads digits of other scripts (``٣`` is 3) that no URI
syntax of PS3.18 allows (its numbers are ``DIGIT``, RFC 5234 B.1: ``0``-``9``).  The
bound is checked on the text's length before it is converted, so a parameter of
thousands of digits costs nothing (and never reaches ``int``'s own digit limit).
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")

#: Largest signed 64-bit integer: SQLite's INTEGER, which ``LIMIT`` and ``OFFSET`` take.
INT64_MAX = 2**63 - 1
#: Largest Integer String (IS, PS3.5 6.2): Number of Frames (0028,0008) is one, so no
#: frame number is above it.
IS_MAX = 2**31 - 1


def whole_number(text: str, maximum: int) -> int | None:
    """``text`` as a number from 0 to ``maximum``; ``None`` when it is not one.

    Parameters
    ----------
    text : str
        Decimal digits, leading zeros allowed, nothing else (no sign, no spaces).
    maximum : int
        The largest value accepted.
    """
    digits = text.lstrip("0")
    if not _DIGITS.fullmatch(text) or len(digits) > len(str(maximum)):
        return None
    value = int(digits or "0")  # not ``text``: thousands of leading zeros count as digits
    return value if value <= maximum else None
