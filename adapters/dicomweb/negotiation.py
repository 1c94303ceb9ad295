"""Content negotiation of the JSON answers (PS3.18 8.7.3.5, 8.7.5).

QIDO-RS, STOW-RS and WADO-RS metadata answer with ``application/dicom+json`` only.
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


def accepts_json(req: falcon.Request) -> bool:
    """True when the request accepts DICOM JSON (see the module docstring): its most
    specific range that names ``application/dicom+json`` allows it (so that
    ``application/dicom+json;q=0`` refuses it whatever ``*/*`` allows, RFC 9110
    12.5.1), or an acceptable alternative names ``application/json`` itself."""
    ranges = accept.from_request(req)
    return (ranges.weight(dicomjson.MEDIA_TYPE) > 0
            or any(media.kind == falcon.MEDIA_JSON for media in ranges))
