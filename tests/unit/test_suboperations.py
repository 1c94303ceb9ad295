"""The C-MOVE / C-GET sub-operation loop (pacs.dimse.retrieve.run_suboperations) over
fake parts: a requestor and a target that record what the loop does.

The real flow runs against pynetdicom and dcmtk peers in tests/service and
tests/interop; these cases pin down orderings that a real peer cannot be made to
produce on demand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import islice
from types import SimpleNamespace
from typing import Any

import pytest

from pacs.core.attributes import Level
from pacs.core.errors import Cancelled
from pacs.core.query.model import InstanceRef, Query
from pacs.dimse import retrieve
from pacs.dimse.connection import Request
from pacs.dimse.status import Status

pytestmark = pytest.mark.dimse


def _ref(number: int) -> InstanceRef:
    return InstanceRef("1.2.3", "1.2.3.4", f"1.2.3.4.{number}", "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.1.2.1", f"key{number}", 100)


class _Log:
    """What the loop did, in order."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.responses: list[tuple[Status, Any]] = []


class _Preparer:
    """Stands in for pacs.dimse.sender.Preparer: every instance is ready at once."""

    log: _Log

    def __init__(self, target: Any, store: Any, settings: Any = None,
                 indexed: Any = None) -> None:
        pass

    def prepare(self, ref: InstanceRef, msg_id: int) -> Any:
        self.log.steps.append(f"prepare {ref.sop_uid}")
        return SimpleNamespace(ref=ref, message_id=msg_id, context_id=1, command=b"",
                               source=None, length=0,
                               close=lambda: self.log.steps.append(f"close {ref.sop_uid}"))


class _Target:
    """Every write succeeds, every response is 0000."""

    def __init__(self, log: _Log) -> None:
        self.log = log
        self.alive = True

    def sending(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def send_c_store(self, message_id: int, context_id: int, command: bytes, source: Any,
                     length: int) -> bool:
        self.log.steps.append(f"write {message_id}")
        return True

    def store_status(self) -> int:
        self.log.steps.append("response")
        return 0x0000


class _Responder:
    def __init__(self, log: _Log) -> None:
        self.log = log
        self.alive = True

    def cancelled(self) -> bool:
        return False

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: Any = None) -> None:
        self.log.responses.append((status, counts))


def _run(monkeypatch: pytest.MonkeyPatch, rows: Iterator[InstanceRef], total: int) -> _Log:
    log = _Log()
    _Preparer.log = log
    monkeypatch.setattr(retrieve, "Preparer", _Preparer)
    # A pending response after every sub-operation: the orderings below show them.
    services: Any = SimpleNamespace(store=None, settings=SimpleNamespace(pending_interval=0.0),
                                    engine=SimpleNamespace(instance_list=lambda query, limit,
                                                           cancelled: list(islice(rows, limit)),
                                                           still_listed=lambda ref: True))
    request = Request(1, "1.2.840.10008.5.1.4.1.2.2.3", "1.2.840.10008.1.2", b"", "SCU")
    retrieve.run_suboperations(_Responder(log), _Target(log), request, services,  # type: ignore[arg-type]
                               retrieve.Plan(Query(level=Level.IMAGE), total), "C-GET")
    return log


def test_each_next_instance_is_prepared_while_the_previous_response_is_awaited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = _run(monkeypatch, iter([_ref(1), _ref(2), _ref(3)]), 3)
    assert log.steps == ["prepare 1.2.3.4.1", "write 1", "close 1.2.3.4.1",
                         "prepare 1.2.3.4.2", "response",
                         "write 2", "close 1.2.3.4.2", "prepare 1.2.3.4.3", "response",
                         "write 3", "close 1.2.3.4.3", "response"]
    pending = [counts for status, counts in log.responses if status.is_pending]
    assert [(c.remaining, c.completed) for c in pending] == [(2, 1), (1, 2)]
    status, counts = log.responses[-1]
    assert status.code == 0x0000 and counts.completed == 3 and counts.remaining is None


def test_a_cancel_seen_while_the_references_are_read_sends_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reference is read before the first send (no read transaction is held while a
    peer takes its objects): a C-CANCEL the engine sees meanwhile ends the retrieve with
    nothing on the wire."""
    def rows() -> Iterator[InstanceRef]:
        yield _ref(1)
        yield _ref(2)
        raise Cancelled("the query was cancelled")

    log = _run(monkeypatch, rows(), 5)
    assert log.steps == []
    _, counts = log.responses[-1]
    assert counts.completed == 0
