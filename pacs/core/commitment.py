"""Storage commitment (PS3.4 Annex J): what the node commits to, and the durable queue of
results waiting for delivery.  Protocol-free: the DIMSE edge (:mod:`pacs.dimse.commitment`,
:mod:`pacs.dimse.reports`) turns an N-ACTION into a :class:`Request` and a
:class:`Result` into an N-EVENT-REPORT.

The node commits to an instance only when it holds it as acknowledged: the index lists
the SOP Instance UID with the same SOP Class UID, and the object in the store has the
SHA-256 and size the index recorded at ingest (read back through the store, so that a
lost or altered object is never committed).  Otherwise the instance fails with a reason
of PS3.3 C.14.1.1: 0112 when the index does not hold it, 0119 when it holds it under
another SOP class, 0110 when its object is missing, unreadable or not the bytes stored.

A request is recorded (:meth:`Commitments.record`) before the N-ACTION is answered and
stays until its result is delivered (or dropped, when the requestor can no longer be
reached or refuses it for good: :mod:`pacs.dimse.reports`): a restart never drops it.
A Transaction UID names one request (PS3.4 J.3.2.1.2): a request repeating the
Transaction UID and the references of one of the requestor's that waits is answered by
that one's report; with other references it is refused (the case of PS3.3 C.14.1.1's
Failure Reason 0131, Duplicate transaction UID, answered on the N-ACTION: the waiting
request's report is not changed under it).

The result is checked once, and again before each delivery attempt
(:meth:`Commitments.recheck`), so that the requestor never deletes its copy of an
instance the node no longer holds as verified (Event Type 1 says the node keeps every
instance, PS3.4 J.3.3.1.2): an instance committed at the first check whose row has gone
since (a rejection note, a deletion, a retention expiry) fails with 0112 in the report,
and one whose row is another instance's since (the SOP Instance UID stored again with
other content: its SHA-256 is not the one verified, which the result keeps) fails with
0110.  Bounds: references per request (``PACS_COMMITMENT_MAX_REFERENCES``) and requests
waiting (``PACS_COMMITMENT_MAX_PENDING``), a tenth of those (at least ten) per
requestor's AE title and a quarter (at least ten) per network address, so that a peer
naming itself anew in each request does not fill the queue either; past any of them the
request is refused.  A result not delivered within ``PACS_COMMITMENT_KEEP`` seconds of
its request is dropped when the queue is next claimed from or recorded to
(:meth:`Commitments.due`, :meth:`Commitments.record`): a requestor that never takes its
results (decommissioned, refusing associations) would otherwise hold its share of the
queue, and have every later request refused, for good.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pacs.core.config import Settings
from pacs.core.errors import InvalidRequest, NotFound, ResourceLimitation, StorageError
from pacs.core.index import commitments as table
from pacs.core.index.connection import Index
from pacs.core.index.reads import (
    MAX_KEYS,
    StoredInstance,
    commitments_waiting,
    lookup_classes,
)
from pacs.core.storage import ObjectStore, digest

if TYPE_CHECKING:
    import apsw

log = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3.5).
PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"

#: Failure Reason (0008,1197) values (PS3.3 C.14.1.1).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

#: Event Type IDs of the Storage Commitment Result (PS3.4 J.3.3.1.2).
ALL_COMMITTED, FAILURES_EXIST = 1, 2

#: A requestor's results wait at most one PER_REQUESTOR_SHARE-th of
#: ``PACS_COMMITMENT_MAX_PENDING``, and never fewer than PER_REQUESTOR_FLOOR (or all).
PER_REQUESTOR_SHARE, PER_REQUESTOR_FLOOR = 10, 10
#: The results of requests from one network address (whatever AE titles they name) wait
#: at most one PER_ADDRESS_SHARE-th of it, at least PER_REQUESTOR_FLOOR: more than one
#: AE title's, since a router or gateway may send for several modalities.
PER_ADDRESS_SHARE = 4

#: Seconds before the second delivery attempt; each further one waits twice as long as
#: the one before, up to :data:`RETRY_MAX`.
RETRY_FIRST = 2.0
RETRY_MAX = 300.0


@dataclass(frozen=True)
class Reference:
    """One item of the Referenced SOP Sequence (0008,1199)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Request:
    """A Storage Commitment Request (PS3.4 J.3.2): who asked, its Transaction UID, the
    referenced instances in the order received, the node's AE title it came in on
    (its result is reported from that title; ``""``: the customer's first), and the
    network address it came from (``""``: not known)."""

    requestor_ae: str
    transaction_uid: str
    references: tuple[Reference, ...]
    called_ae: str = ""
    address: str = ""


