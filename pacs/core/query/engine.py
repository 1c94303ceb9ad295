"""The one query engine behind C-FIND, C-MOVE, C-GET, QIDO-RS and WADO-RS.

Every query is bounded (docs/architecture.md, "Guarantees"): a row cap refuses results
larger than ``max_rows`` before anything is sent, a time limit (:class:`Deadline`) bounds
the whole query — compiling, counting, executing, fetching and building the answers — and a
cancel callback (C-CANCEL, a closed HTTP connection) stops it inside SQLite's virtual
machine.

No read transaction stays open while a peer reads: an open read transaction keeps the
WAL from being checkpointed, so a slow reader would let it grow without bound.  Results
are fetched into memory (capped by ``max_rows``), or, for C-FIND, in pages of
:data:`PAGE_ROWS` each read in its own short transaction and walked by key up to the
last key that existed when the query began.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from itertools import islice
from typing import Any

import apsw

from pacs.core.errors import Cancelled, IndexFailure, QueryLimitExceeded
from pacs.core.index import reads
from pacs.core.index.compiler import (
    Compiled,
    Page,
    compile_count,
    compile_find,
    compile_instances,
    compile_last_key,
)
from pacs.core.index.connection import Index
from pacs.core.query.model import InstanceRef, Query, Result

#: SQLite virtual machine steps between checks of the time limit and cancellation.
_PROGRESS_STEPS = 10_000
#: Rows per page of :meth:`QueryEngine.find_pages`: a page's answers are held in memory
#: while they are sent.
PAGE_ROWS = 256

#: A result row: its columns' types are the compiled statement's (see ``keywords``).
Row = tuple[Any, ...]


def _never() -> bool:
    return False


class Deadline:
    """The time one query may take (``PACS_QUERY_TIME_LIMIT``), from its start on.

    Time spent :meth:`paused` (a peer reading the answers) does not count.

    Parameters
    ----------
    seconds : float
        The limit.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        """True once the query has used its time."""
        return time.monotonic() > self.at

    def check(self) -> None:
        """Raise :class:`QueryLimitExceeded` once the time is used up."""
        if time.monotonic() > self.at:
            raise self.exceeded()

    def exceeded(self) -> QueryLimitExceeded:
        """The error of a query past its time."""
        return QueryLimitExceeded(f"the query ran longer than {self.seconds:g} s")

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stops meanwhile (the time goes to the peer, not to the query)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.at += time.monotonic() - start


