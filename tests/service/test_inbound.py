"""C-STORE and C-FIND requests after the first of an association, read from the socket
by the association's own thread (pacs.dimse.seam.inbound), and everything else that
arrives among them left to pynetdicom.

The peer is pynetdicom over loopback; for the shapes it never sends (a command and a data
set in one PDU, a command split over PDUs, a PDU that goes on with the next message, a
broken data set, a stall inside a PDU) its socket is taken from its own reader and the
PDUs written and read here, encoded by this module alone.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

import pacs.core.query.engine as engine_module
from pacs.core.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE
from pacs.core.services import Services, drain
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import limits, server
from pacs.dimse.seam import inbound, reactor
from tests.conftest import free_port, seam_only
from tests.factory import dataset_bytes, make_instance

pytestmark = pytest.mark.dimse

#: Presentation context IDs as pynetdicom proposes them: odd, in the order added.
CT_CONTEXT, ECHO_CONTEXT, FIND_CONTEXT = 1, 3, 5
#: Command Field values (PS3.7 E.1-1).
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
#: The study of every instance sent.
STUDY = "1.2.826.0.1.3680043.8.498.77"
#: PDU types (PS3.8 9.3.1).
P_DATA_TF, A_ABORT = 0x04, 0x07


@contextmanager
def association(services: Services) -> Iterator[tuple[Association, MemoryStore]]:
    """An association from pynetdicom to a node serving ``services`` in this process."""
    port = free_port()
    running = server.start(services, ("127.0.0.1", port))
    try:
        ae = AE(ae_title="INBOUND")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
        assert assoc.is_established
        try:
            yield assoc, services.store.backend  # type: ignore[misc]
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        server.stop(running, drain=1.0)


def part10(number: int) -> bytes:
    """Instance ``number`` of the study, as a Part 10 object."""
    return make_instance(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.77.{number}",
                         StudyInstanceUID=STUDY)


def instance(number: int) -> tuple[str, bytes]:
    """Instance ``number``'s SOP Instance UID and data set (Explicit VR Little Endian)."""
    return f"1.2.826.0.1.3680043.8.498.77.{number}", dataset_bytes(part10(number))


def send(assoc: Association, number: int) -> int:
    """C-STORE instance ``number`` through pynetdicom; the status."""
    return int(assoc.send_c_store(dcmread(DicomBytesIO(part10(number)))).Status)


def stored(services: Services, store: MemoryStore) -> dict[str, bytes]:
    """The data sets stored, by SOP Instance UID."""
    drain(services)
    found = {}
    for data in store.objects.values():
        uid = str(dcmread(DicomBytesIO(data)).SOPInstanceUID)
        found[uid] = dataset_bytes(data)
    return found


def first_store(assoc: Association, number: int = 0) -> None:
    """A C-STORE through pynetdicom's own path, after which the node reads the next
    requests itself."""
    assert send(assoc, number) == 0x0000


# -- the bytes, encoded here ---------------------------------------------------------------

def element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command(field: int, sop_class: str, message_id: int, *, sop_instance: str = "",
            data_set: bool = True) -> bytes:
    """A request command set (Implicit VR Little Endian, PS3.7 E.1-1)."""
    body = element(0x00000002, sop_class.encode()) + element(0x00000100, struct.pack("<H", field))
    body += element(0x00000110, struct.pack("<H", message_id))
    if field in (C_STORE_RQ, C_FIND_RQ):
        body += element(0x00000700, struct.pack("<H", 0))  # Priority
    body += element(0x00000800, struct.pack("<H", 0x0000 if data_set else 0x0101))
    if sop_instance:
        body += element(0x00001000, sop_instance.encode())
    return element(0x00000000, struct.pack("<I", len(body))) + body


def pdv(context_id: int, header: int, fragment: bytes) -> bytes:
    """A presentation data value item (PS3.8 9.3.5.1, E.2)."""
    return struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment


def pdu(*items: bytes) -> bytes:
    """A P-DATA-TF PDU of ``items`` (PS3.8 9.3.5)."""
    body = b"".join(items)
    return struct.pack(">BBI", P_DATA_TF, 0, len(body)) + body


def store_command(uid: str, message_id: int) -> bytes:
    return command(C_STORE_RQ, CTImageStorage, message_id, sop_instance=uid)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = read_exactly(sock, 6)
    kind, _, length = struct.unpack(">BBI", head)
    return kind, read_exactly(sock, length)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def read_response(sock: socket.socket) -> dict[int, int]:
    """The US elements of the next response's command set (responses here have no
    data set)."""
    kind, body = read_pdu(sock)
    assert kind == P_DATA_TF, f"PDU type {kind:#x} instead of a response"
    fragment, position = b"", 0
    while position < len(body):
        (length,) = struct.unpack_from(">I", body, position)
        assert body[position + 5] & 0x01, "a data set where a response command was expected"
        fragment += body[position + 6:position + 4 + length]
        position += 4 + length
    return fields_of(fragment)


