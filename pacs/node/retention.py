"""Data retention: studies removed once their retention period is over.

``PACS_RETENTION_DAYS`` (:func:`pacs.core.config.parse_retention`) gives the period in
days since a study last received an instance: one number for every study (``3650``),
or per modality (``CT=3650,MR=1825``) with an optional number for the others
(``3650,MG=7300``).  A study with series of several modalities is kept for the longest
of their periods; with modalities only (no bare number), a study of no listed modality
is never removed.  Empty turns retention off.

``pacs serve`` runs this module as a companion process (``python -m
pacs.node.retention``, :mod:`pacs.node.companions`) when retention is on: every
``PACS_RETENTION_INTERVAL`` seconds it removes expired studies, oldest first, a run of
at most :data:`PER_RUN` studies and :data:`PER_RUN_INSTANCES` instances (but for one
larger study) at a time through the one removal path
(:meth:`pacs.core.deletion.Deleter.expire`: per-UID locks, rows and tombstones in
transactions of a few hundred, then the objects, an audit event), so that a first run
over years of data never holds the index, or the memory of a plan, for long; after a
run that removed any, the next follows :data:`BACKLOG_PAUSE` seconds later instead of
the interval, so that a site storing more studies a day than a run takes still
catches up.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

if __name__ == "__main__":
    # Started by `pacs serve`, which stops it with SIGTERM; a Ctrl-C reaches the whole
    # process group, maybe during the imports below: ignore it until main() handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from pacs.core.config import RetentionRules, Settings
from pacs.core.deletion import Deleter
from pacs.core.errors import PacsError
from pacs.core.services import Services

#: Named, not ``__name__``: the module also runs as ``__main__`` (``python -m``).
log = logging.getLogger("pacs.node.retention")

#: Studies removed per run at most.
PER_RUN = 100
#: Instances removed per run at most (a larger study goes alone): the plan of a run is
#: held in memory, about 1 KB an instance.
PER_RUN_INSTANCES = 20_000
#: Seconds between two runs while expired studies are left over from the last.
BACKLOG_PAUSE = 1.0


def run_once(deleter: Deleter, rules: RetentionRules, limit: int = PER_RUN) -> int:
    """Remove up to ``limit`` expired studies; return how many were planned."""
    if not rules.enabled:
        return 0
    removed = deleter.expire(rules.by_modality, rules.default, limit, PER_RUN_INSTANCES)
    if removed:
        log.info("data retention: %d expired stud(ies) removed", removed)
    return removed


def run(deleter: Deleter, rules: RetentionRules, interval: float,
        stopping: threading.Event) -> None:
    """Run every ``interval`` seconds until ``stopping`` (sooner while a backlog is
    left: see the module docstring); a failed run (the index busy, the store down) is
    logged and the next one tries again."""
    while not stopping.is_set():
        wait = interval
        try:
            if run_once(deleter, rules) > 0:
                wait = min(interval, BACKLOG_PAUSE)  # maybe more: look again soon
        except PacsError as exc:
            log.error("data retention: this run failed (%s); the next one tries again", exc)
        stopping.wait(wait)


def main() -> int:
    """``python -m pacs.node.retention``: expire studies until SIGTERM/SIGINT."""
    from pacs.node.companions import companion_main

    def expire(settings: Settings, services: Services, stopping: threading.Event) -> None:
        run(services.deleter, settings.retention, settings.retention_interval, stopping)

    return companion_main("data retention", expire)


if __name__ == "__main__":
    sys.exit(main())
