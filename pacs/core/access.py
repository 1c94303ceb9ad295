"""Who may do what: known AEs with rights, users with roles (protocol-free).

The edges ask one :class:`AccessPolicy` and translate its answers: the DIMSE edge into
A-ASSOCIATE-RJ and refusal statuses (:mod:`pacs.dimse.server`, :mod:`pacs.dimse.status`),
the HTTP edges into 401 / 403 (:mod:`adapters.http.auth`).

**AEs.**  A known AE has a title, optionally the address it must call from (an IP
address, a network such as ``10.1.0.0/16``, or a host name, resolved when it
associates) and a port (with a host, a C-MOVE destination; with a network, the
destination of its own C-MOVEs only, at the address it calls from:
:func:`pacs.dimse.retrieve.destination`), and rights among :data:`AE_RIGHTS`:

=========  ==================================================================
echo       C-ECHO
store      C-STORE of new instances (and the same instance again, unchanged)
overwrite  C-STORE of a different object under a stored SOP Instance UID
reject     C-STORE of an IOCM rejection note, which removes the instances it names
find       C-FIND
retrieve   C-MOVE and C-GET
=========  ==================================================================

A known AE with ``tls = true`` associates over DICOM TLS only (an association of its
title on the plain port is refused: who may store and retrieve must not be one
spoofed title away on an unencrypted link), and as a C-MOVE destination it is reached
over TLS too.  With ``certificates`` (SHA-256 fingerprints of client certificates,
hex), it associates over DICOM TLS presenting one of those only: a certificate of the
node's authorities names an AE title (its CN), and the same title may be another
customer's modality; a fingerprint ties the title to one device.

An AE the policy does not know gets ``unknown_ae_rights`` (``PACS_UNKNOWN_AE_RIGHTS``:
all of them by default, nothing in the compose example).  An association of an AE
with no rights at all, or of a known AE from another address, is refused.

**Users.**  A DICOMweb user has a name, a password hash or token hashes
(:func:`hash_password`, :func:`hash_token`; never the secret itself) and roles among
:data:`ROLES`: ``read`` (QIDO-RS, WADO-RS, the viewer), ``write`` (STOW-RS), ``admin``
(removing data, and so storing an IOCM rejection note over STOW-RS).  Requests from
this host without credentials get ``loopback_roles`` (``PACS_LOOPBACK_ROLES``: all of
them by default).

**Sources.**  The tables of ``PACS_ACCESS_FILE`` (TOML, :func:`parse` reads one table
so that a file of several customers can hold one per customer), and the single-entry
settings, which become entries of the same kind: each title of
``PACS_ALLOWED_CALLING_AETS`` is a known AE with every right (and, when the list is
set, unknown AEs get none, as that setting always meant); ``PACS_WEB_USER`` /
``PACS_WEB_PASSWORD`` a user with every role (its password hashed on first use,
:attr:`User.secret`), ``PACS_WEB_TOKEN`` a token of the user ``token`` with every
role.  The file's entries win over the settings' for the same name.

::

    [[ae]]
    title = "CT1"
    host = "10.1.2.3"                # optional: the address it calls from
    port = 104                       # optional, with host: a C-MOVE destination
    rights = ["echo", "store"]
    tls = true                       # optional: over DICOM TLS only
    certificates = ["9f86d0…"]       # optional: only with these client certificates

    [[user]]
    name = "alice"
    password = "scrypt$16384$8$1$...$..."   # pacs passwd
    roles = ["read"]

    [[user]]
    name = "uploader"
    tokens = ["sha256$..."]                 # pacs passwd --token
    roles = ["read", "write"]
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import secrets
import socket
import threading
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pacs.core.errors import ConfigError

_T = TypeVar("_T")

ECHO, STORE, OVERWRITE, FIND, RETRIEVE = "echo", "store", "overwrite", "find", "retrieve"
REJECT = "reject"
#: Every right an AE may have.
AE_RIGHTS = frozenset({ECHO, STORE, OVERWRITE, REJECT, FIND, RETRIEVE})
#: Bearer "tokens" that are a client's text for no token (Python's ``None``,
#: JavaScript's ``null`` and ``undefined``): dicomweb_client's command line sends
#: ``Authorization: Bearer None`` when given none, and the README's quickstart is that
#: command.  Such a header is no login; no token of the node may be one of them.
PLACEHOLDER_TOKENS = frozenset({"", "none", "null", "undefined"})
READ, WRITE, ADMIN = "read", "write", "admin"
#: Every role a DICOMweb user may have.
ROLES = frozenset({READ, WRITE, ADMIN})

#: scrypt cost of :func:`hash_password` (n, r, p): about 16 MiB and tens of
#: milliseconds per hash, the interactive-login parameters of RFC 7914 section 2.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
#: Most memory one password check may take (scrypt's ``maxmem``): a stored hash whose
#: parameters need more is refused when the access rules are read
#: (:func:`check_password_hash`), not found unverifiable at each login.
SCRYPT_MAXMEM = 256 << 20
#: Passwords verified lately, kept (keyed by a keyed hash, never the password) so that
#: a browser re-sending its Basic credentials with every request pays scrypt once.
VERIFIED_CACHE = 256
#: Longest user name and AE title read from a file (AE titles have 16 characters).
_MAX_NAME = 128


def parse_set(value: str | Iterable[str], allowed: frozenset[str], what: str) -> frozenset[str]:
    """A comma list (or list) of names from ``allowed``; ``all`` is every one and
    ``none`` or nothing is none.

    Raises
    ------
    ValueError
        A name not in ``allowed``.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    found = {str(name).strip().lower() for name in names if str(name).strip()}
    if "all" in found:
        return allowed
    found.discard("none")
    unknown = found - allowed
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(sorted(unknown))}; "
                         f"expected some of {', '.join(sorted(allowed))}, all or none")
    return frozenset(found)


