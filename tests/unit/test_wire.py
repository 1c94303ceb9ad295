"""Messages written straight to an association's socket (pacs.dimse.seam.wire)."""

from __future__ import annotations

import io
import socket
import struct
import threading
from types import SimpleNamespace

import pytest

from pacs.dimse import limits
from pacs.dimse.seam import wire
from tests.unit.test_limits import sipped_pair

pytestmark = pytest.mark.dimse


class _Assoc:
    """What the writers use of a pynetdicom association, over one end of a socket pair."""

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self.dimse = SimpleNamespace(maximum_pdu_size=max_pdu)
        self.dul = SimpleNamespace(socket=SimpleNamespace(socket=sock))
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _pdvs(data: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, fragment) of every PDV in a run of P-DATA-TF PDUs."""
    out, position = [], 0
    while position < len(data):
        kind, _, length = struct.unpack_from(">BBI", data, position)
        assert kind == 0x04
        end, item = position + 6 + length, position + 6
        while item < end:
            (item_length,) = struct.unpack_from(">I", data, item)
            context_id, header = data[item + 4], data[item + 5]
            out.append((context_id, header, data[item + 6:item + 4 + item_length]))
            item += 4 + item_length
        position = end
    return out


def _received(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("max_pdu", [0, 16384, 40])
def test_write_message_fragments_to_the_peer_pdu_size(max_pdu: int) -> None:
    ours, theirs = socket.socketpair()
    command = wire.response_command(0x8021, "1.2.840.10008.5.1.4.1.2.2.2", 7, 0xFF00, False,
                                    counts=(3, 1, 0, 0))
    wire.write_message(_Assoc(ours, max_pdu), 5, command)
    ours.close()
    pdvs = _pdvs(_received(theirs))
    assert b"".join(fragment for _, _, fragment in pdvs) == command
    assert {context for context, _, _ in pdvs} == {5}
    # Command fragments (bit 0); only the last one has bit 1 (PS3.8 E.2).
    assert [header for _, header, _ in pdvs] == [0x01] * (len(pdvs) - 1) + [0x03]
    if max_pdu:
        assert all(len(fragment) + 6 <= max_pdu for _, _, fragment in pdvs)
    assert (len(pdvs) > 1) is (max_pdu == 40)


def test_write_store_request_sends_command_then_data_set() -> None:
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * 200
    wire.write_store_request(_Assoc(ours, 16384), 3, b"CMD!", io.BytesIO(data), len(data))
    ours.close()
    pdvs = _pdvs(_received(theirs))
    assert pdvs[0] == (3, 0x03, b"CMD!")
    assert b"".join(fragment for _, _, fragment in pdvs[1:]) == data
    assert [header for _, header, _ in pdvs[1:]] == [0x00] * (len(pdvs) - 2) + [0x02]


def test_a_short_object_aborts_the_association() -> None:
    ours, theirs = socket.socketpair()
    assoc = _Assoc(ours, 16384)
    with pytest.raises(EOFError):
        wire.write_store_request(assoc, 3, b"CMD!", io.BytesIO(b"short"), 100)
    assert assoc.aborted
    ours.close()
    theirs.close()


def test_a_send_the_peer_does_not_read_gives_up() -> None:
    """bound_sends: a peer that stops reading fails the write (here after 0.2 s)."""
    ours, theirs = socket.socketpair()
    limits.bound_sends(ours, 0.2)
    assoc = _Assoc(ours, 16384)
    with pytest.raises(OSError):
        wire.write_store_request(assoc, 3, b"CMD!", io.BytesIO(bytes(64 << 20)), 64 << 20)
    assert assoc.aborted
    ours.close()
    theirs.close()


def test_a_peer_that_reads_a_little_now_and_then_cannot_hold_a_write() -> None:
    """Each wait of the write makes progress within SO_SNDTIMEO (the peer reads 2 KiB
    every 0.1 s), so only a bound on the whole write ends it: the network timeout, and
    a second per MIN_RATE bytes taken (pacs.dimse.seam.reactor.pace).  The association
    is aborted."""
    with sipped_pair() as ours:
        limits.bound_sends(ours, 0.5)
        assoc = _Assoc(ours, 16384)
        assoc.network_timeout = 0.5  # type: ignore[attr-defined]
        writer = wire.ResponseWriter(assoc, 3)
        done = threading.Event()
        threading.Thread(target=lambda: (writer.message(b"CMD!", bytes(1 << 20), last=True),
                                         done.set()), daemon=True).start()
        assert done.wait(10), "the write went on"
        assert writer.broken and assoc.aborted


def _response_pdus(command: bytes, context_id: int = 3, split: int | None = None) -> bytes:
    """A command in one PDU, or in two fragments in two PDUs."""
    if split is None:
        return wire._pdu(context_id, 0x03, command)
    return wire._pdu(context_id, 0x01, command[:split]) + wire._pdu(context_id, 0x03,
                                                                    command[split:])


_STORE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("split", [None, 10])
def test_read_store_response_returns_the_status(split: int | None) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(_response_pdus(wire.response_command(0x8001, _STORE, 5, 0xB000, False),
                                  split=split))
    assert wire.read_store_response(_Assoc(ours, 16384), 5, 2.0) == 0xB000
    ours.close()
    theirs.close()


def test_a_cancel_read_with_the_responses_is_reported() -> None:
    """C-GET: the requestor's C-CANCEL-RQ (PS3.7 9.3.2.3) may come before the response."""
    ours, theirs = socket.socketpair()
    theirs.sendall(_response_pdus(wire.response_command(0x0FFF, _STORE, 9, 0, False))
                   + _response_pdus(wire.response_command(0x8001, _STORE, 5, 0, False)))
    cancelled: list[int] = []
    assert wire.read_store_response(_Assoc(ours, 16384), 5, 2.0, cancelled.append) == 0
    assert cancelled == [9]
    ours.close()
    theirs.close()


@pytest.mark.parametrize("reply", [
    bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]),  # A-ABORT
    wire._pdu(3, 0x03, wire.response_command(0x8001, _STORE, 6, 0, False)),  # another ID
    wire._pdu(3, 0x02, b"data"),  # a data set fragment first
    b"",  # nothing: the timeout
])
def test_anything_else_is_unexpected(reply: bytes) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(reply)
    with pytest.raises(wire.UnexpectedMessage):
        wire.read_store_response(_Assoc(ours, 16384), 5, 0.3)
    ours.close()
    theirs.close()
