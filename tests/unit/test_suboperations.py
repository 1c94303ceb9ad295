"""The C-MOVE / C-GET sub-operation loop (pacs.dimse.retrieve), with fake parts.

The real flow runs against dcmtk peers in tests/service and tests/interop; these cases
pin down orderings that a real peer cannot be made to produce on demand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from pacs.core.errors import Cancelled
from pacs.core.query.model import InstanceRef
from pacs.dimse import find, retrieve


def _ref(number: int) -> InstanceRef:
    return InstanceRef("1.2.3", "1.2.3.4", f"1.2.3.4.{number}", "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.1.2.1", f"key{number}", 100)


class _FakeSender:
    """Records what the loop does; every write succeeds, every response is 0000."""

    log: ClassVar[list[str]] = []  # shared: the code under test makes the instances

    def __init__(self, assoc: Any, store: Any, originator: Any, **options: Any) -> None:
        pass

    def prepare(self, ref: InstanceRef, msg_id: int) -> Any:
        self.log.append(f"prepare {ref.sop_uid}")
        return SimpleNamespace(ref=ref, close=lambda: self.log.append(f"close {ref.sop_uid}"))

    def write(self, prepared: Any) -> bool:
        self.log.append(f"write {prepared.ref.sop_uid}")
        return True

    def response_status(self) -> int:
        self.log.append("response")
        return 0x0000


def _run(monkeypatch: pytest.MonkeyPatch, rows: Iterator[InstanceRef],
         total: int) -> tuple[list[str], list[Any]]:
    _FakeSender.log = []
    monkeypatch.setattr(retrieve, "Sender", _FakeSender)
    monkeypatch.setattr(retrieve.wire, "reactor_paused", lambda assoc: contextlib.nullcontext())
    monkeypatch.setattr(retrieve.reactor, "socket_lent",
                        lambda assoc: contextlib.nullcontext(False))
    service = object.__new__(retrieve.RetrieveServiceClass)
    service.assoc = SimpleNamespace(is_established=True,
                                    requestor=SimpleNamespace(ae_title="SCU"))
    finals: list[Any] = []
    service._pending = lambda rsp, cx_id, counts: None  # type: ignore[method-assign]
    service._final = (lambda rsp, cx_id, context, status, counts=None, comment=None:  # type: ignore[method-assign]
                      finals.append((status, counts)))
    services = SimpleNamespace(store=None, settings=None, engine=SimpleNamespace(
        instances=lambda query, cancelled: rows))
    monkeypatch.setattr(retrieve, "_at_image", lambda query: query)
    never = find.CancelWatch(lambda msg_id: False, 1)
    service._suboperations(SimpleNamespace(MessageIDBeingRespondedTo=1), 1, None,  # type: ignore[arg-type]
                           services, None, total,
                           None, never, None)  # type: ignore[arg-type]
    return _FakeSender.log, finals


def test_each_next_instance_is_prepared_while_the_previous_response_is_awaited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log, finals = _run(monkeypatch, iter([_ref(1), _ref(2), _ref(3)]), 3)
    assert log == ["prepare 1.2.3.4.1", "write 1.2.3.4.1", "prepare 1.2.3.4.2", "response",
                   "write 1.2.3.4.2", "prepare 1.2.3.4.3", "response",
                   "write 1.2.3.4.3", "response"]
    status, counts = finals[0]
    assert status == retrieve.RETRIEVE_SUCCESS and counts.completed == 3


def test_a_cancel_seen_while_the_references_are_read_sends_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reference is read before the first send (no read transaction is held while a
    peer takes its objects): a C-CANCEL the engine sees meanwhile ends the retrieve with
    nothing on the wire."""
    def rows() -> Iterator[InstanceRef]:
        yield _ref(1)
        yield _ref(2)
        raise Cancelled("the query was cancelled")

    log, finals = _run(monkeypatch, rows(), 5)
    assert log == []
    _, counts = finals[0]
    assert counts.completed == 0