def read_find_answer(sock: socket.socket) -> list[tuple[int, bytes]]:
    """The responses to a C-FIND request, to the final one: each one's Status and
    identifier (empty when none)."""
    answers = []
    fragments: dict[bool, bytes] = {True: b"", False: b""}
    while True:
        kind, body = read_pdu(sock)
        assert kind == P_DATA_TF, f"PDU type {kind:#x} instead of a response"
        position = 0
        while position < len(body):
            (length,) = struct.unpack_from(">I", body, position)
            header = body[position + 5]
            fragments[bool(header & 0x01)] += body[position + 6:position + 4 + length]
            position += 4 + length
            if not header & 0x02:
                continue
            fields = fields_of(fragments[True])
            if header & 0x01 and fields[0x00000800] != 0x0101:
                continue  # the identifier follows
            answers.append((fields[0x00000900], fragments[False]))
            fragments = {True: b"", False: b""}
            if answers[-1][0] not in (0xFF00, 0xFF01):
                return answers


def fields_of(command_set: bytes) -> dict[int, int]:
    """The US elements of a command set."""
    fields, position = {}, 0
    while position < len(command_set):
        group, number, length = struct.unpack_from("<HHI", command_set, position)
        if length == 2:
            fields[(group << 16) | number] = struct.unpack_from("<H", command_set, position + 8)[0]
        position += 8 + length
    return fields


def find_identifier(assoc: Association, **keys: str) -> bytes:
    """A Study Root query at STUDY level, encoded in the find context's transfer syntax."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    [context] = [cx for cx in assoc.accepted_contexts if cx.context_id == FIND_CONTEXT]
    syntax = context.transfer_syntax[0]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(buffer, query)
    return buffer.getvalue()


@contextmanager
def raw(assoc: Association) -> Iterator[socket.socket]:
    """The peer's socket, its own reader kept off it for the block."""
    with reactor.socket_lent(assoc) as lent:
        assert lent
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.settimeout(20)
        yield sock


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SOP Instance UIDs of the requests the node read itself."""
    read: list[str] = []
    original = inbound._Reader.request

    def counting(self: inbound._Reader) -> object:
        answer = original(self)
        if isinstance(answer, inbound._Store):
            read.append(answer.request.sop_instance_uid)
        return answer

    monkeypatch.setattr(inbound._Reader, "request", counting)
    return read


# -- tests -----------------------------------------------------------------------------

def test_requests_of_every_kind_among_stores(services: Services) -> None:
    """Stores, an echo, a find and a release on one association: each answered, in
    order, every instance stored."""
    with association(services) as (assoc, store):
        uids = []
        for number in range(1, 7):
            uids.append(instance(number)[0])
            assert send(assoc, number) == 0x0000, number
            if number == 2:
                assert assoc.send_c_echo().Status == 0x0000
            if number == 4:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = STUDY
                answers = list(assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind))
                assert [status.Status for status, _ in answers] == [0xFF00, 0x0000]
        assoc.release()
        assert assoc.is_released
        assert set(uids) <= set(stored(services, store))


@seam_only("the node's own reading of C-STORE requests")
def test_shapes_pynetdicom_never_sends(services: Services, counted: list[str]) -> None:
    """A command and its data set in one PDU; a command split over two PDUs and a data
    set over three; a PDU that goes on with a C-ECHO: all answered, the data sets stored
    as sent, and pynetdicom's own path serves the association afterwards."""
    with association(services) as (assoc, store):
        first_store(assoc)
        sent = {}
        with raw(assoc) as sock:
            uid, data = instance(1)
            sent[uid] = data
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 11)),
                             pdv(CT_CONTEXT, 0x02, data)))
            answer = read_response(sock)
            assert (answer[0x00000100], answer[0x00000120], answer[0x00000900]) == \
                (C_STORE_RSP, 11, 0x0000)

            uid, data = instance(2)
            sent[uid] = data
            cut, third = 20, len(data) // 3
            whole = store_command(uid, 12)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x01, whole[:cut]))
                         + pdu(pdv(CT_CONTEXT, 0x03, whole[cut:]))
                         + pdu(pdv(CT_CONTEXT, 0x00, data[:third]))
                         + pdu(pdv(CT_CONTEXT, 0x00, data[third:2 * third]),
                               pdv(CT_CONTEXT, 0x02, data[2 * third:])))
            assert read_response(sock)[0x00000900] == 0x0000

            uid, data = instance(3)
            sent[uid] = data
            echo = command(C_ECHO_RQ, Verification, 13, data_set=False)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 14)),
                             pdv(CT_CONTEXT, 0x02, data), pdv(ECHO_CONTEXT, 0x03, echo)))
            answer = read_response(sock)
            assert (answer[0x00000100], answer[0x00000120]) == (C_STORE_RSP, 14)
            answer = read_response(sock)
            assert (answer[0x00000100], answer[0x00000120], answer[0x00000900]) == \
                (C_ECHO_RSP, 13, 0x0000)
        assert counted == list(sent)
        assert assoc.send_c_echo().Status == 0x0000
        first_store(assoc, 4)
        found = stored(services, store)
        for uid, data in sent.items():
            assert found[uid] == data


