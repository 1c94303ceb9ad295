"""Settings: read once, from the environment and ``.env``, into a frozen object.

Precedence, lowest first: defaults < ``.env`` in the working folder < environment
variables < explicit overrides (CLI flags).  Every setting lives in :data:`SETTINGS`
with its default and help text; ``.env.example`` and the README table are checked
against that table by the tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from pacs.core import access
from pacs.core.access import Tables
from pacs.core.errors import ConfigError
from pacs.core.routes import Route, load_routes


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _token(value: str) -> str:
    """A bearer token, never one a client sends for none (``None``, ``null``): a
    request carrying such a header is taken as carrying no credentials."""
    if value and value.strip().lower() in access.PLACEHOLDER_TOKENS:
        raise ValueError(f"{value!r} is what clients send for no token: choose another "
                         "(pacs passwd --token makes one)")
    return value


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser of ``kind`` that refuses zero, negative and non-finite values (limits,
    timeouts: ``nan`` made a wait of none, and a loop spin)."""
    def parse(value: str) -> Any:
        number = kind(value)
        if not number > 0 or not math.isfinite(number):
            raise ValueError(f"must be a finite number greater than 0, got {value!r}")
        return number

    return parse


def _not_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser of ``kind`` that refuses negative and non-finite values (0 turns its
    limit off)."""
    def parse(value: str) -> Any:
        number = kind(value)
        if not number >= 0 or not math.isfinite(number):
            raise ValueError(f"must be a finite number, 0 or more, got {value!r}")
        return number

    return parse


#: The shortest time between two scans of the upload folder (a shorter one is a loop
#: that spins).
MIN_POLL = 0.05


def _poll(value: str) -> float:
    """Seconds between scans: 0 (off), or from :data:`MIN_POLL` on, finite."""
    number = _not_negative(float)(value)
    if 0 < number < MIN_POLL:
        raise ValueError(f"must be 0 (off) or at least {MIN_POLL}, got {value!r}")
    return float(number)


#: The log levels ``PACS_LOG_LEVEL`` takes (Python's ``logging``), and the other names
#: ``logging`` gives two of them.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


def _log_level(value: str) -> str:
    level = value.strip().upper()
    level = _LOG_LEVEL_ALIASES.get(level, level)
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _share(value: str) -> float:
    """A share: more than 0, at most 1."""
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(f"must be more than 0 and at most 1, got {value!r}")
    return number


def _port(value: str) -> int:
    """A TCP port, or 0 for none."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"not a port: {value!r}")
    return number


@dataclass(frozen=True)
class RetentionRules:
    """Retention periods in days: per modality, and for the others (``None``: kept)."""

    by_modality: tuple[tuple[str, float], ...] = ()
    default: float | None = None

    @property
    def enabled(self) -> bool:
        """True when some study can expire."""
        return bool(self.by_modality) or self.default is not None


#: A Modality (0008,0060) value: CS (PS3.5 6.2).
_MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}")


def parse_retention(text: str) -> RetentionRules:
    """Rules from ``PACS_RETENTION_DAYS`` (:mod:`pacs.core.retention`).

    Raises
    ------
    ValueError
        A period that is not a finite positive number, a modality given twice or that
        is no Modality value (CS: upper-case letters, digits, space, underscore; 16 at
        most), or two bare numbers.
    """
    by_modality: dict[str, float] = {}
    default: float | None = None
    for item in filter(None, (part.strip() for part in text.split(","))):
        modality, sep, days = item.rpartition("=")
        period = float(days)
        if not period > 0 or not math.isfinite(period):
            raise ValueError(f"retention periods must be more than 0 days: {item!r}")
        if not sep:
            if default is not None:
                raise ValueError("one period without a modality at most")
            default = period
            continue
        name = modality.strip().upper()
        if not _MODALITY.fullmatch(name) or name in by_modality:
            raise ValueError(f"expected MODALITY=DAYS once per modality: {item!r}")
        by_modality[name] = period
    return RetentionRules(tuple(sorted(by_modality.items())), default)


def _retention(value: str) -> str:
    """``PACS_RETENTION_DAYS`` as given, once :func:`parse_retention` reads it."""
    parse_retention(value)
    return value.strip()


def _rights(value: str) -> frozenset[str]:
    return access.parse_set(value, access.AE_RIGHTS, "right")


def _roles(value: str) -> frozenset[str]:
    return access.parse_set(value, access.ROLES, "role")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return parse


#: SQLite refuses a blob over 1,000,000,000 bytes (SQLITE_MAX_LENGTH).
SQLITE_MAX_BLOB = 1_000_000_000


#: The default of ``PACS_INTAKE_OBJECT_BYTES`` per store (see :attr:`Settings.intake_limit`).
INTAKE_OBJECT_BYTES = {"file": 256 << 10, "s3": 64 << 20}


def _intake_object_bytes(value: str) -> int | None:
    if not value.strip():
        return None  # the store's default
    number = int(value)
    if not 0 <= number < SQLITE_MAX_BLOB:
        raise ValueError(f"must be 0 or more and below {SQLITE_MAX_BLOB} (SQLite's "
                         f"largest blob), got {value!r}")
    return number


@dataclass(frozen=True)
class Setting:
    """One configurable value: its environment name, default and meaning."""

    env: str
    attr: str
    default: str
    help: str
    parse: Callable[[str], Any] = str
    secret: bool = False