# -- secrets ------------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A self-describing scrypt hash of ``password``:
    ``scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>`` (a random 16-byte salt)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=64 << 20, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def hash_token(token: str) -> str:
    """A self-describing hash of a bearer token: ``sha256$<hex>``.  Tokens are random
    and long (:func:`new_token`), so a fast hash is enough: nothing to guess."""
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_password_hash(stored: str) -> None:
    """Refuse a password hash :func:`verify_password` cannot read.

    Raises
    ------
    ValueError
        Not ``scrypt$n$r$p$salt$hash`` with sane parameters.
    """
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a password hash of `pacs passwd` (scrypt$n$r$p$salt$hash)")
    n, r, p = (int(value) for value in parts[1:4])
    if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    if scrypt_memory(n, r, p) > SCRYPT_MAXMEM:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} need "
                         f"{scrypt_memory(n, r, p) >> 20} MiB per check, more than the "
                         f"{SCRYPT_MAXMEM >> 20} MiB a check may take: hash the password "
                         "again with `pacs passwd`")
    base64.b64decode(parts[4], validate=True)
    base64.b64decode(parts[5], validate=True)


def scrypt_memory(n: int, r: int, p: int) -> int:
    """Bytes scrypt needs for these parameters, as OpenSSL counts them against
    ``maxmem`` (its V array of ``n + 2`` blocks and the ``p`` blocks of B, each block
    ``128 * r`` bytes)."""
    return 128 * r * (n + 2 + p)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (:func:`hash_password`); constant time
    in the comparison."""
    try:
        _, n, r, p, salt, expected = stored.split("$")
        raw = base64.b64decode(expected, validate=True)
        digest = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt),
                                n=int(n), r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM,
                                dklen=len(raw))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, raw)


# -- the tables ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownAE:
    """A remote AE the policy knows (module docstring)."""

    title: str
    rights: frozenset[str]
    host: str = ""
    port: int = 0
    tls: bool = False  # associates, and is reached, over DICOM TLS only
    #: SHA-256 fingerprints (lower-case hex) of the client certificates it may present
    #: (empty: any its title's CN names).
    certificates: frozenset[str] = frozenset()

    @property
    def destination(self) -> bool:
        """True when a C-MOVE may send to it (an address and a port)."""
        return bool(self.host and self.port)

    @property
    def over_tls(self) -> bool:
        """True when it associates, and so is reached, over DICOM TLS only: ``tls``, or
        certificates it must present (which only TLS carries)."""
        return self.tls or bool(self.certificates)


@dataclass(frozen=True)
class User:
    """A DICOMweb user: a password hash and / or token hashes, and roles.

    ``secret`` is a password a setting gives in clear (``PACS_WEB_PASSWORD``) instead
    of a hash: :class:`AccessPolicy` hashes it on first use, once per process, so that
    no process pays a scrypt at start-up for a password it may never check.
    """

    name: str
    roles: frozenset[str]
    password: str = ""
    tokens: tuple[str, ...] = ()
    secret: str = field(default="", repr=False, compare=False)

    @property
    def has_password(self) -> bool:
        """True when the user logs in with a password (HTTP Basic)."""
        return bool(self.password or self.secret)


@dataclass(frozen=True)
class Tables:
    """What one access table says (:func:`parse`); ``None``: not said there."""

    aes: tuple[KnownAE, ...] = ()
    users: tuple[User, ...] = ()
    unknown_ae_rights: frozenset[str] | None = None
    loopback_roles: frozenset[str] | None = None


def _names(entry: Mapping[str, Any], key: str, allowed: frozenset[str],
           what: str) -> frozenset[str]:
    value = entry.get(key, [])
    if not isinstance(value, list | str):
        raise ValueError(f"{key} must be a list of {what}s")
    return parse_set(value, allowed, what)


def _text(entry: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str) or len(value) > _MAX_NAME or (required and not value.strip()):
        raise ValueError(f"{key} must be a text of 1-{_MAX_NAME} characters")
    return value.strip()


#: The keys an ``ae`` and a ``user`` entry may have: any other (a misspelt ``tls``,
#: say) is refused rather than ignored, since a rule left out opens what it closed.
_AE_KEYS = frozenset({"title", "host", "port", "rights", "tls", "certificates"})
_USER_KEYS = frozenset({"name", "password", "tokens", "roles"})


def _only(entry: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")


def _ae(entry: Mapping[str, Any]) -> KnownAE:
    _only(entry, _AE_KEYS)
    title = _text(entry, "title", required=True)
    if len(title) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters (PS3.5 6.2)")
    port = entry.get("port", 0)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"AE {title}: port must be a number 0-65535")
    host = _text(entry, "host")
    if port and not host:
        raise ValueError(f"AE {title}: a port needs a host")
    tls = entry.get("tls", False)
    if not isinstance(tls, bool):
        raise ValueError(f"AE {title}: tls must be true or false")
    return KnownAE(title, _names(entry, "rights", AE_RIGHTS, "right"), host, port, tls,
                   _fingerprints(entry, title))


def _fingerprints(entry: Mapping[str, Any], title: str) -> frozenset[str]:
    """An AE entry's ``certificates``: SHA-256 fingerprints, hex (colons allowed)."""
    value = entry.get("certificates", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"AE {title}: certificates must be a list of SHA-256 fingerprints")
    found = frozenset(v.replace(":", "").strip().lower() for v in value)
    if any(len(v) != 64 or v.strip("0123456789abcdef") for v in found):
        raise ValueError(f"AE {title}: certificates must be SHA-256 fingerprints "
                         "(64 hexadecimal digits)")
    return found


