"""The DICOM JSON model (PS3.18 Annex F) of a data set, fast enough for every ingest.

pydicom's ``Dataset.to_json_dict`` decodes and validates every element first, which
costs about 10 ms for a CT header with its private tags; ingest pays this for every
instance.  This encoder works on pydicom's raw, undecoded elements instead and
converts the common value representations straight from their bytes.  pydicom
decodes what is unusual, and a text value it decoded is encoded here like any other;
pydicom's own ``DataElement.to_json_dict`` is left only the binary values among them:

- ISO 2022 character sets (code extensions switch codecs inside a value);
- implicit VR elements whose VR the dictionary does not settle (private, "US or SS");
- UN values of a known public tag (decoded by their real VR);
- elements pydicom converted before (a header ingest has read);
- sequences (their items are walked here again).

Rules (PS3.18 F.2): keys are eight upper-case hex digits; ``Value`` is always an
array and absent for an empty element (F.2.5), empty values inside a multi-valued
element are ``null``; OB, OD, OF, OL, OV, OW and UN values longer than
:data:`BULK_DATA_THRESHOLD` bytes get a ``BulkDataURI`` naming their place in the data
set, shorter ones ``InlineBinary`` (F.2.7).  Text values keep leading spaces and lose
trailing padding, as in pydicom.  At most :data:`INLINE_VALUE_BYTES` of text and
number values are written per instance; past them a value is referenced by
``BulkDataURI`` where PS3.18 10.4.3.3.2 allows it, else left out.

Values written as text (strings, person names, decimal and integer strings) become JSON
values through :func:`element`, the one encoder of every DICOM JSON answer: WADO-RS
metadata here, QIDO-RS rows from index text (``adapters.dicomweb.dicomjson``) and
STOW-RS responses.  Its rules:

- PN values are objects of their non-empty component groups (F.2.2); an empty name
  is ``null``;
- DS, IS and the binary numeric VRs are JSON numbers (F.2.3).  A value is read by the
  DS grammar of PS3.5 6.2 (ASCII digits, sign, point, exponent, surrounding spaces)
  and sent as the binary64 number nearest to it, which is what JSON readers make of a
  number (RFC 8259 section 6): an integral value below 2**53 as an integer (``"70"``,
  ``"70.0"`` and ``"7e1"`` are all ``70``, ``"-0"`` is ``0``), any other in its
  shortest form (``"0.50"`` is ``0.5``).  IS accepts integral values written as
  decimals (``"7.0"`` is ``7``), as pydicom does.  Text that is not a finite number
  (``"NaN"``, ``"1,5"``, ``"1e999"``), a non-integral IS and an integer beyond 2**53
  are ``null``: F.2.3 allows a string there, but clients (OHIF) do arithmetic on these
  values and must not be handed text.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import struct
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import orjson
from pydicom import datadict
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)

#: Binary values longer than this many bytes are referenced by BulkDataURI, not inlined
#: (pydicom's default; small OB values such as private flags stay inline).
BULK_DATA_THRESHOLD = 1024

#: Most bytes of element values one instance's metadata writes as ``Value`` arrays,
#: counted as they are read (each value also counts :data:`VALUE_COST`).  A value
#: costs far more as Python and JSON values than as bytes: a UC value of 64 MiB of
#: backslashes (64 million empty values) took 5.5 s
#: and 1.3 GB to encode, and an object may hold such values up to
#: ``PACS_MAX_OBJECT_BYTES``.  Past this, a value whose VR PS3.18 10.4.3.3.2 lets be
#: replaced gets a ``BulkDataURI`` (its bytes are then sent by the bulk data
#: resource); any other is left out (logged).  Real headers hold a few hundred KB of
#: such values; an RT Structure Set's contour data can pass this and is then
#: referenced.
INLINE_VALUE_BYTES = 16 << 20
#: PS3.18 10.4.3.3.2: the VRs whose Value Field the origin server may replace by a
#: Bulkdata URI in metadata.
REPLACEABLE_VRS = frozenset({"DS", "FL", "FD", "IS", "LT", "OB", "OD", "OF", "OL", "OV",
                             "OW", "SL", "SS", "ST", "SV", "UC", "UL", "UN", "US", "UT",
                             "UV"})

#: Tags that end a header read with ``stop_before_pixels`` (PS3.5 Table 7.1-1: float,
#: double float and integer pixel data); the top level's are referenced by the caller.
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
#: VRs whose values are text in the data set, encoded by :func:`element`.
_WRITTEN_AS_TEXT = _TEXT_VRS | {"DS", "IS", "PN"}
#: PS3.5 6.1.2.3: only these are decoded with Specific Character Set.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                   "SV": "q", "UV": "Q"}
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PIXEL_SET = frozenset(PIXEL_TAGS)
#: The codec of the default repertoire (pydicom's lenient choice for it).
DEFAULT_CHARSET = "iso8859"


# --- values written as text: the one encoder of every DICOM JSON answer ----------------

JsonElement = dict[str, Any]
JsonDataset = dict[str, JsonElement]

#: PS3.5 6.2: these hold one value; a backslash is part of it.
SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})
#: VRs whose values are integers: IS and the binary integers, which the index keeps as
#: text (PS3.5 6.2).
INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
#: VRs whose values are JSON numbers (PS3.18 F.2.3).
NUMBER_VRS = INTEGER_VRS | {"DS", "FD", "FL"}
#: PN component groups in their order within a value (PS3.5 6.2.1, PS3.18 F.2.2).
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")

#: PS3.5 6.2 DS: a fixed or floating point number of ASCII characters.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
#: Integers a binary64 number holds exactly: what a JSON reader keeps (RFC 8259 6).
EXACT_INTEGERS = 2 ** 53


def tag_key(tag: int) -> str:
    """The JSON key of a tag: eight upper-case hex digits (PS3.18 F.2.1.1)."""
    return f"{tag:08X}"


def number(vr: str, text: str) -> int | float | None:
    """One value of a numeric VR as its JSON number; ``None`` when it states none.

    See the module docstring for the rules (PS3.5 6.2, PS3.18 F.2.3).
    """
    text = text.strip(" \0")
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    if value.is_integer() and abs(value) < EXACT_INTEGERS:
        return int(value)
    if vr in INTEGER_VRS or not math.isfinite(value):
        return None
    return value


def person_name(text: str) -> dict[str, str] | None:
    """One PN value as its object of non-empty component groups (PS3.18 F.2.2);
    ``None`` for an empty name."""
    groups = text.rstrip(" \0").split("=")
    name = {group: value for group, value in zip(PN_GROUPS, groups, strict=False) if value}
    return name or None


def _strings(text: str) -> list[Any]:
    # An empty value among several keeps its place as null (PS3.18 F.2.5).
    return [part.rstrip(" \0") or None for part in text.split("\\")]


def _single(text: str) -> list[Any]:
    return [text.rstrip(" \0") or None]


def _names(text: str) -> list[Any]:
    return [person_name(part) for part in text.split("\\")]


def _number_values(vr: str) -> Callable[[str], list[Any]]:
    def convert(text: str) -> list[Any]:
        return [number(vr, part) for part in text.split("\\")]

    return convert


@cache
def values_of(vr: str) -> Callable[[str], list[Any]]:
    """The function turning the text of a ``vr`` element into its ``Value`` array
    (values separated by backslashes, PS3.5 6.4), chosen once per VR."""
    if vr == "PN":
        return _names
    if vr in NUMBER_VRS:
        return _number_values(vr)
    if vr in SINGLE_VALUED_VRS:
        return _single
    return _strings


def element(vr: str, text: str | None) -> JsonElement:
    """The DICOM JSON object of an element whose value is ``text`` (PS3.18 F.2.2).

    ``Value`` is left out when there is no value, or none that is not ``null``
    (PS3.18 F.2.5).
    """
    if text:
        converted = values_of(vr)(text)
        for item in converted:
            if item is not None:
                return {"vr": vr, "Value": converted}
    return {"vr": vr}


def constant(vr: str, *values: Any) -> JsonElement:
    """A JSON element with values already in their JSON form."""
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON text (PS3.18 F.2: the model is UTF-8; non-ASCII stays as is).

    orjson writes a number in its shortest form, the same for every answer.
    """
    return orjson.dumps(document)