#: Every setting of the node.  The single source for parsing, ``pacs config``,
#: ``.env.example`` and the README's table.
SETTINGS: tuple[Setting, ...] = (
    Setting("CUSTOMER", "customer", "default",
            "Customer name; each customer has its own data folder, index and key prefix."),
    Setting("PACS_DATA_DIR", "data_dir", "",
            "Data folder (index, objects, uploads); empty means ./customer/<CUSTOMER>.  "
            "With PACS_CUSTOMERS_FILE: the folder holding one data folder per customer "
            "(empty means ./customer)."),
    Setting("PACS_CUSTOMERS_FILE", "customers_file", "",
            "TOML file of the customers one node serves (each its called AE titles, host "
            "names, data folder, store, move destinations; README, 'Several customers'); "
            "empty: the one customer CUSTOMER."),
    Setting("PACS_AE_TITLE", "ae_title", "INTELPIXEL", "Called AE title of the DIMSE SCP."),
    Setting("PACS_DIMSE_PORT", "dimse_port", "32773",
            "DIMSE listening port (plain TCP); 0 turns it off (DICOM TLS only, "
            "PACS_DIMSE_TLS_PORT).", _port),
    Setting("PACS_DIMSE_TLS_PORT", "dimse_tls_port", "0",
            "DICOM TLS listening port (2762 is the registered one), beside the plain "
            "one, same AE title and limits; 0: none.  Needs PACS_DIMSE_TLS_CERT or "
            "PACS_TLS_CERT.", _port),
    Setting("PACS_DIMSE_TLS_CERT", "dimse_tls_cert", "",
            "PEM certificate (chain) of DICOM TLS, with PACS_DIMSE_TLS_KEY: the TLS port "
            "presents it, and TLS C-MOVE destinations get it as client certificate; "
            "empty: PACS_TLS_CERT and PACS_TLS_KEY."),
    Setting("PACS_DIMSE_TLS_KEY", "dimse_tls_key", "",
            "PEM private key of PACS_DIMSE_TLS_CERT (not encrypted)."),
    Setting("PACS_DIMSE_TLS_CA", "dimse_tls_ca", "",
            "PEM certificates of the authorities of DICOM TLS peers: clients of the TLS "
            "port must then present a certificate they signed whose subject CN is the "
            "calling AE title, and TLS C-MOVE destinations are verified against them; "
            "empty: no client certificate asked, destinations verified against the "
            "system's authorities."),
    Setting("PACS_BIND_ADDRESS", "bind_address", "0.0.0.0",
            "Address the DIMSE and HTTP listeners bind to."),
    Setting("PACS_WEB_PORT", "web_port", "5985", "DICOMweb port.", _port),
    Setting("PACS_WEB_WORKERS", "web_workers", "0",
            "DICOMweb (gunicorn) worker processes; 0 means one per CPU.", _not_negative(int)),
    Setting("PACS_WEB_THREADS", "web_threads", "4",
            "Threads per DICOMweb worker process.", _positive(int)),
    Setting("PACS_WEB_ANALYSERS", "web_analysers", "1",
            "Helper processes per DICOMweb worker that parse STOW-RS parts (0: in the "
            "worker itself).", _not_negative(int)),
    Setting("PACS_WEB_USER", "web_user", "",
            "User name for HTTP Basic access to DICOMweb and the viewer (with "
            "PACS_WEB_PASSWORD): a user with every role, besides those of "
            "PACS_ACCESS_FILE; requests from this host need no credentials "
            "(PACS_LOOPBACK_ROLES)."),
    Setting("PACS_WEB_PASSWORD", "web_password", "",
            "Password for HTTP Basic access to DICOMweb.", secret=True),
    Setting("PACS_WEB_TOKEN", "web_token", "",
            "Bearer token accepted for DICOMweb access (the user 'token', every role), "
            "besides the tokens of PACS_ACCESS_FILE.", _token, secret=True),
    Setting("PACS_WEB_OPEN", "web_open", "false",
            "Answer DICOMweb requests from any host without credentials (trusted "
            "networks only) when they name this node: an address, localhost or one of "
            "PACS_WEB_HOSTS (another name: 421).", _bool),
    Setting("PACS_WEB_HOSTS", "web_hosts", "",
            "Host names (comma list) that also name this node, besides localhost and "
            "loopback addresses: only requests naming one of them get the loopback rule "
            "(a reverse proxy's public name only when the proxy does its own access "
            "control: every request it forwards then gets the loopback roles).",
            _comma_list),
    Setting("PACS_WEB_DELETE", "web_delete", "false",
            "Allow removing studies, series and instances through DICOMweb (DELETE, the "
            "reject routes OHIF calls, an IOCM rejection note over STOW-RS) for requests "
            "the access rule admits with the admin role; false answers them 403 (a note: "
            "FailureReason 0124).", _bool),
    Setting("PACS_CORS_ORIGINS", "cors_origins", "",
            "Browser origins allowed to call DICOMweb (CORS): comma list, or * for any (which "
            "reads only answers to credentials); empty allows none.", _comma_list),
    Setting("PACS_TLS_CERT", "tls_cert", "",
            "PEM certificate (chain) of the DICOMweb and viewer ports, with PACS_TLS_KEY: "
            "both ports then serve HTTPS only; empty: plain HTTP."),
    Setting("PACS_TLS_KEY", "tls_key", "",
            "PEM private key of PACS_TLS_CERT (not encrypted; readable by the node's user "
            "only)."),
    Setting("PACS_TLS_CA", "tls_ca", "",
            "PEM certificates of the authorities whose client certificates the HTTPS "
            "ports accept: a client may present one, one they did not sign fails the "
            "handshake; empty asks for none."),
    Setting("PACS_QIDO_DEFAULT_LIMIT", "qido_default_limit", "5000",
            "Results per QIDO-RS page when the request gives no limit (at most "
            "PACS_QUERY_MAX_ROWS).", _positive(int)),
    Setting("PACS_VIEWER_PORT", "viewer_port", "8080",
            "OHIF viewer port (the viewer at /, DICOMweb under /dicom-web); 0 turns the "
            "viewer off.", _port),
    Setting("PACS_VIEWER_DIST", "viewer_dist", "",
            "Folder of the prebuilt OHIF viewer (scripts/fetch-ohif.sh); empty means "
            "vendor/ohif/dist of the source checkout, then "
            "<sys.prefix>/share/pacs/ohif/dist."),
    Setting("PACS_VIEWER_WORKERS", "viewer_workers", "1",
            "Viewer server (gunicorn) worker processes, each with PACS_WEB_THREADS threads.",
            _positive(int)),
    Setting("PACS_UPLOADS_DIR", "uploads_path", "",
            "Upload folder watched for dropped DICOM files; empty means <data folder>/uploads. "
            "Outside the data folder, or inside its uploads folder (the node's own files "
            "elsewhere in it are refused)."),
    Setting("PACS_UPLOADS_POLL", "uploads_poll", "2",
            "Seconds between scans of the upload folder (at least 0.05); 0 turns the "
            "watcher off.", _poll),
    Setting("PACS_UPLOADS_AFTER_STORE", "uploads_after_store", "delete",
            "What happens to an uploaded file once stored: delete, or archive (moved to "
            "<upload folder>/archive/).", _choice("delete", "archive")),
    Setting("PACS_STORAGE", "storage", "file",
            "Object store: 'file' (folder inside the data folder) or 's3' (MinIO or any S3).",
            _choice("file", "s3")),
    Setting("PACS_S3_ENDPOINT", "s3_endpoint", "localhost:9000",
            "S3 endpoint as host:port (no scheme)."),
    Setting("PACS_S3_ACCESS_KEY", "s3_access_key", "", "S3 access key.", secret=True),
    Setting("PACS_S3_SECRET_KEY", "s3_secret_key", "", "S3 secret key.", secret=True),
    Setting("PACS_S3_BUCKET", "s3_bucket", "pacs",
            "S3 bucket; objects go under the prefix <CUSTOMER>/ and it is created when missing "
            "(for an index that lists no instance)."),
    Setting("PACS_S3_SECURE", "s3_secure", "false", "Use HTTPS to reach S3.", _bool),
    Setting("PACS_S3_REGION", "s3_region", "us-east-1", "S3 region."),
    Setting("PACS_S3_SETTLE", "s3_settle", "600",
            "Seconds an object whose write S3 did not answer (or whose write was in "
            "flight when the intake's mover died) waits in the intake before it is "
            "written again: longer than S3 may take to carry out a request it received.",
            _positive(float)),
    Setting("PACS_MODALITIES", "modalities", "",
            "Known remote AEs: C-MOVE and forwarding destinations, and where storage "
            "commitment results go when no association of the requestor is quiet: "
            "'AET=host:port,AET2=host:port'; ':tls' after the port connects with DICOM "
            "TLS ('AET=host:2762:tls'), as does an AE the access rules mark 'tls = "
            "true'."),
    Setting("PACS_ALLOWED_CALLING_AETS", "allowed_calling_aets", "",
            "Comma list of calling AE titles allowed to associate, each with every right; "
            "when set, other AEs get no rights (whatever PACS_UNKNOWN_AE_RIGHTS says) "
            "unless PACS_ACCESS_FILE lists them; empty allows any.", _comma_list),
    Setting("PACS_ACCESS_FILE", "access_file", "",
            "TOML file of known AEs (title, address, port, rights) and DICOMweb users "
            "(password hash or token hashes from `pacs passwd`, roles); README, "
            "\"Security\"."),
    Setting("PACS_UNKNOWN_AE_RIGHTS", "unknown_ae_rights",
            "echo,store,overwrite,reject,find,retrieve",
            "Rights of a calling AE that PACS_ACCESS_FILE does not list (comma list of "
            "echo, store, overwrite, reject, find, retrieve; empty: none, its "
            "associations are rejected).", _rights),
    Setting("PACS_LOOPBACK_ROLES", "loopback_roles", "read,write,admin",
            "DICOMweb roles of a request from this host without credentials (comma list "
            "of read, write, admin; empty: none, credentials needed).", _roles),
    Setting("PACS_AUTH_FAILURES", "auth_failures", "10",
            "Failed DICOMweb logins (a wrong password or token) within PACS_AUTH_WINDOW "
            "after which further requests with credentials from that client address (or "
            "for that user name, from addresses that failed) get 429 with Retry-After, "
            "their credentials unchecked, until the window passes; counted in each web "
            "worker process (of the DICOMweb and the viewer port); 0: no limit.",
            _not_negative(int)),
    Setting("PACS_AUTH_WINDOW", "auth_window", "60",
            "Seconds of the sliding window of PACS_AUTH_FAILURES.", _positive(float)),
    Setting("PACS_DUPLICATE_POLICY", "duplicate_policy", "overwrite",
            "A repeated SOP Instance UID with different content: overwrite, keep (first) "
            "or reject.", _choice("overwrite", "keep", "reject")),
    Setting("PACS_COMMITMENT_MAX_REFERENCES", "commitment_max_references", "10000",
            "Most instances one storage commitment request may reference; more are "
            "refused (N-ACTION 0213).", _positive(int)),
    Setting("PACS_COMMITMENT_MAX_PENDING", "commitment_max_pending", "1000",
            "Most storage commitment results kept waiting for delivery, a tenth of them "
            "(at least ten) per requestor's AE title and a quarter per network "
            "address; further requests are refused (N-ACTION 0213) until some are "
            "delivered.", _positive(int)),
    Setting("PACS_COMMITMENT_KEEP", "commitment_keep", "604800",
            "Seconds after its request a storage commitment result not delivered yet "
            "(its requestor unreachable, or not answering Success) is kept and tried "
            "again; then it is dropped (logged) and the requestor, never told, keeps "
            "its copies.  One for a requestor not in PACS_MODALITIES goes after an "
            "hour, or this when shorter.", _positive(float)),
    Setting("PACS_DIMSE_WORKERS", "dimse_workers", "0",
            "DIMSE worker processes sharing the port; 0 means one per CPU.",
            _not_negative(int)),
    Setting("PACS_DIMSE_SEAM", "dimse_seam", "on",
            "on: the DIMSE edge runs its fast paths through pynetdicom's internals (the "
            "seam, only with the pynetdicom version it was tested with); off: pynetdicom's "
            "public API only, slower (docs/architecture.md, DIMSE).", _bool),
    Setting("PACS_PENDING_INTERVAL", "pending_interval", "1",
            "Seconds between the pending responses of a C-GET or C-MOVE, which report "
            "its progress (PS3.4 C.4.2.3.1, C.4.3.3.1: they are optional); 0: one after "
            "every sub-operation.", _not_negative(float)),
    Setting("PACS_MAX_ASSOCIATIONS", "max_associations", "32",
            "Concurrent associations per worker process.", _positive(int)),
    Setting("PACS_MAX_PDU", "max_pdu", "262144",
            "Largest PDU we accept (bytes); 0 means unlimited.", _not_negative(int)),
    Setting("PACS_DIMSE_TIMEOUT", "dimse_timeout", "60",
            "Seconds to wait for a DIMSE message or network data before aborting. A "
            "store's waits fit within it, so that a peer gets a failure status first: S3 "
            "read timeout and index busy timeout are a quarter of it.", _positive(float)),
    Setting("PACS_ARTIM_TIMEOUT", "artim_timeout", "10",
            "Seconds an accepted DIMSE connection may take to send its A-ASSOCIATE-RQ "
            "(ARTIM, PS3.8 9.1.2) before it is closed.", _positive(float)),
    Setting("PACS_MAX_ASSOCIATIONS_PER_HOST", "max_associations_per_host", "16",
            "Concurrent associations from one source address per worker process; more "
            "are rejected (A-ASSOCIATE-RJ, local limit exceeded).", _positive(int)),
    Setting("PACS_CUSTOMER_ASSOCIATION_SHARE", "customer_association_share", "0.75",
            "With several customers: the share of PACS_MAX_ASSOCIATIONS one customer's "
            "associations may take per worker process, so that the others together keep "
            "the rest; "
            "more are rejected (A-ASSOCIATE-RJ, local limit exceeded); and the share of "
            "PACS_DIMSE_RECEIVE_BYTES its data sets may hold. 1: no share.",
            _share),
    Setting("PACS_MAX_PENDING_CONNECTIONS", "max_pending_connections", "64",
            "DIMSE connections per worker process that have not yet sent an "
            "A-ASSOCIATE-RQ; more are closed at once.", _positive(int)),
    Setting("PACS_MAX_OBJECT_BYTES", "max_object_bytes", "2147483648",
            "Largest object received (C-STORE data set, STOW-RS part, upload), and the "
            "largest a deflated data set may inflate to; larger ones are refused "
            "(A700 / HTTP 413).", _positive(int)),
    Setting("PACS_DIMSE_RECEIVE_BYTES", "dimse_receive_bytes", "4294967296",
            "Bytes of C-STORE data sets a DIMSE worker process holds while they arrive, "
            "all its associations together; a data set that would pass it is dropped as "
            "it arrives and answered A700 (one alone always fits). 0 means unlimited.",
            _not_negative(int)),
    Setting("PACS_MAX_FRAME_BYTES", "max_frame_bytes", "268435456",
            "Largest decoded frame (rows x columns x samples x bytes per sample) that "
            "rendered views, thumbnails and transcoding decode; larger frames are "
            "refused before anything is allocated.", _positive(int)),
    Setting("PACS_INTAKE_MAX_BYTES", "intake_max_bytes", "2147483648",
            "Bytes of acknowledged objects the intake (in the index) may hold before the "
            "object store takes them; an object it has no room for is refused (A700 / "
            "HTTP 503 with Retry-After) until the mover catches up.", _positive(int)),
    Setting("PACS_INTAKE_OBJECT_BYTES", "intake_object_bytes", "",
            "Largest object acknowledged through the intake (one index commit; one over "
            "262144 bytes as a synced file of the intake's folder); larger objects are "
            "written to the object store before their index row. Empty: 262144 on the "
            "folder store, 67108864 on S3; 0: no intake.",
            _intake_object_bytes),
    Setting("PACS_INTAKE_MOVER", "intake_mover", "on",
            "off holds the mover: acknowledged objects stay in the intake (tests and "
            "diagnosis only; the intake fills up to PACS_INTAKE_MAX_BYTES).", _bool),
    Setting("PACS_INTAKE_MOVER_HOLD", "intake_mover_hold", "30",
            "Seconds the mover may leave an object in the intake while others keep "
            "arriving (it moves once they pause, or once the intake holds half of "
            "PACS_INTAKE_MAX_BYTES); 0: move at once.", _not_negative(float)),
    Setting("PACS_HTTP_TIMEOUT", "http_timeout", "30",
            "Seconds an HTTP client may take to send its request headers, or stay "
            "silent while sending a body or reading a response, before it is "
            "disconnected.", _positive(float)),
    Setting("PACS_HTTP_KEEPALIVE", "http_keepalive", "15",
            "Seconds an idle keep-alive HTTP connection is kept open; 0: one request per "
            "connection.", _not_negative(float)),
    Setting("PACS_MAX_REQUEST_BYTES", "max_request_bytes", "8589934592",
            "Largest HTTP request body (a STOW-RS POST); larger requests get 413.",
            _positive(int)),
    Setting("PACS_QUERY_MAX_ROWS", "query_max_rows", "10000",
            "Largest number of matches a query may return before it is refused.", _positive(int)),
    Setting("PACS_QUERY_TIME_LIMIT", "query_time_limit", "30",
            "Seconds a query may run before it is stopped.", _positive(float)),
    Setting("PACS_PN_CASE_SENSITIVE", "pn_case_sensitive", "false",
            "Match person names case-sensitively (PS3.4 C.2.2.2.1 allows either).", _bool),
    Setting("PACS_RETENTION_DAYS", "retention_days", "",
            "Data retention: days since a study last received an instance after which it "
            "is removed, e.g. 3650, or per modality CT=3650,MR=1825 (a bare number for "
            "the others, without it they are kept; a study is kept for the longest of its "
            "modalities); empty turns it off.", _retention),
    Setting("PACS_RETENTION_INTERVAL", "retention_interval", "3600",
            "Seconds between two runs of the data retention (each removes at most 100 "
            "studies and 20000 instances, oldest first; after a run that removed any "
            "the next follows a second later).", _positive(float)),
    Setting("PACS_ROUTES", "routes_text", "",
            "Forwarding rules: 'name: calling_ae=CT1|CT2, modality=CT, sop_class=UID -> "
            "AET or https://host/dicom-web', separated by ';' (README, Forwarding); "
            "an AE title with an address (PACS_MODALITIES, PACS_ACCESS_FILE); empty: none."),
    Setting("PACS_ROUTES_FILE", "routes_file", "",
            "A TOML file of further forwarding rules ([[route]] tables with name, to and "
            "the conditions of PACS_ROUTES)."),
    Setting("PACS_FORWARD_BATCH", "forward_batch", "50",
            "Most instances forwarded per association (C-STORE) or per request (STOW-RS).",
            _positive(int)),
    Setting("PACS_FORWARD_MAX_OUTBOX", "forward_max_outbox", "100000",
            "Backlog per forwarding destination above which a warning is logged and "
            "pacs status reports it; entries are still recorded, never dropped.",
            _positive(int)),
    Setting("PACS_FORWARD_RETRY_MAX", "forward_retry_max", "600",
            "Longest wait in seconds between two attempts at an unreachable forwarding "
            "destination (the wait doubles from 1 s up to this).", _positive(float)),
    Setting("PACS_LOG_LEVEL", "log_level", "INFO",
            "Log level; patient data is only logged at DEBUG.", _log_level),
    Setting("PACS_AUDIT_LOG", "audit_log", "",
            "Audit trail (who accessed which patient's images, PS3.15 A.5 events as JSON "
            "lines; holds Patient IDs and queries, mode 0600): a file path; empty means "
            "<data folder>/audit.jsonl; off turns it off."),
)


