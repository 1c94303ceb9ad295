"""The storage commitment table: requests waiting for their result to be delivered.

Statements only, each a small named function over the caller's connection with bound
parameters; :class:`pacs.core.commitment.Commitments` decides when each runs (writes
inside :meth:`pacs.core.index.connection.Index.write`).  A row is *claimed* by one
thread of one process at a time: its ``claim`` token and ``lease_until`` time, set only
where the lease has run out (or by the thread that holds it), so that the DIMSE worker
processes never deliver the same result twice at once, and a process that died leaves
its rows to the others once their leases end.  The table itself is described by its
migration (:func:`pacs.core.index.migrations._storage_commitment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import apsw


@dataclass(frozen=True)
class Row:
    """One waiting request, as stored.

    Attributes
    ----------
    key :
        The row's key.
    requestor_ae, transaction_uid :
        Who asked, and the Transaction UID of the request (PS3.4 J.3.2).
    called_ae :
        The node's AE title the request came in on (``''``: not recorded).
    refs :
        The referenced instances, as JSON.
    result :
        The verification's result as JSON; ``None`` until verified.
    attempts :
        Delivery attempts that failed so far.
    received_at :
        When the request was recorded (ISO 8601, UTC).
    address :
        The network address the request came from (``''``: not known).
    """

    key: int
    requestor_ae: str
    transaction_uid: str
    refs: str
    result: str | None
    attempts: int
    called_ae: str
    received_at: str
    address: str


_COLUMNS = ("pk, requestor_ae, transaction_uid, refs, result, attempts, called_ae, "
            "received_at, address")


def waiting_refs(conn: apsw.Connection, requestor_ae: str, transaction_uid: str
                 ) -> str | None:
    """The references (JSON) of this requestor's waiting request of this Transaction
    UID; ``None`` when none waits."""
    row = conn.execute(
        "SELECT refs FROM commitment WHERE requestor_ae = ? AND transaction_uid = ?",
        (requestor_ae, transaction_uid)).fetchone()
    return None if row is None else str(row[0])


_RECORD_SQL = (
    "INSERT INTO commitment (requestor_ae, transaction_uid, received_at, refs, "
    "next_attempt, lease_until, claim, called_ae, address) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING pk")


def record(conn: apsw.Connection, requestor_ae: str, transaction_uid: str,
           received_at: str, refs: str, now: float, lease_until: float, claim: str,
           called_ae: str = "", address: str = "") -> int:
    """Insert a request claimed by ``claim``; its key (a waiting request of the same
    requestor and Transaction UID is a constraint error: the caller looks first,
    :func:`waiting_refs`)."""
    row = conn.execute(_RECORD_SQL, (requestor_ae, transaction_uid, received_at, refs, now,
                                     lease_until, claim, called_ae, address)).fetchone()
    if row is None:  # RETURNING answers the row inserted or updated
        raise apsw.SQLError("no key returned for a commitment row")
    return int(row[0])


def due(conn: apsw.Connection, now: float, limit: int) -> list[Row]:
    """Up to ``limit`` requests whose next attempt is due and whose lease has ended,
    the longest waiting first."""
    return [Row(*row) for row in conn.execute(
        f"SELECT {_COLUMNS} FROM commitment WHERE next_attempt <= ? AND lease_until <= ? "
        "ORDER BY next_attempt LIMIT ?", (now, now, limit))]


def of_requestor(conn: apsw.Connection, requestor_ae: str, now: float,
                 limit: int) -> list[Row]:
    """Up to ``limit`` requests of ``requestor_ae`` whose lease has ended, due or not,
    the oldest first (the requestor has just opened an association to report on)."""
    return [Row(*row) for row in conn.execute(
        f"SELECT {_COLUMNS} FROM commitment WHERE requestor_ae = ? AND lease_until <= ? "
        "ORDER BY pk LIMIT ?", (requestor_ae, now, limit))]


def postpone(conn: apsw.Connection, requestor_ae: str, until: float, now: float,
             except_key: int) -> int:
    """Move the next attempt of the unclaimed requests of ``requestor_ae`` due before
    ``until``, but ``except_key``'s, to ``until``; how many."""
    conn.execute("UPDATE commitment SET next_attempt = ? WHERE requestor_ae = ? "
                 "AND next_attempt < ? AND lease_until <= ? AND pk != ?",
                 (until, requestor_ae, until, now, except_key))
    return conn.changes()


def take(conn: apsw.Connection, key: int, claim: str, now: float,
         lease_until: float) -> bool:
    """Claim a row whose lease has ended; False when another took it first."""
    conn.execute("UPDATE commitment SET claim = ?, lease_until = ? "
                 "WHERE pk = ? AND lease_until <= ?", (claim, lease_until, key, now))
    return conn.changes() == 1


def renew(conn: apsw.Connection, key: int, claim: str, lease_until: float,
          result: str | None = None) -> bool:
    """Extend a lease (and keep the result, when given); False when the row is gone or
    claimed by another."""
    conn.execute("UPDATE commitment SET lease_until = ?, result = coalesce(?, result) "
                 "WHERE pk = ? AND claim = ?", (lease_until, result, key, claim))
    return conn.changes() == 1


def remove(conn: apsw.Connection, key: int, claim: str) -> bool:
    """Delete a delivered request; False when it was no longer this claim's."""
    conn.execute("DELETE FROM commitment WHERE pk = ? AND claim = ?", (key, claim))
    return conn.changes() == 1


def reschedule(conn: apsw.Connection, key: int, claim: str, next_attempt: float,
               error: str) -> bool:
    """Count a failed attempt, set the next one and give the lease up."""
    conn.execute("UPDATE commitment SET attempts = attempts + 1, next_attempt = ?, "
                 "last_error = ?, lease_until = 0, claim = '' WHERE pk = ? AND claim = ?",
                 (next_attempt, error, key, claim))
    return conn.changes() == 1


def release(conn: apsw.Connection, key: int, claim: str) -> None:
    """Give the lease up without counting an attempt (the process stops)."""
    conn.execute("UPDATE commitment SET lease_until = 0, claim = '' "
                 "WHERE pk = ? AND claim = ?", (key, claim))


def expire(conn: apsw.Connection, received_before: str, now: float) -> list[str]:
    """Delete the unclaimed requests recorded before ``received_before`` (ISO 8601,
    UTC, in the form :func:`record` was given: such times compare as text); the
    requestor's AE title of each."""
    return [str(row[0]) for row in conn.execute(
        "DELETE FROM commitment WHERE received_at < ? AND lease_until <= ? "
        "RETURNING requestor_ae", (received_before, now))]


def next_time(conn: apsw.Connection) -> float | None:
    """When the next request may be claimed (its attempt due and its lease ended);
    ``None`` when none waits."""
    row = conn.execute(
        "SELECT min(max(next_attempt, lease_until)) FROM commitment").fetchone()
    return float(row[0]) if row and row[0] is not None else None


__all__ = ["Row", "due", "expire", "next_time", "of_requestor", "postpone", "record",
           "release", "remove", "renew", "reschedule", "take", "waiting_refs"]
