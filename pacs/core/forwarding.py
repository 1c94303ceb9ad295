"""Forwarding: newly stored instances sent on to other archives by rules
(:mod:`pacs.core.routes`), through a durable outbox.

How an instance travels
-----------------------
1. The ingest commits its instance row; the row takes the next *change number*
   (``instance.change_seq``, set by a trigger in the same transaction, also when the
   row is overwritten).  Forwarding never hooks into the ingest: it follows the index.
2. :meth:`Outbox.feed` reads the rows changed after its cursor, in order, and in one
   write transaction adds an outbox entry per (destination, instance) that a route
   matches and moves the cursor past them.  A crash before the commit reads the same
   rows again; after it, the entries are on disk.  So nothing committed is skipped and
   nothing is queued twice for one change.
3. One thread per destination (:class:`Forwarder`) takes up to ``PACS_FORWARD_BATCH``
   waiting entries, sends them over one association or one STOW-RS request
   (a :class:`Sender`), and settles each by what the destination answered: an
   acknowledged instance leaves the outbox; a refused one (a failure status that
   sending again cannot change) is kept as failed, visible in ``pacs status``;
   anything else (no association, a timeout, a 5xx, out of resources) stays and the
   destination waits ``min(2**failures, PACS_FORWARD_RETRY_MAX)`` seconds.  When the
   destination took others of the batch, it works: what it did not take (a status to
   send again, an object missing here) is tried again after a second, and an entry
   passed over so :data:`PASSED_OVER` times is kept as failed, so that one instance
   never holds the head of the queue.  One on which the destination stopped
   answering (:attr:`Delivery.suspect`: it aborted, or sent no response) goes at the
   end of the batches after, one such at a time behind the others waiting, and is
   counted so while they are delivered: a destination that aborts on one instance
   would otherwise be offered it first in every batch and take nothing, for good; one
   that hangs on every instance takes nothing either way, and loses none.

A restart or an unreachable destination therefore delays delivery and never drops it;
an instance may be sent twice when the node stops between the destination's
acknowledgement and the outbox commit (delivery is at least once).  An instance stored
again while it waits is sent once, as it is when sent; one stored again after it was
sent is sent again.  An instance removed meanwhile leaves the outbox unsent.

The outbox is a table, not memory: a destination down for days holds its entries on
disk.  ``PACS_FORWARD_MAX_OUTBOX`` is the backlog per destination above which a warning
is logged (once a minute) and ``pacs status`` marks the destination; entries are still
recorded, since dropping them would lose data the operator asked to forward.

The cursor starts at the newest change when ``pacs serve`` first starts with routes
(:meth:`Outbox.start`, before it accepts associations): routes forward what arrives
after they exist; ``pacs send`` sends the past.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pacs.core import audit
from pacs.core.audit import AuditTrail, Participant
from pacs.core.errors import PacsError
from pacs.core.index import outbox as table
from pacs.core.index.connection import Index
from pacs.core.logs import one_line
from pacs.core.query.model import InstanceRef
from pacs.core.routes import Route, shown

log = logging.getLogger(__name__)

#: Changed instance rows read per feed transaction (bounds its time and memory).
FEED_ROWS = 500
#: Seconds between two looks at the index when nothing happened.
POLL = 1.0
#: Seconds between two warnings that a destination's backlog is over the limit.
WARN_EVERY = 60.0


class Result(enum.Enum):
    """What became of one instance sent to a destination."""

    SENT = "sent"          #: acknowledged (C-STORE Success or Warning, STOW-RS stored)
    REFUSED = "refused"    #: refused for good: kept as failed, not sent again
    RETRY = "retry"        #: not delivered; sent again after the destination's backoff


#: Characters of a delivery's detail kept: it may quote what a destination sent (an
#: HTTP status line), shown by ``pacs status`` and the logs.
DETAIL_CHARS = 300


@dataclass(frozen=True)
class Delivery:
    """One instance's :class:`Result`, and why (a status, an HTTP answer, an error):
    one line of at most :data:`DETAIL_CHARS` characters, control characters escaped
    (a destination's bytes reach no terminal as they were sent)."""

    result: Result
    detail: str = ""
    #: Seconds the destination asked to be left alone before the next attempt (an
    #: HTTP ``Retry-After``), for a :attr:`Result.RETRY`; ``None``: not asked.
    retry_after: float | None = None
    #: False for a :attr:`Result.RETRY` of an instance the destination never saw
    #: (its association ended before it): not counted as passed over.
    offered: bool = True
    #: True for a :attr:`Result.RETRY` of an instance while whose sending the
    #: destination stopped answering (its association ended, no response), or whose
    #: object is missing here: it may be what the destination cannot take, or cannot
    #: be sent, and goes last in the batches after (:class:`Forwarder`).
    suspect: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", one_line(self.detail, DETAIL_CHARS))


#: Called after each instance of a batch is settled (``pacs send``'s progress bar).
Progress = Callable[[InstanceRef, Delivery], None]


class Sender(Protocol):
    """Sends batches of stored instances to one destination."""

    #: Who receives them, for the audit trail.
    receiver: Participant

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        """Send ``refs`` (one association or request); one :class:`Delivery` per
        instance, in order.  Never raises for what the destination or the network did."""

    def close(self) -> None:
        """Release connections."""


def transfer(sender: Sender, refs: Sequence[InstanceRef], trail: AuditTrail,
             why: str, requestor: Participant | None = None) -> list[Delivery]:
    """Send one batch and record it in the audit trail (PS3.15 A.5.3.7 DICOM Instances
    Transferred, action R, the node as source and the destination as receiver; the
    studies of the instances it acknowledged, or of all when none was).

    Parameters
    ----------
    why : str
        The event's description: the route, or ``pacs send``.
    requestor : Participant, optional
        Who asked for the transfer (the operator of ``pacs send``), named as the
        event's requestor beside the node and the destination, so that it is told from
        forwarding; ``None``: the node's own forwarding, the node the requestor.
    """
    deliveries = _sent(sender, refs)
    sent = [ref for ref, done in zip(refs, deliveries, strict=True)
            if done.result is Result.SENT]
    outcome = audit.batch_outcome(len(sent), len(refs) - len(sent))
    studies = audit.studies_of((ref.study_uid, ref.sop_class_uid) for ref in (sent or refs))
    trail.transferred(audit.APPLICATION_SERVER, audit.READ,
                      trail.node(requestor=requestor is None), sender.receiver, studies,
                      outcome, f"{why}: {len(sent)} of {len(refs)} instance(s) acknowledged",
                      others=[] if requestor is None else [requestor])
    return deliveries


def _sent(sender: Sender, refs: Sequence[InstanceRef]) -> list[Delivery]:
    """``sender.send(refs)``, or, when it raised all the same (a defect, or an answer
    it failed to read), every instance to be sent again: the batch then waits for the
    destination's backoff and is audited as failed, instead of being sent again at
    the next look."""
    try:
        return sender.send(refs)
    except Exception as exc:  # settled as a failed batch
        log.error("forwarding to %s failed unexpectedly (%s)", sender.receiver.user_id,
                  type(exc).__name__, exc_info=True)
        return [Delivery(Result.RETRY, f"failed unexpectedly: {type(exc).__name__}")
                for _ in refs]


#: Batches a destination may take others of while it does not take an instance (a
#: status to try again, its object missing here) before the instance is kept as failed.
PASSED_OVER = 5
#: Entries per destination remembered as suspects (:attr:`Delivery.suspect`).
SUSPECTS_KEPT = 1000


def backoff(failures: int, cap: float) -> float:
    """Seconds to wait after ``failures`` failed batches in a row before this one:
    1, 2, 4 ... up to ``cap``."""
    return float(min(cap, 2.0 ** min(failures, 30)))


class Outbox:
    """The durable outbox of one customer's index.

    Parameters
    ----------
    index : Index
        The customer's index.
    routes : sequence of Route
        The rules.
    batch : int
        Instances per batch (``PACS_FORWARD_BATCH``).
    max_outbox : int
        The backlog per destination beyond which warnings are logged.
    retry_max : float
        The longest wait between two attempts (``PACS_FORWARD_RETRY_MAX``).
    """

    def __init__(self, index: Index, routes: Sequence[Route], batch: int = 50,
                 max_outbox: int = 100_000, retry_max: float = 600.0) -> None:
        self.index = index
        self.routes = tuple(routes)
        self.batch = batch
        self.max_outbox = max_outbox
        self.retry_max = retry_max
        self._warned: dict[str, float] = {}

    @property
    def destinations(self) -> list[str]:
        """Every destination a route names, once each, in route order, as the outbox
        names it (:attr:`pacs.core.routes.Route.target`)."""
        return list(self.endpoints)

    @property
    def endpoints(self) -> dict[str, str]:
        """Each destination as the outbox names it, and as its first route gives it (a
        URL with its credentials, for its sender)."""
        found: dict[str, str] = {}
        for route in self.routes:
            found.setdefault(route.target, route.destination)
        return found

    def start(self) -> None:
        """Start the cursor at the newest change when it has never run (``pacs serve``
        does, before it accepts associations); otherwise leave it where it is, unless
        runs without routes came between (:meth:`unrouted`): then what the last run
        with routes had not fed yet is fed now, and what those runs stored is passed
        over (routes forward what arrives while they are set)."""
        with self.index.write() as conn:
            if table.cursor(conn) is None:  # never ran: no mark either (unrouted)
                table.move_cursor(conn, table.head(conn))
                return
            since = table.unrouted_since(conn)
        if since is None:
            return
        while self.feed(upto=since):
            pass
        with self.index.write() as conn:
            table.move_cursor(conn, max(table.head(conn), since))
            table.drop_unrouted(conn)

    def unrouted(self) -> None:
        """A start without routes (``pacs serve``): nothing is fed while it runs; the
        newest change is marked (by the first such run), so that routes set at a later
        start pass over what these runs stored (:meth:`start`).  The cursor stays where
        the last run with routes left it, and what the outbox holds stays too."""
        with self.index.write() as conn:
            if table.cursor(conn) is not None:
                table.mark_unrouted(conn, table.head(conn))

    def feed(self, limit: int = FEED_ROWS, upto: int | None = None) -> int:
        """Queue what the routes match among the next ``limit`` changed instances (not
        past change ``upto``, when given) and move the cursor past them, in one
        transaction; how many changes were read.

        Raises
        ------
        IndexFailure
            The index is busy or failing (nothing is queued, the cursor stays).
        """
        queued: dict[str, int] = {}
        with self.index.write() as conn:
            after = table.cursor(conn)
            if after is None:
                table.move_cursor(conn, table.head(conn))
                return 0
            found = table.changes(conn, after, limit, upto)
            if not found:
                return 0
            entries = []
            for change in found:
                for destination, route in self._matched(change):
                    entries.append((destination, route, change.sop_uid, change.seq))
                    queued[destination] = queued.get(destination, 0) + 1
            table.queue(conn, entries, time.time())
            table.move_cursor(conn, found[-1].seq)
            over = {d: table.count_waiting(conn, d) for d in queued}
        for destination, count in queued.items():
            log.debug("forwarding: %d instance(s) queued for %s", count, shown(destination))
            self._warn_if_over(destination, over[destination])
        return len(found)

    def _matched(self, change: table.Change) -> Iterable[tuple[str, str]]:
        """(destination, first matching route) pairs of one changed instance."""
        seen: dict[str, str] = {}
        for route in self.routes:
            if route.target not in seen and route.matches(
                    change.calling_ae, change.modality, change.sop_class_uid):
                seen[route.target] = route.name
        return seen.items()

    def _warn_if_over(self, destination: str, waiting: int) -> None:
        if waiting <= self.max_outbox:
            return
        now = time.monotonic()
        if now - self._warned.get(destination, -WARN_EVERY) >= WARN_EVERY:
            self._warned[destination] = now
            log.warning("forwarding: %d instances wait for %s, more than "
                        "PACS_FORWARD_MAX_OUTBOX (%d); they are kept and sent once it "
                        "answers", waiting, shown(destination), self.max_outbox)

    def due_in(self, destination: str) -> float:
        """Seconds until the destination may be tried again (0: now)."""
        return max(0.0, table.next_attempt(self.index.connection(), destination)
                   - time.time())

    def take(self, destination: str, last: Collection[tuple[int, int]] = ()
             ) -> list[table.Entry]:
        """The next batch waiting for ``destination``, the entries of ``last`` (key,
        change number) behind the others: one at the end of a batch of others, more
        only when too few others wait; entries whose instance was removed meanwhile
        leave the outbox (there is nothing left to send)."""
        entries = table.waiting(self.index.connection(), destination,
                                self.batch + len(last))
        gone = [(e.key, e.change_seq) for e in entries if e.object_key is None]
        if gone:
            with self.index.write() as conn:
                table.remove(conn, gone)
            log.info("forwarding: %d instance(s) for %s were removed before they were "
                     "sent", len(gone), shown(destination))
        kept = [e for e in entries if e.object_key is not None]
        others = [e for e in kept if (e.key, e.change_seq) not in last]
        suspects = [e for e in kept if (e.key, e.change_seq) in last]
        # One suspect at the end of a batch of others: taken or not, it is then counted
        # as passed over while they are delivered (settle).
        chosen = others[:self.batch - 1 if suspects and self.batch > 1 else self.batch]
        return chosen + suspects[:self.batch - len(chosen)]

    def settle(self, destination: str, entries: Sequence[table.Entry],
               deliveries: Sequence[Delivery]) -> float | None:
        """Record what a batch came to; the wait before the next attempt when some
        instance must be sent again, else ``None``."""
        now = time.time()
        done: list[tuple[int, int]] = []
        refused: list[tuple[int, int, str]] = []
        retry: list[tuple[tuple[int, int], str]] = []
        offered: set[tuple[int, int]] = set()  # of those, the ones the destination saw
        asked = 0.0  # the longest wait the destination asked for, within retry_max
        for entry, delivery in zip(entries, deliveries, strict=True):
            if delivery.result is Result.SENT:
                done.append((entry.key, entry.change_seq))
            elif delivery.result is Result.REFUSED:
                refused.append((entry.key, entry.change_seq, delivery.detail))
            else:
                retry.append(((entry.key, entry.change_seq), delivery.detail))
                if delivery.offered:
                    offered.add((entry.key, entry.change_seq))
                asked = max(asked, min(delivery.retry_after or 0.0, self.retry_max))
        wait = None
        with self.index.write() as conn:
            table.remove(conn, done)
            # The destination works, these it did not take: tried again soon, not after
            # a growing backoff; one passed over PASSED_OVER times is kept as failed (as
            # a refused one), so that it cannot hold the queue's head, taking a batch's
            # place in each attempt.
            stuck = set(table.passed_over(
                conn, [key for key, _ in retry if key in offered], PASSED_OVER)
            ) if done else set()
            if stuck:
                refused += [(key, seq, f"passed over {PASSED_OVER} times: {detail}")
                            for (key, seq), detail in retry if (key, seq) in stuck]
                retry = [(key, detail) for key, detail in retry if key not in stuck]
                log.warning("forwarding to %s: %d instance(s) it took others beside %d "
                            "times are kept as failed ('pacs send --requeue' queues them "
                            "again)", shown(destination), len(stuck), PASSED_OVER)
            if retry and done:
                wait = max(asked, backoff(0, self.retry_max))
                table.partly_delivered(conn, destination, retry[0][1], now, wait)
            elif retry:
                wait = table.failed(
                    conn, destination, retry[0][1], now,
                    lambda failures: max(asked, backoff(failures, self.retry_max)))
            elif done:
                table.succeeded(conn, destination, now)
            table.mark_failed(conn, refused, now)
            table.drop_refused_removed(conn, destination)
            if refused:
                table.refused(conn, destination, refused[-1][2], now)
        return wait

    def backlogs(self) -> list[table.Backlog]:
        """Every destination's backlog and state (``pacs status``)."""
        return table.backlogs(self.index.connection())

    def retry_failed(self, destination: str) -> int:
        """Queue a destination's refused instances again; how many."""
        with self.index.write() as conn:
            return table.retry_failed(conn, destination)


def refs_of(entries: Iterable[table.Entry]) -> list[InstanceRef]:
    """The outbox entries as the instances to send."""
    return [InstanceRef(e.study_uid or "", e.series_uid or "", e.sop_uid,
                        e.sop_class_uid or "", e.transfer_syntax or "", e.object_key or "",
                        int(e.size or 0)) for e in entries]


class Forwarder:
    """Feeds the outbox and sends it: the loop of the forwarding companion.

    One thread per destination sends its batches (so a slow or unreachable
    destination delays only its own); the calling thread feeds.

    Parameters
    ----------
    outbox : Outbox
        The outbox.
    senders : mapping
        A :class:`Sender` per destination of the routes.
    trail : AuditTrail
        Where each batch is recorded.
    """

    def __init__(self, outbox: Outbox, senders: Mapping[str, Sender],
                 trail: AuditTrail) -> None:
        self.outbox = outbox
        self.senders = dict(senders)
        self.trail = trail
        self._wake = {destination: threading.Event() for destination in self.senders}
        #: Per destination, the entries it stopped answering on (:attr:`Delivery.
        #: suspect`), sent last: in insertion order, at most SUSPECTS_KEPT.
        self._suspects: dict[str, dict[tuple[int, int], None]] = {
            destination: {} for destination in self.senders}

    def run(self, stopping: threading.Event) -> None:
        """Feed and send until ``stopping``; then wait for the batches in flight."""
        threads = [threading.Thread(target=self._deliver_loop, args=(d, stopping),
                                    name=f"pacs-forward-{i}", daemon=True)
                   for i, d in enumerate(self.senders)]
        for thread in threads:
            thread.start()
        try:
            self._feed_loop(stopping)
        finally:
            stopping.set()
            for event in self._wake.values():
                event.set()
            for thread in threads:
                thread.join()

    def _feed_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                read = self.outbox.feed()
            except PacsError as exc:
                log.warning("forwarding: the outbox could not be fed (%s); again soon", exc)
                read = 0
            except Exception:  # the thread must outlive any failure
                log.exception("forwarding: feeding the outbox failed unexpectedly")
                read = 0
            if read:
                for event in self._wake.values():
                    event.set()
            if read < FEED_ROWS:
                stopping.wait(POLL)

    def _deliver_loop(self, destination: str, stopping: threading.Event) -> None:
        wake = self._wake[destination]
        while not stopping.is_set():
            try:
                wait = self.deliver_once(destination)
            except Exception:  # the thread must outlive any failure
                log.exception("forwarding to %s failed unexpectedly", shown(destination))
                wait = POLL
            if wait:
                wake.clear()
                wake.wait(wait)

    def deliver_once(self, destination: str) -> float:
        """Send one batch to ``destination`` when it is due; seconds to wait before
        the next look (0: look again at once)."""
        due = self.outbox.due_in(destination)
        if due > 0:
            return min(due, POLL * 5)
        suspects = self._suspects.setdefault(destination, {})
        entries = self.outbox.take(destination, suspects.keys())
        if not entries:
            return POLL
        refs = refs_of(entries)
        routes = ", ".join(sorted({e.route for e in entries}))
        deliveries = transfer(self.senders[destination], refs, self.trail,
                              f"forwarded by route {routes}")
        retry = self.outbox.settle(destination, entries, deliveries)
        for entry, delivery in zip(entries, deliveries, strict=True):
            suspects.pop((entry.key, entry.change_seq), None)
            if delivery.result is Result.RETRY and delivery.suspect:
                suspects[(entry.key, entry.change_seq)] = None
        while len(suspects) > SUSPECTS_KEPT:  # the oldest forgotten: first again
            del suspects[next(iter(suspects))]
        counts = {r: sum(d.result is r for d in deliveries) for r in Result}
        if retry is None:
            log.info("forwarded %d instance(s) to %s (%d refused)", counts[Result.SENT],
                     shown(destination), counts[Result.REFUSED])
            return 0.0
        log.warning("forwarding to %s: %d sent, %d refused, %d to send again in %.0f s "
                    "(%s)", shown(destination), counts[Result.SENT],
                    counts[Result.REFUSED], counts[Result.RETRY], retry,
                    next(d.detail for d in deliveries if d.result is Result.RETRY))
        return retry

    def close(self) -> None:
        """Close every sender."""
        for sender in self.senders.values():
            sender.close()
