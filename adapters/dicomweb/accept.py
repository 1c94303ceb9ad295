"""Accept headers of WADO-RS requests (PS3.18 8.7.1, 8.7.3 and 8.7.5), parsed once.

Real clients disagree on spelling, so this takes all of these alike:

- alternatives separated by commas, each with an optional ``q`` weight (RFC 9110
  12.5.1); ``q=0`` rules an alternative out;
- ``type`` and ``transfer-syntax`` quoted (dicomweb-client:
  ``multipart/related; type="application/dicom"``) or bare (OHIF:
  ``multipart/related; type=application/octet-stream; transfer-syntax=*``);
- a ``transfer-syntax`` written inside the quoted ``type``
  (``type="application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"``, as
  Orthanc writes its own Content-Type);
- the ``accept`` query parameter, which replaces the header (PS3.18 8.3.3.1) so that a
  plain ``<img src>`` can ask for ``image/jpeg``.

No header, an empty one, or ``*/*`` means "anything": each resource then answers with
its default media type (PS3.18 8.7.3.5, the "D" entries of its tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import falcon

from adapters.dicomweb.multipart import media_type
from adapters.dicomweb.negotiation import accepted

#: ``multipart/related``: the container of every WADO-RS bulk answer (PS3.18 8.7.3.3).
MULTIPART = "multipart/related"
ANY = "*/*"


@dataclass(frozen=True)
class MediaRange:
    """One alternative of an Accept header.

    Attributes
    ----------
    kind :
        The media range, lower case (``multipart/related``, ``image/*``, ``*/*``).
    params :
        Its parameters, names lower case, values unquoted.
    q :
        Its weight, 0 to 1.
    """

    kind: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        """True for ``multipart/related``."""
        return self.kind == MULTIPART

    @property
    def part_type(self) -> str:
        """The media type of the content: ``type`` of a multipart range, else itself."""
        if self.multipart:
            return self.params.get("type", "").lower()
        return self.kind

    @property
    def transfer_syntax(self) -> str | None:
        """The ``transfer-syntax`` parameter, if any (``*`` means as stored)."""
        return self.params.get("transfer-syntax") or None

    def allows(self, content: str) -> bool:
        """True when the content media type ``content`` falls in this range."""
        wanted = self.part_type or ANY
        if wanted == ANY:
            return True
        if wanted.endswith(("/*", "/")):
            return content.split("/")[0] == wanted.split("/")[0]
        return wanted == content


def _split(value: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def _weight(text: str | None) -> float:
    try:
        return min(1.0, max(0.0, float(text))) if text is not None else 1.0
    except ValueError:
        return 1.0  # a malformed weight is not a reason to refuse the request


def parse(header: str | None) -> list[MediaRange]:
    """The alternatives of an Accept value, best first (ties keep their order).

    An absent or empty header is one ``*/*`` alternative.
    """
    ranges: list[MediaRange] = []
    for item in _split(header or "", ","):
        if not item.strip():
            continue
        kind, params = media_type(item)
        inner = params.get("type", "")
        if ";" in inner:
            # type="application/octet-stream; transfer-syntax=…": lift the inner params.
            inner_kind, inner_params = media_type(inner)
            params = {**inner_params, **params, "type": inner_kind}
        weight = _weight(params.pop("q", None))
        if weight > 0:
            ranges.append(MediaRange(kind, params, weight))
    if not ranges and not (header or "").strip():
        ranges.append(MediaRange(ANY))
    return sorted(ranges, key=lambda r: -r.q)


def from_request(req: falcon.Request) -> list[MediaRange]:
    """The request's alternatives: the ``accept`` query parameter, else the header
    (:func:`adapters.dicomweb.negotiation.accepted`)."""
    return parse(accepted(req))
