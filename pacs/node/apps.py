"""The HTTP applications gunicorn runs: composed here, from the edges and the core.

:func:`dicomweb_app` (``PACS_WEB_PORT``) and :func:`viewer_app` (``PACS_VIEWER_PORT``)
are gunicorn's entry points (``pacs.node.apps:dicomweb_app()``).  Each reads the
settings and builds the services inside its worker process, after the fork, so no
SQLite connection or S3 client ever crosses ``fork()``; the edges only compose
resources around services they are given (``create_app(services)``).

The viewer port is OHIF's files at ``/`` and the DICOMweb application itself at
``/dicom-web`` and ``/health`` (:func:`viewer_port`), called in the same worker, not
proxied: the same routes, answers and access rule as on the DICOMweb port, and the
peer address the access rule sees is the browser's.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import falcon
import falcon.testing

from adapters.dicomweb import app as dicomweb
from adapters.dicomweb.health import ROUTE as HEALTH_ROUTE
from adapters.http.customers import CustomerRouter
from adapters.viewer.app import files_app
from pacs.core import config, logs
from pacs.core.analysers import AnalyserPool
from pacs.core.config import Settings
from pacs.core.customers import Customer, customers
from pacs.core.errors import ConfigError
from pacs.core.logins import LoginLimiter
from pacs.core.services import Services, build
from pacs.node.viewer import find_dist, missing_message

log = logging.getLogger(__name__)

#: Paths of the viewer port answered by the DICOMweb application, not OHIF's files.
DICOMWEB_PREFIX = "/dicom-web"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _worker_services(settings: Settings
                     ) -> tuple[AnalyserPool, list[tuple[Customer, Services]]]:
    """The services of each customer in this worker process, closed when it exits;
    they share one pool of STOW-RS analysers and one count of failed logins (the
    node's limits, :mod:`pacs.core.logins`)."""
    logs.setup(settings.log_level)  # no data-set values at INFO and above
    served = customers(settings)
    analysers = AnalyserPool(settings.web_analysers, settings.max_object_bytes)
    atexit.register(analysers.close)
    logins = LoginLimiter.of(settings)
    built = []
    for customer in served:
        # pacs serve checked the stores
        services = build(customer.settings, check_store=False, analysers=analysers,
                         logins=logins)
        atexit.register(services.close)
        built.append((customer, services))
    return analysers, built


def route(settings: Settings, apps: list[tuple[Customer, WSGIApp]]) -> CustomerRouter:
    """One port's application: each request to its customer's application
    (:mod:`adapters.http.customers`).  Without a customers file the one customer is
    the default; with one, the customer named ``CUSTOMER`` when listed."""
    names = [customer.name for customer, _ in apps]
    default = settings.customer if settings.customer in names else None
    return CustomerRouter({customer.name: app for customer, app in apps},
                          {host: customer.name for customer, _ in apps
                           for host in customer.hosts}, default)


def dicomweb_app() -> CustomerRouter:
    """gunicorn's entry point of the DICOMweb port.

    Raises
    ------
    pacs.core.errors.ConfigError
        When the settings are invalid or the index cannot be opened; the worker
        (:mod:`pacs.node.httpworker`) then answers 503 and builds it again later.  The
        store is not checked here (``pacs serve`` did): while it is down, requests
        that need it fail with 503 and queries go on.
    """
    settings = config.load()
    apps: list[tuple[Customer, WSGIApp]] = []
    analysers, served = _worker_services(settings)
    for customer, services in served:
        app = dicomweb.create_app(services)
        _warm_up(app)
        apps.append((customer, app))
    # What start-up created lives as long as the worker: keep it out of later garbage
    # collections, whose full passes would otherwise walk it while a request waits.
    gc.freeze()
    # STOW-RS parts are parsed in helper processes (pacs.core.analysers): start them now.
    analysers.start()
    log.debug("DICOMweb worker ready for %d customer(s)", len(apps))
    return route(settings, apps)


def viewer_port(services: Services, dist: Path) -> WSGIApp:
    """The viewer port's application: DICOMweb and ``/health``, else OHIF's files.

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
        if path in (DICOMWEB_PREFIX, HEALTH_ROUTE) or path.startswith(DICOMWEB_PREFIX + "/"):
            return api(environ, start_response)
        return files(environ, start_response)

    return route


def viewer_app() -> CustomerRouter:
    """gunicorn's entry point of the viewer port.

    Raises
    ------
    pacs.core.errors.ConfigError
        Invalid settings, an unreachable index, or no OHIF files where
        ``PACS_VIEWER_DIST`` says (``pacs serve`` checks before starting us).
    """
    settings = config.load()
    dist = find_dist(settings)
    if dist is None:
        raise ConfigError(missing_message(settings))
    return route(settings, [(customer, viewer_port(services, dist))
                            for customer, services in _worker_services(settings)[1]])


def _unread(status: str, headers: list[tuple[str, str]],
            exc_info: object = None, /) -> Callable[[bytes], object]:
    """``start_response`` of a request whose answer nobody reads (writes go nowhere)."""
    return lambda _data: None


def _warm_up(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    """Do once at worker start what the first request would otherwise pay for.

    falcon compiles its router on the first request, and pydicom builds its lookup
    tables on the first read; a STOW-RS or QIDO-RS answered by a fresh worker was
    noticeably slower than the next ones.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pacs.core.dataset import read_part10
    from pacs.core.errors import InvalidInstance

    # A request for no route compiles falcon's router, touching neither index nor store.
    app(falcon.testing.create_environ(path="/warm-up"), _unread)
    sample = Dataset()
    sample.SOPClassUID, sample.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3"
    sample.StudyInstanceUID, sample.SeriesInstanceUID = "1.2.3.1", "1.2.3.2"
    sample.PatientName = "WARM^UP"
    sample.file_meta = FileMetaDataset()
    sample.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    sample.save_as(buffer, enforce_file_format=True)
    with contextlib.suppress(InvalidInstance):  # only the reading matters
        read_part10(buffer.getvalue())
