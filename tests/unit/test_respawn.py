"""Replacing dead DIMSE workers: at once after a long life, with a growing delay after
deaths in quick succession (pacs.dimse.server._Respawn)."""

from __future__ import annotations

import itertools

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


class FakeProcess:
    """A worker process stand-in: alive or dead."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.pid = 4242
        self.exitcode = None if alive else -9

    def is_alive(self) -> bool:
        return self.alive


def test_a_worker_that_cannot_be_forked_is_tried_again_later(clock: Clock) -> None:
    """fork() failing (EAGAIN at RLIMIT_NPROC) when a dead worker is replaced leaves
    the slot to a later try, with the growing delay, and stops nothing (the OSError
    ended run_workers, and with it pacs serve)."""
    dead, other = FakeProcess(alive=False), FakeProcess(alive=True)
    workers = [dead, other]
    respawn = [server._Respawn(), server._Respawn()]
    clock.now += server.RESPAWN_QUICK_DEATH + 1  # lived long: replaced at once
    attempts: list[float] = []
    replacement = FakeProcess(alive=True)

    def spawn() -> FakeProcess:
        attempts.append(clock.now)
        if len(attempts) <= 3:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return replacement

    for _ in range(40):
        server.replace_dead(workers, respawn, spawn)  # type: ignore[arg-type]
        clock.now += 0.5
    assert workers == [replacement, other]
    assert len(attempts) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps == sorted(gaps) and gaps[0] >= 0.5  # never at once, longer each time
