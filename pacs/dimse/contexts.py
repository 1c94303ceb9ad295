"""Presentation contexts the SCP accepts.

Storage: every storage SOP class pynetdicom knows, in every transfer syntax it knows
(uncompressed, deflated, JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, …); objects are
stored as received, so accepting a syntax costs nothing.  Verification.  Query/Retrieve
information models.  Storage Commitment Push Model.  The storage contexts in which a C-GET
requestor takes the SCP role are negotiated so that every stored object can be sent
(:func:`prefer_sendable`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from pacs.core.commitment import PUSH_MODEL
from pacs.core.transcode import UNCOMPRESSED

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

#: Verification SOP Class (PS3.4 A.4).
VERIFICATION = UID("1.2.840.10008.1.1")
#: Storage Commitment Push Model SOP Class (PS3.4 J.3).
STORAGE_COMMITMENT = UID(PUSH_MODEL)

#: Query/Retrieve information models by SOP Class UID (PS3.4 C.6.1, C.6.2, Table B.5-1).
FIND_MODELS: dict[str, str] = {
    UID("1.2.840.10008.5.1.4.1.2.1.1"): "patient",  # Patient Root Q/R - FIND
    UID("1.2.840.10008.5.1.4.1.2.2.1"): "study",    # Study Root Q/R - FIND
}
MOVE_MODELS: dict[str, str] = {
    UID("1.2.840.10008.5.1.4.1.2.1.2"): "patient",  # Patient Root Q/R - MOVE
    UID("1.2.840.10008.5.1.4.1.2.2.2"): "study",    # Study Root Q/R - MOVE
}
GET_MODELS: dict[str, str] = {
    UID("1.2.840.10008.5.1.4.1.2.1.3"): "patient",  # Patient Root Q/R - GET
    UID("1.2.840.10008.5.1.4.1.2.2.3"): "study",    # Study Root Q/R - GET
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
#: Implicit, so that objects keep their VRs.  Contexts in which we *send* (a C-GET
#: requestor's SCP-role contexts) may be negotiated in another order:
#: :func:`prefer_sendable`.
STORAGE_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _NATIVE] + _NATIVE


def storage_contexts() -> list[PresentationContext]:
    """One context per storage SOP class, with every transfer syntax."""
    return [build_context(str(cx.abstract_syntax), STORAGE_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts]


def query_retrieve_contexts() -> list[PresentationContext]:
    """The FIND, MOVE and GET models of Patient Root and Study Root.

    Identifiers are small: the two little endian syntaxes every SCU proposes are
    enough, and responses are encoded directly in them (:mod:`pacs.dimse.encoding`).
    """
    return [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for uid in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)]


def commitment_context() -> PresentationContext:
    """Storage Commitment Push Model, the node as its SCP (PS3.4 J.3).

    The Action Information and the Event Information are small: the two little endian
    syntaxes.  A requestor's SCP/SCU Role Selection is answered with the default roles
    (it the SCU, the node the SCP; the Storage Commitment Result goes from SCP to SCU on
    this association, PS3.4 J.3.3); a requestor that proposes only the SCP role for
    itself has the context rejected.
    """
    context = build_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian,
                                                 ImplicitVRLittleEndian])
    context.scu_role = True
    context.scp_role = False
    return context


def scp_contexts() -> list[PresentationContext]:
    """Everything the SCP accepts as an association acceptor.

    Storage contexts also accept the SCP role that C-GET requestors propose (the
    C-STORE sub-operations of C-GET go back over the same association, PS3.4 C.4.3).
    """
    storage = storage_contexts()
    for context in storage:
        context.scu_role = True
        context.scp_role = True
    return [build_context(VERIFICATION, ALL_TRANSFER_SYNTAXES),
            *query_retrieve_contexts(), commitment_context(), *storage]


def verification_context() -> PresentationContext:
    """Verification in the default transfer syntaxes (an association that needs some
    context and sends nothing)."""
    return build_context(VERIFICATION)


class CheapCopyContexts(list[PresentationContext]):
    """The server's presentation contexts, copied cheaply for each association.

    pynetdicom deep-copies the acceptor's contexts for every association; with every
    storage class in every transfer syntax that took ~50 ms and a few MB per
    association.  A shallow copy of each context is enough: negotiation only reads the
    contexts' transfer syntaxes, and the one place that reorders them
    (:func:`prefer_sendable`) gives its association's copy a new list.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [copy.copy(context) for context in self]


# -- contexts in which we send: C-GET's C-STORE sub-operations ---------------------------

_Syntax = TypeVar("_Syntax", bound=str)


def accepted_syntax(proposed: Iterable[str], order: Sequence[str]) -> str | None:
    """The transfer syntax an acceptor with preference ``order`` takes from a context.

    pynetdicom's acceptor takes the first syntax of *its own* list that the requestor
    proposed (``pynetdicom.presentation.negotiate_as_acceptor``; PS3.8 9.3.3.2 leaves
    the choice among the proposed syntaxes to the acceptor); ``None`` when none of ours
    was proposed.
    """
    offered = set(proposed)
    return next((syntax for syntax in order if syntax in offered), None)


