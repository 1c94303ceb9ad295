"""The DIMSE logic as plain functions: C-FIND responses, C-STORE, C-MOVE / C-GET
sub-operations over fake requestors and targets, statuses.  No pynetdicom association
or service class: what the seam and pynetdicom's event handlers both run."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom.dsutils import decode, encode

from pacs.core import access, config, errors
from pacs.core.attributes import Level
from pacs.core.index import reads
from pacs.core.query.model import Query
from pacs.core.services import Services, drain
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import find, retrieve, seam, status, storage
from pacs.dimse.connection import AcceptedContext, Request, SubOperationCounts
from pacs.dimse.identifier import raw_value, read_data_set
from pacs.dimse.status import Status
from tests.factory import make_instance, multi_frame_jpeg, uid_list_of_length

pytestmark = pytest.mark.dimse

ROOT = Path(__file__).resolve().parents[2]
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def _identifier(level: str, **keys: object) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return encode(ds, True, True) or b""


def _request(model: str, identifier: bytes, **changes: Any) -> Request:
    changes.setdefault("calling_ae_title", "SCU")
    return Request(message_id=7, sop_class_uid=model, transfer_syntax=ImplicitVRLittleEndian,
                   identifier=identifier, **changes)


@pytest.fixture
def services(make_services: Callable[..., Services], memory_store: MemoryStore) -> Services:
    """Services whose retrieves send a pending response after every sub-operation
    (``PACS_PENDING_INTERVAL`` 0): the fakes here count responses."""
    return make_services(memory_store, pending_interval=0.0)


def _load(services: Services, studies: int = 2, per_study: int = 2) -> list[bytes]:
    stored = []
    for n in range(studies):
        for i in range(per_study):
            data = make_instance(StudyInstanceUID=f"1.2.7.{n}", SeriesInstanceUID=f"1.2.7.{n}.1",
                                 SOPInstanceUID=f"1.2.7.{n}.1.{i}", PatientID=f"P{n}")
            services.ingest.store_bytes(data)
            stored.append(data)
    return stored


# --- statuses ---------------------------------------------------------------------------

def test_every_status_the_node_sends_is_in_the_table() -> None:
    constants = [value for value in vars(status).values() if isinstance(value, Status)]
    constants += [found for table in (status.STORE_STATUS, status.FIND_STATUS,
                                      status.RETRIEVE_STATUS) for _, found in table]
    assert constants
    for found in constants:
        meaning, where = status.CODES[found.code]
        assert meaning and where.startswith(("PS3.4", "PS3.7")), hex(found.code)


def test_status_for_names_the_reason_within_64_characters() -> None:
    found = status.status_for(status.STORE_STATUS, errors.UIDMismatch("x" * 100))
    assert found.code == 0xA900 and found.comment == "x" * 64
    assert status.status_for(status.FIND_STATUS, RuntimeError()).code == 0xC000
    assert status.status_for(status.STORE_STATUS, RuntimeError()).comment == "RuntimeError"
    assert status.PENDING.is_pending and not status.SUCCESS.is_pending


# --- C-FIND -------------------------------------------------------------------------------

def _responses(services: Services, identifier: bytes, cancelled: bool = False
               ) -> list[tuple[Status, bytes | None]]:
    return list(find.find_responses(_request(STUDY_FIND, identifier), services,
                                    lambda: cancelled))


def test_find_yields_a_pending_response_per_match_then_success(services: Services) -> None:
    _load(services)
    responses = _responses(services, _identifier("STUDY", StudyInstanceUID="",
                                                 PatientID=""))
    assert [s.code for s, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    answers = [decode(io.BytesIO(ident), True, True) for _, ident in responses[:-1]
               if ident is not None]
    assert sorted(a.StudyInstanceUID for a in answers) == ["1.2.7.0", "1.2.7.1"]
    assert {a.RetrieveAETitle for a in answers} == {services.settings.ae_title}


def test_find_answers_a_bad_identifier_a900_with_a_reason(services: Services) -> None:
    responses = _responses(services, _identifier("NOTALEVEL"))
    assert [(s.code, ident) for s, ident in responses] == [(0xA900, None)]
    assert responses[0][0].comment
    assert [s.code for s, _ in _responses(services, b"\x08\x00\x52")] == [0xA900]


def test_find_answers_a_cancel_fe00(services: Services) -> None:
    _load(services)
    responses = _responses(services, _identifier("STUDY", StudyInstanceUID=""),
                           cancelled=True)
    assert [s.code for s, _ in responses] == [0xFE00]


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, written by hand (PS3.5 7.1.2): the VR
    the test names, whatever the data dictionary says."""
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    if vr in (b"SQ", b"UN"):
        return head + vr + b"\0\0" + len(value).to_bytes(4, "little") + value
    return head + vr + len(value).to_bytes(2, "little") + value


