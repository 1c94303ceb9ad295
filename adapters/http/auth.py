"""Who may call the DICOMweb service (docs/architecture.md, "Guarantees").

- Requests from this host (a loopback peer address) are answered without credentials:
  the README's quickstart and a viewer proxied on the same host just work.
- Requests from elsewhere need HTTP Basic (``PACS_WEB_USER`` / ``PACS_WEB_PASSWORD``)
  or a bearer token (``PACS_WEB_TOKEN``); with neither configured they are refused.
  They must come over HTTPS (``PACS_TLS_CERT``): over plain HTTP a request from another
  host gets 403 and its credentials are never evaluated (a password or token sent in
  clear is a password or token given away; comparing it would only tell an eavesdropper
  it is right).  No challenge is sent over plain HTTP either, so that a browser does not
  ask its user for a password it would then send in clear.  Credentials over plain HTTP
  are accepted from loopback only: a TLS proxy on this host, or a local script.
- ``PACS_WEB_OPEN=true`` answers everyone without credentials, over HTTP or HTTPS, on
  purpose (a trusted network, e.g. inside compose behind a proxy that does its own
  access control); an Authorization header is then not looked at.
- The loopback rule holds only for requests that name this node in their ``Host``
  header: a loopback name or address (``localhost``, ``*.localhost``, ``127.0.0.1``,
  ``[::1]``) or one of ``PACS_WEB_HOSTS``.  A page whose DNS name is rebound to
  127.0.0.1 makes the browser send its own name: such a request from loopback without
  valid credentials gets 421 Misdirected Request (RFC 9110 15.5.20), and no data.

The peer address is the TCP peer (``REMOTE_ADDR``), never a ``Forwarded`` header,
which a client can write.  A reverse proxy on this host therefore passes everyone it
forwards whose Host names this node: it must then do its own access control, or keep
its public name out of ``PACS_WEB_HOSTS`` so that the node checks the credentials it
forwards (the README, "HTTPS").  HTTPS is the WSGI ``wsgi.url_scheme``: ``https`` when
the node's worker terminated TLS on the connection (:mod:`pacs.node.httpworker`);
gunicorn lets only a trusted forwarder (loopback by default) set it with
``X-Forwarded-Proto``.
CORS preflight requests carry no credentials by design (Fetch standard) and are let
through; the request that follows is checked.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from enum import Enum

import falcon

from pacs.core.config import Settings

#: The challenge sent with 401 (RFC 7617 Basic, RFC 6750 Bearer).
REALM = 'realm="pacs DICOMweb"'


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_name(host: str) -> str:
    """The name of a ``Host`` header value, without port and brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1]:8080
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host.rstrip(":")


def names_loopback(host: str) -> bool:
    """True when ``host`` (a Host header's name) can only mean this machine:
    ``localhost`` and ``*.localhost`` (RFC 6761 6.3) or a loopback address."""
    name = host.rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


class Verdict(Enum):
    """What :meth:`Access.decide` says of a request."""

    ALLOW = "allow"
    HTTPS_REQUIRED = "https required"  # from another host over plain HTTP: 403
    MISDIRECTED = "misdirected"        # loopback naming another host, no credentials: 421
    UNAUTHORIZED = "unauthorized"      # from another host, no valid credentials: 401


