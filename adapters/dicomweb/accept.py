"""Accept headers of DICOMweb requests (PS3.18 8.7.1, 8.7.3 to 8.7.5), parsed once, and
the choice of what to answer them with, for every resource.

Real clients disagree on spelling, so this takes all of these alike:

- alternatives separated by commas, each with an optional ``q`` weight (RFC 9110
  12.5.1); empty elements (``a,``, ``a, ,b``) are ignored (RFC 9110 5.6.1.2), and a
  comma or semicolon inside a quoted parameter value is part of the value (5.6.6);
- types, subtypes and parameter names in any case (RFC 9110 8.3.1, 5.6.6);
- ``type`` and ``transfer-syntax`` quoted (dicomweb-client:
  ``multipart/related; type="application/dicom"``) or bare (OHIF:
  ``multipart/related; type=application/octet-stream; transfer-syntax=*``);
- a ``transfer-syntax`` written inside the quoted ``type``
  (``type="application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"``, as
  Orthanc writes its own Content-Type);
- the names of media types before their registration (``image/x-dicom-rle``,
  ``image/x-jls``), taken as the registered ones;
- the ``accept`` query parameter, which replaces the header (PS3.18 8.3.3.1) so that a
  plain ``<img src>`` can ask for ``image/jpeg``.

No header, an empty one, or ``*/*`` means "anything": each resource then answers with
its default media type (PS3.18 8.7.3.5, the "D" entries of its tables).

Choosing (:func:`choose`): the acceptable alternatives are tried best first; each offers
the representations it allows, in the resource's order of preference, and the first
one that no ``q=0`` range rules out is sent.  A representation is ruled out when the
most specific range that names it has ``q=0`` (RFC 9110 12.5.1: ``image/jpeg;q=0, */*``
refuses JPEG whatever ``*/*`` allows, ``image/*;q=0, image/png`` allows PNG).
Specificity is RFC 9110's: ``type/subtype`` over ``type/*`` over ``*/*``, then the
parameters that tell DICOMweb representations apart (``type``, ``transfer-syntax``);
other parameters (``charset``, extensions) neither narrow a range nor refine it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, overload

import falcon

from adapters.dicomweb.multipart import media_type, split_unquoted

#: ``multipart/related``: the container of every WADO-RS bulk answer (PS3.18 8.7.3.3).
MULTIPART = "multipart/related"
ANY = "*/*"
#: Unregistered names of media types clients still send, and the registered ones
#: (PS3.18 Table 8.7.3-5).
ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
#: Parameters that tell representations apart (PS3.18 8.7.3.5): they narrow a range
#: that gives them, and make it more specific (RFC 9110 12.5.1).
DISTINGUISHING = ("type", "transfer-syntax")

#: A space between two characters of a media type name: an unencoded ``+``
#: (``accept=application/dicom+json``) that form decoding, which falcon applies to
#: query strings, turned into a space.  Names hold no spaces (RFC 6838 4.2), so it is
#: put back; spaces after ``,`` or ``;`` are the list's and the parameters' own.
_DECODED_PLUS = re.compile(r"(?<=[A-Za-z0-9!#$&^_.+-]) (?=[A-Za-z0-9!#$&^_.+-])")

_T = TypeVar("_T")


def kind_level(media_range: str, kind: str) -> int | None:
    """How specifically the range ``media_range`` names the media type ``kind``
    (RFC 9110 12.5.1): 2 for ``type/subtype``, 1 for ``type/*`` (or ``type/``, as
    some clients write it), 0 for ``*/*``; ``None`` when it does not name it."""
    if media_range == ANY:
        return 0
    if media_range.endswith(("/*", "/")):
        return 1 if kind.split("/")[0] == media_range.split("/")[0] else None
    return 2 if media_range == kind else None


@dataclass(frozen=True)
class MediaRange:
    """One alternative of an Accept header.

    Attributes
    ----------
    kind :
        The media range, lower case (``multipart/related``, ``image/*``, ``*/*``).
    params :
        Its parameters, names lower case, values unquoted (``type`` lower case).
    q :
        Its weight, 0 to 1; 0 rules out what the range names.
    """

    kind: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        """True for ``multipart/related``."""
        return self.kind == MULTIPART

    @property
    def single_part(self) -> bool:
        """True when a bulk answer to this alternative is one part: a single part range
        (``application/dicom``, ``image/*``).  ``*/*`` gets each resource's default,
        multipart/related (PS3.18 8.7.3.5, the "D" entries of Tables 8.7.3-2 to 8.7.3-5)."""
        return not self.multipart and self.kind != ANY

    @property
    def part_type(self) -> str:
        """The media type of the content: ``type`` of a multipart range, else itself."""
        if self.multipart:
            return self.params.get("type", "")
        return self.kind

    @property
    def transfer_syntax(self) -> str | None:
        """The ``transfer-syntax`` parameter, if any (``*`` means as stored)."""
        return self.params.get("transfer-syntax") or None

    def allows(self, content: str) -> bool:
        """True when the content media type ``content`` falls in this range."""
        return kind_level(self.part_type or ANY, content) is not None

    def names(self, kind: str, params: Mapping[str, str]) -> tuple[int, int] | None:
        """How specifically this range names the media type ``kind`` with ``params``
        (a Content-Type: type, then parameters): its :func:`kind_level`, then how many
        :data:`DISTINGUISHING` parameters both give, which must agree (``type`` as a
        range, ``transfer-syntax=*`` any syntax); ``None`` when it does not name it."""
        level = kind_level(self.kind, kind)
        if level is None:
            return None
        agreeing = 0
        for name in DISTINGUISHING:
            wanted, given = self.params.get(name), params.get(name)
            if wanted is None or given is None:
                continue
            if not _agrees(name, wanted, given):
                return None
            agreeing += 1
        return level, agreeing


def _agrees(name: str, wanted: str, given: str) -> bool:
    """True when a range's parameter value ``wanted`` admits the value ``given``."""
    if name == "type":
        return kind_level(wanted, given) is not None
    return wanted in ("*", given)


class Accept(Sequence[MediaRange]):
    """An Accept value.

    As a sequence, its acceptable alternatives (``q`` > 0), best first (ties keep
    their order): what a resource tries.  :attr:`ranges` holds every range as written,
    the ``q=0`` ones too, for :meth:`weight`.
    """

    def __init__(self, ranges: Iterable[MediaRange]) -> None:
        self.ranges = tuple(ranges)
        self._alternatives = sorted((r for r in self.ranges if r.q > 0), key=lambda r: -r.q)

    @overload
    def __getitem__(self, index: int) -> MediaRange: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MediaRange]: ...

    def __getitem__(self, index: int | slice) -> MediaRange | Sequence[MediaRange]:
        return self._alternatives[index]

    def __len__(self) -> int:
        return len(self._alternatives)

    def only(self, keep: Callable[[MediaRange], bool]) -> Accept:
        """The ranges ``keep`` keeps, exclusions among them: a resource's view of a
        header some of whose alternatives it ignores (PS3.18 10.4.4)."""
        return Accept(r for r in self.ranges if keep(r))

    def naming(self, kind: str, params: Mapping[str, str] | None = None) -> MediaRange | None:
        """The most specific range that names ``kind`` with ``params`` (the first of
        equally specific ones), ``None`` when none does (RFC 9110 12.5.1)."""
        named = [(level, r) for r in self.ranges
                 if (level := r.names(kind, params or {})) is not None]
        return max(named, key=lambda pair: pair[0])[1] if named else None

    def weight(self, kind: str, params: Mapping[str, str] | None = None) -> float:
        """The weight of ``kind`` with ``params``: its most specific range's, 0 when no
        range names it."""
        decides = self.naming(kind, params)
        return decides.q if decides is not None else 0.0

    def refuses(self, kind: str, params: Mapping[str, str] | None = None) -> bool:
        """True when the most specific range that names ``kind`` with ``params`` has
        ``q=0``: not acceptable (RFC 9110 12.5.1), whatever a broader range allows."""
        decides = self.naming(kind, params)
        return decides is not None and decides.q == 0