@dataclass(frozen=True)
class Result:
    """What the node commits to: every referenced instance, committed or failed with
    its Failure Reason (PS3.4 J.3.3.1.2: both lists together name the whole request).

    Attributes
    ----------
    committed :
        The committed references, in the order of the request.
    failed :
        The failed references, each with its Failure Reason (PS3.3 C.14.1.1).
    checksums :
        The SHA-256 (hex) the index recorded at ingest for each committed instance, as
        verified, in the order of ``committed``: what :meth:`Commitments.recheck` tells
        the instance verified from another stored since under its UID by.  Empty when
        not known (:attr:`complete`).
    """

    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]
    checksums: tuple[str, ...] = ()

    @property
    def event_type(self) -> int:
        """1 when every instance is committed, 2 when failures exist."""
        return FAILURES_EXIST if self.failed else ALL_COMMITTED

    @property
    def complete(self) -> bool:
        """True when each committed instance has its checksum."""
        return len(self.checksums) == len(self.committed)

    def to_json(self) -> str:
        """The result as stored in the queue: ``committed`` a list of [SOP Class UID,
        SOP Instance UID, SHA-256] (without the SHA-256 when not known), ``failed`` a
        list of [SOP Class UID, SOP Instance UID, Failure Reason]."""
        committed: list[list[str]] = [[r.sop_class_uid, r.sop_instance_uid]
                                      for r in self.committed]
        if self.complete:
            for item, checksum in zip(committed, self.checksums, strict=True):
                item.append(checksum)
        return json.dumps({
            "committed": committed,
            "failed": [[r.sop_class_uid, r.sop_instance_uid, reason]
                       for r, reason in self.failed]})

    @classmethod
    def from_json(cls, text: str) -> Result:
        """A result :meth:`to_json` wrote: with its checksums, or (committed items of
        two UIDs) without."""
        data = json.loads(text)
        committed = [(str(item[0]), str(item[1]), str(item[2]) if len(item) > 2 else None)
                     for item in data["committed"]]
        checksums = tuple(checksum for _, _, checksum in committed if checksum is not None)
        return cls(tuple(Reference(c, i) for c, i, _ in committed),
                   tuple((Reference(c, i), int(reason)) for c, i, reason in data["failed"]),
                   checksums if len(checksums) == len(committed) else ())


def _references_json(references: Iterable[Reference]) -> str:
    return json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in references])


def _references(text: str) -> tuple[Reference, ...]:
    return tuple(Reference(c, i) for c, i in json.loads(text))


# --- verification ------------------------------------------------------------------------

#: Objects read by :func:`verify` between two calls of its ``held`` callback.
HELD_EVERY = 64


def verify(index: Index, store: ObjectStore, references: Sequence[Reference],
           held: Callable[[], bool] | None = None) -> Result | None:
    """Check each referenced instance against the index and the store.

    Parameters
    ----------
    index, store :
        The node's index and object store (:class:`pacs.core.services.Services`).
    references :
        The request's references; a repeated instance is checked once.
    held : callable, optional
        Asked every :data:`HELD_EVERY` objects read (a long check renews its claim's
        lease); when it answers False the check stops and ``None`` is returned.

    Raises
    ------
    IndexFailure
        When the index cannot be read (the check is tried again later).
    """
    indexed = _indexed(index, references)
    intact: dict[str, bool] = {}
    committed: list[Reference] = []
    checksums: list[str] = []
    failed: list[tuple[Reference, int]] = []
    for ref in references:
        reason = _not_indexed(ref, indexed)
        if reason is not None:
            failed.append((ref, reason))
            continue
        stored = indexed[ref.sop_instance_uid][1]
        if ref.sop_instance_uid not in intact:
            if held is not None and intact and len(intact) % HELD_EVERY == 0 and not held():
                return None
            intact[ref.sop_instance_uid] = _intact(store, stored)
        if intact[ref.sop_instance_uid]:
            committed.append(ref)
            checksums.append(stored.checksum)
        else:
            failed.append((ref, PROCESSING_FAILURE))
    return Result(tuple(committed), tuple(failed), tuple(checksums))


def _indexed(index: Index, references: Sequence[Reference]
             ) -> dict[str, tuple[str, StoredInstance]]:
    """SOP Instance UID -> (SOP Class UID, stored facts) of the referenced instances
    the index holds."""
    uids = list(dict.fromkeys(ref.sop_instance_uid for ref in references))
    indexed: dict[str, tuple[str, StoredInstance]] = {}
    for start in range(0, len(uids), MAX_KEYS):
        indexed.update(lookup_classes(index.connection(), uids[start:start + MAX_KEYS]))
    return indexed


