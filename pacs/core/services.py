"""The composition root: the only place that wires concrete backends together.

DIMSE handlers, the DICOMweb app and the CLI receive a :class:`Services` and call the
core through it; nothing reaches for a module-level singleton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from pacs.core import access
from pacs.core.access import AccessPolicy
from pacs.core.analysers import AnalyserPool
from pacs.core.audit import AuditLog, AuditTrail, Source, audit_path, patients_in_index
from pacs.core.commitment import Commitments
from pacs.core.config import Settings
from pacs.core.dataset import quiet_pydicom
from pacs.core.deletion import Deleter
from pacs.core.errors import ConfigError, StoreMissing, StoreUnreachable
from pacs.core.index import reads, writer
from pacs.core.index.connection import Index, busy_timeout_for
from pacs.core.index.migrations import migrate
from pacs.core.ingest import Ingest
from pacs.core.intake import (
    FILES_FOLDER,
    Hold,
    IntakeFiles,
    IntakeStore,
    Mover,
    mover_lock,
    record_unsettled,
)
from pacs.core.logins import LoginLimiter
from pacs.core.query.engine import QueryEngine
from pacs.core.storage import LateWrites, ObjectStore, open_store

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a protocol edge needs, built once per process."""

    settings: Settings
    index: Index
    #: The object store as every reader sees it: the intake first, then the backend
    #: (``store.backend``).
    store: IntakeStore
    ingest: Ingest
    engine: QueryEngine
    analysers: AnalyserPool
    #: Storage commitment requests waiting for their result to be delivered.
    commitments: Commitments
    #: The audit trail (``PACS_AUDIT_LOG``); off unless built by :func:`build`.
    audit: AuditTrail = field(default_factory=lambda: AuditTrail(AuditLog(None),
                                                                 Source("", "")))
    #: Who may do what (:mod:`pacs.core.access`); open unless built by :func:`build`.
    access: AccessPolicy = field(default_factory=AccessPolicy)
    #: The failed logins of this process (:mod:`pacs.core.logins`); off unless built
    #: by :func:`build`.
    logins: LoginLimiter = field(default_factory=lambda: LoginLimiter(0, 1.0))
    #: Removes instances (``pacs delete``, DICOMweb, rejection notes, retention).
    deleter: Deleter = field(init=False)

    def __post_init__(self) -> None:
        self.deleter = Deleter(self.index, self.store, self.ingest, self.audit)
        # The ingest applies a stored IOCM rejection note through the same path.
        self.ingest.on_rejection = self.deleter.reject
        self.ingest.on_refused_rejection = self.deleter.refused

    def close(self) -> None:
        """Release index connections and store clients, sync the audit trail."""
        self.audit.close()
        self.analysers.close()
        self.ingest.close()
        self.index.close()
        self.store.close()


def build(settings: Settings, store: ObjectStore | None = None, *,
          check_store: bool = True, create_store: bool = True,
          analysers: AnalyserPool | None = None, logins: LoginLimiter | None = None,
          synced: bool = True, claim: bool = False) -> Services:
    """Open (and migrate) the index and the object store the settings name.

    Parameters
    ----------
    settings : Settings
        The effective settings.
    store : ObjectStore, optional
        A ready store (tests pass an in-memory one); opened from the settings otherwise.
    check_store : bool
        Prove the store reachable (and create its folder or bucket, for an index that
        lists no instance: :func:`_open_store`) now.  ``pacs serve`` and the
        commands do; the worker processes of a running node do not, so that a worker
        started while the store is briefly down (a replacement, a restarted DICOMweb
        server) still serves: its writes fail (A700 / 503) until the store is back, and
        queries of the index go on.
    create_store : bool
        With ``check_store``: create the store's folder or bucket when missing; without,
        a missing one is a :class:`ConfigError` (``pacs fsck`` checks, it does not
        create what it checks).
    analysers : AnalyserPool, optional
        The STOW-RS analysis helpers to use: an HTTP worker's customers share one pool
        (a helper parses bytes and holds no customer's data); a pool of its own
        otherwise.
    logins : LoginLimiter, optional
        The failed logins to count in: an HTTP worker's customers share one (a client
        guessing at several customers is one client); one of the settings otherwise.
    synced : bool
        The index commits are synced (:func:`pacs.core.index.connection.connect`);
        only the intake's mover process opens its index without.
    claim : bool
        Record ``settings.customer`` as the index's owner when none is recorded
        (``pacs serve``: the node names the customer of its data folder); a new index
        is always its creator's (:func:`pacs.core.index.migrations.migrate`).

    Raises
    ------
    ConfigError
        When ``check_store`` and the store cannot be used, or cannot be reached for
        an index that holds nothing yet (one that does starts without it:
        :func:`_open_store`), or when the index belongs to another customer.
    """
    quiet_pydicom()
    policy = access_policy(settings)  # a bad access file fails before anything is opened
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index(settings.index_path, busy_timeout_for(settings.dimse_timeout),
                  synced=synced)
    migrate(index.connection(), owner=settings.customer)  # a new index is its creator's
    check_owner(index, settings.customer, claim=claim)
    backend = store if store is not None else _open_store(settings, index, check_store,
                                                          create_store)
    if isinstance(backend, LateWrites):  # every unanswered write recorded, by whoever
        backend.on_unanswered = partial(record_unsettled, index)
    intake = IntakeStore(backend, index, IntakeFiles(settings.data_dir / FILES_FOLDER))
    ingest = Ingest(index, intake, settings.duplicate_policy, settings.data_dir / "locks",
                    max_object_bytes=settings.max_object_bytes,
                    intake_object_bytes=settings.intake_limit,
                    intake_max_bytes=settings.intake_max_bytes,
                    lock_wait=busy_timeout_for(settings.dimse_timeout))
    engine = QueryEngine(index, max_rows=settings.query_max_rows,
                         time_limit=settings.query_time_limit,
                         pn_case_sensitive=settings.pn_case_sensitive)
    return Services(settings=settings, index=index, store=intake, ingest=ingest, engine=engine,
                    analysers=analysers or AnalyserPool(settings.web_analysers,
                                                        settings.max_object_bytes),
                    commitments=commitments(settings, index),
                    audit=audit_trail(settings, index), access=policy,
                    logins=logins if logins is not None else LoginLimiter.of(settings))


