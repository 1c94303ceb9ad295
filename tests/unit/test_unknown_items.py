"""A-ASSOCIATE-RQ/-AC items of types pynetdicom does not know are skipped before it
decodes the PDU (PS3.8 9.3.1), byte for byte nothing else changed
(:func:`pacs.dimse.seam.reactor.known_items_only`)."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ

from pacs.dimse.seam.reactor import known_items_only
from tests.service.hostile_peer import item
from tests.service.test_malformed_requests import associate_rq, context


def _rq(contexts: bytes = b"", extra: bytes = b"") -> bytes:
    return associate_rq(context(1) + contexts, "INTELPIXEL", extra)


def test_a_request_of_known_items_is_left_as_it_came() -> None:
    data = _rq(context(3))
    assert known_items_only(data) is data


@pytest.mark.parametrize(("contexts", "extra"), [
    (item(0x60, b"x" * 5), b""),
    (b"", item(0x5F, b"vendor")),
    (item(0x7F, b""), item(0x5A, b"") + item(0x5B, b"12")),
])
def test_unknown_items_are_skipped_and_the_rest_decodes_the_same(
        contexts: bytes, extra: bytes) -> None:
    kept = known_items_only(_rq(contexts, extra))
    assert kept == _rq()
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(kept)
    assert [cx.context_id for cx in decoded.presentation_context] == [1]


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_items_that_overrun_the_pdu_are_left_for_the_decoder_to_refuse(cut: int) -> None:
    data = bytearray(_rq(item(0x60, b"x" * 5)))
    data = data[:-cut]
    data[2:6] = struct.pack(">I", len(data) - 6)
    assert known_items_only(bytes(data)) == bytes(data)