@seam_only("the node's own reading of C-STORE requests")
def test_a_data_set_on_another_context_aborts(services: Services) -> None:
    """A data set fragment on another presentation context than its command's: A-ABORT
    (PS3.8 9.3.8), nothing stored of it, and the node serves the next association."""
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, data = instance(1)
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 21)))
                         + pdu(pdv(ECHO_CONTEXT, 0x02, data)))
            kind, _ = read_pdu(sock)
            assert kind == A_ABORT
        assert uid not in stored(services, store)
    with association(services) as (assoc, _):
        assert assoc.send_c_echo().Status == 0x0000


@seam_only("requests written on the peer's lent socket")
def test_a_store_of_another_sop_class_than_its_context_is_refused(
        services: Services) -> None:
    """A C-STORE request whose Affected SOP Class is not its presentation context's
    (an MR instance on the CT context) is answered 0122 and not stored; the
    association goes on."""
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, data = instance(1)
        mr_data = data.replace(CTImageStorage.encode(), MRImageStorage.encode())
        mr_command = command(C_STORE_RQ, MRImageStorage, 91, sop_instance=uid)
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, mr_command), pdv(CT_CONTEXT, 0x02, mr_data)))
            assert read_response(sock)[0x00000900] == 0x0122
        assert send(assoc, 2) == 0x0000
        found = stored(services, store)
        assert uid not in found and instance(2)[0] in found


@seam_only("the node's own reading of C-STORE requests")
def test_a_peer_that_stalls_inside_a_pdu_is_aborted(
        make_services: Callable[..., Services]) -> None:
    """Half a data set PDU, then silence: the association is aborted after the DIMSE
    timeout (the socket's receive timeout), not held."""
    services = make_services(store=MemoryStore(), dimse_timeout=1.0)
    with association(services) as (assoc, _):
        first_store(assoc)
        uid, data = instance(1)
        with raw(assoc) as sock:
            whole = pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 31)),
                        pdv(CT_CONTEXT, 0x02, data))
            sock.sendall(whole[:len(whole) // 2])
            started = time.monotonic()
            kind, _ = read_pdu(sock)
            assert kind == A_ABORT
            assert time.monotonic() - started < 15


@seam_only("the node's own reading of C-STORE requests")
def test_a_peer_that_trickles_inside_a_pdu_is_aborted(
        make_services: Callable[..., Services]) -> None:
    """Half a data set PDU, then a byte every 0.4 s, each within the socket's receive
    timeout (the DIMSE timeout, 1 s): the PDU has to arrive whole within its time, so
    the association is aborted about a second later all the same, not held for as long
    as the peer keeps trickling."""
    services = make_services(store=MemoryStore(), dimse_timeout=1.0)
    with association(services) as (assoc, _):
        first_store(assoc)
        uid, data = instance(1)
        with raw(assoc) as sock:
            whole = pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 32)),
                        pdv(CT_CONTEXT, 0x02, data))
            sock.sendall(whole[:len(whole) // 2])
            started = time.monotonic()
            stop = threading.Event()

            def trickle() -> None:
                for byte in whole[len(whole) // 2:]:
                    if stop.wait(0.4):
                        return
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        return

            sender = threading.Thread(target=trickle)
            sender.start()
            try:
                kind, _ = read_pdu(sock)
            finally:
                stop.set()
                sender.join()
            assert kind == A_ABORT
            assert time.monotonic() - started < 10


@seam_only("the node's own reading of C-STORE requests")
def test_over_the_object_limit_then_on(make_services: Callable[..., Services],
                                       counted: list[str]) -> None:
    """A data set over PACS_MAX_OBJECT_BYTES is answered A700 and not kept; the next
    request on the association is stored."""
    services = make_services(store=MemoryStore(), max_object_bytes=2000)
    with association(services) as (assoc, store):
        first_store(assoc)
        big_uid, _ = instance(1)
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(big_uid, 41)))
                         + pdu(pdv(CT_CONTEXT, 0x00, bytes(1500)))
                         + pdu(pdv(CT_CONTEXT, 0x02, bytes(1500))))
            assert read_response(sock)[0x00000900] == 0xA700
            uid, data = instance(2)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 42)),
                             pdv(CT_CONTEXT, 0x02, data)))
            assert read_response(sock)[0x00000900] == 0x0000
        assert counted == [big_uid, uid]
        found = stored(services, store)
        assert uid in found and big_uid not in found