def _equal(given: str, expected: str) -> bool:
    """Constant-time comparison (no timing side channel on the secret)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class Access:
    """The credential check for one node's settings.

    Parameters
    ----------
    settings : Settings
        ``web_user``, ``web_password``, ``web_token``, ``web_open``, ``web_hosts`` and
        ``web_delete`` are read.
    """

    def __init__(self, settings: Settings) -> None:
        self.user = settings.web_user
        self.password = settings.web_password
        self.token = settings.web_token
        self.open = settings.web_open
        self.delete = settings.web_delete
        self.hosts = frozenset(host_name(name) for name in settings.web_hosts)

    def names_this_node(self, host: str | None) -> bool:
        """True when a request's Host header names this node (no header: not a
        browser, which always sends one)."""
        if not host:
            return True
        name = host_name(host)
        return names_loopback(name) or name in self.hosts

    def decide(self, remote_addr: str | None, authorization: str | None,
               host: str | None = None, secure: bool = False) -> Verdict:
        """The verdict on a request from ``remote_addr`` with this Authorization and Host
        header, received over HTTPS (``secure``) or plain HTTP.

        The credentials are compared last, and never for a request from another host
        over plain HTTP.
        """
        if self.open:
            return Verdict.ALLOW  # credentials, if any, are not looked at
        loopback = is_loopback(remote_addr)
        if loopback and self.names_this_node(host):
            return Verdict.ALLOW
        if not loopback and not secure:
            return Verdict.HTTPS_REQUIRED
        if self.credentials_valid(authorization or ""):
            return Verdict.ALLOW
        return Verdict.MISDIRECTED if loopback else Verdict.UNAUTHORIZED

    def allowed(self, remote_addr: str | None, authorization: str | None,
                host: str | None = None, secure: bool = False) -> bool:
        """True when :meth:`decide` lets the request pass."""
        return self.decide(remote_addr, authorization, host, secure) is Verdict.ALLOW

    def may_delete(self, req: falcon.Request) -> bool:
        """True when ``req`` may remove studies, series or instances: deletion is on
        (``PACS_WEB_DELETE``) and the access rule admits the request.  Every removal
        route asks this one question (a check of the user's role belongs here)."""
        return self.delete and self.allowed(req.remote_addr, req.get_header("Authorization"),
                                            req.get_header("Host"),
                                            secure=req.scheme == "https")

    def credentials_valid(self, authorization: str) -> bool:
        """Check a Basic or Bearer Authorization header against the settings."""
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token:
            return _equal(value.strip(), self.token)
        if scheme == "basic" and self.user and self.password:
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            user, sep, password = decoded.partition(":")
            # Both compared every time, so a wrong user costs what a wrong password does.
            return bool(sep) & _equal(user, self.user) & _equal(password, self.password)
        return False

    def challenges(self) -> list[str]:
        """The WWW-Authenticate challenges for the configured schemes."""
        schemes = []
        if self.user and self.password:
            schemes.append(f"Basic {REALM}")
        if self.token:
            schemes.append(f"Bearer {REALM}")
        return schemes or [f"Basic {REALM}"]


class AccessMiddleware:
    """Refuse requests that :class:`Access` does not allow: 403 from another host over
    plain HTTP, 421 for a loopback request naming another host, else 401 with a
    challenge."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Check the request before routing.

        Raises
        ------
        falcon.HTTPForbidden
            Not from this host, over plain HTTP (whatever the credentials).
        falcon.HTTPError
            421 from loopback with a Host that does not name this node (DNS
            rebinding) and no valid credentials.
        falcon.HTTPUnauthorized
            Not from this host, and no valid credentials.
        """
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            return  # a CORS preflight never carries credentials
        verdict = self.access.decide(req.remote_addr, req.get_header("Authorization"),
                                     req.get_header("Host"), secure=req.scheme == "https")
        if verdict is Verdict.ALLOW:
            return
        if verdict is Verdict.HTTPS_REQUIRED:
            raise falcon.HTTPForbidden(
                title="HTTPS required",
                description="requests from other hosts are answered over HTTPS only, and "
                            "credentials are never accepted over plain HTTP: use https:// "
                            "(a node with PACS_TLS_CERT, or a TLS proxy on its host)")
        if verdict is Verdict.MISDIRECTED:
            raise falcon.HTTPError(
                falcon.HTTP_421, title="Misdirected request",
                description="this node answers requests without credentials only for its "
                            "own names (a loopback name or PACS_WEB_HOSTS)")
        raise falcon.HTTPUnauthorized(
            title="Credentials required",
            description="requests from other hosts need HTTP Basic or a bearer token",
            challenges=self.access.challenges())
