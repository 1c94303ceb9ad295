"""One table from the core's exceptions to DIMSE statuses, per service.

C-STORE statuses: PS3.4 Table B.2-1 and PS3.7 Annex C.  The Error Comment (0000,0902)
carries the reason (never patient data: exception messages of the core name attributes,
not values).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from pacs.core import errors

#: C-STORE failure statuses (PS3.4 B.2.3, Table B.2-1; PS3.7 C.5).
STORE_STATUS: tuple[tuple[type[errors.PacsError], int], ...] = (
    (errors.InvalidUID, 0x0117),         # Invalid SOP Instance (PS3.7 C.5.7)
    (errors.UIDMismatch, 0xA900),        # Data Set does not match SOP Class
    (errors.UnreadableData, 0xC000),     # Cannot understand
    (errors.DuplicateRejected, 0x0111),  # Duplicate SOP Instance (PS3.7 C.5.6)
    (errors.ObjectTooLarge, 0xA700),     # Out of resources: over PACS_MAX_OBJECT_BYTES
    (errors.StorageError, 0xA700),       # Out of resources
    (errors.IndexFailure, 0xA700),       # Out of resources
)

#: C-FIND failure statuses (PS3.4 C.4.1.1.4, Table C.4-1).
FIND_STATUS: tuple[tuple[type[errors.PacsError], int], ...] = (
    (errors.InvalidQuery, 0xA900),          # Identifier does not match SOP Class
    (errors.QueryLimitExceeded, 0xA700),    # Refused: out of resources
    (errors.IndexFailure, 0xA700),          # Refused: out of resources
    (errors.Cancelled, 0xFE00),             # Cancel
)

#: C-MOVE and C-GET failure statuses (PS3.4 C.4.2.1.5, Table C.4-2; C.4.3.1.4,
#: Table C.4-3).  Failures of single sub-operations are counted, not mapped here.
RETRIEVE_STATUS: tuple[tuple[type[errors.PacsError], int], ...] = (
    (errors.InvalidQuery, 0xA900),        # Identifier does not match SOP Class
    (errors.IndexFailure, 0xA701),        # Refused: unable to calculate number of matches
    (errors.QueryLimitExceeded, 0xA701),  # Refused: unable to calculate number of matches
    (errors.Cancelled, 0xFE00),           # Sub-operations terminated due to Cancel
)
MOVE_STATUS = RETRIEVE_STATUS
GET_STATUS = RETRIEVE_STATUS

#: C-MOVE / C-GET statuses that carry sub-operation counts (PS3.4 Tables C.4-2, C.4-3).
RETRIEVE_SUCCESS = 0x0000          # all sub-operations complete, no failure or warning
RETRIEVE_PENDING = 0xFF00          # sub-operations continuing
RETRIEVE_CANCELLED = 0xFE00        # terminated due to a C-CANCEL
RETRIEVE_WARNING = 0xB000          # complete, one or more failures or warnings
SUBOPERATIONS_FAILED = 0xA702      # refused: unable to perform sub-operations
TOO_MANY_MATCHES = 0xA701          # refused: more matches than the counts can express
MOVE_DESTINATION_UNKNOWN = 0xA801  # C-MOVE only: destination not configured

#: An error no table names (a bug): Processing failure (PS3.7 C.5.2).
PROCESSING_FAILURE = 0x0110
#: Q/R: Unable to process (PS3.4 Table C.4-1, Cxxx).
UNABLE_TO_PROCESS = 0xC000


def status_for(table: tuple[tuple[type[errors.PacsError], int], ...],
               exc: BaseException) -> Dataset:
    """The status data set for ``exc`` under ``table``, with an Error Comment."""
    code = next((code for kind, code in table if isinstance(exc, kind)),
                PROCESSING_FAILURE if table is STORE_STATUS else UNABLE_TO_PROCESS)
    status = Dataset()
    status.Status = code
    # Error Comment is LO: 64 characters at most.
    status.ErrorComment = (str(exc) or type(exc).__name__)[:64]
    return status