@seam_only("the node's own reading of C-STORE requests")
def test_a_pdu_over_the_maximum_length_after_stores(services: Services) -> None:
    """A P-DATA-TF header declaring more than the node's Maximum Length, after a store:
    pynetdicom's reading refuses it (A-ABORT) before any body is read."""
    with association(services) as (assoc, _):
        first_store(assoc)
        with raw(assoc) as sock:
            sock.sendall(b"\x04\x00\xff\xff\xff\xf0" + bytes(100))
            kind, body = read_pdu(sock)
            assert kind == A_ABORT and body[2:4] == b"\x02\x06"


@seam_only("the node's own reading of C-STORE requests")
def test_a_request_sent_before_the_previous_response(services: Services) -> None:
    """A first store and an echo written at once, the echo before the store's response
    (no asynchronous operations negotiated): pynetdicom reads the echo while the store
    is served; it is answered at once, not left in pynetdicom's queue while the node
    waits on the socket for the next request."""
    with association(services) as (assoc, store):
        uid, data = instance(1)
        with raw(assoc) as sock:
            sock.settimeout(5)  # well within the node's network timeout
            echo = command(C_ECHO_RQ, Verification, 52, data_set=False)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 51)),
                             pdv(CT_CONTEXT, 0x02, data))
                         + pdu(pdv(ECHO_CONTEXT, 0x03, echo)))
            answers = [read_response(sock), read_response(sock)]
            assert [(a[0x00000100], a[0x00000120], a[0x00000900]) for a in answers] == \
                [(C_STORE_RSP, 51, 0x0000), (C_ECHO_RSP, 52, 0x0000)]
        assert uid in stored(services, store)


@seam_only("the node's own reading of C-STORE requests")
def test_an_idle_association_after_stores_is_ended_at_the_network_timeout(
        make_services: Callable[..., Services]) -> None:
    """Silence after a store: the node ends the association once PACS_DIMSE_TIMEOUT
    (its network timeout) has passed without a PDU, as pynetdicom's reactor does."""
    services = make_services(store=MemoryStore(), dimse_timeout=1.0)
    with association(services) as (assoc, _):
        first_store(assoc)
        with raw(assoc) as sock:
            started = time.monotonic()
            kind, _ = read_pdu(sock)  # an A-ABORT (pynetdicom's default response)
            assert kind == A_ABORT
            assert 0.9 < time.monotonic() - started < 15