#: Every setting by its :class:`Settings` field name, and by its environment name.
_BY_ATTR = {setting.attr: setting for setting in SETTINGS}
_BY_ENV = {setting.env: setting for setting in SETTINGS}


def is_set(settings: Settings, env: str) -> bool:
    """True when ``settings`` holds another value of ``env`` than its default (a text
    of blanks is the empty default)."""
    setting = _BY_ENV[env]
    value, default = getattr(settings, setting.attr), setting.parse(setting.default)
    if isinstance(value, str) and isinstance(default, str):
        return value.strip() != default.strip()
    return bool(value != default)


def _default(attr: str) -> Any:
    """The default of the setting of field ``attr``, parsed from :data:`SETTINGS`."""
    setting = _BY_ATTR[attr]
    return setting.parse(setting.default)


@dataclass(frozen=True)
class Modality:
    """A known remote AE: a C-MOVE destination, a storage commitment requestor
    (``tls``: reached over DICOM TLS)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False


#: What follows a destination's port to reach it over DICOM TLS.
TLS_SUFFIX = ":tls"


def parse_modalities(value: str) -> dict[str, Modality]:
    """Parse ``AET=host:port,AET2=host:port:tls`` into a table by AE title."""
    table: dict[str, Modality] = {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        aet, sep, address = item.partition("=")
        address = address.strip()
        tls = address.lower().endswith(TLS_SUFFIX)
        if tls:
            address = address[:-len(TLS_SUFFIX)]
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not port.isdigit() or not aet.strip():
            raise ConfigError(f"PACS_MODALITIES: cannot read {item!r}; expected "
                              "AET=host:port or AET=host:port:tls")
        table[aet.strip()] = Modality(aet.strip(), host.strip(), int(port), tls)
    return table


@dataclass(frozen=True)
class Settings:
    """The effective settings of one node, after all sources are merged.

    A field's default is its setting's default in :data:`SETTINGS`, parsed: each
    default is written once, there (the data folder's follows from the customer's).
    """

    customer: str = _default("customer")
    data_dir: Path = Path("customer") / _default("customer")
    customers_file: str = _default("customers_file")
    ae_title: str = _default("ae_title")
    dimse_port: int = _default("dimse_port")
    dimse_tls_port: int = _default("dimse_tls_port")
    dimse_tls_cert: str = _default("dimse_tls_cert")
    dimse_tls_key: str = _default("dimse_tls_key")
    dimse_tls_ca: str = _default("dimse_tls_ca")
    bind_address: str = _default("bind_address")
    web_port: int = _default("web_port")
    web_workers: int = _default("web_workers")
    web_threads: int = _default("web_threads")
    web_analysers: int = _default("web_analysers")
    web_user: str = _default("web_user")
    web_password: str = _default("web_password")
    web_token: str = _default("web_token")
    web_open: bool = _default("web_open")
    web_hosts: tuple[str, ...] = _default("web_hosts")
    web_delete: bool = _default("web_delete")
    cors_origins: tuple[str, ...] = _default("cors_origins")
    tls_cert: str = _default("tls_cert")
    tls_key: str = _default("tls_key")
    tls_ca: str = _default("tls_ca")
    qido_default_limit: int = _default("qido_default_limit")
    viewer_port: int = _default("viewer_port")
    viewer_dist: str = _default("viewer_dist")
    viewer_workers: int = _default("viewer_workers")
    uploads_path: str = _default("uploads_path")
    uploads_poll: float = _default("uploads_poll")
    uploads_after_store: str = _default("uploads_after_store")
    storage: str = _default("storage")
    s3_endpoint: str = _default("s3_endpoint")
    s3_access_key: str = _default("s3_access_key")
    s3_secret_key: str = _default("s3_secret_key")
    s3_bucket: str = _default("s3_bucket")
    s3_secure: bool = _default("s3_secure")
    s3_region: str = _default("s3_region")
    s3_settle: float = _default("s3_settle")
    modalities: str = _default("modalities")
    allowed_calling_aets: tuple[str, ...] = _default("allowed_calling_aets")
    access_file: str = _default("access_file")
    unknown_ae_rights: frozenset[str] = _default("unknown_ae_rights")
    loopback_roles: frozenset[str] = _default("loopback_roles")
    auth_failures: int = _default("auth_failures")
    auth_window: float = _default("auth_window")
    duplicate_policy: str = _default("duplicate_policy")
    commitment_max_references: int = _default("commitment_max_references")
    commitment_max_pending: int = _default("commitment_max_pending")
    commitment_keep: float = _default("commitment_keep")
    dimse_workers: int = _default("dimse_workers")
    dimse_seam: bool = _default("dimse_seam")
    pending_interval: float = _default("pending_interval")
    max_associations: int = _default("max_associations")
    max_pdu: int = _default("max_pdu")
    dimse_timeout: float = _default("dimse_timeout")
    artim_timeout: float = _default("artim_timeout")
    max_associations_per_host: int = _default("max_associations_per_host")
    customer_association_share: float = _default("customer_association_share")
    max_pending_connections: int = _default("max_pending_connections")
    max_object_bytes: int = _default("max_object_bytes")
    dimse_receive_bytes: int = _default("dimse_receive_bytes")
    max_frame_bytes: int = _default("max_frame_bytes")
    intake_max_bytes: int = _default("intake_max_bytes")
    intake_object_bytes: int | None = _default("intake_object_bytes")
    intake_mover: bool = _default("intake_mover")
    intake_mover_hold: float = _default("intake_mover_hold")
    http_timeout: float = _default("http_timeout")
    http_keepalive: float = _default("http_keepalive")
    max_request_bytes: int = _default("max_request_bytes")
    query_max_rows: int = _default("query_max_rows")
    query_time_limit: float = _default("query_time_limit")
    pn_case_sensitive: bool = _default("pn_case_sensitive")
    retention_days: str = _default("retention_days")
    retention_interval: float = _default("retention_interval")
    routes_text: str = _default("routes_text")
    routes_file: str = _default("routes_file")
    forward_batch: int = _default("forward_batch")
    forward_max_outbox: int = _default("forward_max_outbox")
    forward_retry_max: float = _default("forward_retry_max")
    log_level: str = _default("log_level")
    audit_log: str = _default("audit_log")
    destinations: Mapping[str, Modality] = field(default_factory=dict)
    #: A customer's access tables from the customers file (:mod:`pacs.core.customers`),
    #: instead of ``PACS_ACCESS_FILE``; ``None``: that file's.
    access_tables: Tables | None = None
    #: The forwarding rules (``PACS_ROUTES``, ``PACS_ROUTES_FILE``).
    routes: tuple[Route, ...] = ()

    @property
    def intake_limit(self) -> int:
        """The largest object acknowledged through the intake: ``PACS_INTAKE_OBJECT_BYTES``,
        else the store's default.

        On the folder store the intake writes an object three times to the same disk
        (the WAL, the index file at a checkpoint, the object's file) where the direct
        path writes it once: it saves the fsyncs that dominate a small object's cost and
        costs the bandwidth that dominates a large one's (a CT slice of 512 KB stored
        faster directly, on four associations twice as fast, on this project's test
        machine).  On S3 the direct path waits for a PUT round trip, which costs more;
        there an object over :data:`pacs.core.intake.BLOB_BYTES` is a file of the
        intake, written as the folder store writes its objects.
        """
        if self.intake_object_bytes is not None:
            return self.intake_object_bytes
        return INTAKE_OBJECT_BYTES["s3" if self.storage == "s3" else "file"]

    @property
    def index_path(self) -> Path:
        """The SQLite index file of this customer."""
        return self.data_dir / "index.sqlite"

    @property
    def objects_dir(self) -> Path:
        """The folder of the file object store."""
        return self.data_dir / "objects"

    @property
    def retention(self) -> RetentionRules:
        """The data retention periods (``PACS_RETENTION_DAYS``)."""
        return parse_retention(self.retention_days)

    @property
    def uploads_dir(self) -> Path:
        """The customer's upload folder (``PACS_UPLOADS_DIR``, else inside the data folder)."""
        if self.uploads_path:
            return Path(self.uploads_path).absolute()
        return self.data_dir / "uploads"

    def with_overrides(self, **changes: Any) -> Settings:
        """Return a copy with some fields replaced (used by tests)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str]]:
        """Each setting's environment name and effective value, secrets masked."""
        rows = []
        for setting in SETTINGS:
            value = getattr(self, setting.attr)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, frozenset):
                value = ",".join(sorted(value))
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if setting.secret and text:
                text = "****"
            rows.append((setting.env, _URL_PASSWORD.sub(r"\1****@", text)))
        return rows


