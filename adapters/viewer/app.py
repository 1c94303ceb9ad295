"""The viewer's files: OHIF's static files behind the DICOMweb access rule.

The viewer port answers with these files at ``/`` and with the DICOMweb application at
``/dicom-web`` (composed by :func:`pacs.node.apps.viewer_port`): one origin for both, so
the browser makes plain same-origin requests (no CORS, no preflights).  The files are
behind the same access rule as DICOMweb, so a browser on another host is asked for the
credentials once, on the page itself, and then sends them with every DICOMweb request
of the page.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import falcon

from adapters.http.auth import Access, AccessMiddleware
from adapters.http.transport import mark_secure
from adapters.viewer.static import OhifFiles
from pacs.core.services import Services

log = logging.getLogger(__name__)

#: The line of ``app-config.js`` that offers OHIF's delete (reject) action.
REJECT_OFF = b"supportsReject: false,"


def app_config(reject: bool = False) -> bytes:
    """Our OHIF configuration (package data beside this module); with ``reject``
    (``PACS_WEB_DELETE``), OHIF offers to reject a series, which it does through
    dcm4chee-arc's route (:mod:`adapters.dicomweb.removal`)."""
    config = resources.files("adapters.viewer").joinpath("app-config.js").read_bytes()
    return config.replace(REJECT_OFF, b"supportsReject: true,") if reject else config


class ViewerHeaders:
    """``nosniff`` and the viewer's Content-Security-Policy on every answer of the
    files part, errors (401, 404) included: the page's policy unless the answer has
    its own (script files, see :data:`adapters.viewer.static.WORKER_SCRIPTS`); HSTS
    over HTTPS (:mod:`adapters.http.transport`)."""

    def __init__(self, policy: str) -> None:
        self.policy = policy

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        if resp.get_header("Content-Security-Policy") is None:
            resp.set_header("Content-Security-Policy", self.policy)
        mark_secure(req, resp)


def files_app(services: Services, dist: Path) -> falcon.App[falcon.Request, falcon.Response]:
    """OHIF's files behind the DICOMweb access rule."""
    files = OhifFiles(dist, app_config(services.settings.web_delete))
    app = falcon.App(middleware=(ViewerHeaders(files.policy),
                                 AccessMiddleware(Access.of(services))))
    app.add_error_handler(Exception, _unexpected)
    app.add_sink(files, prefix="/")
    return app


def _unexpected(req: falcon.Request, resp: falcon.Response, exc: BaseException,
                params: object) -> None:
    """A failure of ours: 500, one log line naming the exception's type (the path a
    client wrote stays out of the log; the traceback is at DEBUG).  Falcon's own
    errors (404, 405, 401) keep their more specific handler."""
    log.error("viewer: %s failed unexpectedly (%s)", req.method, type(exc).__name__)
    log.debug("viewer: %s %r", req.method, req.path[:256], exc_info=exc)
    raise falcon.HTTPInternalServerError()
