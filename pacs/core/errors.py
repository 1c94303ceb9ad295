"""The one exception tree of the core.

Each boundary translates it once: ``pacs.dimse.status`` into DICOM statuses and
``adapters.dicomweb.errors`` into HTTP errors.  Backend errors (apsw, minio, OS) are
turned into these at the backend's edge.

::

    PacsError
    ├── ConfigError            a setting cannot be read or a backend cannot start
    │   └── StoreMissing       the store's folder or bucket does not exist
    ├── InvalidInstance        the object cannot be accepted as sent
    │   ├── InvalidUID         a UID that is not digits and dots, <= 64 chars (PS3.5 9.1)
    │   ├── UIDMismatch        command UIDs differ from the data set's (PS3.4 B.2.3)
    │   ├── UnreadableData     the data set does not parse
    │   ├── DuplicateRejected  a different object under a known SOP Instance UID
    │   ├── ObjectTooLarge     received or inflated past PACS_MAX_OBJECT_BYTES
    │   ├── RejectedInstance   an instance an IOCM rejection note removed, sent again
    │   └── InvalidRejection   a rejection note whose references cannot be applied
    ├── InvalidQuery           a query or identifier breaks the model's rules
    │   └── QueryTooLarge      more values, or longer ones, than one query may match
    ├── InvalidRequest         a request's arguments break its service's rules
    │   └── IncompleteBody     a request body that ended before its end
    ├── NotFound               no such study / series / instance / object
    ├── FrameTooLarge          a frame to decode is larger than PACS_MAX_FRAME_BYTES
    ├── QueryLimitExceeded     more matches than the row cap, or over the time limit
    ├── Cancelled              the peer cancelled the operation
    ├── ResourceLimitation     a bounded queue or request limit is reached
    ├── StorageError           the object store failed
    │   └── ForeignObject      a key holds what no write of the store leaves (a link, a FIFO)
    ├── IntakeFull             the intake holds PACS_INTAKE_MAX_BYTES not yet moved
    ├── IndexFailure           the SQLite index failed
    │   └── InstanceLocked     an instance's per-UID lock held past the wait allowed
    └── AnalysisFault          a helper process failed on an object (pacs.core.analysers)
"""

from __future__ import annotations


class PacsError(Exception):
    """Base of every error raised by the core."""

    #: The core logs this error itself where it arises (:class:`IntakeFull`: at most
    #: once per interval, :class:`pacs.core.intake.Refusals`); an edge translates it
    #: into its status without logging it again (:func:`logged_by_core`).
    logged = False


class ConfigError(PacsError):
    """A setting is invalid, or a backend cannot be reached at start-up."""


class StoreMissing(ConfigError):
    """The object store answers, but its folder or bucket does not exist."""


class StoreUnreachable(ConfigError):
    """The object store does not answer at all (down, or a wrong address)."""


class InvalidInstance(PacsError):
    """An object that cannot be stored as sent."""


class MediaDirectory(InvalidInstance):
    """A DICOMDIR (Media Storage Directory, PS3.10 8.6): the index of a medium's files,
    not an instance; ``pacs import`` passes it over."""


class InvalidUID(InvalidInstance):
    """A UID that is not a valid DICOM UID (PS3.5 9.1)."""


class UIDMismatch(InvalidInstance):
    """The command's SOP Class / Instance UID disagrees with the data set's."""


class UnreadableData(InvalidInstance):
    """The data set does not parse."""


class CannotDecode(UnreadableData):
    """Stored pixel data that the installed decoders do not decode (a variant of its
    transfer syntax they lack, or a damaged codestream): what needs it decoded - a
    conversion, native frames, a rendered view - cannot be made, though the object may
    still be sent as stored."""


class DuplicateRejected(InvalidInstance):
    """A different object arrived under a stored SOP Instance UID (policy: reject)."""


class ObjectTooLarge(InvalidInstance):
    """An object larger than the configured limit, as received or once inflated."""