#: The password of a URL's user information (``scheme://user:password@host``), as a
#: route to a STOW-RS destination may hold it: masked wherever a setting has one.
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]*@")


def validate_customer(name: str) -> str:
    """``name`` when it can be a customer's folder name and key prefix.

    Raises
    ------
    ConfigError
        Empty, longer than 64 characters, or other than letters, digits, '-' and '_'.
    """
    # The customer name becomes a folder and a key prefix: keep it to a safe alphabet.
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    if not name or not set(name) <= allowed or len(name) > 64:
        raise ConfigError(
            f"CUSTOMER {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def load(
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = Path(".env"),
) -> Settings:
    """Merge defaults, ``.env``, the environment and overrides into :class:`Settings`.

    Parameters
    ----------
    overrides : mapping, optional
        Values by environment name that win over everything else (CLI flags).
    environ : mapping, optional
        The environment; ``os.environ`` when omitted.
    env_file : Path or None
        The dotenv file to read when it exists.

    Raises
    ------
    ConfigError
        When a value cannot be parsed.
    """
    raw: dict[str, str] = {s.env: s.default for s in SETTINGS}
    if env_file is not None and env_file.is_file():
        raw.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    source = os.environ if environ is None else environ
    raw.update({s.env: source[s.env] for s in SETTINGS if s.env in source})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        try:
            values[setting.attr] = setting.parse(raw[setting.env])
        except ValueError as exc:
            raise ConfigError(f"{setting.env}: {exc}") from None
    values["customer"] = validate_customer(values["customer"])
    values["data_dir"] = Path(values["data_dir"] or default_data_dir(
        None if values["customers_file"] else values["customer"])).absolute()
    values["destinations"] = parse_modalities(values["modalities"])
    values["routes"] = load_routes(values["routes_text"], values["routes_file"])
    check_tls(values["tls_cert"], values["tls_key"], values["tls_ca"])
    settings = Settings(**values)
    check_dimse_tls(settings)
    check_folders(settings)
    return settings


