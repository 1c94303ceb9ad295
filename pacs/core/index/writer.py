"""Writes to the index: upsert one instance with its parents, its metadata, delete,
tombstones.

All statements are built once from the attribute table with bound parameters only;
callers run them inside :meth:`pacs.core.index.connection.Index.write` (or a piece of
:meth:`~pacs.core.index.connection.Index.commit`).  Reads are in
:mod:`pacs.core.index.reads`; :func:`lookup`, :func:`all_objects`, :func:`counts` and
:class:`StoredInstance` are re-exported here for the callers that know them by this
module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import apsw

from pacs.core.attributes import (
    IDENTITY,
    PARENT_KEY,
    Level,
    case_folded_column,
    table_attributes,
)
from pacs.core.index.reads import (
    CARRIED_TABLES,
    StoredInstance,
    all_objects,
    counts,
    lookup,
)

#: The series, study and patient rows above an instance.
_PARENTS_SQL = (
    "SELECT instance.series_pk, series.study_pk, study.patient_pk FROM instance "
    "JOIN series ON series.pk = instance.series_pk JOIN study ON study.pk = series.study_pk "
    "WHERE instance.sop_uid = ?")
_INSTANCE_EXTRA = ("object_key", "size", "checksum", "transfer_syntax", "received_at",
                   "calling_ae", "patient_key")


@dataclass(frozen=True)
class InstanceRow:
    """Everything to index for one instance: values by column for each level (the
    study row takes its copies of the patient attributes from the patient's)."""

    patient_key: str
    values: dict[Level, dict[str, str | None]]
    object_key: str
    size: int
    checksum: str
    transfer_syntax: str
    received_at: str
    calling_ae: str


def _level_columns(level: Level) -> list[str]:
    columns = []
    for attribute in table_attributes(level):
        if attribute.column == IDENTITY[level]:
            continue
        columns.append(attribute.column or "")
        folded = case_folded_column(attribute)
        if folded:
            columns.append(folded)
    return columns


@cache
def _upsert_parts(level: Level) -> tuple[tuple[str, ...], list[str], set[str]]:
    """(columns written, in the order of the bound values: the identifying UID first;
    the columns an update sets; those of them that keep the value known when the
    object lacks it) of one level's row."""
    columns = [IDENTITY[level]]
    if level in PARENT_KEY:
        columns.append(PARENT_KEY[level])
    columns += _level_columns(level)
    if level is Level.IMAGE:
        columns += _INSTANCE_EXTRA
    # Above the instance, an attribute an object lacks keeps the value known: an SR, a
    # key object or a presentation state a viewer made without Study Description would
    # otherwise blank it for the whole study.  The instance row is its object's own.
    attributes = set(_level_columns(level)) if level is not Level.IMAGE else set()
    return tuple(columns), columns[1:], attributes


@cache
def _upsert_sql(level: Level) -> tuple[str, tuple[str, ...]]:
    """``INSERT … ON CONFLICT DO UPDATE … WHERE changed RETURNING pk`` for one level.

    A row whose values are all those received already is left alone: each instance of
    a series would otherwise rewrite its patient, study and series rows and every index
    entry of theirs, twice the pages (WAL frames) its commit writes and syncs.  Such a
    row returns no key; :func:`_key_sql` reads it.
    """
    columns, kept, attributes = _upsert_parts(level)
    new = [f"COALESCE(excluded.{c}, {c})" if c in attributes else f"excluded.{c}"
           for c in kept]
    updates = ", ".join(f"{c} = {value}" for c, value in zip(kept, new, strict=True))
    changed = f"({', '.join(kept)}) IS NOT ({', '.join(new)})"
    sql = (
        f"INSERT INTO {level.table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT({IDENTITY[level]}) DO UPDATE SET {updates} WHERE {changed} "
        "RETURNING pk"
    )
    return sql, columns


@cache
def _unchanged_sql(level: Level) -> str:
    """The key of a level's row when it holds the values received already, those the
    upsert would leave alone (:func:`_upsert_sql`: the same comparison, the values
    bound in the same order).  The parents of every instance of a series after its
    first are such rows: one statement for each instead of the upsert and
    :func:`_key_sql`."""
    _columns, kept, attributes = _upsert_parts(level)
    new = [f"COALESCE(?, {c})" if c in attributes else "?" for c in kept]
    return (f"SELECT pk FROM {level.table} WHERE {IDENTITY[level]} = ? "
            f"AND ({', '.join(kept)}) IS ({', '.join(new)})")


@cache
def _key_sql(level: Level) -> str:
    """The key of a level's row by its identifying UID (an upsert that changed
    nothing returns none)."""
    return f"SELECT pk FROM {level.table} WHERE {IDENTITY[level]} = ?"


def upsert(conn: apsw.Connection, row: InstanceRow, *, new: bool = False) -> None:
    """Insert or update the instance and its patient, study and series.

    The newest object wins for the attributes of every level, where it has them (an
    attribute it lacks keeps the value known, above the instance): the patient row
    holds the patient attributes received last, and the study row its own copy of
    them, as sent in that study (PS3.4 C.3.2).  Parents
    left without children are removed.  ``new``: the caller knows that no row of the
    instance exists (it looked under the instance's ingest lock), so there are no
    former parents to look up.
    """
    # The parents the instance had before, to prune them if this update empties them.
    old_parents = None if new else conn.execute(
        _PARENTS_SQL,
        (row.values[Level.IMAGE]["sop_uid"],),
    ).fetchone()
    parent_pk: int | None = None
    patient_pk: int | None = None
    for level in Level:
        values: dict[str, str | int | None] = dict(row.values[level])
        if level is Level.STUDY:
            values.update(row.values[Level.PATIENT])
        values["patient_key"] = row.patient_key
        if level in PARENT_KEY:
            values[PARENT_KEY[level]] = parent_pk
        if level is Level.IMAGE:
            values.update(object_key=row.object_key, size=row.size,
                          checksum=row.checksum, transfer_syntax=row.transfer_syntax,
                          received_at=row.received_at, calling_ae=row.calling_ae)
        sql, columns = _upsert_sql(level)
        bound = tuple(values.get(c) for c in columns)
        returned = None
        if level is not Level.IMAGE:  # the instance row is new, or its object changed
            returned = conn.execute(_unchanged_sql(level), bound).fetchone()
        if returned is None:
            returned = conn.execute(sql, bound).fetchone()
        if returned is None:  # unchanged: RETURNING answers rows written only
            returned = conn.execute(_key_sql(level), (values[IDENTITY[level]],)).fetchone()
        if returned is None:
            raise apsw.SQLError(f"no key returned for a {level.table} row")
        parent_pk = int(returned[0])
        if level is Level.PATIENT:
            patient_pk = parent_pk
    if old_parents is not None:
        series_pk, study_pk, old_patient_pk = old_parents
        prune(conn, series_pk, study_pk, old_patient_pk, written=patient_pk)


@cache
def _refresh_patient_sql() -> str:
    """The patient row's attributes from its remaining study created last."""
    copied = set(_level_columns(Level.STUDY))
    listed = ", ".join(c for c in _level_columns(Level.PATIENT) if c in copied)
    return (f"UPDATE patient SET ({listed}) = (SELECT {listed} FROM study "
            "WHERE study.patient_pk = patient.pk ORDER BY study.pk DESC LIMIT 1) "
            "WHERE pk = ?")


def prune(conn: apsw.Connection, series_pk: int, study_pk: int, patient_pk: int,
          written: int | None = None) -> None:
    """Delete the given series, study and patient when they are left empty.

    ``written`` is the patient row an upsert just wrote, which holds the latest values
    received.  Any other patient that loses a study, or an instance to another
    patient, but keeps studies takes its attributes from the one of them created
    last, so that the values of what it no longer has do not outlive it there.
    """
    conn.execute("DELETE FROM series WHERE pk = ? AND NOT EXISTS "
                 "(SELECT 1 FROM instance WHERE series_pk = ?)", (series_pk, series_pk))
    conn.execute("DELETE FROM study WHERE pk = ? AND NOT EXISTS "
                 "(SELECT 1 FROM series WHERE study_pk = ?)", (study_pk, study_pk))
    lost = conn.changes() > 0 or written is not None
    conn.execute("DELETE FROM patient WHERE pk = ? AND NOT EXISTS "
                 "(SELECT 1 FROM study WHERE patient_pk = ?)", (patient_pk, patient_pk))
    if lost and conn.changes() == 0 and patient_pk != written:
        conn.execute(_refresh_patient_sql(), (patient_pk,))


def delete_instance(conn: apsw.Connection, sop_uid: str) -> None:
    """Remove an instance row, its object's intake copy (``pacs.core.intake``) and
    any parents it leaves empty; the caller deletes the stored object after the
    commit."""
    row = conn.execute(
        _PARENTS_SQL, (sop_uid,)).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM intake WHERE object_key = "
                 "(SELECT object_key FROM instance WHERE sop_uid = ?)", (sop_uid,))
    conn.execute("DELETE FROM instance WHERE sop_uid = ?", (sop_uid,))
    prune(conn, *row)


