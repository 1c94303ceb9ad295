"""Who may call the DICOMweb service (docs/architecture.md, "Guarantees").

- Requests from this host (a loopback peer address) are answered without credentials:
  the README's quickstart and a viewer proxied on the same host just work.
- Requests from elsewhere need HTTP Basic (``PACS_WEB_USER`` / ``PACS_WEB_PASSWORD``)
  or a bearer token (``PACS_WEB_TOKEN``); with neither configured they are refused.
- ``PACS_WEB_OPEN=true`` answers everyone without credentials, on purpose (a trusted
  network, e.g. inside compose behind a proxy that does its own access control).
- The loopback rule holds only for requests that name this node in their ``Host``
  header: a loopback name or address (``localhost``, ``*.localhost``, ``127.0.0.1``,
  ``[::1]``) or one of ``PACS_WEB_HOSTS``.  A page whose DNS name is rebound to
  127.0.0.1 makes the browser send its own name: such a request from loopback without
  valid credentials gets 421 Misdirected Request (RFC 9110 15.5.20), and no data.

The peer address is the TCP peer (``REMOTE_ADDR``), never a ``Forwarded`` header,
which a client can write.  A reverse proxy on this host therefore passes everyone it
forwards: it must then do its own access control (documented in the README).
CORS preflight requests carry no credentials by design (Fetch standard) and are let
through; the request that follows is checked.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

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


def _equal(given: str, expected: str) -> bool:
    """Constant-time comparison (no timing side channel on the secret)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class Access:
    """The credential check for one node's settings.

    Parameters
    ----------
    settings : Settings
        ``web_user``, ``web_password``, ``web_token``, ``web_open`` and ``web_hosts``
        are read.
    """

    def __init__(self, settings: Settings) -> None:
        self.user = settings.web_user
        self.password = settings.web_password
        self.token = settings.web_token
        self.open = settings.web_open
        self.hosts = frozenset(host_name(name) for name in settings.web_hosts)

    def names_this_node(self, host: str | None) -> bool:
        """True when a request's Host header names this node (no header: not a
        browser, which always sends one)."""
        if not host:
            return True
        name = host_name(host)
        return names_loopback(name) or name in self.hosts

    def allowed(self, remote_addr: str | None, authorization: str | None,
                host: str | None = None) -> bool:
        """True when a request from ``remote_addr`` with this Authorization and Host
        header may pass."""
        if self.open or (is_loopback(remote_addr) and self.names_this_node(host)):
            return True
        return self.credentials_valid(authorization or "")

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
    """Refuse requests that :class:`Access` does not allow: 421 for a loopback request
    naming another host, else 401 with a challenge."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Check the request before routing.

        Raises
        ------
        falcon.HTTPError
            421 from loopback with a Host that does not name this node (DNS
            rebinding) and no valid credentials.
        falcon.HTTPUnauthorized
            Not from this host, and no valid credentials.
        """
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            return  # a CORS preflight never carries credentials
        host = req.get_header("Host")
        if self.access.allowed(req.remote_addr, req.get_header("Authorization"), host):
            return
        if is_loopback(req.remote_addr):
            raise falcon.HTTPError(
                falcon.HTTP_421, title="Misdirected request",
                description="this node answers requests without credentials only for its "
                            "own names (a loopback name or PACS_WEB_HOSTS)")
        raise falcon.HTTPUnauthorized(
            title="Credentials required",
            description="requests from other hosts need HTTP Basic or a bearer token",
            challenges=self.access.challenges())