class QueryEngine:
    """Runs :class:`Query` objects against one customer's index.

    Parameters
    ----------
    index : Index
        The index (connections per thread).
    max_rows : int
        Largest result a query may return (QIDO pages below it; C-FIND is refused above).
    time_limit : float
        Seconds a whole query may take (see :class:`Deadline`).
    pn_case_sensitive : bool
        Match person names case-sensitively.
    """

    def __init__(self, index: Index, max_rows: int, time_limit: float,
                 pn_case_sensitive: bool = False) -> None:
        self.index = index
        self.max_rows = max_rows
        self.time_limit = time_limit
        self.pn_case_sensitive = pn_case_sensitive

    def deadline(self) -> Deadline:
        """A new query's time limit: start it before the request is parsed, pass it to
        every call for that request, and check it while building the answers."""
        return Deadline(self.time_limit)

    def count(self, query: Query, cap: int | None = None,
              cancelled: Callable[[], bool] = _never,
              deadline: Deadline | None = None) -> int:
        """The number of matches (at most ``cap`` + 1 when a cap is given)."""
        compiled = compile_count(query, self.pn_case_sensitive, cap)
        rows = self._fetch(compiled, cancelled, deadline or self.deadline())
        return int(rows[0][0]) if rows else 0

    def find(self, query: Query, cancelled: Callable[[], bool] = _never,
             deadline: Deadline | None = None) -> list[Result]:
        """Every matching entity, read in one short transaction.

        Raises
        ------
        QueryLimitExceeded
            When more than ``max_rows`` would be returned (``query.limit`` above it or
            unset), or past the time limit.
        Cancelled
            When ``cancelled()`` turns true.
        """
        deadline = deadline or self.deadline()
        conn = self.index.connection()
        with _index_errors(), conn:  # one snapshot for the count and the rows
            if query.limit is None or query.limit > self.max_rows:
                self._refuse_over_cap(query, cancelled, deadline)
            compiled = compile_find(query, self.pn_case_sensitive)
            rows = self._fetch(compiled, cancelled, deadline)
        results = _results(query, compiled.keywords, rows)
        deadline.check()
        return results

    def find_pages(self, query: Query, cancelled: Callable[[], bool] = _never,
                   deadline: Deadline | None = None) -> Iterator[list[Result]]:
        """The matching entities in pages of :data:`PAGE_ROWS`, each read in its own
        short transaction: nothing of the index is held while the caller sends a page.

        The walk ends at the last key of the level when the query began, so rows stored
        meanwhile do not join the answer.  ``query.limit`` / ``offset`` are not used.

        Raises
        ------
        QueryLimitExceeded
            Before the first page, when more than ``max_rows`` match; or past the time
            limit (time the caller spends between pages counts unless it pauses
            ``deadline``).
        Cancelled
            When ``cancelled()`` turns true.
        """
        deadline = deadline or self.deadline()
        conn = self.index.connection()
        with _index_errors(), conn:  # one read transaction: the cap and the first page agree
            upto = int(self._fetch(compile_last_key(query.level), cancelled,
                                   deadline)[0][0])
            compiled = self._page(query, 0, upto)
            rows = self._fetch(compiled, cancelled, deadline)
            # A page that is not full holds every match: counting them is only
            # needed when it is full (most answers fit one page; a count is a
            # statement of its own).
            if len(rows) > self.max_rows or len(rows) == PAGE_ROWS:
                self._refuse_over_cap(query, cancelled, deadline)
        while rows:
            page = _results(query, compiled.keywords, rows)
            deadline.check()
            yield page
            if len(rows) < PAGE_ROWS:
                return
            after = int(rows[-1][0])  # the level's key is selected first
            compiled = self._page(query, after, upto)
            rows = self._fetch(compiled, cancelled, deadline)

    def _page(self, query: Query, after: int, upto: int) -> Compiled:
        """The statement of one page of :meth:`find_pages`: keys in (after, upto]."""
        return compile_find(query, self.pn_case_sensitive, Page(after, upto, PAGE_ROWS))

    def instances(self, query: Query, cancelled: Callable[[], bool] = _never,
                  deadline: Deadline | None = None) -> Generator[InstanceRef, None, None]:
        """Stream the stored instances under the entities ``query`` matches.

        The time limit counts the engine's own work; the time the caller holds each
        instance (sending it) does not.
        """
        deadline = deadline or self.deadline()
        compiled = compile_instances(query, self.pn_case_sensitive)
        for row in self._stream(compiled, cancelled, deadline):
            yield InstanceRef(*row)

    def instance_list(self, query: Query, limit: int,
                      cancelled: Callable[[], bool] = _never) -> list[InstanceRef]:
        """At most ``limit`` of :meth:`instances`, read whole before this returns.

        The statement, and with it the read transaction of this thread's connection,
        ends here: a caller that holds the list while it sends the objects (a retrieve,
        a forward) neither keeps the WAL from being checkpointed nor reads the intake
        through a snapshot taken before a removal, so an instance removed meanwhile is
        not found, not sent.
        """
        stream = self.instances(query, cancelled)
        try:
            return list(islice(stream, limit))
        finally:
            stream.close()

    def still_listed(self, ref: InstanceRef) -> bool:
        """True while the index names ``ref``'s object for its instance, as when it was
        listed: asked just before the object is read for a send, a removal during a
        long retrieve (whose object stays readable until its deletion, minutes when
        the store fails it) is not sent.

        Raises
        ------
        IndexFailure
            The index cannot be read.
        """
        return reads.names(self.index.connection(), ref.sop_uid, ref.object_key)

    def _refuse_over_cap(self, query: Query, cancelled: Callable[[], bool],
                         deadline: Deadline) -> None:
        compiled = compile_count(query, self.pn_case_sensitive, self.max_rows)
        if int(self._fetch(compiled, cancelled, deadline)[0][0]) > self.max_rows:
            raise QueryLimitExceeded(f"more than {self.max_rows} matches; narrow the query")

    @contextmanager
    def _limited(self, cancelled: Callable[[], bool], deadline: Deadline
                 ) -> Iterator[tuple[apsw.Connection, _Stop]]:
        """This thread's connection with a progress handler that stops SQLite when the
        query is cancelled or past its time; errors as the core's exceptions."""
        conn = self.index.connection()
        stop = _Stop(cancelled, deadline)
        conn.set_progress_handler(stop, _PROGRESS_STEPS)
        try:
            with _index_errors():
                yield conn, stop
        except apsw.InterruptError:
            if stop.was_cancelled:
                raise Cancelled("the query was cancelled") from None
            raise deadline.exceeded() from None
        finally:
            # Closed under an abandoned generator (the index closing): nothing to undo.
            with suppress(apsw.ConnectionClosedError):
                conn.set_progress_handler(None)

    def _fetch(self, compiled: Compiled, cancelled: Callable[[], bool],
               deadline: Deadline) -> list[Row]:
        """Every row of ``compiled``; the statement is done when this returns."""
        deadline.check()
        with self._limited(cancelled, deadline) as (conn, _):
            rows = conn.execute(compiled.sql, compiled.params).fetchall()
        if cancelled():
            raise Cancelled("the query was cancelled")
        return rows

    def _stream(self, compiled: Compiled, cancelled: Callable[[], bool],
                deadline: Deadline) -> Iterator[Row]:
        """The rows of ``compiled`` one at a time.  While the caller holds a row the
        deadline is paused and the progress handler is off (the caller may run other
        queries on this thread's connection meanwhile)."""
        deadline.check()
        with self._limited(cancelled, deadline) as (conn, stop):
            for row in conn.execute(compiled.sql, compiled.params):
                if cancelled():
                    raise Cancelled("the query was cancelled")
                conn.set_progress_handler(None)
                with deadline.paused():
                    yield row
                conn.set_progress_handler(stop, _PROGRESS_STEPS)


