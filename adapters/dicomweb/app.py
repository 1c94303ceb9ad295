"""The DICOMweb application: THE route table, middleware and error handling.

``create_app(services)`` composes the app around ready services (tests pass their
own); ``get_app()`` is gunicorn's entry point (``adapters.dicomweb.app:get_app()``):
it reads the settings and builds the services inside each worker process, after the
fork, so no SQLite connection or S3 client ever crosses ``fork()``.

Every route exists twice: at ``/`` (``/studies``) and under ``/dicom-web/``
(``/dicom-web/studies``), the root OHIF and most proxies expect.

=====================================================  ======  =========================
route (below each prefix)                               method  transaction
=====================================================  ======  =========================
/studies                                                GET     QIDO-RS search studies
/studies                                                POST    STOW-RS store
/studies/{study}                                        POST    STOW-RS store to a study
/series, /instances                                     GET     QIDO-RS search
/studies/{study}/series, /studies/{study}/instances     GET     QIDO-RS search
/studies/{study}/series/{series}/instances              GET     QIDO-RS search
(retrieve routes)                                       GET     WADO-RS, from
                                                                ``adapters.dicomweb.wado``
=====================================================  ======  =========================
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import falcon

from adapters.dicomweb import errors, qido, stow
from adapters.dicomweb import health as health_route
from adapters.dicomweb.auth import Access, AccessMiddleware
from adapters.dicomweb.browser import BrowserMiddleware
from pacs.services import Services

log = logging.getLogger(__name__)

#: Where the service is mounted: the root, and again under /dicom-web.
PREFIXES = ("", "/dicom-web")

#: The WADO-RS module, registered when present: ``add_routes(app, services, prefix)``.
WADO_MODULE = "adapters.dicomweb.wado"


#: No DICOMweb answer is a page: should a browser open one as a document (a stored
#: document from /rendered, bulk data, JSON), it runs nothing, loads nothing, cannot be
#: framed, and lives in an opaque origin without access to this one (CSP Level 3).
DICOMWEB_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"


class ActiveContentMiddleware:
    """``X-Content-Type-Options: nosniff`` and :data:`DICOMWEB_POLICY` on every
    response, errors included.

    With ``nosniff`` a browser never takes an answer for another type than the one
    declared (a value served as ``application/octet-stream`` or JSON is never run as
    HTML or script, whatever its bytes look like).  The policy covers what is served
    with a type a browser would run (see :mod:`adapters.dicomweb.rendered`).
    """

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Content-Security-Policy", DICOMWEB_POLICY)


class RouteTable:
    """Routes collected from several modules, merged per URI template.

    Falcon takes one resource per template, and a template may serve two transactions
    (``/studies/{study}``: WADO-RS GET and STOW-RS POST).  Modules add their resources
    here (or through :class:`_Collector`, which looks like the app), and :meth:`install`
    gives falcon one resource per template holding every module's responders.
    """

    def __init__(self) -> None:
        self._routes: dict[str, list[object]] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def add_route(self, template: str, resource: object, **kwargs: Any) -> None:
        """Add a resource for ``template`` (falcon's ``add_route`` signature)."""
        self._routes.setdefault(template, []).append(resource)
        if kwargs:
            if self._options.get(template, kwargs) != kwargs:
                raise ValueError(f"conflicting route options for {template}")
            self._options[template] = kwargs

    def install(self, app: falcon.App) -> None:
        """Add every template to ``app`` with its merged resource."""
        for template, resources in self._routes.items():
            app.add_route(template, merge(template, resources),
                          **self._options.get(template, {}))


class _Merged:
    """Responders of several resources under one URI template."""


def merge(template: str, resources: list[object]) -> object:
    """One resource with the ``on_*`` responders of all ``resources``.

    Raises
    ------
    ValueError
        When two resources answer the same method on the same template.
    """
    if len(resources) == 1:
        return resources[0]
    merged = _Merged()
    for resource in resources:
        for name in dir(resource):
            if not name.startswith("on_") or not callable(getattr(resource, name)):
                continue
            if hasattr(merged, name):
                raise ValueError(f"two responders {name} for {template}")
            setattr(merged, name, getattr(resource, name))
    return merged


class _Collector:
    """The app as another module sees it: routes go to the table, the rest to the app."""

    def __init__(self, app: falcon.App, table: RouteTable) -> None:
        self._app = app
        self._table = table

    def add_route(self, template: str, resource: object, **kwargs: Any) -> None:
        self._table.add_route(template, resource, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


def wado_routes() -> Callable[[Any, Services, str], None] | None:
    """WADO-RS's ``add_routes``, or ``None`` while that module does not exist.

    Only a missing module is tolerated: an error inside it must surface.
    """
    if importlib.util.find_spec(WADO_MODULE) is None:
        return None
    module = importlib.import_module(WADO_MODULE)
    add: Callable[[Any, Services, str], None] = module.add_routes
    return add


def add_routes(table: RouteTable, services: Services, prefix: str) -> None:
    """QIDO-RS and STOW-RS resources under ``prefix``."""
    store = stow.Store(services, prefix)
    for template, target in qido.ROUTES:
        table.add_route(prefix + template, qido.Search(services, target, prefix))
    table.add_route(prefix + "/studies", store)
    table.add_route(prefix + "/studies/{study}", store)


def create_app(services: Services) -> falcon.App:
    """The DICOMweb app over ``services``.

    Parameters
    ----------
    services : Services
        The core (engine, ingest, store, settings) every resource calls.
    """
    settings = services.settings
    middleware: list[Any] = [ActiveContentMiddleware(),
                             BrowserMiddleware(settings.cors_origins),
                             AccessMiddleware(Access(settings))]
    app = falcon.App(middleware=middleware)
    # /studies/ and /studies are the same resource (clients append slashes).
    app.req_options.strip_url_path_trailing_slash = True
    errors.register(app)
    table = RouteTable()
    wado = wado_routes()
    for prefix in PREFIXES:
        add_routes(table, services, prefix)
        if wado is not None:
            wado(_Collector(app, table), services, prefix)
    table.install(app)
    # GET /health: the node's quick health check, at the root only.
    health_route.add_route(app, services)
    return app


def get_app() -> falcon.App:
    """gunicorn's entry point: settings and services built in this (worker) process.

    Raises
    ------
    pacs.errors.ConfigError
        When the settings are invalid or the index cannot be opened; the worker
        (:mod:`pacs.httpworker`) then answers 503 and builds it again later.  The
        store is not checked here (``pacs serve`` did): while it is down, requests
        that need it fail with 503 and queries go on.
    """
    from pacs import config, logs
    from pacs.cli import LOG_FORMAT
    from pacs.services import build

    settings = config.load()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                            format=LOG_FORMAT)
    logs.install(settings.log_level)  # no data-set values at INFO and above
    services = build(settings, check_store=False)  # pacs serve checked it
    atexit.register(services.close)
    app = create_app(services)
    _warm_up(app)
    # What start-up created lives as long as the worker: keep it out of later garbage
    # collections, whose full passes would otherwise walk it while a request waits.
    gc.freeze()
    # STOW-RS parts are parsed in helper processes (pacs.analysers): start them now.
    services.analysers.start()
    log.debug("DICOMweb worker ready for customer %s", settings.customer)
    return app


def _warm_up(app: falcon.App) -> None:
    """Do once at worker start what the first request would otherwise pay for.

    falcon compiles its router on the first request, and pydicom builds its lookup
    tables on the first read; a STOW-RS or QIDO-RS answered by a fresh worker was
    noticeably slower than the next ones.
    """
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pacs.dataset import read_part10
    from pacs.errors import InvalidInstance

    app._router.find("/studies")  # compiles falcon's router (no public call for it)
    sample = Dataset()
    sample.SOPClassUID, sample.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3"
    sample.StudyInstanceUID, sample.SeriesInstanceUID = "1.2.3.1", "1.2.3.2"
    sample.PatientName = "WARM^UP"
    sample.file_meta = FileMetaDataset()
    sample.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    sample.save_as(buffer, enforce_file_format=True)
    try:
        read_part10(buffer.getvalue())
    except InvalidInstance:  # only the reading matters
        pass
