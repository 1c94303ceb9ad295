"""The forwarding tables: the cursor over the instance table, the outbox, and each
destination's state.

Statements only, each a small named function over the caller's connection with bound
parameters; :class:`pacs.core.forwarding.Outbox` decides when each runs (writes inside
:meth:`pacs.core.index.connection.Index.write`).  The tables are described by their
migration (:func:`pacs.core.index.migrations._forwarding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from pacs.core.errors import IndexFailure
from pacs.core.routes import shown


@dataclass(frozen=True)
class Change:
    """An instance row inserted or overwritten: what a route matches on."""

    seq: int
    sop_uid: str
    calling_ae: str
    modality: str
    sop_class_uid: str


@dataclass(frozen=True)
class Entry:
    """One outbox row waiting to be sent, with the instance it names (``None`` fields
    when the instance is no longer indexed)."""

    key: int
    change_seq: int
    route: str
    sop_uid: str
    queued_at: float
    study_uid: str | None
    series_uid: str | None
    sop_class_uid: str | None
    transfer_syntax: str | None
    object_key: str | None
    size: int | None


@dataclass(frozen=True)
class Backlog:
    """One destination as ``pacs status`` shows it."""

    destination: str
    waiting: int
    oldest_queued_at: float | None
    failed: int
    last_error: str
    last_error_at: float | None
    last_success_at: float | None
    next_attempt: float


def head(conn: apsw.Connection) -> int:
    """The largest change number in the instance table."""
    row = conn.execute("SELECT coalesce(max(change_seq), 0) FROM instance").fetchone()
    return int(row[0]) if row else 0


def cursor(conn: apsw.Connection) -> int | None:
    """The last change number the forwarder has read; ``None`` before its first run."""
    row = conn.execute("SELECT seq FROM forward_cursor WHERE id = 1").fetchone()
    return int(row[0]) if row else None


def move_cursor(conn: apsw.Connection, seq: int) -> None:
    """Set the cursor (creating it)."""
    conn.execute("INSERT INTO forward_cursor (id, seq) VALUES (1, ?) "
                 "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq", (seq,))


def unrouted_since(conn: apsw.Connection) -> int | None:
    """The newest change number when a run without routes began (the first of such
    runs since the last with routes); ``None`` when the last run had routes."""
    row = conn.execute("SELECT seq FROM forward_unrouted WHERE single = 1").fetchone()
    return int(row[0]) if row else None


def mark_unrouted(conn: apsw.Connection, seq: int) -> None:
    """Record that a run without routes begins after change ``seq``, unless one is
    recorded already (the first such run marks where they began)."""
    conn.execute("INSERT INTO forward_unrouted (single, seq) VALUES (1, ?) "
                 "ON CONFLICT(single) DO NOTHING", (seq,))


def drop_unrouted(conn: apsw.Connection) -> None:
    """Forget the mark of :func:`mark_unrouted`."""
    conn.execute("DELETE FROM forward_unrouted WHERE single = 1")


def changes(conn: apsw.Connection, after: int, limit: int,
            upto: int | None = None) -> list[Change]:
    """Up to ``limit`` instance rows changed after number ``after`` (and, with
    ``upto``, not after it), in order."""
    return [Change(int(row[0]), str(row[1]), str(row[2] or ""), str(row[3] or ""),
                   str(row[4] or "")) for row in conn.execute(
        "SELECT instance.change_seq, instance.sop_uid, instance.calling_ae, "
        "series.modality, instance.sop_class_uid FROM instance "
        "JOIN series ON series.pk = instance.series_pk "
        "WHERE instance.change_seq > ? AND instance.change_seq <= coalesce(?, "
        "instance.change_seq) ORDER BY instance.change_seq LIMIT ?", (after, upto, limit))]


_QUEUE_SQL = (
    "INSERT INTO outbox (destination, route, sop_uid, change_seq, queued_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(destination, sop_uid) DO UPDATE SET "
    "route = excluded.route, change_seq = excluded.change_seq, failed_at = NULL, "
    "last_error = '', attempts = 0")


def queue(conn: apsw.Connection, entries: Iterable[tuple[str, str, str, int]],
          now: float) -> None:
    """Add (destination, route, SOP Instance UID, change number) entries; an instance
    already waiting for the destination (or failed there) takes the newer number and
    waits again, keeping its place in the queue."""
    conn.executemany(_QUEUE_SQL, ((d, r, s, n, now) for d, r, s, n in entries))


def waiting(conn: apsw.Connection, destination: str, limit: int) -> list[Entry]:
    """The first ``limit`` entries waiting for ``destination``, with their instances."""
    return [Entry(*row) for row in conn.execute(
        "SELECT outbox.pk, outbox.change_seq, outbox.route, outbox.sop_uid, "
        "outbox.queued_at, study.study_uid, series.series_uid, instance.sop_class_uid, "
        "instance.transfer_syntax, instance.object_key, instance.size FROM outbox "
        "LEFT JOIN instance ON instance.sop_uid = outbox.sop_uid "
        "LEFT JOIN series ON series.pk = instance.series_pk "
        "LEFT JOIN study ON study.pk = series.study_pk "
        "WHERE outbox.destination = ? AND outbox.failed_at IS NULL "
        "ORDER BY outbox.pk LIMIT ?", (destination, limit))]


def remove(conn: apsw.Connection, done: Sequence[tuple[int, int]]) -> None:
    """Delete entries by (key, change number): an entry whose instance was stored again
    meanwhile has a newer number, and stays."""
    conn.executemany("DELETE FROM outbox WHERE pk = ? AND change_seq = ?", done)


def mark_failed(conn: apsw.Connection, failed: Sequence[tuple[int, int, str]],
                now: float) -> None:
    """Keep entries (key, change number, reason) as refused for good."""
    conn.executemany(
        "UPDATE outbox SET failed_at = ?, last_error = ? WHERE pk = ? AND change_seq = ?",
        ((now, reason, key, seq) for key, seq, reason in failed))


def drop_refused_removed(conn: apsw.Connection, destination: str) -> None:
    """Delete ``destination``'s refused entries whose instances were removed since:
    nothing is left to send again, nor to count as refused."""
    conn.execute("DELETE FROM outbox WHERE destination = ? AND failed_at IS NOT NULL "
                 "AND NOT EXISTS (SELECT 1 FROM instance "
                 "WHERE instance.sop_uid = outbox.sop_uid)", (destination,))


def retry_failed(conn: apsw.Connection, destination: str) -> int:
    """Put a destination's failed entries back in its queue; how many."""
    conn.execute("UPDATE outbox SET failed_at = NULL, last_error = '', attempts = 0 "
                 "WHERE destination = ? AND failed_at IS NOT NULL", (destination,))
    return int(conn.changes())


