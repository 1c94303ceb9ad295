"""Absolute URLs of DICOMweb resources, as clients must see them (RetrieveURL, PS3.18
10.6.3.3 and 10.5.3).

The service root is the request's own scheme, host and application root, as forwarded
by a proxy on this host (``Forwarded`` / ``X-Forwarded-*``, which falcon reads), plus
the prefix the route was mounted under (``""`` or ``"/dicom-web"``).  A viewer behind a
proxy then gets URLs it can reach, not ``localhost:5985``.

Forwarding headers are believed from loopback only, as gunicorn believes the scheme
(``pacs.node.webserver.TRUSTED_FORWARDERS``): any client may write them (RFC 7239
8.1), and the host goes into every URL of an answer, so 60 KB of it made a QIDO-RS
answer of 10,000 rows 600 MB.  A host that is not a host name, an address and a port
(at most 255 characters and 5 digits, RFC 1035 2.3.4) is not used either:
``localhost`` and the port the request reached stand in for it.  The application
root (``SCRIPT_NAME``, which gunicorn takes from a proxy's header) goes into every URL
too: one that is not a short path (at most 255 characters of RFC 3986 path
characters) is left out.
"""

from __future__ import annotations

import re

import falcon

from adapters.http.auth import is_loopback

#: A host and optional port as a URL may carry them: a DNS name or IPv4 address, or a
#: bracketed IPv6 address (RFC 3986 3.2.2).
_HOST = re.compile(r"(?:[A-Za-z0-9._-]{1,255}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
#: An application root: absolute path segments (RFC 3986 3.3 ``pchar``), 255 at most.
_ROOT_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)*")
_ROOT_PATH_CHARACTERS = 255


def service_root(req: falcon.Request, prefix: str) -> str:
    """``scheme://host[:port][/app]`` + ``prefix``, without a trailing slash.

    A proxy's ``Forwarded`` / ``X-Forwarded-Host`` wins, from loopback.  Otherwise the
    Host header gives the host, and the port the request actually reached when Host
    names none: dicomweb-client sends ``Host`` without the port (``web.py`` sets it to
    the bare host name), and falcon's ``forwarded_host`` drops the port too, which would
    turn ``http://localhost:5985`` into ``http://localhost`` in every URL we hand out.
    A proxy on a default port must therefore say where it is (``X-Forwarded-Host``).
    """
    proxied = is_loopback(req.remote_addr)
    forwarded = proxied and (req.get_header("X-Forwarded-Host") or any(
        element.host for element in (req.forwarded or ())))
    scheme = req.forwarded_scheme if proxied else req.scheme
    if scheme not in ("http", "https"):
        scheme = req.scheme
    port = str(req.env.get("SERVER_PORT", ""))
    if forwarded:
        host = req.forwarded_host
    else:
        host = req.netloc
        default = "443" if req.scheme == "https" else "80"
        if ":" not in host.rsplit("]", 1)[-1] and port and port != default:
            host = f"{host}:{port}"
    if not _HOST.fullmatch(host):
        # The server's own name comes from the Host header too (gunicorn): none is
        # known that the client did not write.
        host = f"localhost:{port}" if port.isdigit() and len(port) <= 5 else "localhost"
    root = req.root_path.rstrip("/")
    if len(root) > _ROOT_PATH_CHARACTERS or not _ROOT_PATH.fullmatch(root):
        root = ""
    return f"{scheme}://{host}{root}{prefix}"


def study_url(root: str, study: str) -> str:
    """The Study resource (PS3.18 10.4.1.1.1)."""
    return f"{root}/studies/{study}"


def series_url(root: str, study: str, series: str) -> str:
    """The Series resource."""
    return f"{study_url(root, study)}/series/{series}"


def instance_url(root: str, study: str, series: str, instance: str) -> str:
    """The Instance resource."""
    return f"{series_url(root, study, series)}/instances/{instance}"
