"""The DICOM JSON model (PS3.18 Annex F) of a data set, fast enough for every ingest.

pydicom's ``Dataset.to_json_dict`` decodes and validates every element first, which
costs about 10 ms for a CT header with its private tags; ingest pays this for every
instance.  This encoder works on pydicom's raw, undecoded elements instead and
converts the common value representations straight from their bytes; anything
unusual goes through pydicom's own ``DataElement.to_json_dict``, so the result is what
pydicom would give:

- ISO 2022 character sets (code extensions switch codecs inside a value);
- implicit VR elements whose VR the dictionary does not settle (private, "US or SS");
- UN values of a known public tag (decoded by their real VR);
- sequences (their items are walked here again).

Rules (PS3.18 F.2): keys are eight upper-case hex digits; ``Value`` is always an
array and absent for an empty element (F.2.5), empty values inside a multi-valued
element are ``null``; PN values are objects of their non-empty component groups;
IS, DS and binary numbers are JSON numbers (non-finite and unparsable ones ``null``);
OB, OD, OF, OL, OV, OW and UN values longer than :data:`BULK_DATA_THRESHOLD` bytes get
a ``BulkDataURI`` naming their place in the data set, shorter ones ``InlineBinary``
(F.2.7).  Text values keep leading spaces and lose trailing padding, as in pydicom.
"""

from __future__ import annotations

import base64
import logging
import math
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydicom import datadict
from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Binary values longer than this many bytes are referenced by BulkDataURI, not inlined
#: (pydicom's default; small OB values such as private flags stay inline).
BULK_DATA_THRESHOLD = 1024

#: Tags that end a header read with ``stop_before_pixels`` (PS3.5 Table 7.1-1: float,
#: double float and integer pixel data); the top level's are referenced by the caller.
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
#: PS3.5 6.2: these hold one value; a backslash is part of it.
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
#: PS3.5 6.1.2.3: only these are decoded with Specific Character Set.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                   "SV": "q", "UV": "Q"}
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PIXEL_SET = frozenset(PIXEL_TAGS)
#: The codec of the default repertoire (pydicom's lenient choice for it).
DEFAULT_CHARSET = "iso8859"


class Encoder:
    """Raw elements to DICOM JSON values (PS3.18 F.2.3 to F.2.7).

    Each value representation has a converter in :data:`_CONVERTERS`; a converter that
    returns ``None`` hands the element to pydicom (see the module docstring).
    """

    def __init__(self, base: str, little: bool) -> None:
        self.base = base
        self.order = "<" if little else ">"

    def dataset(self, ds: Dataset, path: tuple[str, ...],
                charset: str | None) -> dict[str, Any]:
        """Every element of ``ds``; ``path`` names its position for BulkDataURIs."""
        out: dict[str, Any] = {}
        top = not path
        for tag, elem in list(ds._dict.items()):
            number = int(tag)  # pydicom's BaseTag compares in Python; ints in C
            if number >> 16 == 0x0002 or (top and number in _PIXEL_SET):
                continue  # file meta; the top level's pixel data is added by the caller
            key = _KEYS.get(number) or _key(number)
            try:
                converted = None
                if type(elem) is RawDataElement:
                    vr = elem.VR if not elem.is_implicit_VR else _implicit_vr(number)
                    converter = _CONVERTERS.get(vr) if vr else None
                    if vr and converter is not None:
                        value = elem.value
                        converted = (converter(self, vr, value, number, path, key, charset)
                                     if value else {"vr": _empty_vr(vr, number)})
                out[key] = converted or self.decoded(ds, number, path, key, charset)
            except Exception:  # noqa: BLE001 - an odd value must not lose the rest
                log.warning("element %s left out of the metadata: its value does not "
                            "decode", key)
        return out

    def decoded(self, ds: Dataset, tag: int, path: tuple[str, ...], key: str,
                charset: str | None) -> dict[str, Any]:
        """An element pydicom decodes (and sequences, whose items are walked here)."""
        element = ds[tag]
        if element.VR == "SQ":
            items = [self.dataset(item, (*path, key, str(number)), _charset_of(item, charset))
                     for number, item in enumerate(element.value, start=1)]
            # PS3.18 F.2.5: an empty sequence has no Value.
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        return element.to_json_dict(  # type: ignore[no-any-return]
            bulk_data_element_handler=lambda _e: self.uri(path, key),
            bulk_data_threshold=BULK_DATA_THRESHOLD)

    def uri(self, path: tuple[str, ...], key: str) -> str:
        """The relative BulkDataURI of the value ``key`` at ``path``."""
        return f"{self.base}/{'/'.join((*path, key))}"