def as_text(value: Any) -> str | None:
    """The text of a value pydicom has already converted (``None``: not a text value).

    pydicom keeps the original text of DS and IS values and the component groups of
    PN values, so this is the element's text as written, values joined by ``\\``.
    """
    if value is None:
        return ""
    if isinstance(value, str | int | float | PersonName):
        return str(value)
    if isinstance(value, MultiValue | list | tuple):
        parts = [as_text(v) for v in value]
        return None if None in parts else "\\".join(parts)  # type: ignore[arg-type]
    return None


class Encoder:
    """Raw elements to DICOM JSON values (PS3.18 F.2.3 to F.2.7).

    Each value representation has a converter in :data:`_CONVERTERS`; a converter that
    returns ``None`` hands the element to pydicom (see the module docstring).
    """

    def __init__(self, base: str, little: bool) -> None:
        self.base = base
        self.order = "<" if little else ">"
        #: What is left of :data:`INLINE_VALUE_BYTES` for this document.
        self.inline_left = INLINE_VALUE_BYTES

    def dataset(self, ds: Dataset, path: tuple[str, ...],
                charset: str | None) -> dict[str, Any]:
        """Every element of ``ds``; ``path`` names its position for BulkDataURIs."""
        out: dict[str, Any] = {}
        top = not path
        for tag, elem in list(ds.items()):  # the elements as read, raw or converted
            code = int(tag)  # pydicom's BaseTag compares in Python; ints in C
            if code >> 16 == 0x0002 or (top and code in _PIXEL_SET):
                continue  # file meta; the top level's pixel data is added by the caller
            key = _KEYS.get(code) or _key(code)
            try:
                converted = None
                if type(elem) is RawDataElement:
                    vr = elem.VR if not elem.is_implicit_VR else _implicit_vr(code)
                    converted = self.over_budget(elem, vr, code, path, key)
                    converter = _CONVERTERS.get(vr) if vr else None
                    if vr and converter is not None and converted is None:
                        value = elem.value
                        converted = (converter(self, vr, value, code, path, key, charset)
                                     if value else {"vr": _empty_vr(vr, code)})
                if converted is _LEFT_OUT:
                    log.warning("element %s left out of the metadata: its values pass "
                                "INLINE_VALUE_BYTES", key)
                    continue
                out[key] = converted or self.decoded(ds, code, path, key, charset)
            except Exception:  # noqa: BLE001 - an odd value must not lose the rest
                log.warning("element %s left out of the metadata: its value does not "
                            "decode", key)
        return out

    def over_budget(self, elem: RawDataElement, vr: str | None, tag: int,
                    path: tuple[str, ...], key: str) -> JsonElement | None:
        """What a raw element becomes when its value would pass what is left of
        :data:`INLINE_VALUE_BYTES`: a ``BulkDataURI`` (PS3.18 10.4.3.3.2), or
        :data:`_LEFT_OUT`; ``None`` when it is within (and now counted), or is not
        written as values (bulk data, sequences, whose items are counted)."""
        value = elem.value or b""
        named = vr or _public_vr(tag) or "UN"  # implicit VR: "US or SS", "OB or OW"
        if not value or named in _BULK_VRS or named == "SQ" or named.startswith("OB"):
            return None
        size = _cost(value, named)
        self.inline_left -= size
        if self.inline_left >= 0:
            return None
        self.inline_left += size
        if all(kind in REPLACEABLE_VRS for kind in named.split(" or ")):
            return {"vr": vr or named.split(" or ")[0], "BulkDataURI": self.uri(path, key)}
        return _LEFT_OUT

    def decoded(self, ds: Dataset, tag: int, path: tuple[str, ...], key: str,
                charset: str | None) -> dict[str, Any]:
        """An element pydicom decodes (and sequences, whose items are walked here)."""
        decoded = ds[tag]
        if decoded.VR == "SQ":
            items = [self.dataset(item, (*path, key, str(count)), _charset_of(item, charset))
                     for count, item in enumerate(decoded.value, start=1)]
            # PS3.18 F.2.5: an empty sequence has no Value.
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        if decoded.VR in _WRITTEN_AS_TEXT:
            # Values pydicom has converted (an element read during ingest, an ISO 2022
            # text, a UN value of a known tag) still go through the one encoder.
            text = as_text(decoded.value)
            if text is not None:
                return element(decoded.VR, text)
        return decoded.to_json_dict(
            bulk_data_element_handler=lambda _e: self.uri(path, key),
            bulk_data_threshold=BULK_DATA_THRESHOLD)

    def uri(self, path: tuple[str, ...], key: str) -> str:
        """The relative BulkDataURI of the value ``key`` at ``path``."""
        return f"{self.base}/{'/'.join((*path, key))}"


