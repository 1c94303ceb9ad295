"""``GET /health``: the node's quick health check over HTTP (see :mod:`pacs.core.health`).

``200`` with ``{"status": "ok", ...}`` when the store answers and the index is sound,
``503`` with ``{"status": "unhealthy", ...}`` otherwise, so that Docker's HEALTHCHECK
(and any load balancer) can read the status code alone.  The body carries counts and
sizes, never patient data.  Like every route it is behind the access rule: loopback
(the container's own HEALTHCHECK) needs no credentials.
"""

from __future__ import annotations

import json

import falcon

from pacs.core import health
from pacs.core.services import Services

#: Where the check is mounted (once, at the root: it is not a DICOMweb resource).
ROUTE = "/health"


class Health:
    """The health resource over one worker's services."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Run the quick check and answer 200 or 503."""
        found = health.check(self.services, thorough=False)
        resp.status = falcon.HTTP_200 if found.ok else falcon.HTTP_503
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-store"]
        resp.data = json.dumps(found.as_json()).encode()

    def on_head(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The status code alone (falcon sends no body for HEAD)."""
        self.on_get(req, resp)


def add_route(app: falcon.App[falcon.Request, falcon.Response], services: Services) -> None:
    """Register ``/health`` on ``app``."""
    app.add_route(ROUTE, Health(services))
