"""C-STORE to a forwarding destination of ``PACS_MODALITIES``: a batch per association,
as a forwarding :class:`~pacs.core.forwarding.Sender`.

The association proposes what a C-MOVE destination gets
(:func:`pacs.dimse.retrieve.destination_contexts`: each SOP class of the batch in its
stored transfer syntaxes, then Explicit and Implicit VR Little Endian), and each
instance goes in the context the C-MOVE sub-operations would choose
(:func:`pacs.dimse.sender.route`): as stored when the destination accepted that
syntax, else converted to an uncompressed syntax it accepted
(:func:`pacs.dimse.sender.object_file`), else refused.  The request goes through
pynetdicom's public ``send_c_store`` (a Part 10 file streamed from disk), each with a
Message ID of its own on the association (PS3.7 9.3.1.1); a store without local files
(S3) copies each object to a temporary file first, as a C-MOVE does.

The sender installs the seam in its process (:func:`pacs.dimse.seam.install`, under
PACS_DIMSE_SEAM): the forwarder companion and ``pacs send`` run in processes of their
own, where pynetdicom's own association thread could take a C-STORE response for a
request and leave the store waiting for the DIMSE timeout (the race
:mod:`pacs.dimse.seam.reactor` closes).

The response status decides (PS3.4 B.2.3, PS3.7 C):

=====================================  =================================================
0000, warnings (0001, 0107, 0111,      acknowledged
0116, Bxxx)
A7xx (out of resources), 0110          sent again after the destination's backoff (0110:
(processing failure), 0124 (not        a failure of the destination's own, as this
authorized), no response, association  node answers a fault of its own, and as the
refused or aborted                     STOW-RS sender takes it; 0124: the
                                       destination refuses this node, not the
                                       instance; refused for good, a whole backlog
                                       would be failed in seconds)
A771                                   refused for good: the instance was rejected there
                                       (IHE RAD TF-2 4.66.4, as this node and
                                       dcm4chee-arc answer it), never accepted again
anything else (A9xx, Cxxx, 0122 ...)   refused for good
=====================================  =================================================

An instance during whose C-STORE the association ended, or that got no response, is a
*suspect* (:attr:`pacs.core.forwarding.Delivery.suspect`): a destination that aborts
on one instance would otherwise be offered it first in every batch, for good.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association

from pacs.core.audit import Participant
from pacs.core.config import Modality, Settings
from pacs.core.errors import FrameTooLarge, NotFound, PacsError, UnreadableData
from pacs.core.forwarding import Delivery, Result
from pacs.core.logs import failure_text
from pacs.core.query.model import InstanceRef
from pacs.core.rejection import REFUSED_AGAIN
from pacs.core.storage import ObjectStore
from pacs.dimse import handlers, seam, tls
from pacs.dimse.connection import AcceptedContext
from pacs.dimse.retrieve import Outcome, classify, destination_contexts
from pacs.dimse.sender import object_file, route

log = logging.getLogger(__name__)


#: Refused: Not Authorized (PS3.7 C.5.4).
NOT_AUTHORIZED = 0x0124
#: Processing failure (PS3.7 C.5).
PROCESSING_FAILURE = 0x0110


def delivery_of(status: int | None) -> Delivery:
    """What a C-STORE response status means for forwarding (see the module's table)."""
    if status is None:
        return Delivery(Result.RETRY, "no C-STORE response", suspect=True)
    if classify(status) is not Outcome.FAILED:
        return Delivery(Result.SENT, f"status {status:04X}")
    if status == REFUSED_AGAIN:
        return Delivery(Result.REFUSED, f"status {status:04X} (rejected there)")
    if status >> 8 == 0xA7:
        return Delivery(Result.RETRY, f"status {status:04X} (out of resources)")
    if status == PROCESSING_FAILURE:
        return Delivery(Result.RETRY, f"status {status:04X} (processing failure)")
    if status == NOT_AUTHORIZED:
        return Delivery(Result.RETRY, f"status {status:04X} (not authorized)")
    return Delivery(Result.REFUSED, f"status {status:04X}")


class DimseSender:
    """Sends batches to one DIMSE destination.

    Parameters
    ----------
    destination : Modality
        Its AE title and address (``:tls``: DICOM TLS, PS3.15 B.12).
    store : ObjectStore
        Where the objects are.
    settings : Settings
        The node's AE title, PDU size, DIMSE timeout and TLS files.
    """

    def __init__(self, destination: Modality, store: ObjectStore, settings: Settings) -> None:
        self.destination = destination
        self.store = store
        self.settings = settings
        self.receiver = Participant(destination.ae_title, False, address=destination.host)
        seam.install(settings.dimse_seam)
        ae = AE(ae_title=settings.ae_title)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout",
                     "connection_timeout"):
            setattr(ae, name, settings.dimse_timeout)
        self._ae = ae
        # A TLS destination is reached over TLS or not at all (the context is made
        # whichever list marked it TLS).
        self._tls = ((tls.destination_context(settings), destination.host)
                     if destination.tls else None)

    def _associate(self, refs: Sequence[InstanceRef], accepted: list[int]
                   ) -> Association | None:
        """The association for ``refs``; ``accepted`` gets the number of presentation
        contexts the destination accepted, when it answered with an A-ASSOCIATE-AC
        (pynetdicom aborts one that accepted none, and that returns no association)."""
        classes: dict[str, set[str]] = {}
        for ref in refs:
            classes.setdefault(ref.sop_class_uid, set()).add(ref.transfer_syntax)

        def answered(event: evt.Event) -> None:
            accepted.append(len(event.assoc.accepted_contexts))

        return handlers.open_association(
            self._ae, self.destination.host, self.destination.port,
            contexts=destination_contexts(classes), ae_title=self.destination.ae_title,
            max_pdu=self.settings.max_pdu, tls_args=self._tls,
            evt_handlers=[(evt.EVT_CONN_OPEN, handlers.tcp_settings),
                          (evt.EVT_ACCEPTED, answered),
                          *handlers.Responses().handlers()])

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        """C-STORE ``refs`` over one association; a :class:`Delivery` per instance."""
        where = f"{self.destination.ae_title} ({self.destination.host}:{self.destination.port})"
        answered: list[int] = []
        try:
            assoc = self._associate(refs, answered)
        except Exception as exc:  # noqa: BLE001 - e.g. a TLS file unreadable: again later
            return [Delivery(Result.RETRY, failure_text(exc))] * len(refs)
        if assoc is None and answered == [0]:
            # It accepted the association and none of the batch's SOP classes in any
            # syntax: refused for good, as a class it refuses in a batch it took
            # (:meth:`_store`), rather than tried again for ever.
            return [Delivery(Result.REFUSED, f"{where} accepted no presentation context "
                                             f"for {UID(ref.sop_class_uid).name}")
                    for ref in refs]
        if assoc is None:
            return [Delivery(Result.RETRY, f"no association with {where}")] * len(refs)
        deliveries: list[Delivery] = []
        try:
            accepted = handlers.accepted_contexts(assoc)
            for message_id, ref in enumerate(refs, start=1):
                if not assoc.is_established:
                    deliveries.append(Delivery(Result.RETRY, "association ended",
                                               offered=False))
                    continue
                deliveries.append(self._store(assoc, accepted, ref, message_id))
        finally:
            if assoc.is_established:
                assoc.release()
        return deliveries

    def _store(self, assoc: Association, accepted: list[AcceptedContext],
               ref: InstanceRef, message_id: int) -> Delivery:
        found = route(accepted, ref.sop_class_uid, ref.transfer_syntax)
        if found is None:
            return Delivery(Result.REFUSED, f"no context accepted for "
                                            f"{UID(ref.sop_class_uid).name} in "
                                            f"{UID(ref.transfer_syntax).name} or an "
                                            "uncompressed syntax it converts to")
        try:
            with object_file(self.store, ref, found[1], self.settings) as path:
                response = assoc.send_c_store(path, msg_id=message_id)
        except (UnreadableData, FrameTooLarge) as exc:  # not convertible, ever
            return Delivery(Result.REFUSED, f"cannot convert: {exc}")
        except Exception as exc:
            log.debug("forwarding failed for %s", ref.sop_uid, exc_info=exc)
            # The detail is logged at WARNING: an error of the system (an OSError, say)
            # may name the object's path, made of its UIDs; ours name no instance.
            # A suspect when the association ended on it, or its object is missing
            # here; not when the store failed (S3 down), which is no instance's fault.
            return Delivery(Result.RETRY, f"{type(exc).__name__}: {exc}"
                            if isinstance(exc, PacsError) else type(exc).__name__,
                            suspect=isinstance(exc, NotFound) or not assoc.is_established)
        status = response.get("Status") if response else None
        return delivery_of(int(status) if status is not None else None)

    def close(self) -> None:
        """Nothing held between batches."""