_TOMBSTONE_SQL = (
    "INSERT INTO tombstone (sop_uid, study_uid, series_uid, reason_code, reason_scheme, "
    "removed_by, removed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO UPDATE "
    "SET study_uid = excluded.study_uid, series_uid = excluded.series_uid, "
    "reason_code = excluded.reason_code, reason_scheme = excluded.reason_scheme, "
    "removed_by = excluded.removed_by, removed_at = excluded.removed_at")


def add_tombstone(conn: apsw.Connection, sop_uid: str, study_uid: str, series_uid: str,
                  reason: tuple[str, str], removed_by: str, removed_at: str) -> None:
    """Record that an instance was removed, why (a rejection's code and scheme, or two
    empty strings), by whom and when; a later removal of the same UID replaces it."""
    conn.execute(_TOMBSTONE_SQL, (sop_uid, study_uid, series_uid, reason[0], reason[1],
                                  removed_by, removed_at))


def drop_tombstone(conn: apsw.Connection, sop_uid: str) -> None:
    """Forget an instance's removal (it was stored again)."""
    conn.execute("DELETE FROM tombstone WHERE sop_uid = ?", (sop_uid,))


def rejection_pending(conn: apsw.Connection, sop_uid: str, requestor: str, address: str,
                      since: float) -> None:
    """A rejection note stored, its removals still to be done (by ``requestor``)."""
    conn.execute("INSERT OR REPLACE INTO rejection_pending (sop_uid, requestor, address, "
                 "since) VALUES (?, ?, ?, ?)", (sop_uid, requestor, address, since))