@seam_only("the node's own reading of C-STORE requests")
def test_empty_fragments_keep_what_is_held_bounded(services: Services,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A command sent as a thousand empty fragments, then its real end and a data set
    with as many empty fragments around its bytes: the bytes held for a hand-back stay
    within the command ceiling and the store is answered (within
    ``limits.FREE_FRAGMENTS``)."""
    held: list[int] = []
    original = inbound._Reader._pdu

    def watched(self: inbound._Reader, keep: bool) -> bytes | bytearray:
        held.append(len(self.taken))
        return original(self, keep)

    monkeypatch.setattr(inbound._Reader, "_pdu", watched)
    empties = limits.FREE_FRAGMENTS - 8
    with association(services) as (assoc, store):
        first_store(assoc)
        sent = dict([instance(1), instance(2)])
        (first, first_data), (uid, data) = sent.items()
        with raw(assoc) as sock:
            empty_command = pdu(pdv(CT_CONTEXT, 0x01, b""))
            sock.sendall(empty_command * empties
                         + pdu(pdv(CT_CONTEXT, 0x03, store_command(first, 61))))
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x00, b"")) * empties
                         + pdu(pdv(CT_CONTEXT, 0x02, first_data)))
            assert read_response(sock)[0x00000900] == 0x0000
            # And once more with the empty fragments inside a data set the node reads.
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 62)))
                         + pdu(pdv(CT_CONTEXT, 0x00, b"")) * empties
                         + pdu(pdv(CT_CONTEXT, 0x02, data)))
            assert read_response(sock)[0x00000900] == 0x0000
        found = stored(services, store)
        assert {key: found.get(key) for key in sent} == sent
    assert max(held) <= limits.COMMAND_CEILING + len(empty_command)


@pytest.mark.parametrize("where", ["command", "data set"])
@seam_only("the fragments are counted on the seam's paths")
def test_a_message_in_more_fragments_than_its_bytes_allow_aborts(
        services: Services, counted: list[str], where: str) -> None:
    """Each fragment costs CPU whatever it holds, and empty ones add nothing to what the
    object limit counts: a command or data set sent as fragments without content, past
    ``limits.FREE_FRAGMENTS`` and one per ``limits.FRAGMENT_BYTES``, would never end.
    The association is aborted (the seam's reader, or pynetdicom's path the command
    is handed back to), nothing stored, and the node serves the next one."""
    flood = limits.FREE_FRAGMENTS + 50
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, _ = instance(1)
        with raw(assoc) as sock:
            if where == "command":
                sock.sendall(pdu(*[pdv(CT_CONTEXT, 0x01, b"")] * flood)
                             + pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 81))))
            else:
                sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 81)))
                             + pdu(*[pdv(CT_CONTEXT, 0x00, b"")] * flood))
            kind, _ = read_pdu(sock)
            assert kind == A_ABORT
        assert uid not in stored(services, store)
        assert counted == []
    with association(services) as (assoc, store):
        assert send(assoc, 3) == 0x0000


@seam_only("pynetdicom's service classes fail on another operation")
def test_an_operation_its_context_does_not_take_is_answered_0211(
        services: Services, counted: list[str]) -> None:
    """A C-ECHO on a storage context and a C-STORE on a C-FIND context: each gets its
    own response with Unrecognized Operation (0211, PS3.7 C.5) instead of a traceback
    and an abort, and the association goes on storing."""
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, data = instance(1)
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03,
                                 command(C_ECHO_RQ, CTImageStorage, 91, data_set=False))))
            echoed = read_response(sock)
            assert (echoed[0x00000100], echoed[0x00000120], echoed[0x00000900]) == (
                C_ECHO_RSP, 91, 0x0211)
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, store_command(uid, 92)),
                             pdv(FIND_CONTEXT, 0x02, data)))
            refused = read_response(sock)
            assert (refused[0x00000100], refused[0x00000120], refused[0x00000900]) == (
                C_STORE_RSP, 92, 0x0211)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 93)),
                             pdv(CT_CONTEXT, 0x02, data)))
            assert read_response(sock)[0x00000900] == 0x0000
        assert stored(services, store)[uid] == data


@seam_only("the node's own reading of C-STORE requests")
def test_a_priority_out_of_range_aborts_as_on_the_first_message(
        services: Services, counted: list[str]) -> None:
    """PS3.7 9.3.1.1: Priority is LOW, MEDIUM or HIGH.  Out of range, pynetdicom's
    decoding of an association's first message aborts; the node's own reading of the
    next ones hands such a request to it, so that it is aborted the same (not stored)."""
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, data = instance(1)
        odd = store_command(uid, 94).replace(
            element(0x00000700, struct.pack("<H", 0)), element(0x00000700, struct.pack("<H", 99)))
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, odd), pdv(CT_CONTEXT, 0x02, data)))
            kind, _ = read_pdu(sock)
            assert kind == A_ABORT
        assert counted == [] and uid not in stored(services, store)


def test_a_fragment_that_is_a_small_part_of_its_pdu_is_copied() -> None:
    """A view of a fragment keeps its whole PDU alive: 4 KiB of data in each 256 KiB
    PDU of empty fragments would be held at 64 times what the object limit counts.
    Only a fragment that is most of its PDU is kept as a view."""
    body = bytes(256 << 10)
    data = inbound._DataSet(limit=1 << 30)
    data.add(memoryview(body)[6:4102], False, len(body))
    data.add(memoryview(body)[6:len(body)], True, len(body))
    assert [type(kept) for kept in data.fragments] == [bytearray, memoryview]
    assert data.value() == bytes(4096 + len(body) - 6)


@seam_only("the node's own reading of C-STORE requests")
def test_one_byte_fragments_are_held_as_the_bytes_they_carry(
        services: Services, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set sent one byte per fragment is stored whole, and what the node holds
    for it is a few buffers, not one per fragment (each would cost a hundred times the
    byte it holds)."""
    kept: list[int] = []
    original = inbound._DataSet.add

    def watched(self: inbound._DataSet, fragment: memoryview, last: bool,
                pdu_bytes: int) -> None:
        original(self, fragment, last, pdu_bytes)
        kept.append(len(self.fragments))

    monkeypatch.setattr(inbound._DataSet, "add", watched)
    with association(services) as (assoc, store):
        first_store(assoc)
        uid, data = instance(1)
        fragments = [pdv(CT_CONTEXT, 0x00, data[i:i + 1]) for i in range(len(data) - 1)]
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 71)))
                         + b"".join(pdu(*fragments[i:i + 500])
                                    for i in range(0, len(fragments), 500))
                         + pdu(pdv(CT_CONTEXT, 0x02, data[-1:])))
            assert read_response(sock)[0x00000900] == 0x0000
        assert counted == [uid]
        assert stored(services, store)[uid] == data
    assert len(kept) == len(data) and max(kept) == 1