#: What one value costs beyond its bytes, as a Python object and its place in a list
#: while the JSON is built (and as ``null,`` in the JSON): charged per value, so that
#: a value of many empty values spends the budget as fast as it takes memory.
VALUE_COST = 16


def _cost(value: bytes, vr: str) -> int:
    """The budget a raw value spends (:data:`INLINE_VALUE_BYTES`): its bytes, and
    :data:`VALUE_COST` per value (binary numbers: by their size; text: separated by
    backslashes, PS3.5 6.4)."""
    code = _BINARY_NUMBERS.get(vr)
    if code is not None:
        return len(value) + VALUE_COST * (len(value) // _SINGLE["<" + code].size)
    return len(value) + VALUE_COST * (value.count(b"\\") + 1)


#: :meth:`Encoder.over_budget`'s answer for an element left out of the metadata.
_LEFT_OUT: JsonElement = {}

_Converter = Callable[[Encoder, str, bytes, int, tuple[str, ...], str, "str | None"],
                      "JsonElement | None"]


def _binary(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
            key: str, charset: str | None) -> JsonElement | None:
    """PS3.18 F.2.7: OB, OD, OF, OL, OV, OW and UN, inline or by BulkDataURI."""
    if vr == "UN":
        if _public_vr(tag):
            return None  # UN of a known tag: pydicom decodes it by its real VR
        if _private_creator(tag):
            return _text(enc, "LO", value, tag, path, key, charset)  # PS3.5 7.8.1
    if len(value) > BULK_DATA_THRESHOLD:
        return {"vr": vr, "BulkDataURI": enc.uri(path, key)}
    if enc.order == ">" and vr not in ("OB", "UN"):
        return None  # InlineBinary is little endian; pydicom swaps
    return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}


