"""The forwarding companion: the outbox fed from the index and sent to each destination
(:mod:`pacs.core.forwarding`), and the senders ``pacs send`` shares with it.

``pacs serve`` runs this module as a companion process (``python -m
pacs.node.forwarder``, :mod:`pacs.node.companions`) when routes are configured.  One
forwarder runs per customer: it holds an exclusive ``flock`` on
``<data folder>/forwarder.lock`` while it works, so a second ``pacs serve`` on the same
data folder (or a restart that overlaps the old process's exit) waits for the lock
instead of sending the same outbox twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":
    # Started by `pacs serve`, which stops it with SIGTERM; a Ctrl-C reaches the whole
    # process group, maybe during the imports below: ignore it until main() handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from pacs.core.attributes import BY_KEYWORD, Level
from pacs.core.audit import Participant
from pacs.core.config import Settings
from pacs.core.errors import ConfigError, NotFound
from pacs.core.forwarding import Forwarder, Outbox, Result, Sender, transfer
from pacs.core.query.matching import constraint
from pacs.core.query.model import InstanceRef, Query
from pacs.core.routes import is_url, shown
from pacs.core.services import Services
from pacs.core.stow import StowSender
from pacs.dimse import retrieve
from pacs.dimse.forward import DimseSender

#: Named, not ``__name__``: the module also runs as ``__main__`` (``python -m``).
log = logging.getLogger("pacs.node.forwarder")

#: Seconds between two attempts at the lock another forwarder holds.
LOCK_RETRY = 2.0


def sender_for(destination: str, services: Services) -> Sender:
    """The sender of a destination: a STOW-RS URL, or an AE title the C-MOVE
    destinations share (``PACS_MODALITIES``, the access file's AEs with an address).

    Raises
    ------
    ConfigError
        An AE title that names no known destination.
    """
    settings = services.settings
    if is_url(destination):
        return StowSender(destination, services.store, settings.dimse_timeout)
    modality = retrieve.destination(services, destination)
    if modality is None:
        raise ConfigError(f"{destination!r} is neither a known AE with an address "
                          "(PACS_MODALITIES, PACS_ACCESS_FILE) nor an http(s) URL")
    return DimseSender(modality, services.store, settings)


def check_destinations(services: Services) -> None:
    """Check that every route names a destination it can reach (``pacs serve``).

    Raises
    ------
    ConfigError
        A route to an AE title that names no known destination.
    """
    for route in services.settings.routes:
        if not route.web and retrieve.destination(services, route.destination) is None:
            raise ConfigError(f"routes: route {route.name!r} goes to "
                              f"{route.destination!r}, which is neither a known AE with "
                              "an address (PACS_MODALITIES, PACS_ACCESS_FILE) nor an "
                              "http(s) URL")


def outbox_of(services: Services) -> Outbox:
    """The outbox of the services' index under their settings' routes and limits."""
    settings = services.settings
    return Outbox(services.index, settings.routes, settings.forward_batch,
                  settings.forward_max_outbox, settings.forward_retry_max)


@contextmanager
def exclusive(path: Path, stopping: threading.Event) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``, waiting for it until ``stopping``;
    yields False when stopped before it was had."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.warning("forwarding: another forwarder holds %s; waiting", path)
                    waited = True
                if stopping.wait(LOCK_RETRY):
                    yield False
                    return
        yield True
    finally:
        os.close(fd)  # releases the lock


def forward(settings: Settings, services: Services, stopping: threading.Event) -> None:
    """Run the forwarder until ``stopping`` (the companion's body)."""
    with exclusive(settings.data_dir / "forwarder.lock", stopping) as held:
        if not held:
            return
        outbox = outbox_of(services)
        forwarder = Forwarder(outbox, {target: sender_for(destination, services)
                                       for target, destination in outbox.endpoints.items()},
                              services.audit)
        log.info("forwarding to %d destination(s) by %d route(s)",
                 len(forwarder.senders), len(outbox.routes))
        try:
            forwarder.run(stopping)
        finally:
            forwarder.close()


def study_instances(services: Services, study_uids: Sequence[str]) -> list[InstanceRef]:
    """Every stored instance of the studies, study by study; the UIDs of studies the
    index does not hold raise.

    Raises
    ------
    NotFound
        A study with no instance.
    InvalidQuery, IndexFailure
        A UID that is not one, or the index failing.
    """
    refs: list[InstanceRef] = []
    for uid in study_uids:
        found = constraint(BY_KEYWORD["StudyInstanceUID"], uid)
        query = Query(level=Level.IMAGE, constraints=(found,) if found else ())
        listed = list(services.engine.instances(query))
        if not listed or found is None:
            raise NotFound(f"no study {uid}")
        refs += listed
    return refs


def send_now(services: Services, destination: str, refs: Sequence[InstanceRef],
             progress: Callable[[int], None] = lambda _: None,
             requestor: Participant | None = None) -> dict[Result, int]:
    """Send ``refs`` to ``destination`` in batches of ``PACS_FORWARD_BATCH`` through the
    forwarder's sender (``pacs send``), each batch audited with ``requestor`` (the
    operator) as who asked for it; instances per outcome.  Nothing is queued: an
    instance not delivered is counted, not retried."""
    settings = services.settings
    sender = sender_for(destination, services)
    counts = dict.fromkeys(Result, 0)
    try:
        for start in range(0, len(refs), settings.forward_batch):
            batch = refs[start:start + settings.forward_batch]
            for delivery in transfer(sender, batch, services.audit, "pacs send",
                                     requestor):
                counts[delivery.result] += 1
                if delivery.result is not Result.SENT:
                    log.warning("not delivered to %s: %s", shown(destination),
                                delivery.detail)
            progress(len(batch))
    finally:
        sender.close()
    return counts


def main() -> int:
    """``python -m pacs.node.forwarder``: forward until SIGTERM/SIGINT."""
    from pacs.node.companions import companion_main

    return companion_main("forwarder", forward)


if __name__ == "__main__":
    sys.exit(main())