def rejection_done(conn: apsw.Connection, sop_uid: str) -> None:
    """The rejection note's removals are done."""
    conn.execute("DELETE FROM rejection_pending WHERE sop_uid = ?", (sop_uid,))


def removal_pending(conn: apsw.Connection, requestor: str, address: str, source: str,
                    reason: str, places: str, since: float) -> int:
    """A removal asked for, not all done yet; its row id."""
    conn.execute("INSERT INTO removal_pending (requestor, address, source, reason, places, "
                 "since) VALUES (?, ?, ?, ?, ?, ?)",
                 (requestor, address, source, reason, places, since))
    return int(conn.last_insert_rowid())


def removal_done(conn: apsw.Connection, pending_id: int) -> None:
    """The removal is done (or its requestor was told it failed)."""
    conn.execute("DELETE FROM removal_pending WHERE id = ?", (pending_id,))


_SAVE_METADATA_SQL = (
    "INSERT INTO instance_metadata (instance_pk, pixel_offset, pixel_length, json) "
    "SELECT pk, ?, ?, ? FROM instance WHERE sop_uid = ? "
    "ON CONFLICT(instance_pk) DO UPDATE SET pixel_offset = excluded.pixel_offset, "
    "pixel_length = excluded.pixel_length, json = excluded.json")

#: A backfill never overwrites what a newer ingest wrote meanwhile (the row's checksum
#: must still be the one the metadata was built from).
_BACKFILL_METADATA_SQL = (
    "INSERT INTO instance_metadata (instance_pk, pixel_offset, pixel_length, json) "
    "SELECT pk, ?, ?, ? FROM instance WHERE pk = ? AND checksum = ? "
    "ON CONFLICT(instance_pk) DO NOTHING")


