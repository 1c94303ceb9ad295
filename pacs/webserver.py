"""The DICOMweb service as a supervised gunicorn child of ``pacs serve``.

The listening socket is bound here, before gunicorn starts, and handed over as
``fd://N``: a busy port is a clear start-up error of ``pacs serve`` (as it is for the
DIMSE port), and the socket accepts connections from the moment ``pacs serve`` says it
is up.  Gunicorn then loads ``adapters.dicomweb.app:get_app()`` in each worker, which
builds settings and services after the fork (no ``--preload``): SQLite connections and
S3 clients never cross ``fork()``.

The core does not import falcon: gunicorn is started by module name.  Settings reach
the workers as environment variables (command-line overrides of ``pacs serve``
included), and the workers read them with the same :func:`pacs.config.load`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping

from pacs.config import Settings
from pacs.net import listening_socket, worker_count

log = logging.getLogger(__name__)

#: The WSGI application gunicorn loads in each worker.
APP = "adapters.dicomweb.app:get_app()"
#: Seconds gunicorn lets running requests finish after SIGTERM.
GRACEFUL_SECONDS = 10
#: Seconds a request may take before gunicorn restarts its worker (large STOW bodies).
REQUEST_TIMEOUT_SECONDS = 300
#: Longest request line (QIDO with long UID lists); gunicorn's ceiling.
MAX_REQUEST_LINE = 8190


def number_of_workers(settings: Settings) -> int:
    """The configured worker count, or one per CPU."""
    return worker_count(settings.web_workers)


def listen(settings: Settings) -> socket.socket:
    """Bind and listen on the DICOMweb port (raises OSError when it is taken)."""
    return listening_socket(settings.bind_address, settings.web_port, backlog=2048)


def command(settings: Settings, fd: int) -> list[str]:
    """The gunicorn command line for an inherited listening socket ``fd``."""
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"fd://{fd}",
        "--workers", str(number_of_workers(settings)),
        "--worker-class", "gthread",
        "--threads", str(max(1, settings.web_threads)),
        "--graceful-timeout", str(GRACEFUL_SECONDS),
        "--timeout", str(REQUEST_TIMEOUT_SECONDS),
        "--limit-request-line", str(MAX_REQUEST_LINE),
        "--log-level", settings.log_level.lower(),
        "--error-logfile", "-",
        # Access logs would carry query strings, i.e. patient names: left off.
        # The control socket lives at one path per user: two nodes would collide.
        "--no-control-socket",
        "--config", "python:pacs.gunicorn_hooks",
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
            self.process = subprocess.Popen(command(self.settings, fd), env=env,
                                            pass_fds=(fd,), stdin=subprocess.DEVNULL)
        finally:
            # gunicorn holds its own copy; ours must not leak into the DIMSE workers
            # forked next, or the port would outlive gunicorn.
            sock.close()
        log.info("DICOMweb on http://%s:%d/ and /dicom-web/ with %d worker(s)",
                 self.settings.bind_address, self.settings.web_port,
                 number_of_workers(self.settings))
        return self

    def watch(self, stopping: threading.Event, failed: threading.Event) -> threading.Thread:
        """A thread that stops the node when gunicorn exits on its own, and sends
        gunicorn SIGTERM as soon as the node is stopping.

        gunicorn exiting with 0 was asked to (Ctrl-C reaches the whole process group,
        gunicorn included, often before this process has seen it): the node stops
        cleanly.  Any other exit (a worker that cannot boot, a crash) stops the node
        with ``failed`` set.
        """
        def run() -> None:
            assert self.process is not None
            while not stopping.wait(0.2):
                code = self.process.poll()
                if code is None:
                    continue
                if code == 0:
                    log.info("the DICOMweb server stopped; stopping the node")
                else:
                    log.error("the DICOMweb server exited with %s; stopping the node", code)
                    failed.set()
                stopping.set()
                return
            self.terminate()

        thread = threading.Thread(target=run, name="pacs-web-watch", daemon=True)
        thread.start()
        return thread

    def terminate(self) -> None:
        """Ask gunicorn to finish running requests and exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful period, then SIGKILL; the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(GRACEFUL_SECONDS + 5)
        except subprocess.TimeoutExpired:
            log.error("the DICOMweb server did not stop in time; killing it")
            self.process.kill()
            return self.process.wait()
