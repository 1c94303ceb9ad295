"""Schema by migrations keyed on ``PRAGMA user_version``.

The first migration builds the patient / study / series / instance tables from the
attribute table (``pacs.core.attributes``), so a key added there becomes a column here in a
new migration.  Each migration runs in one transaction with the version bump.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import apsw
from pydicom.dataset import Dataset

from pacs.core.attributes import (
    IDENTITY,
    PARENT,
    PARENT_KEY,
    Attribute,
    Level,
    case_folded_column,
    stored,
)
from pacs.core.dataset import extract
from pacs.core.errors import ConfigError
from pacs.core.index.writer import claim_owner
from pacs.core.routes import shown

#: Identifies our index files (``PRAGMA application_id``): "PACS" in ASCII.
APPLICATION_ID = 0x50414353

#: Columns that are not DICOM attributes: where and how each instance is stored.
_INSTANCE_EXTRA = (
    "object_key TEXT NOT NULL",
    "size INTEGER NOT NULL",
    "checksum TEXT NOT NULL",
    "transfer_syntax TEXT NOT NULL",
    "received_at TEXT NOT NULL",
    "calling_ae TEXT NOT NULL DEFAULT ''",
)

#: Columns searched often enough to deserve an index.
_INDEXED = (
    "patient_id", "patient_name_folded", "patient_name", "patient_birth_date",
    "study_date", "accession_number", "study_id", "modality", "sop_class_uid",
    "referring_physician_name_folded",
)


def _columns(attributes: tuple[Attribute, ...], identity: str) -> list[str]:
    columns = []
    for attribute in attributes:
        if attribute.column == identity:
            continue  # declared NOT NULL UNIQUE
        columns.append(f"{attribute.column} TEXT")
        folded = case_folded_column(attribute)
        if folded:
            columns.append(f"{folded} TEXT")
    return columns


def _create_level(conn: apsw.Connection, level: Level) -> None:
    parent = PARENT.get(level)
    lines = ["pk INTEGER PRIMARY KEY", f"{IDENTITY[level]} TEXT NOT NULL UNIQUE"]
    if parent is not None:
        lines.append(f"{PARENT_KEY[level]} INTEGER NOT NULL REFERENCES {parent.table}(pk) "
                     "ON DELETE CASCADE")
    lines += _columns(stored(level), IDENTITY[level])
    if level is Level.IMAGE:
        lines += list(_INSTANCE_EXTRA)
    conn.execute(f"CREATE TABLE {level.table} (\n  " + ",\n  ".join(lines) + "\n)")
    if parent is not None:
        conn.execute(
            f"CREATE INDEX {level.table}_{parent.table} ON {level.table}({parent.table}_pk)")
    names = {a.column for a in stored(level)} | {
        case_folded_column(a) for a in stored(level)}
    for column in _INDEXED:
        if column in names:
            conn.execute(f"CREATE INDEX {level.table}_{column} ON {level.table}({column})")


def _initial(conn: apsw.Connection) -> None:
    for level in Level:
        _create_level(conn, level)


def _instance_metadata(conn: apsw.Connection) -> None:
    """Each instance's DICOM JSON metadata, built at ingest (``pacs.core.metadata``).

    ``pixel_offset`` / ``pixel_length`` locate the pixel data value in the stored object
    (length -1: encapsulated), so that WADO-RS cuts frames without parsing the object.
    Instances stored before this migration get their row on first request.
    """
    conn.execute(
        "CREATE TABLE instance_metadata (\n"
        "  instance_pk INTEGER PRIMARY KEY REFERENCES instance(pk) ON DELETE CASCADE,\n"
        "  pixel_offset INTEGER,\n"
        "  pixel_length INTEGER,\n"
        "  json TEXT NOT NULL\n"
        ")")


def _added_attributes(conn: apsw.Connection) -> None:
    """Columns for attributes added to the attribute table after the first schema
    (ProcedureCodeSequence, RequestAttributesSequence); a fresh index built by
    :func:`_initial` from the current table has them already."""
    for level in Level:
        existing = {row[1] for row in conn.execute(f"PRAGMA table_info({level.table})")}
        for column in _columns(stored(level), IDENTITY[level]):
            name = column.split()[0]
            if name not in existing:
                conn.execute(f"ALTER TABLE {level.table} ADD COLUMN {column}")


def _study_copies(conn: apsw.Connection) -> None:
    """Each study's own copy of the ``per_study`` patient attributes (PS3.4 C.3.2).

    Queries at STUDY level and below read these columns (``pacs.core.attributes.table_of``).
    Existing studies get the values of their newest instance that has a metadata row
    (the DICOM JSON kept at ingest, read back through the ingest's own extraction), and
    otherwise those of their patient row: the values the index held for them before.
    """
    copies = tuple(a for a in stored(Level.PATIENT) if a.per_study)
    existing = {row[1] for row in conn.execute("PRAGMA table_info(study)")}
    names = []
    for column in _columns(copies, IDENTITY[Level.STUDY]):
        name = column.split()[0]
        names.append(name)
        if name not in existing:
            conn.execute(f"ALTER TABLE study ADD COLUMN {column}")
    for name in names:
        if name in _INDEXED:
            conn.execute(f"CREATE INDEX IF NOT EXISTS study_{name} ON study({name})")
    listed = ", ".join(names)
    conn.execute(f"UPDATE study SET ({listed}) = (SELECT {listed} FROM patient "
                 "WHERE patient.pk = study.patient_pk)")
    _copies_from_metadata(conn, copies, names)


def _copies_from_metadata(conn: apsw.Connection, copies: tuple[Attribute, ...],
                          names: list[str]) -> None:
    """Study copies from the newest instance's stored DICOM JSON, where there is one."""
    keys = [f"{a.tag:08X}" for a in copies]
    paths = ", ".join("?" * len(keys))
    found = conn.execute(
        f"SELECT study.pk, (SELECT json_extract(m.json, {paths}) FROM series "
        "JOIN instance ON instance.series_pk = series.pk "
        "JOIN instance_metadata AS m ON m.instance_pk = instance.pk "
        "WHERE series.study_pk = study.pk ORDER BY instance.pk DESC LIMIT 1) FROM study",
        tuple(f'$."{key}"' for key in keys)).fetchall()
    update = (f"UPDATE study SET ({', '.join(names)}) = ({', '.join('?' * len(names))}) "
              "WHERE pk = ?")
    for study_pk, elements in found:
        if elements is None:
            continue
        try:
            document = {key: element for key, element
                        in zip(keys, json.loads(str(elements)), strict=False)
                        if isinstance(element, dict)}
            values = extract(Dataset.from_json(document), Level.PATIENT)
        except Exception:  # noqa: BLE001 - a value that does not read keeps the patient's
            continue
        conn.execute(update, (*(values.get(name) for name in names), study_pk))


def _metadata_encoding(conn: apsw.Connection) -> None:
    """Every instance's metadata is encoded again by the one DICOM JSON encoder
    (``pacs.core.jsonmodel.element``: DS and IS numbers as their text states them, person
    names without empty component groups), so that WADO-RS answers what QIDO-RS does.

    The rows are dropped; each is rebuilt from its stored object on first request, as
    for an instance stored before the table existed (``pacs.core.metadata.documents``).
    """
    conn.execute("DELETE FROM instance_metadata")


def _storage_commitment(conn: apsw.Connection) -> None:
    """Storage commitment requests waiting for their result to be delivered
    (PS3.4 Annex J; :mod:`pacs.core.commitment`, :mod:`pacs.core.index.commitments`).

    One row per request, written before the N-ACTION is answered and removed once the
    N-EVENT-REPORT is delivered: ``refs`` the referenced instances as received, ``result``
    what the verification found (``NULL`` until verified), ``next_attempt`` and
    ``lease_until`` POSIX times, ``claim`` the token of the thread that holds the lease.
    One row per requestor and Transaction UID (:meth:`pacs.core.commitment.Commitments.record`).
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS commitment (\n"
        "  pk INTEGER PRIMARY KEY,\n"
        "  requestor_ae TEXT NOT NULL,\n"
        "  transaction_uid TEXT NOT NULL,\n"
        "  received_at TEXT NOT NULL,\n"
        "  refs TEXT NOT NULL,\n"
        "  result TEXT,\n"
        "  attempts INTEGER NOT NULL DEFAULT 0,\n"
        "  next_attempt REAL NOT NULL,\n"
        "  lease_until REAL NOT NULL DEFAULT 0,\n"
        "  claim TEXT NOT NULL DEFAULT '',\n"
        "  last_error TEXT NOT NULL DEFAULT '',\n"
        "  UNIQUE (requestor_ae, transaction_uid)\n"
        ")")
    conn.execute("CREATE INDEX IF NOT EXISTS commitment_next_attempt "
                 "ON commitment(next_attempt)")


def _tombstones(conn: apsw.Connection) -> None:
    """The SOP Instance UIDs the node removed (``pacs.core.deletion``): why, by whom,
    when, and the study and series they were in.

    A tombstone is written in the transaction that deletes the instance's row, before
    its object is deleted, so that a crash between the two never brings the instance
    back (``pacs fsck`` deletes an unlisted object whose UID has one, instead of
    indexing it), and so that ingest refuses a rejected instance sent again (IHE RAD
    TF-2 4.66.4).  ``reason_code`` / ``reason_scheme`` are the rejection's code (PS3.16
    CID 7010), both empty for a plain deletion.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS tombstone (\n"
        "  sop_uid TEXT PRIMARY KEY,\n"
        "  study_uid TEXT NOT NULL,\n"
        "  series_uid TEXT NOT NULL,\n"
        "  reason_code TEXT NOT NULL,\n"
        "  reason_scheme TEXT NOT NULL,\n"
        "  removed_by TEXT NOT NULL,\n"
        "  removed_at TEXT NOT NULL\n"
        ") WITHOUT ROWID")


