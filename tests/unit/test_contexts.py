"""The transfer syntax of the storage contexts a C-GET requestor proposes with the SCP
role (pacs.dimse.contexts): one every stored object can be sent in, where one was
proposed; contexts in which a peer sends to us keep the compressed syntaxes first."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import build_role
from pynetdicom.presentation import build_context, negotiate_as_acceptor
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from pacs.dimse import contexts
from pacs.dimse.contexts import CheapCopyContexts

pytestmark = pytest.mark.dimse

ORDER = contexts.STORAGE_TRANSFER_SYNTAXES
ELE, ILE = ExplicitVRLittleEndian, ImplicitVRLittleEndian


@pytest.mark.parametrize(("proposals", "needed"), [
    # One context, compressed and uncompressed: the storage order would take JPEG.
    ([[JPEGBaseline8Bit, ELE]], True),
    ([[JPEGBaseline8Bit, ELE, ExplicitVRBigEndian, ILE]], True),   # getscu +xy
    ([[JPEG2000Lossless, ILE]], True),
    # An uncompressed context of its own beside the compressed one: nothing to change.
    ([[JPEGBaseline8Bit, ELE], [ELE]], False),
    ([[JPEGBaseline8Bit], [ILE]], False),
    # Uncompressed only, or compressed only: the storage order already decides.
    ([[ELE, ILE]], False),
    ([[JPEGBaseline8Bit], [RLELossless]], False),
    # Big endian is not a syntax objects are converted to: it would not help.
    ([[JPEGBaseline8Bit, ExplicitVRBigEndian]], False),
])
def test_needs_sendable_first(proposals: list[list[str]], needed: bool) -> None:
    assert contexts.needs_sendable_first(proposals, ORDER) is needed


def test_storage_order_takes_compressed_and_sendable_first_uncompressed() -> None:
    proposed = [JPEGBaseline8Bit, JPEGLSLossless, ILE, ELE]
    assert contexts.accepted_syntax(proposed, ORDER) != ELE
    assert contexts.accepted_syntax(proposed, ORDER) in (JPEGBaseline8Bit, JPEGLSLossless)
    sendable = contexts.sendable_first(ORDER)
    assert sorted(sendable) == sorted(ORDER)
    assert sendable[:2] == [ELE, ILE]
    assert contexts.accepted_syntax(proposed, sendable) == ELE
    assert contexts.accepted_syntax([JPEGBaseline8Bit, ILE], sendable) == ILE
    assert contexts.accepted_syntax([JPEGBaseline8Bit], sendable) == JPEGBaseline8Bit
    assert contexts.accepted_syntax([ExplicitVRBigEndian], sendable) == ExplicitVRBigEndian


def test_only_classes_proposed_with_the_scp_role() -> None:
    requested = [build_context(CTImageStorage, [JPEGBaseline8Bit, ELE]),
                 build_context(MRImageStorage, [JPEGBaseline8Bit, ELE]),
                 build_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit, ELE]),
                 build_context(SecondaryCaptureImageStorage, [ELE])]
    roles = {CTImageStorage: build_role(CTImageStorage, scp_role=True),
             MRImageStorage: build_role(MRImageStorage, scu_role=True),
             SecondaryCaptureImageStorage: build_role(SecondaryCaptureImageStorage,
                                                      scp_role=True)}
    supported = dict.fromkeys((CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage), ORDER)
    # CT: SCP role, one mixed context.  MR: the requestor sends (SCU role only).
    # SC: an uncompressed context of its own already.
    assert contexts.sendable_first_classes(requested, roles, supported) == {CTImageStorage}
    assert contexts.sendable_first_classes(requested, {}, supported) == set()
    assert contexts.sendable_first_classes(requested, roles, {}) == set()


def _negotiate(requested: list, roles: dict) -> dict[int, tuple[str, bool]]:
    """pynetdicom's acceptor negotiation over the node's contexts after the
    EVT_REQUESTED handler: context ID -> (accepted syntax, we are the SCU)."""
    ours = copy.deepcopy(CheapCopyContexts(contexts.scp_contexts()))
    event = SimpleNamespace(assoc=SimpleNamespace(
        requestor=SimpleNamespace(role_selection=roles, requested_contexts=requested),
        acceptor=SimpleNamespace(supported_contexts=ours)))
    contexts.prefer_sendable(event)  # type: ignore[arg-type]
    rq_roles = {uid: (item.scu_role, item.scp_role) for uid, item in roles.items()}
    accepted, _ = negotiate_as_acceptor(requested, ours, rq_roles)
    return {cx.context_id: (cx.transfer_syntax[0], cx.as_scu) for cx in accepted
            if cx.result == 0x00}


def test_negotiation_c_get_requestor_and_storage_peer() -> None:
    """The handler and pynetdicom's negotiation together: a C-GET requestor's mixed
    context gets Explicit VR LE; a storage SCU proposing the same context without role
    selection (it sends to us) keeps its compressed syntax, stored as sent."""
    def mixed(context_id: int, uid: str) -> object:
        context = build_context(uid, [JPEGBaseline8Bit, ELE])
        context.context_id = context_id
        return context

    c_get = _negotiate([mixed(1, CTImageStorage), mixed(3, MRImageStorage)],
                       {CTImageStorage: build_role(CTImageStorage, scp_role=True)})
    assert c_get == {1: (ELE, True), 3: (JPEGBaseline8Bit, False)}

    store = _negotiate([mixed(1, CTImageStorage)], {})
    assert store == {1: (JPEGBaseline8Bit, False)}


def test_handler_reorders_only_this_associations_copy() -> None:
    """The server's contexts are untouched: each association reorders its own copy
    (pacs.dimse.contexts.CheapCopyContexts, what pynetdicom's server deep-copies)."""
    template = CheapCopyContexts(contexts.scp_contexts())
    ct = next(cx for cx in template if cx.abstract_syntax == CTImageStorage)
    before = list(ct.transfer_syntax)
    mine = copy.deepcopy(template)
    request = build_context(CTImageStorage, [JPEGBaseline8Bit, ELE])
    event = SimpleNamespace(assoc=SimpleNamespace(
        requestor=SimpleNamespace(
            role_selection={CTImageStorage: build_role(CTImageStorage, scp_role=True)},
            requested_contexts=[request]),
        acceptor=SimpleNamespace(supported_contexts=mine)))
    contexts.prefer_sendable(event)  # type: ignore[arg-type]
    reordered = next(cx for cx in mine if cx.abstract_syntax == CTImageStorage)
    assert reordered.transfer_syntax[:2] == [ELE, ILE]
    assert sorted(reordered.transfer_syntax) == sorted(before)
    assert ct.transfer_syntax == before
    others = [cx for cx in mine if cx.abstract_syntax == MRImageStorage]
    assert others and others[0].transfer_syntax == before
