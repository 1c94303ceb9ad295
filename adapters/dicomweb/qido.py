"""QIDO-RS, the Search transaction (PS3.18 10.6), over the core's one query engine.

A request becomes a :class:`~pacs.core.query.model.Query` (:mod:`adapters.dicomweb.search`),
the engine that answers C-FIND runs it, and the rows become DICOM JSON
(:mod:`adapters.dicomweb.dicomjson`).  Answers (PS3.18 8.3.4.4, 10.6.3):

- ``200`` with a JSON array, ``Content-Type: application/dicom+json`` exactly; an
  empty result is ``200 []`` (CP-2473 moves PS3.18 from 204 to 200 for this, and both
  dicomweb-client and OHIF read ``[]``);
- results in a stable order (the index's insertion order), so ``offset`` pages are
  repeatable; when a page is cut, ``Warning: 299 <host>: "There are N additional
  results that can be requested"``;
- ``404`` when the study (or series) named in the path does not exist: the target
  resource itself is missing, which is what 404 means (an existing study with no
  matches is ``200 []``);
- ``400`` for parameters that cannot be honoured, ``406`` when the client accepts no
  JSON (XML is not offered), ``413`` when a query runs past the time limit
  (``PACS_QUERY_TIME_LIMIT`` bounds the whole request: parsing, counting, fetching and
  writing the JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import falcon

from adapters.dicomweb import dicomjson, search, urls
from adapters.dicomweb.errors import Unacceptable
from adapters.dicomweb.negotiation import json_type
from adapters.http import CLIENT_GONE
from pacs.core.attributes import Level
from pacs.core.errors import NotFound
from pacs.core.query.engine import Deadline
from pacs.core.query.model import Query, Result
from pacs.core.services import Services

#: Elements added to every result (PS3.18 Tables 10.6.3-3/4/5).
_CHARSET = {"00080005": dicomjson.constant("CS", dicomjson.UTF8)}
#: Instance Availability (0008,0056) of the study and instance tables: all is online.
_ONLINE = {"00080056": dicomjson.constant("CS", "ONLINE")}

Row = Mapping[str, str | None]

#: Rows rendered between two checks of the query's time limit.
_CHECK_ROWS = 256


def query_params(req: falcon.Request) -> dict[str, list[str]]:
    """Every query parameter with all its (percent-decoded) values."""
    return {name: value if isinstance(value, list) else [value]
            for name, value in req.params.items()}


def retrieve_url(level: Level, root: str) -> Callable[[Row], dicomjson.JsonElement]:
    """The Retrieve URL (0008,1190) of each row's entity."""
    def study(row: Row) -> dicomjson.JsonElement:
        return dicomjson.constant("UR", urls.study_url(root, row["StudyInstanceUID"] or ""))

    def series(row: Row) -> dicomjson.JsonElement:
        return dicomjson.constant("UR", urls.series_url(
            root, row["StudyInstanceUID"] or "", row["SeriesInstanceUID"] or ""))

    def instance(row: Row) -> dicomjson.JsonElement:
        return dicomjson.constant("UR", urls.instance_url(
            root, row["StudyInstanceUID"] or "", row["SeriesInstanceUID"] or "",
            row["SOPInstanceUID"] or ""))

    return {Level.STUDY: study, Level.SERIES: series, Level.IMAGE: instance}[level]


def renderer(level: Level, keywords: list[str], root: str) -> dicomjson.Renderer:
    """The JSON writer of one query's rows."""
    constants = dict(_CHARSET)
    if level in (Level.STUDY, Level.IMAGE):
        constants.update(_ONLINE)
    return dicomjson.Renderer(keywords, constants,
                              {"00081190": retrieve_url(level, root)})


def additional_results(req: falcon.Request, count: int) -> str:
    """The Warning of a cut page as PS3.18 8.3.4.4.1 writes it, its text a quoted
    string (the header's ``warn-text``, RFC 7234 5.5)."""
    return (f'299 {req.netloc}: "There are {count} additional results that can be '
            'requested"')



