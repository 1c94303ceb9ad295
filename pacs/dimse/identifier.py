"""C-FIND / C-MOVE / C-GET identifiers to :class:`Query`, and results back to
response identifiers (PS3.4 C.4).

An identifier is read in the transfer syntax of its presentation context, a known
attribute sent as UN as its dictionary VR (:func:`read_data_set`, PS3.5 6.2.2).

Level rules (PS3.4 C.4.1.2.1, C.4.1.3.1.1, baseline hierarchical search):
- QueryRetrieveLevel (0008,0052) must be present and valid for the model;
- no keys below the query level (unless relational queries were negotiated,
  C.4.1.2.2);
- the unique key of each level of the model above the query level, when present, holds
  one value (when absent it is taken as universal: many SCUs omit it, and refusing them
  helps nobody; this is our documented leniency).  Study Root has no Patient level:
  there Patient ID is a Required Key of the Study level (C.6.2.1, Table C.6-5), matched
  like any other key;
- retrieve identifiers (C.4.2.1.4, C.4.3.1.3) carry unique keys only, each one value
  (a list at the retrieve level), matched by value: a ``*`` or ``?`` in one is refused
  (A900), never taken as a wildcard; other keys are ignored.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom import charset
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

from pacs.core.attributes import (
    BY_KEYWORD,
    BY_TAG,
    ITEM_KEYS,
    STUDY_ROOT_REQUIRED,
    UNIQUE_KEY,
    Attribute,
    Level,
)
from pacs.core.errors import InvalidQuery
from pacs.core.query.matching import constraint
from pacs.core.query.model import Constraint, Match, Query, Result, Term
from pacs.dimse.encoding import SINGLE_BYTE_CODECS, in_repertoire

#: Patient Root (PS3.4 C.6.1) and Study Root (C.6.2) information models.
PATIENT_ROOT, STUDY_ROOT = "patient", "study"

_LEVELS = {
    PATIENT_ROOT: {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES,
                   "IMAGE": Level.IMAGE},
    STUDY_ROOT: {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.IMAGE},
}
#: Required keys of each model that the attribute table does not mark ``R``: Patient
#: ID is Required at the STUDY level of the Study Root (PS3.4 Table C.6-5), Unique at
#: the PATIENT level of the Patient Root (Table C.6-1).
MODEL_REQUIRED: dict[str, tuple[str, ...]] = {PATIENT_ROOT: (), STUDY_ROOT: STUDY_ROOT_REQUIRED}
#: The levels of each model, whose unique keys are unique keys of the model (C.6.1, C.6.2).
_MODEL_LEVELS = {model: frozenset(levels.values()) for model, levels in _LEVELS.items()}

#: Wildcard characters of C-FIND (C.2.2.2.4): no meaning in a retrieve identifier.
_WILDCARDS = frozenset("*?")

#: Timezone Offset From UTC, InstanceAvailability (PS3.4 C.4.1.1.3.1, C.3.4).
_TIMEZONE_OFFSET, INSTANCE_AVAILABILITY = 0x00080201, 0x00080056
#: Every instance the node holds is ONLINE (PS3.4 C.4.1.1.3.2: Instance Availability).
ONLINE = "ONLINE"

#: Keys that are never matched (C.4.1.1.3.1, C.2.2.2): answered or ignored.
_NOT_MATCHED = {
    0x00080005,  # SpecificCharacterSet: how the identifier is encoded
    0x00080052,  # QueryRetrieveLevel
    0x00080054,  # RetrieveAETitle: returned by us
    0x00080056,  # InstanceAvailability
    0x00080201,  # TimezoneOffsetFromUTC
}


#: Where each option the node knows sits in the C-FIND Service-Class-Application-
#: Information field (PS3.4 C.5.1.1, Tables C.5-1 and C.5-2), as an index from 0 (the
#: tables number the item bytes from 1).  Index 3 (Timezone query adjustment) and 4
#: (Enhanced Multi-Frame Image Conversion) are not supported: always answered 0.
FIND_OPTION_BYTES = {"relational": 0, "date_time_combined": 1, "fuzzy": 2,
                     "empty_value": 5, "multiple_value": 6}
#: Length of the field with every byte Table C.5-2 defines.
FIND_INFO_LENGTH = 7


@dataclass(frozen=True)
class Negotiated:
    """Extended negotiation flags of C-FIND (PS3.4 C.5.1.1, Table C.5-1)."""

    relational: bool = False
    date_time_combined: bool = False
    fuzzy: bool = False
    empty_value: bool = False
    multiple_value: bool = False

    @classmethod
    def from_info(cls, info: bytes | None) -> Negotiated:
        """Read the service-class application information bytes an SCU proposed; a
        byte it did not send is 0 (C.5.1.1.1)."""
        flags = bytes(info or b"")
        return cls(**{name: len(flags) > i and flags[i] == 1
                      for name, i in FIND_OPTION_BYTES.items()})

    def to_info(self, offered: int) -> bytes:
        """These flags as the field of an A-ASSOCIATE-AC, answering an offer of
        ``offered`` bytes.

        C.5.1.1.2: a one-byte offer is answered with one byte; a longer one with as
        many bytes as were offered (the node knows no byte past Table C.5-2's seven).
        """
        field = bytearray(FIND_INFO_LENGTH)
        for name, i in FIND_OPTION_BYTES.items():
            field[i] = int(getattr(self, name))
        return bytes(field[:max(1, min(offered, FIND_INFO_LENGTH))])


def _entity_level(attribute: Attribute, model: str) -> Level:
    """In Study Root the patient's attributes belong to the study (PS3.4 C.6.2.1)."""
    if model == STUDY_ROOT and attribute.level is Level.PATIENT:
        return Level.STUDY
    return attribute.level


def query_level(identifier: Dataset, model: str) -> Level:
    """The QueryRetrieveLevel of an identifier, validated for the model.

    Raises
    ------
    InvalidQuery
        Missing or not a level of this model (A900).
    """
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    level = _LEVELS[model].get(raw)
    if level is None:
        raise InvalidQuery("QueryRetrieveLevel is missing or not valid for this model")
    return level


def read_data_set(data: bytes, transfer_syntax: str) -> Dataset:
    """A DIMSE data set (an identifier, an Action Information) read in the transfer
    syntax of its presentation context (PS3.7 6.3), never in one guessed from its bytes.

    pydicom's ``read_dataset`` takes an Implicit VR data set for Explicit VR when the
    first element's length begins with two capital letters (a length of 0x5344 reads
    as "DS"), and the other way round; the negotiated syntax says which it is, so the
    elements are read here as it says.  Values of VR UN whose tag the data dictionary
    knows are read as their dictionary VR (:func:`_known_vrs`).

    Raises
    ------
    Exception
        Whatever pydicom raises for bytes that are not a data set in that syntax.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:  # PS3.5 A.5: the whole data set deflated, no zlib header
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    elements = data_element_generator(BytesIO(data), implicit, little)
    dataset = Dataset({element.tag: element for element in elements})
    _known_vrs(dataset)
    encoding = charset.convert_encodings(dataset.get("SpecificCharacterSet"))
    dataset.set_original_encoding(implicit, little, encoding)
    return dataset


def _known_vrs(dataset: Dataset) -> None:
    """Give each UN element of a known attribute its dictionary VR, in ``dataset`` and
    the items of its sequences.

    PS3.5 6.2.2: in Explicit VR a known attribute may come as UN, its value encoded as
    in Implicit VR Little Endian.  pydicom converts one shorter than 64 KB itself; a
    longer one (what a UI list too long for its 16-bit length field becomes, from
    pydicom and others) stays raw bytes.  The raw element is kept and only its VR
    replaced, so that pydicom decodes the value with the data set's character set.
    """
    for tag in list(dataset.keys()):
        # pydicom types get_item as returning a converted element; it returns the
        # element as read, raw until something converted it.
        element: DataElement | RawDataElement | None = dataset.get_item(tag)
        if isinstance(element, RawDataElement) and element.VR == "UN":
            vr = _dictionary_vr(tag)
            if vr is not None:
                dataset[tag] = element._replace(VR=vr, is_implicit_VR=True,
                                                is_little_endian=True)
        converted = dataset[tag]
        if converted.VR == "SQ":
            for item in converted.value or []:
                _known_vrs(item)


def _dictionary_vr(tag: BaseTag) -> str | None:
    """The one VR the data dictionary gives a public tag; ``None`` for a private or
    unknown tag, or one whose VR depends on other values (``US or SS``)."""
    if tag.is_private or not dictionary_has_tag(tag):
        return None
    vr = str(dictionary_VR(tag))
    return None if " or " in vr or vr == "UN" else vr


def raw_value(element: DataElement) -> str:
    """An element's value as matching text, multiple values joined by ``\\``.

    Raises
    ------
    InvalidQuery
        The value is bytes, not text or a number: a key of a binary VR, or UN of an
        attribute the data dictionary does not know (:func:`read_data_set` reads any
        other UN as its dictionary VR).
    """
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        raise InvalidQuery(f"{element.keyword or element.tag} has no text value ({element.VR})")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def to_find_query(identifier: Dataset, model: str, negotiated: Negotiated = Negotiated(),
                  ) -> tuple[Query, list[int]]:
    """A C-FIND identifier as a query, plus the tags we cannot answer (for FF01)."""
    level = query_level(identifier, model)
    constraints: list[Constraint] = []
    returns: list[Attribute] = []
    unsupported: list[int] = []
    item_keys: list[tuple[str, tuple[str, ...]]] = []
    for element in identifier:
        tag = int(element.tag)
        if tag == _TIMEZONE_OFFSET:
            # Never a matching key, returned when asked for (PS3.4 C.4.1.1.3.1).
            returns.append(BY_TAG[tag])
            continue
        if tag in _NOT_MATCHED or element.tag.group == 0x0000:
            continue
        attribute = BY_TAG.get(tag)
        if attribute is None or (element.VR == "SQ") != (attribute.vr == "SQ"):
            unsupported.append(tag)
            continue
        if _entity_level(attribute, model).depth > level.depth and not negotiated.relational:
            raise InvalidQuery(f"{attribute.keyword} is below the query level {level.name}")
        if attribute.vr == "SQ":
            found, asked = sequence_constraint(attribute, element, negotiated)
            if found is not None:
                constraints.append(found)
            item_keys.append((attribute.keyword, asked))
            returns.append(attribute)
            continue
        raw = _decoded(element)
        _check_upper_unique(attribute, level, model, raw, negotiated)
        found = constraint(attribute, raw, empty_value_matching=negotiated.empty_value,
                           multiple_value_matching=negotiated.multiple_value)
        if found is not None and not attribute.matched:
            # A count with a value: returned, not matched (PS3.4 C.4.1.1.3.2: FF01).
            unsupported.append(tag)
        elif found is not None:
            constraints.append(found)
        returns.append(attribute)
    # Relational: the keys of lower levels are answered too, zero-length
    # (PS3.4 C.4.1.1.3.2; Query.empty_below).
    query = Query(level=level, constraints=tuple(constraints), return_keys=tuple(returns),
                  fuzzy=negotiated.fuzzy, item_keys=tuple(item_keys),
                  empty_below=negotiated.relational, required=MODEL_REQUIRED[model])
    return query, unsupported


def sequence_constraint(attribute: Attribute, element: DataElement,
                        negotiated: Negotiated = Negotiated(),
                        ) -> tuple[Constraint | None, tuple[str, ...]]:
    """C.2.2.2.6 sequence matching: the key holds one item whose item keys must all match
    one stored item.  An empty sequence or an empty item is universal matching.

    Returns the constraint (or ``None``) and the item keywords asked for (returned).
    """
    items = element.value or []
    if len(items) > 1:
        raise InvalidQuery(f"{attribute.keyword}: sequence matching takes one item")
    known = {key.tag: key for key in ITEM_KEYS[attribute.keyword]}
    constraints: list[Constraint] = []
    asked: list[str] = []
    for item_element in (items[0] if items else []):
        key = known.get(int(item_element.tag))
        if key is None:
            continue  # an item key we do not keep: not matched, not returned
        asked.append(key.keyword)
        found = constraint(key, _decoded(item_element),
                           empty_value_matching=negotiated.empty_value)
        if found is not None:
            constraints.append(found)
    if not constraints:
        return None, tuple(asked)
    return Constraint(attribute, (Term(Match.SEQUENCE, items=tuple(constraints)),)), tuple(asked)


def _decoded(element: DataElement) -> str:
    try:
        return raw_value(element)
    except Exception:  # noqa: BLE001 - whatever pydicom raises is a bad identifier
        raise InvalidQuery(f"the value of {element.keyword or element.tag} does not decode") \
            from None


def _check_upper_unique(attribute: Attribute, level: Level, model: str, raw: str,
                        negotiated: Negotiated) -> None:
    """C.4.1.2.1: a unique key of a level above the query level holds a single value.

    Only the unique keys of the model's levels: Study Root has no Patient level, and
    there Patient ID is a Required Key of the Study level (C.6.2.1, Table C.6-5),
    matched with wildcards (C.2.2.2.4) and lists (C.2.2.2.8) like any other.
    """
    if (negotiated.relational or not _unique_in_model(attribute, model)
            or attribute.level.depth >= level.depth):
        return
    # "*" alone is universal matching, as the key left empty (C.2.2.2.3); any other
    # wildcard is not a single value.
    if "\\" in raw or "?" in raw or ("*" in raw and raw.strip("*")):
        raise InvalidQuery(f"{attribute.keyword} above the query level must be one value")


def _unique_in_model(attribute: Attribute, model: str) -> bool:
    """Whether ``attribute`` is the unique key of one of the model's levels."""
    return attribute.key == "U" and attribute.level in _MODEL_LEVELS[model]


def to_retrieve_query(identifier: Dataset, model: str) -> Query:
    """A C-MOVE / C-GET identifier as a query on unique keys (C.4.2.1.4, C.4.3.1.3).

    Each unique key is matched by its value (or UID list): a retrieve has no wildcard
    or range matching, so Patient ID ``P*`` names no patient (and ``?*`` not all).

    Raises
    ------
    InvalidQuery
        A bad level, no unique key at the retrieve level, a list above it, or a ``*``
        or ``?`` in a unique key (A900: Identifier does not match SOP Class, Tables
        C.4-2 and C.4-3).
    """
    level = query_level(identifier, model)
    constraints: list[Constraint] = []
    for lvl in Level:
        if lvl.depth > level.depth or (model == STUDY_ROOT and lvl is Level.PATIENT):
            continue
        key = UNIQUE_KEY[lvl]
        element = identifier.get(key.tag)
        raw = raw_value(element).strip() if element is not None else ""
        if not raw or raw == "*":
            if lvl is level:
                raise InvalidQuery(f"{key.keyword} is required at the {level.name} level")
            continue
        if "\\" in raw and lvl is not level:
            raise InvalidQuery(f"a list of {key.keyword} is only allowed at the retrieve level")
        if _WILDCARDS.intersection(raw):
            raise InvalidQuery(f"{key.keyword} holds a wildcard: a retrieve matches unique "
                               "keys by value")
        found = constraint(key, raw)
        if found is not None:
            constraints.append(found)
    return Query(level=level, constraints=tuple(constraints))


#: Most terms of a requested Specific Character Set the responses repeat: code
#: extensions name a handful (PS3.3 C.12.1.1.2).
MAX_CHARSET_TERMS = 8
#: The defined terms (those pydicom can encode in).
_CHARSET_TERMS = frozenset(charset.python_encoding)


def echoable_charset(requested: list[str] | None) -> list[str] | None:
    """The request's Specific Character Set as its responses may repeat it: each term
    once, in order; ``None`` (the responses are in UTF-8) when it names a term that is
    not a defined term or more than :data:`MAX_CHARSET_TERMS` of them.  A list of
    80,000 terms would otherwise be copied into every response (as UN, too long for CS
    in Explicit VR), each term checked against every value of every response.
    """
    if not requested:
        return None
    terms = list(dict.fromkeys(term.strip() for term in requested))
    if len(terms) > MAX_CHARSET_TERMS or not _CHARSET_TERMS.issuperset(terms):
        return None
    return terms


def response_charset(values: Iterable[str | None], requested: list[str] | None) -> list[str]:
    """The character set of a response (PS3.4 C.4.1.1.3.2; PS3.5 6.1).

    The request's character set when it can represent every value, each character in
    the repertoire of one of its terms (:func:`_represented`); otherwise, or when the
    request named none, UTF-8 (ISO_IR 192), which represents anything.
    """
    texts = [v for v in values if v]
    if requested and any(requested):
        terms = [r or "ISO_IR 6" for r in requested]
        if all(_represented(ch, terms) for text in texts for ch in set(text)):
            return list(requested)
    return ["ISO_IR 192"]


def _represented(character: str, terms: list[str]) -> bool:
    """Whether a response in ``terms`` carries ``character`` within their repertoires.

    ASCII is in every term's G0 (PS3.5 6.1.2.2; ISO-IR 14, the G0 of ISO-IR 13, differs
    only at 05/12 and 07/14, which pydicom writes alike).  With code extensions whose first term
    is the default repertoire, pydicom (which writes them) tries the whole value in that
    term's codec first, Latin-1 in pydicom: a Latin-1 letter would go out without the
    escape sequence that designates its set (PS3.5 6.1.2.5), so it is not carried.
    """
    if character.isascii():
        return True
    if len(terms) > 1 and SINGLE_BYTE_CODECS.get(terms[0]) == "ascii" and _latin_1(character):
        return False
    return any(in_repertoire(character, term) for term in terms)


def _latin_1(character: str) -> bool:
    """Whether ``character`` is one of Latin-1's (ISO-IR 100 with ISO-IR 6)."""
    return ord(character) < 0x100


class ResponseBuilder:
    """Builds C-FIND response identifiers for one query (C.4.1.1.3.2).

    Every requested key comes back (empty when unknown), with the unique keys of the
    model's levels at and above the query level, QueryRetrieveLevel, RetrieveAETitle and
    SpecificCharacterSet.  Elements are ``(tag, VR, text)`` for
    :func:`pacs.dimse.encoding.encode_identifier`.
    """

    def __init__(self, query: Query, model: str, ae_title: str,
                 requested_charset: list[str] | None, extra: list[tuple[int, str]],
                 availability: bool = False) -> None:
        requested = {a.keyword for a in query.return_keys} | {
            c.attribute.keyword for c in query.constraints}
        requested |= {UNIQUE_KEY[level].keyword for level in _LEVELS[model].values()
                      if level.depth <= query.level.depth}
        self.attributes = {k: BY_KEYWORD[k] for k in requested}
        self.level_name = next(k for k, v in _LEVELS[model].items() if v is query.level)
        self.ae_title = ae_title
        self.requested_charset = echoable_charset(requested_charset)
        self.extra = extra
        self.item_keys = dict(query.item_keys)
        #: Instance Availability asked for: every match ONLINE.
        self.availability = availability

    def _items(self, keyword: str, value: str | None) -> list[list[tuple[int, str, str | None]]]:
        """Stored sequence items with only the item keys asked for (C.2.2.2.6); all of
        them for a zero-length key or an empty item."""
        if not value:
            return []
        asked = set(self.item_keys.get(keyword) or ())
        keys = [k for k in ITEM_KEYS[keyword] if not asked or k.keyword in asked]
        return [[(k.tag, k.vr, item.get(k.keyword)) for k in keys] for item in json.loads(value)]

    def build(self, result: Result) -> tuple[list[tuple[int, str, str | None]], list[str]]:
        """The response elements for one match, and their character set."""
        charsets = response_charset(result.values.values(), self.requested_charset)
        elements: list[tuple[int, str, str | None]] = [
            (0x00080005, "CS", "\\".join(charsets)),
            (0x00080052, "CS", self.level_name),
            (0x00080054, "AE", self.ae_title),
        ]
        if self.availability:
            elements.append((INSTANCE_AVAILABILITY, "CS", ONLINE))
        for keyword, value in result.values.items():
            attribute = self.attributes.get(keyword)
            if attribute is not None and attribute.vr == "SQ":
                elements.append((attribute.tag, "SQ", self._items(keyword, value)))  # type: ignore[arg-type]
            elif attribute is not None:
                elements.append((attribute.tag, attribute.vr, value))
        present = {tag for tag, _, _ in elements}
        elements += [(tag, vr, None) for tag, vr in self.extra if tag not in present]
        return elements, charsets
