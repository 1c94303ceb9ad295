"""Index text back to typed values: shared by every protocol that answers a query.

The index keeps each value as text (multiple values joined by ``\\``, PS3.5 6.4).
C-FIND responses (pydicom elements) and QIDO-RS responses (the DICOM JSON model of
PS3.18 F.2) both need the same steps: split the values, and turn numeric VRs into
numbers.  Nothing here knows a protocol.
"""

from __future__ import annotations

import math

from pacs.attributes import Attribute

#: VRs whose value may contain a backslash, so it never separates values (PS3.5 6.2).
SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})

#: Binary integer VRs and the integer string VR (PS3.5 6.2).
INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})

#: Floating point VRs and the decimal string VR (PS3.5 6.2).
DECIMAL_VRS = frozenset({"DS", "FD", "FL"})


def split(attribute: Attribute, text: str | None) -> list[str]:
    """The values of an index text (empty for an unknown or empty value).

    Parameters
    ----------
    attribute : Attribute
        The attribute the text belongs to; its VR decides whether ``\\`` separates
        values.
    text : str or None
        The index text.
    """
    if text is None or text == "":
        return []
    if attribute.vr in SINGLE_VALUED_VRS:
        return [text]
    return text.split("\\")


def integer(text: str) -> int | None:
    """An IS / US / UL … value as an int, or ``None`` when it is not one."""
    try:
        return int(text.strip())
    except ValueError:
        return None


def decimal(text: str) -> int | float | None:
    """A DS / FD / FL value as a number, or ``None`` when it is not a finite one.

    Integral decimal strings without a point or exponent stay ints (``"70"`` is
    ``70``, not ``70.0``), as they were written.
    """
    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if number.is_integer() and stripped.lstrip("+-").isdigit():
        return int(stripped)
    return number


def number(attribute: Attribute, text: str) -> int | float | None:
    """One value of a numeric attribute as a number (``None`` when malformed)."""
    if attribute.vr in INTEGER_VRS:
        return integer(text)
    return decimal(text)


def is_numeric(attribute: Attribute) -> bool:
    """True for attributes whose values are numbers (PS3.18 F.2.3: JSON numbers)."""
    return attribute.vr in INTEGER_VRS or attribute.vr in DECIMAL_VRS
