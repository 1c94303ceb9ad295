"""The DICOM Conformance Statement, generated from the code and the settings (PS3.2).

:func:`statement` reads what the node really negotiates and serves - the application
entity the DIMSE workers are built with (:func:`pacs.dimse.server.make_ae`: its
presentation contexts, roles, limits and implementation identity), the extended
negotiation it answers (:func:`pacs.dimse.handlers.handle_sop_extended`, asked here
with every flag set), the DICOMweb route table
(:func:`adapters.dicomweb.app.routes`) and the media type tables each DICOMweb resource
negotiates with - and returns it as one JSON-able mapping; :func:`markdown` renders that
mapping in the layout of the PS3.2 Annex A template (2020a edition: A.1 overview, A.4
networking, A.5 media, A.7 character sets, A.8 security), with the web services in the
shape of the PS3.2 example statements' WADO-RS / QIDO-RS / STOW-RS tables.  Nothing in
it is typed twice: a SOP class, transfer syntax, route or media type the node does not
use cannot appear, and one it uses cannot be left out (a DICOMweb resource without a
description here fails the generation).

``pacs conformance`` prints it for the settings in effect; ``docs/conformance.md`` is
the statement of the default settings, kept current by ``tests/unit/test_conformance.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from pydicom import charset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import evt

import pacs
from adapters.dicomweb import (
    app as dicomweb_app,
    dicomjson,
    negotiation,
    numbers,
    qido,
    removal,
    rendered,
    report,
    stow,
    wado,
)
from adapters.dicomweb.accept import MULTIPART
from pacs.core import commitment, frames, jsonmodel, transcode
from pacs.core.config import Settings
from pacs.core.index import compiler
from pacs.core.services import access_policy
from pacs.dimse import contexts, handlers, limits, reports, retrieve, server

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from pacs.core.services import Services

#: The Verification SOP Class (PS3.4 A.4).
VERIFICATION_UID = "1.2.840.10008.1.1"
#: The DICOM Application Context Name (PS3.7 A.2.1), the only one pynetdicom accepts.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

#: The tables are read, never served: resources and handlers are built without services.
_UNSERVED = cast("Services", None)

#: Byte names of the Service-Class-Application-Information field of SOP Class Extended
#: Negotiation (PS3.4 C.5): C-FIND's (Table C.5-2), then C-MOVE's and C-GET's.
FIND_EXTENDED_BYTES = ("Relational-queries", "Date-time matching",
                       "Fuzzy semantic matching of person names",
                       "Timezone query adjustment", "Enhanced Multi-Frame Image Conversion",
                       "Empty value matching", "Multiple value matching")
RETRIEVE_EXTENDED_BYTES = ("Relational-retrieval", "Enhanced Multi-Frame Image Conversion")

VERIFICATION, STORAGE, QUERY_RETRIEVE = "Verification", "Storage", "Query/Retrieve"
STORAGE_COMMITMENT = "Storage Commitment"


# --- the statement ----------------------------------------------------------------------

def statement(settings: Settings) -> dict[str, Any]:
    """The conformance statement of a node running with ``settings``, as JSON-able data.

    Parameters
    ----------
    settings : Settings
        The effective settings (``pacs config`` shows them).
    """
    ae = server.make_ae(settings)
    return {
        "product": {"name": "pacs", "version": pacs.__version__},
        "implementation": {"class_uid": str(ae.implementation_class_uid),
                           "version_name": ae.implementation_version_name},
        "network": _network(settings),
        "association": _association(settings, ae),
        "presentation_contexts": _presentation_contexts(ae),
        "extended_negotiation": _extended_negotiation(),
        "query_bounds": _query_bounds(),
        "initiation": _initiation(settings),
        "storage_commitment": _storage_commitment(settings),
        "character_sets": _character_sets(settings),
        "security": _security(settings, ae),
        "dicomweb": _dicomweb(settings),
    }


def to_json(data: dict[str, Any]) -> str:
    """The statement as indented JSON."""
    return json.dumps(data, indent=1) + "\n"


def _network(settings: Settings) -> dict[str, Any]:
    return {"ae_title": settings.ae_title, "bind_address": settings.bind_address,
            "dimse_port": settings.dimse_port, "dimse_tls_port": settings.dimse_tls_port,
            "web_port": settings.web_port,
            "viewer_port": settings.viewer_port,
            "ip_versions": ["IPv6"] if ":" in settings.bind_address else ["IPv4"]}


def _association(settings: Settings, ae: Any) -> dict[str, Any]:
    bound = {event for event, *_ in handlers.bind(_UNSERVED)}
    return {
        "application_context": APPLICATION_CONTEXT,
        "max_pdu_receive": ae.maximum_pdu_size,
        # A longer A-ASSOCIATE-RQ is not read: the connection is aborted.
        "max_associate_rq_bytes": limits.ASSOCIATE_CEILING,
        "dimse_workers": settings.dimse_workers,
        "max_associations_per_worker": settings.max_associations,
        "max_associations_per_host_per_worker": settings.max_associations_per_host,
        "customer_association_share": settings.customer_association_share,
        "max_pending_connections_per_worker": settings.max_pending_connections,
        "artim_timeout": settings.artim_timeout,
        "acse_timeout": ae.acse_timeout,
        "dimse_timeout": ae.dimse_timeout,
        "network_timeout": ae.network_timeout,
        "connection_timeout": ae.connection_timeout,
        # Each PDU read and each write, whole: the network timeout and a second more
        # per this many bytes moved (pacs.dimse.limits.Pace).
        "transfer_min_rate": limits.MIN_RATE,
        # pynetdicom answers these items only when a handler is bound for them.
        "asynchronous_operations_window": evt.EVT_ASYNC_OPS in bound,
        "user_identity": evt.EVT_USER_ID in bound,
        "sop_class_common_extended": evt.EVT_SOP_COMMON in bound,
        "rejections": [
            # Checked by the node's admission (pacs.dimse.server._admit), which picks
            # the customer the title calls.
            {"when": "the Called AE Title is not the node's (PACS_AE_TITLE, or a "
                     "customer's of PACS_CUSTOMERS_FILE)",
             "result": 1, "source": 1, "reason": 7, "applies": True},
            {"when": "the Calling AE Title has no rights (not known, and "
                     "PACS_UNKNOWN_AE_RIGHTS or PACS_ALLOWED_CALLING_AETS leave unknown "
                     "AEs none), or a known AE calls from another address",
             "result": 1, "source": 1, "reason": 3,
             "applies": _known_aes_only(settings)
             or any(not known.rights or known.host
                    for known in access_policy(settings).aes.values())},
            {"when": "the Maximum Length the requestor announces is below "
                     f"{limits.MIN_PEER_PDU} bytes (0, no maximum, is served)",
             "result": 1, "source": 1, "reason": 1, "applies": True},
            {"when": "the request holds no presentation context item, or one whose ID "
                     "is even or repeated or that lacks its abstract or transfer "
                     "syntax (PS3.8 9.3.2, 9.3.2.2)",
             "result": 1, "source": 1, "reason": 1, "applies": True},
            {"when": "the worker holds PACS_MAX_ASSOCIATIONS associations, or "
                     "PACS_MAX_ASSOCIATIONS_PER_HOST from the peer's address, or (with "
                     "several customers) PACS_CUSTOMER_ASSOCIATION_SHARE of "
                     "PACS_MAX_ASSOCIATIONS of the called customer's",
             # rejected-transient, service provider (presentation), local-limit-exceeded
             "result": 2, "source": 3, "reason": 2, "applies": True},
        ],
    }


def _uid_name(uid: str) -> str:
    """The name of a UID, from pydicom's dictionary."""
    name = UID(uid).name
    return name if name != uid else "(not named in the installed pydicom dictionary)"


