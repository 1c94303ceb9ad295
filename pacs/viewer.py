"""The OHIF viewer port: where the prebuilt viewer is, and its gunicorn process.

The viewer port (``PACS_VIEWER_PORT``, 8080) is served by its own gunicorn running
``adapters.viewer.app:get_app()``: OHIF's static files at ``/`` and the DICOMweb
application itself, in the same worker, under ``/dicom-web``.  Same origin, so the
browser needs no CORS; in-process, so there is no proxy hop, and the access rule of
the DICOMweb service sees the browser's own address (a proxy on this host would make
every browser look like loopback).  See the README, "Viewer".

Its command line is the DICOMweb one (:func:`pacs.webserver.command`) with the viewer's
application: the same worker class (:class:`pacs.httpworker.HttpWorker`), limits and
timeouts.  Like :mod:`pacs.webserver`, the core only starts gunicorn by module name and
never imports falcon.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from pacs import webserver
from pacs.config import Settings

log = logging.getLogger(__name__)

#: The WSGI application the viewer's gunicorn loads in each worker.
VIEWER_APP = "adapters.viewer.app:get_app()"
#: Where ``scripts/fetch-ohif.sh`` puts the dist, relative to the working folder.
DEFAULT_DIST = Path("vendor/ohif/dist")


def find_dist(settings: Settings) -> Path | None:
    """The OHIF dist folder to serve, or ``None`` when it is not installed.

    ``PACS_VIEWER_DIST`` when set, else ``vendor/ohif/dist`` of the working folder (as
    the data folder's default is relative to it); it must hold ``index.html``.
    """
    folder = Path(settings.viewer_dist) if settings.viewer_dist else DEFAULT_DIST
    folder = folder.absolute()
    return folder if (folder / "index.html").is_file() else None


def missing_message(settings: Settings) -> str:
    """What to tell the operator when the viewer files are missing."""
    where = settings.viewer_dist or f"{DEFAULT_DIST} (in {Path.cwd()})"
    return (f"the OHIF viewer is not installed: no index.html in {where}; run "
            "scripts/fetch-ohif.sh in the source checkout (or set PACS_VIEWER_DIST). "
            "DIMSE and DICOMweb run without it")


def viewer_settings(settings: Settings) -> Settings:
    """The settings as :mod:`pacs.webserver` reads them, for the viewer's port."""
    return settings.with_overrides(web_port=settings.viewer_port,
                                   web_workers=settings.viewer_workers)


def command(settings: Settings, fd: int) -> list[str]:
    """gunicorn's command line for the viewer: the DICOMweb one with the viewer's app."""
    line = webserver.command(viewer_settings(settings), fd)
    line = [VIEWER_APP if part == webserver.APP else part for part in line]
    if "--name" in line:
        line[line.index("--name") + 1] = f"pacs-viewer-{settings.customer}"
    return line


def launch(settings: Settings, dist: Path,
           environment: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Bind the viewer port and start gunicorn on it.

    Parameters
    ----------
    settings : Settings
        The node's settings (``viewer_port``, ``viewer_workers``, ``web_threads``).
    dist : Path
        The OHIF dist folder.
    environment : mapping
        Extra environment for the workers (the command-line overrides of ``pacs serve``).

    Raises
    ------
    OSError
        When the port cannot be bound.
    """
    sock = webserver.listen(viewer_settings(settings))
    try:
        fd = sock.fileno()
        env = {**os.environ, **environment, "PACS_VIEWER_DIST": str(dist)}
        process = subprocess.Popen(command(settings, fd), env=env, pass_fds=(fd,),
                                   stdin=subprocess.DEVNULL)
    finally:
        sock.close()  # gunicorn holds its own copy
    log.info("OHIF viewer on http://%s:%d/ (DICOMweb under /dicom-web)",
             settings.bind_address, settings.viewer_port)
    return process