def _forwarding(conn: apsw.Connection) -> None:
    """What forwarding needs (:mod:`pacs.core.forwarding`, :mod:`pacs.core.index.outbox`).

    ``instance.change_seq``: a number that grows with every insert or overwrite of an
    instance row, set by triggers inside the writing transaction to one more than both
    the largest number in the table and the forwarder's cursor.  SQLite has one writer
    at a time, so numbers are committed in order: a reader that sees number N has seen
    every number below it, and the forwarder follows the table by its cursor
    (``forward_cursor``) without skipping a committed row.  An overwrite keeps its
    ``pk`` (the ingest's upsert updates the row in place) but takes a new number, so it
    is forwarded again; counting from the cursor too means that a number is never
    given again once the cursor has passed it, even when the rows that held the
    largest numbers were deleted.  (A one-row counter would do the same at the cost of
    one more row written by every ingest.)

    ``outbox``: one row per (destination, instance) waiting to be sent, written in the
    transaction that moves the cursor past the instance and deleted once the
    destination acknowledged it; ``failed_at`` set when it refused the instance for
    good.  ``forward_destination``: each destination's backoff, last error and last
    success.
    """
    if "change_seq" not in {row[1] for row in conn.execute("PRAGMA table_info(instance)")}:
        conn.execute("ALTER TABLE instance ADD COLUMN change_seq INTEGER")
        conn.execute("UPDATE instance SET change_seq = pk")
    conn.execute("CREATE INDEX IF NOT EXISTS instance_change_seq ON instance(change_seq)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS forward_cursor (\n"
        "  id INTEGER PRIMARY KEY CHECK (id = 1),\n"
        "  seq INTEGER NOT NULL\n"
        ")")
    for name, event in (("instance_change_insert", "INSERT"),
                        ("instance_change_update", "UPDATE OF received_at, checksum")):
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON instance BEGIN "
            "UPDATE instance SET change_seq = 1 + max("
            "coalesce((SELECT max(change_seq) FROM instance), 0), "
            "coalesce((SELECT seq FROM forward_cursor WHERE id = 1), 0)) "
            "WHERE pk = new.pk; END")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS outbox (\n"
        "  pk INTEGER PRIMARY KEY,\n"
        "  destination TEXT NOT NULL,\n"
        "  route TEXT NOT NULL,\n"
        "  sop_uid TEXT NOT NULL,\n"
        "  change_seq INTEGER NOT NULL,\n"
        "  queued_at REAL NOT NULL,\n"
        "  failed_at REAL,\n"
        "  last_error TEXT NOT NULL DEFAULT '',\n"
        "  UNIQUE (destination, sop_uid)\n"
        ")")
    conn.execute("CREATE INDEX IF NOT EXISTS outbox_waiting "
                 "ON outbox(destination, failed_at, pk)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS forward_destination (\n"
        "  name TEXT PRIMARY KEY,\n"
        "  failures INTEGER NOT NULL DEFAULT 0,\n"
        "  next_attempt REAL NOT NULL DEFAULT 0,\n"
        "  last_error TEXT NOT NULL DEFAULT '',\n"
        "  last_error_at REAL,\n"
        "  last_success_at REAL\n"
        ") WITHOUT ROWID")


