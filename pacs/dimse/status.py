"""DIMSE statuses as a small value, and one table from the core's exceptions to them.

A :class:`Status` is a code and an optional Error Comment (0000,0902).  The DIMSE logic
(:mod:`pacs.dimse.find`, :mod:`pacs.dimse.retrieve`, :mod:`pacs.dimse.storage`) returns
and sends only these; they become bytes of a response command in the seam
(:mod:`pacs.dimse.seam`) or a pydicom data set for pynetdicom's own handlers
(:func:`pacs.dimse.handlers.status_dataset`), never earlier.

Every code the node sends is in :data:`CODES` with its meaning and where the standard
defines it.  Error Comments carry a reason, never patient data: exception messages of
the core name attributes, not values.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs.core import errors
from pacs.core.rejection import REFUSED_AGAIN

#: Error Comment (0000,0902) is LO: 64 characters at most (PS3.7 C.4, C.5; PS3.5 6.2).
COMMENT_LENGTH = 64


@dataclass(frozen=True)
class Status:
    """A DIMSE status: Status (0000,0900) and, optionally, Error Comment (0000,0902)."""

    code: int
    comment: str | None = None

    def with_comment(self, comment: str | None) -> Status:
        """The same code with ``comment`` (cut to :data:`COMMENT_LENGTH`)."""
        return Status(self.code, comment[:COMMENT_LENGTH] if comment else None)

    @property
    def is_pending(self) -> bool:
        """Pending (FF00, FF01): more responses follow (PS3.7 C.2)."""
        return self.code in (0xFF00, 0xFF01)

    @property
    def meaning(self) -> str:
        """What the code means, from :data:`CODES` (``"unknown"`` for others)."""
        return CODES.get(self.code, ("unknown", ""))[0]


#: Every status the node sends: code -> (meaning, where the standard defines it).
CODES: dict[int, tuple[str, str]] = {
    0x0000: ("Success", "PS3.7 C.1"),
    0xFF00: ("Pending: matches or sub-operations are continuing",
             "PS3.4 Table C.4-1, C.4-2, C.4-3"),
    0xFF01: ("Pending: matches are continuing, optional keys not supported",
             "PS3.4 Table C.4-1"),
    0xFE00: ("Cancel: matching or sub-operations terminated due to a C-CANCEL",
             "PS3.4 Table C.4-1, C.4-2, C.4-3"),
    0xB000: ("Warning: sub-operations complete, one or more failures or warnings",
             "PS3.4 Table C.4-2, C.4-3"),
    0xA700: ("Refused: out of resources", "PS3.4 Table B.2-1, C.4-1"),
    0xA701: ("Refused: out of resources, unable to calculate number of matches",
             "PS3.4 Table C.4-2, C.4-3"),
    0xA702: ("Refused: out of resources, unable to perform sub-operations",
             "PS3.4 Table C.4-2, C.4-3"),
    0xA771: ("Refused: an instance an IOCM rejection note removed, sent again (IHE RAD "
             "TF-2 4.66.4; dcm4chee-arc's code)", "PS3.4 Table B.2-1 (Axxx: Refused)"),
    0xA801: ("Refused: move destination unknown", "PS3.4 Table C.4-2"),
    0xA900: ("Error: data set / identifier does not match SOP Class",
             "PS3.4 Table B.2-1, C.4-1, C.4-2, C.4-3"),
    0xC000: ("Error: cannot understand / unable to process",
             "PS3.4 Table B.2-1, C.4-1, C.4-2, C.4-3"),
    0x0110: ("Processing failure", "PS3.7 C.5"),
    0x0111: ("Duplicate SOP Instance", "PS3.7 C.5"),
    0x0112: ("No such SOP Instance", "PS3.7 C.5; N-ACTION, PS3.7 10.1.4.1.10"),
    0x0115: ("Invalid argument value", "PS3.7 C.5; N-ACTION, PS3.7 10.1.4.1.10"),
    0x0117: ("Invalid SOP Instance", "PS3.7 C.5"),
    0x0118: ("No such SOP Class", "PS3.7 C.5; N-ACTION, PS3.7 10.1.4.1.10"),
    0x0122: ("Refused: SOP Class not supported", "PS3.7 C.5, 9.1.1.1.9"),
    0x0123: ("No such action", "PS3.7 C.5; N-ACTION, PS3.7 10.1.4.1.10"),
    0x0124: ("Refused: not authorized", "PS3.7 C.5.21"),
    0x0211: ("Unrecognized operation", "PS3.7 C.5"),
    0x0213: ("Resource limitation", "PS3.7 C.5; N-ACTION, PS3.7 10.1.4.1.10"),
}

SUCCESS = Status(0x0000)
PENDING = Status(0xFF00)
#: A C-FIND match whose requested optional keys are not all supported (sent empty).
PENDING_UNSUPPORTED_KEYS = Status(0xFF01)
CANCEL = Status(0xFE00)
#: C-MOVE / C-GET complete with failures or warnings.
SUBOPERATIONS_WARNING = Status(0xB000)
OUT_OF_RESOURCES = Status(0xA700)
#: C-MOVE / C-GET: the index failed, or more matches than the counts can express.
UNABLE_TO_CALCULATE_MATCHES = Status(0xA701)
#: C-MOVE / C-GET: every sub-operation failed, or the destination refused us.
UNABLE_TO_PERFORM_SUBOPERATIONS = Status(0xA702)
MOVE_DESTINATION_UNKNOWN = Status(0xA801)
IDENTIFIER_DOES_NOT_MATCH = Status(0xA900)
UNABLE_TO_PROCESS = Status(0xC000)
PROCESSING_FAILURE = Status(0x0110)
INVALID_SOP_INSTANCE = Status(0x0117)
#: A C-STORE request whose Affected SOP Class is not its presentation context's: the
#: context is what the association negotiated for that class (PS3.8 7.1.1.13).
SOP_CLASS_NOT_SUPPORTED = Status(0x0122)
#: N-ACTION failures (PS3.7 10.1.4.1.10): the requested instance, class or action is not
#: one the service has, an argument is missing or wrong, a bound is reached.
NO_SUCH_SOP_INSTANCE = Status(0x0112)
INVALID_ARGUMENT_VALUE = Status(0x0115)
NO_SUCH_SOP_CLASS = Status(0x0118)
NO_SUCH_ACTION = Status(0x0123)
RESOURCE_LIMITATION = Status(0x0213)
#: A request whose operation is not one of its presentation context's SOP Class (a
#: C-ECHO on a storage context, an N-GET on Storage Commitment): a general failure
#: (PS3.7 C.5) any response may carry.
UNRECOGNIZED_OPERATION = Status(0x0211)
#: C-STORE of an instance a rejection note removed (IHE RAD TF-2 4.66.4).
REJECTED_INSTANCE = Status(REFUSED_AGAIN)
#: The calling AE lacks the right the request needs (:mod:`pacs.core.access`).  A
#: general failure status (PS3.7 C.5.21), which PS3.7 9.1.1.1.9 lists for C-STORE and
#: the node answers for every DIMSE operation it refuses so: pynetdicom takes it as a
#: failure of every service, dcmtk reports it by its code, and no code of those
#: services' own tables (PS3.4 Table C.4-1 to C.4-3) says "not authorized" (A700 and
#: A801 say "out of resources" and "destination unknown", which would send an operator
#: looking for the wrong fault).
NOT_AUTHORIZED = Status(0x0124)

_Table = tuple[tuple[type[Exception], Status], ...]

# MemoryError (a worker at its address space limit, RLIMIT_AS or a cgroup's) is the
# one exception from outside the core's tree each table names: the request may succeed
# later, or elsewhere, and says so (out of resources) rather than Processing failure.

#: C-STORE failure statuses (PS3.4 B.2.3, Table B.2-1; PS3.7 C.5).
STORE_STATUS: _Table = (
    (errors.InvalidUID, INVALID_SOP_INSTANCE),
    (errors.UIDMismatch, Status(0xA900)),        # data set does not match SOP Class
    (errors.UnreadableData, Status(0xC000)),     # cannot understand
    (errors.DuplicateRejected, Status(0x0111)),  # duplicate SOP Instance
    (errors.RejectedInstance, REJECTED_INSTANCE),
    (errors.NotAuthorized, NOT_AUTHORIZED),       # a rejection note without the right
    (errors.InvalidRejection, UNABLE_TO_PROCESS),  # a note whose evidence is unusable
    (errors.ObjectTooLarge, OUT_OF_RESOURCES),   # over PACS_MAX_OBJECT_BYTES
    (errors.InvalidInstance, Status(0xC000)),    # any other: cannot understand (a DICOMDIR)
    (errors.StorageError, OUT_OF_RESOURCES),
    (errors.IntakeFull, OUT_OF_RESOURCES),       # back-pressure: over PACS_INTAKE_MAX_BYTES
    (errors.IndexFailure, OUT_OF_RESOURCES),
    (errors.Exhausted, OUT_OF_RESOURCES),
    (MemoryError, OUT_OF_RESOURCES),
)

#: C-FIND failure statuses (PS3.4 C.4.1.1.4, Table C.4-1).  A query too large to run
#: is Unable to process (Cxxx), not A900: its identifier does match the SOP Class, the
#: node cannot process that many values in one query; nor A700, which says "out of
#: resources" as if the same query might succeed later.
FIND_STATUS: _Table = (
    (errors.QueryTooLarge, UNABLE_TO_PROCESS),
    (errors.InvalidQuery, IDENTIFIER_DOES_NOT_MATCH),
    (errors.QueryLimitExceeded, OUT_OF_RESOURCES),
    (errors.IndexFailure, OUT_OF_RESOURCES),
    (errors.Cancelled, CANCEL),
    (errors.Exhausted, OUT_OF_RESOURCES),
    (MemoryError, OUT_OF_RESOURCES),
)

#: C-MOVE and C-GET failure statuses (PS3.4 C.4.2.1.5, Table C.4-2; C.4.3.1.4,
#: Table C.4-3).  Failures of single sub-operations are counted, not mapped here.  A
#: query too large to run is Unable to process, as for C-FIND.
RETRIEVE_STATUS: _Table = (
    (errors.QueryTooLarge, UNABLE_TO_PROCESS),
    (errors.InvalidQuery, IDENTIFIER_DOES_NOT_MATCH),
    (errors.IndexFailure, UNABLE_TO_CALCULATE_MATCHES),
    (errors.QueryLimitExceeded, UNABLE_TO_CALCULATE_MATCHES),
    (errors.Cancelled, CANCEL),
    (errors.Exhausted, UNABLE_TO_CALCULATE_MATCHES),  # A701: out of resources
    (MemoryError, UNABLE_TO_CALCULATE_MATCHES),
)


#: Storage commitment N-ACTION failure statuses (PS3.4 J.3.2, PS3.7 10.1.4.1.10).
COMMITMENT_STATUS: _Table = (
    (errors.InvalidRequest, INVALID_ARGUMENT_VALUE),
    (errors.ResourceLimitation, RESOURCE_LIMITATION),
    (errors.IndexFailure, PROCESSING_FAILURE),
    (errors.Exhausted, RESOURCE_LIMITATION),
    (MemoryError, RESOURCE_LIMITATION),
)


def status_for(table: _Table, exc: BaseException) -> Status:
    """The status for ``exc`` under ``table``, with the reason as Error Comment.

    An exception no row names (a bug) is a Processing failure (0110) for C-STORE and
    N-ACTION, and Unable to process (C000) for the Query/Retrieve services.
    """
    default = (PROCESSING_FAILURE if table is STORE_STATUS or table is COMMITMENT_STATUS
               else UNABLE_TO_PROCESS)
    found = next((status for kind, status in table if isinstance(exc, kind)), default)
    return found.with_comment(str(exc) or type(exc).__name__)