def _service(uid: str) -> str:
    if uid == VERIFICATION_UID:
        return VERIFICATION
    if uid in contexts.FIND_MODELS or uid in contexts.MOVE_MODELS or uid in contexts.GET_MODELS:
        return QUERY_RETRIEVE
    if uid == contexts.STORAGE_COMMITMENT:
        return STORAGE_COMMITMENT
    return STORAGE


def _presentation_contexts(ae: Any) -> list[dict[str, Any]]:
    """Every context the AE accepts, its transfer syntaxes in the order of preference."""
    return [{"sop_class": str(cx.abstract_syntax), "name": _uid_name(cx.abstract_syntax),
             "service": _service(str(cx.abstract_syntax)), "role": "SCP",
             # SCP/SCU Role Selection (PS3.7 D.3.3.4) the node accepts when proposed:
             # the requestor may take the SCP role (C-GET's C-STORE sub-operations).
             "role_selection": bool(cx.scu_role and cx.scp_role),
             "transfer_syntaxes": [str(ts) for ts in cx.transfer_syntax]}
            for cx in ae.supported_contexts]


def _extended_negotiation() -> list[dict[str, Any]]:
    """What the node answers to SOP Class Extended Negotiation with every byte set."""
    models = [*contexts.FIND_MODELS, *contexts.MOVE_MODELS, *contexts.GET_MODELS]
    asked = {uid: b"\x01" * len(FIND_EXTENDED_BYTES) for uid in models}
    event = cast("Event", SimpleNamespace(app_info=asked))
    answers = handlers.handle_sop_extended(event)
    found = []
    for uid in models:
        names = FIND_EXTENDED_BYTES if uid in contexts.FIND_MODELS else RETRIEVE_EXTENDED_BYTES
        answer = answers.get(uid, b"")
        found.append({"sop_class": str(uid), "name": _uid_name(uid),
                      "answered": uid in answers,
                      "supported": {name: len(answer) > i and answer[i] == 1
                                    for i, name in enumerate(names)}})
    return found


def _storage_commitment(settings: Settings) -> dict[str, Any]:
    """How Storage Commitment requests are answered and their results delivered."""
    return {
        "max_references": settings.commitment_max_references,
        "max_pending": settings.commitment_max_pending,
        "same_association_quiet": reports.QUIET,
        "same_association_wait": reports.QUIET_WAIT,
        "keep_unreachable": reports.KEEP_UNREACHABLE,
        "keep": settings.commitment_keep,
        "retry_first": commitment.RETRY_FIRST,
        "retry_max": commitment.RETRY_MAX,
        "report_syntaxes": [str(ts) for ts in reports.SYNTAXES],
        "failure_reasons": {
            f"{commitment.NO_SUCH_OBJECT_INSTANCE:04X}": "the index holds no instance of "
                                                         "this SOP Instance UID",
            f"{commitment.CLASS_INSTANCE_CONFLICT:04X}": "the index holds the instance under "
                                                         "another SOP Class UID",
            f"{commitment.PROCESSING_FAILURE:04X}": "the stored object is missing, "
                                                    "unreadable, or not the bytes "
                                                    "acknowledged (SHA-256 and size); "
                                                    "or, at a delivery attempt, the "
                                                    "instance was stored again since "
                                                    "with other content (another "
                                                    "SHA-256 than the one verified)",
        },
    }


def _initiation(settings: Settings) -> dict[str, Any]:
    """C-STORE sub-operations of C-MOVE (new association) and C-GET (same one)."""
    order = contexts.STORAGE_TRANSFER_SYNTAXES
    decodable = [ts for ts in order if ts != ExplicitVRLittleEndian
                 and transcode.can_convert(ts, ExplicitVRLittleEndian)]
    return {
        "destinations": [{"ae_title": m.ae_title, "host": m.host, "port": m.port,
                          "tls": m.tls} for m in settings.destinations.values()],
        "max_contexts": retrieve.MAX_CONTEXTS,
        "conversion_targets": [str(ts) for ts in transcode.UNCOMPRESSED],
        "decodable_syntaxes": [str(ts) for ts in decodable],
        "max_pdu": settings.max_pdu,
        "min_peer_pdu": limits.MIN_PEER_PDU,
        "pending_interval": settings.pending_interval,
    }


def _query_bounds() -> dict[str, int]:
    """The largest query C-FIND, C-MOVE, C-GET and QIDO-RS run (the compiler's bounds,
    below SQLite's limits on one statement)."""
    return {"max_values": compiler.MAX_TERMS, "max_uids": compiler.MAX_UIDS,
            "max_value_characters": compiler.MAX_VALUE_CHARS}


def _character_sets(settings: Settings) -> dict[str, Any]:
    return {
        # pydicom decodes requests and encodes responses (pacs.dimse.identifier,
        # pacs.dimse.encoding) with these Defined Terms of (0008,0005).
        "c_find": [term for term in charset.python_encoding if term],
        "c_find_response_rule": "the request's Specific Character Set when every "
                                "character of the match is in the repertoire of one of "
                                "its terms (ISO_IR 6 and ISO 2022 IR 6: ASCII only; "
                                "ISO_IR 13: JIS X 0201 only, no kanji), otherwise "
                                f"{dicomjson.UTF8}; also {dicomjson.UTF8} for a Latin-1 "
                                "letter under code extensions whose first term is the "
                                "default repertoire",
        "dicomweb": dicomjson.UTF8,
        "person_name_matching": ("case-sensitive" if settings.pn_case_sensitive
                                 else "case-insensitive"),
    }


#: The TLS profile of the DICOM TLS port and the HTTPS ports (pacs.core.tls).
TLS_PROFILE = "BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile (PS3.15 B.12)"


def _known_aes_only(settings: Settings) -> bool:
    """True when an AE the access rules do not know may not associate."""
    return not access_policy(settings).unknown_ae_rights


def _security(settings: Settings, ae: Any) -> dict[str, Any]:
    policy = access_policy(settings)
    return {
        "profiles": [TLS_PROFILE] if settings.dimse_tls_port or settings.tls_cert else [],
        "dimse_tls": bool(settings.dimse_tls_port),
        "dimse_tls_port": settings.dimse_tls_port,
        "dimse_plain": bool(settings.dimse_port),
        "dimse_client_certificates": bool(settings.dimse_tls_ca),
        "called_ae_title_checked": True,
        # The calling AE titles that may associate, when only known ones may.
        "calling_ae_titles": sorted(title for title, known in policy.aes.items()
                                    if known.rights) if _known_aes_only(settings) else [],
        "unknown_ae_rights": sorted(policy.unknown_ae_rights),
        "known_aes": [{"ae_title": known.title, "rights": sorted(known.rights),
                       "address": known.host or "any"}
                      for known in policy.aes.values()],
        "move_destinations_only_configured": True,
        "audit_trail": settings.audit_log.strip().lower() != "off",
        "dicomweb_https": bool(settings.tls_cert),
        "dicomweb_client_certificates": bool(settings.tls_ca),
        "dicomweb_open": settings.web_open,
        "dicomweb_basic": policy.has_passwords,
        "dicomweb_bearer": policy.has_tokens,
        # Failed logins per client address or user name before 429 (0: no limit).
        "dicomweb_failed_logins": {"failures": settings.auth_failures,
                                   "window_seconds": settings.auth_window},
        "dicomweb_loopback_roles": sorted(policy.loopback_roles),
        "dicomweb_hosts": list(settings.web_hosts),
        "cors_origins": list(settings.cors_origins),
    }


# --- DICOMweb ----------------------------------------------------------------------------

