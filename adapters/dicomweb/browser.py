"""What browsers need from a DICOMweb origin: CORS and Cross-Origin-Resource-Policy.

OHIF runs on another origin unless it is proxied, and with cross-origin isolation
(COEP ``require-corp``) it embeds only resources that opt in with
``Cross-Origin-Resource-Policy``.

- ``PACS_CORS_ORIGINS`` empty (the default): no CORS headers.  Any web page a user
  opens could otherwise read this host's loopback-trusted answers.
- a comma list of origins: those origins, echoed back with ``Vary: Origin``; the
  node trusts them as it trusts this host's own pages.
- ``*``: any origin, for answers to requests that proved a user by their credentials
  (and preflights and refusals, which hold no data).  An answer the node gave for
  where the request came from alone (this host's ``PACS_LOOPBACK_ROLES``, or
  ``PACS_WEB_OPEN``) gets no CORS headers and ``same-site``: with them any page the
  user opens, from any origin, would read that host's or that network's images through
  the user's browser, which is the attack the empty default exists to stop.  A viewer
  on another origin that relies on those answers is listed by its origin.
- Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) get the methods and
  headers OHIF and dicomweb-client send; responses expose ``Warning`` (QIDO paging),
  ``Content-Location``, ``Content-Range`` and friends to scripts.
- Every response carries ``Cross-Origin-Resource-Policy``: ``cross-origin`` when CORS
  origins are configured, else ``same-site`` (a viewer on another port of the same
  host is same-site).
- A request that would change data (any method but GET, HEAD and OPTIONS) sent by a
  page of another origin is refused, 403, before its credentials are looked at: a
  form of any site can POST to ``…/reject/{code}^{scheme}`` without a preflight, and
  the browser adds this host's loopback trust or the user's cached Basic credentials
  (cross-site request forgery).  "Another origin": an ``Origin`` header that is
  neither this node's (its Host) nor listed in ``PACS_CORS_ORIGINS`` (``*`` lists
  none: a viewer elsewhere that writes is listed by its origin); without ``Origin``,
  ``Sec-Fetch-Site: cross-site`` or ``same-site``.  Clients that are no browser send
  neither and are not concerned (OWASP's CSRF prevention: verifying the origin with
  standard headers, Fetch Metadata).
"""

from __future__ import annotations

import falcon

from pacs.core.access import Identity

#: Response headers scripts may read (CORS-safelisted ones need not be listed).
EXPOSE = ("Warning", "Content-Location", "Content-Range", "Content-Type", "Location",
          "ETag", "Accept-Ranges")
#: Methods of the DICOMweb services offered here.
METHODS = "GET, HEAD, POST, OPTIONS"
#: Request headers a preflight may ask for when it names none of its own.
REQUEST_HEADERS = "Authorization, Accept, Content-Type, Range, If-None-Match"
#: Seconds a browser may cache a preflight answer.
MAX_AGE = "600"
#: Methods that change nothing: the only ones a page of another origin may send.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Sec-Fetch-Site values of a request a page of another origin made.
_ELSEWHERE = frozenset({"cross-site", "same-site"})
#: The ports an origin or a Host header may leave out (HTTP's, HTTPS').
_DEFAULT_PORTS = (":80", ":443")


class BrowserMiddleware:
    """CORS (with preflight) and Cross-Origin-Resource-Policy on every response.

    Parameters
    ----------
    origins :
        Allowed origins; ``("*",)`` for any, empty for none.
    """

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")
        self.resource_policy = "cross-origin" if origins else "same-site"

    def allowed_origin(self, origin: str | None) -> str | None:
        """The value of Access-Control-Allow-Origin for ``origin``, or ``None``."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Refuse a request that would change data, sent by a page of another origin.

        Raises
        ------
        falcon.HTTPForbidden
            For such a request (module docstring).
        """
        if req.method in SAFE_METHODS or not self.forged(req):
            return
        raise falcon.HTTPForbidden(
            title="Cross-site request refused",
            description="a page of another origin may not change this node's data; a "
                        "viewer there is listed in PACS_CORS_ORIGINS")

    def forged(self, req: falcon.Request) -> bool:
        """True when a page of another origin made ``req`` (its ``Origin``, else its
        ``Sec-Fetch-Site``), unless that origin is listed."""
        origin = req.get_header("Origin")
        if origin is not None:
            origin = origin.strip().rstrip("/")
            return origin not in self.origins and not _own(origin, req)
        return (req.get_header("Sec-Fetch-Site") or "").strip().lower() in _ELSEWHERE

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        """Add the headers (also to error responses, which scripts must read too)."""
        shared = not self.any_origin or proven(req)
        resp.set_header("Cross-Origin-Resource-Policy",
                        self.resource_policy if shared else "same-site")
        if self.origins:
            resp.append_header("Vary", "Origin")
        allowed = self.allowed_origin(req.get_header("Origin")) if shared else None
        if allowed is None:
            return
        resp.set_header("Access-Control-Allow-Origin", allowed)
        resp.set_header("Access-Control-Expose-Headers", ", ".join(EXPOSE))
        if (req_succeeded and req.method == "OPTIONS"
                and req.get_header("Access-Control-Request-Method")):
            resp.set_header("Access-Control-Allow-Methods", METHODS)
            resp.set_header("Access-Control-Allow-Headers",
                            req.get_header("Access-Control-Request-Headers")
                            or REQUEST_HEADERS)
            resp.set_header("Access-Control-Max-Age", MAX_AGE)
            resp.status = falcon.HTTP_204
            resp.data = b""


def _own(origin: str, req: falcon.Request) -> bool:
    """True when ``origin`` (``scheme://host[:port]``) names the host and port the
    request was sent to (its Host header).  Neither the scheme nor a default port is
    compared: a TLS proxy in front of the node sends it plain HTTP, the Host header of
    the public name."""
    netloc = origin.lower().partition("://")[2]
    host = (req.get_header("Host") or "").strip().lower()
    return bool(netloc) and _without_default_port(netloc) == _without_default_port(host)


def _without_default_port(netloc: str) -> str:
    """``host[:port]`` without ``:80`` or ``:443``."""
    for port in _DEFAULT_PORTS:
        if netloc.endswith(port):
            return netloc.removesuffix(port)
    return netloc


def proven(req: falcon.Request) -> bool:
    """True unless the access rule let ``req`` in for where it came from alone (this
    host's loopback roles, an open node) rather than by a user's credentials.

    A request without an identity was refused, or is a preflight: its answer holds
    no data.
    """
    identity = getattr(req.context, "identity", None)
    return not isinstance(identity, Identity) or identity.authenticated
