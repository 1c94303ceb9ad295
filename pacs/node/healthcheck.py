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
    """Print the health answer's status; 0 healthy, 1 anything else."""
    from pacs.core import config
    from pacs.core.errors import ConfigError

    try:
        settings = config.load()
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    context = None
    if settings.tls_cert:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    scheme = "https" if context else "http"
    url = f"{scheme}://127.0.0.1:{settings.web_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: HTTP {exc.code} {exc.read()[:500]!r}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(body.get("status", "unknown"))
    return 0 if body.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
