"""The customers a DIMSE worker serves, each association bound to one by its called AE
title.

One AE serves every customer: pynetdicom's own called AE title check is off
(``require_called_aet``), and the worker's EVT_REQUESTED handler
(:func:`pacs.dimse.server._admit`) looks the called AE title up here: an unknown one
gets A-ASSOCIATE-RJ (called AE title not recognized, PS3.8 9.3.4); a known one has its
customer's handlers bound to the association (pynetdicom's public ``Association.bind``,
before any DIMSE message can arrive), so each C-STORE, C-FIND, C-MOVE, C-GET and
N-ACTION of the association reaches that customer's
:class:`~pacs.core.services.Services` only, and its audit events carry that customer.
The association's A-ASSOCIATE-AC answers with the title it was called by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacs.core.access import AccessPolicy
from pacs.core.audit import AuditTrail
from pacs.core.config import Settings
from pacs.core.services import Services
from pacs.dimse import handlers
from pacs.dimse.audit import Audits
from pacs.dimse.reports import Reporter


@dataclass
class Served:
    """One customer in a worker: its services, the audit of its associations and the
    reporter of its storage commitment results."""

    ae_titles: tuple[str, ...]
    services: Services
    audits: Audits
    reporter: Reporter


class Customers:
    """The customers of one worker process (shared by its plain and TLS servers).

    Parameters
    ----------
    served : sequence of (AE titles, Services)
        Each customer's called AE titles and services (titles unique across them).
    settings : Settings
        The node's settings (ports, limits, and the AE title the node's own
        associations are requested with: C-MOVE sub-operations).
    """

    def __init__(self, served: Sequence[tuple[Sequence[str], Services]],
                 settings: Settings) -> None:
        self.settings = settings
        self.served = [Served(tuple(t.strip() for t in titles), services,
                              Audits(services.audit), Reporter(services))
                       for titles, services in served]
        self._by_title = {title: one for one in self.served for title in one.ae_titles}

    @classmethod
    def single(cls, services: Services) -> Customers:
        """The one customer of ``services``, called by its settings' AE title."""
        return cls([((services.settings.ae_title,), services)], services.settings)

    def titles(self) -> list[str]:
        """Every called AE title served."""
        return list(self._by_title)

    def bindings(self, seam: bool) -> dict[str, list[tuple[Any, ...]]]:
        """The handlers to bind to an association, by the called AE title that chose
        them (``seam``: the server's associations run through the seam)."""
        return {title: handlers.of_customer(one.services, seam, one.audits, one.reporter)
                for title, one in self._by_title.items()}

    def policies(self) -> dict[str, tuple[AccessPolicy, AuditTrail]]:
        """Each customer's access rules and audit trail, by called AE title."""
        return {title: (one.services.access, one.services.audit)
                for title, one in self._by_title.items()}

    def owners(self) -> dict[str, str]:
        """Each customer's name, by called AE title (its share of the associations,
        :func:`pacs.dimse.server.connection_limits_of`)."""
        return {title: one.services.settings.customer
                for title, one in self._by_title.items()}

    def start(self) -> None:
        """Start delivering storage commitment results."""
        for one in self.served:
            one.reporter.start()

    def stop(self) -> None:
        """Stop delivering them (those not delivered wait in the queues)."""
        for one in self.served:
            one.reporter.stop()

    def close(self) -> None:
        """Close every customer's services."""
        for one in self.served:
            one.services.close()
