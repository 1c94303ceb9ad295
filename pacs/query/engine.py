"""The one query engine behind C-FIND, C-MOVE, C-GET, QIDO-RS and WADO-RS.

Every query is bounded (DESIGN.md section 4): a row cap refuses results larger than
``max_rows`` before anything is sent, a time limit stops a statement that runs too long,
and a cancel callback (C-CANCEL, a closed HTTP connection) stops it between rows or
inside SQLite's virtual machine.  Results stream from the cursor: memory does not grow
with the size of the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import apsw

from pacs.errors import Cancelled, IndexFailure, QueryLimitExceeded
from pacs.index.compiler import Compiled, compile_count, compile_find, compile_instances
from pacs.index.connection import Index
from pacs.query.model import InstanceRef, Query, Result

#: SQLite virtual machine steps between checks of the time limit and cancellation.
_PROGRESS_STEPS = 10_000


def _never() -> bool:
    return False


class QueryEngine:
    """Runs :class:`Query` objects against one customer's index.

    Parameters
    ----------
    index : Index
        The index (connections per thread).
    max_rows : int
        Largest result a query may return (QIDO pages below it; C-FIND is refused above).
    time_limit : float
        Seconds any one step of a query may take.
    pn_case_sensitive : bool
        Match person names case-sensitively.
    """

    def __init__(self, index: Index, max_rows: int, time_limit: float,
                 pn_case_sensitive: bool = False) -> None:
        self.index = index
        self.max_rows = max_rows
        self.time_limit = time_limit
        self.pn_case_sensitive = pn_case_sensitive

    def count(self, query: Query, cap: int | None = None,
              cancelled: Callable[[], bool] = _never) -> int:
        """The number of matches (at most ``cap`` + 1 when a cap is given)."""
        compiled = compile_count(query, self.pn_case_sensitive, cap)
        for (number,) in self._rows(compiled, cancelled):
            return int(number)
        return 0

    def find(self, query: Query, cancelled: Callable[[], bool] = _never) -> Iterator[Result]:
        """Stream the matching entities.

        Raises
        ------
        QueryLimitExceeded
            Before the first result, when more than ``max_rows`` would be returned; or
            when a step runs past the time limit.
        Cancelled
            When ``cancelled()`` turns true.
        """
        if query.limit is None or query.limit > self.max_rows:
            if self.count(query, cap=self.max_rows, cancelled=cancelled) > self.max_rows:
                raise QueryLimitExceeded(
                    f"more than {self.max_rows} matches; narrow the query")
        compiled = compile_find(query, self.pn_case_sensitive)
        keywords = compiled.keywords
        for row in self._rows(compiled, cancelled):
            yield Result(query.level, {
                k: (None if v is None else str(v)) for k, v in zip(keywords, row) if k != "_pk"})

    def instances(self, query: Query,
                  cancelled: Callable[[], bool] = _never) -> Iterator[InstanceRef]:
        """Stream the stored instances under the entities ``query`` matches."""
        for row in self._rows(compile_instances(query, self.pn_case_sensitive), cancelled):
            yield InstanceRef(*row)

    def _rows(self, compiled: Compiled, cancelled: Callable[[], bool]) -> Iterator[tuple]:
        """Execute with the time limit and cancellation checked by a progress handler.

        The deadline restarts at each row, so a slow consumer (a slow network peer) does
        not count against the query; only SQLite's own work does.
        """
        conn = self.index.connection()
        deadline = [time.monotonic() + self.time_limit]
        state = {"timed_out": False, "cancelled": False}

        def progress() -> bool:
            if cancelled():
                state["cancelled"] = True
                return True
            if time.monotonic() > deadline[0]:
                state["timed_out"] = True
                return True
            return False

        conn.set_progress_handler(progress, _PROGRESS_STEPS)
        try:
            cursor = conn.execute(compiled.sql, compiled.params)
            while True:
                deadline[0] = time.monotonic() + self.time_limit
                try:
                    row = next(cursor)
                except StopIteration:
                    return
                if cancelled():
                    raise Cancelled("the query was cancelled")
                yield row
        except apsw.InterruptError:
            if state["cancelled"]:
                raise Cancelled("the query was cancelled") from None
            raise QueryLimitExceeded(
                f"the query ran longer than {self.time_limit:g} s") from None
        except apsw.Error as exc:
            raise IndexFailure(f"query failed: {exc}") from exc
        finally:
            conn.set_progress_handler(None)
