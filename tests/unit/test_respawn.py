"""Replacing dead DIMSE workers: at once after a long life, with a growing delay after
deaths in quick succession (pacs.dimse.server._Respawn)."""

from __future__ import annotations

import pytest

from pacs.dimse import server
from tests.clock import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(server.time, "monotonic", fake)
    return fake


def test_a_worker_that_lived_long_is_replaced_at_once(clock: Clock) -> None:
    slot = server._Respawn()
    clock.now += server.RESPAWN_QUICK_DEATH + 1
    assert slot.due(object())  # type: ignore[arg-type]


def test_quick_deaths_wait_longer_and_longer_up_to_the_ceiling(clock: Clock) -> None:
    slot = server._Respawn()
    delays = []
    for _ in range(10):
        clock.now += 0.1  # dies right after its start
        waited = 0.0
        while not slot.due(object()):  # type: ignore[arg-type]
            clock.now += 0.5
            waited += 0.5
        delays.append(waited)
        slot.started()
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == server.RESPAWN_MAX_DELAY
    clock.now += server.RESPAWN_QUICK_DEATH + 1  # a long life resets the delay
    assert slot.due(object())  # type: ignore[arg-type]
