"""C-STORE sub-operations of a C-MOVE or C-GET made ready to send, ahead of time.

One operation is outstanding at a time: no asynchronous operations window is negotiated
(PS3.7 D.3.3.3), so request N+1 is written only after response N.  Everything that
does not need that response - which context and syntax, opening the object (or copying
/ converting it), finding where its data set starts, the request command - is done
while the destination is still storing instance N (:meth:`Preparer.prepare`, called by
:func:`pacs.dimse.retrieve.run_suboperations`).

How an instance is sent
-----------------------
1. As stored, its data set streamed from the file without decoding, when the peer
   accepted a presentation context for its SOP class in the stored transfer syntax
   (an object that is not a file of the store - a copy in the intake, an S3 object -
   is read into memory when it is at most :data:`IN_MEMORY_BYTES`, else copied to a
   temporary file first);
2. otherwise converted to an uncompressed syntax the peer accepted, when
   :func:`pacs.core.transcode.can_convert` allows it (PS3.4 C.4.2.1.4 leaves the choice of
   syntax to the SCP; decompressing is what Orthanc does too), written frame by frame
   into a temporary file (:func:`pacs.core.transcode.convert_into`);
3. otherwise the sub-operation fails; the association goes on.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from pacs.core import transcode
from pacs.core.config import Settings
from pacs.core.dataset import dataset_offset
from pacs.core.errors import NotFound, PacsError, StorageError, StoreUnavailable
from pacs.core.intake import IntakeStore
from pacs.core.storage import local_path, open_ranged
from pacs.dimse.connection import AcceptedContext, StoreTarget

if TYPE_CHECKING:
    from pacs.core.query.model import InstanceRef
    from pacs.core.storage import ObjectStore

log = logging.getLogger(__name__)

#: Temporary files of sub-operations (S3 copies, conversions) are named like this.
TMP_PREFIX = "pacs-retrieve-"
#: Bytes read to find where the data set starts (the file meta group is rarely longer).
_HEAD_BYTES = 1 << 16
#: Objects at most this large that are not files of the store are sent from memory: a
#: temporary copy would cost a file's creation, write and removal per instance (most
#: of a small instance's sending, right after a burst, while it is in the intake).
IN_MEMORY_BYTES = 1 << 20


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


class Preparer:
    """Makes instances ready to be sent as C-STORE sub-operations over one target.

    Parameters
    ----------
    target : StoreTarget
        The association to the destination (C-MOVE) or the requestor's (C-GET).
    store : ObjectStore
        Where the objects are.
    settings : Settings, optional
        Where the ceilings of a conversion come from (``PACS_MAX_FRAME_BYTES``,
        ``PACS_MAX_OBJECT_BYTES``); their defaults when omitted.
    indexed : callable, optional
        True while an instance is still indexed as it was listed, asked just before
        its object is read: a removal during a long retrieve leaves the object
        readable until its deletion (minutes, when the store fails it), and a removed
        instance must not be sent (its sub-operation fails instead).
    """

    def __init__(self, target: StoreTarget, store: ObjectStore,
                 settings: Settings | None = None,
                 indexed: Callable[[InstanceRef], bool] | None = None) -> None:
        self.target = target
        self.store = store
        self.settings = settings or Settings()
        self.indexed = indexed
        # The accepted contexts do not change during an association.
        self._accepted = list(target.accepted_contexts())
        # (SOP class, stored syntax) -> (context ID, syntax sent) or None.
        self._routes: dict[tuple[str, str], tuple[int, str] | None] = {}
        #: Why the object store failed a read of this retrieve, once it did.
        self._store_failed: str | None = None

    def route(self, sop_class_uid: str, stored: str) -> tuple[int, str] | None:
        """The context ID and transfer syntax to send an instance in, or ``None``."""
        key = (sop_class_uid, stored)
        if key not in self._routes:
            self._routes[key] = route(self._accepted, sop_class_uid, stored)
        return self._routes[key]

    def prepare(self, ref: InstanceRef, msg_id: int) -> Prepared | None:
        """Everything that can be done before the previous response; never raises.

        Returns ``None`` when the instance cannot be sent: no acceptable context, an
        object that cannot be read or converted, or an association that has ended (the
        sub-operation has failed, and is logged).
        """
        if not self.target.alive:
            return None
        found = self.route(ref.sop_class_uid, ref.transfer_syntax)
        if found is None:
            log.warning("sub-operation failed: the peer accepted no context for %s in %s "
                        "or an uncompressed syntax it can be converted to",
                        UID(ref.sop_class_uid).name, UID(ref.transfer_syntax).name)
            return None
        context_id, syntax = found
        if self._store_failed is not None and not self._in_intake(ref.object_key):
            # The store failed (a timeout, an outage) earlier in this retrieve: each try
            # would wait as long again, one read timeout per instance of a study.  The
            # objects the intake holds still go.
            log_failure(ref, StorageError(f"the object store failed earlier in this "
                                          f"retrieve ({self._store_failed})"))
            return None
        if not self._still_indexed(ref):
            return None
        command = self.target.request_command(ref.sop_class_uid, ref.sop_uid, msg_id)
        resources = ExitStack()
        try:
            source, length = resources.enter_context(
                data_set_source(self.store, ref, syntax, self.settings))
        except Exception as exc:  # noqa: BLE001 - one instance must not end the retrieve
            resources.close()
            log_failure(ref, exc)
            if isinstance(exc, StoreUnavailable):  # the store's, not this object's
                self._store_failed = str(exc) or type(exc).__name__
            return None
        return Prepared(ref, msg_id, context_id, command, source, length, resources)

    def _still_indexed(self, ref: InstanceRef) -> bool:
        """:attr:`indexed` of ``ref``; a failure logged as the sub-operation's."""
        if self.indexed is None:
            return True
        try:
            if self.indexed(ref):
                return True
            failure: PacsError = NotFound("the instance was removed since the request")
        except PacsError as exc:  # the index cannot tell: nothing is sent on a guess
            failure = exc
        log_failure(ref, failure)
        return False

    def _in_intake(self, key: str) -> bool:
        """True when the object at ``key`` is read from the intake, not the store."""
        return isinstance(self.store, IntakeStore) and self.store.in_intake(key)


