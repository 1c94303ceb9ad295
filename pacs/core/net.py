"""Listening sockets and worker counts shared by the node's servers (DIMSE, DICOMweb,
viewer): the parent binds, so a taken port is a clear start-up error, and the workers
inherit the socket; and the watch that ends a process of the node once ``pacs serve``
is gone."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds between two looks at whether the parent is still there.
PARENT_WATCH = 1.0
#: The environment variable by which ``pacs serve`` tells the processes it starts its
#: process ID (they may start after it is gone).
SERVE_PID = "PACS_SERVE_PID"


def stop_when_orphaned(stop: Callable[[], None], what: str,
                       parent: int | None = None) -> threading.Thread:
    """Call ``stop`` once ``pacs serve`` is gone: this process' parent is no longer
    ``parent`` (by default the :data:`SERVE_PID` of the environment, else the parent
    it has now), as after a SIGKILL of ``pacs serve``, which it cannot pass on.

    A DIMSE worker left so kept the listening socket and served associations for a
    node no longer there (a restarted node could not bind its port, or shared it with
    the old code); a companion kept moving or forwarding beside the next node's.  The
    watch is a daemon thread, looking every :data:`PARENT_WATCH` seconds (first at
    once: the parent may have died while this process started).
    """
    if parent is None:
        told = os.environ.get(SERVE_PID, "")
        parent = int(told) if told.isdigit() else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH)
        log.warning("%s: pacs serve is gone; stopping", what)
        stop()

    thread = threading.Thread(target=watch, name="pacs-parent-watch", daemon=True)
    thread.start()
    return thread


def stop_on_signals(stopping: threading.Event) -> None:
    """Set ``stopping`` on SIGTERM, SIGINT and SIGHUP (a closed terminal stops a process
    of the node as SIGTERM does), an ignored SIGHUP left ignored (run under nohup)."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(number) is not signal.SIG_IGN or number != signal.SIGHUP:
            signal.signal(number, lambda *_: stopping.set())


def listening_socket(address: str, port: int, backlog: int) -> socket.socket:
    """Bind ``address:port`` (IPv6 when the address has a colon) and listen."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(backlog)
    return sock


def worker_count(configured: int) -> int:
    """``configured``, or one per CPU this process may run on when it is 0."""
    return configured or max(1, len(os.sched_getaffinity(0)))