@seam_only("the node's own reading of C-STORE requests")
def test_padding_the_sop_class_differently_does_not_grow_what_is_cached(
        services: Services, counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    readers: list[inbound._Reader] = []
    original = inbound._Reader._context

    def watched(self: inbound._Reader, fields: dict[int, bytes], context_id: int,
                field: int) -> tuple[str, str]:
        readers.append(self)
        return original(self, fields, context_id, field)

    monkeypatch.setattr(inbound._Reader, "_context", watched)
    with association(services) as (assoc, _):
        first_store(assoc)
        uid, data = instance(1)
        with raw(assoc) as sock:
            for number in range(20):
                padded = CTImageStorage + "\0" * (2 * number)  # a UID all the same
                message = command(C_STORE_RQ, padded, 80 + number, sop_instance=uid)
                sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, message), pdv(CT_CONTEXT, 0x02, data)))
                assert read_response(sock)[0x00000900] == 0x0000
        assert len(counted) == 20
    assert readers and all(len(reader.contexts) == 1 for reader in readers)


@seam_only("the node's own reading of C-FIND requests")
def test_find_requests_read_from_the_socket(services: Services, counted: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """C-FIND requests after a store, one with its identifier in the command's PDU, one
    with it over two PDUs: each read by the node and answered with its match and
    success (PS3.4 C.4.1.2.2), and the store after them read by the node too."""
    finds: list[int] = []
    original = inbound._Reader._find

    def recording(self: inbound._Reader, fields: dict[int, bytes], message_id: int,
                  *rest: object) -> object:
        finds.append(message_id)
        return original(self, fields, message_id, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(inbound._Reader, "_find", recording)
    with association(services) as (assoc, store):
        first_store(assoc)
        identifier = find_identifier(assoc, StudyInstanceUID=STUDY, PatientID="")
        with raw(assoc) as sock:
            find = command(C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind, 71)
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find), pdv(FIND_CONTEXT, 0x02, identifier)))
            first = read_find_answer(sock)
            find = command(C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind, 72)
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find))
                         + pdu(pdv(FIND_CONTEXT, 0x00, identifier[:10]))
                         + pdu(pdv(FIND_CONTEXT, 0x02, identifier[10:])))
            second = read_find_answer(sock)
            uid, data = instance(1)
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 73)),
                             pdv(CT_CONTEXT, 0x02, data)))
            assert read_response(sock)[0x00000900] == 0x0000
        for answer in (first, second):
            assert [status for status, _ in answer] == [0xFF00, 0x0000]
            assert STUDY.encode() in answer[0][1]
        assert finds == [71, 72]
        assert counted == [uid]
        assert assoc.send_c_echo().Status == 0x0000
        assert uid in stored(services, store)


@seam_only("the node's own reading of C-FIND requests")
def test_what_follows_an_identifier_in_its_pdu(services: Services) -> None:
    """The next message in the identifier's PDU comes before anything on the socket: a
    C-ECHO there is answered after the find, in order; a C-CANCEL of the find there
    cancels it (FE00, PS3.7 9.3.2.3)."""
    with association(services) as (assoc, _):
        first_store(assoc)
        identifier = find_identifier(assoc, StudyInstanceUID=STUDY)
        find = command(C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind, 91)
        echo = command(C_ECHO_RQ, Verification, 92, data_set=False)
        cancel = _cancel_command(93)
        with raw(assoc) as sock:
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find), pdv(FIND_CONTEXT, 0x02, identifier),
                             pdv(ECHO_CONTEXT, 0x03, echo)))
            assert [status for status, _ in read_find_answer(sock)] == [0xFF00, 0x0000]
            answer = read_response(sock)
            assert (answer[0x00000100], answer[0x00000120]) == (C_ECHO_RSP, 92)
            uid, data = instance(1)  # through pynetdicom, after which the node reads again
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 94)),
                             pdv(CT_CONTEXT, 0x02, data)))
            assert read_response(sock)[0x00000900] == 0x0000
            find = command(C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind, 93)
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find), pdv(FIND_CONTEXT, 0x02, identifier),
                             pdv(FIND_CONTEXT, 0x03, cancel)))
            assert [status for status, _ in read_find_answer(sock)] == [0xFE00]
        assert assoc.send_c_echo().Status == 0x0000


def slow_pages(services: Services, monkeypatch: pytest.MonkeyPatch, studies: int,
               pause: float) -> list[int]:
    """``studies`` studies stored, each a page of its own; after each page the query
    waits ``pause`` seconds unless cancelled meanwhile (the cancel watch reads what
    arrives on the socket then).  The sizes of the pages read, as they are read."""
    monkeypatch.setattr(engine_module, "PAGE_ROWS", 1)
    for number in range(1, studies + 1):
        services.ingest.store_bytes(make_instance(
            SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.78.{number}",
            StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.78.{number}.0"))
    pages: list[int] = []
    original = services.engine.find_pages

    def find_pages(query: object, cancelled: Callable[[], bool] = lambda: False,
                   deadline: object = None) -> Iterator[object]:
        for page in original(query, cancelled=cancelled, deadline=deadline):
            pages.append(len(page))
            yield page
            until = time.monotonic() + pause
            while not cancelled() and time.monotonic() < until:
                time.sleep(0.01)

    monkeypatch.setattr(services.engine, "find_pages", find_pages)
    return pages


@contextmanager
def find_begun(assoc: Association, message_id: int) -> Iterator[socket.socket]:
    """The peer's socket (:func:`raw`) once a C-FIND of every study sent on it has had
    its first match, sent at the end of its page."""
    identifier = find_identifier(assoc, StudyInstanceUID="")
    with raw(assoc) as sock:
        find = command(C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind, message_id)
        sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find), pdv(FIND_CONTEXT, 0x02, identifier)))
        kind, _ = read_pdu(sock)
        assert kind == P_DATA_TF
        yield sock