def log_failure(ref: InstanceRef, exc: BaseException) -> None:
    """Log a failed sub-operation: the reason at WARNING, the instance only at DEBUG."""
    log.warning("sub-operation failed: %s: %s", type(exc).__name__,
                exc if isinstance(exc, PacsError) else "see debug log")
    log.debug("sub-operation failure for %s", ref.sop_uid, exc_info=exc)


def sendable_syntax(accepted: Iterable[AcceptedContext], sop_class_uid: str,
                    stored: str) -> str | None:
    """The transfer syntax to send an instance in, or ``None``.

    The stored syntax when the peer accepted it for the SOP class with us as the SCU
    (for C-GET: the requestor took the SCP role, PS3.4 C.4.3.3 and PS3.7 D.3.3.4);
    else the first uncompressed syntax it accepted that the object can be converted
    to; else none (the sub-operation fails).
    """
    syntaxes = {cx.transfer_syntax for cx in accepted if cx.sop_class_uid == sop_class_uid}
    if stored in syntaxes:
        return stored
    for target in transcode.UNCOMPRESSED:
        if target in syntaxes and transcode.can_convert(stored, target):
            return str(target)
    return None


def route(accepted: Iterable[AcceptedContext], sop_class_uid: str,
          stored: str) -> tuple[int, str] | None:
    """The first accepted context for the SOP class in :func:`sendable_syntax`'s
    syntax, with that syntax; ``None`` when the instance cannot be sent."""
    contexts = [cx for cx in accepted if cx.sop_class_uid == sop_class_uid]
    syntax = sendable_syntax(contexts, sop_class_uid, stored)
    if syntax is None:
        return None
    return next(cx.context_id for cx in contexts if cx.transfer_syntax == syntax), syntax


@contextmanager
def _temporary_file() -> Iterator[Any]:
    """A temporary file outside the data folder, deleted when the block ends."""
    with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX, suffix=".dcm") as tmp:
        yield tmp


@contextmanager
def data_set_source(store: ObjectStore, ref: InstanceRef, syntax: str,
                    settings: Settings) -> Iterator[tuple[BinaryIO, int]]:
    """The data set of ``ref`` in ``syntax`` (after its file meta group), as a stream at
    its first byte, and its length: from memory for a small object that is not a file
    of the store (:data:`IN_MEMORY_BYTES`), else from :func:`object_file`.

    Raises
    ------
    NotFound, StorageError, UnreadableData
        As :func:`object_file`.
    """
    if (syntax == ref.transfer_syntax and ref.size <= IN_MEMORY_BYTES
            and local_path(store, ref.object_key) is None):
        with store.open(ref.object_key) as stream:
            data = stream.read(IN_MEMORY_BYTES + 1)
        offset = dataset_offset(data[:_HEAD_BYTES])
        if len(data) <= IN_MEMORY_BYTES and offset < min(len(data), _HEAD_BYTES):
            yield io.BytesIO(memoryview(data)[offset:]), len(data) - offset
            return
        # Larger than its row says, or a meta group over the head: as any other object.
    with object_file(store, ref, syntax, settings) as path, open(path, "rb") as source:
        offset = _dataset_start(source, path)
        source.seek(offset)
        yield source, path.stat().st_size - offset


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
        local = local_path(store, ref.object_key)
        if local is not None:
            yield local
            return
        with _temporary_file() as tmp:
            with store.open(ref.object_key) as source:  # closed before the wait
                shutil.copyfileobj(source, tmp, 1 << 20)
            tmp.flush()
            yield Path(tmp.name)
        return
    with _temporary_file() as tmp:
        # Converted into the file frame by frame from a ranged stream (on S3, ranged
        # GETs within a bounded buffer): the object is never held whole, and the
        # source is closed before the previous response is awaited.
        with open_ranged(store, ref.object_key) as source:
            transcode.convert_into(source, syntax, tmp, settings.max_frame_bytes,
                                   settings.max_object_bytes)
        tmp.flush()
        yield Path(tmp.name)


def _dataset_start(source: BinaryIO, path: Path) -> int:
    """Where the data set starts in a Part 10 file: after the file meta group.

    Read from the first 64 KiB with the ingest path's own reader; pynetdicom's
    ``split_dataset`` (a pydicom parse of the meta) for a meta group larger than that.
    """
    head = source.read(_HEAD_BYTES)
    offset = dataset_offset(head)
    return offset if offset < len(head) else int(split_dataset(path)[1])