def test_identifier_un_values_of_known_attributes_are_read_as_their_vr() -> None:
    """PS3.5 6.2.2: a known attribute sent as UN (its value as in Implicit VR Little
    Endian), however long, reads as its dictionary VR, with the identifier's character
    set; in sequence items too.  An unknown attribute's UN value stays bytes, and is
    never taken for text."""
    uids = uid_list_of_length(["1.2.3"], 70_000)  # over what a 16-bit length holds
    listed = "\\".join(uids).encode()
    name = "Müller^Jörg".encode()
    item = _explicit(0x00080100, b"UN", b"X" * 70_000)  # CodeValue of a sequence item
    data = b"".join([
        _explicit(0x00080005, b"CS", b"ISO_IR 192"),
        _explicit(0x00080018, b"UN", listed),
        _explicit(0x00080052, b"CS", b"IMAGE "),
        _explicit(0x00081032, b"SQ", b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little")
                  + item),
        _explicit(0x00100010, b"UN", name),
        _explicit(0x00280010, b"UN", (512).to_bytes(2, "little")),  # Rows, US
        _explicit(0x00991000, b"UN", b"\x01\x02"),                  # private
    ])

    read = read_data_set(data, ExplicitVRLittleEndian)

    assert (read[0x00080018].VR, list(read.SOPInstanceUID)) == ("UI", uids)
    assert raw_value(read[0x00080018]) == "\\".join(uids)
    assert (read[0x00100010].VR, str(read.PatientName)) == ("PN", "Müller^Jörg")
    assert (read[0x00280010].VR, read.Rows) == ("US", 512)
    code = read.ProcedureCodeSequence[0][0x00080100]
    assert (code.VR, code.value) == ("SH", "X" * 70_000)
    assert (read[0x00991000].VR, read[0x00991000].value) == ("UN", b"\x01\x02")
    with pytest.raises(errors.InvalidQuery):
        raw_value(read[0x00991000])


def test_identifier_is_read_in_its_syntax_whatever_its_bytes_look_like() -> None:
    """An Implicit VR identifier whose first element's length (0x5344) has the bytes
    of a VR ("DS") is read as Implicit VR: its syntax says so."""
    ds = Dataset()
    ds.SOPInstanceUID = uid_list_of_length(["1.2.3"], 0x5344)
    ds.QueryRetrieveLevel = "IMAGE"
    data = encode(ds, True, True) or b""
    assert data[4:8] == b"DS\0\0"

    read = read_data_set(data, ImplicitVRLittleEndian)

    assert list(read.keys()) == [0x00080018, 0x00080052]
    assert list(read.SOPInstanceUID) == list(ds.SOPInstanceUID)
    assert read.QueryRetrieveLevel == "IMAGE"


@dataclass
class _Responder:
    """Records the responses; goes away after ``lives`` of them."""

    lives: int = 1000
    cancel_after: int | None = None
    sent: list[tuple[Status, bytes | None, SubOperationCounts | None]] = field(
        default_factory=list)

    @property
    def alive(self) -> bool:
        return len(self.sent) < self.lives

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def send_response(self, status: Status, identifier: bytes | None = None,
                      counts: SubOperationCounts | None = None) -> None:
        self.sent.append((status, identifier, counts))


def test_serve_find_stops_when_the_requestor_is_gone(services: Services) -> None:
    _load(services)
    responder = _Responder(lives=1)
    find.serve_find(responder, _request(STUDY_FIND, _identifier(
        "IMAGE", StudyInstanceUID="", SOPInstanceUID="")), services)
    assert [s.code for s, _, _ in responder.sent] == [0xFF00]


# --- C-STORE ------------------------------------------------------------------------------

