"""What answers over HTTPS tell a browser of the transport: HSTS (RFC 6797)."""

from __future__ import annotations

import falcon

#: Strict-Transport-Security (RFC 6797 6.1): a browser that got an answer over HTTPS
#: uses HTTPS alone for this host for a year, and lets no certificate warning be
#: clicked through (this origin takes passwords).  Without ``includeSubDomains``: the
#: node's name may have neighbours it does not serve.
STRICT_TRANSPORT = "max-age=31536000"


def mark_secure(req: falcon.Request, resp: falcon.Response) -> None:
    """Strict-Transport-Security on an answer sent over HTTPS (a browser ignores it
    over plain HTTP, RFC 6797 8.1, and it is not sent there)."""
    if req.scheme == "https":
        resp.set_header("Strict-Transport-Security", STRICT_TRANSPORT)