def _intake(conn: apsw.Connection) -> None:
    """The intake (``pacs.core.intake``): the bytes of acknowledged objects not yet in
    the object store, committed with their index rows in one transaction.

    ``id`` is never reused (AUTOINCREMENT): the mover deletes a row only if it is still
    the one it copied, and a row replaced by a newer version of the same key must not
    look like it.  ``data`` is the last column, so that reading the others never
    touches the blob's overflow pages.  ``intake_state`` keeps the totals (by
    triggers, so that back-pressure reads one row, not the table) and the mover's last
    error, for ``pacs status``.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS intake (\n"
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,\n"
        "  object_key TEXT NOT NULL UNIQUE,\n"
        "  size INTEGER NOT NULL,\n"
        "  checksum TEXT NOT NULL,\n"
        "  received_at REAL NOT NULL,\n"
        "  data BLOB NOT NULL\n"
        ")")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS intake_state (\n"
        "  id INTEGER PRIMARY KEY CHECK (id = 0),\n"
        "  objects INTEGER NOT NULL,\n"
        "  bytes INTEGER NOT NULL,\n"
        "  mover_error TEXT,\n"
        "  mover_error_at REAL\n"
        ")")
    conn.execute("INSERT OR IGNORE INTO intake_state (id, objects, bytes) VALUES (0, 0, 0)")
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS intake_added AFTER INSERT ON intake BEGIN "
        "UPDATE intake_state SET objects = objects + 1, bytes = bytes + new.size "
        "WHERE id = 0; END")
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS intake_removed AFTER DELETE ON intake BEGIN "
        "UPDATE intake_state SET objects = objects - 1, bytes = bytes - old.size "
        "WHERE id = 0; END")


def _commitment_called_ae(conn: apsw.Connection) -> None:
    """The node's AE title each storage commitment request came in on (``called_ae``):
    the title its result is reported from, on a new association too; ``''`` for a
    request recorded before, reported from the customer's first AE title."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(commitment)")}
    if "called_ae" not in columns:  # idempotent, as every migration
        conn.execute("ALTER TABLE commitment ADD COLUMN called_ae TEXT NOT NULL DEFAULT ''")


