"""Server hooks for the node's gunicorn servers (DICOMweb and viewer).

Loaded with ``--config python:pacs.node.gunicorn_hooks`` (:func:`pacs.node.webserver.command`).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from pacs.core.malloc import keep_large_buffers
from pacs.core.net import stop_when_orphaned

#: Signals that stop a worker.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def when_ready(server: Any) -> None:
    """The master stops gracefully (SIGTERM to itself, which its loop handles) once
    ``pacs serve`` is gone (:func:`pacs.core.net.stop_when_orphaned`)."""
    stop_when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM), "gunicorn")


def post_fork(server: Any, worker: Any) -> None:
    """Give a new worker the default action for the stop signals.

    A forked worker keeps the master's Python signal handlers until it installs its own
    (``Worker.init_signals``), and the master's handlers only queue a signal for the
    master's loop.  A Ctrl-C (SIGINT to the whole process group), or the master's
    SIGQUIT that follows it, arriving in that window was lost: the worker went on
    booting and the master waited its whole graceful timeout before killing it.  With
    the default action the worker simply ends, as it should when the node is stopping.
    """
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)
    # Request bodies are read in large pieces: reuse their pages (pacs.core.malloc).
    keep_large_buffers()