@dataclass(frozen=True)
class Offer(Generic[_T]):
    """A representation a resource can answer with: what it needs to produce it
    (``value``), and its Content-Type, type and parameters."""

    value: _T
    kind: str
    params: Mapping[str, str] = field(default_factory=dict)


def bulk_offer(value: _T, part_type: str, multipart: bool,
               syntax: str | None = None) -> Offer[_T]:
    """An offer of content of ``part_type`` (in ``syntax``), in multipart/related
    (``type`` and ``transfer-syntax`` its parameters, PS3.18 8.7.3.3) or alone."""
    params = {"transfer-syntax": syntax} if syntax else {}
    if multipart:
        return Offer(value, MULTIPART, {"type": part_type, **params})
    return Offer(value, part_type, params)


def choose(accept: Accept, offers: Callable[[MediaRange], Iterable[Offer[_T]]]
           ) -> tuple[MediaRange, _T] | None:
    """The representation to answer with (module docstring): of the ``offers`` each
    acceptable alternative makes, best alternative first, the first that ``accept``
    does not refuse, with the alternative that offered it; ``None`` when none is left
    (406, PS3.18 8.7.8.1).

    Each distinct representation is weighed once: a header may repeat an alternative
    thousands of times, and weighing scans every range.
    """
    return next(acceptable(accept, offers), None)