def _unsettled(conn: apsw.Connection) -> None:
    """Keys whose last write to the object store was not answered (``unsettled``:
    ``pacs.core.intake``): the store may still carry it out, so the object the index
    names for such a key is kept in the intake and written again only once ``since``
    is long enough ago.  ``intake_state.mover_active``: a mover is running (or died
    without clearing it, its writes in flight unanswered)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS unsettled (\n"
        "  object_key TEXT PRIMARY KEY,\n"
        "  since REAL NOT NULL\n"
        ") WITHOUT ROWID")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(intake_state)")}
    if "mover_active" not in columns:
        conn.execute("ALTER TABLE intake_state ADD COLUMN mover_active INTEGER NOT NULL "
                     "DEFAULT 0")


def _rejections_pending(conn: apsw.Connection) -> None:
    """IOCM rejection notes stored whose removals are not all done (``pacs.core.ingest``
    commits the row with the note, and drops it once the note is applied; a crash
    between leaves it for the start-up or ``pacs fsck --repair`` to finish), with who
    sent the note."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS rejection_pending (\n"
        "  sop_uid TEXT PRIMARY KEY,\n"
        "  requestor TEXT NOT NULL,\n"
        "  address TEXT NOT NULL DEFAULT '',\n"
        "  since REAL NOT NULL\n"
        ") WITHOUT ROWID")


