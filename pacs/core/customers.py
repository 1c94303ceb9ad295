"""The customers one node serves: the customers file (``PACS_CUSTOMERS_FILE``).

A customer is a name (its data folder, index and key prefix, docs/architecture.md "Data
layout"), the called AE titles that reach it over DIMSE, the host names that reach it
over HTTP, and its own settings: the node's, with the values a customer may have of
its own (:data:`PER_CUSTOMER`: store, move destinations, upload folder, retention,
forwarding routes, access rules...).
Without a customers file the node serves one customer, ``CUSTOMER``, called by
``PACS_AE_TITLE``: the same :class:`Customer`, built from the settings alone.

The file, TOML::

    [[customer]]
    name = "north"
    ae_titles = ["NORTH"]
    hosts = ["north.pacs.example"]
    modalities = "NORTHWS=10.0.0.5:104"
    [customer.settings]
    PACS_STORAGE = "s3"
    PACS_S3_BUCKET = "north-images"
    [customer.access]                 # its known AEs and users (PACS_ACCESS_FILE's form)
    unknown_ae_rights = "none"
    [[customer.access.ae]]
    title = "NORTHCT"
    rights = "echo,store"

Each process reads it once when it starts (``pacs serve``, and each worker and
companion it starts), as it reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs.core import access, audit, config
from pacs.core.access import Tables
from pacs.core.config import Settings, check_folders, derive, validate_customer
from pacs.core.errors import ConfigError

#: The settings a customer may set for itself in the file (``[customer.settings]``);
#: the others (ports, workers, limits, TLS) are the node's.
PER_CUSTOMER = frozenset({
    "PACS_DATA_DIR", "PACS_UPLOADS_DIR", "PACS_STORAGE", "PACS_S3_ENDPOINT",
    "PACS_S3_ACCESS_KEY", "PACS_S3_SECRET_KEY", "PACS_S3_BUCKET", "PACS_S3_SECURE",
    "PACS_S3_REGION", "PACS_S3_SETTLE", "PACS_MODALITIES",
    "PACS_DUPLICATE_POLICY", "PACS_RETENTION_DAYS", "PACS_WEB_DELETE", "PACS_AUDIT_LOG",
    "PACS_ACCESS_FILE", "PACS_UNKNOWN_AE_RIGHTS", "PACS_LOOPBACK_ROLES",
    "PACS_ALLOWED_CALLING_AETS", "PACS_WEB_USER", "PACS_WEB_PASSWORD", "PACS_WEB_TOKEN",
    "PACS_ROUTES", "PACS_ROUTES_FILE",
})

#: The settings that say where a customer's data goes (C-MOVE destinations,
#: forwarding).  Set for the node beside a customers file, every customer would
#: inherit them (north's studies moved or forwarded to south's workstation), so they
#: are refused there.  (The node's access rules are every customer's on purpose,
#: README "Several customers".)
DESTINATIONS = ("PACS_MODALITIES", "PACS_ROUTES", "PACS_ROUTES_FILE")

#: The keys of a customer's table.
KEYS = frozenset({"name", "ae_titles", "hosts", "modalities", "settings", "access"})

#: Characters an AE title may not hold (PS3.5 6.2, VR AE: no backslash, no controls).
_AE_FORBIDDEN = frozenset("\\") | frozenset(map(chr, range(32)))


@dataclass(frozen=True)
class Customer:
    """One customer of the node.

    Attributes
    ----------
    name : str
        The customer name (``CUSTOMER``): its data folder, index and key prefix.
    settings : Settings
        The node's settings with this customer's own values: what its
        :class:`~pacs.core.services.Services` are built from.
    ae_titles : tuple of str
        The called AE titles that reach this customer over DIMSE; the first is the
        one it calls others with (storage commitment reports).
    hosts : tuple of str
        Host names (lower case) whose HTTP requests are this customer's.
    """

    name: str
    settings: Settings
    ae_titles: tuple[str, ...]
    hosts: tuple[str, ...] = ()


def customers(settings: Settings) -> tuple[Customer, ...]:
    """Every customer the node serves: those of ``PACS_CUSTOMERS_FILE``, else one.

    Raises
    ------
    ConfigError
        The file cannot be read or holds a mistake.
    """
    if not settings.customers_file:
        return (single(settings),)
    return read(Path(settings.customers_file), settings)


def single(settings: Settings) -> Customer:
    """The one customer of a node without a customers file."""
    return Customer(settings.customer, settings, (settings.ae_title.strip(),))


def chosen(settings: Settings, name: str | None = None) -> Customer:
    """The customer ``name`` (else ``CUSTOMER``): the one a command or a companion
    process acts on.

    Raises
    ------
    ConfigError
        No customer of that name.
    """
    wanted = name or settings.customer
    for customer in customers(settings):
        if customer.name == wanted:
            return customer
    raise ConfigError(f"no customer {wanted!r} in {settings.customers_file}")


def read(path: Path, node: Settings) -> tuple[Customer, ...]:
    """The customers of the file at ``path``.

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or holds a mistake (:func:`parse`).
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"PACS_CUSTOMERS_FILE {path}: {exc}") from None
    return parse(document, node, f"PACS_CUSTOMERS_FILE {path}")