def _store_request(data: bytes, **changes: Any) -> storage.StoreRequest:
    header = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, meta group
    fields = {"sop_class_uid": CTImageStorage, "sop_instance_uid": "1.2.8.1",
              "transfer_syntax": ExplicitVRLittleEndian, "abstract_syntax": CTImageStorage,
              "calling_ae_title": "SCU",
              "data_set": data[header:], "received": len(data) - header, "limit": 1 << 20}
    fields.update(changes)
    return storage.StoreRequest(**fields)


def _instances(services: Services) -> int:
    return services.engine.count(Query(level=Level.IMAGE))


def test_store_answers_success_once_stored(services: Services) -> None:
    data = make_instance(SOPInstanceUID="1.2.8.1")
    assert storage.store(services, _store_request(data)) == status.SUCCESS
    assert _instances(services) == 1


@pytest.mark.parametrize("changes, code", [
    ({"received": (1 << 20) + 1}, 0xA700),            # over the object limit, not kept
    ({"sop_instance_uid": "1.2.8.2"}, 0xA900),        # command and data set disagree
    ({"sop_instance_uid": "1.2.x"}, 0x0117),          # not a UID
    ({"data_set": b"\x08\x00\x16\x00"}, 0xC000),      # truncated
    ({"abstract_syntax": MRImageStorage}, 0x0122),    # on another SOP Class's context
])
def test_store_refusals(services: Services, changes: dict[str, Any], code: int) -> None:
    data = make_instance(SOPInstanceUID="1.2.8.1" if code != 0x0117 else "1.2.x")
    found = storage.store(services, _store_request(data, **changes))
    assert found.code == code and found.comment
    assert _instances(services) == 0