def save_metadata(conn: apsw.Connection, sop_uid: str, json: str,
                  pixel_offset: int | None, pixel_length: int | None) -> None:
    """Write the DICOM JSON metadata of an instance whose row was just upserted."""
    conn.execute(_SAVE_METADATA_SQL, (pixel_offset, pixel_length, json, sop_uid))


def drop_metadata(conn: apsw.Connection, sop_uid: str) -> None:
    """Remove an instance's metadata (it is built again on first request)."""
    conn.execute("DELETE FROM instance_metadata WHERE instance_pk = "
                 "(SELECT pk FROM instance WHERE sop_uid = ?)", (sop_uid,))


def backfill_metadata(conn: apsw.Connection, key: int, checksum: str, json: str,
                      pixel_offset: int | None, pixel_length: int | None) -> None:
    """Keep metadata built from a stored object, unless the instance (index key
    ``key``) has metadata already or now holds another object than ``checksum``."""
    conn.execute(_BACKFILL_METADATA_SQL, (pixel_offset, pixel_length, json, key, checksum))


def claim_owner(conn: apsw.Connection, customer: str) -> None:
    """Record ``customer`` as the index's owner, unless one is recorded already."""
    conn.execute("INSERT OR IGNORE INTO owner (single, customer) VALUES (1, ?)", (customer,))


# --- the intake (pacs.core.intake) ---------------------------------------------------------

def intake_add(conn: apsw.Connection, key: str, data: bytes, checksum: str,
               received_at: float) -> None:
    """Put an acknowledged object's bytes in the intake, replacing an older version
    of the same key (under a new row id: the mover's copy of the old row then no
    longer deletes it)."""
    _intake_row(conn, key, len(data), checksum, received_at, data)


def intake_add_file(conn: apsw.Connection, key: str, size: int, checksum: str,
                    received_at: float) -> None:
    """:func:`intake_add` of an object kept as a file of the intake's folder (written
    and synced before this commit, :mod:`pacs.core.intake`): its row holds no bytes."""
    _intake_row(conn, key, size, checksum, received_at, b"")


def _intake_row(conn: apsw.Connection, key: str, size: int, checksum: str,
                received_at: float, data: bytes) -> None:
    # REPLACE deletes the row of an older version first, firing its delete trigger
    # (recursive triggers are on, apsw's best practice), and the new row takes a new
    # id (AUTOINCREMENT).
    conn.execute("INSERT OR REPLACE INTO intake (object_key, size, checksum, received_at, "
                 "data) VALUES (?, ?, ?, ?, ?)", (key, size, checksum, received_at, data))


def intake_drop(conn: apsw.Connection, key: str) -> None:
    """Remove the intake's object at ``key``, if any.

    Whatever removes an instance, or writes it to the object store outside the
    intake, does this in the transaction that changes its index row, so that a stale
    intake copy never shadows the store.
    """
    conn.execute("DELETE FROM intake WHERE object_key = ?", (key,))


def intake_moved(conn: apsw.Connection, entry_id: int) -> bool:
    """Remove intake row ``entry_id`` (its object is in the store now); False when it
    is gone already (replaced or dropped meanwhile)."""
    conn.execute("DELETE FROM intake WHERE id = ?", (entry_id,))
    return conn.changes() > 0


def deletions_pending(conn: apsw.Connection, keys: Iterable[str], at: float) -> None:
    """Record the objects of removed instances as to be deleted from the store (in
    the transaction that removes their rows)."""
    conn.executemany("INSERT INTO object_deletion (object_key, since) VALUES (?, ?) "
                     "ON CONFLICT (object_key) DO NOTHING", [(key, at) for key in keys])


def deletions_done(conn: apsw.Connection, keys: Iterable[str]) -> None:
    """Forget the objects deleted from the store (or stored again since), except at an
    unsettled key: a write of it that the store left unanswered may still land after
    the deletion, so the deletion stays pending until the key has settled
    (``pacs.core.intake``)."""
    conn.executemany("DELETE FROM object_deletion WHERE object_key = ? AND NOT EXISTS "
                     "(SELECT 1 FROM unsettled WHERE unsettled.object_key = ?)",
                     [(key, key) for key in keys])