class RejectedInstance(InvalidInstance):
    """A subsequent occurrence of an instance an IOCM rejection note removed (IHE RAD
    TF-2 4.66.4: the archive shall not accept it again)."""


class InvalidRejection(InvalidInstance):
    """A rejection note whose references cannot be applied (invalid UIDs, too many)."""


class InvalidQuery(PacsError):
    """A query or identifier that breaks the information model's rules."""


class QueryTooLarge(InvalidQuery):
    """A query with more values to match, or longer ones, than the index runs in one
    statement (:mod:`pacs.core.index.compiler`): valid by the information model, but
    the client must split it.  Retrying it unchanged cannot succeed."""


class InvalidRequest(PacsError):
    """A request whose arguments break its service's rules (a storage commitment
    request without a Transaction UID, say)."""


class IncompleteBody(InvalidRequest):
    """A request body that ended before its end: shorter than its Content-Length, or
    cut off when its client stopped sending.  What arrived is never taken for the whole."""


class NotFound(PacsError):
    """The requested entity or object does not exist."""


class NotAuthorized(PacsError):
    """What the request asks for is beyond its sender's rights (an AE's) or roles (a
    user's, :mod:`pacs.core.access`): an IOCM rejection note from a sender that may not
    remove data, say."""


class FrameTooLarge(PacsError):
    """A frame whose declared decoded size exceeds the configured ceiling; refused
    before any pixel buffer is allocated."""


class QueryLimitExceeded(PacsError):
    """The query matched more rows than allowed or ran past its time limit."""


class Cancelled(PacsError):
    """The peer cancelled the operation."""


class ResourceLimitation(PacsError):
    """A request refused because a configured bound is reached (more references than
    one request may hold, more results waiting for delivery than may be kept)."""


class Exhausted(PacsError):
    """The process cannot start a thread for the request now (RLIMIT_NPROC, a cgroup's
    pids limit): it may succeed later, or in another worker."""


class StorageError(PacsError):
    """The object store failed to read, write or delete."""


class StoreUnavailable(StorageError):
    """The object store did not answer a read (a timeout, a refused or dropped
    connection): the store is down or overloaded, not one object damaged."""


class WriteNotMade(StorageError):
    """The object store refused a write, or never received it (no connection could be
    made): nothing of it was stored, and the key holds what it held.  Nothing is left to
    undo."""


class UnsettledWrite(StorageError):
    """The object store did not answer a write (it timed out, or the connection
    dropped after the request was sent): the write failed for the caller, but the
    store may still carry it out later, over a newer object at the same key.  The key
    is *unsettled* (:mod:`pacs.core.intake`) until that can no longer happen."""


class ForeignObject(StorageError):
    """What the store holds at a key is not a file it wrote: a symbolic link, a FIFO,
    a socket or a device, put there by something else.  It is never read through (a
    FIFO would block the reader, ``/dev/zero`` never ends, a link reaches outside)."""


class IntakeFull(PacsError):
    """The intake holds ``PACS_INTAKE_MAX_BYTES`` of acknowledged objects that the
    object store has not taken yet (it is slow or down): new objects are refused until
    the mover catches up (back-pressure; a sender retries later).  The ingest logs the
    refusals, counted, at most once per interval: a flood of them is one line."""

    logged = True


class IndexFailure(PacsError):
    """The SQLite index failed."""


class InstanceLocked(IndexFailure):
    """Another store, removal or move of the same instance held its per-UID lock
    (:mod:`pacs.core.uidlocks`) longer than a caller answering a peer may wait (the
    holder waits for a stalled object store, say).  Answered as a busy index is:
    nothing was done, the peer may send again."""


class AnalysisFault(PacsError):
    """A helper process died or hung while analysing an object: a server fault (no
    statement about the object), reported as a processing failure."""


def logged_by_core(exc: BaseException) -> bool:
    """True when the core has logged ``exc`` already (:attr:`PacsError.logged`): the
    edge that translates it logs it at DEBUG only."""
    return isinstance(exc, PacsError) and exc.logged