def _removals_pending(conn: apsw.Connection) -> None:
    """Removals asked for (DICOMweb, ``pacs delete``, retention) not all done: the row
    is committed before the first chunk and dropped after the last
    (``pacs.core.deletion``), the places as JSON; finished at the node's start-up."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS removal_pending (\n"
        "  id INTEGER PRIMARY KEY,\n"
        "  requestor TEXT NOT NULL,\n"
        "  address TEXT NOT NULL DEFAULT '',\n"
        "  source TEXT NOT NULL,\n"
        "  reason TEXT NOT NULL DEFAULT '',\n"
        "  places TEXT NOT NULL,\n"
        "  since REAL NOT NULL\n"
        ")")


def _commitment_address(conn: apsw.Connection) -> None:
    """The network address each storage commitment request came from (``address``:
    ``pacs.core.commitment`` bounds the results waiting per address as per AE title);
    ``''`` for a request recorded before, counted under no address."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(commitment)")}
    if "address" not in columns:
        conn.execute("ALTER TABLE commitment ADD COLUMN address TEXT NOT NULL DEFAULT ''")


def _intake_files(conn: apsw.Connection) -> None:
    """An ``intake`` row with an empty ``data`` holds its object as a file of the
    intake's folder (``pacs.core.intake.IntakeFiles``).  No table changes; the version
    makes a pacs that would read such a row as an empty object refuse the index."""
    del conn


def _object_deletions(conn: apsw.Connection) -> None:
    """Objects of removed instances not yet deleted from the object store
    (``object_deletion``, ``pacs.core.deletion``): recorded in the transaction that
    removes their rows, forgotten once deleted; the intake's mover deletes those a
    failing store or a crash left."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS object_deletion (\n"
        "  object_key TEXT PRIMARY KEY,\n"
        "  since REAL NOT NULL\n"
        ") WITHOUT ROWID")


def _outbox_attempts(conn: apsw.Connection) -> None:
    """``outbox.attempts``: the batches a destination took others of while it did not
    take this entry (:meth:`pacs.core.forwarding.Outbox.settle`); past a few the entry
    is kept as failed, so that one instance cannot hold the queue's head."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "attempts" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")


def _owner(conn: apsw.Connection) -> None:
    """``owner``: the customer whose index this is (one row,
    :func:`pacs.core.services.check_owner`), so that a process given another customer's
    name for this data folder (a mistyped ``--customer`` beside ``PACS_DATA_DIR``)
    refuses it instead of acting on it under that name (on S3, beside another
    customer's key prefix)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS owner (\n"
        "  single INTEGER PRIMARY KEY CHECK (single = 1),\n"
        "  customer TEXT NOT NULL\n"
        ")")


def _destinations_without_credentials(conn: apsw.Connection) -> None:
    """Forwarding's outbox and destination states name a STOW-RS destination by its URL
    without credentials (``pacs.core.routes.Route.target``): the instances queued under
    a URL whose password the settings have changed since are found, and no password is
    kept in the index.  Entries of one instance under two such URLs become the one of
    its newest change, waiting when that one waits (as a change queued again takes the
    newer number and waits, ``pacs.core.index.outbox.queue``)."""
    for (name,) in list(conn.execute("SELECT DISTINCT destination FROM outbox")):
        target = _credential_free(str(name))
        if target == name:
            continue
        for pk, sop_uid, seq, failed_at in list(conn.execute(
                "SELECT pk, sop_uid, change_seq, failed_at FROM outbox "
                "WHERE destination = ?", (name,))):
            there = conn.execute("SELECT pk, change_seq, failed_at FROM outbox "
                                 "WHERE destination = ? AND sop_uid = ?",
                                 (target, sop_uid)).fetchone()
            if there is not None and (there[1], there[2] is None) >= (seq, failed_at is None):
                conn.execute("DELETE FROM outbox WHERE pk = ?", (pk,))
                continue
            if there is not None:
                conn.execute("DELETE FROM outbox WHERE pk = ?", (there[0],))
            conn.execute("UPDATE outbox SET destination = ? WHERE pk = ?", (target, pk))
    for (name,) in list(conn.execute("SELECT name FROM forward_destination")):
        target = _credential_free(str(name))
        if target != name:  # a backoff's state: either one serves
            conn.execute("UPDATE OR IGNORE forward_destination SET name = ? WHERE name = ?",
                         (target, name))
            conn.execute("DELETE FROM forward_destination WHERE name = ?", (name,))


def _instance_patients(conn: apsw.Connection) -> None:
    """``instance.patient_key``: the patient an instance was sent for
    (``pacs.core.ingest.patient_key`` of its own attributes), kept by its row.  The
    patient row of its study is the one the study's last instance names: an IOCM
    rejection note of another patient stored into the study would make the study that
    patient's, and the note's check that it removes only its own patient's instances
    (``pacs.core.deletion.rejectable``) would pass for them.  Rows stored before have
    none (NULL): they are read as their study's patient, as before; filled here, the
    whole table would be rewritten in one transaction (and its size in the WAL)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(instance)")}
    if "patient_key" not in columns:
        conn.execute("ALTER TABLE instance ADD COLUMN patient_key TEXT")