def check_folders(settings: Settings) -> None:
    """Refuse an upload folder that holds any of the node's own files: the data
    folder, or a folder inside it other than its ``uploads`` (the objects, the intake,
    the locks, the quarantine), or the audit trail.  The watcher takes every file it
    finds there as an upload and removes those it stored or found stored already, so
    it would delete the store's objects (each the same as the object it names) and
    move the index's lock files away.  Outside the data folder, or its default place
    ``<data>/uploads``, it reads nothing of the node's.

    Raises
    ------
    ConfigError
        The upload folder is one of those places.
    """
    from pacs.core import audit  # the trail's default place is the audit module's

    uploads = Path(os.path.realpath(settings.uploads_dir))
    data = Path(os.path.realpath(settings.data_dir))
    if data.is_relative_to(uploads):
        raise ConfigError(f"PACS_UPLOADS_DIR ({uploads}) holds the data folder ({data}): "
                          "the watcher would take the stored objects for uploads")
    if uploads.is_relative_to(data) and not uploads.is_relative_to(data / "uploads"):
        raise ConfigError(f"PACS_UPLOADS_DIR ({uploads}) is inside the data folder "
                          f"({data}), not in its uploads folder: the watcher would take "
                          "the node's own files (stored objects) for uploads")
    trail = audit.audit_path(settings.audit_log, settings.data_dir)
    if trail is not None and Path(os.path.realpath(trail)).is_relative_to(uploads):
        raise ConfigError(f"PACS_AUDIT_LOG ({trail}) is in the upload folder ({uploads})")


