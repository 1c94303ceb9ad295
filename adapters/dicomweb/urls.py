"""Absolute URLs of DICOMweb resources, as clients must see them (RetrieveURL, PS3.18
10.6.3.3 and 10.5.3).

The service root is the request's own scheme, host and application root, as forwarded
by a proxy (``Forwarded`` / ``X-Forwarded-*``, which falcon reads), plus the prefix the
route was mounted under (``""`` or ``"/dicom-web"``).  A viewer behind a proxy then
gets URLs it can reach, not ``localhost:5985``.
"""

from __future__ import annotations

import falcon


def service_root(req: falcon.Request, prefix: str) -> str:
    """``scheme://host[:port][/app]`` + ``prefix``, without a trailing slash.

    A proxy's ``Forwarded`` / ``X-Forwarded-Host`` wins.  Otherwise the Host header
    gives the host, and the port the request actually reached when Host names none:
    dicomweb-client sends ``Host`` without the port (``web.py`` sets it to the bare
    host name), and falcon's ``forwarded_host`` drops the port too, which would turn
    ``http://localhost:5985`` into ``http://localhost`` in every URL we hand out.  A
    proxy on a default port must therefore say where it is (``X-Forwarded-Host``).
    """
    forwarded = req.get_header("X-Forwarded-Host") or any(
        element.host for element in (req.forwarded or ()))
    scheme = req.forwarded_scheme
    if forwarded:
        host = req.forwarded_host
    else:
        host = req.netloc
        port = str(req.env.get("SERVER_PORT", ""))
        default = "443" if req.scheme == "https" else "80"
        if ":" not in host.rsplit("]", 1)[-1] and port and port != default:
            host = f"{host}:{port}"
    return f"{scheme}://{host}{req.root_path.rstrip('/')}{prefix}"


def study_url(root: str, study: str) -> str:
    """The Study resource (PS3.18 10.4.1.1.1)."""
    return f"{root}/studies/{study}"


def series_url(root: str, study: str, series: str) -> str:
    """The Series resource."""
    return f"{study_url(root, study)}/series/{series}"


def instance_url(root: str, study: str, series: str, instance: str) -> str:
    """The Instance resource."""
    return f"{series_url(root, study, series)}/instances/{instance}"
