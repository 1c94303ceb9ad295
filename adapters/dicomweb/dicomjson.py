"""Index values to the DICOM JSON model (PS3.18 Annex F.2), without pydicom data sets.

QIDO-RS answers are built straight from the engine's :class:`~pacs.core.query.model.Result`
values through one converter per attribute, chosen once from the attribute table:
building a pydicom ``Dataset`` per row and calling ``to_json_dict`` costs several times
more, and a study list of a thousand rows must stay well under half a second.

Each value is encoded by :func:`pacs.core.jsonmodel.element`, the encoder of WADO-RS
metadata and STOW-RS responses too, so an attribute reads the same in every answer
(PS3.18 F.2.2 to F.2.5; its module docstring has the rules for numbers and names).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pacs.core.attributes import ATTRIBUTES, ITEM_KEYS, Attribute
from pacs.core.jsonmodel import JsonDataset, JsonElement, constant, dumps, element, tag_key

#: The media type of every JSON answer (PS3.18 8.7.3.5): exactly this, no charset.
MEDIA_TYPE = "application/dicom+json"

#: The JSON model is UTF-8 (PS3.18 F.2), so answers declare ISO_IR 192.
UTF8 = "ISO_IR 192"

__all__ = ["FIELDS", "MEDIA_TYPE", "UTF8", "Field", "JsonDataset", "JsonElement", "Renderer",
           "constant", "dumps", "tag_key"]


def _items(attribute: Attribute) -> Callable[[str], JsonElement]:
    """Stored sequence items (JSON from the index) as DICOM JSON items (PS3.18 F.2.3)."""
    keys = ITEM_KEYS[attribute.keyword]

    def convert(text: str) -> JsonElement:
        items = [{tag_key(k.tag): element(k.vr, item[k.keyword])
                  for k in keys if k.keyword in item} for item in json.loads(text)]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}

    return convert


def _values(attribute: Attribute) -> Callable[[str], JsonElement]:
    vr = attribute.vr

    def convert(text: str) -> JsonElement:
        return element(vr, text)

    return convert


@dataclass(frozen=True)
class Field:
    """How one indexed attribute appears in DICOM JSON."""

    keyword: str
    key: str
    vr: str
    convert: Callable[[str], JsonElement]

    def element(self, text: str | None) -> JsonElement:
        """The JSON object of an index text (no ``Value`` when empty or unknown)."""
        return self.convert(text) if text else {"vr": self.vr}


#: Every attribute of the index as a JSON field, by keyword.
FIELDS: dict[str, Field] = {
    a.keyword: Field(a.keyword, tag_key(a.tag), a.vr,
                     _items(a) if a.vr == "SQ" else _values(a)) for a in ATTRIBUTES
}


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
        for key, fixed in (constants or {}).items():
            producers.append((key, _fixed(fixed)))
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