def default_data_dir(customer: str | None) -> Path:
    """The data folder when ``PACS_DATA_DIR`` is not set, relative to the working
    folder: ``customer/<CUSTOMER>``; with a customers file (``customer`` ``None``)
    ``customer``, which holds one folder per customer (:mod:`pacs.core.customers`)."""
    return Path("customer", customer) if customer is not None else Path("customer")


def derive(settings: Settings, overrides: Mapping[str, str]) -> Settings:
    """``settings`` with some values replaced, by environment name, each parsed as
    :func:`load` parses it (one customer's settings, :mod:`pacs.core.customers`).

    Raises
    ------
    ConfigError
        An unknown name, or a value that cannot be parsed.
    """
    values: dict[str, Any] = {}
    for env, text in overrides.items():
        setting = _BY_ENV.get(env)
        if setting is None:
            raise ConfigError(f"{env}: not a setting")
        try:
            values[setting.attr] = setting.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{env}: {exc}") from None
    if "customer" in values:
        values["customer"] = validate_customer(values["customer"])
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"]).absolute()
    if "modalities" in values:
        values["destinations"] = parse_modalities(values["modalities"])
    if "routes_text" in values or "routes_file" in values:
        values["routes"] = load_routes(values.get("routes_text", settings.routes_text),
                                       values.get("routes_file", settings.routes_file))
    return dataclasses.replace(settings, **values)


