"""Removing studies, series and instances over DICOMweb: the routes of dcm4chee-arc
that OHIF's delete action calls, and DELETE.

=============================================================  ======  ===============
route (below each prefix)                                      method  answer
=============================================================  ======  ===============
``/studies/{study}``, ``/studies/{study}/series/{series}``     DELETE  204; 404 absent
``/studies/{study}/reject/{code}^{scheme}``,                    POST    200
``…/series/{series}/reject/{code}^{scheme}``,                           ``{"count": n}``
``…/series/{series}/instances/{instance}/reject/{code}^{scheme}``
=============================================================  ======  ===============

A reject request has the effect of an IOCM rejection note naming those instances
(:mod:`pacs.core.rejection`): the instances are removed, with tombstones carrying the
reason (PS3.16 CID 7010: ``113001^DCM``, ``113037^DCM``, ``113038^DCM``,
``113039^DCM``), so an instance rejected for any reason but retention expiry is refused
when it is sent again.  The rejection is applied directly: no Key Object Selection is
made up and stored in the patient's study (it would show in viewers as a series
nobody acquired, with an author and times the node invents).  DELETE removes the same
way without a reason (an instance deleted may be sent again).

Only requests that :meth:`adapters.http.auth.Access.may_delete` admits are served
(``PACS_WEB_DELETE`` on, and a requestor with the ``admin`` role); others get 403 (401
without credentials) before anything is looked up.  Each removal is one audit event per
patient, written by the core (:class:`pacs.core.deletion.Deleter`); a refused or failed
request is recorded by the trail's middleware (:mod:`adapters.http.audit`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import falcon

from adapters.dicomweb.errors import Unacceptable
from adapters.http.audit import note_removed, requestor_of
from adapters.http.auth import Access
from pacs.core import audit
from pacs.core.dataset import require_uid
from pacs.core.deletion import Removal, Target, reference
from pacs.core.rejection import REASONS, Reason, reason_of
from pacs.core.services import Services


class _Remover:
    """What the two resources share: the permission check and the removal."""

    def __init__(self, services: Services) -> None:
        self.services = services

    @cached_property
    def access(self) -> Access:
        """The access rule of the node's settings (read on first use: the conformance
        statement builds the route table without services)."""
        return Access.of(self.services)

    def remove(self, req: falcon.Request, study: str, series: str | None,
               instance: str | None, reason: Reason | None) -> Removal:
        """Check the request may, then remove what the path names.

        Raises
        ------
        falcon.HTTPForbidden
            Deletion is off, or the request is not admitted.
        NotFound
            The path names nothing (404).
        """
        if not self.access.may_delete(req):
            raise falcon.HTTPForbidden(
                title="Deletion not allowed",
                description="removing data over DICOMweb is off (PACS_WEB_DELETE) or not "
                            "allowed for this request")
        target = Target(require_uid(study, "StudyInstanceUID"),
                        require_uid(series, "SeriesInstanceUID") if series else None,
                        require_uid(instance, "SOPInstanceUID") if instance else None)
        deleter = self.services.deleter
        places = [reference(row) for row in deleter.plan([target])]
        note_removed(req)  # the core records it, failed or not
        return deleter.remove(places, requestor_of(req), audit.WEB_SERVER, reason=reason)


class Delete(_Remover):
    """DELETE a study or a series."""

    def on_delete(self, req: falcon.Request, resp: falcon.Response, study: str,
                  series: str | None = None) -> None:
        """204 once removed."""
        self.remove(req, study, series, None, None)
        resp.status = falcon.HTTP_204


class Reject(_Remover):
    """Reject a study, series or instance for a reason of CID 7010 (dcm4chee-arc's
    route)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, study: str, reason: str,
                series: str | None = None, instance: str | None = None) -> None:
        """200 with the number of instances removed (JSON: 406 first when the client
        accepts none)."""
        if req.get_header("Accept") and not req.client_accepts_json:
            raise Unacceptable("the answer is application/json")
        code, _, scheme = reason.partition("^")
        found = reason_of(code, scheme)
        if found is None:
            known = ", ".join(f"{c}^{s}" for c, s in REASONS)
            raise falcon.HTTPBadRequest(
                title="Unknown rejection reason",
                description=f"expected one of {known} (PS3.16 CID 7010)")
        removal = self.remove(req, study, series, instance, found)
        resp.media = {"count": removal.instances}


def add_routes(app: Any, services: Services, prefix: str) -> None:
    """Register the removal routes under ``prefix`` ("" or "/dicom-web") on ``app``
    (anything with falcon's ``add_route``)."""
    study = prefix + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    delete, reject = Delete(services), Reject(services)
    for template in (study, series):
        app.add_route(template, delete)
    for template in (study, series, instance):
        app.add_route(template + "/reject/{reason}", reject)


__all__ = ["Delete", "Reject", "add_routes"]