def _not_indexed(ref: Reference, indexed: dict[str, tuple[str, StoredInstance]]
                 ) -> int | None:
    """The Failure Reason of a reference the index does not hold as referenced: 0112
    not at all, 0119 under another SOP class; ``None`` when it does."""
    found = indexed.get(ref.sop_instance_uid)
    if found is None:
        return NO_SUCH_OBJECT_INSTANCE
    return CLASS_INSTANCE_CONFLICT if found[0] != ref.sop_class_uid else None


def _intact(store: ObjectStore, stored: StoredInstance) -> bool:
    """True when the object is the one the index acknowledged (SHA-256 and size)."""
    try:
        return digest(store, stored.object_key, stored.size) == (stored.checksum, stored.size)
    except NotFound:
        log.warning("storage commitment: an indexed object is missing from the store")
    except StorageError as exc:
        log.warning("storage commitment: an object could not be read (%s)", exc)
    return False


# --- the queue ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Pending:
    """A waiting request claimed by this thread: deliver it, or give it back.

    Attributes
    ----------
    key, claim :
        Its row and the token of this thread's lease.
    request :
        The request.
    result :
        Its verification's result, once kept (:meth:`Commitments.keep`).
    attempts :
        Delivery attempts that failed before this one.
    received :
        POSIX time at which the request was recorded.
    """

    key: int
    claim: str
    request: Request
    result: Result | None
    attempts: int
    received: float


def _iso(posix: float) -> str:
    """The stored form of a time (ISO 8601, UTC, milliseconds): one form for every row,
    so that the table compares them as text (:func:`pacs.core.index.commitments.expire`)."""
    return datetime.fromtimestamp(posix, UTC).isoformat(timespec="milliseconds")


