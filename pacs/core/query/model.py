"""The protocol-neutral query: what C-FIND identifiers and QIDO-RS parameters become.

Neither pynetdicom nor falcon is imported here or anywhere in ``pacs.core.query``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pacs.core.attributes import Attribute, Level


class Match(enum.Enum):
    """Matching types of PS3.4 C.2.2.2 (universal matching has no constraint at all)."""

    SINGLE = "single"          # C.2.2.2.1
    UID_LIST = "uid_list"      # C.2.2.2.2
    WILDCARD = "wildcard"      # C.2.2.2.4
    RANGE = "range"            # C.2.2.2.5
    SEQUENCE = "sequence"      # C.2.2.2.6
    EMPTY = "empty"            # C.2.2.2.7 (extended negotiation / QIDO emptyvaluematching)


@dataclass(frozen=True)
class Term:
    """One value to match: its type and operands.

    ``value`` is the single value or wildcard pattern; ``low`` / ``high`` bound a range
    (``None`` for an open end); ``uids`` lists the UIDs of a UID list; ``items`` holds
    the item keys of sequence matching, all of which one item must match.
    """

    match: Match
    value: str = ""
    low: str | None = None
    high: str | None = None
    uids: tuple[str, ...] = ()
    items: tuple[Constraint, ...] = ()


@dataclass(frozen=True)
class Constraint:
    """A matching key: the entity matches when any term matches (``all_terms``: every
    term, for negotiated multiple-value matching, PS3.4 C.2.2.2.8)."""

    attribute: Attribute
    terms: tuple[Term, ...]
    all_terms: bool = False


@dataclass(frozen=True)
class Query:
    """A query at one level.

    Attributes
    ----------
    level :
        The entity returned (PS3.4 C.6 levels).
    constraints :
        Matching keys; an entity matches when all of them match.
    return_keys :
        Attributes to return (matching keys are returned too).
    limit, offset :
        Paging (QIDO); ``None`` means the engine's row cap applies alone.
    fuzzy :
        Fuzzy person-name matching (QIDO ``fuzzymatching=true``): each name component
        matches as a prefix, case-insensitively.
    item_keys :
        For a sequence return key, the item keywords asked for (PS3.4 C.2.2.2.6: the
        items come back with only those); absent means every stored item key.
    empty_below :
        Keys of a level below ``level`` come back, zero-length: a relational C-FIND
        (PS3.4 C.4.1.3.2.2) answers every requested key (C.4.1.1.3.2, zero-length when
        the SCP has no value), and one entity has no single value of a lower level's
        attribute.  Without it they are left out, as QIDO-RS has it (PS3.18 10.6.3.3:
        a lower level's attributes are not returned).  They are matched either way.
    required :
        Keywords of the Required keys of the query's information model that the
        attribute table does not mark ``R`` (PS3.4 Table C.6-5: Patient ID at the
        STUDY level of the Study Root model; Unique at the PATIENT level of the Patient
        Root): an entity that holds no value for such a key matches any value of it
        (C.2.2.1.2), as for every ``R`` key.
    """

    level: Level
    constraints: tuple[Constraint, ...] = ()
    return_keys: tuple[Attribute, ...] = ()
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    item_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    empty_below: bool = False
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    """One matching entity: values by keyword (``None`` when unknown)."""

    level: Level
    values: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceRef:
    """A stored instance selected for retrieval (C-MOVE, C-GET, WADO-RS)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str
    size: int