def _cancel_command(message_id: int) -> bytes:
    """A C-CANCEL-RQ command set (PS3.7 9.3.2.3)."""
    body = element(0x00000100, struct.pack("<H", 0x0FFF)) + element(
        0x00000120, struct.pack("<H", message_id)) + element(0x00000800,
                                                             struct.pack("<H", 0x0101))
    return element(0x00000000, struct.pack("<I", len(body))) + body


@seam_only("the node's own reading of C-FIND requests")
def test_a_request_read_while_a_find_is_answered_is_kept(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-ECHO-RQ and a C-CANCEL-RQ of the find in one PDU, sent while the find is
    answered: the watch takes no part of it as a cancel; the find ends with success,
    then the echo is answered (the late cancel ignored), nothing lost."""
    slow_pages(services, monkeypatch, studies=2, pause=0.5)
    with association(services) as (assoc, _):
        first_store(assoc)
        with find_begun(assoc, 95) as sock:
            echo = command(C_ECHO_RQ, Verification, 96, data_set=False)
            sock.sendall(pdu(pdv(ECHO_CONTEXT, 0x03, echo),
                             pdv(FIND_CONTEXT, 0x03, _cancel_command(95))))
            statuses = [status for status, _ in read_find_answer(sock)]
            answer = read_response(sock)
            assert (answer[0x00000100], answer[0x00000120], answer[0x00000900]) == \
                (C_ECHO_RSP, 96, 0x0000)
        assert statuses[-1] == 0x0000, statuses  # the rest of the matches, then success
        assert assoc.send_c_echo().Status == 0x0000


@seam_only("the node's own reading of C-FIND requests")
def test_an_abort_during_a_find_ends_it(services: Services,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An A-ABORT that arrives while a C-FIND is answered (read with the socket's
    C-CANCEL watch) stops the answer: no page is read after it, and the node serves the
    next association."""
    pages = slow_pages(services, monkeypatch, studies=3, pause=2)
    with association(services) as (assoc, _):
        first_store(assoc)
        with find_begun(assoc, 81) as sock:
            sock.sendall(struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0, 0))
            sock.settimeout(10)
            try:
                while sock.recv(1 << 16):  # until the node closes the connection
                    pass
            except OSError:
                pass
        assert pages == [1], pages  # the page answered when the abort arrived, no more
    with association(services) as (assoc, _):
        assert assoc.send_c_echo().Status == 0x0000


