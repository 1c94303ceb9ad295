"""QIDO-RS query parameters to the core's :class:`~pacs.core.query.model.Query` (PS3.18 8.3.4,
10.6.1).  Pure functions over already percent-decoded parameters; no falcon here.

The value syntax is C-FIND's (PS3.18 8.3.4.1 defers to PS3.4 C.2.2.2), so each value
goes through the same :func:`pacs.core.query.matching.constraint` as a C-FIND identifier
key; the same engine then answers both.  What QIDO adds:

- attributes named by keyword or by eight hex digits (``PatientID``, ``00100020``);
- UID lists separated by ``,`` as well as ``\\`` (8.3.4.1);
- a parameter given twice is one list of values (any of them may match);
- ``includefield`` repeated, as one comma list, or ``all`` (8.3.4.3);
- ``limit`` / ``offset`` paging (8.3.4.4), ``fuzzymatching`` (8.3.4.5: each
  person-name component matches as a case-insensitive prefix), and the
  ``emptyvaluematching`` / ``multiplevaluematching`` flags (8.3.4.6 / 8.3.4.7);
- keys below the query level are allowed: QIDO is relational (10.6.1.2), and the
  engine matches them with ``EXISTS`` over the lower level (a study query on
  ``Modality`` or ``ModalitiesInStudy`` finds studies with a series of that modality).

Choices where the standard leaves room, all answered with 400 and a reason:
a match key that is a DICOM attribute we do not index, a sequence path, a keyword
or tag that is not a DICOM attribute, a UID key's value that is not a UID, and
malformed paging or flags.  An
``includefield`` of an attribute we do not index is ignored (nothing to return).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_has_tag, tag_for_keyword

from adapters.dicomweb.numbers import INT64_MAX, whole_number
from pacs.core.attributes import (
    ATTRIBUTES,
    BY_KEYWORD,
    BY_TAG,
    ITEM_KEYS,
    STUDY_ROOT_REQUIRED,
    UNIQUE_KEY,
    Attribute,
    Level,
)
from pacs.core.dataset import require_uid, valid_uid
from pacs.core.errors import InvalidQuery
from pacs.core.query.matching import EMPTY_VALUE, constraint
from pacs.core.query.model import Constraint, Match, Query, Term

_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")

#: Parameters that are not attributes (PS3.18 Table 8.3.4-1 and 8.3.3.1); ``accept``
#: and ``charset`` choose the media type, which is always DICOM JSON here (an ``accept``
#: without it is answered 406: :mod:`adapters.dicomweb.negotiation`).
RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield",
                      "emptyvaluematching", "multiplevaluematching", "accept", "charset"})

#: Keys that are returned but never matched, as in C-FIND (PS3.4 C.4.1.1.3.1).
NOT_MATCHED = frozenset({
    0x00080005,  # SpecificCharacterSet: always ISO_IR 192 in JSON
    0x00080052,  # QueryRetrieveLevel
    0x00080054,  # RetrieveAETitle
    0x00080056,  # InstanceAvailability
    0x00080201,  # TimezoneOffsetFromUTC
    0x00081190,  # RetrieveURL
})

#: Default return attributes of each level: PS3.18 Table 10.6.3-3 (study),
#: 10.6.3-4 (series) and 10.6.3-5 (instance), indexed ones only.  SpecificCharacterSet,
#: InstanceAvailability and RetrieveURL are added by the response writer.
DEFAULTS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                  "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientName",
                  "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
                   "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                   "RequestAttributesSequence"),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "TimezoneOffsetFromUTC", "InstanceNumber",
                  "Rows", "Columns", "BitsAllocated", "NumberOfFrames"),
}


@dataclass(frozen=True)
class Target:
    """A QIDO-RS target resource (PS3.18 10.6.1.1, Table 10.6.1-2).

    Attributes
    ----------
    level :
        The entities returned.
    scope :
        Levels whose default attributes are returned: every level not fixed by the
        path (PS3.18 10.6.3.3: a search across all studies also returns the study's
        attributes of each series).
    """

    level: Level
    scope: tuple[Level, ...]


#: The six search resources, by the levels their path fixes.
STUDIES = Target(Level.STUDY, (Level.STUDY,))
ALL_SERIES = Target(Level.SERIES, (Level.STUDY, Level.SERIES))
STUDY_SERIES = Target(Level.SERIES, (Level.SERIES,))
ALL_INSTANCES = Target(Level.IMAGE, (Level.STUDY, Level.SERIES, Level.IMAGE))
STUDY_INSTANCES = Target(Level.IMAGE, (Level.SERIES, Level.IMAGE))
SERIES_INSTANCES = Target(Level.IMAGE, (Level.IMAGE,))


@dataclass(frozen=True)
class Paging:
    """The page a request asks for (PS3.18 8.3.4.4)."""

    limit: int
    offset: int
    clamped: bool  # the client asked for more than the server returns per page


Params = Mapping[str, Sequence[str]]


def parse(params: Params, target: Target, path_uids: Mapping[str, str], *,
          default_limit: int, max_limit: int) -> tuple[Query, Paging]:
    """The query and the page a QIDO-RS request asks for.

    Parameters
    ----------
    params :
        Decoded query parameters, each with every value it was given.
    target :
        The search resource.
    path_uids :
        UIDs from the path, by keyword (``StudyInstanceUID``, ``SeriesInstanceUID``).
    default_limit, max_limit :
        The page size without ``limit``, and the largest page returned.

    Raises
    ------
    InvalidQuery
        Any parameter that cannot be honoured (answered with 400).
    """
    flags = {name: flag(params, name) for name in
             ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")}
    constraints = [path_constraint(keyword, uid) for keyword, uid in path_uids.items()]
    constraints += match_constraints(params, empty_value_matching=flags["emptyvaluematching"],
                                     multiple_value_matching=flags["multiplevaluematching"])
    paging = page(params, default_limit, max_limit)
    # QIDO-RS searches studies as the Study Root model does (PS3.18 10.6.1).
    query = Query(level=target.level, constraints=tuple(constraints),
                  return_keys=return_keys(params, target), limit=paging.limit,
                  offset=paging.offset, fuzzy=flags["fuzzymatching"],
                  required=STUDY_ROOT_REQUIRED)
    return query, paging


def attribute_named(name: str) -> Attribute | None:
    """The indexed attribute a parameter names by keyword or hex tag, or ``None`` for a
    DICOM attribute the index does not hold.

    Raises
    ------
    InvalidQuery
        When ``name`` is neither a DICOM keyword nor a DICOM tag.
    """
    if _HEX_TAG.match(name):
        tag = int(name, 16)
        if tag in BY_TAG:
            return BY_TAG[tag]
        if tag in NOT_MATCHED or dictionary_has_tag(tag) or (tag >> 16) % 2 == 1:
            return None
        raise InvalidQuery(f"{name} is not a DICOM tag")
    if name in BY_KEYWORD:
        return BY_KEYWORD[name]
    if tag_for_keyword(name) is not None:
        return None
    raise InvalidQuery(f"{name!r} is not a DICOM keyword or tag")


def _tag_of(name: str) -> int | None:
    if _HEX_TAG.match(name):
        return int(name, 16)
    return tag_for_keyword(name)


def match_constraints(params: Params, *, empty_value_matching: bool,
                      multiple_value_matching: bool) -> list[Constraint]:
    """The matching keys of the request (PS3.18 8.3.4.1), as C-FIND would match them."""
    constraints = []
    items: dict[str, list[Constraint]] = {}
    for name, given in params.items():
        if name.lower() in RESERVED:
            continue
        if "." in name:
            sequence, item = sequence_item(name)
            found = constraint(item, "\\".join(given),
                               empty_value_matching=empty_value_matching)
            items.setdefault(sequence.keyword, [])
            if found is not None:
                items[sequence.keyword].append(found)
            continue
        attribute = attribute_named(name)
        if attribute is None:
            if _tag_of(name) in NOT_MATCHED:
                continue
            raise InvalidQuery(f"{name} is not supported for matching")
        if attribute.tag in NOT_MATCHED:
            continue
        raw = "\\".join(uid_list_text(attribute, value) for value in given)
        found = constraint(attribute, raw, empty_value_matching=empty_value_matching,
                           multiple_value_matching=multiple_value_matching)
        if found is not None:
            constraints.append(found)
    for keyword, item_constraints in items.items():
        if item_constraints:  # every item key in one item (PS3.4 C.2.2.2.6)
            constraints.append(Constraint(BY_KEYWORD[keyword], (
                Term(Match.SEQUENCE, items=tuple(item_constraints)),)))
    return constraints


def sequence_item(name: str) -> tuple[Attribute, Attribute]:
    """``Sequence.ItemKey`` (keywords or tags, PS3.18 8.3.4.1 attribute paths) as the
    sequence attribute and its item key; only one level of nesting is kept.

    Raises
    ------
    InvalidQuery
        When the path names no sequence we keep, or an item key we do not keep.
    """
    head, _, tail = name.partition(".")
    sequence = attribute_named(head)
    if sequence is None or sequence.vr != "SQ" or "." in tail:
        raise InvalidQuery(f"{name}: sequence matching is supported on "
                           f"{', '.join(ITEM_KEYS)} items")
    tag = _tag_of(tail)
    for item in ITEM_KEYS[sequence.keyword]:
        if tag == item.tag:
            return sequence, item
    raise InvalidQuery(f"{name}: {tail} is not an item key we keep")


def uid_list_text(attribute: Attribute, value: str) -> str:
    """QIDO separates a UID list with ``,`` as well as ``\\`` (PS3.18 8.3.4.1).

    Raises
    ------
    InvalidQuery
        When a value of the list is not a UID (PS3.5 9.1), as a UID in the path is
        refused: no instance could match it (ingest refuses them), and ``200 []``
        would tell the client its query was understood.
    """
    if attribute.vr != "UI":
        return value
    text = value.replace(",", "\\")
    if text.strip(" \0") in ("", "*", EMPTY_VALUE):  # universal, or empty value matching
        return text
    for uid in text.split("\\"):
        if uid.strip(" \0") and not valid_uid(uid.strip(" \0")):
            raise InvalidQuery(f"{attribute.keyword}: a value is not a valid UID")
    return text


def path_constraint(keyword: str, uid: str) -> Constraint:
    """The single-value match a UID in the path stands for.

    Raises
    ------
    InvalidUID
        When the path segment is not a valid UID (PS3.5 9.1).
    """
    found = constraint(BY_KEYWORD[keyword], require_uid(uid, f"{keyword} in the path"))
    assert found is not None  # a valid UID is never universal
    return found


def return_keys(params: Params, target: Target) -> tuple[Attribute, ...]:
    """Default attributes of the target's scope plus every ``includefield`` (8.3.4.3)."""
    wanted: dict[str, Attribute] = {}
    for level in target.scope:
        wanted.update((k, BY_KEYWORD[k]) for k in DEFAULTS[level])
    for name in include_names(params.get("includefield", ())):
        if name == "all":
            wanted.update((a.keyword, a) for a in ATTRIBUTES
                          if a.level.depth <= target.level.depth)
            continue
        attribute = attribute_named(name)
        if attribute is not None:
            wanted[attribute.keyword] = attribute
    # The unique keys of the levels above are what a client needs to go deeper.
    wanted.update((UNIQUE_KEY[level].keyword, UNIQUE_KEY[level]) for level in Level
                  if level.depth <= target.level.depth)
    return tuple(wanted.values())