@contextmanager
def _index_errors() -> Iterator[None]:
    """apsw's errors as the core's: :class:`IndexFailure` when SQLite could not read
    (busy, locked, I/O, corrupt, full: the index is unavailable, and a client may try
    again later).

    ``apsw.SQLError`` (SQLITE_ERROR) is SQLite refusing the statement itself; the
    compiler bounds every query below SQLite's limits
    (:func:`pacs.core.index.compiler.check_size`), so that is a defect of ours, not an
    unavailable index: it goes on as itself, answered as an internal error with its
    traceback logged, never as a failure worth retrying.  ``apsw.InterruptError``
    goes on too: the caller knows whether it was a cancel or the time limit.
    """
    try:
        yield
    except (apsw.SQLError, apsw.InterruptError):
        raise
    except apsw.Error as exc:
        raise IndexFailure(f"query failed: {exc}") from exc


class _Stop:
    """SQLite's progress handler: true (interrupt) when cancelled or out of time."""

    def __init__(self, cancelled: Callable[[], bool], deadline: Deadline) -> None:
        self.cancelled = cancelled
        self.deadline = deadline
        self.was_cancelled = False

    def __call__(self) -> bool:
        if self.cancelled():
            self.was_cancelled = True
            return True
        return self.deadline.passed()


def _results(query: Query, keywords: tuple[str, ...],
             rows: list[Row]) -> list[Result]:
    """Rows as results: values as text by keyword, the level's key left out."""
    level = query.level
    return [Result(level, {k: (None if v is None else str(v))
                           for k, v in zip(keywords, row, strict=True) if k != "_pk"})
            for row in rows]
