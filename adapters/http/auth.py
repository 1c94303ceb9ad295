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
forwards (the README, "HTTPS").  A request a proxy forwarded (one of
:data:`PROXY_HEADERS`, which the README asks the proxy to send) names this node by one
of ``PACS_WEB_HOSTS`` only, never by a loopback name: the proxy passes on the client's
Host, and ``Host: localhost`` from anywhere would otherwise get the loopback roles.
HTTPS is the WSGI ``wsgi.url_scheme``: ``https`` when the node's worker terminated
TLS on the connection (:mod:`pacs.node.httpworker`);
gunicorn lets only a forwarder on this host set it with ``X-Forwarded-Proto``: the
node pins gunicorn's trusted forwarders to loopback
(``pacs.node.webserver.TRUSTED_FORWARDERS``), whatever ``FORWARDED_ALLOW_IPS`` the
environment holds.
CORS preflight requests carry no credentials by design (Fetch standard) and are let
through; the request that follows is checked.

**Failed logins** (:mod:`pacs.core.logins`): credentials that prove no user are counted
per client address and per user name; past ``PACS_AUTH_FAILURES`` in
``PACS_AUTH_WINDOW`` seconds, requests with credentials from that address (or for that
name, from an address that failed) get 429 Too Many Requests (RFC 6585 4) with
Retry-After, before their password is hashed.  Each failure is a User Authentication
event of the audit trail (PS3.15 A.5.3.12, Login, minor failure), each lock-out a
Security Alert (A.5.3.11, Node Authentication: the attempts were stopped).  Requests
without credentials are not counted: they cost nothing and still get 401.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
from enum import Enum

import falcon

from pacs.core import access as rules, audit
from pacs.core.access import AccessPolicy, Identity
from pacs.core.audit import AuditTrail, Participant
from pacs.core.config import Settings
from pacs.core.logins import Attempt, Lockout, LoginLimiter
from pacs.core.services import Services, access_policy

#: Most characters of a claimed user name written to the audit trail (a user name of
#: the access rules has at most as many, :mod:`pacs.core.access`): the name of a failed
#: login is the client's own text, up to a whole header.
CLAIMED_NAME_CHARS = 128

#: Headers a reverse proxy adds to what it forwards (RFC 7239 and the de facto ones):
#: a request carrying any came through one, whatever its TCP peer.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
                 "X-Real-IP")
#: The challenge sent with 401 (RFC 7617 Basic, RFC 6750 Bearer).
REALM = 'realm="pacs DICOMweb"'


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    ip = rules.ip_of(address)
    return ip is not None and ip.is_loopback


