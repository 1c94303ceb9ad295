"""N-EVENT-REPORT requests on a peer's own association, sent by the association's own
thread when the association is quiet, and their responses told apart from the peer's
requests.

Why
---
pynetdicom's ``Association.send_n_event_report`` writes the request from the calling
thread and then takes whatever message arrives next as its response.  A storage
commitment requestor may go on using its association after its N-ACTION: without an
Asynchronous Operations Window each side may have one operation it invoked and one it
performs outstanding (PS3.7 D.3.3.3), so the requestor's next C-STORE-RQ may come before
its N-EVENT-REPORT-RSP.  Taken as "the response", it was an invalid C-STORE response:
the association was aborted, the store never answered, and the report counted as failed
although the requestor had answered Success.  The calling thread also wrote its PDUs
while the association's own thread might be writing a C-FIND answer or C-GET
sub-operations on the same socket.

What this module does
---------------------
A thread that wants to send an N-EVENT-REPORT on an association offers it
(:func:`report`) and waits for its outcome.  The association's own thread sends it
(:func:`send_due`, one of :data:`pacs.dimse.seam.reactor.IDLE_WORK`) at a message
boundary (:func:`pacs.dimse.seam.reactor.at_boundary`: nothing of a message being read,
waiting or served, nothing queued for the DUL to write) once no PDU has crossed the
socket for the offer's quiet time: a requestor that releases at once has asked to by
then, and one that keeps sending is not sent a request across its own.  On a node's
association served by the seam that thread writes the message itself, while the DUL may
not write (:func:`pacs.dimse.seam.reactor.writes_paused`); on any other (DICOM TLS,
whose messages the DUL thread writes) it hands it to pynetdicom's DIMSE provider after
every message queued before it.  Either way one thread orders the association's
messages, so none interleave.  Requests the peer sends before its response are served
as usual, and the response is recognised by its Message ID Being Responded To
(:func:`take_response`, from ``Association._serve_request``): a request is never taken
for it.

Only associations running the seam's reactor (:func:`available`) can do this; with
``PACS_DIMSE_SEAM=off`` reports go on new associations only (:mod:`pacs.dimse.reports`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode

import pacs.dimse.seam.reactor as reactor
import pacs.dimse.seam.wire as wire
from pacs.core.logs import failure_text

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventReport:
    """An N-EVENT-REPORT request (PS3.7 10.1.1.1, 10.3.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    event_type: int
    information: Dataset | None
    message_id: int


@dataclass(frozen=True)
class Outcome:
    """What became of a report: the Status of its response, or why there is none."""

    status: int | None
    error: str | None


class _Offer:
    """A report waiting on one association, then its response."""

    def __init__(self, request: EventReport, quiet: float) -> None:
        self.request = request
        self.quiet = quiet
        #: waiting (for a quiet boundary), sending, sent (awaiting the response),
        #: done (answered, or failed as it was sent), or withdrawn (by the reporting
        #: thread, unsent).
        self.state = "waiting"
        self.sent_at = 0.0
        self.outcome: Outcome | None = None
        self.done = threading.Event()

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


#: Why a report sent got no response (the association is then aborted).
NO_RESPONSE = "no response within the DIMSE timeout"

_lock = threading.Lock()
#: The report offered on each association (one at a time).
_offers: weakref.WeakKeyDictionary[Any, _Offer] = weakref.WeakKeyDictionary()
#: How often the reporting thread looks at an association it waits on.
_LOOK = 0.1


def available(assoc: Association, sop_class_uid: str) -> bool:
    """True when a report of ``sop_class_uid`` can go on ``assoc`` now: it runs the
    seam's reactor, is established, no release was asked for, and a presentation
    context of that SOP Class was accepted on it."""
    return bool(reactor.patched(assoc) and assoc.is_established
                and not assoc.acse.is_release_requested() and not assoc._sent_release
                and _context(assoc, sop_class_uid) is not None)


def report(assoc: Association, request: EventReport, quiet: float, wait: float,
           timeout: float | None) -> Outcome:
    """Have ``assoc``'s own thread send ``request`` once the association has been
    quiet for ``quiet`` seconds, and wait for its response.

    Parameters
    ----------
    quiet : float
        Seconds without a PDU either way before the request goes.
    wait : float
        Seconds to wait for such a moment; then the request is withdrawn, unsent.
    timeout : float or None
        Seconds to wait for the response once sent (the DIMSE timeout).

    Returns
    -------
    Outcome
        The response's Status; or, without one, why (never sent, no response, the
        association ended).
    """
    offer = _Offer(request, quiet)
    with _lock:
        if assoc in _offers:
            return Outcome(None, "another report waits on the association")
        _offers[assoc] = offer
    reactor.wake(assoc)
    until = time.monotonic() + wait
    try:
        while not offer.done.wait(_LOOK):
            ended = _ended(assoc, offer, until, timeout)
            if ended is not None:
                if ended.error == NO_RESPONSE:
                    # Its operation stays outstanding: without an Asynchronous Operations
                    # Window the next report may not be sent on it (PS3.7 D.3.3.3), and
                    # a requestor that never answers would hold each result for a DIMSE
                    # timeout.  Aborted, as the node does after any DIMSE timeout.
                    log.warning("no N-EVENT-REPORT response from %s within the DIMSE "
                                "timeout: the association is aborted",
                                assoc.requestor.ae_title)
                    wire.abort(assoc)
                return ended
        assert offer.outcome is not None
        return offer.outcome
    finally:
        with _lock:
            if _offers.get(assoc) is offer:
                del _offers[assoc]


def _ended(assoc: Association, offer: _Offer, until: float,
           timeout: float | None) -> Outcome | None:
    """Why the wait for ``offer`` ends now, or ``None`` while it goes on."""
    now = time.monotonic()
    with _lock:
        if offer.done.is_set() or offer.state == "done":
            return None  # finished meanwhile: the outcome is there, or about to be
        if offer.state == "waiting" and (now >= until or not assoc.is_established):
            offer.state = "withdrawn"
            if not assoc.is_established:
                return Outcome(None, "the association ended")
            return Outcome(None, f"the association was not quiet for {offer.quiet:g} s "
                                 "in time")
        if offer.state == "sent" and not assoc.is_established:
            return Outcome(None, "the association ended before the response")
        if offer.state == "sent" and timeout and now >= offer.sent_at + timeout:
            offer.state = "withdrawn"  # a response arriving now is not taken for it
            return Outcome(None, NO_RESPONSE)
    return None


def due(assoc: Association) -> bool:
    """True when a report waits on ``assoc`` and the association has been quiet long
    enough: the thread holding its socket gives it back to the reactor, which sends it
    (:mod:`pacs.dimse.seam.inbound`)."""
    offer = _offers.get(assoc)
    return bool(offer is not None and offer.state == "waiting"
                and reactor.quiet_for(assoc) >= offer.quiet)


def send_due(assoc: Association) -> bool:
    """In the association's thread, at a message boundary: send the report offered on
    ``assoc`` when its time has come; True when something was sent (or failed)."""
    offer = _offers.get(assoc)
    if offer is None or offer.state != "waiting":
        return False
    if reactor.quiet_for(assoc) < offer.quiet or not reactor.at_boundary(assoc):
        return False
    if not available(assoc, offer.request.sop_class_uid):
        return False  # the waiting thread sees why (released, ended) and gives up
    with _lock:
        if offer.state != "waiting":
            return False
        offer.state = "sending"
    try:
        sent = _send(assoc, offer.request)
    except Exception as exc:  # noqa: BLE001 - any failure is the report's, not the thread's
        log.warning("an N-EVENT-REPORT could not be sent: %s", exc)
        with _lock:
            offer.state = "done"
        offer.finish(Outcome(None, f"not sent ({failure_text(exc)})"))
        return True
    with _lock:
        offer.state = "sent" if sent else "waiting"
        offer.sent_at = time.monotonic()
    return sent


def take_response(assoc: Association, msg: Any) -> bool:
    """True when ``msg``, a message ``assoc``'s thread is about to serve, is the
    response to the report offered on it (then its outcome is handed over and nothing
    more is done with it); False for anything else, requests included."""
    if not isinstance(msg, N_EVENT_REPORT) or msg.MessageIDBeingRespondedTo is None:
        return False
    offer = _offers.get(assoc)
    with _lock:
        if (offer is None or offer.state != "sent"
                or msg.MessageIDBeingRespondedTo != offer.request.message_id):
            return False
        offer.state = "done"
    status = msg.Status
    offer.finish(Outcome(int(status), None) if status is not None
                 else Outcome(None, "a response without a Status"))
    return True


def _send(assoc: Association, request: EventReport) -> bool:
    """Write ``request`` on ``assoc`` (see the module docstring); False when the DUL
    still had something to write (try again at the next boundary)."""
    context = _context(assoc, request.sop_class_uid)
    assert context is not None and context.context_id is not None
    syntax = UID(context.transfer_syntax[0])
    data = None
    if request.information is not None:
        data = encode(request.information, syntax.is_implicit_VR, syntax.is_little_endian,
                      syntax.is_deflated)
        if data is None:
            raise ValueError("the Event Information could not be encoded")
    # The seam's association thread writes its messages to the socket; the DUL thread
    # writes every message of any other association.
    if not reactor.serves(assoc):
        assoc.dimse.send_msg(_primitive(request, data), context.context_id)
        return True
    command = wire.event_report_command(request.sop_class_uid, request.message_id,
                                        request.sop_instance_uid, request.event_type,
                                        data is not None)
    pdus = wire.message_pdus(assoc, context.context_id, command, data)
    failed: OSError | None = None
    with reactor.writes_paused(assoc) as clear:
        if not clear:
            return False
        try:
            wire.write_pdus(assoc, pdus)
        except OSError as exc:
            failed = exc
    if failed is not None:
        # Part of it may be on the wire: the stream cannot carry another message.  Out
        # of writes_paused: the abort waits for the DUL, which waits for that lock.
        wire.abort(assoc)
        raise failed
    return True


def _primitive(request: EventReport, data: bytes | None) -> N_EVENT_REPORT:
    """The request as pynetdicom's DIMSE provider sends it."""
    primitive = N_EVENT_REPORT()
    primitive.MessageID = request.message_id
    primitive.AffectedSOPClassUID = UID(request.sop_class_uid)
    primitive.AffectedSOPInstanceUID = UID(request.sop_instance_uid)
    primitive.EventTypeID = request.event_type
    if data is not None:
        primitive.EventInformation = BytesIO(data)
    return primitive


def _context(assoc: Association, sop_class_uid: str) -> PresentationContext | None:
    """An accepted presentation context of ``sop_class_uid`` on ``assoc``."""
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == sop_class_uid and context.transfer_syntax:
            return context
    return None


def install() -> None:
    """Have the association threads send the reports offered to them (once per
    process, by :func:`pacs.dimse.seam.install`)."""
    if send_due not in reactor.IDLE_WORK:
        reactor.IDLE_WORK.append(send_due)