def _binary_numbers(enc: Encoder, vr: str, value: bytes, tag: int,
                    path: tuple[str, ...], key: str, charset: str | None) -> JsonElement:
    """PS3.18 F.2.3: binary numbers as JSON numbers (non-finite floats as null, and no
    ``Value`` when every value is null, as :func:`element` does)."""
    code = _BINARY_NUMBERS[vr]
    single = _SINGLE[enc.order + code]
    if len(value) == single.size:  # the usual case: one value
        one = single.unpack(value)[0]
        if code in "fd" and not math.isfinite(one):
            return {"vr": vr}
        return {"vr": vr, "Value": [one]}
    count = len(value) // single.size
    numbers: list[Any] = list(struct.unpack(f"{enc.order}{count}{code}",
                                            value[:count * single.size]))
    if code in "fd":
        numbers = [n if math.isfinite(n) else None for n in numbers]
        if all(n is None for n in numbers):
            return {"vr": vr}
    return {"vr": vr, "Value": numbers}


def _tags(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
          key: str, charset: str | None) -> JsonElement | None:
    """PS3.18 F.2.3: AT values as "ggggeeee" strings."""
    count = len(value) // 4 * 2
    pairs = struct.unpack(f"{enc.order}{count}H", value[:count * 2])
    return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}"
                                for i in range(0, count, 2)]}


