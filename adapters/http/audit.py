"""The audit trail of the HTTP edges: one PS3.15 A.5 event per request that touches
patient data (:mod:`pacs.core.audit`).

=====================================================  ======  ===========================
request (below ``/`` or ``/dicom-web``)                 method  event (PS3.15)
=====================================================  ======  ===========================
``/studies``, ``/series``, ``/instances``, and the      GET     Query (A.5.3.10), E
same below a study or series (QIDO-RS)
``/studies/{study}[/series/…[/instances/…]]``           GET     DICOM Instances Transferred
(WADO-RS instances)                                             (A.5.3.7), R: node → client
``…/metadata``, ``…/frames/…``, ``…/bulkdata/…``,       GET     DICOM Instances Accessed
``…/rendered``, ``…/thumbnail``                                 (A.5.3.6), R
``/studies``, ``/studies/{study}`` (STOW-RS)            POST    DICOM Instances Transferred
                                                                (A.5.3.7), C: client → node
                                                                (U: the instances that
                                                                replaced a different
                                                                object, R: those held
                                                                already; an event each)
``/studies/{study}[/series/{series}]``, and             DELETE  written by the core
``…/reject/{code}^{scheme}`` (removal)                   POST    (:mod:`pacs.core.deletion`);
                                                                refused or failed before
                                                                it: DICOM Instances
                                                                Accessed (A.5.3.6), D
=====================================================  ======  ===========================

``/health``, CORS preflights, HEAD requests (no data in the answer) and the viewer's
static files carry no patient data and are not recorded.  Requests the access rule
refused are recorded too (outcome 8): an auditor wants the attempts as well; as
refusals (401, 403, 421, 429), repeated ones from one address and user are coalesced
into one counted record (:class:`pacs.core.audit.Coalescer`).  Failed
logins themselves, whatever the path, are recorded by the access rule
(:mod:`adapters.http.auth`: User Authentication, PS3.15 A.5.3.12).

- **Who**: the user the credentials proved (HTTP Basic or a bearer token: its user's
  name; ``token`` for ``PACS_WEB_TOKEN``), ``loopback`` for a request from this host
  without credentials, ``anonymous`` when the node is open (``PACS_WEB_OPEN``); for a
  request refused without a proven user, the user name it claimed (never checked) or
  ``anonymous``; the peer address (``REMOTE_ADDR``, as the access rule sees it); the subject
  of a TLS client certificate as AlternativeUserID.
- **What**: the Study Instance UID of the path; for STOW-RS, the studies of the instances
  stored (the resource notes them with :func:`note_stored`), each with its SOP classes
  and instance counts, one event per patient the instances named (the index keeps one
  patient per study, which may not be theirs); for QIDO-RS the query keys' tags and the
  query itself (the path and query string, in ParticipantObjectQuery as A.5.3.10 asks).
- **Outcome** from the response status (:func:`outcome_of`).  A WADO-RS answer is
  streamed after the event is written: a client that stops reading midway is not seen.

The event is written after the response is decided and never changes it: a failure to
build or write it is logged, and the answer goes out as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import falcon
from pydicom.datadict import tag_for_keyword

from adapters.http.auth import basic_credentials, is_placeholder
from pacs.core import audit
from pacs.core.access import Identity
from pacs.core.audit import AuditTrail, Participant, Study

log = logging.getLogger(__name__)

#: The information model a QIDO-RS search stands for: Study Root Query/Retrieve - FIND
#: (QIDO-RS is the study-rooted search of PS3.18 10.6).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: QIDO-RS parameters that are not query keys (PS3.18 Table 8.3.4-1, 8.3.3.1).
NOT_KEYS = frozenset({"limit", "offset", "fuzzymatching", "includefield",
                      "emptyvaluematching", "multiplevaluematching", "accept", "charset"})
#: Path segments after a retrievable resource that read from it (WADO-RS).
_ACCESS_SUFFIXES = frozenset({"metadata", "rendered", "thumbnail", "frames", "bulkdata"})
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
#: Longest UID kept from a path (a UID has 64 characters; anything longer is not one,
#: and is kept cut, as given, for the auditor).
_MAX_PATH_VALUE = 128

QUERY, RETRIEVE, ACCESS, STORE, REMOVE = "query", "retrieve", "access", "store", "remove"


@dataclass(frozen=True)
class Touch:
    """What a request does with patient data: its kind and the study of its path."""

    kind: str
    study: str | None = None
    series: str | None = None


def classify(method: str, path: str) -> Touch | None:
    """What the request ``method path`` touches, or ``None`` for no patient data.

    The path is read the way the route table reads it (``/dicom-web`` or the root,
    a trailing slash ignored), so that refused requests, which never reach routing,
    are classified like the others.
    """
    segments = [s for s in path.split("/") if s]
    if segments[:1] == ["dicom-web"]:
        segments = segments[1:]
    if not segments or segments[0] not in ("studies", "series", "instances"):
        return None
    study = segments[1][:_MAX_PATH_VALUE] if segments[0] == "studies" and \
        len(segments) > 1 else None
    series = segments[3][:_MAX_PATH_VALUE] if len(segments) > 3 and \
        segments[2] == "series" else None
    if segments[0] == "studies" and (
            (method == "DELETE" and len(segments) in (2, 4))
            or (method == "POST" and "reject" in segments[2:])):
        return Touch(REMOVE, study, series)
    if method == "POST":
        return Touch(STORE, study) if segments[0] == "studies" and len(segments) <= 2 \
            else None
    if method not in ("GET", "HEAD"):  # HEAD runs the GET: its answer says as much
        return None
    # QIDO-RS: a level name last (/studies, /studies/{s}/series, …/series/{s}/instances).
    if len(segments) % 2 == 1 and segments[-1] in ("studies", "series", "instances"):
        return Touch(QUERY, study, series)
    if segments[0] != "studies":
        return None
    if len(segments) in (2, 4, 6):  # /studies/{s}[/series/{s}[/instances/{i}]]
        return Touch(RETRIEVE, study, series)
    if any(segment in _ACCESS_SUFFIXES for segment in segments[2:]):
        return Touch(ACCESS, study, series)
    return None


#: HTTP statuses of a request refused for who made it: refusals, which the trail
#: coalesces when they repeat.
REFUSED = frozenset({401, 403, 421, 429})
#: 4xx statuses that are serious failures (:func:`outcome_of`): refusals, and a
#: STOW-RS that stored nothing (409, PS3.18 10.5.3).
_SERIOUS = REFUSED | {409}


def outcome_of(status: int) -> int:
    """EventOutcomeIndicator of an HTTP status (PS3.15 A.5.1 keeps RFC 3881 5.1.4's:
    4 "minor failure; action restarted", 8 "serious failure; action terminated", 12
    "major failure; action made unavailable").

    2xx success (0), but 202 (a STOW-RS with failed parts: some were stored) a minor
    failure (4); other 4xx a minor failure (4), but refused access (401, 403, 421, and
    429: credentials refused after failed logins) and 409 (a STOW-RS whose every part
    failed: nothing was stored, as a C-STORE association whose every store failed) a
    serious one (8); 5xx a serious failure (8), 503 (the node unavailable) a major one
    (12).
    """
    if status == 202:
        return audit.MINOR_FAILURE
    if 200 <= status < 300:
        return audit.SUCCESS
    if status in _SERIOUS:
        return audit.SERIOUS_FAILURE
    if status == 503:
        return audit.MAJOR_FAILURE
    if status >= 500:
        return audit.SERIOUS_FAILURE
    return audit.MINOR_FAILURE


def query_keys(params: Iterable[str], touch: Touch) -> list[str]:
    """The tags of a QIDO-RS request's keys (``00100010``; ``00081032.00080100`` for an
    item key), the path's UIDs first; a name that is no keyword or tag is kept as
    given (it names a key, it holds no value)."""
    keys = []
    if touch.study is not None:
        keys.append("0020000D")
    if touch.series is not None:
        keys.append("0020000E")
    for name in params:
        if name.lower() in NOT_KEYS:
            continue
        keys.append(".".join(_tag_text(part) for part in name.split(".")))
    return list(dict.fromkeys(keys))


def _tag_text(name: str) -> str:
    if _HEX_TAG.match(name):
        return name.upper()
    tag = tag_for_keyword(name)
    return f"{tag:08X}" if tag is not None else name[:64]


def note_stored(req: falcon.Request,
                stored: Iterable[tuple[str, str, str, audit.Patient | None]]) -> None:
    """Tell the trail which instances a STOW-RS request stored: (Study Instance UID,
    SOP Class UID, the EventActionCode of what storing it did to the node's copy:
    :data:`pacs.core.ingest.TRANSFER_ACTION`, the patient it names) of each."""
    req.context.audit_stored = list(stored)


def note_removed(req: falcon.Request) -> None:
    """Tell the trail that the core records this removal request itself."""
    req.context.audit_removed = True


def user_of(req: falcon.Request) -> str:
    """Who made the request (see the module docstring): the identity the access rule
    found (:meth:`adapters.http.auth.Access.require`), else the user it claimed."""
    identity = getattr(req.context, "identity", None)
    if isinstance(identity, Identity):
        return identity.name
    authorization = req.get_header("Authorization") or ""
    return _claimed(authorization) if authorization else "anonymous"


def requestor_of(req: falcon.Request) -> audit.Participant:
    """The requestor of ``req`` as the audit trail names it: its user (:func:`user_of`),
    its address and its TLS client certificate's subject, if any."""
    return Participant(user_of(req), True, address=req.remote_addr or "",
                       alternative_user_id=str(req.env.get("SSL_CLIENT_S_DN", "")))