def passed_over(conn: apsw.Connection, entries: Sequence[tuple[int, int]],
                limit: int) -> list[tuple[int, int]]:
    """Count a batch that did not deliver these (key, change number) entries, though
    the destination took others of it or stopped answering on them
    (:meth:`pacs.core.forwarding.Outbox.settle`); those passed over ``limit`` times or
    more."""
    over = []
    for key, seq in entries:
        row = conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE pk = ? AND "
                           "change_seq = ? RETURNING attempts", (key, seq)).fetchone()
        if row is not None and int(row[0]) >= limit:
            over.append((key, seq))
    return over


def partly_delivered(conn: apsw.Connection, destination: str, error: str, now: float,
                     wait: float) -> None:
    """A destination took some instances of a batch and not others: it works (its
    backoff ends, its last success now), and the others are tried again in ``wait``
    seconds (``error``: why they were not taken)."""
    conn.execute(
        "INSERT INTO forward_destination (name, failures, next_attempt, last_error, "
        "last_error_at, last_success_at) VALUES (?, 0, ?, ?, ?, ?) ON CONFLICT(name) DO "
        "UPDATE SET failures = 0, next_attempt = excluded.next_attempt, "
        "last_error = excluded.last_error, last_error_at = excluded.last_error_at, "
        "last_success_at = excluded.last_success_at",
        (destination, now + wait, error, now, now))


