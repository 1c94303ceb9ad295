"""Content negotiation of the JSON answers (PS3.18 8.7.3.5, 8.7.5).

QIDO-RS, STOW-RS and WADO-RS metadata answer with ``application/dicom+json`` only.
What the client accepts is the ``accept`` query parameter when it is given, which
replaces the Accept header (PS3.18 8.3.3.1) as it does for every other resource
(:func:`adapters.dicomweb.accept.from_request`), else the header.  Any value that
allows DICOM JSON (``*/*``, ``application/*``, ``application/json``, or none at all)
gets it; a value that rules it out (XML only) gets 406 rather than a body the client
said it cannot read.
"""

from __future__ import annotations

import re

import falcon

from adapters.dicomweb import dicomjson

#: Media types answered with DICOM JSON.
JSON_TYPES = (dicomjson.MEDIA_TYPE, falcon.MEDIA_JSON)

#: A space between two characters of a media type name: an unencoded ``+``
#: (``accept=application/dicom+json``) that form decoding, which falcon applies to
#: query strings, turned into a space.  Names hold no spaces (RFC 6838 4.2), so it is
#: put back; spaces after ``,`` or ``;`` are the list's and the parameters' own.
_DECODED_PLUS = re.compile(r"(?<=[A-Za-z0-9!#$&^_.+-]) (?=[A-Za-z0-9!#$&^_.+-])")


def accepted(req: falcon.Request) -> str | None:
    """What the client accepts: the ``accept`` query parameter, else the Accept header
    (``None``: neither, which accepts anything)."""
    override = req.get_param("accept")
    if override:
        return _DECODED_PLUS.sub("+", override)
    return req.get_header("Accept")


def accepts_json(req: falcon.Request) -> bool:
    """True when the request accepts DICOM JSON (see the module docstring): a range
    that allows ``application/dicom+json`` (by its most specific match, so that
    ``application/dicom+json;q=0`` refuses it whatever ``*/*`` allows, RFC 9110
    12.5.1), or one naming ``application/json`` itself."""
    accept = accepted(req)
    if not accept or _quality(dicomjson.MEDIA_TYPE, accept) > 0:
        return True
    return any(_quality(falcon.MEDIA_JSON, part) > 0 for part in accept.split(",")
               if part.split(";", 1)[0].strip().lower() == falcon.MEDIA_JSON)


def _quality(kind: str, accept: str) -> float:
    """The weight ``accept`` gives ``kind`` (0 when it does not allow it), by falcon's
    own rules (``Request.client_accepts``): a malformed value allows nothing."""
    try:
        return falcon.mediatypes.quality(kind, accept)
    except ValueError:
        return 0.0