def deletions_later(conn: apsw.Connection, keys: Iterable[str], at: float) -> None:
    """Put the deletions of ``keys``, which failed, behind the others (from ``at``)."""
    conn.executemany("UPDATE object_deletion SET since = ? WHERE object_key = ?",
                     [(at, key) for key in keys])


def carry_rows(conn: apsw.Connection, table: str, columns: Sequence[str],
               rows: Iterable[tuple[object, ...]]) -> None:
    """Write rows of one of ``reads.CARRIED_TABLES`` taken from another index, in
    their order (new keys)."""
    if table not in CARRIED_TABLES:
        raise ValueError(f"not a carried table: {table}")
    listed = ", ".join(f'"{column}"' for column in columns)
    conn.executemany(f"INSERT INTO {table} ({listed}) "
                     f"VALUES ({', '.join('?' * len(columns))})", rows)


def changed_again(conn: apsw.Connection, sop_uids: Iterable[str]) -> None:
    """Give these instances new change numbers, in this order, after every other
    (forwarding reads them again; the trigger numbers an update of ``received_at``)."""
    conn.executemany("UPDATE instance SET received_at = received_at WHERE sop_uid = ?",
                     [(sop,) for sop in sop_uids])


def unsettle(conn: apsw.Connection, key: str, at: float) -> None:
    """Record that a write of ``key`` to the object store went unanswered at ``at``
    (the store may still carry it out: ``pacs.core.intake``)."""
    conn.execute("INSERT INTO unsettled (object_key, since) VALUES (?, ?) "
                 "ON CONFLICT (object_key) DO UPDATE SET since = excluded.since",
                 (key, at))


def settled(conn: apsw.Connection, key: str, before: float) -> None:
    """Forget that ``key`` is unsettled, if its unanswered write was before ``before``
    (one after it keeps it unsettled)."""
    conn.execute("DELETE FROM unsettled WHERE object_key = ? AND since <= ?", (key, before))


def settle_old(conn: apsw.Connection, before: float) -> int:
    """Forget the unsettled keys of writes before ``before`` whose intake holds
    nothing for them (a write that failed unanswered and that nothing acknowledged
    since); the number forgotten."""
    conn.execute("DELETE FROM unsettled WHERE since <= ? AND object_key NOT IN "
                 "(SELECT object_key FROM intake)", (before,))
    return conn.changes()


def mover_started(conn: apsw.Connection, at: float) -> int:
    """Record that a mover runs; when the last one did not stop cleanly (killed with
    writes in flight, which the store may still carry out), every key of the intake
    and every key whose deletion is pending (the mover deletes those too) becomes
    unsettled at ``at``: the number of them, else 0."""
    row = conn.execute("SELECT mover_active FROM intake_state WHERE id = 0").fetchone()
    marked = 0
    if row is not None and row[0]:
        for table in ("intake", "object_deletion"):
            conn.execute("INSERT INTO unsettled (object_key, since) "
                         f"SELECT object_key, ? FROM {table} WHERE true "
                         "ON CONFLICT (object_key) DO UPDATE SET since = excluded.since",
                         (at,))
            marked += conn.changes()
    conn.execute("UPDATE intake_state SET mover_active = 1 WHERE id = 0")
    return marked


def mover_stopped(conn: apsw.Connection) -> None:
    """Record that the mover stopped with none of its writes in flight."""
    conn.execute("UPDATE intake_state SET mover_active = 0 WHERE id = 0")


def intake_mover_error(conn: apsw.Connection, error: str | None, at: float | None) -> None:
    """Record the mover's last error (``None``: it moves again)."""
    conn.execute("UPDATE intake_state SET mover_error = ?, mover_error_at = ? WHERE id = 0",
                 (error, at))


__all__ = ["InstanceRow", "StoredInstance", "add_tombstone", "all_objects",
           "backfill_metadata", "carry_rows", "changed_again", "counts", "delete_instance",
           "deletions_done", "deletions_later", "deletions_pending", "drop_metadata",
           "drop_tombstone", "intake_add",
           "intake_add_file", "intake_drop", "intake_moved", "intake_mover_error",
           "lookup", "mover_started", "mover_stopped", "prune", "save_metadata",
           "settle_old", "settled", "unsettle", "upsert"]