def _forward_unrouted(conn: apsw.Connection) -> None:
    """``forward_unrouted``: the newest change number when a run without routes began
    (the first since the last with routes; ``pacs.core.forwarding.Outbox.unrouted``),
    so that routes set again pass over what such runs stored."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS forward_unrouted (\n"
        "  single INTEGER PRIMARY KEY CHECK (single = 1),\n"
        "  seq INTEGER NOT NULL\n"
        ")")


def _credential_free(destination: str) -> str:
    """:func:`pacs.core.routes.shown`, for a URL stored before (one that no longer
    reads is left as it is)."""
    try:
        return shown(destination)
    except ValueError:
        return destination


#: Ordered migrations: entry ``n`` brings ``user_version`` from ``n`` to ``n + 1``.
MIGRATIONS: tuple[Callable[[apsw.Connection], None], ...] = (
    _initial, _instance_metadata, _added_attributes, _study_copies, _metadata_encoding,
    _storage_commitment, _tombstones, _forwarding, _intake, _commitment_called_ae,
    _unsettled, _rejections_pending, _removals_pending, _commitment_address,
    _intake_files, _object_deletions, _outbox_attempts, _owner,
    _destinations_without_credentials, _instance_patients, _forward_unrouted)


def migrate(conn: apsw.Connection, owner: str | None = None) -> int:
    """Apply every pending migration; return the resulting schema version.

    A new index (no migration run yet) is made whole in one transaction, ``owner``
    recorded in it as the customer it belongs to: no other process opens it half made,
    or before its owner is known (``pacs.core.services.check_owner``).

    Raises
    ------
    ConfigError
        When the file belongs to another application or is newer than this code (a
        message for the operator, not a traceback).
    """
    app_id = conn.pragma("application_id")
    version = conn.pragma("user_version")
    if app_id not in (0, APPLICATION_ID):
        raise ConfigError(f"not a pacs index (application_id {app_id:#x})")
    if version > len(MIGRATIONS):
        raise ConfigError(
            f"index schema {version} is newer than this pacs ({len(MIGRATIONS)}); upgrade pacs")
    if version == 0:
        _create(conn, owner)
        version = conn.pragma("user_version")
    for number in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            if conn.pragma("user_version") == number:
                MIGRATIONS[number](conn)
                conn.pragma("user_version", number + 1)
                conn.pragma("application_id", APPLICATION_ID)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return int(conn.pragma("user_version"))


def _create(conn: apsw.Connection, owner: str | None) -> None:
    """Every migration of a new index, and its owner, in one transaction (unless
    another process made the index first)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.pragma("user_version") == 0:  # re-read under the write lock
            for step in MIGRATIONS:
                step(conn)
            if owner is not None:
                claim_owner(conn, owner)
            conn.pragma("user_version", len(MIGRATIONS))
            conn.pragma("application_id", APPLICATION_ID)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def stored_version(path: Path) -> int:
    """The schema version of the index file at ``path``, read without writing it
    (a read-only connection, closed at once; 0 for a file not yet migrated).

    Raises
    ------
    ConfigError
        The file cannot be read as a database.
    """
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return int(conn.pragma("user_version"))
        finally:
            conn.close()
    except apsw.Error as exc:
        raise ConfigError(f"cannot read the index {path}: {exc}") from exc