def _decimal_strings(enc: Encoder, vr: str, value: bytes, tag: int,
                     path: tuple[str, ...], key: str, charset: str | None) -> JsonElement:
    """PS3.18 F.2.3: DS and IS as JSON numbers (:func:`number`)."""
    return element(vr, value.decode("ascii", "replace"))


def _text(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
          key: str, charset: str | None) -> JsonElement | None:
    """PS3.18 F.2.2 to F.2.5: strings and person names (:func:`element`)."""
    codec = charset if vr in _CHARSET_VRS else DEFAULT_CHARSET
    if codec is None:
        return None  # ISO 2022 code extensions: pydicom switches codecs for us
    return element(vr, value.decode(codec, "replace"))


_SINGLE = {order + code: struct.Struct(order + code)
           for order in "<>" for code in _BINARY_NUMBERS.values()}
_CONVERTERS: dict[str, _Converter] = {
    **dict.fromkeys(_TEXT_VRS, _text), **dict.fromkeys(_BINARY_NUMBERS, _binary_numbers),
    **dict.fromkeys(_BULK_VRS, _binary),
    "AT": _tags, "DS": _decimal_strings, "IS": _decimal_strings, "PN": _text,
}


#: JSON keys by tag, filled as tags are met (PS3.18 F.2.1: eight uppercase hex digits).
_KEYS: dict[int, str] = {}


def _key(tag: int) -> str:
    key = _KEYS[tag] = f"{tag:08X}"
    if len(_KEYS) > 65536:  # private tags vary without bound; keep the cache small
        _KEYS.clear()
    return key


@lru_cache(maxsize=4096)
def _public_vr(tag: int) -> str | None:
    """The dictionary VR of a public tag (``None`` for private or unknown tags)."""
    if (tag >> 16) % 2:
        return None
    try:
        return str(datadict.dictionary_VR(tag))
    except KeyError:
        return None


def _empty_vr(vr: str, tag: int) -> str:
    """An empty element's VR: UN of a known tag is reported by its dictionary VR."""
    if vr == "UN":
        known = _public_vr(tag)
        if known and " or " not in known:
            return known
    return vr


def _private_creator(tag: int) -> bool:
    """True for (gggg,0010-00FF) of an odd group (PS3.5 7.8.1)."""
    return bool((tag >> 16) % 2) and 0x10 <= (tag & 0xFFFF) <= 0xFF


def _implicit_vr(tag: int) -> str | None:
    """VR of an implicit VR element, when the dictionary gives exactly one."""
    vr = _public_vr(tag)
    if vr is None or " or " in vr:
        return None  # private, unknown or ambiguous ("US or SS"): pydicom resolves it
    return vr


_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)


def _charset_of(ds: Dataset, inherited: str | None) -> str | None:
    """The codec for text of ``ds``; ``None`` when pydicom must decode (ISO 2022).

    Items inherit the character set of their parent unless they state their own
    (PS3.5 6.1.2.3); the top level inherits the default repertoire.
    """
    # pydicom types get_item as returning a converted element; it returns the raw one
    # (or None) as read.
    raw: DataElement | RawDataElement | None = ds.get_item(_SPECIFIC_CHARACTER_SET)
    if raw is None:
        return inherited
    if isinstance(raw, RawDataElement):
        terms = (raw.value or b"").decode("ascii", "replace").split("\\")
    else:
        given = raw.value
        terms = [str(v) for v in (given if isinstance(given, list | tuple) else [given or ""])]
    terms = [t.strip(" \0") for t in terms]
    if len(terms) > 1 or terms[0].startswith("ISO 2022"):
        return None
    return python_encoding.get(terms[0]) if terms[0] else DEFAULT_CHARSET


