"""Who may call the DICOMweb service and the viewer, and with which roles
(docs/architecture.md, "Guarantees"; the rules themselves: :mod:`pacs.core.access`).

- Requests from this host (a loopback peer address) are answered without credentials,
  with the roles of ``PACS_LOOPBACK_ROLES`` (all of them by default): the README's
  quickstart and a viewer proxied on the same host just work.  Valid credentials sent
  from this host count: the request then has its user's roles.
- Requests from elsewhere need HTTP Basic (a user of ``PACS_ACCESS_FILE`` with a
  password hash, or ``PACS_WEB_USER`` / ``PACS_WEB_PASSWORD``) or a bearer token (a
  user's token, or ``PACS_WEB_TOKEN``); with no user configured they are refused.
- **Roles** (:func:`role_for`): ``read`` for GET and HEAD (QIDO-RS, WADO-RS, the
  viewer's files), ``write`` for POST (STOW-RS), ``admin`` for DELETE; a route that
  needs another one asks :meth:`Access.require`.  An authenticated user without the
  role gets 403; a request without credentials whose loopback roles lack it gets 401
  with a challenge (credentials may carry the role).
  They must come over HTTPS (``PACS_TLS_CERT``): over plain HTTP a request from another
  host gets 403 and its credentials are never evaluated (a password or token sent in
  clear is a password or token given away; comparing it would only tell an eavesdropper
  it is right).  No challenge is sent over plain HTTP either, so that a browser does not
  ask its user for a password it would then send in clear.  Credentials over plain HTTP
  are accepted from loopback only: a TLS proxy on this host, or a local script.
- ``PACS_WEB_OPEN=true`` answers everyone without credentials and with every role,
  over HTTP or HTTPS, on purpose (a trusted network, e.g. inside compose behind a
  proxy that does its own access control); an Authorization header is then not looked at.
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
from enum import Enum

import falcon

from pacs.core import access as rules
from pacs.core.access import AccessPolicy, Identity
from pacs.core.config import Settings
from pacs.core.services import access_policy

#: The challenge sent with 401 (RFC 7617 Basic, RFC 6750 Bearer).
REALM = 'realm="pacs DICOMweb"'


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    ip = rules.ip_of(address)
    return ip is not None and ip.is_loopback


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


#: Who a request is when the node is open (``PACS_WEB_OPEN``).
ANONYMOUS = Identity("anonymous", rules.ROLES)
#: The name of a request from this host without credentials.
LOOPBACK = "loopback"


def role_for(method: str) -> str:
    """The role a request method needs: ``read`` for GET / HEAD (and anything else
    that changes nothing), ``write`` for POST and PUT, ``admin`` for DELETE."""
    method = method.upper()
    if method == "DELETE":
        return rules.ADMIN
    if method in ("POST", "PUT", "PATCH"):
        return rules.WRITE
    return rules.READ


class Access:
    """The access rule for one node's settings and policy.

    Parameters
    ----------
    settings : Settings
        ``web_open``, ``web_hosts`` and ``web_delete`` are read.
    policy : AccessPolicy, optional
        The users and loopback roles (``services.access``); built from ``settings``
        when omitted.
    """

    def __init__(self, settings: Settings, policy: AccessPolicy | None = None) -> None:
        self.policy = policy if policy is not None else access_policy(settings)
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

    def identify(self, remote_addr: str | None, authorization: str | None,
                 host: str | None = None, secure: bool = False
                 ) -> tuple[Verdict, Identity | None]:
        """The verdict on a request from ``remote_addr`` with this Authorization and Host
        header, received over HTTPS (``secure``) or plain HTTP, and who it is when
        allowed.

        Credentials are never evaluated for a request from another host over plain
        HTTP.
        """
        if self.open:
            return Verdict.ALLOW, ANONYMOUS  # credentials, if any, are not looked at
        loopback = is_loopback(remote_addr)
        if not loopback and not secure:
            return Verdict.HTTPS_REQUIRED, None
        user = self.user(authorization) if authorization else None
        if user is not None:
            return Verdict.ALLOW, Identity(user.name, user.roles, authenticated=True)
        if loopback and self.names_this_node(host):
            if self.policy.loopback_roles:
                return Verdict.ALLOW, Identity(LOOPBACK, self.policy.loopback_roles)
            return Verdict.UNAUTHORIZED, None
        return (Verdict.MISDIRECTED if loopback else Verdict.UNAUTHORIZED), None

    def decide(self, remote_addr: str | None, authorization: str | None,
               host: str | None = None, secure: bool = False) -> Verdict:
        """The verdict of :meth:`identify` alone."""
        return self.identify(remote_addr, authorization, host, secure)[0]

    def allowed(self, remote_addr: str | None, authorization: str | None,
                host: str | None = None, secure: bool = False) -> bool:
        """True when :meth:`decide` lets the request pass."""
        return self.decide(remote_addr, authorization, host, secure) is Verdict.ALLOW

    def may_delete(self, req: falcon.Request) -> bool:
        """True when ``req`` may remove studies, series or instances: deletion is on
        (``PACS_WEB_DELETE``) and the requestor has the ``admin`` role
        (:meth:`require`, which answers 401 / 403 / 421 otherwise).  Every removal route
        asks this one question.

        Raises
        ------
        falcon.HTTPError
            As :meth:`require` for ``admin``.
        """
        if not self.delete:
            return False
        self.require(req, rules.ADMIN)
        return True

    def user(self, authorization: str) -> rules.User | None:
        """The user a Basic or Bearer Authorization header proves to be, if any."""
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and value.strip():
            return self.policy.by_token(value.strip())
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, sep, password = decoded.partition(":")
            return self.policy.by_password(name, password) if sep else None
        return None

    def credentials_valid(self, authorization: str) -> bool:
        """True when the Authorization header names a user (:meth:`user`)."""
        return self.user(authorization) is not None

    def challenges(self) -> list[str]:
        """The WWW-Authenticate challenges for the configured schemes."""
        schemes = []
        if self.policy.has_passwords:
            schemes.append(f"Basic {REALM}")
        if self.policy.has_tokens:
            schemes.append(f"Bearer {REALM}")
        return schemes or [f"Basic {REALM}"]

    def require(self, req: falcon.Request, role: str) -> Identity:
        """Who ``req`` is, when it has ``role``: what a route that needs a role other
        than its method's (:func:`role_for`) asks.  The identity is also kept on
        ``req.context.identity`` (the audit trail names it).

        Raises
        ------
        falcon.HTTPError
            403 over plain HTTP from another host, 421 for a misdirected request, 401
            with a challenge without valid credentials (or when the roles of a request
            from this host lack ``role``), 403 for a user without ``role``.
        """
        verdict, identity = self.identify(req.remote_addr, req.get_header("Authorization"),
                                          req.get_header("Host"),
                                          secure=req.scheme == "https")
        if identity is not None:
            req.context.identity = identity
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
        if identity is None or (role not in identity.roles and not identity.authenticated
                                and self.policy.has_credentials):
            raise falcon.HTTPUnauthorized(
                title="Credentials required",
                description="this request needs HTTP Basic or a bearer token of a user "
                            f"with the {role} role",
                challenges=self.challenges())
        if role not in identity.roles:
            raise falcon.HTTPForbidden(
                title="Not allowed",
                description=f"this request needs the {role} role")
        return identity


class AccessMiddleware:
    """Refuse requests that :class:`Access` does not allow, or whose method's role
    (:func:`role_for`) the requestor lacks (:meth:`Access.require`)."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Check the request before routing (:meth:`Access.require`).

        Raises
        ------
        falcon.HTTPError
            As :meth:`Access.require`.
        """
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            return  # a CORS preflight never carries credentials
        self.access.require(req, role_for(req.method))
