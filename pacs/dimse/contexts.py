"""Presentation contexts the SCP accepts.

Storage: every storage SOP class pynetdicom knows, in every transfer syntax it knows
(uncompressed, deflated, JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, …); objects are
stored as received, so accepting a syntax costs nothing.  Verification.  Query/Retrieve
information models are added by the Q/R services.
"""

from __future__ import annotations

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification


def storage_contexts() -> list[PresentationContext]:
    """One context per storage SOP class, with every transfer syntax."""
    return [build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts]


def scp_contexts() -> list[PresentationContext]:
    """Everything the SCP accepts as an association acceptor."""
    return [build_context(Verification, ALL_TRANSFER_SYNTAXES), *storage_contexts()]