def include_names(values: Iterable[str]) -> list[str]:
    """``includefield`` values: repeated, comma lists (OHIF), or both."""
    names = []
    for value in values:
        names += [part.strip() for part in value.split(",") if part.strip()]
    for name in names:
        if "." in name:
            raise InvalidQuery(f"includefield {name}: sequence paths are not supported")
    return names


def flag(params: Params, name: str) -> bool:
    """A ``true`` / ``false`` parameter (absent is false)."""
    given = params.get(name, ())
    if not given:
        return False
    value = given[-1].strip().lower()
    if value not in ("true", "false"):
        raise InvalidQuery(f"{name} must be true or false")
    return value == "true"


def page(params: Params, default_limit: int, max_limit: int) -> Paging:
    """``limit`` and ``offset`` (PS3.18 8.3.4.4): a limit above ``max_limit`` is
    lowered to it, and the response says more results remain."""
    limit = _natural(params, "limit", minimum=1)
    offset = _natural(params, "offset", minimum=0)
    chosen = min(default_limit, max_limit) if limit is None else limit
    return Paging(limit=min(chosen, max_limit), offset=offset or 0,
                  clamped=limit is not None and limit > max_limit)


def _natural(params: Params, name: str, minimum: int) -> int | None:
    """The last value of ``name`` as a whole number from ``minimum`` on (``None`` when
    absent).

    The upper bound is SQLite's: ``LIMIT`` and ``OFFSET`` are 64-bit integers, and a
    page beyond them is not one the index can be asked for (8.3.4.4 leaves the
    range to the origin server).

    Raises
    ------
    InvalidQuery
        A value that is not ASCII digits, or outside ``minimum`` to
        :data:`~adapters.dicomweb.numbers.INT64_MAX`.
    """
    given = params.get(name, ())
    if not given:
        return None
    value = whole_number(given[-1].strip(), INT64_MAX)
    if value is None or value < minimum:
        raise InvalidQuery(f"{name} must be an integer from {minimum} to {INT64_MAX}")
    return value