def count_waiting(conn: apsw.Connection, destination: str) -> int:
    """Entries waiting for ``destination`` (failed ones excluded)."""
    row = conn.execute("SELECT count(*) FROM outbox WHERE destination = ? "
                       "AND failed_at IS NULL", (destination,)).fetchone()
    return int(row[0]) if row else 0


def succeeded(conn: apsw.Connection, destination: str, now: float) -> None:
    """A destination acknowledged a batch: its backoff ends."""
    conn.execute(
        "INSERT INTO forward_destination (name, failures, next_attempt, last_success_at) "
        "VALUES (?, 0, 0, ?) ON CONFLICT(name) DO UPDATE SET failures = 0, "
        "next_attempt = 0, last_success_at = excluded.last_success_at", (destination, now))


def failed(conn: apsw.Connection, destination: str, error: str, now: float,
           backoff: Callable[[int], float]) -> float:
    """A destination failed a batch: count it and set its next attempt after
    ``backoff(failures before this one)`` seconds; that delay."""
    row = conn.execute("SELECT failures FROM forward_destination WHERE name = ?",
                       (destination,)).fetchone()
    wait = backoff(int(row[0]) if row else 0)
    conn.execute(
        "INSERT INTO forward_destination (name, failures, next_attempt, last_error, "
        "last_error_at) VALUES (?, 1, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
        "failures = failures + 1, next_attempt = excluded.next_attempt, "
        "last_error = excluded.last_error, last_error_at = excluded.last_error_at",
        (destination, now + wait, error, now))
    return wait


def refused(conn: apsw.Connection, destination: str, error: str, now: float) -> None:
    """Note a destination's refusal of an instance as its last error (no backoff)."""
    conn.execute(
        "INSERT INTO forward_destination (name, last_error, last_error_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET last_error = excluded.last_error, "
        "last_error_at = excluded.last_error_at", (destination, error, now))


def next_attempt(conn: apsw.Connection, destination: str) -> float:
    """When the destination may be tried again (0: now)."""
    row = conn.execute("SELECT next_attempt FROM forward_destination WHERE name = ?",
                       (destination,)).fetchone()
    return float(row[0]) if row else 0.0


def backlogs(conn: apsw.Connection) -> list[Backlog]:
    """Every destination with entries or a recorded state, by name (a URL shown
    without its credentials).

    Raises
    ------
    IndexFailure
        The index cannot be read.
    """
    try:
        rows = conn.execute(
            "WITH names AS (SELECT DISTINCT destination AS name FROM outbox "
            "UNION SELECT name FROM forward_destination) "
            "SELECT names.name, "
            "(SELECT count(*) FROM outbox WHERE destination = names.name "
            " AND failed_at IS NULL), "
            "(SELECT min(queued_at) FROM outbox WHERE destination = names.name "
            " AND failed_at IS NULL), "
            "(SELECT count(*) FROM outbox WHERE destination = names.name "
            " AND failed_at IS NOT NULL), "
            "coalesce(d.last_error, ''), d.last_error_at, d.last_success_at, "
            "coalesce(d.next_attempt, 0) "
            "FROM names LEFT JOIN forward_destination AS d ON d.name = names.name "
            "ORDER BY names.name").fetchall()
    except apsw.Error as exc:
        raise IndexFailure(f"forwarding backlog failed: {exc}") from exc
    return [_backlog(tuple(row)) for row in rows]


def _backlog(r: tuple[Any, ...]) -> Backlog:
    return Backlog(shown(str(r[0])), int(r[1]), _time(r[2]), int(r[3]), str(r[4]),
                   _time(r[5]), _time(r[6]), float(r[7]))


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


__all__ = ["Backlog", "Change", "Entry", "backlogs", "changes", "count_waiting", "cursor",
           "failed", "head", "mark_failed", "move_cursor", "next_attempt",
           "queue", "refused", "remove", "retry_failed", "succeeded", "waiting"]
