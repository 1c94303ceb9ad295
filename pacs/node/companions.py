"""Processes that run beside the node's core: the viewer server, and per customer the
intake's mover, the upload watcher, the data retention and the forwarder.

They are supervised differently from the DIMSE workers and the DICOMweb server: one
that cannot start, or that exits, is logged and started again a little later, and the
node goes on receiving and answering (while the mover is down, acknowledged objects
wait in the intake, readable, up to ``PACS_INTAKE_MAX_BYTES``).  Each
is a child process of ``pacs serve`` (``subprocess``, not ``fork``): it opens its own
index connection and store client, and inherits none of the parent's sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pacs.core.config import Settings
from pacs.core.errors import PacsError
from pacs.core.net import stop_when_orphaned
from pacs.node import viewer

if TYPE_CHECKING:
    from pacs.core.customers import Customer
    from pacs.core.services import Services

log = logging.getLogger(__name__)

#: Seconds before a companion that exited is started again, doubling up to
#: :data:`RESTART_LONGEST` while it exits within :data:`STABLE_SECONDS` of its start.
RESTART_DELAY = 5.0
RESTART_LONGEST = 60.0
STABLE_SECONDS = 60.0
#: Seconds a companion has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0


@dataclass
class Companion:
    """One supervised child process.

    Attributes
    ----------
    name : str
        For the log.
    launch : callable
        Starts the process (may raise ``OSError``, e.g. a busy port).
    """

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    next_start: float = 0.0
    #: When it was last started, and the wait before the next start after an exit.
    started: float = 0.0
    delay: float = 0.0
    clock: Callable[[], float] = time.monotonic

    def start(self) -> None:
        """Start now; a failure is logged and retried after the next delay."""
        self.started = self.clock()
        try:
            self.process = self.launch()
        except OSError as exc:
            self.process = None
            log.error("cannot start the %s: %s; retrying in %g s", self.name, exc,
                      self._wait())

    def check(self) -> None:
        """Restart when it exited or could not start (called by the supervisor)."""
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return
            self.process = None
            log.error("the %s exited with %s; restarting in %g s", self.name, code,
                      self._wait())
        if self.clock() >= self.next_start:
            self.start()

    def _wait(self) -> float:
        """Set the next start: :data:`RESTART_DELAY` after a stable run, else double
        the last delay up to :data:`RESTART_LONGEST` (one that fails at once, a broken
        setting say, is not started, and logged, every few seconds for ever)."""
        now = self.clock()
        if self.delay and now - self.started < STABLE_SECONDS:
            self.delay = min(self.delay * 2, RESTART_LONGEST)
        else:
            self.delay = RESTART_DELAY
        self.next_start = now + self.delay
        return self.delay


class Companions:
    """The companions of one ``pacs serve``, started and stopped together."""

    def __init__(self, members: list[Companion]) -> None:
        self.members = members
        self._thread: threading.Thread | None = None

    def start(self, stopping: threading.Event) -> Companions:
        """Start every member and a thread that restarts them until ``stopping``."""
        for member in self.members:
            member.start()
        if self.members:
            self._thread = threading.Thread(target=self._supervise, args=(stopping,),
                                            name="pacs-companions", daemon=True)
            self._thread.start()
        return self

    def _supervise(self, stopping: threading.Event) -> None:
        while not stopping.wait(0.5):
            for member in self.members:
                member.check()

    def stop(self) -> None:
        """SIGTERM every member, wait, then SIGKILL those still running."""
        if self._thread is not None:
            self._thread.join(timeout=5)  # the caller has set ``stopping``
        running = [m.process for m in self.members
                   if m.process is not None and m.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("a companion process did not stop in time; killing it")
                process.kill()
                process.wait()


def companion_main(name: str, body: Callable[[Settings, Services, threading.Event], None],
                   *, synced: bool = True) -> int:
    """The ``main`` of a companion process (``python -m …``): the settings from the
    environment ``pacs serve`` gave it, logging, SIGTERM / SIGINT to stop, services of
    its own (the store is not checked again: ``pacs serve`` did; ``synced``: see
    :func:`pacs.core.services.build`), then ``body`` until it is stopped.  Exit status
    1 when the services cannot be built."""
    from pacs.core import config, logs
    from pacs.core.customers import chosen
    from pacs.core.services import build

    try:  # the customer pacs serve started it for (CUSTOMER)
        settings = chosen(config.load()).settings
    except PacsError as exc:
        log.error("the %s cannot start: %s", name, exc)
        return 1
    logs.setup(settings.log_level)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        services = build(settings, check_store=False, synced=synced)
    except PacsError as exc:
        log.error("the %s cannot start: %s", name, exc)
        return 1
    stop_when_orphaned(stopping.set, f"the {name}")
    try:
        body(settings, services, stopping)
    finally:
        services.close()
    return 0


def _module(name: str, environment: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``python -m name`` with the node's environment."""
    return subprocess.Popen([sys.executable, "-m", name],
                            env={**os.environ, **environment}, stdin=subprocess.DEVNULL)


def start_companions(settings: Settings, served: Sequence[Customer],
                     environment: Mapping[str, str], stopping: threading.Event) -> Companions:
    """Start the viewer server, and per customer the intake's mover and the upload
    watcher, the data retention and the forwarder that its settings ask for.

    Parameters
    ----------
    settings : Settings
        The node's: ``viewer_port`` 0 turns the viewer off.
    served : sequence of Customer
        The node's customers: each has its intake's mover; a customer's
        ``uploads_poll`` 0 turns its watcher off, an empty ``retention_days`` its
        retention, no routes its forwarder.
    environment : mapping
        Environment for the children (``pacs serve``'s overrides, the data folder, the
        customers file); each customer's companions also get ``CUSTOMER``.
    stopping : threading.Event
        Set when the node stops; the supervisor then stops restarting.
    """
    members: list[Companion] = []
    if settings.viewer_port:
        dist = viewer.find_dist(settings)
        if dist is None:
            log.warning(viewer.missing_message(settings))
        else:
            members.append(Companion(
                "OHIF viewer server", partial(viewer.launch, settings, dist, environment)))
    for customer in served:
        own = {**environment, "CUSTOMER": customer.name}
        suffix = f" of customer {customer.name}" if len(served) > 1 else ""
        members.append(Companion("intake mover" + suffix,
                                 partial(_module, "pacs.node.mover", own)))
        if customer.settings.uploads_poll > 0:
            members.append(Companion("upload watcher" + suffix,
                                     partial(_module, "pacs.node.uploads", own)))
        if customer.settings.retention.enabled:
            members.append(Companion("data retention" + suffix,
                                     partial(_module, "pacs.node.retention", own)))
        if customer.settings.routes:
            members.append(Companion("forwarder" + suffix,
                                     partial(_module, "pacs.node.forwarder", own)))
    return Companions(members).start(stopping)
