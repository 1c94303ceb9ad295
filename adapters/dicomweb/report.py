"""A Structured Report rendered as text (PS3.18 8.7.4: the Text resource category,
``text/html`` by default, ``text/plain`` required).

Read from the instance's DICOM JSON metadata alone (the content tree is in it; the
object is not opened): the document's title, its patient and state, then each content
item (PS3.3 C.17.3) as one line - its concept name and its value - indented under its
parent.  Values by Value Type (PS3.3 Table C.17.3-7): ``TEXT``, ``CODE`` (the code's
meaning), ``NUM`` (the number and its unit), ``DATE`` / ``TIME`` / ``DATETIME``,
``PNAME``, ``UIDREF``, the referenced instance of ``IMAGE`` / ``COMPOSITE`` /
``WAVEFORM``, and that a ``SCOORD`` / ``SCOORD3D`` / ``TCOORD`` has coordinates.  A
value the metadata keeps as bulk data (a text longer than the inline limit) is named,
not fetched.

The HTML is the same lines as nested lists, every value escaped: what a sender wrote never becomes
markup (and every DICOMweb answer is sandboxed besides,
:data:`adapters.dicomweb.app.DICOMWEB_POLICY`).  The tree's depth is bounded by the walk
that proved the object whole at ingest (``pacs.core.dataset``), its size by the
metadata's own limits.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any

from pacs.core.metadata import value, values

TEXT_PLAIN = "text/plain"
TEXT_HTML = "text/html"
#: The media types of a rendered report, the default first (PS3.18 Table 8.7.4-1).
REPORT_TYPES = (TEXT_HTML, TEXT_PLAIN)

_CONTENT_SEQUENCE = 0x0040A730
_VALUE_TYPE = 0x0040A040
_CONCEPT_NAME = 0x0040A043
_CODE_MEANING = 0x00080104
_CODE_VALUE = 0x00080100
#: The element holding each Value Type's value (PS3.3 Table C.17.3-7), or ``None`` for
#: those rendered otherwise.
_VALUE_OF = {"TEXT": 0x0040A160, "DATE": 0x0040A121, "TIME": 0x0040A122,
             "DATETIME": 0x0040A120, "UIDREF": 0x0040A124, "PNAME": 0x0040A123}
_CONCEPT_CODE = 0x0040A168
_MEASURED_VALUE = 0x0040A300
_NUMERIC_VALUE = 0x0040A30A
_UNITS = 0x004008EA
_REFERENCED_SOP = 0x00081199
_REFERENCED_SOP_INSTANCE = 0x00081155
_COORDINATES = ("SCOORD", "SCOORD3D", "TCOORD")
#: Header lines: (label, tag) of the document's own attributes.
_HEADER = (("Patient", 0x00100010), ("Patient ID", 0x00100020),
           ("Study date", 0x00080020), ("Completion", 0x0040A491),
           ("Verification", 0x0040A493))


def is_report(doc: dict[str, Any]) -> bool:
    """True for an SR document: a root content item of type ``CONTAINER``
    (PS3.3 C.17.3) with a content tree."""
    return value(doc, _VALUE_TYPE) == "CONTAINER" and bool(values(doc, _CONTENT_SEQUENCE))


def lines(doc: dict[str, Any]) -> Iterator[tuple[int, str, str]]:
    """(depth, label, value) of the report's lines: its title (depth 0, no value), its
    header, then each content item under its parent."""
    yield 0, _concept(doc) or "Report", ""
    for label, tag in _HEADER:
        value = _text(doc, tag)
        if value:
            yield 1, label, value
    yield from _items(doc, 1)


def as_text(doc: dict[str, Any]) -> str:
    """The report as plain text, two spaces of indent per level."""
    return "".join(f"{'  ' * depth}{label}{': ' + value if value else ''}\n"
                   for depth, label, value in lines(doc))


def as_html(doc: dict[str, Any]) -> str:
    """The report as an HTML document, every value escaped, each content item a list
    item under its parent's.

    The nesting is the markup's own, not a style: the sandbox's policy
    (``default-src 'none'``) drops every style attribute, and a tree drawn by margins
    showed flat.
    """
    rendered = lines(doc)
    _depth, title, _value = next(rendered)
    parts = []
    opened = 0  # lists open, the last item of each open too
    for depth, label, text in rendered:
        if depth > opened:
            parts.append("<ul>" * (depth - opened))
        else:
            parts.append("</li>" + "</ul></li>" * (opened - depth))
        opened = depth
        parts.append(f"\n<li><b>{html.escape(label)}</b>"
                     f"{': ' + html.escape(text) if text else ''}")
    parts.append("</li></ul>" * opened)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{''.join(parts)}\n</body></html>\n")


def _items(parent: dict[str, Any], depth: int) -> Iterator[tuple[int, str, str]]:
    for item in _sequence(parent, _CONTENT_SEQUENCE):
        kind = str(value(item, _VALUE_TYPE) or "")
        yield depth, _concept(item) or kind or "Item", _value(item, kind)
        yield from _items(item, depth + 1)


def _value(item: dict[str, Any], kind: str) -> str:
    """The value of a content item, as text."""
    if kind in _VALUE_OF:
        return _text(item, _VALUE_OF[kind])
    if kind == "CODE":
        return _code(_sequence(item, _CONCEPT_CODE))
    if kind == "NUM":
        measured = _sequence(item, _MEASURED_VALUE)
        if not measured:
            return "(no value)"
        number = _text(measured[0], _NUMERIC_VALUE)
        units = _sequence(measured[0], _UNITS)
        unit = str(value(units[0], _CODE_VALUE) or "") if units else ""
        return f"{number} {unit}".strip()
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        referenced = _sequence(item, _REFERENCED_SOP)
        uid = value(referenced[0], _REFERENCED_SOP_INSTANCE) if referenced else None
        return f"instance {uid}" if uid else ""
    if kind in _COORDINATES:
        return "(coordinates)"
    return ""


def _concept(item: dict[str, Any]) -> str:
    return _code(_sequence(item, _CONCEPT_NAME))


def _code(codes: list[dict[str, Any]]) -> str:
    if not codes:
        return ""
    return str(value(codes[0], _CODE_MEANING) or value(codes[0], _CODE_VALUE) or "")


def _text(item: dict[str, Any], tag: int) -> str:
    """An element's values as text: person names by their alphabetic group, a value the
    metadata keeps as bulk data named so."""
    element = item.get(f"{tag:08X}")
    if not isinstance(element, dict):
        return ""
    if "BulkDataURI" in element or "InlineBinary" in element:
        return "(a long value, in the bulk data)"
    shown = []
    for one in element.get("Value") or []:
        if isinstance(one, dict):  # PN (PS3.18 F.2.2)
            one = one.get("Alphabetic", "")
        shown.append(str(one))
    return "\\".join(shown)


def _sequence(item: dict[str, Any], tag: int) -> list[dict[str, Any]]:
    """The items of a sequence element."""
    return [v for v in values(item, tag) if isinstance(v, dict)]