def needs_sendable_first(proposals: Iterable[Sequence[str]], order: Sequence[str]) -> bool:
    """Whether a SOP class's storage contexts in which we send must be negotiated with
    the uncompressed syntaxes first.

    Parameters
    ----------
    proposals : iterable of sequences of str
        The transfer syntaxes of each context the requestor proposed for the SOP class
        with the SCP role (a requestor may propose several contexts for one class).
    order : sequence of str
        Our preference: :data:`STORAGE_TRANSFER_SYNTAXES`, compressed first.

    Notes
    -----
    The acceptor accepts one of the proposed transfer syntaxes per presentation context
    (PS3.8 9.3.2.2, 9.3.3.2), before it knows what will be retrieved.  Over a C-GET the
    requestor takes the SCP role of the storage contexts (PS3.7 D.3.3.4) and the
    C-STORE sub-operations come back over the same association (PS3.4 C.4.3), each in a
    context of its SOP class in a syntax the object can be sent in: as stored, or
    decompressed to Explicit or Implicit VR Little Endian (:mod:`pacs.core.transcode`; the
    node never compresses, nor converts between compressed syntaxes).  A requestor that
    proposes, in one context, a compressed syntax *and* an uncompressed one (dcmtk
    ``getscu +xy``: JPEG Baseline, then the uncompressed syntaxes) would be given the
    compressed one by our storage order, and every object stored in any other syntax -
    uncompressed ones included - would fail as a sub-operation.

    So: when the storage order already leaves the class a context in an uncompressed
    syntax (the requestor proposed one in a context of its own, as a requestor that
    wants a compressed syntax does), nothing changes, and objects stored in the
    compressed syntax accepted in another context are sent as stored.  Otherwise, if a
    context lists an uncompressed syntax, the uncompressed syntaxes go first (Explicit
    VR Little Endian, then Implicit): every object that can be decoded is sent, objects
    stored compressed being decompressed for this requestor - bigger transfers, never
    a failure.  Orthanc accepts Explicit VR Little Endian first in every storage
    context, whatever the role; dcm4che chooses by role, from the node's SCU-role
    transfer capabilities and their configurable preferred syntaxes.  Here contexts in
    which a peer sends to us keep the storage order (a modality's compressed objects are
    stored as sent), and only the contexts we send in change, only when they must.
    """
    proposals = list(proposals)
    if any(accepted_syntax(proposed, order) in UNCOMPRESSED for proposed in proposals):
        return False
    available = set(order)
    return any(available.intersection(proposed).intersection(UNCOMPRESSED)
               for proposed in proposals)


def sendable_first(order: Sequence[_Syntax]) -> list[_Syntax]:
    """``order`` with the uncompressed conversion targets first (Explicit VR Little
    Endian, then Implicit), the others after them in the same order."""
    def rank(syntax: _Syntax) -> int:
        return UNCOMPRESSED.index(syntax) if syntax in UNCOMPRESSED else len(UNCOMPRESSED)
    return sorted(order, key=rank)


def sendable_first_classes(
        requested: Iterable[PresentationContext],
        roles: Mapping[UID, SCP_SCU_RoleSelectionNegotiation],
        supported: Mapping[str, Sequence[str]]) -> set[str]:
    """The SOP classes whose contexts an association negotiates sendable-first.

    Parameters
    ----------
    requested : iterable of PresentationContext
        The requestor's proposed contexts (A-ASSOCIATE-RQ).
    roles : mapping
        Its SCP/SCU Role Selection items by SOP Class UID (PS3.7 D.3.3.4).
    supported : mapping
        Our transfer syntaxes, in our order, by SOP Class UID.
    """
    sending = {str(uid) for uid, item in roles.items() if item.scp_role}
    if not sending:
        return set()
    proposals: dict[str, list[Sequence[str]]] = {}
    for context in requested:
        uid = str(context.abstract_syntax)
        if uid in sending and uid in supported:
            proposals.setdefault(uid, []).append(context.transfer_syntax)
    return {uid for uid, proposed in proposals.items()
            if needs_sendable_first(proposed, supported[uid])}


def prefer_sendable(event: Event) -> None:
    """EVT_REQUESTED: put the uncompressed syntaxes first in this association's storage
    contexts where :func:`needs_sendable_first` says so.

    The association's supported contexts are its own copies (pynetdicom copies the
    server's for each association, :class:`CheapCopyContexts`), and each reordered one
    gets a new list, so this changes only this negotiation.  Only public pynetdicom
    API: the request's contexts and role items, the acceptor's supported contexts.
    """
    assoc = event.assoc
    roles = assoc.requestor.role_selection
    if not roles:
        return
    # Contexts we may take the SCU role in: the storage ones (scp_contexts).
    ours = {str(cx.abstract_syntax): cx for cx in assoc.acceptor.supported_contexts
            if cx.scu_role}
    classes = sendable_first_classes(
        assoc.requestor.requested_contexts, roles,
        {uid: cx.transfer_syntax for uid, cx in ours.items()})
    for uid in classes:
        reordered: list[str | bytes | UID] = list(sendable_first(ours[uid].transfer_syntax))
        ours[uid].transfer_syntax = reordered