def _posix(iso: str) -> float:
    """POSIX time of a stored ISO 8601 time (0 when it does not read)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def retry_delay(attempts: int) -> float:
    """Seconds before the next delivery attempt after ``attempts`` failed ones."""
    return min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(32, max(0, attempts - 1)))


class Commitments:
    """The durable queue of storage commitment requests (table ``commitment``).

    Parameters
    ----------
    index : Index
        The node's index.
    max_pending : int
        Requests kept waiting at most (``PACS_COMMITMENT_MAX_PENDING``).
    max_references : int
        References per request at most (``PACS_COMMITMENT_MAX_REFERENCES``).
    lease : float
        Seconds a claim holds a request before another process may take it: longer than
        one step of a delivery (an association, a report and its response); each step
        renews it first, and a verification every :data:`HELD_EVERY` objects.
    clock : callable
        POSIX time (tests move it).
    max_age : float
        Seconds after its request a result not delivered yet is dropped
        (``PACS_COMMITMENT_KEEP``, its default when not given; :meth:`_expire`).
    """

    def __init__(self, index: Index, max_pending: int, max_references: int, lease: float,
                 clock: Callable[[], float] = time.time,
                 max_age: float = Settings.commitment_keep) -> None:
        self.index = index
        self.max_pending = max_pending
        # One requestor (any AE title may ask, by default) cannot fill the queue and
        # refuse every other modality's requests for as long as its results wait.
        self.max_per_requestor = min(max_pending, max(PER_REQUESTOR_FLOOR,
                                                      max_pending // PER_REQUESTOR_SHARE))
        # Nor one address, naming itself anew in each request.
        self.max_per_address = min(max_pending, max(PER_REQUESTOR_FLOOR,
                                                    max_pending // PER_ADDRESS_SHARE))
        self.max_references = max_references
        self.lease = lease
        self.clock = clock
        self.max_age = max_age

    def check(self, request: Request) -> None:
        """Refuse a request that breaks PS3.4 J.3.2 or the reference bound.

        Raises
        ------
        InvalidRequest
            No (valid) Transaction UID, or no reference.
        ResourceLimitation
            More than ``max_references`` references.
        """
        if not request.transaction_uid:
            raise InvalidRequest("no valid Transaction UID")
        if not request.references:
            raise InvalidRequest("no Referenced SOP Sequence item")
        if len(request.references) > self.max_references:
            raise ResourceLimitation(f"more than {self.max_references} references")

    def record(self, request: Request) -> Pending | None:
        """Keep ``request`` durably, claimed by the caller (who answers the N-ACTION and
        then tries to deliver on the same association); ``None`` when it repeats the
        Transaction UID and references of one of the requestor's that waits (a requestor
        sending its N-ACTION again): that one's report answers both.

        Raises
        ------
        InvalidRequest
            See :meth:`check`; also a waiting request of the requestor has the same
            Transaction UID and other references.
        ResourceLimitation
            See :meth:`check`; also ``max_pending`` requests (or the requestor's or its
            address' share) wait already.
        IndexFailure
            When it could not be written (nothing is kept).
        """
        self.check(request)
        claim = secrets.token_hex(8)
        now = self.clock()
        received = _iso(now)
        refs = _references_json(request.references)
        with self.index.write() as conn:
            # Results past their keeping go before the bounds are counted: they are not
            # waiting for delivery any more.
            expired = self._expire(conn, now)
            waiting = table.waiting_refs(conn, request.requestor_ae, request.transaction_uid)
            if waiting == refs:
                return None
            if waiting is not None:
                raise InvalidRequest("the Transaction UID is in use by a waiting request "
                                     "with other references")
            if commitments_waiting(conn) >= self.max_pending:
                raise ResourceLimitation(f"{self.max_pending} storage commitment results "
                                         "wait for delivery already")
            if commitments_waiting(conn, request.requestor_ae) >= self.max_per_requestor:
                raise ResourceLimitation(f"{self.max_per_requestor} results for this AE "
                                         "wait for delivery already")
            if (request.address
                    and commitments_waiting(conn, address=request.address)
                    >= self.max_per_address):
                raise ResourceLimitation(f"{self.max_per_address} results for this "
                                         "address wait for delivery already")
            key = table.record(conn, request.requestor_ae, request.transaction_uid, received,
                               refs, now, now + self.lease, claim, request.called_ae,
                               request.address)
        _dropped(expired, self.max_age)
        return Pending(key, claim, request, None, 0, now)

    def due(self, limit: int = 1) -> list[Pending]:
        """Claim up to ``limit`` requests whose next attempt is due, once those past
        their keeping are dropped (:meth:`_expire`)."""
        now = self.clock()
        with self.index.write() as conn:
            expired = self._expire(conn, now)
            claimed = self._take(conn, table.due(conn, now, limit), now)
        _dropped(expired, self.max_age)
        return claimed

    def _expire(self, conn: apsw.Connection, now: float) -> list[str]:
        """Delete the requests recorded more than ``max_age`` seconds ago whose result
        is not delivered, none claimed (a delivery in progress ends first, and its
        request goes at the next look); the requestor of each (to log,
        :func:`_dropped`, once the write is done).

        The requestor, never told, keeps its copies (PS3.4 J.3.3.1.2: only a result
        tells it that it may delete them); without an end, a requestor that never takes
        its results would hold its share of the queue, and have each later request of
        its refused, for good.
        """
        if now - self.max_age <= 0:
            return []  # none recorded that long ago
        return table.expire(conn, _iso(now - self.max_age), now)

    def of_requestor(self, requestor_ae: str, limit: int = 16) -> list[Pending]:
        """Claim up to ``limit`` waiting requests of ``requestor_ae``, due or not (it has
        just opened an association their results may go on); none claimed by another."""
        now = self.clock()
        if not table.of_requestor(self.index.connection(), requestor_ae, now, 1):
            return []  # the usual case, answered without the write lock
        with self.index.write() as conn:
            return self._take(conn, table.of_requestor(conn, requestor_ae, now, limit), now)

    def _take(self, conn: apsw.Connection, rows: list[table.Row], now: float
              ) -> list[Pending]:
        """Claim ``rows`` (those another holder did not take first)."""
        claimed = []
        for row in rows:
            claim = secrets.token_hex(8)
            if table.take(conn, row.key, claim, now, now + self.lease):
                request = Request(row.requestor_ae, row.transaction_uid,
                                  _references(row.refs), row.called_ae, row.address)
                result = Result.from_json(row.result) if row.result else None
                if result is not None and not result.complete:
                    # Kept without the checksums its committed instances were verified
                    # with: nothing tells those instances from others stored since
                    # under their UIDs, so the request is verified again.
                    result = None
                claimed.append(Pending(row.key, claim, request, result, row.attempts,
                                       _posix(row.received_at)))
        return claimed

    def next_time(self) -> float | None:
        """POSIX time at which the next request may be claimed; ``None``: none waits."""
        return table.next_time(self.index.connection())

    def verify(self, pending: Pending, store: ObjectStore) -> Pending | None:
        """Check the request's instances (:func:`verify`, renewing the lease as it
        goes) and keep the result; ``None`` when the claim was lost meanwhile.

        Raises
        ------
        IndexFailure
            When the index could not be read or written.
        """
        result = verify(self.index, store, pending.request.references,
                        held=lambda: self.renew(pending))
        return None if result is None else self.keep(pending, result)

    def keep(self, pending: Pending, result: Result) -> Pending | None:
        """Store the verification's result and renew the lease; ``None`` when the claim
        was lost (another took the request, or the requestor replaced it)."""
        with self.index.write() as conn:
            held = table.renew(conn, pending.key, pending.claim,
                               self.clock() + self.lease, result.to_json())
        return Pending(pending.key, pending.claim, pending.request, result,
                       pending.attempts, pending.received) if held else None

    def recheck(self, pending: Pending) -> Pending | None:
        """``pending`` with each committed instance the index no longer holds as
        verified failed, the result kept when it changed; ``None`` when the claim was
        lost.  Called before each delivery attempt (module docstring); the objects are
        not read again: the index's row is the one verified while it has the same SOP
        class and the SHA-256 the result keeps (PS3.4 J.3.3.1.2: Event Type 1 tells the
        requestor it may delete its copy).

        Failure Reasons (PS3.3 C.14.1.1): 0112 when the row is gone, 0119 when it has
        another SOP class, 0110 (Processing failure) when it is another instance's, or
        its checksum was not kept.

        Raises
        ------
        IndexFailure
            When the index could not be read or written.
        """
        result = pending.result
        if result is None or not result.committed:
            return pending
        indexed = _indexed(self.index, result.committed)
        checksums = result.checksums if result.complete else ("",) * len(result.committed)
        committed: list[Reference] = []
        kept: list[str] = []
        failed = list(result.failed)
        for ref, checksum in zip(result.committed, checksums, strict=True):
            reason = _not_indexed(ref, indexed)
            if reason is None and (not checksum
                                   or indexed[ref.sop_instance_uid][1].checksum != checksum):
                reason = PROCESSING_FAILURE
            if reason is None:
                committed.append(ref)
                kept.append(checksum)
            else:
                failed.append((ref, reason))
        if len(committed) == len(result.committed):
            return pending
        log.warning("storage commitment: %d committed instance(s) no longer held as "
                    "verified at the report; reported as failed",
                    len(result.committed) - len(committed))
        return self.keep(pending, Result(tuple(committed), tuple(failed), tuple(kept)))

    def renew(self, pending: Pending) -> bool:
        """Renew the lease before a step that takes time; False when lost."""
        with self.index.write() as conn:
            return table.renew(conn, pending.key, pending.claim, self.clock() + self.lease)

    def remove(self, pending: Pending) -> None:
        """The request is done: its result delivered (PS3.4 J.3.3.1.2: its Transaction
        UID is no longer active), or dropped."""
        with self.index.write() as conn:
            table.remove(conn, pending.key, pending.claim)

    def failed(self, pending: Pending, error: str, at_least: float = 0.0) -> float:
        """An attempt failed: schedule the next one (:func:`retry_delay`, ``at_least``
        seconds from now) and give the request back; the seconds until it."""
        delay = max(at_least, retry_delay(pending.attempts + 1))
        with self.index.write() as conn:
            table.reschedule(conn, pending.key, pending.claim, self.clock() + delay,
                             error[:200])
        return delay

    def postpone_requestor(self, pending: Pending, delay: float) -> int:
        """The other waiting requests of ``pending``'s requestor not tried before
        ``delay`` seconds from now: a report to it has just failed (its node off, a
        firewall dropping the connection), each try of one costs up to the network
        timeout, and the reports of other requestors, queued behind them, would wait for
        every one.  How many were postponed (``pending``, rescheduled already, is not
        counted)."""
        now = self.clock()
        with self.index.write() as conn:
            return table.postpone(conn, pending.request.requestor_ae, now + delay, now,
                                  pending.key)

    def release(self, pending: Pending) -> None:
        """Give a claimed request back untried (the process stops)."""
        with self.index.write() as conn:
            table.release(conn, pending.key, pending.claim)


def _dropped(requestors: list[str], max_age: float) -> None:
    """Log the requests :meth:`Commitments._expire` dropped: how many per requestor's AE
    title, nothing of their instances."""
    for requestor, count in sorted(Counter(requestors).items()):
        log.warning("storage commitment: %d result(s) for %s dropped: not delivered within "
                    "%.0f s of their request (PACS_COMMITMENT_KEEP); the requestor, never "
                    "told, keeps its copies", count, requestor, max_age)


__all__ = ["ALL_COMMITTED", "CLASS_INSTANCE_CONFLICT", "FAILURES_EXIST",
           "NO_SUCH_OBJECT_INSTANCE", "PROCESSING_FAILURE", "PUSH_MODEL",
           "PUSH_MODEL_INSTANCE", "Commitments", "Pending", "Reference", "Request",
           "Result", "retry_delay", "verify"]
