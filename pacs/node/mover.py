"""The intake's mover as a process of its own (``python -m pacs.node.mover``).

``pacs serve`` runs one beside its workers (a companion, :mod:`pacs.node.companions`):
it writes the objects that ingest acknowledged through the intake to the object store
and removes them from the intake (:class:`pacs.core.intake.Mover`).  One per customer:
it holds ``<data>/intake.lock`` while it runs, and a second one (another node on the
same data folder) waits for it.  ``PACS_INTAKE_MOVER=off`` holds it (tests, diagnosis).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

if __name__ == "__main__":
    # Stopped by `pacs serve` with SIGTERM; a Ctrl-C reaches the whole process group,
    # possibly during the imports below: ignore it until main() handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

if TYPE_CHECKING:
    from pacs.core.config import Settings
    from pacs.core.services import Services

#: Named, not ``__name__``: the module also runs as ``__main__`` (``python -m``).
log = logging.getLogger("pacs.node.mover")

#: Seconds between two tries at the mover lock while another mover holds it.
LOCK_RETRY = 1.0
#: How much lower than ``pacs serve`` the mover's CPU priority is (``nice``).  Each
#: acknowledgement waits for a DIMSE worker or a web worker, never for the mover: when
#: they want the cores, the acknowledged objects wait in the intake instead (durable
#: already), and the mover catches up when ingest pauses.  Measured on two cores with
#: the S3 server beside the node, ingest ran 10-45 % faster.  A stream that keeps every
#: core busy for long fills the intake up to PACS_INTAKE_MAX_BYTES; from there stores
#: are refused until the mover has made room (the intake's back-pressure).
NICENESS = 10
#: Seconds the mover goes on moving once stopped, within the companions' stop timeout
#: (:data:`pacs.node.companions.STOP_TIMEOUT`).  ``pacs serve`` stops it after its
#: workers, so nothing arrives meanwhile: a clean stop after a burst leaves the store
#: complete, where the mover held back while the burst arrived; what a longer backlog
#: leaves stays in the intake, durable, and is moved after the next start.
STOP_DRAIN = 10.0


def move(settings: Settings, services: Services, stopping: threading.Event) -> None:
    """Hold the customer's mover lock (waiting while another mover has it) and move
    the intake until ``stopping``; with ``PACS_INTAKE_MOVER=off`` only wait."""
    from pacs.core.intake import mover_lock
    from pacs.core.services import mover

    if not settings.intake_mover:
        log.warning("the intake mover is held (PACS_INTAKE_MOVER=off): acknowledged "
                    "objects stay in the intake")
        stopping.wait()
        return
    while not stopping.is_set():
        with mover_lock(settings.data_dir, wait=False) as held:
            if held:
                _write_wal_ahead(services)
                mover(services).run(stopping.is_set, drain_for=STOP_DRAIN)
                return
        stopping.wait(LOCK_RETRY)  # another mover serves this customer


def _write_wal_ahead(services: Services) -> None:
    """The customer's index WAL written ahead to its full length, once per node: the
    mover's connection stays open while the node runs, so SQLite keeps the file (it
    removes it with the last connection) and the ingest's commits rewrite it in place
    (:meth:`pacs.core.index.connection.Index.write_wal_ahead`).  Only speed depends on
    it: a failure is logged and the node goes on."""
    from pacs.core.errors import IndexFailure

    try:
        services.index.write_wal_ahead()
    except IndexFailure as exc:
        log.warning("intake mover: the index WAL is not written ahead: %s", exc)


def main() -> int:
    """``python -m pacs.node.mover``: move the intake to the store until SIGTERM /
    SIGINT.  Its index commits are not synced: a delete lost in a crash only repeats
    an identical put."""
    import os

    from pacs.node.companions import companion_main

    os.nice(NICENESS)
    return companion_main("intake mover", move, synced=False)


if __name__ == "__main__":
    sys.exit(main())