def check_owner(index: Index, customer: str, claim: bool) -> None:
    """Refuse an index that another customer owns; with ``claim``, record ``customer``
    as its owner when none is recorded.

    Without a customers file, ``CUSTOMER`` (``--customer``) and ``PACS_DATA_DIR`` are set
    apart: a mistyped name beside the right folder would act on that customer's index
    under another name - its audit events filed under it, on S3 its objects looked for
    under another key prefix (every one of them then missing to ``pacs fsck``).  An
    index made before owners were recorded stays unclaimed until ``pacs serve`` opens it.

    Raises
    ------
    ConfigError
        The index records another owner.
    """
    if claim:
        with index.write() as conn:
            writer.claim_owner(conn, customer)
    owner = reads.owner(index.connection())
    if owner is not None and owner != customer:
        raise ConfigError(
            f"the index {index.path} is customer {owner!r}'s, not {customer!r}'s: check "
            "CUSTOMER (--customer) and PACS_DATA_DIR")


def _open_store(settings: Settings, index: Index, check: bool, create: bool) -> ObjectStore:
    """The settings' store (:func:`open_store`); its folder or bucket is created only
    for an index that lists no instance.

    A missing objects folder under an index that lists instances is a volume not
    mounted (or a wrong ``PACS_DATA_DIR``); a missing bucket, a wrong
    ``PACS_S3_BUCKET`` or endpoint.  Created anew, it would take new objects while
    every stored one reads as lost.

    Raises
    ------
    ConfigError
        The store cannot be reached or used, or is missing under such an index.
    """
    if not (check and create):
        return open_store(settings, check=check, create=create)
    try:
        return open_store(settings, check=True, create=False)
    except StoreMissing:
        if reads.counts(index.connection())["instance"]:
            raise
        return open_store(settings, check=True, create=True)
    except StoreUnreachable as exc:
        conn = index.connection()
        if not reads.counts(conn)["instance"] and not reads.intake_state(conn).objects:
            raise  # nothing acknowledged here yet: a wrong address, most likely
        # A node that served this index, started while its store is down: it serves
        # what it acknowledged from the intake and the store when it answers, takes new
        # objects into the intake (up to PACS_INTAKE_MAX_BYTES), and its mover moves
        # them once the store is back - as its workers do, started without a check.
        log.warning("%s; starting without it: acknowledged instances the intake holds "
                    "are served, new ones kept there until it is back", exc)
        return open_store(settings, check=False)


def access_policy(settings: Settings) -> AccessPolicy:
    """The access rules of ``settings``: ``PACS_ACCESS_FILE`` (or a customer's access
    tables) and the single-entry settings (:func:`pacs.core.access.build`).

    Raises
    ------
    ConfigError
        The access file cannot be read.
    """
    return access.build(access_file=settings.access_file, tables=settings.access_tables,
                        unknown_ae_rights=settings.unknown_ae_rights,
                        loopback_roles=settings.loopback_roles,
                        allowed_calling_aets=settings.allowed_calling_aets,
                        web_user=settings.web_user, web_password=settings.web_password,
                        web_token=settings.web_token)


def commitments(settings: Settings, index: Index) -> Commitments:
    """The storage commitment queue of ``settings``.  A claim's lease outlasts one
    delivery step: an association (connection and ACSE timeouts) and one report with
    its response (the DIMSE timeout), all three ``PACS_DIMSE_TIMEOUT``."""
    return Commitments(index, settings.commitment_max_pending,
                       settings.commitment_max_references, lease=4 * settings.dimse_timeout,
                       max_age=settings.commitment_keep)


def mover(services: Services) -> Mover:
    """The intake's mover over ``services`` (hold :func:`pacs.core.intake.mover_lock`
    while it runs)."""
    settings = services.settings
    hold = Hold(settings.intake_mover_hold, settings.intake_max_bytes // 2)
    # The mover answers no peer: it waits for a lock as long as its holder (a store,
    # a removal) takes.
    return Mover(services.index, services.store,
                 partial(services.ingest.uid_locks, bounded=False), hold,
                 settings.s3_settle,
                 late_writes=isinstance(services.store.backend, LateWrites))


def drain(services: Services) -> int:
    """Move the whole intake to the store unless a running node's mover holds it (a
    command that ingested without a node: ``pacs import``); objects moved.

    Raises
    ------
    PacsError
        The store failed: the rest stays in the intake, safe, for the next mover.
    """
    with mover_lock(services.settings.data_dir, wait=False) as held:
        return mover(services).drain() if held else 0


def audit_trail(settings: Settings, index: Index) -> AuditTrail:
    """The audit trail of ``settings`` (:mod:`pacs.core.audit`), naming this node by its
    AE title and customer, with the index telling the patient of each study."""
    return AuditTrail(AuditLog(audit_path(settings.audit_log, settings.data_dir)),
                      Source(settings.ae_title, settings.customer),
                      partial(patients_in_index, index.connection))