def _user(entry: Mapping[str, Any]) -> User:
    _only(entry, _USER_KEYS)
    name = _text(entry, "name", required=True)
    if ":" in name:
        raise ValueError(f"user {name!r}: a name may not hold ':' (HTTP Basic, RFC 7617)")
    password = _text(entry, "password")
    if password:
        check_password_hash(password)
    tokens = entry.get("tokens", [])
    if isinstance(tokens, str):
        tokens = [tokens]
    if not isinstance(tokens, list) or not all(
            isinstance(t, str) and t.startswith("sha256$") and len(t) == 71 for t in tokens):
        raise ValueError(f"user {name}: tokens must be hashes of `pacs passwd --token` "
                         "(sha256$...)")
    if not password and not tokens:
        raise ValueError(f"user {name}: give a password hash or token hashes")
    return User(name, _names(entry, "roles", ROLES, "role"), password, tuple(tokens))


def parse(table: Mapping[str, Any], where: str = "access table") -> Tables:
    """The AEs, users and defaults of one access table (a TOML table: ``ae`` and
    ``user`` arrays of tables, optional ``unknown_ae_rights`` and ``loopback_roles``).

    Raises
    ------
    ConfigError
        Anything it cannot read, naming the entry.
    """
    unknown = set(table) - {"ae", "user", "unknown_ae_rights", "loopback_roles"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    aes: dict[str, KnownAE] = {}
    users: dict[str, User] = {}
    try:
        for entry in _entries(table, "ae"):
            ae = _named(_ae, entry, "AE", "title")
            if ae.title in aes:
                raise ValueError(f"AE {ae.title} is listed twice")
            aes[ae.title] = ae
        for entry in _entries(table, "user"):
            user = _named(_user, entry, "user", "name")
            if user.name in users:
                raise ValueError(f"user {user.name} is listed twice")
            users[user.name] = user
        unknown_rights = (_names(table, "unknown_ae_rights", AE_RIGHTS, "right")
                          if "unknown_ae_rights" in table else None)
        loopback = (_names(table, "loopback_roles", ROLES, "role")
                    if "loopback_roles" in table else None)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Tables(tuple(aes.values()), tuple(users.values()), unknown_rights, loopback)


def _named(read: Callable[[Mapping[str, Any]], _T], entry: Mapping[str, Any], kind: str,
           key: str) -> _T:
    """``read(entry)``, its error naming the entry."""
    try:
        return read(entry)
    except ValueError as exc:
        name = entry.get(key)
        if isinstance(name, str) and name and name not in str(exc):
            raise ValueError(f"{kind} {name}: {exc}") from None
        raise


def _entries(table: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    entries = table.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{key} must be an array of tables ([[{key}]])")
    return entries


def load_file(path: str | Path) -> Tables:
    """The tables of a TOML access file (``PACS_ACCESS_FILE``).

    Raises
    ------
    ConfigError
        The file cannot be read or parsed.
    """
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"PACS_ACCESS_FILE {path}: {exc}") from None
    return parse(table, f"PACS_ACCESS_FILE {path}")


# -- the policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Who an HTTP request is, once authenticated: a user, ``loopback`` or
    ``anonymous`` (an open node), and the roles it has."""

    name: str
    roles: frozenset[str]
    authenticated: bool = False  # by credentials (a user), not by where it came from
    #: It came with credentials that were not checked (too many failed logins), and
    #: has what it has without them: a request that needs more is told to wait.
    locked_out: bool = False


@dataclass
class AccessPolicy:
    """The node's (or one customer's) access rules (module docstring).

    Parameters
    ----------
    aes, users :
        The known AEs and users.
    unknown_ae_rights :
        Rights of an AE not in ``aes``.
    loopback_roles :
        Roles of a request from this host without credentials.
    """

    aes: Mapping[str, KnownAE] = field(default_factory=dict)
    users: Mapping[str, User] = field(default_factory=dict)
    unknown_ae_rights: frozenset[str] = AE_RIGHTS
    loopback_roles: frozenset[str] = ROLES

    def __post_init__(self) -> None:
        self._tokens = {digest: user for user in self.users.values()
                        for digest in user.tokens}
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._cache_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}  # of users given a secret, hashed on first use
        self._hashing = threading.Lock()

    # -- DIMSE ------------------------------------------------------------------------

    def rights_of(self, calling_ae: str) -> frozenset[str]:
        """The rights of an AE calling with this title (the address was checked when it
        associated, :meth:`association_refusal`)."""
        known = self.aes.get(calling_ae.strip())
        return known.rights if known is not None else self.unknown_ae_rights

    def may(self, calling_ae: str, right: str) -> bool:
        """True when the AE ``calling_ae`` has ``right``."""
        return right in self.rights_of(calling_ae)

    def association_refusal(self, calling_ae: str, address: str, secure: bool = False,
                            certificate: str | None = None) -> str | None:
        """Why an association of ``calling_ae`` from ``address`` (over TLS:
        ``secure``, with a client certificate of SHA-256 fingerprint ``certificate``)
        is refused (``None``: admitted): no rights at all, a known AE calling from
        another address, one that must call over TLS calling without, or without one
        of its certificates."""
        title = calling_ae.strip()
        known = self.aes.get(title)
        if known is None:
            return None if self.unknown_ae_rights else f"calling AE {title!r} is not known"
        if not known.rights:
            return f"calling AE {title!r} has no rights"
        if known.over_tls and not secure:
            return f"calling AE {title!r} must associate over DICOM TLS"
        if known.certificates and certificate not in known.certificates:
            return f"calling AE {title!r} presented none of its client certificates"
        if known.host and not address_matches(known.host, address):
            return f"calling AE {title!r} calls from an address it is not known at"
        return None

    def destinations(self) -> dict[str, KnownAE]:
        """The known AEs a C-MOVE may send to (an address and a port)."""
        return {title: ae for title, ae in self.aes.items() if ae.destination}

    def reached_over_tls(self, title: str) -> bool:
        """True when the known AE ``title`` associates, and so is reached, over DICOM
        TLS only (:attr:`KnownAE.over_tls`), wherever its address is given."""
        known = self.aes.get(title.strip())
        return known is not None and known.over_tls

    @property
    def any_over_tls(self) -> bool:
        """True when some known AE is reached over DICOM TLS."""
        return any(known.over_tls for known in self.aes.values())

    # -- HTTP -------------------------------------------------------------------------

    @property
    def has_credentials(self) -> bool:
        """True when some user can authenticate (a password or a token)."""
        return bool(self.users)

    @property
    def has_passwords(self) -> bool:
        """True when some user has a password (HTTP Basic)."""
        return any(user.has_password for user in self.users.values())

    @property
    def has_tokens(self) -> bool:
        """True when some user has a token (Bearer)."""
        return bool(self._tokens)

    def by_password(self, name: str, password: str) -> User | None:
        """The user ``name`` when ``password`` is theirs."""
        user = self.users.get(name)
        if user is None or not user.has_password:
            # The same cost as a wrong password: no telling which names exist.
            verify_password(password, _dummy_hash())
            return None
        stored = self.password_hash(user)
        key = hmac.new(self._cache_key, f"{name}\0{password}".encode(), "sha256").digest()
        with self._lock:
            if self._verified.get(key) == stored:
                self._verified.move_to_end(key)
                return user
        if not verify_password(password, stored):
            return None
        with self._lock:
            self._verified[key] = stored
            while len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return user

    def password_hash(self, user: User) -> str:
        """The password hash of ``user``: its own, or that of its secret, made on the
        first call (one scrypt per process and user, under a lock so that threads
        asking at once make it once)."""
        if user.password or not user.secret:
            return user.password
        with self._hashing:
            stored = self._hashes.get(user.name)
            if stored is None:
                stored = self._hashes[user.name] = hash_password(user.secret)
            return stored

    def by_token(self, token: str) -> User | None:
        """The user whose token this is."""
        digest = hash_token(token)
        for known, user in self._tokens.items():
            if hmac.compare_digest(known, digest):
                return user
        return None


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against for a user who does not exist (made once, on first
    need: scrypt is not free at import)."""
    return hash_password("", salt=b"\0" * 16)


