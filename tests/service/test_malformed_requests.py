"""A-ASSOCIATE-RQs and DIMSE messages pynetdicom cannot take (PS3.8 9.3.2.2, 9.3.8).

Each ended one of pynetdicom's threads with an error: a presentation context without
its abstract or transfer syntax ended the association thread after the association
was admitted, and its DUL thread kept reading the socket, so the place stayed taken
for as long as the peer kept the connection open (16 such connections locked an
address out, 32 the worker); an even context ID or an unknown User Identity type
ended the DUL thread, the peer answered by nothing; a command set of an unknown
Command Field ended the association thread.  Now: an A-ASSOCIATE-RJ before the
association is admitted, or an A-ABORT from the service provider, and no thread ends
with an error (:data:`tests.conftest.THREADS_END_CLEANLY`).
"""

from __future__ import annotations

import socket
import struct

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs.dimse import limits
from tests.conftest import seam_only
from tests.service.conftest import RunningNode
from tests.service.hostile_peer import command_set, element, item, pdata
from tests.service.test_exhaustion import closed_by_peer

pytestmark = pytest.mark.dimse

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT = b"1.2.840.10008.1.2"


def context(number: int, abstract: bytes | None = VERIFICATION,
            syntaxes: tuple[bytes, ...] = (IMPLICIT,)) -> bytes:
    """A Presentation Context Item (PS3.8 9.3.2.2), whatever it holds."""
    body = (item(0x30, abstract) if abstract is not None else b"") + b"".join(
        item(0x40, syntax) for syntax in syntaxes)
    return item(0x20, bytes([number, 0, 0, 0]) + body)


