"""Index values to the DICOM JSON model (PS3.18 Annex F.2), without pydicom data sets.

QIDO-RS answers are built straight from the engine's :class:`~pacs.query.model.Result`
values through one converter per attribute, chosen once from the attribute table:
building a pydicom ``Dataset`` per row and calling ``to_json_dict`` costs several times
more, and a study list of a thousand rows must stay well under half a second.

Rules applied (PS3.18 F.2.2–F.2.3):

- an object per attribute keyed by its 8 upper-case hex digits, with ``vr``;
- ``Value`` is always an array; an empty or unknown value has no ``Value`` at all;
- PN values are objects with ``Alphabetic``, ``Ideographic`` and ``Phonetic``
  component groups (split on ``=``; empty groups left out);
- IS, DS and the binary numeric VRs are JSON numbers; a malformed number is left out
  rather than sent as text a client would choke on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pacs.attributes import ATTRIBUTES, ITEM_KEYS, Attribute
from pacs.query import values as index_values

#: The media type of every JSON answer (PS3.18 8.7.3.5): exactly this, no charset.
MEDIA_TYPE = "application/dicom+json"

#: The JSON model is UTF-8 (PS3.18 F.2), so answers declare ISO_IR 192.
UTF8 = "ISO_IR 192"

#: PN component groups in their order within a value (PS3.5 6.2.1, PS3.18 F.2.2).
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")

JsonElement = dict[str, Any]
JsonDataset = dict[str, JsonElement]


def tag_key(tag: int) -> str:
    """The JSON key of a tag: eight upper-case hex digits (PS3.18 F.2.1.1)."""
    return f"{tag:08X}"


def person_name(text: str) -> dict[str, str]:
    """One PN value as its component-group object (PS3.18 F.2.2)."""
    groups = text.split("=")
    return {name: group for name, group in zip(PN_GROUPS, groups) if group}


def _strings(attribute: Attribute) -> Callable[[str], list[Any]]:
    def convert(text: str) -> list[Any]:
        # An empty value among several keeps its place as null (PS3.18 F.2.5).
        return [v or None for v in index_values.split(attribute, text)]

    return convert


def _names(attribute: Attribute) -> Callable[[str], list[Any]]:
    def convert(text: str) -> list[Any]:
        return [person_name(v) if v else None for v in index_values.split(attribute, text)]

    return convert


def _numbers(attribute: Attribute) -> Callable[[str], list[Any]]:
    def convert(text: str) -> list[Any]:
        numbers = (index_values.number(attribute, v) for v in index_values.split(attribute, text))
        return [n for n in numbers if n is not None]

    return convert


def _items(attribute: Attribute) -> Callable[[str], list[Any]]:
    """Stored sequence items (JSON from the index) as DICOM JSON items (PS3.18 F.2.3)."""
    keys = ITEM_KEYS[attribute.keyword]

    def convert(text: str) -> list[Any]:
        return [{tag_key(k.tag): ({"vr": k.vr, "Value": [item[k.keyword]]}
                                  if item.get(k.keyword) else {"vr": k.vr})
                 for k in keys if k.keyword in item} for item in json.loads(text)]

    return convert


def converter(attribute: Attribute) -> Callable[[str], list[Any]]:
    """The function turning an index text of ``attribute`` into a JSON ``Value`` array."""
    if attribute.vr == "SQ":
        return _items(attribute)
    if attribute.vr == "PN":
        return _names(attribute)
    if index_values.is_numeric(attribute):
        return _numbers(attribute)
    return _strings(attribute)


@dataclass(frozen=True)
class Field:
    """How one indexed attribute appears in DICOM JSON."""

    keyword: str
    key: str
    vr: str
    convert: Callable[[str], list[Any]]

    def element(self, text: str | None) -> JsonElement:
        """The JSON object of one value (no ``Value`` when empty or unknown)."""
        if not text:
            return {"vr": self.vr}
        converted = self.convert(text)
        return {"vr": self.vr, "Value": converted} if converted else {"vr": self.vr}


#: Every attribute of the index as a JSON field, by keyword: THE converter table.
FIELDS: dict[str, Field] = {
    a.keyword: Field(a.keyword, tag_key(a.tag), a.vr, converter(a)) for a in ATTRIBUTES
}


def constant(vr: str, *values: Any) -> JsonElement:
    """A JSON element with fixed values."""
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


class Renderer:
    """Turns result rows into DICOM JSON objects with keys in tag order.

    Parameters
    ----------
    keywords :
        The keywords every row carries (the same for all rows of one query).
    constants :
        Elements added to every row, by JSON key (e.g. SpecificCharacterSet).
    computed :
        Elements computed from each row's values, by JSON key (e.g. RetrieveURL).
    """

    def __init__(self, keywords: Iterable[str],
                 constants: Mapping[str, JsonElement] | None = None,
                 computed: Mapping[str, Callable[[Mapping[str, str | None]], JsonElement]]
                 | None = None) -> None:
        producers: list[tuple[str, Callable[[Mapping[str, str | None]], JsonElement]]] = []
        for keyword in keywords:
            field = FIELDS.get(keyword)
            if field is not None:
                producers.append((field.key, _from_field(field)))
        for key, element in (constants or {}).items():
            producers.append((key, _fixed(element)))
        producers.extend((computed or {}).items())
        self._producers = sorted(producers, key=lambda item: item[0])

    def row(self, values: Mapping[str, str | None]) -> JsonDataset:
        """One row as a DICOM JSON object."""
        return {key: produce(values) for key, produce in self._producers}


def _from_field(field: Field) -> Callable[[Mapping[str, str | None]], JsonElement]:
    keyword = field.keyword

    def produce(values: Mapping[str, str | None]) -> JsonElement:
        return field.element(values.get(keyword))

    return produce


def _fixed(element: JsonElement) -> Callable[[Mapping[str, str | None]], JsonElement]:
    def produce(values: Mapping[str, str | None]) -> JsonElement:
        return element

    return produce


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON (PS3.18 F.2: the model is UTF-8; non-ASCII stays as is)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