def names_this_machine(host: str) -> bool:
    """True when a host name or address can only mean this machine: ``localhost`` and
    ``*.localhost`` (RFC 6761 6.3) or a loopback address."""
    name = host.rstrip(".").lower()
    ip = ip_of(name)
    return (name == "localhost" or name.endswith(".localhost")
            or (ip is not None and ip.is_loopback))


def ip_of(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a peer's address text (a zone index dropped, an IPv4-mapped
    IPv6 address as the IPv4 address it maps), or ``None`` when it is none."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_network(host: str) -> bool:
    """True when ``host`` (a known AE's) names a network of several addresses
    (``10.1.2.0/24``), not one address or a host name."""
    if "/" not in host:
        return False
    try:
        return ipaddress.ip_network(host, strict=False).num_addresses > 1
    except ValueError:
        return False


def address_matches(host: str, address: str) -> bool:
    """True when ``address`` (a peer's IP) is ``host``: the same address, inside the
    network, or one of the addresses the name resolves to."""
    peer = ip_of(address)
    if peer is None:
        return False
    try:
        return peer in ipaddress.ip_network(host, strict=False)
    except ValueError:
        pass
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return any(ip_of(found) == peer for found in resolved)


#: The user name of ``PACS_WEB_TOKEN`` (the audit trail's name for a bearer token).
TOKEN_USER = "token"