def acceptable(accept: Accept, offers: Callable[[MediaRange], Iterable[Offer[_T]]]
               ) -> Iterator[tuple[MediaRange, _T]]:
    """Every representation :func:`choose` could answer with, best first, each once:
    the alternatives to fall back on when the first cannot be made after all (stored
    pixel data that does not decode)."""
    refused: dict[tuple[str, tuple[tuple[str, str], ...]], bool] = {}
    for media in accept:
        for offer in offers(media):
            key = (offer.kind, tuple(sorted(offer.params.items())))
            if key not in refused:
                refused[key] = accept.refuses(offer.kind, offer.params)
                if not refused[key]:
                    yield media, offer.value


def _ranges(header: str) -> Iterator[MediaRange]:
    """The ranges of a non-empty Accept value, as written, ``q=0`` ones included."""
    for item in split_unquoted(header, ","):
        if not item.strip():
            continue  # RFC 9110 5.6.1.2: empty list elements do not count
        kind, params = media_type(item)
        inner = params.get("type", "")
        if ";" in inner:
            # type="application/octet-stream; transfer-syntax=…": lift the inner params.
            inner_kind, inner_params = media_type(inner)
            params = {**inner_params, **params, "type": inner_kind}
        if "type" in params:
            lowered = params["type"].lower()
            params["type"] = ALIASES.get(lowered, lowered)
        yield MediaRange(ALIASES.get(kind, kind), params, _weight(params.pop("q", None)))


def _weight(text: str | None) -> float:
    try:
        return min(1.0, max(0.0, float(text))) if text is not None else 1.0
    except ValueError:
        return 1.0  # a malformed weight is not a reason to refuse the request


def parse(header: str | None) -> Accept:
    """The ranges of an Accept value.

    An absent header, an empty one or one of empty elements only is one ``*/*``
    alternative (RFC 9110 12.5.1: no preference stated).
    """
    ranges = list(_ranges(header or ""))
    return Accept(ranges or [MediaRange(ANY)])


def accepted(req: falcon.Request) -> str | None:
    """What the client accepts: the ``accept`` query parameter, else the Accept header
    (``None``: neither, which accepts anything)."""
    override = req.get_param("accept")
    if override:
        return _DECODED_PLUS.sub("+", override)
    return req.get_header("Accept")


def from_request(req: falcon.Request) -> Accept:
    """The request's ranges: the ``accept`` query parameter, else the header
    (:func:`accepted`)."""
    return parse(accepted(req))
