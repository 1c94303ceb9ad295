"""Reads of the index outside the query engine: small, named, bound parameters only.

Every statement that reads the index lives in :mod:`pacs.core.index` (this module, and
the query compiler for C-FIND / QIDO-RS); callers elsewhere name what they want - the
instances a WADO-RS path names, an instance's stored facts, a health count - and get
plain values.  Each function takes the connection of the caller's thread
(:meth:`pacs.core.index.connection.Index.connection`), so that a read can share a write
transaction (the ingest's duplicate check), and turns SQLite errors into
:class:`~pacs.core.errors.IndexFailure`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import apsw

from pacs.core.attributes import Level
from pacs.core.errors import IndexFailure
from pacs.core.index.outbox import unrouted_since

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Index keys read per statement by :func:`metadata_rows` (SQLite allows 32,766 bound
#: parameters; a batch also bounds the memory of one answer).
MAX_KEYS = 500


def _read(what: str) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]:
    """Report an SQLite error of the decorated read as :class:`IndexFailure`."""

    def decorate(function: Callable[_P, _T]) -> Callable[_P, _T]:
        @wraps(function)
        def read(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            try:
                return function(*args, **kwargs)
            except apsw.Error as exc:
                raise IndexFailure(f"{what} failed: {exc}") from exc

        return read

    return decorate


def _marks(values: Sequence[object]) -> str:
    """The ``?`` placeholders of an ``IN (...)`` list of at most :data:`MAX_KEYS` values.

    Raises
    ------
    ValueError
        When there are more (the caller reads in chunks).
    """
    if len(values) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} values per read")
    return ", ".join("?" * len(values))


# --- one instance ------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredInstance:
    """What the index knows of a stored instance."""

    sop_uid: str
    object_key: str
    checksum: str
    size: int
    transfer_syntax: str


@_read("instance lookup")
def lookup(conn: apsw.Connection, sop_uid: str) -> StoredInstance | None:
    """The stored instance with this SOP Instance UID, if any."""
    row = conn.execute(
        "SELECT sop_uid, object_key, checksum, size, transfer_syntax FROM instance "
        "WHERE sop_uid = ?", (sop_uid,)).fetchone()
    return StoredInstance(*row) if row else None


@_read("instance lookup")
def names(conn: apsw.Connection, sop_uid: str, object_key: str) -> bool:
    """True while the index names ``object_key`` as the object of ``sop_uid``: the
    instance was not removed (nor moved, nor replaced at another key) since it was
    listed.

    Raises
    ------
    IndexFailure
        The index cannot be read.
    """
    row = conn.execute("SELECT object_key FROM instance WHERE sop_uid = ?",
                       (sop_uid,)).fetchone()
    return row is not None and row[0] == object_key


@_read("instance lookup")
def lookup_classes(conn: apsw.Connection, sop_uids: Sequence[str]
                   ) -> dict[str, tuple[str, StoredInstance]]:
    """SOP Instance UID -> (SOP Class UID, stored facts) of those of at most
    :data:`MAX_KEYS` instances the index holds (storage commitment's check)."""
    marks = _marks(sop_uids)
    if not sop_uids:
        return {}
    rows = conn.execute(
        "SELECT sop_class_uid, sop_uid, object_key, checksum, size, transfer_syntax "
        f"FROM instance WHERE sop_uid IN ({marks})", list(sop_uids))
    return {str(row[1]): (str(row[0] or ""), StoredInstance(*row[1:])) for row in rows}


# --- what a deletion removes, and what it left behind ------------------------------------

@dataclass(frozen=True)
class Located:
    """An indexed instance with where it lives: its study, series, patient and object,
    and its row's change number (``instance.change_seq``: every insert or overwrite of
    the row takes a new one, so it tells the row read from a later store of the UID)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    object_key: str
    size: int
    patient_key: str
    change_seq: int


_LOCATED_SQL = (
    "SELECT instance.sop_uid, coalesce(instance.sop_class_uid, ''), study.study_uid, "
    "series.series_uid, instance.object_key, instance.size, "
    "coalesce(instance.patient_key, patient.patient_key), "
    "coalesce(instance.change_seq, 0) "
    "FROM instance JOIN series ON series.pk = instance.series_pk "
    "JOIN study ON study.pk = series.study_pk JOIN patient ON patient.pk = study.patient_pk ")


@_read("instance listing")
def instances_under(conn: apsw.Connection, study_uid: str, series_uid: str | None = None,
                    sop_uid: str | None = None) -> list[Located]:
    """The instances of a study, of one of its series, or one instance, in series then
    arrival order; empty when nothing matches."""
    sql, params = _under(_LOCATED_SQL + "WHERE study.study_uid = ?", study_uid, series_uid,
                         sop_uid)
    return [Located(*row) for row in conn.execute(sql, params)]


def _under(sql: str, study_uid: str, series_uid: str | None, sop_uid: str | None
           ) -> tuple[str, list[str]]:
    """``sql`` (which binds the Study UID) narrowed to a series and an instance when
    given, in series then arrival order, with its parameters."""
    params = [study_uid]
    if series_uid is not None:
        sql += " AND series.series_uid = ?"
        params.append(series_uid)
    if sop_uid is not None:
        sql += " AND instance.sop_uid = ?"
        params.append(sop_uid)
    return sql + " ORDER BY series.pk, instance.pk", params


@_read("instance listing")
def located(conn: apsw.Connection, sop_uids: Sequence[str]) -> list[Located]:
    """The indexed instances among at most :data:`MAX_KEYS` SOP Instance UIDs (the
    others are left out), in no particular order."""
    marks = _marks(sop_uids)
    if not sop_uids:
        return []
    return [Located(*row) for row in conn.execute(
        _LOCATED_SQL + f"WHERE instance.sop_uid IN ({marks})", list(sop_uids))]


@dataclass(frozen=True)
class Tombstone:
    """Why an instance was removed: the rejection's code (PS3.16 CID 7010), both parts
    empty for a plain deletion; and where it was (or where the rejection note placed
    it), which a tombstone's equality leaves out."""

    reason_code: str
    reason_scheme: str
    study_uid: str = field(default="", compare=False)
    series_uid: str = field(default="", compare=False)


@dataclass(frozen=True)
class TombstoneRow:
    """A tombstone whole, as written (:func:`pacs.core.index.writer.add_tombstone`)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    reason_code: str
    reason_scheme: str
    removed_by: str
    removed_at: str


@_read("tombstone listing")
def tombstones(conn: apsw.Connection) -> list[TombstoneRow]:
    """Every tombstone (for a rebuilt index, :mod:`pacs.core.reindex`)."""
    return [TombstoneRow(*(str(value) for value in row)) for row in conn.execute(
        "SELECT sop_uid, study_uid, series_uid, reason_code, reason_scheme, removed_by, "
        "removed_at FROM tombstone")]


@_read("instance lookup")
def lookup_with_tombstone(conn: apsw.Connection, sop_uid: str
                          ) -> tuple[StoredInstance | None, Tombstone | None]:
    """:func:`lookup` and :func:`tombstone` of a SOP Instance UID, in one statement
    (ingest asks both of every instance it stores)."""
    row = conn.execute(
        "SELECT i.sop_uid, i.object_key, i.checksum, i.size, i.transfer_syntax, "
        "t.reason_code, t.reason_scheme, t.study_uid, t.series_uid "
        "FROM (SELECT ? AS uid) AS q LEFT JOIN instance AS i ON i.sop_uid = q.uid "
        "LEFT JOIN tombstone AS t ON t.sop_uid = q.uid", (sop_uid,)).fetchone()
    if row is None:  # never: the query has one row whatever the tables hold
        return None, None
    return (StoredInstance(*row[:5]) if row[0] is not None else None,
            Tombstone(*row[5:]) if row[5] is not None else None)


@_read("tombstone lookup")
def tombstone(conn: apsw.Connection, sop_uid: str) -> Tombstone | None:
    """The tombstone of a removed SOP Instance UID, if it has one."""
    row = conn.execute("SELECT reason_code, reason_scheme, study_uid, series_uid "
                       "FROM tombstone WHERE sop_uid = ?", (sop_uid,)).fetchone()
    return Tombstone(*row) if row else None


#: The period of a series no rule covers when there is no default: its study never
#: expires (days; far past any Julian day number).
_NEVER = 1e12


@_read("retention query")
def expired_instances(conn: apsw.Connection, now_julian: float,
                      days_by_modality: Sequence[tuple[str, float]],
                      default_days: float | None, limit: int,
                      max_instances: int) -> list[Located]:
    """The instances of the studies whose last instance was received longer ago than
    their retention period (at most ``limit`` studies, oldest first, and no more than
    ``max_instances`` instances but for the first study), found and listed by one
    statement: an instance stored into such a study after it is found expired is not
    among them (two reads would list it, and the retention would remove an instance
    just acknowledged).

    A study's period is the longest of those of the modalities of its series
    (``days_by_modality``, matched as upper case; ``default_days`` for the others,
    ``None``: they never expire), so that a study is kept as long as any of its parts
    asks: one series of a modality no rule names keeps its study when there is no
    default.  A study whose arrival is unknown (``received_at`` empty: reindexed from a
    store that keeps no times) never expires.

    Parameters
    ----------
    now_julian : float
        Now, as a Julian day number (SQLite's ``julianday``).
    """
    expired, params = _expired(now_julian, days_by_modality, default_days, limit,
                               max_instances)
    sql = (_LOCATED_SQL + f"WHERE study.study_uid IN ({expired}) "
           "ORDER BY study.pk, series.pk, instance.pk")
    return [Located(*row) for row in conn.execute(sql, params)]


def _expired(now_julian: float, days_by_modality: Sequence[tuple[str, float]],
             default_days: float | None, limit: int, max_instances: int
             ) -> tuple[str, list[object]]:
    """The ``SELECT`` of the expired studies' UIDs, and its parameters.

    A series no rule covers counts :data:`_NEVER` days (SQL's ``max`` passes over a
    NULL: the other series' period decided, and the study went)."""
    cases = "".join(" WHEN ? THEN ?" for _ in days_by_modality)
    period = f"CASE upper(trim(series.modality)){cases} ELSE ? END" if cases else "?"
    params: list[object] = [value for pair in days_by_modality for value in pair]
    params += [_NEVER if default_days is None else default_days, now_julian,
               max_instances, limit]
    sql = (
        "SELECT uid FROM (SELECT uid, last, row_number() OVER oldest AS k, "
        "sum(n) OVER oldest AS running FROM ("
        "SELECT study.study_uid AS uid, max(instance.received_at) AS last, "
        f"max({period}) AS days, count(*) AS n FROM study "
        "JOIN series ON series.study_pk = study.pk "
        "JOIN instance ON instance.series_pk = series.pk GROUP BY study.pk) "
        "WHERE julianday(substr(last, 1, 19)) < ? - days "
        "WINDOW oldest AS (ORDER BY last, uid)) "
        "WHERE k = 1 OR running <= ? ORDER BY last, uid LIMIT ?")
    return sql, params


# --- the instances a WADO-RS path names ------------------------------------------------------

_KEYS_SQL = (
    "SELECT instance.pk FROM instance JOIN series ON series.pk = instance.series_pk "
    "JOIN study ON study.pk = series.study_pk WHERE study.study_uid = ?")


@_read("instance query")
def instance_keys(conn: apsw.Connection, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[int]:
    """The index keys of the instances of a study, series or instance, in series then
    arrival order; empty when nothing matches."""
    sql, params = _under(_KEYS_SQL, study_uid, series_uid, sop_uid)
    return [int(pk) for (pk,) in conn.execute(sql, params)]


#: An instance's stored facts and its prepared metadata: index key, SOP Instance UID,
#: object key, checksum, transfer syntax, pixel offset, pixel length, and the DICOM JSON
#: (``None`` when none was prepared: :mod:`pacs.core.metadata` builds it then).  A
#: plain tuple: a metadata answer reads thousands of them.
MetadataRow = tuple[int, str, str, str, str, int | None, int | None, str | None]


_METADATA_SQL = (
    "SELECT instance.pk, instance.sop_uid, instance.object_key, instance.checksum, "
    "instance.transfer_syntax, m.pixel_offset, m.pixel_length, m.json FROM instance "
    "LEFT JOIN instance_metadata AS m ON m.instance_pk = instance.pk "
    "WHERE instance.pk IN ({marks})")


@_read("metadata query")
def metadata_rows(conn: apsw.Connection, keys: Sequence[int]) -> list[MetadataRow]:
    """The rows of at most :data:`MAX_KEYS` instance keys, in no particular order
    (keys of instances deleted meanwhile have none)."""
    marks = _marks(keys)
    if not keys:
        return []
    sql = _METADATA_SQL.format(marks=marks)
    return conn.execute(sql, keys).fetchall()  # type: ignore[return-value]


@_read("metadata query")
def metadata_sizes(conn: apsw.Connection, keys: Sequence[int]) -> dict[int, int]:
    """Instance key -> bytes of its stored JSON of at most :data:`MAX_KEYS` instance
    keys (``octet_length`` reads no text: the sizes are known before any of it is);
    the object's size for one that has none yet (its JSON is built from the object
    when read)."""
    marks = _marks(keys)
    if not keys:
        return {}
    rows = conn.execute(
        "SELECT instance.pk, coalesce(octet_length(m.json), instance.size) FROM instance "
        "LEFT JOIN instance_metadata AS m ON m.instance_pk = instance.pk "
        f"WHERE instance.pk IN ({marks})", list(keys))
    return {int(pk): int(size) for pk, size in rows}


@_read("metadata query")
def undescribed(conn: apsw.Connection, sop_uids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """SOP Instance UID -> (index key, checksum) of those of at most :data:`MAX_KEYS`
    instances that have no metadata yet (the intake's mover builds it)."""
    marks = _marks(sop_uids)
    if not sop_uids:
        return {}
    rows = conn.execute(
        "SELECT instance.sop_uid, instance.pk, instance.checksum FROM instance "
        "LEFT JOIN instance_metadata AS m ON m.instance_pk = instance.pk "
        f"WHERE instance.sop_uid IN ({marks}) AND m.instance_pk IS NULL", list(sop_uids))
    return {str(sop): (int(pk), str(checksum)) for sop, pk, checksum in rows}


_IMAGES_SQL = (
    "SELECT series.pk, instance.sop_uid FROM instance "
    "JOIN series ON series.pk = instance.series_pk JOIN study ON study.pk = series.study_pk "
    "WHERE study.study_uid = ? {series} AND instance.rows IS NOT NULL "
    "ORDER BY CAST(series.series_number AS INTEGER), series.pk, "
    "CAST(instance.instance_number AS INTEGER), instance.pk")


@_read("image query")
def first_series_images(conn: apsw.Connection, study_uid: str,
                        series_uid: str | None = None) -> list[str]:
    """The SOP Instance UIDs of the images (instances with Rows) of a series, or of a
    study's first series with images by Series Number, by Instance Number; empty when
    there is none."""
    clause = "AND series.series_uid = ?" if series_uid is not None else ""
    params = [study_uid] + ([series_uid] if series_uid is not None else [])
    images: list[str] = []
    first = None
    cursor = conn.execute(_IMAGES_SQL.format(series=clause), params)
    for series_pk, sop in cursor:
        if first is None:
            first = series_pk
        elif series_pk != first:
            break  # the rows of one series are contiguous (ORDER BY)
        images.append(sop)
    cursor.close()
    return images


@_read("patient query")
def study_patients(conn: apsw.Connection, study_uids: Sequence[str]
                   ) -> dict[str, tuple[str, str]]:
    """Study Instance UID -> (Patient ID, Issuer of Patient ID) as sent in that study
    (PS3.4 C.3.2), for at most :data:`MAX_KEYS` studies; studies the index does not
    hold are left out, an absent value is ``""``."""
    marks = _marks(study_uids)
    if not study_uids:
        return {}
    rows = conn.execute("SELECT study_uid, patient_id, issuer_of_patient_id FROM study "
                        f"WHERE study_uid IN ({marks})", list(study_uids))
    return {str(uid): (patient_id or "", issuer or "") for uid, patient_id, issuer in rows}


# --- the intake: acknowledged objects not yet in the object store ---------------------

@dataclass(frozen=True)
class IntakeEntry:
    """One object of the intake (its bytes stay in the index until read, or in a file
    of the intake's folder: ``in_file``)."""

    id: int
    object_key: str
    size: int
    checksum: str
    received_at: float
    in_file: bool = False


# An empty ``data`` marks an object kept as a file (no DICOM object is empty); SQLite's
# length() of a blob reads the record's header, never the blob's overflow pages.
_INTAKE_COLUMNS = "id, object_key, size, checksum, received_at, length(data) = 0"


@_read("intake lookup")
def intake_entry(conn: apsw.Connection, key: str) -> IntakeEntry | None:
    """The intake's object at ``key``, if any."""
    row = conn.execute(f"SELECT {_INTAKE_COLUMNS} FROM intake WHERE object_key = ?",
                       (key,)).fetchone()
    return _entry(row) if row else None


@_read("intake listing")
def intake_batch(conn: apsw.Connection, after: int, limit: int, max_bytes: int,
                 settled_before: float = float("inf"),
                 skip: Collection[int] = frozenset()) -> list[IntakeEntry]:
    """The oldest intake objects after row ``after``, in arrival order: at most
    ``limit`` of them, and no more than ``max_bytes`` together (but at least one);
    none whose key is unsettled by a write after ``settled_before``, none of the rows
    ``skip``."""
    batch: list[IntakeEntry] = []
    total = 0
    cursor = conn.execute(
        f"SELECT {_INTAKE_COLUMNS} FROM intake WHERE id > ? AND NOT EXISTS "
        "(SELECT 1 FROM unsettled WHERE unsettled.object_key = intake.object_key "
        "AND since > ?) ORDER BY id LIMIT ?",
        (after, settled_before, limit + len(skip)))
    for row in cursor:
        entry = _entry(row)
        if entry.id in skip:
            continue
        if len(batch) == limit or (batch and total + entry.size > max_bytes):
            break
        batch.append(entry)
        total += entry.size
    cursor.close()
    return batch


def _entry(row: tuple[Any, ...]) -> IntakeEntry:
    entry_id, key, size, checksum, received_at, in_file = row
    return IntakeEntry(entry_id, key, size, checksum, received_at, bool(in_file))


@_read("intake lookup")
def intake_current(conn: apsw.Connection, entry_id: int) -> bool:
    """True while intake row ``entry_id`` exists (not moved, replaced or dropped)."""
    return conn.execute("SELECT 1 FROM intake WHERE id = ?", (entry_id,)).fetchone() is not None


@_read("intake listing")
def intake_files(conn: apsw.Connection) -> list[tuple[str, str]]:
    """(key, checksum) of every intake object kept as a file."""
    return [(str(key), str(checksum)) for key, checksum in conn.execute(
        "SELECT object_key, checksum FROM intake WHERE length(data) = 0")]


@_read("deletion listing")
def pending_deletions(conn: apsw.Connection, limit: int,
                      before: float = float("inf")) -> list[str]:
    """The keys of the oldest ``limit`` objects of removed instances still to delete
    from the store (``pacs.core.deletion``), recorded before ``before``."""
    return [str(key) for (key,) in conn.execute(
        "SELECT object_key FROM object_deletion WHERE since < ? ORDER BY since LIMIT ?",
        (before, limit))]


@_read("deletion listing")
def deletion_keys(conn: apsw.Connection) -> list[tuple[str, float]]:
    """Every pending deletion of a removed instance's object, and since when."""
    return [(str(key), float(since)) for key, since in conn.execute(
        "SELECT object_key, since FROM object_deletion")]


@_read("deletion listing")
def deletions_pending_of(conn: apsw.Connection, keys: Sequence[str]) -> set[str]:
    """Those of at most :data:`MAX_KEYS` ``keys`` whose deletion is still pending."""
    return {str(key) for (key,) in conn.execute(
        f"SELECT object_key FROM object_deletion WHERE object_key IN ({_marks(keys)})",
        list(keys))}


@_read("deletion totals")
def pending_deletion_count(conn: apsw.Connection) -> int:
    """Objects of removed instances still to delete from the store."""
    return _scalar(conn, "SELECT count(*) FROM object_deletion")


@_read("intake listing")
def intake_keys(conn: apsw.Connection) -> list[str]:
    """The keys of every object in the intake."""
    return [str(key) for (key,) in conn.execute("SELECT object_key FROM intake")]


@_read("schema listing")
def tables(conn: apsw.Connection) -> set[str]:
    """The names of the index's tables (which of them an older schema lacks)."""
    return {str(name) for (name,) in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table'")}


@_read("intake totals")
def intake_objects(conn: apsw.Connection) -> int:
    """Objects in the intake (one row, kept by triggers)."""
    row = conn.execute("SELECT objects FROM intake_state WHERE id = 0").fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class PendingRejection:
    """A rejection note stored whose removals are not all done, and who sent it."""

    sop_uid: str
    requestor: str
    address: str
    since: float


@_read("rejections pending")
def rejections_pending(conn: apsw.Connection, sop_uid: str | None = None
                       ) -> list[PendingRejection]:
    """Every rejection note whose removals are not all done, oldest first (that of
    ``sop_uid`` only, when given)."""
    where, bindings = ("WHERE sop_uid = ? ", (sop_uid,)) if sop_uid is not None else ("", ())
    return [PendingRejection(str(uid), str(who), str(address), float(since))
            for uid, who, address, since in conn.execute(
                "SELECT sop_uid, requestor, address, since FROM rejection_pending "
                f"{where}ORDER BY since", bindings)]


@_read("removals pending count")
def removals_pending_count(conn: apsw.Connection) -> int:
    """How many removals and rejection notes' removals are not all done (without
    reading what they name)."""
    return _scalar(conn, "SELECT (SELECT count(*) FROM removal_pending) + "
                         "(SELECT count(*) FROM rejection_pending)")


@dataclass(frozen=True)
class PendingRemoval:
    """A removal asked for and not all done: who asked, from which process kind
    (``source``), the rejection reason (JSON, "" for a deletion) and the places
    (JSON)."""

    id: int
    requestor: str
    address: str
    source: str
    reason: str
    places: str
    since: float


@_read("removals pending")
def removals_pending(conn: apsw.Connection, pending_id: int | None = None
                     ) -> list[PendingRemoval]:
    """Every removal not all done, oldest first (that of ``pending_id`` only)."""
    where, bindings = ("WHERE id = ? ", (pending_id,)) if pending_id is not None else ("", ())
    return [PendingRemoval(int(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                           str(row[5]), float(row[6]))
            for row in conn.execute("SELECT id, requestor, address, source, reason, places, "
                                    f"since FROM removal_pending {where}ORDER BY id",
                                    bindings)]


@_read("unsettled listing")
def unsettled_keys(conn: apsw.Connection) -> list[tuple[str, float]]:
    """Every unsettled key and when its write went unanswered (``pacs.core.intake``)."""
    return [(str(key), float(since))
            for key, since in conn.execute("SELECT object_key, since FROM unsettled")]


@_read("unsettled lookup")
def any_unsettled(conn: apsw.Connection) -> bool:
    """True when any key is unsettled (``pacs.core.intake``)."""
    return conn.execute("SELECT 1 FROM unsettled LIMIT 1").fetchone() is not None


@_read("unsettled lookup")
def unsettled(conn: apsw.Connection, key: str) -> bool:
    """True when a write of ``key`` to the object store went unanswered and may still
    be carried out (``pacs.core.intake``)."""
    return conn.execute("SELECT 1 FROM unsettled WHERE object_key = ?",
                        (key,)).fetchone() is not None


@_read("intake read")
def intake_blob(conn: apsw.Connection, entry_id: int) -> apsw.Blob | None:
    """The bytes of intake row ``entry_id``, as SQLite's incremental blob I/O (read in
    place, never copied whole); ``None`` when the row is gone.  The blob is read
    within the connection's current view; a change of the row aborts its reads
    (``apsw.AbortError``)."""
    try:
        return conn.blob_open("main", "intake", "data", entry_id, False)
    except apsw.SQLError as exc:
        if "no such rowid" in str(exc):
            return None
        raise


@dataclass(frozen=True)
class IntakeState:
    """The intake's backlog and the mover's last error, for back-pressure and
    ``pacs status``."""

    objects: int
    bytes: int
    oldest: float | None  # received_at (POSIX time) of the oldest object
    mover_error: str | None
    mover_error_at: float | None
    unsettled: int = 0  # keys whose store write went unanswered (pacs.core.intake)


@_read("intake state")
def intake_state(conn: apsw.Connection) -> IntakeState:
    """The intake's totals (one row, kept by triggers), its oldest object and the
    mover's last error."""
    row = conn.execute(
        "SELECT objects, bytes, (SELECT received_at FROM intake ORDER BY id LIMIT 1), "
        "mover_error, mover_error_at, (SELECT count(*) FROM unsettled) "
        "FROM intake_state WHERE id = 0").fetchone()
    if row is None:  # written by the migration
        raise apsw.SQLError("no intake_state row")
    return IntakeState(*row)


@_read("intake totals")
def intake_bytes(conn: apsw.Connection) -> int:
    """Bytes in the intake (one row, kept by triggers): back-pressure reads it on
    every store."""
    row = conn.execute("SELECT bytes FROM intake_state WHERE id = 0").fetchone()
    return int(row[0]) if row else 0


# --- the whole index ---------------------------------------------------------------------

@_read("object listing")
def all_objects(conn: apsw.Connection) -> dict[str, tuple[str, str, int]]:
    """Every indexed object: key -> (SOP Instance UID, checksum, size)."""
    return {key: (sop, checksum, size) for sop, key, checksum, size in conn.execute(
        "SELECT sop_uid, object_key, checksum, size FROM instance")}


def _scalar(conn: apsw.Connection, sql: str, bindings: tuple[object, ...] = ()) -> int:
    """The one integer an aggregate query answers."""
    row = conn.execute(sql, bindings).fetchone()
    if row is None:  # an aggregate always answers one row
        raise apsw.SQLError(f"no row from {sql!r}")
    return int(row[0])


@_read("count")
def counts(conn: apsw.Connection) -> dict[str, int]:
    """Rows per level (``patient``, ``study``, ``series``, ``instance``)."""
    return {level.table: _scalar(conn, f"SELECT count(*) FROM {level.table}")
            for level in Level}


@_read("owner")
def owner(conn: apsw.Connection) -> str | None:
    """The customer recorded as the index's owner; ``None`` when none is recorded."""
    row = conn.execute("SELECT customer FROM owner").fetchone()
    return str(row[0]) if row else None


@_read("size sum")
def indexed_bytes(conn: apsw.Connection) -> int:
    """The sum of the indexed objects' sizes."""
    return _scalar(conn, "SELECT coalesce(sum(size), 0) FROM instance")


@_read("commitment count")
def commitments_waiting(conn: apsw.Connection, requestor_ae: str | None = None,
                        address: str | None = None) -> int:
    """Storage commitment requests whose result is not delivered yet (of
    ``requestor_ae`` only, or from ``address`` only, when given)."""
    if requestor_ae is not None:
        return _scalar(conn, "SELECT count(*) FROM commitment WHERE requestor_ae = ?",
                       (requestor_ae,))
    if address is not None:
        return _scalar(conn, "SELECT count(*) FROM commitment WHERE address = ?",
                       (address,))
    return _scalar(conn, "SELECT count(*) FROM commitment")


#: The tables of work a rebuilt index takes over from the previous one as they are
#: (:mod:`pacs.core.reindex`): storage commitment requests, and forwarding's queue.
CARRIED_TABLES = ("commitment", "outbox")


@_read("carried rows")
def carried_rows(conn: apsw.Connection, table: str, columns: Sequence[str]
                 ) -> list[tuple[object, ...]]:
    """The rows of one of :data:`CARRIED_TABLES`: ``columns`` of each, in the order
    they were written."""
    if table not in CARRIED_TABLES:
        raise ValueError(f"not a carried table: {table}")
    listed = ", ".join(f'"{column}"' for column in columns)
    return list(conn.execute(f"SELECT {listed} FROM {table} ORDER BY pk"))


@_read("column listing")
def columns_of(conn: apsw.Connection, table: str) -> list[str]:
    """The columns of one of :data:`CARRIED_TABLES` but its key (an older schema may
    lack some)."""
    if table not in CARRIED_TABLES:
        raise ValueError(f"not a carried table: {table}")
    return [str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")
            if row[1] != "pk"]


@_read("forwarding listing")
def unfed(conn: apsw.Connection) -> list[str] | None:
    """The SOP Instance UIDs whose last change forwarding has not read yet, in the
    order of their changes; ``None`` when forwarding never ran (no cursor).  Changes
    after the mark of a run without routes (``forward_unrouted``) are not among them:
    routes set again pass over what such runs stored."""
    row = conn.execute("SELECT seq FROM forward_cursor WHERE id = 1").fetchone()
    if row is None:
        return None
    upto = unrouted_since(conn) if "forward_unrouted" in tables(conn) else None
    return [str(sop) for (sop,) in conn.execute(
        "SELECT sop_uid FROM instance WHERE change_seq > ? "
        "AND change_seq <= coalesce(?, change_seq) ORDER BY change_seq", (row[0], upto))]


@_read("integrity check")
def quick_check(conn: apsw.Connection) -> str:
    """SQLite's ``PRAGMA quick_check`` (reads the whole file): ``ok``, or its first
    finding."""
    row = conn.execute("PRAGMA quick_check").fetchone()
    return str(row[0]) if row else "no answer from quick_check"


__all__ = [
    "CARRIED_TABLES",
    "MAX_KEYS",
    "IntakeEntry",
    "IntakeState",
    "Located",
    "MetadataRow",
    "StoredInstance",
    "Tombstone",
    "all_objects",
    "any_unsettled",
    "carried_rows",
    "columns_of",
    "commitments_waiting",
    "counts",
    "deletion_keys",
    "deletions_pending_of",
    "expired_instances",
    "first_series_images",
    "indexed_bytes",
    "instance_keys",
    "instances_under",
    "intake_batch",
    "intake_blob",
    "intake_bytes",
    "intake_current",
    "intake_entry",
    "intake_files",
    "intake_keys",
    "intake_state",
    "located",
    "lookup",
    "lookup_classes",
    "metadata_rows",
    "pending_deletion_count",
    "pending_deletions",
    "quick_check",
    "study_patients",
    "tombstone",
    "unfed",
    "unsettled",
]
