"""The one seam between pacs and pynetdicom's internals.

Everything that replaces, overrides or reads private parts of pynetdicom lives in this
package, and nowhere else (``tests/unit/test_private_access.py`` checks it):

* :mod:`~pacs.dimse.seam.reactor`: blocking waits instead of the polling loops of
  pynetdicom's two association threads; PDU ceilings checked before a body is read,
  capped message buffers, a wait for an A-ASSOCIATE-RQ that ends with the connection;
* :mod:`~pacs.dimse.seam.wire`: DIMSE messages encoded here and written to / read from
  the association's socket, bypassing pynetdicom's DIMSE and DUL layers;
* :mod:`~pacs.dimse.seam.inbound`: the C-STORE requests after an association's first,
  read from its socket and answered by the association thread, anything else handed
  back to pynetdicom;
* :mod:`~pacs.dimse.seam.services`: pynetdicom's Storage and Query/Retrieve service
  classes replaced for a node's associations by adapters that run the plain DIMSE
  logic (:mod:`pacs.dimse.find`, :mod:`pacs.dimse.retrieve`, :mod:`pacs.dimse.storage`)
  over those sockets;
* :mod:`~pacs.dimse.seam.notify`: N-EVENT-REPORT requests (storage commitment
  results) sent on a peer's association by its own thread when it is quiet, their
  responses told apart from the peer's requests;
* this module: the version gate, :func:`install` and pynetdicom's configuration
  switches.

The interface for the rest of :mod:`pacs.dimse` is :func:`install`, :func:`supported`,
:data:`SUPPORTED_VERSIONS`, :func:`answered` (an event handler in every mode) and
:mod:`~pacs.dimse.seam.notify`'s :func:`available`, :func:`report`, :class:`EventReport`
and :class:`Outcome`.  With PACS_DIMSE_SEAM=off,
or a pynetdicom version not in :data:`SUPPORTED_VERSIONS`, nothing of pynetdicom is
replaced: pynetdicom's own service classes call the event handlers of
:mod:`pacs.dimse.handlers`, which run the same logic (slower; that module lists what
pynetdicom's own loops do differently), and :func:`~pacs.dimse.seam.notify.available`
is False for every association.
"""

from __future__ import annotations

import logging
import threading

import pynetdicom
from pynetdicom import _config

import pacs.dimse.seam.notify as notify
import pacs.dimse.seam.reactor as reactor
import pacs.dimse.seam.services as services

log = logging.getLogger(__name__)

#: EVT_DIMSE_SENT of a node's associations, with the seam on or off: the network idle
#: time starts again with a final C-FIND / C-MOVE / C-GET response.
answered = reactor.answered

#: The pynetdicom versions the seam was written and tested against (setup.cfg pins the
#: same).  It reproduces private methods of these versions line by line: any other
#: version, newer or older, runs pure pynetdicom until the seam has been checked
#: against it (``PACS_DIMSE_SEAM=off pytest -m dimse`` and the same run with it on).
SUPPORTED_VERSIONS = ("3.0.4",)

_lock = threading.Lock()
_patched = False
_refused_version: str | None = None


def supported(version: str | None = None) -> bool:
    """True when ``version`` (the installed pynetdicom's by default) is one the seam
    was written and tested against."""
    return (version or pynetdicom.__version__) in SUPPORTED_VERSIONS


def install(enabled: bool) -> bool:
    """Set pynetdicom's process-wide switches and, when ``enabled`` and the installed
    pynetdicom is supported, replace its internals (once per process); return whether
    the seam runs.

    Idempotent.  An unsupported version is logged once, at WARNING, and pure pynetdicom
    runs.  The replacement cannot be undone within a process: a node started with the
    seam off in a process where another node runs it gets pynetdicom's own service
    classes (they serve only seam nodes' associations) but its patched reactor.
    """
    global _patched, _refused_version
    _configure()
    if not enabled:
        return False
    with _lock:
        if _patched:
            return True
        if not supported():
            if _refused_version != pynetdicom.__version__:
                _refused_version = pynetdicom.__version__
                log.warning("pynetdicom %s: the DIMSE seam is written and tested for %s; "
                            "running pure pynetdicom (slower)", pynetdicom.__version__,
                            ", ".join(SUPPORTED_VERSIONS))
            return False
        reactor.patch()
        services.patch()
        notify.install()
        _patched = True
        return True


def _configure() -> None:
    """pynetdicom's documented switches (``pynetdicom._config``), in every mode.

    pynetdicom logs C-FIND/C-MOVE/C-GET identifiers (patient data) by default: off.
    Its per-PDU debug handlers cost time on every message: off.  Only switches the
    installed version has are set.
    """
    for name, value in (("LOG_REQUEST_IDENTIFIERS", False),
                        ("LOG_RESPONSE_IDENTIFIERS", False),
                        ("LOG_HANDLER_LEVEL", "none")):
        if hasattr(_config, name):
            setattr(_config, name, value)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