def _claimed(authorization: str) -> str:
    """The user an Authorization header names: the Basic user name, or ``token``."""
    if is_placeholder(authorization):
        return "anonymous"  # a client's text for no token, no credentials
    if authorization.strip().partition(" ")[0].lower() == "bearer":
        return "token"
    credentials = basic_credentials(authorization)
    if credentials is None:
        return "anonymous"
    return credentials[0][:_MAX_PATH_VALUE] or "anonymous"


class AuditMiddleware:
    """Writes the event of each request that touches patient data (module docstring).

    Parameters
    ----------
    trail : AuditTrail
        The node's trail (``services.audit``).  Who the requestor is comes from the
        access rule (``req.context.identity``, :func:`user_of`).
    """

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        """Record the request, once its answer is decided; never raises."""
        if not self.trail.enabled:
            return
        touch = classify(req.method, req.path)
        if touch is None:
            return
        try:
            self.record(req, resp, touch)
        except Exception:  # the answer goes out whatever happens to its audit event
            log.error("audit trail: the event of a DICOMweb request could not be made",
                      exc_info=True)

    def record(self, req: falcon.Request, resp: falcon.Response, touch: Touch) -> None:
        """Build and write the event of ``touch``."""
        status = falcon.http_status_to_code(resp.status)
        outcome, description = outcome_of(status), f"HTTP {status}"
        refused = status in REFUSED
        client = Participant(user_of(req), True, address=req.remote_addr or "",
                             alternative_user_id=str(req.env.get("SSL_CLIENT_S_DN", "")))
        node = self.trail.node()
        kind = audit.WEB_SERVER
        if touch.kind == QUERY:
            target = req.path + (f"?{req.query_string}" if req.query_string else "")
            self.trail.query(kind, client, STUDY_ROOT_FIND, target.encode("utf-8"),
                             query_keys(req.params, touch), outcome, description,
                             refused=refused)
        elif touch.kind == STORE:
            stored = getattr(req.context, "audit_stored", None) or []
            if not stored:  # nothing stored: the failure, of the study asked for
                if status >= 400:  # whatever the status says, the action was terminated
                    outcome = max(outcome, audit.SERIOUS_FAILURE)
                self.trail.transferred(kind, audit.CREATE, client, node,
                                       [Study(touch.study)] if touch.study else [],
                                       outcome, description, refused=refused)
                return
            by_action: dict[str, list[tuple[str, str, audit.Patient | None]]] = {}
            for study, sop_class, action, patient in stored:
                by_action.setdefault(action, []).append((study, sop_class, patient))
            for action, instances in by_action.items():  # one event each (C, U, R)
                self.trail.received(kind, action, client, node,
                                    audit.studies_by_patient(instances), outcome,
                                    description, refused=refused)
        elif touch.kind == REMOVE:
            if getattr(req.context, "audit_removed", False):
                return  # the core wrote its events (pacs.core.deletion)
            studies = [Study(touch.study)] if touch.study else []
            self.trail.accessed(kind, audit.DELETE, [client, node], studies, outcome,
                                description, refused=refused)
        elif touch.kind == RETRIEVE:
            studies = [Study(touch.study)] if touch.study else []
            self.trail.transferred(kind, audit.READ, node, client, studies, outcome,
                                   description, refused=refused)
        else:
            studies = [Study(touch.study)] if touch.study else []
            self.trail.accessed(kind, audit.READ, [client, node], studies, outcome,
                                description, refused=refused)