def _offer(media_type: str, *, default: bool = False, transfer_syntaxes: Sequence[str] = (),
           default_syntax: str | None = None, stored_syntaxes: Sequence[str] | None = None,
           levels: Sequence[str] | None = None) -> dict[str, Any]:
    """One media type a resource answers with.

    ``transfer_syntaxes``: values of the ``transfer-syntax`` parameter it honours
    (``*``: as stored); ``default_syntax``: what it sends without one;
    ``stored_syntaxes``: offered only for objects stored in these (sent as stored),
    ``None``: for every object; ``levels``: only on routes ending so (``None``: all).
    """
    return {"media_type": media_type, "default": default,
            "transfer_syntaxes": list(transfer_syntaxes), "default_syntax": default_syntax,
            "stored_syntaxes": None if stored_syntaxes is None else list(stored_syntaxes),
            "levels": None if levels is None else list(levels)}


def _multipart(part: str) -> str:
    return f'{MULTIPART}; type="{part}"'


def _frame_offers() -> list[dict[str, Any]]:
    """Frames, and pixel data as bulk data (:func:`adapters.dicomweb.wado.frame_plan`)."""
    syntaxes = ["*", *wado.NATIVE_FRAME_SYNTAXES]
    offers = [_offer(_multipart(wado.OCTET), default=True, transfer_syntaxes=syntaxes,
                     default_syntax=frames.NATIVE_SYNTAX),
              _offer(wado.OCTET, transfer_syntaxes=syntaxes,
                     default_syntax=frames.NATIVE_SYNTAX)]
    by_type: dict[str, list[str]] = {}
    for syntax, kind in wado.IMAGE_TYPES.items():
        by_type.setdefault(kind, []).append(syntax)
    for kind, stored in by_type.items():
        offers.append(_offer(_multipart(kind), stored_syntaxes=stored))
        offers.append(_offer(kind, stored_syntaxes=stored))
    return offers


def _describe(resource: object) -> dict[str, Any]:
    """What one DICOMweb resource is and the media types it answers with.

    Raises
    ------
    ValueError
        For a resource this module does not know (add its description here).
    """
    json_only = [_offer(dicomjson.MEDIA_TYPE, default=True)]
    if isinstance(resource, qido.Search):
        return {"name": "Search", "transaction": "QIDO-RS Search",
                "section": "PS3.18 10.6", "method": "GET",
                "notes": "Matching as C-FIND's (PS3.18 8.3.4.1 defers to PS3.4 C.2.2.2), "
                         "within the same query bounds (3.2.3.3).  A query beyond them, "
                         f"or a `limit` or `offset` above {numbers.INT64_MAX}, is "
                         "answered 400.",
                "media_types": json_only}
    if isinstance(resource, stow.Store):
        return {"name": "Store Instances", "transaction": "STOW-RS Store Instances",
                "section": "PS3.18 10.5", "method": "POST", "media_types": json_only,
                "request_media_types": [_multipart(stow.DICOM), stow.DICOM]}
    if isinstance(resource, wado.Instances):
        return {"name": "Retrieve Instances", "transaction": "WADO-RS Retrieve",
                "section": "PS3.18 10.4.1.1.1", "method": "GET",
                "notes": "One part per instance.  `transfer-syntax=*` or the object's own "
                         "transfer syntax sends it as stored; an uncompressed syntax "
                         "converts it (from the syntaxes of 3.2.4); a syntax that cannot "
                         "be produced for every instance is answered 406.  An instance "
                         "whose pixel data does not decode here goes by the next "
                         "alternative the Accept header allows (as stored), else 406; a "
                         "stored object that does not read is answered 500.",
                "media_types": [
                    _offer(_multipart(wado.DICOM), default=True,
                           transfer_syntaxes=["*", *transcode.UNCOMPRESSED],
                           default_syntax=ExplicitVRLittleEndian),
                    _offer(wado.DICOM, transfer_syntaxes=["*", *transcode.UNCOMPRESSED],
                           default_syntax=ExplicitVRLittleEndian,
                           levels=["/instances/{instance}"])]}
    if isinstance(resource, wado.Metadata):
        return {"name": "Retrieve Metadata", "transaction": "WADO-RS Retrieve",
                "section": "PS3.18 10.4.1.1.2", "method": "GET", "media_types": json_only}
    if isinstance(resource, wado.Frames):
        return {"name": "Retrieve Frames", "transaction": "WADO-RS Retrieve",
                "section": "PS3.18 10.4.1.1.3", "method": "GET",
                "notes": "Each part states the transfer syntax of its frame.  Objects "
                         "stored compressed are decoded for the uncompressed types (from "
                         "the syntaxes of 3.2.4) when the codestream of each declares "
                         "the image of the data set's Rows, Columns and Samples per "
                         "Pixel (PS3.5 8.2; otherwise, nothing decoded, the next "
                         "alternative the Accept header allows, stored frames, else "
                         "406), and "
                         "uncompressed frames are labelled "
                         f"{frames.NATIVE_SYNTAX} whichever uncompressed syntax was asked "
                         "(the bytes of a frame are the same); `*` sends the stored "
                         "frames.",
                "media_types": _frame_offers()}
    if isinstance(resource, wado.Bulkdata):
        return {"name": "Retrieve Bulkdata", "transaction": "WADO-RS Retrieve",
                "section": "PS3.18 10.4.1.1.5", "method": "GET",
                "notes": "The BulkDataURIs of the metadata.  Pixel Data (`7FE00010`) is "
                         "answered as all its frames, with the media types below; any "
                         f"other value as its bytes, `{wado.OCTET}` (multipart, or alone "
                         "when asked without multipart).  Each part of a multipart "
                         "answer has a Content-Location: the BulkDataURI, and for the "
                         "frames of Pixel Data `{BulkDataURI}/frames/{n}`, which answers "
                         "that frame too (PS3.18 10.4.3.3.5).  Besides binary values over "
                         f"{jsonmodel.BULK_DATA_THRESHOLD} bytes, the metadata of an "
                         "instance writes at most "
                         f"{jsonmodel.INLINE_VALUE_BYTES >> 20} MiB of text and number "
                         f"values ({jsonmodel.VALUE_COST} bytes more per value); past "
                         "that, values of the VRs PS3.18 10.4.3.3.2 lists "
                         "are BulkDataURIs, and others are left out.",
                "media_types": _frame_offers()}
    if isinstance(resource, rendered.Rendered):
        images = [_offer(kind, default=i == 0) for i, kind in enumerate(rendered.RENDERED_TYPES)]
        params = ("Parameters `quality`, `viewport`, `window` (PS3.18 8.3.5.1), finite "
                  "numbers; a viewport's source region lies within the image (400 "
                  "otherwise); an image smaller than the viewport is enlarged up to "
                  f"{rendered.MAX_ENLARGED} pixels on its longer side.  The representative "
                  "image of a study or series is its middle image.  Grey images are drawn "
                  "through the Modality LUT (rescale or table), then the window asked "
                  "for, the data set's first window, or its VOI LUT table (PS3.3 C.11); "
                  "an enhanced frame by its functional groups (C.7.6.16).")
        if resource.thumbnail:
            return {"name": "Retrieve Thumbnail", "transaction": "WADO-RS Retrieve",
                    "section": "PS3.18 10.4.1.1.6", "method": "GET",
                    "notes": f"{params}  Fitted into {rendered.THUMBNAIL_SIZE} pixels "
                             "unless a viewport is given.",
                    "media_types": images}
        return {"name": "Retrieve Rendered", "transaction": "WADO-RS Retrieve",
                "section": "PS3.18 10.4.1.1.4", "method": "GET",
                "notes": f"{params}  An encapsulated document instance (PDF, CDA, ...) "
                         "is answered in its own MIME Type of Encapsulated Document "
                         "(0042,0012), as a download.  A Structured Report instance is "
                         "rendered as text, its content tree indented: "
                         f"{' or '.join(f'`{kind}`' for kind in report.REPORT_TYPES)}, "
                         "the first by default (the Text category of PS3.18 Table "
                         "8.7.4-1).",
                "media_types": images}
    if isinstance(resource, removal.Delete):
        return {"name": "Delete", "transaction": "Removal (not in PS3.18)",
                "section": "IHE RAD TF-2 4.66 (IOCM)", "method": "DELETE",
                "notes": "Removes a study or series, index rows and objects together "
                         "(204; 404 when absent). Only with `PACS_WEB_DELETE=true`, for "
                         "requests the access rule admits; otherwise 403.",
                "media_types": []}
    if isinstance(resource, removal.Reject):
        return {"name": "Reject", "transaction": "Rejection (dcm4chee-arc's route)",
                "section": "IHE RAD TF-2 4.66 (IOCM), PS3.16 CID 7010", "method": "POST",
                "notes": "`{reason}` is `113001^DCM`, `113037^DCM`, `113038^DCM` or "
                         "`113039^DCM`: the instances go as if a rejection note named "
                         "them, and all but the last reason refuse them when sent again "
                         "(C-STORE A771, STOW-RS 409). Answers `{\"count\": n}`. Only with "
                         "`PACS_WEB_DELETE=true`, for requests the access rule admits; "
                         "otherwise 403.",
                "media_types": [_offer("application/json", default=True)]}
    raise ValueError(f"the conformance statement has no description of "
                     f"{type(resource).__name__}")


