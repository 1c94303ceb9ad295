"""What the DIMSE logic needs of an association, as plain data and small protocols.

The logic of C-FIND (:mod:`pacs.dimse.find`), C-MOVE / C-GET
(:mod:`pacs.dimse.retrieve`) and C-STORE (:mod:`pacs.dimse.storage`) is plain functions
over these types; nothing of pynetdicom's service classes or associations reaches them.
Two adapters feed them:

* the seam (:mod:`pacs.dimse.seam.services`), which implements :class:`Responder` and
  :class:`StoreTarget` by writing to and reading from the association's socket;
* pynetdicom's public event handlers (:mod:`pacs.dimse.handlers`), when the seam is
  off, which turn the same statuses into what pynetdicom's own service classes send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pacs.dimse.status import Status


@dataclass(frozen=True)
class Request:
    """A C-FIND, C-MOVE or C-GET request (PS3.7 9.1.2, 9.1.3, 9.1.4).

    Attributes
    ----------
    message_id :
        Message ID (0000,0110).
    sop_class_uid :
        Affected SOP Class UID (0000,0002): the information model.
    transfer_syntax :
        The transfer syntax of the request's presentation context: the identifier is
        encoded in it, and so are the response identifiers.
    identifier :
        The identifier as received.
    calling_ae_title :
        The requestor's AE title.
    move_destination :
        Move Destination (0000,0600) of a C-MOVE, without padding.
    extended_negotiation :
        The SOP Class Extended Negotiation information the requestor proposed for this
        SOP class (C-FIND options, PS3.4 C.5.1.1), if any.
    calling_address :
        The requestor's IP address (the association's peer).
    identifier_received :
        Bytes of an identifier longer than :data:`pacs.dimse.limits.IDENTIFIER_CEILING`,
        which arrived counted, not kept (``identifier`` is then empty); 0: all of it is
        there.
    abstract_syntax :
        The SOP Class of the request's presentation context; ``""``: not known.
    """

    message_id: int
    sop_class_uid: str
    transfer_syntax: str
    identifier: bytes
    calling_ae_title: str
    move_destination: str = ""
    extended_negotiation: bytes | None = None
    calling_address: str = ""
    identifier_received: int = 0
    abstract_syntax: str = ""


@dataclass(frozen=True)
class SubOperationCounts:
    """The sub-operation counts a C-MOVE / C-GET response carries (PS3.7 9.3.3.2,
    9.3.4.2): Remaining only in pending responses and after a cancel (``None``
    otherwise)."""

    remaining: int | None
    completed: int
    failed: int
    warning: int


class Responder(Protocol):
    """The requestor's side of one C-FIND, C-MOVE or C-GET."""

    @property
    def alive(self) -> bool:
        """False once the association has ended or a response could not be sent."""

    def cancelled(self) -> bool:
        """True once a C-CANCEL for this request has arrived (and ever after)."""

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: SubOperationCounts | None = None) -> None:
        """Send one response; pending ones may be sent a moment later, in order."""


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context in which this side sends C-STORE requests (the SCU role:
    every context we requested of a C-MOVE destination; a C-GET requestor's storage
    contexts with the SCP role for itself, PS3.7 D.3.3.4)."""

    context_id: int
    sop_class_uid: str
    transfer_syntax: str


class StoreTarget(Protocol):
    """An association over which C-STORE sub-operations go (PS3.4 C.4.2.3, C.4.3.3)."""

    @property
    def alive(self) -> bool:
        """False once the association has ended."""

    def accepted_contexts(self) -> Iterable[AcceptedContext]:
        """The contexts a C-STORE request may use."""

    def request_command(self, sop_class_uid: str, sop_instance_uid: str,
                        message_id: int) -> bytes:
        """The C-STORE-RQ command of a sub-operation, prepared ahead of its sending."""

    def sending(self) -> AbstractContextManager[None]:
        """Held while the sub-operations run: nothing else uses the association."""

    def send_c_store(self, message_id: int, context_id: int, command: bytes,
                     source: BinaryIO, length: int) -> bool:
        """Write one C-STORE request whose data set (``length`` bytes) is read from
        ``source``; False (the association aborted) when that failed."""

    def store_status(self) -> int | None:
        """The Status of the response to the request just written; ``None`` when none
        came (the association has then been aborted)."""

    def release(self) -> None:
        """Release the association (a C-MOVE destination's; nothing for C-GET)."""


class CancelWatch:
    """True once a C-CANCEL for one request has arrived (PS3.4 C.4.1.2.3, C.4.2.3.1).

    pynetdicom's ``is_cancelled`` forgets a C-CANCEL once it has answered true; the
    query engine and the response or sub-operation loop both ask, so the answer is kept
    here.  A C-CANCEL read elsewhere (with a C-GET's C-STORE responses) is reported with
    :meth:`seen_cancel`.
    """

    def __init__(self, is_cancelled: Callable[[int], bool], message_id: int) -> None:
        self._is_cancelled = is_cancelled
        self.message_id = message_id
        self.seen = False

    def __call__(self) -> bool:
        if not self.seen and self._is_cancelled(self.message_id):
            self.seen = True
        return self.seen

    def seen_cancel(self, message_id: int) -> None:
        """A C-CANCEL-RQ of ``message_id`` was read; it counts when it is this one's."""
        if message_id == self.message_id:
            self.seen = True
