"""Wildcard matching that SQLite's GLOB cannot say, as the SQL function
``dicom_wildcard`` every index connection has (:func:`pacs.core.index.connection.connect`;
the query compiler calls it, :mod:`pacs.core.index.compiler`).

GLOB's ``*`` runs over any character: over the ``\\`` between the values of a
multi-valued attribute, and over the ``=`` between the component groups of a person's
name, so that ``P*L`` matched ``ORIGINAL\\PRIMARY\\AXIAL`` and ``=山田*`` no name.  The
compiler keeps a GLOB that the index can use to narrow the rows, and asks this function
for the rule.

The matcher (:func:`fits`) never backtracks: a pattern is split at its stars, its first
and last pieces are tested at the two ends of the text, and each piece between them is
found at its leftmost place after the previous one, which leaves the most text to the
pieces after it, so a match exists exactly when this finds one.  A piece holding ``?``
is found by a bit-parallel scan (shift-and: one integer of the piece's length per
character of the text), the others by ``str.find``.  The text is walked about once
whatever the pattern, where a regular expression of ``.*`` backtracks to the power of
its stars: ``'*' * 22 + 'Z=*'`` against one name took 87 s, inside one SQLite call that
neither the query's time limit nor a C-CANCEL can interrupt (they are checked between
the steps of SQLite's machine), holding the GIL the other associations need.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: C.2.2.2.4: any run of characters, and exactly one.
ANY_RUN, ANY_ONE = "*", "?"


def wildcard_matches(*arguments: Any) -> bool:
    """``dicom_wildcard(stored, value, multi, person)``: :func:`matches`, as SQLite
    calls it."""
    stored, value, multi, person = arguments
    return matches(stored, str(value), bool(multi), bool(person))


def matches(stored: str | None, value: str, multi: bool, person: bool) -> bool:
    """Whether ``stored`` matches the wildcard ``value`` (PS3.4 C.2.2.2.4: ``*`` any
    run of characters, ``?`` one, anything else itself), one value at a time for a
    multi-valued attribute (C.2.2.3); for a person's name, a value naming component
    groups with ``=`` (PS3.5 6.2.1) is matched group by group (``=山田*``: the
    ideographic group; an empty group matches any), one without against each group
    (``*Tarou`` and ``*太郎`` both find ``Yamada^Tarou=山田^太郎``).

    Case is the caller's: the compiler gives a folded column and an upper-cased value
    where names match without case (:meth:`pacs.core.index.compiler._Where._term`).
    """
    if stored is None:
        return False
    grouped = person and "=" in value
    groups = value.split("=") if grouped else [value]
    for one in stored.split("\\") if multi else [stored]:
        if person and not grouped:
            if any(fits(group, value) for group in one.split("=")):
                return True
            continue
        have = one.split("=") if grouped else [one]
        have += [""] * (len(groups) - len(have))
        if all(not pattern or fits(part, pattern)
               for pattern, part in zip(groups, have, strict=False)):
            return True
    return False


def fits(text: str, pattern: str) -> bool:
    """Whether the whole of ``text`` matches the DICOM wildcard ``pattern``
    (PS3.4 C.2.2.2.4), in time linear in ``text`` for a given pattern.

    Parameters
    ----------
    text : str
        The stored value (one value, one component group).
    pattern : str
        ``*`` any run of characters (none too), ``?`` exactly one, any other character
        itself.

    Returns
    -------
    bool
        True when ``text`` matches.
    """
    parsed = _parse(pattern)
    first, last = parsed.first, parsed.last
    if last is None:  # no star: the text is the piece, character for character
        return len(text) == len(first) and first.at(text, 0)
    end = len(text) - len(last)
    if end < len(first) or not first.at(text, 0) or not last.at(text, end):
        return False
    start = len(first)
    for piece in parsed.middle:
        found = piece.find(text, start, end)
        if found < 0:
            return False
        start = found + len(piece)
    return True


@dataclass(frozen=True)
class _Piece:
    """A run of a pattern between stars: characters and ``?``.

    ``masks`` has, for each character of the piece, the positions (bit ``i`` for the
    ``i``-th) where that character matches: its own and those of ``?``;
    ``anything`` has the positions of ``?`` alone, where any other character matches.
    """

    text: str
    masks: dict[str, int]
    anything: int

    @classmethod
    def of(cls, text: str) -> _Piece:
        """The piece ``text`` with its masks (none needed when it has no ``?``)."""
        if ANY_ONE not in text:
            return cls(text, {}, 0)
        anything = sum(1 << i for i, c in enumerate(text) if c == ANY_ONE)
        masks: dict[str, int] = {}
        for i, c in enumerate(text):
            if c != ANY_ONE:
                masks[c] = masks.get(c, anything) | (1 << i)
        return cls(text, masks, anything)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def literal(self) -> bool:
        """True when the piece has no ``?``: each character matches only itself."""
        return not self.anything

    def at(self, text: str, start: int) -> bool:
        """Whether the piece matches ``text`` from ``start`` on (for its length)."""
        if self.literal:
            return text.startswith(self.text, start)
        if start + len(self.text) > len(text):
            return False
        return all(p in (ANY_ONE, c)
                   for p, c in zip(self.text, text[start:start + len(self.text)],
                                   strict=True))

    def find(self, text: str, start: int, end: int) -> int:
        """The leftmost place from ``start`` where the piece matches and ends by
        ``end``; -1 when there is none."""
        if self.literal:
            return text.find(self.text, start, end)
        return self._scan(text, start, end)

    def _scan(self, text: str, start: int, end: int) -> int:
        """Shift-and: after each character, bit ``i`` of ``state`` says that the first
        ``i + 1`` characters of the piece match the text ending there, so the piece is
        found when its last bit is set.  One pass over the text, no backtracking."""
        full = 1 << (len(self.text) - 1)
        state = 0
        for i in range(start, end):
            state = ((state << 1) | 1) & self.masks.get(text[i], self.anything)
            if state & full:
                return i + 1 - len(self.text)
        return -1


@dataclass(frozen=True)
class _Pattern:
    """A wildcard pattern as its pieces: the one before its first star, those between
    stars (empty ones dropped: ``**`` matches what ``*`` does), and the one after its
    last star (``None`` when it has no star)."""

    first: _Piece
    middle: tuple[_Piece, ...]
    last: _Piece | None


@lru_cache(maxsize=256)
def _parse(pattern: str) -> _Pattern:
    """``pattern`` split at its stars (parsed once for all the rows a query tests)."""
    parts = pattern.split(ANY_RUN)
    if len(parts) == 1:
        return _Pattern(_Piece.of(pattern), (), None)
    middle = tuple(_Piece.of(part) for part in parts[1:-1] if part)
    return _Pattern(_Piece.of(parts[0]), middle, _Piece.of(parts[-1]))