def host_name(host: str) -> str:
    """The name of a ``Host`` header value, without port and brackets, lower case, and
    without a fully qualified name's root dot (``north.example.`` is
    ``north.example``: one name, which every rule that looks at it must see alike)."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1]:8080
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return (name if name and port.isdigit() else host.rstrip(":")).rstrip(".")


def is_address(name: str) -> bool:
    """True when ``name`` (a Host header's name) is an IP address, not a DNS name."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def names_loopback(host: str) -> bool:
    """True when ``host`` (a Host header's name) can only mean this machine:
    ``localhost`` and ``*.localhost`` (RFC 6761 6.3) or a loopback address."""
    return rules.names_this_machine(host)


class Verdict(Enum):
    """What :meth:`Access.decide` says of a request."""

    ALLOW = "allow"
    HTTPS_REQUIRED = "https required"  # from another host over plain HTTP: 403
    MISDIRECTED = "misdirected"        # loopback naming another host, no credentials: 421
    UNAUTHORIZED = "unauthorized"      # from another host, no valid credentials: 401
    LOCKED = "locked"                  # credentials after too many failed logins: 429


#: Who a request is when the node is open (``PACS_WEB_OPEN``).
ANONYMOUS = Identity("anonymous", rules.ROLES)
#: The name of a request from this host without credentials.
LOOPBACK = "loopback"


def basic_credentials(authorization: str) -> tuple[str, str] | None:
    """The user name and password of an HTTP Basic Authorization header (RFC 7617),
    or ``None`` for another scheme or a header that is not one."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


def role_for(method: str) -> str:
    """The role a request method needs: ``read`` for GET / HEAD (and anything else
    that changes nothing), ``write`` for POST and PUT, ``admin`` for DELETE."""
    method = method.upper()
    if method == "DELETE":
        return rules.ADMIN
    if method in ("POST", "PUT", "PATCH"):
        return rules.WRITE
    return rules.READ


def is_placeholder(authorization: str) -> bool:
    """True when an Authorization header carries no credentials, only a client's
    placeholder for them (:data:`pacs.core.access.PLACEHOLDER_TOKENS`): not a login,
    failed or not."""
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and value.strip().lower() in rules.PLACEHOLDER_TOKENS


class Access:
    """The access rule for one node's settings and policy.

    Parameters
    ----------
    settings : Settings
        ``web_open``, ``web_hosts`` and ``web_delete`` are read.
    policy : AccessPolicy, optional
        The users and loopback roles (``services.access``); built from ``settings``
        when omitted.
    logins : LoginLimiter, optional
        The failed logins of this process (``services.logins``); one of its own, of
        ``PACS_AUTH_FAILURES`` and ``PACS_AUTH_WINDOW``, when omitted.
    trail : AuditTrail, optional
        Where failed logins and lock-outs are recorded (``services.audit``); none when
        omitted.
    """

    def __init__(self, settings: Settings, policy: AccessPolicy | None = None, *,
                 logins: LoginLimiter | None = None,
                 trail: AuditTrail | None = None) -> None:
        self.policy = policy if policy is not None else access_policy(settings)
        self.open = settings.web_open
        self.delete = settings.web_delete
        self.hosts = frozenset(host_name(name) for name in settings.web_hosts)
        self.site = settings.customer  # whose users a claimed name is counted among
        self.logins = logins if logins is not None else LoginLimiter.of(settings)
        self.trail = trail

    @classmethod
    def of(cls, services: Services) -> Access:
        """The access rule of ``services``: its settings, policy, failed logins and
        audit trail."""
        return cls(services.settings, services.access, logins=services.logins,
                   trail=services.audit)

    def names_this_node(self, host: str | None, proxied: bool = False) -> bool:
        """True when a request's Host header names this node (no header: not a
        browser, which always sends one).  For a request a proxy forwarded
        (``proxied``) only one of ``PACS_WEB_HOSTS`` does: the proxy passes on the
        client's Host, and a client anywhere can write ``localhost`` there."""
        if not host:
            return not proxied
        name = host_name(host)
        return name in self.hosts or (not proxied and names_loopback(name))

    def identify(self, remote_addr: str | None, authorization: str | None,
                 host: str | None = None, secure: bool = False, proxied: bool = False
                 ) -> tuple[Verdict, Identity | None]:
        """The verdict on a request from ``remote_addr`` with this Authorization and Host
        header, received over HTTPS (``secure``) or plain HTTP, forwarded by a proxy
        (``proxied``: it carries a header of :data:`PROXY_HEADERS`) or not, and who it
        is when allowed.

        Credentials are never evaluated for a request from another host over plain
        HTTP, nor from a client locked out by failed logins (:meth:`locked_out`).
        """
        if self.open:
            # Answers without credentials, on purpose, but to requests that name this
            # node: a web page whose DNS name is rebound to its address would read and
            # write everything in that page's own origin.  An address names no one
            # else.  Credentials, if any, are not looked at.
            if not (self.names_this_node(host) or is_address(host_name(host or ""))):
                return Verdict.MISDIRECTED, None
            return Verdict.ALLOW, ANONYMOUS
        loopback = is_loopback(remote_addr)
        if not loopback and not secure:
            return Verdict.HTTPS_REQUIRED, None
        # A request from this host that names it needs no credentials when the loopback
        # roles are set: a lock-out (or credentials that fail) leaves it those roles,
        # never refused for credentials it did not need.
        names_this_node = loopback and self.names_this_node(host, proxied)
        trusted = names_this_node and bool(self.policy.loopback_roles)
        user = None
        locked = False
        if authorization and not is_placeholder(authorization):
            locked = self.locked_out(remote_addr, authorization)
            if locked and not trusted:
                return Verdict.LOCKED, None  # before any password is hashed
            if not locked:
                user = self.user(authorization)
                if user is None:  # counted, then judged as without credentials
                    self.failed(self.attempt(remote_addr, authorization), authorization)
        if user is not None:
            return Verdict.ALLOW, Identity(user.name, user.roles, authenticated=True)
        if trusted:
            return Verdict.ALLOW, Identity(LOOPBACK, self.policy.loopback_roles,
                                           locked_out=locked)
        if names_this_node:
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

    def may_reject(self, req: falcon.Request) -> bool:
        """True when ``req`` may store an IOCM rejection note, which removes the
        instances it names: what a removal needs (:meth:`may_delete`: deletion on and
        the ``admin`` role), asked of the identity the request was admitted as, and
        never answered with an error (a STOW-RS refuses the note alone)."""
        identity = getattr(req.context, "identity", None)
        return self.delete and identity is not None and rules.ADMIN in identity.roles

    def may_overwrite(self, req: falcon.Request) -> bool:
        """True when ``req`` may replace a different object stored under a SOP Instance
        UID (what an AE's ``overwrite`` right allows over DIMSE): the replaced object is
        gone, so it takes the ``admin`` role of the identity the request was admitted
        as; a STOW-RS refuses such a part alone (0111, as the ``reject`` duplicate
        policy would)."""
        identity = getattr(req.context, "identity", None)
        return identity is not None and rules.ADMIN in identity.roles

    def user(self, authorization: str) -> rules.User | None:
        """The user a Basic or Bearer Authorization header proves to be, if any."""
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return self.policy.by_token(value.strip())
        basic = basic_credentials(authorization)
        return self.policy.by_password(*basic) if basic is not None else None

    def attempt(self, remote_addr: str | None, authorization: str) -> Attempt:
        """The login ``authorization`` from ``remote_addr`` is, for the limiter."""
        basic = basic_credentials(authorization)
        name = basic[0] if basic is not None and basic[0] else None
        return Attempt(remote_addr or "", name, name is not None and name in self.policy.users,
                       site=self.site)

    def retry_after(self, remote_addr: str | None, authorization: str) -> float:
        """Seconds until credentials from ``remote_addr`` are looked at again (0: now)."""
        return self.logins.wait(self.attempt(remote_addr, authorization))

    def locked_out(self, remote_addr: str | None, authorization: str) -> bool:
        """True when credentials from ``remote_addr`` are not looked at now."""
        return self.retry_after(remote_addr, authorization) > 0

    def failed(self, attempt: Attempt, authorization: str) -> None:
        """Count a failed login and record it in the audit trail: a User
        Authentication event, and a Security Alert when it locked a client out."""
        lockout = self.logins.failed(attempt)
        if self.trail is None or not self.trail.enabled:
            return
        scheme = authorization.strip().partition(" ")[0].lower()
        who = (attempt.user[:CLAIMED_NAME_CHARS] if attempt.user
               else rules.TOKEN_USER if scheme == "bearer" else "anonymous")
        client = Participant(who, True, address=attempt.address)
        self.trail.user_authentication(audit.WEB_SERVER, client, audit.MINOR_FAILURE,
                                       "wrong credentials")
        if lockout is not Lockout.NONE:
            what = ("user name" if lockout is Lockout.USER else "client address")
            self.trail.security_alert(
                audit.WEB_SERVER, audit.NODE_AUTHENTICATION,
                f"DICOMweb logins of this {what} refused for up to "
                f"{self.logins.window:g} s: {self.logins.limit} failed logins in "
                f"{self.logins.window:g} s", audit.MINOR_FAILURE, [client])

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
        ``req.context.identity`` (the audit trail names it); a request asked again (the
        middleware checked its method's role, a removal then asks for ``admin``) is
        judged on that identity: its credentials are checked, and a failure counted by
        the login limiter, once per request.

        Raises
        ------
        falcon.HTTPError
            403 over plain HTTP from another host, 421 for a misdirected request, 429
            with Retry-After after too many failed logins, 401
            with a challenge without valid credentials (or when the roles of a request
            from this host lack ``role``), 403 for a user without ``role``.
        """
        identity = getattr(req.context, "identity", None)
        if identity is None:
            identity = self._identified(req)
        if identity is not None and identity.locked_out and role not in identity.roles:
            # From this host, let in with the loopback roles in spite of the lock-out,
            # but needing another role, which only the credentials could give: they are
            # not checked until Retry-After, not wrong.
            raise self._locked(req)
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

    def _identified(self, req: falcon.Request) -> Identity | None:
        """:meth:`identify` of ``req``, kept on ``req.context.identity``; the refusals
        that do not depend on the role wanted raised.

        Raises
        ------
        falcon.HTTPError
            403 over plain HTTP from another host, 429 when locked out, 421 for a
            misdirected request.
        """
        verdict, identity = self.identify(
            req.remote_addr, req.get_header("Authorization"), req.get_header("Host"),
            secure=req.scheme == "https",
            proxied=any(req.get_header(name) is not None for name in PROXY_HEADERS))
        if identity is not None:
            req.context.identity = identity
        if verdict is Verdict.HTTPS_REQUIRED:
            raise falcon.HTTPForbidden(
                title="HTTPS required",
                description="requests from other hosts are answered over HTTPS only, and "
                            "credentials are never accepted over plain HTTP: use https:// "
                            "(a node with PACS_TLS_CERT, or a TLS proxy on its host)")
        if verdict is Verdict.LOCKED:
            raise self._locked(req)
        if verdict is Verdict.MISDIRECTED:
            raise falcon.HTTPError(
                falcon.HTTP_421, title="Misdirected request",
                description="this node answers requests without credentials only for its "
                            "own names (a loopback name or PACS_WEB_HOSTS; with "
                            "PACS_WEB_OPEN, an address too)")
        return identity

    def _locked(self, req: falcon.Request) -> falcon.HTTPError:
        """The 429 of a request whose credentials are not checked until Retry-After."""
        wait = self.retry_after(req.remote_addr, req.get_header("Authorization") or "")
        return falcon.HTTPTooManyRequests(
            title="Too many failed logins",
            description="too many failed logins from this address (or for this "
                        "user): credentials are not checked until Retry-After",
            retry_after=max(1, math.ceil(wait)))


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
