"""Forwarding rules: which newly stored instances go where (``PACS_ROUTES``,
``PACS_ROUTES_FILE``).

A route has a name, conditions and one destination.  Conditions match the instance's
calling AE title (who sent it: the C-STORE's calling AE, empty for STOW-RS and
imports), its series' Modality and its SOP Class UID; each lists the values it accepts,
and a route without a condition matches every instance.  The destination is an AE
title of ``PACS_MODALITIES`` or of the access file with an address (C-STORE), or a
DICOMweb base URL (STOW-RS to
``<url>/studies``).  An instance that matches several routes to the same destination
is sent there once.

Inline, routes are separated by ``;`` or new lines::

    ct: calling_ae=CT1|CT2, modality=CT -> ARCHIVE; ai: modality=MR -> https://ai/dicom-web

The file is TOML, one ``[[route]]`` table per route::

    [[route]]
    name = "ct"
    calling_ae = ["CT1", "CT2"]   # a string or a list
    modality = "CT"
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    to = "ARCHIVE"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pacs.core.errors import ConfigError

#: The conditions a route may set, as written, to the :class:`Route` field.
CONDITIONS = {"calling_ae": "calling_ae", "modality": "modality", "sop_class": "sop_class"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Route:
    """One rule: instances matching every condition go to ``destination``."""

    name: str
    destination: str
    calling_ae: frozenset[str] = frozenset()
    modality: frozenset[str] = frozenset()
    sop_class: frozenset[str] = frozenset()

    @property
    def web(self) -> bool:
        """True when the destination is a DICOMweb URL (STOW-RS), else an AE title."""
        return is_url(self.destination)

    @property
    def target(self) -> str:
        """The destination as forwarding's outbox names it (:func:`shown`: a URL
        without its credentials), so that a password changed in the settings finds
        the instances queued under the old one, and none is written to the index."""
        return shown(self.destination)

    def matches(self, calling_ae: str, modality: str, sop_class: str) -> bool:
        """True when the instance meets every condition the route sets."""
        return all(not accepted or value.strip() in accepted for accepted, value in (
            (self.calling_ae, calling_ae), (self.modality, modality.upper()),
            (self.sop_class, sop_class)))


def is_url(destination: str) -> bool:
    """True for an http(s) URL."""
    return destination.lower().startswith(("http://", "https://"))


def check_url(url: str) -> None:
    """Refuse a DICOMweb URL that cannot be read as it was meant.

    Raises
    ------
    ConfigError
        No host; a port that is no number; an ``@`` after the host: a user name or
        password holding ``/``, ``?`` or ``#`` that is not percent-encoded (RFC 3986
        3.2.1), which would make the rest of it the host the data goes to.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed '[' of an IPv6 address
        raise ConfigError("a DICOMweb URL cannot be read (an IPv6 address without its "
                          "']'? a password holding '['? percent-encode it)") from None
    try:
        parts.port  # noqa: B018 - read for its ValueError
    except ValueError:
        raise ConfigError("a DICOMweb URL has a port that is not a number (a password "
                          "holding ':' or '#'? percent-encode it)") from None
    if "@" in parts.path + parts.query + parts.fragment:
        raise ConfigError("a DICOMweb URL has '@' after its host: percent-encode '/', "
                          "'?', '#' and '@' in a user name or password (RFC 3986 3.2.1)")
    if not parts.hostname:
        raise ConfigError("a DICOMweb URL has no host")


def shown(destination: str) -> str:
    """A destination as logs and ``pacs status`` show it: a URL without credentials."""
    if not is_url(destination):
        return destination
    parts = urlsplit(destination)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _route(name: str, destination: str, conditions: Mapping[str, Any], where: str) -> Route:
    if not _NAME.match(name):
        raise ConfigError(f"{where}: route name {name!r}: use 1-64 letters, digits, "
                          "'-', '_' or '.'")
    destination = destination.strip()
    if not destination:
        raise ConfigError(f"{where}: route {name!r} has no destination")
    values: dict[str, frozenset[str]] = {}
    for key, value in conditions.items():
        if key not in CONDITIONS:
            raise ConfigError(f"{where}: route {name!r}: unknown condition {key!r} "
                              f"(expected {', '.join(CONDITIONS)})")
        items = value if isinstance(value, list) else str(value).split("|")
        accepted = frozenset(str(item).strip() for item in items if str(item).strip())
        if key == "modality":
            accepted = frozenset(item.upper() for item in accepted)
        values[CONDITIONS[key]] = accepted
    return Route(name, destination, **values)


def parse_inline(text: str) -> tuple[Route, ...]:
    """Routes from ``PACS_ROUTES``.

    Raises
    ------
    ConfigError
        A route that cannot be read.
    """
    routes = []
    items = filter(None, (part.strip() for part in re.split(r"[;\n]", text)))
    for number, item in enumerate(items, start=1):
        name, colon, rule = item.partition(":")
        condition_text, arrow, destination = rule.rpartition("->")
        if not colon or not arrow:
            # Its text is not shown: it may be the rest of a URL's password that held
            # a ';' (which splits routes) not percent-encoded.
            raise ConfigError(f"PACS_ROUTES: route {number} cannot be read; expected "
                              "'name: key=value|value, ... -> AET or URL' (percent-encode "
                              "a ';' in a URL's password: %3B)")
        conditions: dict[str, str] = {}
        for condition in filter(None, (c.strip() for c in condition_text.split(","))):
            key, equals, value = condition.partition("=")
            if not equals or key.strip() in conditions:
                raise ConfigError(f"PACS_ROUTES: route {name.strip()!r}: cannot read "
                                  f"{condition!r}; expected key=value once per key")
            conditions[key.strip()] = value
        routes.append(_route(name.strip(), destination, conditions, "PACS_ROUTES"))
    return tuple(routes)


def parse_file(path: Path) -> tuple[Route, ...]:
    """Routes from a TOML file (``PACS_ROUTES_FILE``).

    Raises
    ------
    ConfigError
        A file that cannot be read, or a route that cannot.
    """
    where = f"PACS_ROUTES_FILE {path}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    tables = document.get("route", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: expected [[route]] tables")
    routes = []
    for table in tables:
        rest = dict(table)
        name, destination = str(rest.pop("name", "")), str(rest.pop("to", ""))
        routes.append(_route(name, destination, rest, where))
    return tuple(routes)


def load_routes(inline: str, file: str) -> tuple[Route, ...]:
    """Every route of the settings (the inline ones first).  That an AE title names a
    known destination is checked where the access policy is known
    (:func:`pacs.node.forwarder.check_destinations`, when ``pacs serve`` starts).

    Raises
    ------
    ConfigError
        A route that cannot be read, a name used twice, or a URL :func:`check_url`
        refuses.
    """
    routes = parse_inline(inline) + (parse_file(Path(file)) if file.strip() else ())
    names = [route.name for route in routes]
    given: dict[str, Route] = {}
    for route in routes:
        if names.count(route.name) > 1:
            raise ConfigError(f"routes: the name {route.name!r} is used twice")
        if route.web:
            try:
                check_url(route.destination)
            except ConfigError as exc:
                raise ConfigError(f"routes: route {route.name!r}: {exc}") from None
        first = given.setdefault(route.target, route)
        if first.destination != route.destination:
            # The outbox knows one destination by that name, and one sender for it.
            raise ConfigError(f"routes: routes {first.name!r} and {route.name!r} go to "
                              f"{route.target} with other credentials or another query: "
                              "one destination, one URL")
    return routes
