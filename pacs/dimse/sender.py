"""The C-STORE sub-operations of a C-MOVE or C-GET, sent without idle gaps.

One operation is outstanding at a time: no asynchronous operations window is negotiated
(PS3.7 D.3.3.3), so request N+1 is written only after response N.  Everything that
does not need that response - the next index row, which context and syntax, opening the
object (or copying / converting it), finding where its data set starts - is done while
the destination is still storing instance N.  On this machine that preparation was a
fifth of a CT sub-operation's time on our side, and most of a small instance's.

How an instance is sent (:meth:`Sender.prepare`)
------------------------------------------------
1. As stored, its data set streamed from the file without decoding, when the peer
   accepted a presentation context for its SOP class in the stored transfer syntax
   (a store without local files, S3, is first copied to a temporary file);
2. otherwise converted to an uncompressed syntax the peer accepted, when
   :func:`pacs.core.transcode.can_convert` allows it (PS3.4 C.4.2.1.4 leaves the choice of
   syntax to the SCP; decompressing is what Orthanc does too), through a temporary file;
3. otherwise the sub-operation fails; the association goes on.

Requests are written straight to the socket (:func:`pacs.dimse.wire.write_store_request`)
while the association's reactor is held (:func:`pacs.dimse.wire.reactor_paused`), and
their responses read straight from it while the DUL thread keeps off it
(:func:`pacs.dimse.reactor.socket_lent`, :func:`pacs.dimse.wire.read_store_response`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from pacs.core import transcode
from pacs.core.config import Settings
from pacs.core.dataset import dataset_offset
from pacs.dimse import wire
from pacs.core.errors import PacsError

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacs.core.query.model import InstanceRef
    from pacs.core.storage import ObjectStore

log = logging.getLogger(__name__)

#: Temporary files of sub-operations (S3 copies, conversions) are named like this.
TMP_PREFIX = "pacs-retrieve-"
#: Bytes read to find where the data set starts (the file meta group is rarely longer).
_HEAD_BYTES = 1 << 16


@dataclass
class Prepared:
    """An instance ready to be written: its command, and its data set as a stream.

    ``resources`` closes the file (and removes a temporary copy) when done with.
    """

    ref: InstanceRef
    message_id: int
    context_id: int
    command: bytes
    source: BinaryIO
    length: int
    resources: ExitStack

    def close(self) -> None:
        """Release the file (and a temporary copy) of the instance."""
        self.resources.close()


class Sender:
    """Sends instances over one association as C-STORE sub-operations.

    Parameters
    ----------
    assoc : Association
        The association to the destination (C-MOVE) or the requestor's (C-GET).
    store : ObjectStore
        Where the objects are.
    originator : (AE title, Message ID), optional
        Move Originator AE Title and Message ID (PS3.7 9.3.1.1): the C-MOVE
        requestor's title and its request's Message ID.  ``None`` for C-GET.
    direct : bool
        Responses are read straight from the socket, which the caller holds
        (:func:`pacs.dimse.reactor.socket_lent`); otherwise from pynetdicom's queue.
    on_cancel : callable, optional
        Called with the Message ID a C-CANCEL-RQ read meanwhile cancels (C-GET: the
        requestor's association carries both).
    settings : Settings, optional
        Where the ceilings of a conversion come from (``PACS_MAX_FRAME_BYTES``,
        ``PACS_MAX_OBJECT_BYTES``); their defaults when omitted.
    """

    def __init__(self, assoc: Association, store: ObjectStore,
                 originator: tuple[str, int] | None, direct: bool = False,
                 on_cancel: Callable[[int], None] | None = None,
                 settings: Settings | None = None) -> None:
        self.assoc = assoc
        self.store = store
        self.settings = settings or Settings()
        self.originator = originator
        self.direct = direct
        self.on_cancel = on_cancel
        self._awaiting = 0  # Message ID of the request last written
        # (SOP class, stored syntax) -> (context ID, syntax sent) or None: the accepted
        # contexts do not change during an association, and pynetdicom rebuilds that
        # list on every look.
        self._routes: dict[tuple[str, str], tuple[int, str] | None] = {}

    def prepare(self, ref: InstanceRef, msg_id: int) -> Prepared | None:
        """Everything that can be done before the previous response; never raises.

        Returns ``None`` when the instance cannot be sent: no acceptable context, an
        object that cannot be read or converted, or an association that has ended (the
        sub-operation has failed, and is logged).
        """
        if not self.assoc.is_established:
            return None
        route = self._route(ref.sop_class_uid, ref.transfer_syntax)
        if route is None:
            log.warning("sub-operation failed: the peer accepted no context for %s in %s "
                        "or an uncompressed syntax it can be converted to",
                        UID(ref.sop_class_uid).name, UID(ref.transfer_syntax).name)
            return None
        context_id, syntax = route
        command = wire.store_request_command(ref.sop_class_uid, ref.sop_uid, msg_id,
                                             self.originator)
        resources = ExitStack()
        try:
            path = resources.enter_context(object_file(self.store, ref, syntax,
                                                       self.settings))
            source = resources.enter_context(open(path, "rb"))  # noqa: SIM115 - kept open
            offset = _dataset_start(source, path)
            source.seek(offset)
            length = path.stat().st_size - offset
        except Exception as exc:  # one instance must not end the whole retrieve
            resources.close()
            _log_failure(ref, exc)
            return None
        return Prepared(ref, msg_id, context_id, command, source, length, resources)

    def write(self, prepared: Prepared) -> bool:
        """Write the request; False (the association aborted) when that failed.

        The caller holds the reactor (:func:`pacs.dimse.wire.reactor_paused`).
        """
        self._awaiting = prepared.message_id
        try:
            wire.write_store_request(self.assoc, prepared.context_id, prepared.command,
                                     prepared.source, prepared.length)
        except Exception as exc:  # the association was aborted by the writer
            _log_failure(prepared.ref, exc)
            return False
        finally:
            prepared.close()
        return True

    def response_status(self) -> int | None:
        """Wait for the response to the request just written; its status.

        ``None`` when none came within the DIMSE timeout (the association is then
        aborted, as pynetdicom does) or the association ended.
        """
        if self.direct:
            try:
                return wire.read_store_response(self.assoc, self._awaiting,
                                                self.assoc.dimse_timeout, self.on_cancel)
            except OSError as exc:  # wire.UnexpectedMessage included
                log.warning("sub-operation failed: %s", exc)
                if self.assoc.is_established:
                    wire.abort(self.assoc)
                return None
        _, response = self.assoc.dimse.get_msg(block=True)
        if response is None:
            if self.assoc.is_established:
                self.assoc.abort()
            return None
        status = getattr(response, "Status", None)
        return int(status) if status is not None else None

    def _route(self, sop_class_uid: str, stored: str) -> tuple[int, str] | None:
        key = (sop_class_uid, stored)
        if key not in self._routes:
            syntax = sendable_syntax(self.assoc, sop_class_uid, stored)
            self._routes[key] = (None if syntax is None else
                                 (_context_id(self.assoc, sop_class_uid, syntax), syntax))
        return self._routes[key]


def _log_failure(ref: InstanceRef, exc: BaseException) -> None:
    log.warning("sub-operation failed: %s: %s", type(exc).__name__,
                exc if isinstance(exc, PacsError) else "see debug log")
    log.debug("sub-operation failure for %s", ref.sop_uid, exc_info=exc)


def sendable_syntax(assoc: Association, sop_class_uid: str, stored: str) -> str | None:
    """The transfer syntax to send an instance in over ``assoc``, or ``None``.

    The stored syntax when the peer accepted it for the SOP class with us as the SCU
    (for C-GET: the requestor took the SCP role, PS3.4 C.4.3.3 and PS3.7 D.3.3.4);
    else the first uncompressed syntax it accepted that the object can be converted
    to; else none (the sub-operation fails).
    """
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if cx.abstract_syntax == sop_class_uid and cx.as_scu}
    if stored in accepted:
        return stored
    for target in transcode.UNCOMPRESSED:
        if target in accepted and transcode.can_convert(stored, target):
            return str(target)
    return None


def _context_id(assoc: Association, sop_class_uid: str, syntax: str) -> int:
    """The accepted context for the SOP class in ``syntax`` with us as the SCU."""
    return int(next(cx.context_id for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == sop_class_uid and cx.as_scu
                    and str(cx.transfer_syntax[0]) == syntax))


@contextmanager
def _temporary_file() -> Iterator[Any]:
    """A temporary file outside the data folder, deleted when the block ends."""
    with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX, suffix=".dcm") as tmp:
        yield tmp


@contextmanager
def object_file(store: ObjectStore, ref: InstanceRef, syntax: str,
                settings: Settings) -> Iterator[Path]:
    """A Part 10 file of ``ref`` in ``syntax``.

    The stored file itself when the store has local files and no conversion is
    needed; otherwise a temporary copy or conversion, deleted afterwards.

    Raises
    ------
    NotFound, StorageError
        The object cannot be read.
    UnreadableData
        The conversion failed.
    """
    if syntax == ref.transfer_syntax:
        local = store.local_path(ref.object_key)
        if local is not None:
            yield local
            return
        with _temporary_file() as tmp:
            with store.open(ref.object_key) as source:  # closed before the wait
                shutil.copyfileobj(source, tmp, 1 << 20)
            tmp.flush()
            yield Path(tmp.name)
        return
    with store.open(ref.object_key) as source:
        stored = source.read()
    converted = transcode.convert_to_bytes(stored, syntax, settings.max_frame_bytes,
                                           settings.max_object_bytes)
    del stored  # the decoded copy is enough; do not hold both until the send ends
    with _temporary_file() as tmp:
        tmp.write(converted)
        del converted  # on disk now: not held while the previous response is awaited
        tmp.flush()
        yield Path(tmp.name)


def _dataset_start(source: BinaryIO, path: Path) -> int:
    """Where the data set starts in a Part 10 file: after the file meta group.

    Read from the first 64 KiB with the ingest path's own reader; pynetdicom's
    ``split_dataset`` (a pydicom parse of the meta) for a meta group larger than that.
    """
    head = source.read(_HEAD_BYTES)
    offset = dataset_offset(head)
    return offset if offset < len(head) else split_dataset(path)[1]