def build(*, access_file: str = "", tables: Tables | None = None,
          unknown_ae_rights: frozenset[str] = AE_RIGHTS,
          loopback_roles: frozenset[str] = ROLES,
          allowed_calling_aets: Iterable[str] = (), web_user: str = "",
          web_password: str = "", web_token: str = "") -> AccessPolicy:
    """The policy of the settings (module docstring, "Sources").

    Parameters
    ----------
    access_file :
        ``PACS_ACCESS_FILE`` (read here) ...
    tables :
        ... or tables already read (one customer's).
    unknown_ae_rights, loopback_roles, allowed_calling_aets, web_user, web_password,
    web_token :
        The settings of the same names; a table's ``unknown_ae_rights`` and
        ``loopback_roles`` win.

    Raises
    ------
    ConfigError
        The access file cannot be read.
    """
    if tables is None:
        tables = load_file(access_file) if access_file else Tables()
    allowed = [title for title in allowed_calling_aets if title]
    aes = {title: KnownAE(title, AE_RIGHTS) for title in allowed}
    aes.update({ae.title: ae for ae in tables.aes})
    if allowed:
        unknown_ae_rights = frozenset()
    users: dict[str, User] = {}
    if web_user and web_password:
        users[web_user] = User(web_user, ROLES, secret=web_password)  # hashed when used
    if web_token:
        users[TOKEN_USER] = User(TOKEN_USER, ROLES, tokens=(hash_token(web_token),))
    users.update({user.name: user for user in tables.users})
    return AccessPolicy(
        aes, users,
        tables.unknown_ae_rights if tables.unknown_ae_rights is not None
        else unknown_ae_rights,
        tables.loopback_roles if tables.loopback_roles is not None else loopback_roles)

