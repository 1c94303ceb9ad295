"""``python -m pacs.node.healthcheck``: exit 0 when this host's node answers ``GET /health``.

The container's HEALTHCHECK (Dockerfile, compose.yml).  It asks the running node over
HTTP rather than opening the index itself, so "healthy" means the DICOMweb server is up
*and* its store and index are sound.  The request comes from loopback inside the
container, which the access rule lets through without credentials when
``PACS_LOOPBACK_ROLES`` holds ``read`` (compose.yml keeps that role alone).  With
``PACS_TLS_CERT`` the port speaks HTTPS only: the check does too, without verifying the
certificate (it names the node's public host, not 127.0.0.1, and nothing secret is sent
or read).
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request

#: Seconds to wait for the answer (Docker's own timeout is 10 s).
TIMEOUT = 8.0


def main() -> int:
    """Print the health answer's status (each customer's, with several); 0 healthy, 1
    anything else."""
    from pacs.core import config
    from pacs.core.customers import customers
    from pacs.core.errors import ConfigError

    try:
        settings = config.load()
        served = customers(settings)
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    context = None
    if settings.tls_cert:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    scheme = "https" if context else "http"
    base = f"{scheme}://127.0.0.1:{settings.web_port}"
    # Without a customers file /health is the one customer's; with one, each
    # customer's answers under its prefix (adapters/http/customers.py).
    paths = (["/health"] if not settings.customers_file else
             [f"/customers/{customer.name}/health" for customer in served])
    healthy = True
    for path in paths:
        status = _status(base + path, context)
        print(status if len(paths) == 1 else f"{path}: {status}")
        healthy = healthy and status == "ok"
    return 0 if healthy else 1


def _status(url: str, context: ssl.SSLContext | None) -> str:
    """The ``status`` of one health answer, or why there is none."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return f"unhealthy: HTTP {exc.code} {exc.read()[:500]!r}"
    except (OSError, ValueError) as exc:
        return f"unhealthy: {url}: {exc}"
    return str(body.get("status", "unknown"))


if __name__ == "__main__":
    sys.exit(main())