@seam_only("the node's own reading of C-FIND requests")
def test_a_pdu_begun_while_a_find_is_answered_does_not_hold_the_answer(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first bytes of a PDU's header, then nothing, while a C-FIND is answered: the
    watch, inside the query's read transaction, takes them without waiting for the
    rest (it waited the DIMSE timeout there, holding the index's snapshot, then
    aborted); the find ends with success, and the PDU, finished after the answer, is
    the C-ECHO it began (its first bytes handed to pynetdicom)."""
    slow_pages(services, monkeypatch, studies=2, pause=0.3)
    with association(services) as (assoc, _):
        first_store(assoc)
        with find_begun(assoc, 71) as sock:
            sock.settimeout(2 * services.settings.dimse_timeout)
            echo = pdu(pdv(ECHO_CONTEXT, 0x03, command(C_ECHO_RQ, Verification, 72,
                                                       data_set=False)))
            sock.sendall(echo[:3])
            statuses = [status for status, _ in read_find_answer(sock)]
            sock.sendall(echo[3:])
            answer = read_response(sock)
        assert statuses[-1] == 0x0000, statuses
        assert (answer[0x00000100], answer[0x00000120], answer[0x00000900]) == \
            (C_ECHO_RSP, 72, 0x0000)
        assert assoc.send_c_echo().Status == 0x0000


@seam_only("the node's own reading of C-FIND requests")
def test_a_find_of_another_model_than_its_context_is_refused(services: Services) -> None:
    """A Patient Root C-FIND-RQ sent on the Study Root context: 0122, the context's
    SOP Class taken from the negotiation (not answered in the Patient Root model)."""
    with association(services) as (assoc, _):
        first_store(assoc)
        identifier = find_identifier(assoc, StudyInstanceUID="")
        with raw(assoc) as sock:
            find = command(C_FIND_RQ, "1.2.840.10008.5.1.4.1.2.1.1", 61)
            sock.sendall(pdu(pdv(FIND_CONTEXT, 0x03, find), pdv(FIND_CONTEXT, 0x02, identifier)))
            assert [status for status, _ in read_find_answer(sock)] == [0x0122]
        assert assoc.send_c_echo().Status == 0x0000


@seam_only("the node's own reading of C-STORE requests")
def test_data_sets_arriving_at_once_share_the_worker_s_receive_budget(
        make_services: Callable[..., Services]) -> None:
    """``PACS_DIMSE_RECEIVE_BYTES``: while one association's data set holds most of the
    worker's budget, another's that would pass it is dropped as it arrives and answered
    A700 (each peer made the worker hold its objects whole, whatever the others held);
    once the first is stored its bytes are given back, and the second goes through."""
    size = len(instance(1)[1])
    services = make_services(store=MemoryStore(), dimse_receive_bytes=size * 3 // 2)
    port = free_port()
    running = server.start(services, ("127.0.0.1", port))
    try:
        ae = AE(ae_title="INBOUND")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        first, second = (ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
                         for _ in range(2))
        for number, assoc in enumerate((first, second), start=10):
            first_store(assoc, number)
        uid, data = instance(1)
        other, other_data = instance(2)
        with raw(first) as held, raw(second) as refused:
            held.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 5)),
                             pdv(CT_CONTEXT, 0x00, data[:-100])))
            time.sleep(0.2)  # read by the node (the order of the two is what is tested)
            refused.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(other, 6)),
                                pdv(CT_CONTEXT, 0x02, other_data)))
            assert read_response(refused)[0x00000900] == 0xA700
            held.sendall(pdu(pdv(CT_CONTEXT, 0x02, data[-100:])))
            assert read_response(held)[0x00000900] == 0x0000
            refused.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(other, 7)),
                                pdv(CT_CONTEXT, 0x02, other_data)))
            assert read_response(refused)[0x00000900] == 0x0000
        for assoc in (first, second):
            assoc.release()
        assert {uid, other} <= set(stored(services, services.store.backend))  # type: ignore[arg-type]
    finally:
        server.stop(running, drain=1.0)


def _budget_peer() -> AE:
    ae = AE(ae_title="INBOUND")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(PUSH_MODEL)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


@seam_only("the node's own reading of C-STORE requests")
def test_a_storage_commitment_request_takes_none_of_the_receive_budget(
        make_services: Callable[..., Services]) -> None:
    """An N-ACTION while C-STOREs hold the whole budget: answered (its Action
    Information, dropped for want of budget, read as none: 0115, a failure of the
    peer's)."""
    uid, data = instance(1)
    services = make_services(store=MemoryStore(), dimse_receive_bytes=len(data))
    port = free_port()
    running = server.start(services, ("127.0.0.1", port))
    try:
        ae = _budget_peer()
        holder, asker = (ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
                         for _ in range(2))
        first_store(holder, 10)
        first_store(asker, 11)
        with raw(holder) as held:
            held.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 5)),
                             pdv(CT_CONTEXT, 0x00, data[:-20])))
            time.sleep(0.2)  # read by the node first (the order is what is tested)
            action, item = Dataset(), Dataset()
            action.TransactionUID = generate_uid()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = instance(11)[0]
            action.ReferencedSOPSequence = [item]
            status, _ = asker.send_n_action(action, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
            held.sendall(pdu(pdv(CT_CONTEXT, 0x02, data[-20:])))
            assert read_response(held)[0x00000900] == 0x0000
        for assoc in (holder, asker):
            assoc.release()
        assert status is not None and status.Status == 0x0000
    finally:
        server.stop(running, drain=1.0)


@seam_only("the seam's bounded reading of pynetdicom's messages")
def test_an_association_that_ends_inside_a_data_set_gives_its_budget_back(
        make_services: Callable[..., Services]) -> None:
    """A peer that leaves in the middle of its first C-STORE (pynetdicom's path): the
    data set's budget is given back when the association ends (it waited for Python's
    cycle collector, and other peers' stores were refused A700 meanwhile)."""
    uid, data = instance(1)
    services = make_services(store=MemoryStore(), dimse_receive_bytes=len(data) * 3 // 2)
    port = free_port()
    running = server.start(services, ("127.0.0.1", port))
    gc.disable()  # the release must not wait for the collector
    try:
        ae = _budget_peer()
        leaving = ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
        with raw(leaving) as sock:
            sock.sendall(pdu(pdv(CT_CONTEXT, 0x03, store_command(uid, 5)),
                             pdv(CT_CONTEXT, 0x00, data[:-20])))
            time.sleep(0.2)
            sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while running.limits.receiving.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.limits.receiving.held == 0
        other = ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
        assert send(other, 2) == 0x0000
        other.release()
    finally:
        gc.enable()
        server.stop(running, drain=1.0)