def check_tls(cert: str, key: str, ca: str) -> None:
    """Refuse half a TLS configuration (the files are read by ``pacs serve``,
    :mod:`pacs.node.tls`).

    Raises
    ------
    ConfigError
        A certificate without its key or the reverse, or client authorities without
        either.
    """
    if bool(cert) != bool(key):
        raise ConfigError("PACS_TLS_CERT and PACS_TLS_KEY go together: set both (HTTPS on "
                          "the DICOMweb and viewer ports) or neither (plain HTTP)")
    if ca and not cert:
        raise ConfigError("PACS_TLS_CA is set without PACS_TLS_CERT and PACS_TLS_KEY: "
                          "client certificates need HTTPS")


def dimse_tls_identity(settings: Settings) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The DICOM TLS certificate and key as ((setting, path), (setting, path)): the
    DIMSE ones, else the HTTPS ones; ``None`` when neither pair is set."""
    if settings.dimse_tls_cert:
        return (("PACS_DIMSE_TLS_CERT", settings.dimse_tls_cert),
                ("PACS_DIMSE_TLS_KEY", settings.dimse_tls_key))
    if settings.tls_cert:
        return ("PACS_TLS_CERT", settings.tls_cert), ("PACS_TLS_KEY", settings.tls_key)
    return None


def check_dimse_tls(settings: Settings) -> None:
    """Refuse DIMSE listeners that cannot serve (the files are read by ``pacs serve``,
    :mod:`pacs.dimse.tls`).

    Raises
    ------
    ConfigError
        Both on the same port, a TLS port without a certificate, half a DIMSE
        certificate pair.  (Both ports off is ``pacs serve``'s to refuse,
        :func:`check_dimse_listeners`: commands and tests serve no DIMSE.)
    """
    if bool(settings.dimse_tls_cert) != bool(settings.dimse_tls_key):
        raise ConfigError("PACS_DIMSE_TLS_CERT and PACS_DIMSE_TLS_KEY go together: set "
                          "both, or neither (DICOM TLS then uses PACS_TLS_CERT / _KEY)")
    if settings.dimse_port and settings.dimse_port == settings.dimse_tls_port:
        raise ConfigError(f"PACS_DIMSE_PORT and PACS_DIMSE_TLS_PORT are both "
                          f"{settings.dimse_port}: the TLS port must be another one "
                          "(PS3.15 B.12)")
    if settings.dimse_tls_port and dimse_tls_identity(settings) is None:
        raise ConfigError("PACS_DIMSE_TLS_PORT needs a certificate: set "
                          "PACS_DIMSE_TLS_CERT and PACS_DIMSE_TLS_KEY (or PACS_TLS_CERT "
                          "and PACS_TLS_KEY)")


def check_dimse_listeners(settings: Settings) -> None:
    """Refuse to serve with both DIMSE ports off.

    Raises
    ------
    ConfigError
        ``PACS_DIMSE_PORT`` and ``PACS_DIMSE_TLS_PORT`` both 0.
    """
    if not settings.dimse_port and not settings.dimse_tls_port:
        raise ConfigError("PACS_DIMSE_PORT is 0 and PACS_DIMSE_TLS_PORT is 0: the node "
                          "would serve no DIMSE; set one of them")