def associate_rq(contexts: bytes, called: str, user_extra: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) with these context items."""
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3")
                + user_extra)
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16)
            + b"MALFORMED".ljust(16) + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def answer(sock: socket.socket) -> bytes:
    """The first PDU the node answers with (10 bytes: an RJ or an A-ABORT)."""
    sock.settimeout(5)
    data = b""
    while len(data) < 10:
        piece = sock.recv(10 - len(data))
        if not piece:
            break
        data += piece
    return data


def echo(node: RunningNode) -> bool:
    ae = AE(ae_title="ECHOER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.services.settings.ae_title)
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("contexts", [
    context(1, syntaxes=()),
    context(1, abstract=None),
    context(1) + context(1),
    b"",
], ids=["no-transfer-syntax", "no-abstract-syntax", "repeated-id", "no-context"])
def test_contexts_that_cannot_be_negotiated_are_rejected_before_admission(
        node: RunningNode, contexts: bytes) -> None:
    """A-ASSOCIATE-RJ, rejected-permanent, service user, no reason given; the
    connections held open afterwards take no association's place (more of them than
    an address may hold), and an echo from the same address is served."""
    called = node.services.settings.ae_title
    held = []
    try:
        for _ in range(node.services.settings.max_associations_per_host + 2):
            peer = socket.create_connection(("127.0.0.1", node.port))
            held.append(peer)
            peer.sendall(associate_rq(contexts, called))
            assert answer(peer) == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x01"
        assert echo(node)
    finally:
        for peer in held:
            peer.close()


@pytest.mark.parametrize(("contexts", "user_extra"), [
    (context(2), b""),  # an even Presentation Context ID
    (context(1), item(0x58, bytes([9, 0]) + struct.pack(">H", 1) + b"x"
                      + struct.pack(">H", 0))),  # User Identity Type 9 (PS3.7 D.3.3.7)
], ids=["even-context-id", "user-identity-type-9"])
@seam_only("pynetdicom's DUL thread ends with an error and sends nothing")
def test_a_request_pynetdicom_cannot_read_is_aborted_by_the_provider(
        node: RunningNode, contexts: bytes, user_extra: bytes) -> None:
    """A-ABORT, source service provider, reason invalid PDU parameter value (PS3.8
    9.3.8), then the end of the connection."""
    with socket.create_connection(("127.0.0.1", node.port)) as peer:
        peer.sendall(associate_rq(contexts, node.services.settings.ae_title, user_extra))
        assert answer(peer) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
        assert closed_by_peer(peer)
    assert echo(node)


@pytest.mark.parametrize(("contexts", "user_extra"), [
    (context(1), item(0x5F, b"unknown")),  # a User Information sub-item
    (context(1) + item(0x60, b"unknown"), b""),  # an item beside the contexts
], ids=["user-information-sub-item", "top-level-item"])
@seam_only("pynetdicom's decoding aborts on an item type it does not know")
def test_items_of_unknown_types_are_skipped(node: RunningNode, contexts: bytes,
                                            user_extra: bytes) -> None:
    """PS3.8 9.3.1: "Items of unrecognized types shall be ignored and skipped" (a
    newer standard's item, a vendor's): the association is accepted, the context
    with it (A-ASSOCIATE-AC, its Presentation Context Item's result 0)."""
    with socket.create_connection(("127.0.0.1", node.port)) as peer:
        peer.sendall(associate_rq(contexts, node.services.settings.ae_title, user_extra))
        peer.settimeout(5)
        head = peer.recv(6)
        assert head[:1] == b"\x02", head  # A-ASSOCIATE-AC
        body = b""
        while len(body) < struct.unpack(">I", head[2:])[0]:
            body += peer.recv(65536)
        at = 68
        while body[at] != 0x21:  # the Presentation Context Item (AC)
            at += 4 + struct.unpack(">H", body[at + 2:at + 4])[0]
        assert (body[at + 4], body[at + 6]) == (1, 0)  # context 1, acceptance


CT = b"1.2.840.10008.5.1.4.1.1.2"


def _associated(node: RunningNode, contexts: bytes) -> socket.socket:
    """A raw association proposing ``contexts``, its A-ASSOCIATE-AC read."""
    peer = socket.create_connection(("127.0.0.1", node.port))
    peer.sendall(associate_rq(contexts, node.services.settings.ae_title))
    peer.settimeout(5)
    head = peer.recv(6)
    assert head[0] == 0x02  # A-ASSOCIATE-AC
    length = struct.unpack(">I", head[2:6])[0]
    while length:
        length -= len(peer.recv(length))
    return peer


@seam_only("pynetdicom's association thread ends with an error")
def test_a_command_of_an_unknown_command_field_aborts_the_association(
        node: RunningNode) -> None:
    """The first message of an association (pynetdicom's DIMSE provider reads it): a
    command set whose Command Field is 0xFFFF, which pynetdicom cannot decode, is a
    protocol error: A-ABORT, and no thread ends with an error."""
    with _associated(node, context(1)) as peer:
        command = command_set(element(0x00000002, VERIFICATION),
                              element(0x00000100, struct.pack("<H", 0xFFFF)),
                              element(0x00000110, struct.pack("<H", 1)),
                              element(0x00000800, struct.pack("<H", 0x0101)))
        peer.sendall(pdata(1, 0x03, command))
        assert answer(peer)[:1] == b"\x07"
        assert closed_by_peer(peer)
    assert echo(node)


def _store_command(message_id: int) -> bytes:
    return command_set(element(0x00000002, CT),
                       element(0x00000100, struct.pack("<H", 0x0001)),
                       element(0x00000110, struct.pack("<H", message_id)),
                       element(0x00000700, struct.pack("<H", 0)),
                       element(0x00000800, struct.pack("<H", 0x0000)),
                       element(0x00001000, b"1.2.3.4"))


@seam_only("pynetdicom's service classes fail on another operation")
def test_a_first_message_its_context_does_not_take_is_answered_0211(
        node: RunningNode) -> None:
    """A C-ECHO-RQ as an association's first message, on a storage context: its
    C-ECHO-RSP carries Unrecognized Operation (0211, PS3.7 C.5); pynetdicom's storage
    service class failed on it (a traceback, the association aborted)."""
    echo_rq = command_set(element(0x00000002, CT),
                          element(0x00000100, struct.pack("<H", 0x0030)),
                          element(0x00000110, struct.pack("<H", 5)),
                          element(0x00000800, struct.pack("<H", 0x0101)))
    with _associated(node, context(1, CT) + context(3)) as peer:
        peer.sendall(pdata(1, 0x03, echo_rq))
        head = answer(peer)
        assert head[:1] == b"\x04"  # P-DATA-TF: the response, no abort
        length, body = struct.unpack(">I", head[2:6])[0], head[6:]
        while len(body) < length:
            body += peer.recv(length - len(body))
        fields = body[6:]
        assert struct.pack("<HHIH", 0x0000, 0x0100, 2, 0x8030) in fields
        assert struct.pack("<HHIH", 0x0000, 0x0900, 2, 0x0211) in fields
    assert echo(node)


@pytest.mark.parametrize("where", ["command", "data set"])
@seam_only("pynetdicom takes the fragments as they come")
def test_a_first_message_of_empty_fragments_aborts_the_association(
        node: RunningNode, where: str) -> None:
    """An association's first message (pynetdicom's path) as fragments without
    content, past ``limits.FREE_FRAGMENTS``: aborted, where each fragment cost
    pynetdicom's decoding some microseconds for as long as the peer kept sending."""
    empty = pdata(1, 0x01 if where == "command" else 0x00, b"")
    with _associated(node, context(1, CT) + context(3)) as peer:
        if where == "data set":
            peer.sendall(pdata(1, 0x03, _store_command(9)))
        peer.sendall(empty * (limits.FREE_FRAGMENTS + 50))
        assert answer(peer)[:1] == b"\x07"
        assert closed_by_peer(peer)
    assert echo(node)


@pytest.mark.parametrize("after_the_command", [
    pdata(3, 0x02, b"\x08\x00\x18\x00\x07\x00\x00\x001.2.3.4"),  # data set on another context
    pdata(1, 0x03, _store_command(8)),  # a second command instead of the data set
    pdata(1, 0x00, b"\x08\x00") + pdata(1, 0x01, b"\x00\x00"),  # a command inside it
], ids=["data-on-another-context", "second-command", "command-inside-the-data-set"])
@seam_only("pynetdicom takes the fragments as they come")
def test_fragments_out_of_order_in_the_first_message_abort_the_association(
        node: RunningNode, after_the_command: bytes) -> None:
    """PS3.8 9.3.5.1 and E.2: a message's fragments are on one context, its command
    set first, then its data set.  On an association's first message (pynetdicom's
    path) a data set continued on another context was stored, a second C-STORE command
    silently replaced the first (never answered): now the association is aborted, as
    after the first message."""
    with _associated(node, context(1, CT) + context(3)) as peer:
        peer.sendall(pdata(1, 0x03, _store_command(7)) + after_the_command)
        assert answer(peer)[:1] == b"\x07"
        assert closed_by_peer(peer)
    assert echo(node)