def _never() -> bool:
    return False

class Search:
    """One QIDO-RS search resource (e.g. ``/studies/{study}/series``).

    Parameters
    ----------
    services : Services
        The engine and the settings (page sizes).
    target : search.Target
        Which of the six resources this is.
    prefix : str
        Where the service is mounted (for Retrieve URLs).
    """

    def __init__(self, services: Services, target: search.Target, prefix: str) -> None:
        self.services = services
        self.target = target
        self.prefix = prefix

    def on_get(self, req: falcon.Request, resp: falcon.Response, study: str | None = None,
               series: str | None = None) -> None:
        """Search (PS3.18 10.6.1); see the module docstring for the answers."""
        answered_as = json_type(req)
        if answered_as is None:
            raise Unacceptable("QIDO-RS answers with application/dicom+json only")
        path_uids = {k: v for k, v in (("StudyInstanceUID", study),
                                       ("SeriesInstanceUID", series)) if v is not None}
        settings = self.services.settings
        deadline = self.services.engine.deadline()  # PACS_QUERY_TIME_LIMIT: all of it
        # The client hanging up stops the query (as a C-CANCEL does a C-FIND's).
        gone: Callable[[], bool] = req.env.get(CLIENT_GONE) or _never
        query, paging = search.parse(query_params(req), self.target, path_uids,
                                     default_limit=settings.qido_default_limit,
                                     max_limit=settings.query_max_rows)
        results = self.services.engine.find(query, gone, deadline)
        if not results and path_uids:
            self._require_parent(path_uids, gone, deadline)
        if len(results) == paging.limit:
            remaining = self._remaining(query, len(results), gone, deadline)
            if remaining > 0:
                resp.append_header("Warning", additional_results(req, remaining))
        resp.content_type = answered_as
        resp.data = self._body(results, urls.service_root(req, self.prefix), deadline)

    def _body(self, results: list[Result], root: str, deadline: Deadline) -> bytes:
        if not results:
            return b"[]"
        write = renderer(self.target.level, list(results[0].values), root)
        rows = []
        for start in range(0, len(results), _CHECK_ROWS):
            deadline.check()
            rows += [write.row(result.values) for result in results[start:start + _CHECK_ROWS]]
        deadline.check()
        return dicomjson.dumps(rows)

    def _remaining(self, query: Query, returned: int, gone: Callable[[], bool],
                   deadline: Deadline) -> int:
        """How many matches follow this page."""
        everything = dataclasses.replace(query, limit=None, offset=0, return_keys=())
        return (self.services.engine.count(everything, cancelled=gone, deadline=deadline)
                - query.offset - returned)

    def _require_parent(self, path_uids: dict[str, str], gone: Callable[[], bool],
                        deadline: Deadline) -> None:
        """404 when the study or series the path names does not exist.

        Raises
        ------
        NotFound
            The study, or the series within that study, is not in the index.
        """
        level = Level.SERIES if "SeriesInstanceUID" in path_uids else Level.STUDY
        parent = Query(level=level, constraints=tuple(
            search.path_constraint(keyword, uid) for keyword, uid in path_uids.items()))
        if self.services.engine.count(parent, cap=1, cancelled=gone, deadline=deadline) == 0:
            what = "series in this study" if level is Level.SERIES else "study"
            raise NotFound(f"no such {what}")


#: Route templates of the search resources, below the service prefix.
ROUTES: tuple[tuple[str, search.Target], ...] = (
    ("/studies", search.STUDIES),
    ("/series", search.ALL_SERIES),
    ("/instances", search.ALL_INSTANCES),
    ("/studies/{study}/series", search.STUDY_SERIES),
    ("/studies/{study}/instances", search.STUDY_INSTANCES),
    ("/studies/{study}/series/{series}/instances", search.SERIES_INSTANCES),
)
