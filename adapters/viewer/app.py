"""The viewer port's WSGI application: OHIF at ``/``, DICOMweb at ``/dicom-web``.

One origin for both, so the browser makes plain same-origin requests (no CORS, no
preflights).  The DICOMweb part is the DICOMweb application itself
(:func:`adapters.dicomweb.app.create_app`), called in this worker, not proxied: the
same routes, answers and access rule as on ``PACS_WEB_PORT``, and the peer address the
access rule sees is the browser's.  The static part is behind the same access rule, so
a browser on another host is asked for the credentials once, on the page itself, and
then sends them with every DICOMweb request of the page.

``get_app()`` is gunicorn's entry point (``adapters.viewer.app:get_app()``); like the
DICOMweb one it builds settings and services inside each worker, after the fork.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import falcon

from adapters.dicomweb import app as dicomweb
from adapters.dicomweb.auth import Access, AccessMiddleware
from adapters.dicomweb.health import ROUTE as HEALTH_ROUTE
from adapters.viewer.static import OhifFiles
from pacs.services import Services

log = logging.getLogger(__name__)

#: Paths answered by the DICOMweb application rather than by OHIF's files.
DICOMWEB_PREFIX = "/dicom-web"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def app_config() -> bytes:
    """Our OHIF configuration (package data beside this module)."""
    return resources.files("adapters.viewer").joinpath("app-config.js").read_bytes()


class ViewerHeaders:
    """``nosniff`` and the viewer's Content-Security-Policy on every answer of the
    files part, errors (401, 404) included: the page's policy unless the answer has
    its own (script files, see :data:`adapters.viewer.static.WORKER_SCRIPTS`)."""

    def __init__(self, policy: str) -> None:
        self.policy = policy

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        if resp.get_header("Content-Security-Policy") is None:
            resp.set_header("Content-Security-Policy", self.policy)


def files_app(services: Services, dist: Path) -> falcon.App:
    """OHIF's files behind the DICOMweb access rule."""
    files = OhifFiles(dist, app_config())
    app = falcon.App(middleware=[ViewerHeaders(files.policy),
                                 AccessMiddleware(Access(services.settings))])
    app.add_sink(files, prefix="/")
    return app


def create_app(services: Services, dist: Path) -> WSGIApp:
    """The viewer port's application.

    Parameters
    ----------
    services : Services
        The core, shared by both parts.
    dist : Path
        The OHIF dist folder.
    """
    api = dicomweb.create_app(services)
    files = files_app(services, dist)

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if (path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")
                or path == HEALTH_ROUTE):
            return api(environ, start_response)
        return files(environ, start_response)

    return route


def get_app() -> WSGIApp:
    """gunicorn's entry point: settings, services and the dist read in this worker.

    Raises
    ------
    pacs.errors.ConfigError
        Invalid settings, an unreachable store, or no OHIF files where
        ``PACS_VIEWER_DIST`` says (``pacs serve`` checks before starting us).
    """
    from pacs import config, logs
    from pacs.cli import LOG_FORMAT
    from pacs.errors import ConfigError
    from pacs.services import build
    from pacs.viewer import find_dist, missing_message

    settings = config.load()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                            format=LOG_FORMAT)
    logs.install(settings.log_level)  # no data-set values at INFO and above
    dist = find_dist(settings)
    if dist is None:
        raise ConfigError(missing_message(settings))
    services = build(settings, check_store=False)  # pacs serve checked it
    atexit.register(services.close)
    return create_app(services, dist)
