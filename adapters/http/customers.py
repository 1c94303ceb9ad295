"""The customer of an HTTP request: by path prefix or by host name.

One HTTP port serves every customer of the node (:mod:`pacs.core.customers`), each
through its own application over its own services.  A request is a customer's when

* its path starts with ``/customers/<name>/`` (the rest of the path is what the
  customer's application sees, the prefix moves to ``SCRIPT_NAME``, so URLs the
  application hands out keep it), or
* its ``Host`` names one of the customer's host names (the whole port is then that
  customer's, ``/`` included: how each customer gets its own viewer), or
* neither, and the node has a default customer: the one named ``CUSTOMER`` when it is
  in the customers file, or the only one of a node without a customers file.

A path naming one customer under a host name of another, an unknown name, an
application root (``SCRIPT_NAME``, a proxy's header) that names a customer, or a
request at the root without a default get 404 from here, whatever names exist; a known
customer's application then answers by its own access rules (401, 403, 421).  A host
name is read as the access rules read it (:func:`adapters.http.auth.host_name`: lower
case, no port, no root dot), so that no spelling of one customer's host reaches
another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
from typing import Any

from adapters.http.auth import host_name

#: The path prefix that names a customer: ``/customers/<name>/...``.
PREFIX = "/customers/"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_NOT_FOUND = b'{"error": "not found: name a customer (/customers/<name>/) or its host"}'


class CustomerRouter:
    """A WSGI application that hands each request to its customer's application.

    Parameters
    ----------
    apps : mapping
        Each customer's application by customer name.
    hosts : mapping
        Customer names by host name (lower case, without port).
    default : str or None
        The customer of requests that name none.
    """

    def __init__(self, apps: Mapping[str, WSGIApp], hosts: Mapping[str, str],
                 default: str | None) -> None:
        self.apps = dict(apps)
        self.hosts = dict(hosts)
        self.default = default

    def choose(self, environ: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The customer of a request and the environment its application gets
        (``None``: no customer)."""
        if self._names_a_customer(str(environ.get("SCRIPT_NAME") or "")):
            # An application root (a proxy's SCRIPT_NAME header, which gunicorn cuts off
            # the path) that names a customer: the path left would be routed as if it
            # named none, and the URLs handed out would name that customer.
            return None, environ
        by_host = self.hosts.get(host_name(str(environ.get("HTTP_HOST") or "")))
        path = str(environ.get("PATH_INFO") or "")
        if not path.startswith(PREFIX):
            return by_host or self.default, environ
        name, slash, rest = path[len(PREFIX):].partition("/")
        if name not in self.apps or (by_host is not None and by_host != name):
            return None, environ
        inner = dict(environ)
        inner["SCRIPT_NAME"] = f"{environ.get('SCRIPT_NAME', '')}{PREFIX}{name}"
        inner["PATH_INFO"] = slash + rest or "/"
        return name, inner

    def _names_a_customer(self, root: str) -> bool:
        """True when the application root ``root`` holds ``customers/<a customer>``."""
        segments = root.split("/")
        name = PREFIX.strip("/")
        return any(segment == name and following in self.apps
                   for segment, following in pairwise(segments))

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        name, inner = self.choose(environ)
        if name is None:
            start_response("404 Not Found", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(_NOT_FOUND))),
                                             ("X-Content-Type-Options", "nosniff")])
            return [_NOT_FOUND]
        return self.apps[name](inner, start_response)