class Fallback(Encoder):
    """pydicom's own encoder, element by element, for a data set :func:`to_json` could
    not encode, within the same :data:`INLINE_VALUE_BYTES` (PS3.18 10.4.3.3.2): each
    raw value is counted before pydicom converts it, since converting is what costs
    (a value of millions of empty values), and one past the budget becomes a
    ``BulkDataURI`` or is left out, as :meth:`Encoder.over_budget` decides."""

    def dataset(self, ds: Dataset, path: tuple[str, ...],
                charset: str | None) -> dict[str, Any]:
        """Every element of ``ds``; ``path`` names its position for BulkDataURIs."""
        out: dict[str, Any] = {}
        top = not path
        for tag, elem in list(ds.items()):
            code = int(tag)
            if code >> 16 == 0x0002 or (top and code in _PIXEL_SET):
                continue
            key = _key(code)
            try:
                converted = self.budgeted(elem, code, path, key)
                if converted is _LEFT_OUT:
                    log.warning("element %s left out of the metadata: its values pass "
                                "INLINE_VALUE_BYTES", key)
                    continue
                out[key] = converted or self.pydicom_element(ds, code, path, key, charset)
            except Exception:  # noqa: BLE001 - pydicom's encoder skips it too
                log.warning("element %s left out of the metadata: its value does not "
                            "decode", key)
        return out

    def budgeted(self, elem: Any, tag: int, path: tuple[str, ...],
                 key: str) -> JsonElement | None:
        """:meth:`Encoder.over_budget` of a raw element (``None`` for one pydicom has
        converted already: its value is in memory whatever is done with it)."""
        if type(elem) is not RawDataElement:
            return None
        vr = elem.VR if not elem.is_implicit_VR else _implicit_vr(tag)
        return self.over_budget(elem, vr, tag, path, key)

    def pydicom_element(self, ds: Dataset, tag: int, path: tuple[str, ...], key: str,
                        charset: str | None) -> JsonElement:
        """pydicom's DICOM JSON of one element (sequences: their items walked here)."""
        decoded = ds[tag]
        if decoded.VR == "SQ":
            items = [self.dataset(item, (*path, key, str(count)), charset)
                     for count, item in enumerate(decoded.value, start=1)]
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        return decoded.to_json_dict(
            bulk_data_element_handler=lambda _e: self.uri(path, key),
            bulk_data_threshold=BULK_DATA_THRESHOLD)


def fallback_json(ds: Dataset, bulk_base: str, little_endian: bool = True
                  ) -> dict[str, Any]:
    """pydicom's DICOM JSON of ``ds`` without its top-level pixel data, within the
    inline budget (:class:`Fallback`): for a data set :func:`to_json` cannot encode.

    Parameters are those of :func:`to_json`.
    """
    return Fallback(bulk_base, little_endian).dataset(ds, (), None)


def to_json(ds: Dataset, bulk_base: str, little_endian: bool = True) -> dict[str, Any]:
    """The DICOM JSON object of ``ds`` without its top-level pixel data.

    Parameters
    ----------
    ds : Dataset
        A data set as pydicom read it (raw elements are converted here).
    bulk_base : str
        The prefix of BulkDataURIs; the element's path (``tag`` or
        ``tag/item/tag``, items numbered from 1) is appended.
    little_endian : bool
        The byte order of the raw values.
    """
    return Encoder(bulk_base, little_endian).dataset(
        ds, (), _charset_of(ds, DEFAULT_CHARSET))