_Converter = Callable[[Encoder, str, bytes, int, tuple[str, ...], str, "str | None"],
                      "dict[str, Any] | None"]


def _binary(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
            key: str, charset: str | None) -> dict[str, Any] | None:
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


def _numbers(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
             key: str, charset: str | None) -> dict[str, Any] | None:
    """PS3.18 F.2.3: binary numbers as JSON numbers (non-finite floats as null)."""
    code = _BINARY_NUMBERS[vr]
    single = _SINGLE[enc.order + code]
    if len(value) == single.size:  # the usual case: one value
        number = single.unpack(value)[0]
        if code in "fd" and not math.isfinite(number):
            return {"vr": vr, "Value": [None]}
        return {"vr": vr, "Value": [number]}
    count = len(value) // single.size
    numbers: list[Any] = list(struct.unpack(f"{enc.order}{count}{code}",
                                            value[:count * single.size]))
    if code in "fd":
        numbers = [n if math.isfinite(n) else None for n in numbers]
    return {"vr": vr, "Value": numbers}


def _tags(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
          key: str, charset: str | None) -> dict[str, Any] | None:
    """PS3.18 F.2.3: AT values as "ggggeeee" strings."""
    count = len(value) // 4 * 2
    pairs = struct.unpack(f"{enc.order}{count}H", value[:count * 2])
    return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}"
                                for i in range(0, count, 2)]}


def _decimal_strings(enc: Encoder, vr: str, value: bytes, tag: int,
                     path: tuple[str, ...], key: str, charset: str | None) -> dict[str, Any]:
    """PS3.18 F.2.3: DS and IS as JSON numbers; unparsable or empty values as null."""
    numbers = [_number(vr, part.strip(" \0"))
               for part in value.decode("ascii", "replace").split("\\")]
    if all(n is None for n in numbers):
        return {"vr": vr}
    return {"vr": vr, "Value": numbers}


def _number(vr: str, text: str) -> int | float | None:
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if vr == "IS" else number


def _text(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
          key: str, charset: str | None) -> dict[str, Any] | None:
    """PS3.18 F.2.3 / F.2.5: strings, trailing padding removed, empty values null."""
    codec = charset if vr in _CHARSET_VRS else DEFAULT_CHARSET
    if codec is None:
        return None  # ISO 2022 code extensions: pydicom switches codecs for us
    text = value.decode(codec, "replace")
    parts = [text] if vr in _SINGLE_VALUED else text.split("\\")
    values = [p.rstrip(" \0") or None for p in parts]
    if all(v is None for v in values):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _person_names(enc: Encoder, vr: str, value: bytes, tag: int, path: tuple[str, ...],
                  key: str, charset: str | None) -> dict[str, Any] | None:
    """PS3.18 F.2.2: each name as its Alphabetic, Ideographic and Phonetic groups
    (empty groups left out, as pydicom does)."""
    if charset is None:
        return None
    names: list[dict[str, str]] = []
    for name in value.decode(charset, "replace").split("\\"):
        groups = name.rstrip(" \0").split("=")
        entry = {"Alphabetic": groups[0]}
        if len(groups) > 1 and groups[1]:
            entry["Ideographic"] = groups[1]
        if len(groups) > 2 and groups[2]:
            entry["Phonetic"] = groups[2]
        names.append(entry)
    if all(not n["Alphabetic"] and len(n) == 1 for n in names):
        return {"vr": "PN"}
    return {"vr": "PN", "Value": names}


_SINGLE = {order + code: struct.Struct(order + code)
           for order in "<>" for code in _BINARY_NUMBERS.values()}
_CONVERTERS: dict[str, _Converter] = {
    **{vr: _text for vr in _TEXT_VRS}, **{vr: _numbers for vr in _BINARY_NUMBERS},
    **{vr: _binary for vr in _BULK_VRS},
    "AT": _tags, "DS": _decimal_strings, "IS": _decimal_strings, "PN": _person_names,
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


def _charset_of(ds: Dataset, inherited: str | None) -> str | None:
    """The codec for text of ``ds``; ``None`` when pydicom must decode (ISO 2022).

    Items inherit the character set of their parent unless they state their own
    (PS3.5 6.1.2.3); the top level inherits the default repertoire.
    """
    raw = ds._dict.get(0x00080005)  # type: ignore[call-overload]
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