def _dicomweb(settings: Settings) -> dict[str, Any]:
    """Every resource of the route table, its routes under every prefix."""
    found: dict[str, dict[str, Any]] = {}
    table = dicomweb_app.routes(_UNSERVED).resources()
    for template, resources in table.items():
        for resource in resources:
            described = _describe(resource)
            entry = found.setdefault(described["name"], {**described, "routes": []})
            entry["routes"].append(template)
    return {"port": settings.web_port, "viewer_port": settings.viewer_port,
            "prefixes": list(dicomweb_app.PREFIXES),
            "json_accept": list(negotiation.JSON_TYPES),
            "resources": list(found.values())}


# --- Markdown -----------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _name(uid: str) -> str:
    return _uid_name(uid) if uid != "*" else "as stored"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _bytes(value: int) -> str:
    return "unlimited" if value == 0 else f"{value} bytes"


def _answered(values: dict[str, Any], key: str) -> str:
    return "answered" if values[key] else "not answered"


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def _groups(cxs: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Contexts grouped by service, role selection and transfer syntax list."""
    groups: dict[tuple[str, bool, tuple[str, ...]], list[dict[str, Any]]] = {}
    for cx in cxs:
        key = (cx["service"], cx["role_selection"], tuple(cx["transfer_syntaxes"]))
        groups.setdefault(key, []).append(cx)
    return [(service, members) for (service, _, _), members in groups.items()]


def markdown(data: dict[str, Any]) -> str:
    """The statement as Markdown (PS3.2 Annex A layout)."""
    parts = [_overview(data), _introduction(data), _networking(data), _web(data),
             _media(), _charsets(data), _security_text(data)]
    return "\n\n".join(part.strip("\n") for part in parts) + "\n"


def _overview(data: dict[str, Any]) -> str:
    product = data["product"]
    cxs = data["presentation_contexts"]
    storage = [cx for cx in cxs if cx["service"] == STORAGE]
    qr = [cx for cx in cxs if cx["service"] == QUERY_RETRIEVE]
    rows: list[list[object]] = [[cx["name"], "No", "Yes"] for cx in cxs
                                if cx["service"] == VERIFICATION]
    rows.append([f"Storage: {len(storage)} Storage SOP Classes (3.2.1)",
                 "Yes (C-MOVE / C-GET sub-operations)", "Yes"])
    rows += [[cx["name"], "No", "Yes"] for cx in qr]
    rows += [[cx["name"], "No", "Yes"] for cx in cxs if cx["service"] == STORAGE_COMMITMENT]
    web = [[r["transaction"] + (f" ({r['name']})" if r["name"] != r["transaction"] else ""),
            "No", "Yes"] for r in data["dicomweb"]["resources"]]
    return f"""# {product['name']} {product['version']}: DICOM Conformance Statement

Generated by `pacs conformance` from the node's code and the settings it runs with: the
presentation contexts its application entity is built with, the extended negotiation
it answers, the DICOMweb route table and the media types each
resource negotiates.  Do not edit by hand: `docs/conformance.md` is this statement for
the default settings (`pacs conformance --defaults > docs/conformance.md`), and
`tests/unit/test_conformance.py` fails when it is stale.  The layout follows the
template of PS3.2 Annex A (section numbers of the template in brackets).

## 1 Conformance Statement Overview [PS3.2 A.1]

pacs is a PACS node: it stores the objects modalities send with C-STORE (every Storage
SOP Class, in any transfer syntax, byte for byte as received), commits to them on
request (Storage Commitment Push Model), answers C-FIND, C-MOVE and C-GET on the Patient
Root and Study Root information models, and serves the same objects over DICOMweb
(QIDO-RS, WADO-RS, STOW-RS).  It has one application entity,
`{data['network']['ae_title']}`.

Table 1-1. Network services

{_table(["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], rows)}

Table 1-2. Web services (PS3.18)

{_table(["Transaction (resource)", "User Agent", "Origin Server"], web)}

Media interchange: none."""


def _introduction(data: dict[str, Any]) -> str:
    return """## 2 Introduction [PS3.2 A.3]

### 2.1 Audience and remarks

Integrators and users who connect modalities, workstations, viewers and scripts to the
node.  The statement is generated for one configuration: the settings it names
(`PACS_*`, README "Settings") change AE titles, ports and limits, and `pacs conformance`
prints the statement of the settings in effect (`--format json` as JSON).

### 2.2 Abbreviations

AE Application Entity; ARTIM Association Request/Reject/Release timer; PDU Protocol Data
Unit; SCU / SCP Service Class User / Provider; TS Transfer Syntax; QIDO-RS, WADO-RS,
STOW-RS the DICOMweb query, retrieve and store services (PS3.18)."""


def _networking(data: dict[str, Any]) -> str:
    net = data["network"]
    assoc = data["association"]
    impl = data["implementation"]
    ae = net["ae_title"]
    cxs = data["presentation_contexts"]
    sections = [f"""## 3 Networking [PS3.2 A.4]

### 3.1 Implementation Model [A.4.1]

#### 3.1.1 Application Data Flow

- A remote AE sends objects (C-STORE) or checks connectivity (C-ECHO): `{ae}` stores
  each object durably and in the index before it answers.
- A remote AE queries (C-FIND): `{ae}` answers from the index.
- A remote AE retrieves (C-MOVE to a configured destination, C-GET over its own
  association): `{ae}` sends the stored objects as C-STORE sub-operations.
- Objects stored that match a forwarding rule (`PACS_ROUTES`, `PACS_ROUTES_FILE`), or
  named by `pacs send`: `{ae}` sends them on as C-STORE requests to a known AE with an
  address, as a C-MOVE destination (or by STOW-RS to a DICOMweb server), from a durable
  outbox.
- A remote AE asks `{ae}` to commit to objects it sent (N-ACTION): `{ae}` records the
  request before it answers, checks each instance against the index and the store, and
  reports the result (N-EVENT-REPORT) on the requestor's association or on a new one.
- DICOMweb user agents query, retrieve and store over HTTP (section 4) on the same
  index and store.

#### 3.1.2 Functional Definition of AEs

`{ae}` is one AE served by `PACS_DIMSE_WORKERS` worker processes
(`{assoc['dimse_workers']}`; 0: one per CPU) that accept associations from one listening
port.  It accepts associations for every service of Table 3-1 and initiates
associations only to C-MOVE destinations, to forwarding destinations and to storage
commitment requestors.

#### 3.1.3 Sequencing of Real-World Activities

A C-STORE is answered only once the object is written and its index row committed; a
retrieve finds an object as soon as its C-STORE was answered, and so does a storage
commitment request.

### 3.2 AE Specifications: `{ae}` [A.4.2]

#### 3.2.1 SOP Classes [A.4.2.1.1]

This Application Entity provides Standard Conformance to the following SOP Classes.

Table 3-1. SOP Classes of `{ae}`

{_table(["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
        [[cx["name"], cx["sop_class"], _yes(cx["service"] == STORAGE), "Yes"]
         for cx in cxs])}

SCU of a Storage SOP Class: C-STORE sub-operations of C-MOVE and C-GET (3.2.3), and
forwarding (3.2.4).  SCP
of Storage Commitment: N-ACTION received, N-EVENT-REPORT sent (3.2.3.3, 3.2.4).

#### 3.2.2 Association Policies [A.4.2.1.2]

##### 3.2.2.1 General

{_table(["Application Context Name", "Maximum PDU size received"],
        [[assoc['application_context'], _bytes(assoc['max_pdu_receive'])]])}

An A-ASSOCIATE-RQ PDU longer than {assoc['max_associate_rq_bytes']} bytes is not read:
the connection is aborted (A-ABORT).

##### 3.2.2.2 Number of Associations

{_table(["Limit", "Value", "Setting"], [
    ["Simultaneous associations as acceptor, per worker process",
     assoc['max_associations_per_worker'], "PACS_MAX_ASSOCIATIONS"],
    ["Simultaneous associations from one peer address, per worker process",
     assoc['max_associations_per_host_per_worker'], "PACS_MAX_ASSOCIATIONS_PER_HOST"],
    ["Share of a worker's associations one customer may hold, when the node serves "
     "several (1: no share)", assoc['customer_association_share'],
     "PACS_CUSTOMER_ASSOCIATION_SHARE"],
    ["Connections that have not sent their A-ASSOCIATE-RQ, per worker process",
     assoc['max_pending_connections_per_worker'], "PACS_MAX_PENDING_CONNECTIONS"],
    ["Worker processes", f"{assoc['dimse_workers']} (0: one per CPU)",
     "PACS_DIMSE_WORKERS"],
    ["Associations initiated per C-MOVE", 1, ""],
    ["Associations initiated per storage commitment report, when no association of "
     "the requestor is quiet", 1, ""]])}

##### 3.2.2.3 Asynchronous Nature

Asynchronous Operations Window negotiation is {_answered(assoc, 'asynchronous_operations_window')}:
one operation is invoked and performed at a time on an association.

##### 3.2.2.4 Implementation Identifying Information

{_table(["Implementation Class UID", "Implementation Version Name"],
        [[impl['class_uid'], impl['version_name']]])}""",
                _acceptance(data), _initiation_text(data), _network_interfaces(data),
                _configuration(data)]
    return "\n\n".join(s.strip("\n") for s in sections)


def _acceptance(data: dict[str, Any]) -> str:
    assoc = data["association"]
    ae = data["network"]["ae_title"]
    rejections = [[r["when"], r["result"], r["source"], r["reason"]]
                  for r in assoc["rejections"] if r["applies"]]
    text = [f"""#### 3.2.3 Association Acceptance Policy [A.4.2.1.4]

`{ae}` accepts associations from any peer address (a known AE of `PACS_ACCESS_FILE`
with an address only from that one), within the limits of 3.2.2.2.  It rejects an
A-ASSOCIATE-RQ (PS3.8 9.3.4) as follows:

{_table(["Condition", "Result", "Source", "Reason/Diag."], rejections)}

A connection that sends no A-ASSOCIATE-RQ within the ARTIM timeout
({_seconds(assoc['artim_timeout'])}, `PACS_ARTIM_TIMEOUT`; PS3.8 9.1.2) is closed; an
association silent for the DIMSE timeout ({_seconds(assoc['dimse_timeout'])},
`PACS_DIMSE_TIMEOUT`) is aborted, and so is one whose PDU does not arrive whole, or whose
peer does not take what the node writes, within that timeout plus one second per
{assoc['transfer_min_rate'] // 1024} KiB moved (a transfer that keeps moving at that rate
goes on).

User Identity negotiation is {_answered(assoc, 'user_identity')} (an association that
proposes it is accepted without a response item when it is not answered); SOP Class
Common Extended Negotiation is {_answered(assoc, 'sop_class_common_extended')}.

##### 3.2.3.1 Accepted Presentation Contexts

Each table lists SOP Classes accepted with the same transfer syntaxes.  **Selection
rule:** in each proposed presentation context the node accepts the first transfer
syntax of *its* list (the order of the table) that the requestor proposed in that
context (PS3.8 9.3.3.2 leaves the choice to the acceptor); the requestor's order does
not matter.  One exception: in the storage contexts of a SOP Class whose SCP role the
requestor takes by SCP/SCU Role Selection (a C-GET's, PS3.7 D.3.3.4), when no context
of that class would otherwise get an uncompressed syntax and one proposes one,
Explicit VR Little Endian, then Implicit VR Little Endian, come first: the node sends
each object as stored or decompressed to those (it never compresses), so that every
object it can decode reaches that requestor.  A context that proposes none of them is
rejected (transfer syntaxes not supported); a SOP Class not listed is rejected
(abstract syntax not supported)."""]
    for number, (service, members) in enumerate(_groups(data["presentation_contexts"]), 1):
        syntaxes = members[0]["transfer_syntaxes"]
        role = ("SCP; the requestor may take the SCP role through SCP/SCU Role Selection "
                "(PS3.7 D.3.3.4), for the C-STORE sub-operations of C-GET"
                if members[0]["role_selection"] else "SCP")
        classes = _table(["Abstract Syntax", "UID"],
                         [[cx["name"], cx["sop_class"]] for cx in members])
        order = _table(["Preference", "Transfer Syntax", "UID"],
                       [[i, _name(ts), ts] for i, ts in enumerate(syntaxes, 1)])
        caption = f"{service}: {len(members)} abstract syntax(es), role {role}"
        text.append(f"""Table 3-{number + 1}. {caption}

{classes}

Table 3-{number + 1}b. {service}: transfer syntaxes, in the order of preference

{order}""")
    return "\n\n".join(text)


def _initiation_text(data: dict[str, Any]) -> str:
    init = data["initiation"]
    ext = data["extended_negotiation"]
    destinations = init["destinations"]
    dest_text = (_table(["AE Title", "Host", "Port", "TLS"],
                        [[d["ae_title"], d["host"], d["port"], _yes(d["tls"])]
                         for d in destinations])
                 if destinations else "None configured: every C-MOVE is answered A801.")
    ext_rows = [[e["name"], "; ".join(f"{name}: {_yes(flag)}"
                                      for name, flag in e["supported"].items())
                 if e["answered"] else "not answered (none supported)"] for e in ext]
    targets = ", ".join(f"{_name(ts)} ({ts})" for ts in init["conversion_targets"])
    decodable = ", ".join(f"{ts}" for ts in init["decodable_syntaxes"])
    return f"""##### 3.2.3.2 Extended Negotiation

SOP Class Extended Negotiation (PS3.4 C.5; C-FIND: Table C.5-2): the node answers,
for each information model, what it supports of what was asked.

{_table(["SOP Class", "Supported (when asked)"], ext_rows)}

##### 3.2.3.3 SOP Specific Conformance

- **Verification** (PS3.4 A): C-ECHO is answered Success, or `0124` (Refused: not
  authorized) when the calling AE has no `echo` right (7.2).
- **Storage** (PS3.4 B, level 2 (Full) storage: every element is kept): objects are
  stored byte for byte as received, in the transfer syntax of the presentation context,
  with the file meta information added; a C-STORE is answered only once the object and
  its index row are durable.  A different object under a stored SOP Instance UID
  follows `PACS_DUPLICATE_POLICY` (the same data set in another transfer syntax is a
  different object).  Objects larger than `PACS_MAX_OBJECT_BYTES` are refused (A700); a
  data set holding File Meta Information elements (group 0002, PS3.5 7.1), or whose
  Pixel Data is encoded otherwise than its transfer syntax says (encapsulated under a
  native one or the other way round, PS3.5 A.4), or is native and shorter than the
  frames its image attributes declare (PS3.5 8.1.1), is refused (C000).
- **Query/Retrieve** (PS3.4 C): C-FIND on the levels of each model (PATIENT on Patient
  Root only, STUDY, SERIES, IMAGE) with single value, UID list, universal, wildcard,
  range and sequence matching (the matching items returned); person names match per
  component group, {data['character_sets']['person_name_matching']}
  (`PACS_PN_CASE_SENSITIVE`): a wildcard value naming groups with `=` (`=山田*`) matches
  those groups, one without `=` any one group; each name of a multi-valued attribute
  matches alike; a wildcard matches one value of a multi-valued attribute, never across
  its `\\`; a stored time of fewer digits (`HHMM`) is its first moment.  Missing
  unique keys above the query level are taken as universal; one present holds one value
  unless relational queries were negotiated (A900 otherwise).  With relational queries,
  keys of levels below the query level are matched (an entity matches when one of its
  descendants does) and answered zero-length: one entity has no single value of them
  (PS3.4 C.4.1.1.3.2).  In Study Root, Patient ID
  is a Required Key of the Study level, matched with wildcards and lists like any other,
  and a study that holds none matches any value of it (C.2.2.1.2).  Negotiated multiple
  value matching requires every value of a multi-valued key of the VRs of C.2.2.2.8 to
  match; the values of other keys stay alternatives.
  More than
  `PACS_QUERY_MAX_ROWS` matches, or a query past `PACS_QUERY_TIME_LIMIT`, is refused
  (A700).  {_bounds_text(data)}
  C-MOVE and C-GET match the unique keys of their identifier by value (a UID list at
  the retrieve level): one holding `*` or `?` is refused (A900), never a wildcard.
  C-MOVE sends to the configured destinations only; C-GET sends over the
  requestor's association in the storage contexts it proposed with the SCP role.
  A request whose Affected SOP Class UID is not its presentation context's is refused
  with 0122 (Refused: SOP Class not supported): it is served in the information model
  negotiated for its context only.
  {_pending_text(data)}
{_commitment_text(data)}

#### 3.2.4 Association Initiation Policy [A.4.2.1.3]

`{data['network']['ae_title']}` initiates associations only for the C-STORE
sub-operations of a C-MOVE, to the destination the request names; for forwarding
(`PACS_ROUTES`, `pacs send`: one association per batch of at most `PACS_FORWARD_BATCH`
objects, the same presentation contexts and transfer syntax choice as a C-MOVE, each
object sent again after a C-STORE failure status A7xx or no response, kept as failed
after any other failure status); and for storage
commitment results whose requestor has no quiet association open (3.2.3.3), to the
requestor's address in `PACS_MODALITIES`, proposing the Storage Commitment Push Model
in {", ".join(f"{_name(ts)} ({ts})" for ts in data['storage_commitment']['report_syntaxes'])}
with SCP/SCU Role Selection for the SCP role (PS3.4 J.3.3.1.3).

On these associations, and for the sub-operations of a C-GET, a request is answered only
by the response of its type whose Message ID Being Responded To is its Message ID (PS3.7
9.3.1.2, 10.3.1.2): anything else, no response within `PACS_DIMSE_TIMEOUT`, or a PDU
that cannot be read aborts the association (the sub-operation fails, and those not yet
sent with it; a forwarded object or a storage commitment result is sent again later).
A C-STORE response status counts as success (0000), warning (0001, 0107, 0111, 0116,
Bxxx) or, any other code, failure.

C-MOVE destinations and storage commitment requestors (`PACS_MODALITIES`):

{dest_text}

**Proposed presentation contexts:** one context per (SOP Class, transfer syntax) of the
objects to send: first each object's stored transfer syntax, then, for each SOP Class,
{targets}; at most {init['max_contexts']} contexts (beyond that the last are dropped and
objects without an accepted context fail as sub-operations).  Maximum PDU size
received: {_bytes(init['max_pdu'])}.  An acceptor whose Maximum Length is below
{init['min_peer_pdu']} bytes (0, no maximum, aside) is sent an A-ABORT before anything
else: what was to be sent on the association fails as if it had been refused.

**Transfer syntax of each sub-operation** (C-MOVE and C-GET): the stored syntax when the
peer accepted it for the SOP Class; otherwise the object is decompressed to the first of
{targets} the peer accepted.  Objects can be converted from these stored transfer
syntaxes: {decodable}.  An object that can be sent in neither way fails as a
sub-operation (counted in the Failed SOP Instance UID List)."""


def _pending_text(data: dict[str, Any]) -> str:
    """How often a C-MOVE or C-GET reports its progress (PS3.4 C.4.2.3.1, C.4.3.3.1)."""
    interval = data["initiation"]["pending_interval"]
    if interval <= 0:
        return ("A pending response with the sub-operation counts follows every "
                "sub-operation (`PACS_PENDING_INTERVAL` 0).")
    return (f"A pending response with the sub-operation counts follows a sub-operation "
            f"once {interval:g} s have passed since the request or the last one "
            f"(`PACS_PENDING_INTERVAL`): a short retrieve has none.")


def _commitment_text(data: dict[str, Any]) -> str:
    sc = data["storage_commitment"]
    reasons = _table(["Failure Reason (0008,1197)", "When"],
                     [[code, why] for code, why in sc["failure_reasons"].items()])
    return f"""- **Storage Commitment** (PS3.4 J, Push Model): an N-ACTION (Action Type 1, the
  well-known instance) is answered Success once the request is recorded in the index,
  durably: a restart does not lose it.  It is refused with 0122 (on a presentation
  context of another abstract syntax), 0118 (another SOP Class),
  0112 (another SOP Instance), 0123 (another action), 0115 (no or unreadable Action
  Information, no valid Transaction UID, no reference, a reference without valid UIDs,
  the Transaction UID of a waiting request of the requestor's with other references:
  PS3.3 C.14.1.1's 0131 case; a request repeating a waiting one, references and all, is
  answered Success and by that one's report),
  0213 (more than {sc['max_references']} references, `PACS_COMMITMENT_MAX_REFERENCES`;
  or {sc['max_pending']} results waiting, `PACS_COMMITMENT_MAX_PENDING`, a tenth of them
  and at least ten for one requestor's AE title, a quarter for one network address),
  0110 (the request could not be recorded).  Each referenced instance is committed when
  the index holds it under the same SOP Class UID and its stored object is the one
  acknowledged (SHA-256 and size, read back from the store); otherwise it is listed in
  the Failed SOP Sequence with a Failure Reason of PS3.3 C.14.1.1 (table below).  Before
  each delivery attempt the committed instances are looked up in the index again: one
  removed since (a rejection note, a deletion, a retention expiry) is reported failed
  (0112), and one stored again since with other content (its SHA-256 is not the one
  verified) too (0110), never committed.  The N-EVENT-REPORT
  (Event Type 1, or 2 when failures exist; Transaction UID, Referenced SOP Sequence with
  the Retrieve AE Title, Failed SOP Sequence) goes on an association of the requestor
  (the one the request came on, or one it opened since, from the address the request
  came from) only when that association is quiet: no PDU either way for
  {_seconds(sc['same_association_quiet'])}, and nothing of a message being read,
  answered or written.  The requestor may go on sending requests
  meanwhile: they are answered, and the report's response is told from them by its
  Message ID Being Responded To.  When no association of the requestor is quiet within
  {_seconds(sc['same_association_wait'])}, the report goes on a new association
  (3.2.4), and only once the requestor accepted the SCP role proposed there.  An
  undelivered result (no association, the SCP role not accepted, no response, 0110 or
  0213) is tried again after {_seconds(sc['retry_first'])}, then after twice the
  previous delay, up to {_seconds(sc['retry_max'])}, until the requestor answers Success
  (or a warning), for {_seconds(sc['keep'])} after the request at most
  (`PACS_COMMITMENT_KEEP`): then it is dropped (logged), never committed, and no longer
  counts against the requestor's share of the results waiting; any other failure status
  (PS3.7 10.1.1.1.8) drops it (logged), never committed.  A requestor whose AE title is
  not in `PACS_MODALITIES` can be reached on its own associations only: its result is
  tried again on them, and on the next one it opens as soon as it does, for
  {_seconds(sc['keep_unreachable'])} after the request (or `PACS_COMMITMENT_KEEP`, when
  shorter), then dropped (logged), never committed.  With `PACS_DIMSE_SEAM=off` reports
  go on new associations only.  Storage Media File-Set ID and UID are neither used nor sent;
  objects are kept until an operator deletes them.

{reasons}"""


def _network_interfaces(data: dict[str, Any]) -> str:
    net = data["network"]
    return f"""### 3.3 Network Interfaces [A.4.3]

DICOM upper layer over TCP/IP (PS3.8), TCP_NODELAY on every accepted connection.
Listening address `{net['bind_address']}` (`PACS_BIND_ADDRESS`):
{", ".join(net['ip_versions'])}."""


def _configuration(data: dict[str, Any]) -> str:
    net = data["network"]
    assoc = data["association"]
    parameters = [
        ["ARTIM timeout (A-ASSOCIATE-RQ awaited)", _seconds(assoc["artim_timeout"]),
         "PACS_ARTIM_TIMEOUT"],
        ["ACSE timeout", _seconds(assoc["acse_timeout"]), "PACS_DIMSE_TIMEOUT"],
        ["DIMSE timeout", _seconds(assoc["dimse_timeout"]), "PACS_DIMSE_TIMEOUT"],
        ["Network timeout", _seconds(assoc["network_timeout"]), "PACS_DIMSE_TIMEOUT"],
        ["Connection timeout (C-MOVE destinations)",
         _seconds(assoc["connection_timeout"]), "PACS_DIMSE_TIMEOUT"],
        ["Maximum PDU size received", _bytes(assoc["max_pdu_receive"]), "PACS_MAX_PDU"],
        ["Simultaneous associations per worker", assoc["max_associations_per_worker"],
         "PACS_MAX_ASSOCIATIONS"],
        ["Simultaneous associations per peer address per worker",
         assoc["max_associations_per_host_per_worker"], "PACS_MAX_ASSOCIATIONS_PER_HOST"],
        ["Share of a worker's associations per customer (several customers)",
         assoc["customer_association_share"], "PACS_CUSTOMER_ASSOCIATION_SHARE"],
        ["Pending connections per worker", assoc["max_pending_connections_per_worker"],
         "PACS_MAX_PENDING_CONNECTIONS"],
    ]
    return f"""### 3.4 Configuration [A.4.4]

#### 3.4.1 AE Title / Presentation Address Mapping [A.4.4.1]

{_table(["Application Entity", "AE Title", "TCP Port", "Settings"], _ports(net))}

Remote AEs: any peer may associate (unless `PACS_ALLOWED_CALLING_AETS` limits the
calling AE titles); C-MOVE destinations are configured (3.2.4).

#### 3.4.2 Parameters [A.4.4.2]

{_table(["Parameter", "Value", "Setting"], parameters)}"""


def _ports(net: dict[str, Any]) -> list[list[object]]:
    """The AE title / port rows: the plain port and the TLS port, where on."""
    rows: list[list[object]] = []
    if net["dimse_port"]:
        rows.append(["DIMSE SCP", net["ae_title"], net["dimse_port"],
                     "PACS_AE_TITLE, PACS_DIMSE_PORT"])
    if net["dimse_tls_port"]:
        rows.append(["DIMSE SCP (TLS)", net["ae_title"], net["dimse_tls_port"],
                     "PACS_AE_TITLE, PACS_DIMSE_TLS_PORT"])
    return rows


def _offer_rows(offers: Sequence[dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for offer in offers:
        syntaxes = ", ".join(f"`{ts}`" for ts in offer["transfer_syntaxes"]) or "-"
        notes = []
        if offer["default"]:
            notes.append("default")
        if offer["default_syntax"]:
            notes.append(f"without a transfer-syntax: {offer['default_syntax']}")
        if offer["stored_syntaxes"] is not None:
            notes.append("objects stored in " + ", ".join(offer["stored_syntaxes"])
                         + " (sent as stored)")
        if offer["levels"] is not None:
            notes.append("routes ending " + ", ".join(f"`{lv}`" for lv in offer["levels"]))
        rows.append([f"`{offer['media_type']}`", syntaxes, "; ".join(notes) or "-"])
    return rows


def _relative(routes: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    """The routes below the first prefix, without it (the others repeat them)."""
    first, others = prefixes[0], [p for p in prefixes[1:] if p != prefixes[0]]
    return [route[len(first):] for route in routes if route.startswith(first)
            and not any(route.startswith(p + "/") for p in others if len(p) > len(first))]


def _bounds_text(data: dict[str, Any]) -> str:
    bounds = data["query_bounds"]
    return (f"A query with more than {bounds['max_values']} values to match (the UIDs of "
            f"UID lists aside), more than {bounds['max_uids']} UIDs in its UID lists, or "
            f"a value longer than {bounds['max_value_characters']} characters is refused "
            "(C000, Unable to process: the SCU splits it; QIDO-RS: 400).")


def _web(data: dict[str, Any]) -> str:
    web = data["dicomweb"]
    prefixes = ", ".join(f"`{p or '/'}`" for p in web["prefixes"])
    viewer = (f"and, when the OHIF viewer's files are installed, under `/dicom-web` of "
              f"the viewer port {web['viewer_port']} (`PACS_VIEWER_PORT`)"
              if web["viewer_port"] else "")
    text = [f"""## 4 Web Services [PS3.18; PS3.2 example statements' web service tables]

The DICOMweb origin server listens on port {web['port']} (`PACS_WEB_PORT`) {viewer}.
Every route answers under each prefix: {prefixes}; the routes below are relative to a
prefix.  Media types are negotiated from the Accept header, or from the `accept`
query parameter, which replaces it (PS3.18 8.3.3.1); `*/*` or no Accept gets the
default.  A request whose Accept allows none of a resource's media types is answered
406; an unknown study, series, instance or frame 404.  JSON answers are also given to
an Accept of {", ".join(f"`{t}`" for t in web["json_accept"])}, with the Content-Type
`{dicomjson.MEDIA_TYPE}`.  Character set of every JSON answer:
{data['character_sets']['dicomweb']} (UTF-8)."""]
    for number, resource in enumerate(web["resources"], 1):
        routes = _relative(resource["routes"], web["prefixes"])
        routes_text = "\n".join(f"- `{resource['method']} {route.replace(':path}', '}')}`"
                                for route in routes)
        request = ""
        if "request_media_types" in resource:
            request = ("\n\nRequest bodies: "
                       + ", ".join(f"`{t}`" for t in resource["request_media_types"])
                       + "; any other Content-Type is answered 415.")
        if "notes" in resource:
            request += "\n\n" + resource["notes"]
        title = f"{resource['name']} ({resource['transaction']}, {resource['section']})"
        offers = ("\n\n" + _table(["Media type", "transfer-syntax values", "Notes"],
                                  _offer_rows(resource["media_types"]))
                  if resource["media_types"] else "")
        text.append(f"""### 4.{number} {title}

{routes_text}{request}{offers}""")
    return "\n\n".join(text)


def _media() -> str:
    return """## 5 Media Interchange [PS3.2 A.5]

None: the node reads no DICOM media.  (`pacs import` and the upload folder take Part 10
files through the C-STORE ingest path.)"""


def _charsets(data: dict[str, Any]) -> str:
    sets = data["character_sets"]
    return f"""## 6 Support of Character Sets [PS3.2 A.7]

C-FIND SCP: requests are decoded, and responses encoded, in any of these values of
Specific Character Set (0008,0005), single-byte, ISO 2022 code extensions and
multi-byte alike (PS3.5 6.1):

{", ".join(f"`{term}`" for term in sets["c_find"])}

Response character set: {sets["c_find_response_rule"]} (PS3.4 C.4.1.1.3.2).  Person
names match per component group (alphabetic, ideographic, phonetic) and
{sets["person_name_matching"]}.  Stored objects keep their own character set (they are
stored as received); the index holds their values decoded.  DICOMweb answers are
{sets["dicomweb"]} (UTF-8)."""


def _failed_logins_text(sec: dict[str, Any]) -> str:
    """What the conformance statement says of failed logins (:mod:`pacs.core.logins`)."""
    limit = sec["dicomweb_failed_logins"]
    if not limit["failures"]:
        return "; failed logins are not limited (`PACS_AUTH_FAILURES=0`)"
    return (f"; after {limit['failures']} failed logins within {limit['window_seconds']:g} s "
            "from one client address (or for one user name, from the addresses that "
            "failed), requests with credentials from there get 429 with Retry-After, "
            "their credentials not checked, until the window passes "
            "(`PACS_AUTH_FAILURES`, `PACS_AUTH_WINDOW`)")


def _security_text(data: dict[str, Any]) -> str:
    sec = data["security"]
    calling = (", ".join(f"`{a}`" for a in sec["calling_ae_titles"])
               if sec["calling_ae_titles"] else
               "any, with the rights of `PACS_UNKNOWN_AE_RIGHTS` ("
               + (", ".join(sec["unknown_ae_rights"]) or "none") + ") unless known"
               if sec["unknown_ae_rights"] else "none")
    if sec["dicomweb_open"]:
        access = "every request is answered without credentials (`PACS_WEB_OPEN=true`)"
    else:
        ways = [w for w, on in (("HTTP Basic", sec["dicomweb_basic"]),
                                ("a bearer token", sec["dicomweb_bearer"])) if on]
        access = ("requests from the node's own host (loopback) that name it in their "
                  "Host header (a loopback name or address"
                  + "".join(f", `{h}`" for h in sec["dicomweb_hosts"])
                  + "; `PACS_WEB_HOSTS`) are answered without credentials, with the roles "
                  "of `PACS_LOOPBACK_ROLES` ("
                  + (", ".join(sec["dicomweb_loopback_roles"]) or "none") + "); requests from "
                  "other hosts only over HTTPS (over plain HTTP: 403, their credentials "
                  "never compared) and with "
                  + (" or ".join(ways) if ways else
                     "credentials, of which none are configured, so they are refused")
                  + "; a request needs a role: read for GET (QIDO-RS, WADO-RS, the "
                  "viewer), write for POST (STOW-RS; a part that would replace a "
                  "different object under a stored SOP Instance UID takes admin too, "
                  "FailureReason 0111 otherwise), admin for DELETE (401 with a "
                  "challenge without valid credentials, 403 for a user without the role; "
                  "users and their roles: `PACS_ACCESS_FILE`)" + _failed_logins_text(sec))
    cors = (", ".join(f"`{o}`" for o in sec["cors_origins"]) if sec["cors_origins"]
            else "none (no CORS headers)")
    if "*" in sec["cors_origins"]:
        cors += (" (any origin reads answers to requests with a user's credentials only, "
                 "never those given for the address alone)")
    audit = ("audit messages of PS3.15 A.5 (Query, DICOM Instances Transferred / "
             "Accessed, Begin Transferring, Security Alert) for every association and "
             "DICOMweb request that touches patient data, User Authentication for each "
             "failed DICOMweb login, Import for each `pacs import` and each scan of the "
             "upload folder that stored or rejected files, Audit Log Used for each "
             "reading of the trail by `pacs audit`, as JSON lines in `PACS_AUDIT_LOG`, "
             "shipped as RFC 5424 syslog by `pacs audit --syslog` (over TLS, RFC 5425, "
             "with `--tls`)"
             if sec["audit_trail"] else "no audit trail (`PACS_AUDIT_LOG=off`)")
    if sec["dicomweb_https"]:
        transport = ("HTTPS only on the DICOMweb and viewer ports (`PACS_TLS_CERT`), "
                     "the profile above"
                     + ("; client certificates of `PACS_TLS_CA` asked for, not required"
                        if sec["dicomweb_client_certificates"] else ""))
    else:
        transport = ("plain HTTP on the DICOMweb and viewer ports (no `PACS_TLS_CERT`): "
                     "only the node's own host may send credentials")
    return f"""## 7 Security [PS3.2 A.8]

### 7.1 Security Profiles [A.8.1]

TLS profile: the {TLS_PROFILE}: TLS 1.2 or 1.3, TLS 1.2 with ECDHE and AEAD
ciphers only (AES-GCM, ChaCha20-Poly1305), no compression or renegotiation.

DIMSE: {_dimse_transport(sec)}.  DICOMweb: {transport}.  Audit: {audit}.  Storage is
bit-preserving: objects are kept and, when the peer accepts their stored transfer
syntax, sent byte for byte as received, so Digital Signatures stay intact; an object
converted to another transfer syntax for a peer loses their validity.

### 7.2 Association Level Security [A.8.2]

- Called AE Title checked: {_yes(sec["called_ae_title_checked"])}.
- Calling AE Titles allowed: {calling}.  Rights per AE (echo, store, overwrite,
  reject, find, retrieve) come from `PACS_ACCESS_FILE`; an operation the calling AE has
  no right to (an IOCM rejection note without the reject right included) is refused
  with 0124 (Refused: not authorized, PS3.7 C.5.21), a store
  that would replace a different object without the overwrite right with 0111; an
  AE with no rights, a known AE from another address, or one known to associate over
  DICOM TLS only calling on the plain port, is rejected (A-ASSOCIATE-RJ, calling AE
  title not recognized).
- C-MOVE destinations: only known AEs with an address and a port
  (`PACS_MODALITIES`, `PACS_ACCESS_FILE`); an AE known on a network only for its own
  C-MOVEs, at the address it calls from; any other is refused (A801).
- Limits per peer address and per worker process (3.2.2.2).

### 7.3 Application Level Security [A.8.3]

DICOMweb: {access}.  Browser origins allowed (CORS, `PACS_CORS_ORIGINS`): {cors}; a
request that would change data from a page of another origin (its `Origin` neither the
node's nor listed by name, or `Sec-Fetch-Site` cross-site or same-site): 403.
Every answer carries `X-Content-Type-Options: nosniff` and a sandboxing
Content-Security-Policy."""


def _dimse_transport(sec: dict[str, Any]) -> str:
    """What the DIMSE ports speak, for 7.1."""
    if not sec["dimse_tls"]:
        return ("plain TCP only; DICOM TLS with the profile above is served on "
                "`PACS_DIMSE_TLS_PORT` (2762 is the registered port) when it is set")
    text = (f"DICOM TLS on port {sec['dimse_tls_port']} (`PACS_DIMSE_TLS_PORT`) with "
            "the profile above, " + ("beside the plain port" if sec["dimse_plain"]
                                     else "the plain port off (`PACS_DIMSE_PORT=0`)"))
    if sec["dimse_client_certificates"]:
        text += ("; client certificates of `PACS_DIMSE_TLS_CA` required, their subject "
                 "CN the calling AE title (any other: A-ASSOCIATE-RJ, rejected "
                 "permanent, calling AE title not recognized)")
    return text + "; C-MOVE destinations marked TLS are reached over TLS, verified"


def render(data: dict[str, Any], fmt: str) -> str:
    """The statement in ``fmt``: ``markdown`` or ``json``."""
    return to_json(data) if fmt == "json" else markdown(data)


__all__ = ["FIND_EXTENDED_BYTES", "RETRIEVE_EXTENDED_BYTES", "markdown", "render",
           "statement", "to_json"]
