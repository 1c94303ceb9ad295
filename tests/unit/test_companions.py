"""Restarting companion processes (pacs.node.companions.Companion): a growing delay
while one keeps exiting soon after its start, the first delay again after a stable run."""

from __future__ import annotations

import itertools
import subprocess
from typing import cast

from pacs.node import companions
from tests.clock import Clock


class Exited:
    """A process that has exited (or runs until ``code`` is set)."""

    def __init__(self, code: int | None = 1) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


def run(companion: companions.Companion, clock: Clock, seconds: float) -> None:
    """The supervisor's checks every 0.5 s for ``seconds``."""
    for _ in range(int(seconds / 0.5)):
        companion.check()
        clock.now += 0.5


def test_a_companion_that_keeps_failing_is_restarted_less_and_less_often() -> None:
    clock = Clock()
    launches: list[float] = []
    process = Exited(code=1)

    def launch() -> subprocess.Popen[bytes]:
        launches.append(clock.now)
        return cast(subprocess.Popen[bytes], process)

    companion = companions.Companion("test companion", launch, clock=clock)
    companion.start()
    run(companion, clock, 300)
    gaps = [later - earlier for earlier, later in itertools.pairwise(launches)]
    delays = [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]  # each exit seen within a check (0.5 s)
    assert all(0 <= gap - delay <= 0.5 for gap, delay in zip(gaps, delays, strict=False))
    assert len(gaps) >= len(delays)
    assert len(launches) <= 9  # 5 s apart, it was started 60 times in 300 s

    process.code = None  # the next start stays up past STABLE_SECONDS
    run(companion, clock, companions.RESTART_LONGEST + companions.STABLE_SECONDS + 1)
    process.code = 1
    before = len(launches)
    run(companion, clock, companions.RESTART_DELAY + 1)
    assert len(launches) == before + 1  # after a stable run: the first delay again


def test_a_companion_that_cannot_be_launched_is_tried_less_and_less_often() -> None:
    clock = Clock()
    attempts: list[float] = []

    def launch() -> subprocess.Popen[bytes]:
        attempts.append(clock.now)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    companion = companions.Companion("test companion", launch, clock=clock)
    companion.start()
    run(companion, clock, 100)
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps == [5.0, 10.0, 20.0, 40.0]