def parse(document: Mapping[str, Any], node: Settings, where: str = "customers"
          ) -> tuple[Customer, ...]:
    """The customers of a parsed customers file (its ``[[customer]]`` tables).

    Parameters
    ----------
    document : mapping
        The file's content.
    node : Settings
        The node's settings: each customer's start from them, and its data folder
        defaults to ``<PACS_DATA_DIR>/<name>``; forwarding routes are refused there.
    where : str
        The source, for error messages.

    Raises
    ------
    ConfigError
        No customer; a name, AE title or host name given twice; an unknown key; a
        setting a customer may not have of its own; a value that cannot be parsed;
        routes set for the node.
    """
    entries = document.get("customer")
    if not isinstance(entries, list) or not entries or set(document) - {"customer"}:
        raise ConfigError(f"{where}: expected one [[customer]] table per customer, "
                          "and nothing else")
    inherited = [env for env in DESTINATIONS if config.is_set(node, env)]
    if inherited:
        raise ConfigError(f"{where}: {', '.join(inherited)} say where a customer's data "
                          "goes: set them in the [customer.settings] (or modalities) of "
                          "each customer whose data they send, not for the node")
    found = tuple(_customer(entry, node, f"{where}, customer {n + 1}")
                  for n, entry in enumerate(entries))
    # Names and AE titles apart whatever their case: a modality that upper-cases the
    # title it calls would reach another customer, and names are folders, one on a
    # file system that ignores case.
    _unique(where, "name", [c.name for c in found])
    _unique(where, "AE title", [t for c in found for t in c.ae_titles])
    _unique(where, "host", [h for c in found for h in c.hosts])
    _apart(where, found)
    return found


def _apart(where: str, found: tuple[Customer, ...]) -> None:
    """Refuse two customers whose data or upload folders are one, or one inside the
    other, however written (``..``, a link): each reads what it finds there, so the
    one would index, serve or store the other's patients' data.  A customer's audit
    trail is not in another's folders either (its events name patients; in an upload
    folder it would be taken as an upload); customers may share one trail."""
    folders = [(customer.name, what, Path(os.path.realpath(folder)))
               for customer in found
               for what, folder in (("data folder", customer.settings.data_dir),
                                    ("upload folder", customer.settings.uploads_dir))]
    for number, (name, what, folder) in enumerate(folders):
        for other_name, other_what, other in folders[number + 1:]:
            if other_name != name and (folder.is_relative_to(other)
                                       or other.is_relative_to(folder)):
                raise ConfigError(
                    f"{where}: the {what} of customer {name!r} ({folder}) and the "
                    f"{other_what} of customer {other_name!r} ({other}) overlap: two "
                    "customers never share a folder")
    for customer in found:
        trail = audit.audit_path(customer.settings.audit_log, customer.settings.data_dir)
        if trail is None:
            continue
        trail = Path(os.path.realpath(trail))
        for other_name, other_what, other in folders:
            if other_name != customer.name and trail.is_relative_to(other):
                raise ConfigError(
                    f"{where}: the audit trail of customer {customer.name!r} ({trail}) "
                    f"is in the {other_what} of customer {other_name!r} ({other})")