@pytest.mark.parametrize("meta, syntax", [
    (b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.2\x00", ExplicitVRLittleEndian),
    (b"\x02\x00\x03\x00UI\x08\x001.2.8.9\x00", ExplicitVRLittleEndian),
    (b"\x00\x02\x00\x10UI\x00\x121.2.840.10008.1.2\x00", ExplicitVRBigEndian),
])
def test_a_data_set_holding_file_meta_elements_is_refused(
        services: Services, meta: bytes, syntax: str) -> None:
    """PS3.5 7.1 (PS3.4 C.4.1.1.3, note): no group 0002 element is part of a data
    set.  Stored after the node's file meta, one would be read as more of it: another
    Transfer Syntax UID or SOP Instance UID than the data set's (C000, nothing kept)."""
    data = make_instance(SOPInstanceUID="1.2.8.1")
    request = _store_request(data)
    request = replace(request, data_set=meta + request.data_set,
                                  transfer_syntax=syntax,
                                  received=request.received + len(meta))
    found = storage.store(services, request)
    assert found.code == 0xC000 and "group 0002" in found.comment
    assert _instances(services) == 0


def test_a_store_out_of_memory_is_one_line_without_a_traceback(
        services: Services, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(services.ingest, "store_bytes", exhausted)
    with caplog.at_level(logging.DEBUG, logger="pacs.dimse.storage"):
        found = storage.store(services, _store_request(make_instance(
            SOPInstanceUID="1.2.8.1")))
    assert found.code == 0xA700
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [(r.levelno, r.exc_info, r.exc_text) for r in shown] == [
        (logging.ERROR, None, None)]
    assert "MemoryError" in shown[0].getMessage()
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


# --- C-MOVE / C-GET -----------------------------------------------------------------------

@dataclass
class _Target:
    """A peer that takes C-STOREs in Explicit VR Little Endian: records the data sets;
    answers each with the next of ``statuses`` (0000 when they run out)."""

    statuses: list[int | None] = field(default_factory=list)
    syntax: str = ExplicitVRLittleEndian
    received: list[tuple[int, bytes]] = field(default_factory=list)
    released: bool = False
    alive: bool = True

    def accepted_contexts(self) -> list[AcceptedContext]:
        return [AcceptedContext(3, CTImageStorage, self.syntax)]

    def request_command(self, sop_class_uid: str, sop_instance_uid: str,
                        message_id: int) -> bytes:
        return f"{sop_instance_uid}#{message_id}".encode()

    def sending(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def send_c_store(self, message_id: int, context_id: int, command: bytes,
                     source: BinaryIO, length: int) -> bool:
        assert context_id == 3 and command.endswith(f"#{message_id}".encode())
        self.received.append((message_id, source.read(length)))
        return True

    def store_status(self) -> int | None:
        return self.statuses.pop(0) if self.statuses else 0x0000

    def release(self) -> None:
        self.released = True


def test_a_retrieve_shorter_than_the_pending_interval_has_no_pending_response(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    """Pending responses are optional (PS3.4 C.4.3.3.1): a retrieve that ends within
    PACS_PENDING_INTERVAL (here an hour) has its final response only, with the counts."""
    services = make_services(memory_store, pending_interval=3600.0)
    _load(services, studies=1, per_study=3)
    responder, target = _Responder(), _Target()
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    assert len(target.received) == 3
    [(final, identifier, counts)] = responder.sent
    assert (final.code, identifier, counts) == (0x0000, None, SubOperationCounts(None, 3, 0, 0))


def test_pacing_sends_a_pending_response_once_the_interval_has_passed() -> None:
    now = [100.0]
    pacing = retrieve.Pacing(1.0, clock=lambda: now[0])
    due = []
    for step in (0.4, 0.4, 0.4, 0.5, 0.5, 1.0):  # 100.4 ... 103.2
        now[0] += step
        due.append(pacing.due())
    assert due == [False, False, True, False, True, True]
    assert all(retrieve.Pacing(0.0, clock=lambda: 0.0).due() for _ in range(3))


def _get(services: Services, responder: _Responder, target: _Target, **keys: object
         ) -> None:
    retrieve.serve_get(responder, _request(STUDY_GET, _identifier("STUDY", **keys)),
                       services, {STUDY_GET: "study"}, target)


def test_get_sends_every_instance_as_stored_with_counts(services: Services) -> None:
    stored = _load(services, studies=1, per_study=3)
    responder, target = _Responder(), _Target()
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    assert sorted(data for _, data in target.received) == sorted(
        data[data.index(b"\x08\x00\x05\x00"):] for data in stored)  # the data set part
    assert [message_id for message_id, _ in target.received] == [1, 2, 3]
    *pending, (final, identifier, counts) = responder.sent
    assert [(s.code, c.remaining, c.completed) for s, _, c in pending] == [
        (0xFF00, 2, 1), (0xFF00, 1, 2)]
    assert (final.code, identifier, counts) == (0x0000, None, SubOperationCounts(None, 3, 0, 0))


def test_a_retrieve_stops_asking_a_store_that_failed_but_sends_the_intake_s(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that times out (S3 stalled) would cost one read timeout per instance of
    a study: after its first failure, the retrieve's other objects in the store fail
    at once, counted and listed; those still in the intake go."""
    services = make_services(memory_store, intake_mover="off")
    _load(services, studies=1, per_study=3)
    assert drain(services) == 3  # in the store
    again = make_instance(StudyInstanceUID="1.2.7.0", SeriesInstanceUID="1.2.7.0.1",
                          SOPInstanceUID="1.2.7.0.1.9", PatientID="P0")
    services.ingest.store_bytes(again)  # in the intake
    asked: list[str] = []

    def stalled(key: str) -> BinaryIO:
        asked.append(key)
        raise errors.StoreUnavailable("S3 read failed: timed out")

    monkeypatch.setattr(memory_store, "open", stalled)
    responder, target = _Responder(), _Target()
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    assert len(asked) == 1  # asked once, not once per instance
    assert [data for _, data in target.received] == [again[again.index(b"\x08\x00\x05\x00"):]]
    final, _, counts = responder.sent[-1]
    assert (final.code, counts.completed, counts.failed) == (0xB000, 1, 3)


def test_one_object_that_does_not_read_fails_alone(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that answers, but fails one object (a damaged file, an object changed
    while read): that sub-operation fails, the others are read and sent."""
    services = make_services(memory_store, intake_mover="off")
    _load(services, studies=1, per_study=3)
    assert drain(services) == 3
    reading = memory_store.open
    damaged = sorted(memory_store.objects)[0]

    def one_damaged(key: str) -> BinaryIO:
        if key == damaged:
            raise errors.StorageError("cannot read object: EIO")
        return reading(key)

    monkeypatch.setattr(memory_store, "open", one_damaged)
    responder, target = _Responder(), _Target()
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    final, _, counts = responder.sent[-1]
    assert (final.code, counts.completed, counts.failed) == (0xB000, 2, 1)


def test_get_with_a_failure_gives_b000_and_the_failed_uid(services: Services) -> None:
    _load(services, studies=1, per_study=3)
    responder = _Responder()
    _get(services, responder, _Target(statuses=[0x0000, 0xA700, 0xB007]),
         StudyInstanceUID="1.2.7.0")
    final, identifier, counts = responder.sent[-1]
    assert final.code == 0xB000 and counts == SubOperationCounts(None, 1, 1, 1)
    failed = decode(io.BytesIO(identifier or b""), True, True).FailedSOPInstanceUIDList
    assert failed == "1.2.7.0.1.1"


def test_get_cancelled_after_the_first_gives_fe00_with_remaining(services: Services) -> None:
    _load(services, studies=1, per_study=3)
    responder = _Responder(cancel_after=1)
    _get(services, responder, _Target(), StudyInstanceUID="1.2.7.0")
    final, _, counts = responder.sent[-1]
    assert final.code == 0xFE00 and counts == SubOperationCounts(2, 1, 0, 0)


@pytest.mark.parametrize("keys, code, counts", [
    ({"StudyInstanceUID": "9.9.9"}, 0x0000, SubOperationCounts(None, 0, 0, 0)),  # none
    ({"StudyInstanceUID": ""}, 0xA900, None),  # no unique key at the level
])
def test_get_refusals(services: Services, keys: dict[str, str], code: int,
                      counts: SubOperationCounts | None) -> None:
    _load(services)
    responder, target = _Responder(), _Target()
    _get(services, responder, target, **keys)
    assert [(s.code, c) for s, _, c in responder.sent] == [(code, counts)]
    assert target.received == []


def test_get_converts_for_a_peer_without_the_stored_syntax(services: Services) -> None:
    _load(services, studies=1, per_study=1)
    responder, target = _Responder(), _Target(syntax=ImplicitVRLittleEndian)
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    assert responder.sent[-1][0].code == 0x0000
    (_, data), = target.received
    assert decode(io.BytesIO(data), True, True).SOPInstanceUID == "1.2.7.0.1.0"


def test_a_conversion_over_the_object_limit_fails_its_sub_operation_only(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    """A 16-frame JPEG (4 MiB decoded) for a peer that takes Explicit VR Little Endian
    only, under a 1 MiB PACS_MAX_OBJECT_BYTES: refused by its declared size before
    anything is decoded, counted failed and listed (PS3.4 C.4.3.1.3.1); the other
    instance of the study is converted and sent."""
    services = make_services(memory_store, pending_interval=3600.0,
                             max_object_bytes=1 << 20)
    large = pydicom.dcmread(io.BytesIO(multi_frame_jpeg(16)))
    small = pydicom.dcmread(io.BytesIO(multi_frame_jpeg(1)))
    for ds, sop in ((large, "1.2.7.0.1.0"), (small, "1.2.7.0.1.1")):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.7.0", "1.2.7.0.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientID = "P0"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        services.ingest.store_bytes(out.getvalue())
    responder, target = _Responder(), _Target()
    _get(services, responder, target, StudyInstanceUID="1.2.7.0")
    final, identifier, counts = responder.sent[-1]
    assert final.code == 0xB000 and counts == SubOperationCounts(None, 1, 1, 0)
    failed = decode(io.BytesIO(identifier or b""), True, True).FailedSOPInstanceUIDList
    assert failed == "1.2.7.0.1.0"
    (_, data), = target.received
    assert decode(io.BytesIO(data), False, True).SOPInstanceUID == "1.2.7.0.1.1"


def _move(services: Services, responder: _Responder, destination: str,
          connect: retrieve.Connect) -> None:
    retrieve.serve_move(responder, _request(STUDY_MOVE, _identifier(
        "STUDY", StudyInstanceUID="1.2.7.0"), move_destination=destination), services,
        {STUDY_MOVE: "study"}, connect)


@pytest.fixture
def with_destination(make_services: Any) -> Services:
    services: Services = make_services(destinations=config.parse_modalities(
        "DEST=127.0.0.1:104"))
    _load(services)
    return services


def test_move_to_an_unknown_destination_is_a801(with_destination: Services) -> None:
    responder = _Responder()
    _move(with_destination, responder, "NOBODY", lambda *args: pytest.fail("connected"))
    assert [s.code for s, _, _ in responder.sent] == [0xA801]


def test_every_final_response_but_success_lists_the_failed_uids_even_none(
        services: Services, with_destination: Services) -> None:
    """PS3.4 C.4.2.1.4.2, C.4.3.1.3.2: a Cancel, Failure, Refused or Warning response
    contains the Failed SOP Instance UID List, zero-length when none failed; a
    Success response has no identifier."""
    _load(services, studies=1, per_study=3)
    finals: dict[str, tuple[Status, bytes | None]] = {}
    for name, responder, target, keys in (
            ("warnings", _Responder(), _Target(statuses=[0xB007, 0x0001, 0xB000]),
             {"StudyInstanceUID": "1.2.7.0"}),
            ("cancel", _Responder(cancel_after=1), _Target(), {"StudyInstanceUID": "1.2.7.0"}),
            ("refused", _Responder(), _Target(), {"StudyInstanceUID": ""}),
            ("success", _Responder(), _Target(), {"StudyInstanceUID": "1.2.7.0"})):
        _get(services, responder, target, **keys)
        finals[name] = responder.sent[-1][:2]
    unknown = _Responder()
    _move(with_destination, unknown, "NOBODY", lambda *args: pytest.fail("connected"))
    finals["unknown destination"] = unknown.sent[-1][:2]
    assert {name: (status.code, _failed_list(identifier, ImplicitVRLittleEndian)
                   if status.code else identifier)
            for name, (status, identifier) in finals.items()} == {
        "warnings": (0xB000, []), "cancel": (0xFE00, []), "refused": (0xA900, []),
        "success": (0x0000, None), "unknown destination": (0xA801, [])}


def test_move_connects_with_the_requestor_as_originator(with_destination: Services) -> None:
    connected: list[Any] = []
    target = _Target()

    def connect(destination: config.Modality, classes: Any,
                originator: tuple[str, int]) -> _Target:
        connected.append((destination.ae_title, dict(classes), originator))
        return target

    responder = _Responder()
    _move(with_destination, responder, "DEST", connect)
    assert connected == [("DEST", {CTImageStorage: {ExplicitVRLittleEndian}}, ("SCU", 7))]
    assert len(target.received) == 2 and target.released
    assert responder.sent[-1][0].code == 0x0000


def _failed_list(identifier: bytes | None, syntax: str) -> list[str]:
    """The Failed SOP Instance UID List of a response identifier."""
    assert identifier is not None, "no identifier"
    value = read_data_set(identifier, syntax).FailedSOPInstanceUIDList
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def test_move_to_a_refusing_destination_is_a702(with_destination: Services) -> None:
    # Every instance was not sent: each is named (PS3.4 C.4.2.1.4.2).
    responder = _Responder()
    _move(with_destination, responder, "DEST", lambda *args: None)
    assert [(s.code, c) for s, _, c in responder.sent] == [
        (0xA702, SubOperationCounts(None, 0, 2, 0))]
    assert _failed_list(responder.sent[0][1], ImplicitVRLittleEndian) == [
        "1.2.7.0.1.0", "1.2.7.0.1.1"]


@dataclass
class _BrokenTarget(_Target):
    """A peer whose second C-STORE cannot be written: the store fails under it."""

    def send_c_store(self, message_id: int, context_id: int, command: bytes,
                     source: BinaryIO, length: int) -> bool:
        if self.received:
            raise errors.StorageError("the store failed")
        return super().send_c_store(message_id, context_id, command, source, length)


def test_an_error_ending_the_sub_operations_names_every_instance_not_sent(
        with_destination: Services) -> None:
    responder, target = _Responder(), _BrokenTarget()
    _move(with_destination, responder, "DEST", lambda *args: target)
    (final, identifier, counts), = responder.sent
    assert final.code >> 12 in (0xA, 0xC) and counts == SubOperationCounts(None, 1, 1, 0)
    assert _failed_list(identifier, ImplicitVRLittleEndian) == ["1.2.7.0.1.1"]
    assert target.released


@pytest.fixture
def networked(make_services: Any) -> Services:
    """The access file's WORKSTATION: known on a network, with a port."""
    services: Services = make_services()
    services.access = access.AccessPolicy(aes={
        "WS": access.KnownAE("WS", access.AE_RIGHTS, "10.10.2.0/24", 11112),
        "SCU": access.KnownAE("SCU", access.AE_RIGHTS)})
    _load(services)
    return services


def test_a_destination_known_on_a_network_is_reached_at_its_own_address(
        networked: Services) -> None:
    # A network is no address to connect to: the AE that moves to itself is reached where
    # it calls from (inside its network, or its association was refused); anyone else
    # naming it gets A801, as for a destination without an address.
    connected: list[tuple[str, str, int]] = []

    def connect(destination: config.Modality, *_: Any) -> _Target:
        connected.append((destination.ae_title, destination.host, destination.port))
        return _Target()

    identifier = _identifier("STUDY", StudyInstanceUID="1.2.7.0")
    own = _Responder()
    retrieve.serve_move(own, _request(STUDY_MOVE, identifier, move_destination="WS",
                                      calling_ae_title="WS", calling_address="10.10.2.7"),
                        networked, {STUDY_MOVE: "study"}, connect)
    assert connected == [("WS", "10.10.2.7", 11112)]
    assert own.sent[-1][0].code == 0x0000
    other = _Responder()
    retrieve.serve_move(other, _request(STUDY_MOVE, identifier, move_destination="WS",
                                        calling_address="10.10.9.9"),
                        networked, {STUDY_MOVE: "study"}, connect)
    assert [s.code for s, _, _ in other.sent] == [0xA801]
    assert len(connected) == 1


def test_classify_and_message_ids() -> None:
    assert retrieve.classify(0x0111) is retrieve.Outcome.WARNING
    assert retrieve.classify(None) is retrieve.Outcome.FAILED
    assert [retrieve.message_id(n) for n in (0, 1, 0xFFFE, 0xFFFF)] == [1, 2, 0xFFFF, 1]



# --- the seam's version gate --------------------------------------------------------------

def test_another_pynetdicom_version_runs_pure_pynetdicom(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Any version but the tested ones: nothing replaced, one WARNING however many nodes
    start."""
    monkeypatch.setattr(seam, "_patched", False)
    monkeypatch.setattr(seam, "_refused_version", None)
    monkeypatch.setattr(seam.pynetdicom, "__version__", "3.1.0")
    monkeypatch.setattr(seam.reactor, "patch", lambda: pytest.fail("the reactor was patched"))
    monkeypatch.setattr(seam.services, "patch", lambda: pytest.fail("services were patched"))
    with caplog.at_level(logging.WARNING, logger="pacs.dimse.seam"):
        assert seam.install(True) is False
        assert seam.install(True) is False
        assert seam.install(False) is False
    warnings = [r for r in caplog.records if "3.1.0" in r.getMessage()]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "pure pynetdicom" in warnings[0].getMessage()


def test_the_seam_is_written_for_the_pinned_pynetdicom() -> None:
    """setup.cfg pins exactly the versions the seam supports, and that one is installed."""
    pins = re.findall(r"^\s*pynetdicom==([\w.]+)\s*$", (ROOT / "setup.cfg").read_text(),
                      re.MULTILINE)
    assert tuple(pins) == seam.SUPPORTED_VERSIONS
    assert seam.supported() and not seam.supported("3.0.5")


# --- rights (pacs.core.access) ------------------------------------------------------------

@pytest.fixture
def rights(make_services: Any) -> Services:
    """SCU may only echo and store (no overwrite, find or retrieve); the destination
    is known with its address in the access policy alone."""
    services: Services = make_services()
    services.access = access.AccessPolicy(aes={
        "SCU": access.KnownAE("SCU", frozenset({"echo", "store"})),
        "DEST": access.KnownAE("DEST", frozenset(), "127.0.0.1", 104)})
    _load(services, studies=1, per_study=1)
    return services


def test_each_operation_without_its_right_is_0124_and_touches_nothing(
        rights: Services) -> None:
    responses = _responses(rights, _identifier("STUDY", StudyInstanceUID=""))
    assert [(s.code, ident) for s, ident in responses] == [(0x0124, None)]
    responder, target = _Responder(), _Target()
    _get(rights, responder, target, StudyInstanceUID="1.2.7.0")
    assert [(s.code, c) for s, _, c in responder.sent] == [(0x0124, None)]
    assert target.received == []
    responder = _Responder()
    _move(rights, responder, "DEST", lambda *args: pytest.fail("connected"))
    assert [s.code for s, _, _ in responder.sent] == [0x0124]


def test_store_needs_store_and_overwrite_rights(rights: Services) -> None:
    uids = {"StudyInstanceUID": "1.2.8", "SeriesInstanceUID": "1.2.8.0",
            "SOPInstanceUID": "1.2.8.1"}
    data = make_instance(PatientName="FIRST^NAME", **uids)
    assert storage.store(rights, _store_request(data)) == status.SUCCESS
    assert storage.store(rights, _store_request(data)) == status.SUCCESS  # unchanged
    changed = make_instance(PatientName="OTHER^NAME", **uids)
    refused = storage.store(rights, _store_request(changed))
    assert refused.code == 0x0111 and "may not overwrite" in (refused.comment or "")
    stored = reads.lookup(rights.index.connection(), "1.2.8.1")
    assert stored is not None
    def held() -> bytes:
        with rights.store.open(stored.object_key) as source:
            return bytes(source.read())

    assert held().endswith(_store_request(data).data_set)  # nothing changed
    # An AE the policy does not know has the default rights: every one.
    assert storage.store(rights, _store_request(changed, calling_ae_title="OTHER")) \
        == status.SUCCESS
    assert held().endswith(_store_request(changed).data_set)
    rights.access = access.AccessPolicy(unknown_ae_rights=frozenset({"find"}))
    assert storage.store(rights, _store_request(data, calling_ae_title="X")).code == 0x0124


def test_a_destination_of_the_access_policy_is_connected(rights: Services) -> None:
    rights.access = access.AccessPolicy(aes={
        "SCU": access.KnownAE("SCU", access.AE_RIGHTS),
        "DEST": access.KnownAE("DEST", frozenset(), "127.0.0.9", 11112)})
    connected: list[config.Modality] = []
    _move(rights, _Responder(), "DEST",
          lambda destination, *args: connected.append(destination))
    assert connected == [config.Modality("DEST", "127.0.0.9", 11112)]


PATIENT_FIND, PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.3"


def test_a_request_of_another_sop_class_than_its_context_is_refused_0122(
        services: Services) -> None:
    """An Affected SOP Class UID that is not the presentation context's: 0122, never
    served in a model that was not negotiated (a Study Root C-FIND sent on a Patient
    Root context was answered in the Patient Root model; a C-MOVE whose UID named a
    C-FIND model failed as a bug, C000 with a KeyError's text)."""
    _load(services)
    identifier = _identifier("STUDY", StudyInstanceUID="1.2.7.0")
    [(found, _)] = find.find_responses(_request(STUDY_FIND, identifier,
                                                abstract_syntax=PATIENT_FIND), services,
                                         lambda: False)
    responder, target = _Responder(), _Target()
    retrieve.serve_get(responder, _request(PATIENT_GET, identifier,
                                           abstract_syntax=STUDY_GET),
                       services, {STUDY_GET: "study", PATIENT_GET: "patient"}, target)
    [(got, _, _)] = responder.sent
    moved = _Responder()
    retrieve.serve_move(moved, _request(STUDY_FIND, identifier, move_destination="WS",
                                        abstract_syntax=STUDY_MOVE),
                        services, {STUDY_MOVE: "study"}, lambda *_: None)
    [(refused, _, _)] = moved.sent
    assert [found.code, got.code, refused.code] == [0x0122] * 3
    assert target.received == []


def test_an_instance_that_is_none_of_the_named_refusals_cannot_be_understood() -> None:
    """A C-STORE of a DICOMDIR (or any other InvalidInstance no row names) is C000,
    cannot understand (PS3.4 B.2.3), not 0110, a processing failure of the node's own
    that a sender would send again."""
    refused = status.status_for(status.STORE_STATUS, errors.MediaDirectory("a DICOMDIR"))
    assert refused.code == 0xC000
