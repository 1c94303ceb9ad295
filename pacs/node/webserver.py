"""The DICOMweb service as a supervised gunicorn child of ``pacs serve``.

The listening socket is bound here, before gunicorn starts, and handed over as
``fd://N``: a busy port is a clear start-up error of ``pacs serve`` (as it is for the
DIMSE port), and the socket accepts connections from the moment ``pacs serve`` says it
is up.  Gunicorn then loads ``pacs.node.apps:dicomweb_app()`` in each worker, which
builds settings and services after the fork (no ``--preload``): SQLite connections and
S3 clients never cross ``fork()``.

Every worker is a :class:`pacs.node.httpworker.HttpWorker`: an event loop reads requests
and writes lagging responses, so slow or stalled clients hold no application thread
(the reasons, the limits and the timeouts are in that module).  With ``PACS_TLS_CERT``
and ``PACS_TLS_KEY`` the worker serves HTTPS only, doing TLS in that loop
(:mod:`pacs.node.tls`); gunicorn is given no ``--certfile``/``--keyfile``, so its own
TLS, which hand-shakes blocking in the worker, never wraps a connection.  A gunicorn that exits
with an error is started again (:meth:`WebServer.watch`); DIMSE goes on meanwhile.

The core does not import falcon: gunicorn is started by module name.  Settings reach
the workers as environment variables (command-line overrides of ``pacs serve``
included), and the workers read them with the same :func:`pacs.core.config.load`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from pacs.core.config import Settings
from pacs.core.net import listening_socket, worker_count
from pacs.node import tls

log = logging.getLogger(__name__)

#: The WSGI application gunicorn loads in each worker.
APP = "pacs.node.apps:dicomweb_app()"
#: The worker class: an event loop for the network, threads for the application.
WORKER_CLASS = "pacs.node.httpworker.HttpWorker"
#: Seconds gunicorn lets running requests finish after SIGTERM.
GRACEFUL_SECONDS = 10
#: Seconds without a heartbeat from a worker's event loop before gunicorn replaces the
#: worker (the loop never waits for a request, so this catches a stuck process only).
REQUEST_TIMEOUT_SECONDS = 300
#: Longest request line (QIDO with long UID lists); gunicorn's ceiling.
MAX_REQUEST_LINE = 8190
#: Seconds before a gunicorn that exited with an error is started again (doubling up
#: to the longest while it keeps failing), and how long it must run to reset that.
RESTART_FIRST, RESTART_LONGEST, STABLE_SECONDS = 1.0, 30.0, 60.0


def number_of_workers(settings: Settings) -> int:
    """The configured worker count, or one per CPU."""
    return worker_count(settings.web_workers)


def listen(settings: Settings) -> socket.socket:
    """Bind and listen on the DICOMweb port (raises OSError when it is taken)."""
    return listening_socket(settings.bind_address, settings.web_port, backlog=2048)


#: The forwarders gunicorn believes about the scheme: this host only (README, "Behind a
#: reverse proxy").
TRUSTED_FORWARDERS = "127.0.0.1,::1"


def command(settings: Settings, fd: int) -> list[str]:
    """The gunicorn command line for an inherited listening socket ``fd``."""
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"fd://{fd}",
        "--workers", str(number_of_workers(settings)),
        "--worker-class", WORKER_CLASS,
        "--threads", str(max(1, settings.web_threads)),
        "--graceful-timeout", str(GRACEFUL_SECONDS),
        "--timeout", str(REQUEST_TIMEOUT_SECONDS),
        "--limit-request-line", str(MAX_REQUEST_LINE),
        # Only a forwarder on this host may say a request came over HTTPS
        # (X-Forwarded-Proto and its kin set wsgi.url_scheme, which the access rule
        # requires of credentials from other hosts, adapters/http/auth.py).  gunicorn's
        # own default is the environment's FORWARDED_ALLOW_IPS, which container images
        # often set to "*": then any client could claim it over plain HTTP.
        "--forwarded-allow-ips", TRUSTED_FORWARDERS,
        "--log-level", settings.log_level.lower(),
        "--error-logfile", "-",
        # Access logs would carry query strings, i.e. patient names: left off.
        # The control socket lives at one path per user: two nodes would collide.
        "--no-control-socket",
        "--config", "python:pacs.node.gunicorn_hooks",
        "--name", f"pacs-dicomweb-{settings.customer}",
        APP,
    ]


class WebServer:
    """gunicorn serving DICOMweb until :meth:`stop`.

    Parameters
    ----------
    settings : Settings
        Port, address, workers and threads.
    environment : mapping
        Extra environment for the workers (the command-line overrides).
    """

    def __init__(self, settings: Settings, environment: Mapping[str, str]) -> None:
        self.settings = settings
        self.environment = dict(environment)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> WebServer:
        """Bind the port and start gunicorn on it.

        Raises
        ------
        OSError
            When the port cannot be bound.
        """
        sock = listen(self.settings)
        try:
            fd = sock.fileno()
            env = {**os.environ, **self.environment}
            process = subprocess.Popen(command(self.settings, fd), env=env,
                                       pass_fds=(fd,), stdin=subprocess.DEVNULL)
        finally:
            # gunicorn holds its own copy; ours must not leak into the DIMSE workers
            # forked next, or the port would outlive gunicorn.
            sock.close()
        with self._lock:
            self.process = process
            self.started_at = time.monotonic()
        log.info("DICOMweb on %s://%s:%d/ and /dicom-web/ with %d worker(s), %s",
                 tls.scheme(self.settings), self.settings.bind_address,
                 self.settings.web_port, number_of_workers(self.settings),
                 tls.describe(self.settings))
        return self

    def watch(self, stopping: threading.Event) -> threading.Thread:
        """A thread that restarts gunicorn when it exits on its own, and sends it SIGTERM
        as soon as the node is stopping.

        DIMSE never stops because the HTTP side failed: a gunicorn that exits with an
        error (a crash, a port it cannot bind again) is started again after
        :data:`RESTART_FIRST` seconds, then twice as long each time up to
        :data:`RESTART_LONGEST` while it keeps failing; its port refuses connections
        meanwhile, so the container's health check reports the node unhealthy.
        gunicorn exiting with 0 was asked to (Ctrl-C reaches the whole process group,
        gunicorn included, often before this process has seen it): the node stops.
        """
        def run() -> None:
            delay = RESTART_FIRST
            next_start = 0.0
            while not stopping.wait(0.2):
                process = self.process
                if process is not None:
                    code = process.poll()
                    if code is None:
                        if time.monotonic() - self.started_at > STABLE_SECONDS:
                            delay = RESTART_FIRST
                        continue
                    if code == 0:
                        log.info("the DICOMweb server stopped; stopping the node")
                        stopping.set()
                        return
                    log.error("the DICOMweb server exited with %s; restarting it in %g s "
                              "(DIMSE goes on)", code, delay)
                    with self._lock:
                        self.process = None
                    next_start, delay = time.monotonic() + delay, min(delay * 2,
                                                                      RESTART_LONGEST)
                    continue
                if time.monotonic() < next_start:
                    continue
                try:
                    self.start()
                except OSError as exc:
                    log.error("cannot start the DICOMweb server on port %d: %s; retrying "
                              "in %g s", self.settings.web_port, exc, delay)
                    next_start, delay = time.monotonic() + delay, min(delay * 2,
                                                                      RESTART_LONGEST)
            self.terminate()

        self._thread = threading.Thread(target=run, name="pacs-web-watch", daemon=True)
        self._thread.start()
        return self._thread

    def terminate(self) -> None:
        """Ask gunicorn to finish running requests and exit."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful period, then SIGKILL; the exit code.

        The caller has set the ``stopping`` event of :meth:`watch`: the watcher is
        awaited first, so that it starts nothing after this.
        """
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.terminate()
        process = self.process
        if process is None:
            return None
        try:
            return process.wait(GRACEFUL_SECONDS + 5)
        except subprocess.TimeoutExpired:
            log.error("the DICOMweb server did not stop in time; killing it")
            process.kill()
            return process.wait()
