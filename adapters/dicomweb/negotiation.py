"""Content negotiation of the JSON answers (PS3.18 8.7.3.5, 8.7.5).

QIDO-RS and STOW-RS answer with ``application/dicom+json`` only.  Any Accept header
that allows it (``*/*``, ``application/*``, ``application/json``, or no header at all)
gets it; an Accept that rules it out (XML only) gets 406 rather than a body the client
said it cannot read.
"""

from __future__ import annotations

import falcon

from adapters.dicomweb import dicomjson

#: Media types answered with DICOM JSON.
JSON_TYPES = (dicomjson.MEDIA_TYPE, falcon.MEDIA_JSON)


def accepts_json(req: falcon.Request) -> bool:
    """True when the Accept header allows DICOM JSON (no header allows anything)."""
    accept = req.get_header("Accept")
    return not accept or any(req.client_accepts(kind) for kind in JSON_TYPES)
