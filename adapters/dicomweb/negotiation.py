"""Content negotiation of the JSON answers (PS3.18 8.7.3.5, 8.7.5).

QIDO-RS, STOW-RS and WADO-RS metadata answer with DICOM JSON only, labelled
``application/dicom+json``, or ``application/json`` for a client that accepts that and
not the other.
What the client accepts is read as for every other resource, by the one parser of
:mod:`adapters.dicomweb.accept`: the ``accept`` query parameter when it is given, which
replaces the Accept header (PS3.18 8.3.3.1), else the header, spelled in any case, with
empty list elements and quoted parameter values as RFC 9110 allows.  Any value that
allows DICOM JSON (``*/*``, ``application/*``, ``application/json``, or none at all)
gets it; a value that rules it out (XML only, or ``application/dicom+json;q=0``) gets
406 rather than a body the client said it cannot read.
"""

from __future__ import annotations

import falcon

from adapters.dicomweb import accept, dicomjson

#: Media types answered with DICOM JSON.
JSON_TYPES = (dicomjson.MEDIA_TYPE, falcon.MEDIA_JSON)


def json_type(req: falcon.Request) -> str | None:
    """The media type a DICOM JSON answer to the request is labelled with (see the
    module docstring); ``None`` when it accepts none.

    ``application/dicom+json`` when its most specific range allows it (so that
    ``application/dicom+json;q=0`` refuses it whatever ``*/*`` allows, RFC 9110
    12.5.1), unless an alternative that names ``application/json`` itself weighs more:
    the same body, under the name the client prefers.
    """
    ranges = accept.from_request(req)
    dicom = ranges.weight(dicomjson.MEDIA_TYPE)
    plain = ranges.weight(falcon.MEDIA_JSON) if any(
        media.kind == falcon.MEDIA_JSON for media in ranges) else 0.0
    if plain > dicom:  # preferred, or the only one accepted (RFC 9110 12.5.1)
        return falcon.MEDIA_JSON
    return dicomjson.MEDIA_TYPE if dicom > 0 else None