def _unique(where: str, what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value.casefold() in seen:
            raise ConfigError(f"{where}: {what} {value!r} belongs to two customers "
                              "(compared without case)")
        seen.add(value.casefold())


def _customer(entry: Any, node: Settings, where: str) -> Customer:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: not a table")
    unknown = set(entry) - KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(KEYS))})")
    name = validate_customer(str(entry.get("name", "")))
    where = f"{where} ({name})"
    titles = _strings(entry.get("ae_titles", []), where, "ae_titles")
    if not titles:
        raise ConfigError(f"{where}: ae_titles: at least one called AE title")
    for title in titles:
        if not 0 < len(title) <= 16 or set(title) & _AE_FORBIDDEN:
            raise ConfigError(f"{where}: {title!r} is not an AE title (1-16 characters, "
                              "no backslash or control characters, PS3.5 6.2)")
    # As a Host header's name is read (adapters.http.auth.host_name): lower case,
    # without a fully qualified name's root dot.
    hosts = tuple(h.lower().rstrip(".")
                  for h in _strings(entry.get("hosts", []), where, "hosts"))
    own = entry.get("settings", {})
    if not isinstance(own, Mapping):
        raise ConfigError(f"{where}: settings: expected a table")
    refused = set(own) - PER_CUSTOMER
    if refused:
        raise ConfigError(f"{where}: settings {', '.join(sorted(refused))} are the node's, "
                          f"not a customer's (a customer's own: "
                          f"{', '.join(sorted(PER_CUSTOMER))})")
    overrides = {env: _text(value) for env, value in own.items()}
    if "modalities" in entry:
        overrides["PACS_MODALITIES"] = _text(entry["modalities"])
    overrides.setdefault("PACS_DATA_DIR", str(node.data_dir / name))
    if node.uploads_path:  # never one upload folder for two customers
        overrides.setdefault("PACS_UPLOADS_DIR", str(Path(node.uploads_path) / name))
    overrides.update({
        "CUSTOMER": name, "PACS_AE_TITLE": titles[0], "PACS_CUSTOMERS_FILE": ""})
    # Its host names choose the customer, and grant nothing: for the loopback rule
    # (adapters/http/auth.py) a name is this node's only when PACS_WEB_HOSTS lists it.
    # A reverse proxy on this host forwards every client from loopback with the
    # customer's host name; those clients must still show credentials.
    try:
        settings = derive(node, overrides)
        check_folders(settings)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if "access" in entry:
        settings = dataclasses.replace(settings, access_tables=_access(entry, own, where))
    return Customer(name, settings, titles, hosts)


def _access(entry: Mapping[str, Any], own: Mapping[str, Any], where: str) -> Tables:
    """The customer's ``[customer.access]`` table: its known AEs and users
    (:func:`pacs.core.access.parse`, the form of ``PACS_ACCESS_FILE``)."""
    if "PACS_ACCESS_FILE" in own:
        raise ConfigError(f"{where}: an access table or PACS_ACCESS_FILE, not both")
    table = entry["access"]
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: access: expected a table")
    return access.parse(table, f"{where}, access")


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    """A string or a list of strings, each stripped."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: {key}: expected a string or a list of strings")
    return tuple(i.strip() for i in items if i.strip())


def _text(value: Any) -> str:
    """A TOML value as the environment would give it (``true``, ``3650``, a list as a
    comma list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    return str(value)
