"""Presentation contexts the SCP accepts.

Storage: every storage SOP class pynetdicom knows, in every transfer syntax it knows
(uncompressed, deflated, JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, …); objects are
stored as received, so accepting a syntax costs nothing.  Verification.  Query/Retrieve
information models are added by the Q/R services.
"""

from __future__ import annotations

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

#: Query/Retrieve information models by SOP Class UID (PS3.4 C.6.1, C.6.2).
FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "patient",
    StudyRootQueryRetrieveInformationModelFind: "study",
}
MOVE_MODELS = {
    PatientRootQueryRetrieveInformationModelMove: "patient",
    StudyRootQueryRetrieveInformationModelMove: "study",
}
GET_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: "patient",
    StudyRootQueryRetrieveInformationModelGet: "study",
}


#: Uncompressed syntaxes, after the compressed ones in :data:`STORAGE_TRANSFER_SYNTAXES`.
_NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
           ExplicitVRBigEndian]

#: Storage transfer syntaxes in our order of preference.  As acceptor pynetdicom takes
#: the first of *our* list that the requestor proposed in a context (the acceptor picks
#: one proposed syntax, PS3.8 7.1.1.14).  Compressed syntaxes come first: a modality that
#: proposes its file's compressed syntax with uncompressed fallbacks (dcmtk ``storescu
#: +C``) is given the compressed one and the object is stored as it is, instead of the
#: peer having to decompress it (or failing to).  Then Explicit VR Little Endian before
#: Implicit, so that objects keep their VRs.  The trade-off: a C-GET requestor that
#: proposes compressed and uncompressed syntaxes in one context gets the compressed one,
#: and an object stored uncompressed cannot be sent to it in that context (we decompress,
#: never compress); requestors usually propose uncompressed contexts separately.
STORAGE_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _NATIVE] + _NATIVE


def storage_contexts() -> list[PresentationContext]:
    """One context per storage SOP class, with every transfer syntax."""
    return [build_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts]


def query_retrieve_contexts() -> list[PresentationContext]:
    """The FIND, MOVE and GET models of Patient Root and Study Root.

    Identifiers are small: the two little endian syntaxes every SCU proposes are
    enough, and responses are encoded directly in them (:mod:`pacs.dimse.encoding`).
    """
    return [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for uid in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)]


def scp_contexts() -> list[PresentationContext]:
    """Everything the SCP accepts as an association acceptor.

    Storage contexts also accept the SCP role that C-GET requestors propose (the
    C-STORE sub-operations of C-GET go back over the same association, PS3.4 C.4.3).
    """
    storage = storage_contexts()
    for context in storage:
        context.scu_role = True
        context.scp_role = True
    return [build_context(Verification, ALL_TRANSFER_SYNTAXES),
            *query_retrieve_contexts(), *storage]
