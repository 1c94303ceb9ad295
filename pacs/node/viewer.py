"""The OHIF viewer port: where the prebuilt viewer is, and its gunicorn process.

The viewer port (``PACS_VIEWER_PORT``, 8080) is served by its own gunicorn running
``pacs.node.apps:viewer_app()``: OHIF's static files at ``/`` and the DICOMweb
application itself, in the same worker, under ``/dicom-web``.  Same origin, so the
browser needs no CORS; in-process, so there is no proxy hop, and the access rule of
the DICOMweb service sees the browser's own address (a proxy on this host would make
every browser look like loopback).  See the README, "Viewer".

Its command line is the DICOMweb one (:func:`pacs.node.webserver.command`) with the viewer's
application: the same worker class (:class:`pacs.node.httpworker.HttpWorker`), limits,
timeouts and TLS (HTTPS only when ``PACS_TLS_CERT`` is set, :mod:`pacs.node.tls`).  Like
:mod:`pacs.node.webserver`, the core only starts gunicorn by module name and never imports
falcon.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pacs.core.config import Settings
from pacs.node import tls, webserver

log = logging.getLogger(__name__)

#: The WSGI application the viewer's gunicorn loads in each worker.
VIEWER_APP = "pacs.node.apps:viewer_app()"
#: Where ``scripts/fetch-ohif.sh`` puts the dist inside a source checkout.
CHECKOUT_DIST = Path("vendor", "ohif", "dist")
#: Where ``scripts/fetch-ohif.sh --prefix PREFIX`` puts it for an installed package: the
#: data folder of the installation whose ``sys.prefix`` is PREFIX (a virtualenv, /usr/local).
INSTALLED_DIST = Path("share", "pacs", "ohif", "dist")


@dataclass(frozen=True)
class DistLocation:
    """A folder that may hold the OHIF dist, and why it is looked at."""

    folder: Path
    source: str  # "PACS_VIEWER_DIST", "the source checkout" or "the installation"

    @property
    def present(self) -> bool:
        """The folder holds OHIF's ``index.html``."""
        return (self.folder / "index.html").is_file()

    def __str__(self) -> str:
        return f"{self.folder} (from {self.source})"


def source_checkout() -> Path | None:
    """The project root when ``pacs`` runs from a source checkout (an editable install).

    Derived from this module's file, so it does not depend on the working folder; an
    installed package (in ``site-packages``) has no checkout, and ``None`` is returned.
    """
    root = Path(__file__).resolve().parents[2]  # pacs/node/viewer.py
    return root if (root / "setup.cfg").is_file() and (root / "pacs").is_dir() else None


def dist_locations(settings: Settings, checkout: Path | None = None,
                   prefix: Path | None = None) -> list[DistLocation]:
    """Where the OHIF dist is looked for, first match wins.

    ``PACS_VIEWER_DIST`` alone when it is set: an operator who names a folder means that
    one, and a missing one is reported rather than replaced by another.  Otherwise
    ``vendor/ohif/dist`` of the source checkout, then ``share/pacs/ohif/dist`` under the
    installation's prefix.  None of them depends on the folder ``pacs serve`` was started
    in, so a service manager starting it anywhere finds the same viewer.

    Parameters
    ----------
    settings : Settings
        ``viewer_dist`` (``PACS_VIEWER_DIST``).
    checkout : Path, optional
        The source checkout; :func:`source_checkout` when omitted.
    prefix : Path, optional
        The installation prefix; ``sys.prefix`` when omitted.
    """
    if settings.viewer_dist:
        return [DistLocation(Path(settings.viewer_dist).absolute(), "PACS_VIEWER_DIST")]
    checkout = source_checkout() if checkout is None else checkout
    prefix = Path(sys.prefix) if prefix is None else prefix
    found = [DistLocation(checkout / CHECKOUT_DIST, "the source checkout")] if checkout else []
    return [*found, DistLocation(prefix / INSTALLED_DIST, "the installation")]


def find(settings: Settings) -> DistLocation | None:
    """The first location of :func:`dist_locations` that holds the dist, or ``None``."""
    return next((where for where in dist_locations(settings) if where.present), None)


def find_dist(settings: Settings) -> Path | None:
    """The OHIF dist folder to serve, or ``None`` when it is not installed."""
    where = find(settings)
    return where.folder if where else None


def missing_message(settings: Settings) -> str:
    """What to tell the operator when the viewer files are missing: where they were
    looked for and how to get them."""
    looked = "; ".join(str(where) for where in dist_locations(settings))
    return (f"the OHIF viewer is not installed: no index.html in {looked}. Run "
            "scripts/fetch-ohif.sh in the source checkout (for a package installed from "
            f"it: scripts/fetch-ohif.sh --prefix {sys.prefix}), or set PACS_VIEWER_DIST "
            "to a folder holding OHIF's dist. DIMSE and DICOMweb run without it")


def viewer_settings(settings: Settings) -> Settings:
    """The settings as :mod:`pacs.node.webserver` reads them, for the viewer's port."""
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
    log.info("OHIF viewer on %s://%s:%d/ (DICOMweb under /dicom-web), files in %s",
             tls.scheme(settings), settings.bind_address, settings.viewer_port,
             _described(settings, dist))
    return process


def _described(settings: Settings, dist: Path) -> str:
    """``dist`` with the source it was found through, for the log."""
    where = next((w for w in dist_locations(settings) if w.folder == dist), None)
    return str(where) if where else str(dist)
