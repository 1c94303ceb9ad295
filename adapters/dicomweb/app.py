"""The DICOMweb application: THE route table, middleware and error handling.

``create_app(services)`` composes the app around ready services; the node builds
them inside each gunicorn worker (:func:`pacs.node.apps.dicomweb_app`), tests pass
their own.

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
/studies/{study}[/series/{series}]                      DELETE  removal, from
…/reject/{code}^{scheme} (study, series, instance)      POST    ``adapters.dicomweb.removal``
=====================================================  ======  =========================
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from adapters.dicomweb import (
    errors,
    health as health_route,
    qido,
    removal,
    rendered,
    stow,
    wado,
)
from adapters.dicomweb.browser import BrowserMiddleware
from adapters.http.audit import AuditMiddleware
from adapters.http.auth import Access, AccessMiddleware
from adapters.http.transport import mark_secure
from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Where the service is mounted: the root, and again under /dicom-web.
PREFIXES = ("", "/dicom-web")

#: No DICOMweb answer is a page: should a browser open one as a document (a stored
#: document from /rendered, bulk data, JSON), it runs nothing, loads nothing, cannot be
#: framed, and lives in an opaque origin without access to this one (CSP Level 3).
DICOMWEB_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"


class ActiveContentMiddleware:
    """``X-Content-Type-Options: nosniff`` and :data:`DICOMWEB_POLICY` on every
    response, errors included (and HSTS over HTTPS: :mod:`adapters.http.transport`).

    With ``nosniff`` a browser never takes an answer for another type than the one
    declared (a value served as ``application/octet-stream`` or JSON is never run as
    HTML or script, whatever its bytes look like).  The policy covers what is served
    with a type a browser would run (see :mod:`adapters.dicomweb.rendered`).
    """

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Content-Security-Policy", DICOMWEB_POLICY)
        mark_secure(req, resp)


#: The Cache-Control of every DICOMweb answer: each may carry patient data (a query's
#: matches, metadata, pixel data, a rendered report; an error may name a UID).  Nothing
#: keeps a copy, neither a shared cache (a proxy, a CDN) nor the browser's own cache on
#: a workstation's disk.  Frames and bulk data look immutable but are not: an instance
#: may be overwritten (PACS_DUPLICATE) or removed, e.g. rejected as the wrong patient's,
#: and a ``max-age`` would keep showing it for that long.  OHIF loses nothing by it: it
#: keeps the images it loaded in its own memory cache for the session.
CACHE_CONTROL = "no-store"


class CacheControlMiddleware:
    """:data:`CACHE_CONTROL` on every response, errors included, unless the resource
    chose its own (``/health``)."""

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        if resp.get_header("Cache-Control") is None:
            resp.set_header("Cache-Control", CACHE_CONTROL)


class RouteTable:
    """Routes collected from several modules, merged per URI template.

    Falcon takes one resource per template, and a template may serve two transactions
    (``/studies/{study}``: WADO-RS GET and STOW-RS POST).  Modules add their resources
    here (:func:`routes`; the table has falcon's ``add_route``), and :meth:`install`
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

    def resources(self) -> dict[str, tuple[object, ...]]:
        """Every URI template with the resources that answer it, in the order added."""
        return {template: tuple(found) for template, found in self._routes.items()}

    def install(self, app: falcon.App[falcon.Request, falcon.Response]) -> None:
        """Add every template to ``app`` with its merged resource, answering HEAD
        wherever it answers GET (:func:`head_of`)."""
        for template, resources in self._routes.items():
            resource = merge(template, resources)
            get = getattr(resource, "on_get", None)
            if get is not None and not hasattr(resource, "on_head"):
                resource.on_head = head_of(get)  # type: ignore[attr-defined]
            app.add_route(template, resource, **self._options.get(template, {}))


def head_of(get: Any) -> Any:
    """A HEAD responder from a GET one (RFC 9110 9.3.2: the same status and headers,
    no content; "all general-purpose servers MUST support the methods GET and HEAD",
    9.1): the GET's answer is made, and a streamed body is closed unread (falcon sends
    no content for HEAD, and would leave a stream open).  An empty stream stands in
    for it, so that no ``Content-Length: 0`` is made up for a body whose length the
    GET would not have known either (8.6)."""

    def on_head(req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        get(req, resp, **params)
        stream = resp.stream
        if stream is None:
            return
        resp.stream = iter(())
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    return on_head


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


def add_routes(table: RouteTable, services: Services, prefix: str) -> None:
    """QIDO-RS and STOW-RS resources under ``prefix``."""
    store = stow.Store(services, prefix)
    for template, target in qido.ROUTES:
        table.add_route(prefix + template, qido.Search(services, target, prefix))
    table.add_route(prefix + "/studies", store)
    table.add_route(prefix + "/studies/{study}", store)


def routes(services: Services) -> RouteTable:
    """Every DICOMweb route under each of :data:`PREFIXES`: the table :func:`create_app`
    installs, which the conformance statement also reads."""
    table = RouteTable()
    for prefix in PREFIXES:
        add_routes(table, services, prefix)
        wado.add_routes(table, services, prefix)
        rendered.add_routes(table, services, prefix)
        removal.add_routes(table, services, prefix)
    return table


def create_app(services: Services) -> falcon.App[falcon.Request, falcon.Response]:
    """The DICOMweb app over ``services``.

    Parameters
    ----------
    services : Services
        The core (engine, ingest, store, settings) every resource calls, and the audit
        trail every request that touches patient data is recorded in
        (:mod:`adapters.http.audit`).
    """
    settings = services.settings
    access = Access.of(services)
    # The audit trail's middleware is first: its process_response runs for every
    # request, those the access rule refuses included (falcon's independent middleware).
    middleware: list[Any] = [AuditMiddleware(services.audit),
                             ActiveContentMiddleware(), CacheControlMiddleware(),
                             BrowserMiddleware(settings.cors_origins),
                             AccessMiddleware(access)]
    app = falcon.App(middleware=middleware)
    # /studies/ and /studies are the same resource (clients append slashes).
    app.req_options.strip_url_path_trailing_slash = True
    errors.register(app)
    routes(services).install(app)
    # GET /health: the node's quick health check, at the root only.
    health_route.add_route(app, services)
    return app
