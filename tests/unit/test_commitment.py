"""Storage commitment: the verification, the durable queue and the N-ACTION's checks
(:mod:`pacs.core.commitment`, :mod:`pacs.dimse.commitment`), without a network.

The requestor's side, both ways of delivery and a restart are in
``tests/interop/test_storage_commitment.py``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pacs.core.access import AE_RIGHTS, STORE, AccessPolicy, KnownAE
from pacs.core.commitment import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    PUSH_MODEL,
    PUSH_MODEL_INSTANCE,
    Commitments,
    Reference,
    Request,
    Result,
    retry_delay,
    verify,
)
from pacs.core.errors import InvalidRequest, ResourceLimitation
from pacs.core.index import reads
from pacs.core.services import Services, drain
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import commitment
from pacs.dimse.status import SUCCESS
from tests.factory import make_instance

LEASE = 100.0


class Clock:
    """POSIX time the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def stored(services: Services, count: int) -> list[Reference]:
    """``count`` CT instances stored through ingest."""
    refs = []
    for _ in range(count):
        uid = generate_uid()
        services.ingest.store_bytes(make_instance(SOPInstanceUID=uid))
        refs.append(Reference(CTImageStorage, uid))
    drain(services)  # in the store, where the tests alter them
    return refs


def key_of(services: Services, ref: Reference) -> str:
    found = reads.lookup(services.index.connection(), ref.sop_instance_uid)
    assert found is not None
    return found.object_key


def test_each_instance_is_committed_only_as_acknowledged(
        services: Services, memory_store: MemoryStore) -> None:
    intact, altered, lost, other_class = stored(services, 4)
    data = memory_store.open(key_of(services, altered)).read()
    changed = data[:-1] + bytes([data[-1] ^ 0xFF])
    memory_store.put(key_of(services, altered), io.BytesIO(changed), len(changed))
    memory_store.delete(key_of(services, lost))
    unknown = Reference(CTImageStorage, generate_uid())
    conflict = Reference(MRImageStorage, other_class.sop_instance_uid)
    result = verify(services.index, services.store,
                    [intact, altered, lost, unknown, conflict, intact])
    assert result is not None
    assert result.committed == (intact, intact)  # a repeated reference is answered twice
    assert dict(result.failed) == {altered: PROCESSING_FAILURE, lost: PROCESSING_FAILURE,
                                   unknown: NO_SUCH_OBJECT_INSTANCE,
                                   conflict: CLASS_INSTANCE_CONFLICT}
    assert result.event_type == 2
    assert Result.from_json(result.to_json()) == result


def test_a_check_stops_when_its_claim_is_lost(services: Services) -> None:
    refs = stored(services, 2)
    assert verify(services.index, services.store, refs, held=lambda: False) is not None
    many = stored(services, 65)  # past the first call of held()
    assert verify(services.index, services.store, many, held=lambda: False) is None
    result = verify(services.index, services.store, many, held=lambda: True)
    assert result is not None and result.event_type == 1


def test_an_instance_stored_again_with_other_content_fails_at_the_report(
        services: Services) -> None:
    """The result keeps the SHA-256 each committed instance was verified with: one
    whose UID is stored again with other content before the report (the requestor's
    node down meanwhile) fails 0110, Event Type 2 (PS3.4 J.3.3.1.2: Event Type 1 tells
    the requestor it may delete its copy, of an instance the node no longer holds);
    one stored again with the same bytes stays committed."""
    replaced, again, kept = stored(services, 3)
    queue = queue_of(services, Clock())
    recorded = queue.record(Request("MOD", generate_uid(), (replaced, again, kept)))
    assert recorded is not None
    pending = queue.verify(recorded, services.store)
    assert pending is not None and pending.result is not None
    assert pending.result.committed == (replaced, again, kept)
    services.ingest.store_bytes(make_instance(SOPInstanceUID=replaced.sop_instance_uid,
                                              PatientName="OTHER^PATIENT"))
    services.ingest.store_bytes(services.store.open(key_of(services, again)).read())
    drain(services)
    rechecked = queue.recheck(pending)
    assert rechecked is not None and rechecked.result is not None
    assert rechecked.result.committed == (again, kept)
    assert rechecked.result.failed == ((replaced, PROCESSING_FAILURE),)
    assert rechecked.result.event_type == 2
    assert queue.recheck(rechecked) == rechecked  # nothing changed since: as kept
    queue.release(rechecked)
    (claimed,) = queue.due()
    assert claimed.result == rechecked.result  # the checksums kept in the queue too


def test_a_result_kept_without_checksums_is_verified_again(services: Services) -> None:
    """A result stored with committed items of two UIDs (no SHA-256) still reads, and
    is verified again when claimed: nothing else tells its instances from others
    stored since under their UIDs."""
    (ref,) = stored(services, 1)
    clock = Clock()
    queue = queue_of(services, clock)
    recorded = queue.record(Request("MOD", generate_uid(), (ref,)))
    assert recorded is not None
    old = json.dumps({"committed": [[ref.sop_class_uid, ref.sop_instance_uid]],
                      "failed": []})
    assert Result.from_json(old) == Result((ref,), ())
    with services.index.write() as conn:
        conn.execute("UPDATE commitment SET result = ? WHERE pk = ?", (old, recorded.key))
    queue.release(recorded)
    (claimed,) = queue.due()
    assert claimed.result is None  # to verify, as a request not verified yet
    pending = queue.verify(claimed, services.store)
    assert pending is not None and pending.result is not None
    assert pending.result.committed == (ref,) and pending.result.complete
    incomplete = queue.keep(pending, Result((ref,), ()))  # as a caller may hand one
    assert incomplete is not None and not Result((ref,), ()).complete
    unchecked = queue.recheck(incomplete)  # nothing tells it is the one verified
    assert unchecked is not None and unchecked.result is not None
    assert unchecked.result.failed == ((ref, PROCESSING_FAILURE),)


def queue_of(services: Services, clock: Clock, max_pending: int = 3,
             max_references: int = 5) -> Commitments:
    return Commitments(services.index, max_pending, max_references, LEASE, clock)


def request(requestor: str = "MOD", transaction: str | None = None,
            count: int = 1) -> Request:
    return Request(requestor, transaction or generate_uid(),
                   tuple(Reference(CTImageStorage, generate_uid()) for _ in range(count)))


def test_a_recorded_request_is_claimed_by_one_holder_at_a_time(services: Services) -> None:
    clock = Clock()
    queue = queue_of(services, clock)
    recorded = queue.record(request())
    assert queue.due() == []  # held by the thread that answered it
    clock.now += LEASE
    taken = queue.due()
    assert [p.key for p in taken] == [recorded.key]
    assert not queue.renew(recorded)  # the first holder lost it
    assert queue.keep(recorded, Result((), ())) is None
    assert queue.renew(taken[0])
    assert queue.due() == []


def test_a_failed_attempt_waits_longer_each_time(services: Services) -> None:
    clock = Clock()
    queue = queue_of(services, clock)
    pending = queue.record(request())
    kept = queue.keep(pending, Result((), ()))
    assert kept is not None
    delays = []
    for _ in range(3):
        delays.append(queue.failed(kept, "refused"))
        assert queue.due() == []
        assert queue.next_time() == pytest.approx(clock.now + delays[-1])
        clock.now += delays[-1]
        (kept,) = queue.due()
        assert kept.result == Result((), ())  # verified once, reported as verified
    assert delays == [retry_delay(1), retry_delay(2), retry_delay(3)]
    assert delays[0] < delays[1] < delays[2]
    queue.remove(kept)
    assert queue.next_time() is None


def test_a_requestor_that_does_not_answer_keeps_no_other_waiting(services: Services) -> None:
    """A report to SILENT failed (each try costs up to the network timeout): its other
    results wait as long as that one, and the next due is another requestor's, not
    SILENT's next - one silent modality delayed every other's results by a timeout per
    result of its own."""
    clock = Clock()
    queue = queue_of(services, clock, max_pending=20)
    silent = [queue.record(request("SILENT")) for _ in range(5)]
    clock.now += 1
    other = queue.record(request("GOOD"))
    clock.now += LEASE
    (first,) = queue.due()
    assert first.key == silent[0].key
    delay = queue.failed(first, "no answer")
    assert queue.postpone_requestor(first, delay) == 4
    (taken,) = queue.due()
    assert taken.key == other.key and queue.due() == []
    clock.now += delay
    assert {p.key for p in queue.due(10)} == {p.key for p in silent}


def test_the_queue_is_bounded_and_a_transaction_uid_names_one_request(
        services: Services) -> None:
    """A request sent again (its Transaction UID and references those of one that
    waits) is answered by the waiting one, whose claim it leaves alone; one with the
    Transaction UID and other references is refused (PS3.3 C.14.1.1 0131): replacing
    the waiting request under a delivery in progress sent two different reports of one
    Transaction UID."""
    clock = Clock()
    queue = queue_of(services, clock, max_pending=2)
    sent = request(transaction="1.2.3")
    first = queue.record(sent)
    assert first is not None
    queue.record(request())
    with pytest.raises(ResourceLimitation):
        queue.record(request())
    assert queue.record(sent) is None
    assert queue.renew(first)
    with pytest.raises(InvalidRequest, match="in use by a waiting request"):
        queue.record(request(transaction="1.2.3", count=2))
    assert queue.renew(first)
    with pytest.raises(ResourceLimitation):
        queue.record(request(count=6))
    with pytest.raises(InvalidRequest):
        queue.record(Request("MOD", "", request().references))
    with pytest.raises(InvalidRequest):
        queue.record(Request("MOD", "1.2.4", ()))


def test_one_requestor_cannot_fill_the_queue_for_the_others(services: Services) -> None:
    """A tenth of the queue per requestor's AE title (at least ten): one AE sending
    requests for instances that do not exist, to an address the node does not know,
    kept every other modality's requests refused for as long as its results waited."""
    queue = queue_of(services, Clock(), max_pending=200)
    for _ in range(20):
        queue.record(request("FLOODER"))
    with pytest.raises(ResourceLimitation, match="20 results for this AE"):
        queue.record(request("FLOODER"))
    assert queue.record(request("MOD")).request.requestor_ae == "MOD"
    assert queue_of(services, Clock(), max_pending=3).max_per_requestor == 3


def test_one_address_naming_itself_anew_cannot_fill_the_queue(services: Services) -> None:
    """A quarter of the queue per network address (at least ten): a peer that names
    itself with another AE title in each request (any may ask, by default) filled the
    whole queue past the per-title share, refusing every other modality."""
    queue = queue_of(services, Clock(), max_pending=200)
    for number in range(50):
        body = information(generate_uid(), [(CTImageStorage, generate_uid())])
        status, _ = commitment.accept(queue, services.access, action(
            body, calling_ae_title=f"ROTATE{number}", calling_address="192.0.2.66"))
        assert status.code == 0x0000
    body = information(generate_uid(), [(CTImageStorage, generate_uid())])
    status, _ = commitment.accept(queue, services.access, action(
        body, calling_ae_title="ROTATE50", calling_address="192.0.2.66"))
    assert status.code == 0x0213
    status, pending = commitment.accept(queue, services.access, action(
        body, calling_ae_title="MOD", calling_address="192.0.2.7"))
    assert status.code == 0x0000 and pending is not None
    assert queue.record(request("LOCAL")).request.address == ""  # address unknown: not counted
    assert queue_of(services, Clock(), max_pending=3).max_per_address == 3


def test_a_stopping_process_gives_its_request_back(services: Services) -> None:
    clock = Clock()
    queue = queue_of(services, clock)
    pending = queue.record(request())
    queue.release(pending)
    assert [p.key for p in queue.due()] == [pending.key]


def test_the_called_ae_title_is_kept_with_the_request(services: Services) -> None:
    """The title a request came in on is the one its result is reported from, after a
    restart too (another process claims it from the queue)."""
    clock = Clock()
    queue = queue_of(services, clock)
    body = information("1.2.3", [(CTImageStorage, generate_uid())])
    _, pending = commitment.accept(queue, services.access,
                                   action(body, called_ae_title="NORTH2 "))
    assert pending is not None and pending.request.called_ae == "NORTH2"
    queue.release(pending)
    assert [p.request.called_ae for p in queue.due()] == ["NORTH2"]


def test_the_requests_of_a_requestor_are_claimed_when_it_comes_back(
        services: Services) -> None:
    """A requestor that opens an association has its waiting requests claimed at once,
    due or not, with the time each was recorded; not another's, nor one held."""
    clock = Clock()
    queue = queue_of(services, clock, max_pending=10)
    waiting = queue.record(request("MOD"))
    queue.failed(waiting, "gone")  # next attempt later
    held = queue.record(request("MOD"))  # still held by the thread that answered it
    queue.release(queue.record(request("OTHER")))
    clock.now += 1.0
    claimed = queue.of_requestor("MOD")
    assert [p.key for p in claimed] == [waiting.key]
    assert claimed[0].received == pytest.approx(clock.now - 1.0, abs=0.01)
    assert claimed[0].attempts == 1
    assert queue.of_requestor("MOD") == []  # claimed now
    assert queue.of_requestor("NOBODY") == []
    assert held.key not in {p.key for p in queue.of_requestor("MOD")}


def test_a_result_for_a_requestor_without_an_address_is_kept_then_dropped(
        services: Services) -> None:
    """No association of the requestor to report on and no address in PACS_MODALITIES:
    the result is kept and tried again, until KEEP_UNREACHABLE after the request."""
    from pacs.dimse.reports import KEEP_UNREACHABLE, Reporter

    clock = Clock()
    queue = queue_of(services, clock)
    reporter = Reporter(services)
    reporter.commitments = queue
    pending = queue.keep(queue.record(request("STRANGER")), Result((), ()))
    assert pending is not None
    reporter._deliver(pending, None)
    assert queue.next_time() == pytest.approx(clock.now + retry_delay(1))  # kept
    clock.now += KEEP_UNREACHABLE - 1
    (again,) = queue.due()
    reporter._deliver(again, None)
    assert queue.next_time() is not None  # kept still
    clock.now += 1 + retry_delay(2)
    (last,) = queue.due()
    reporter._deliver(last, None)
    assert queue.next_time() is None  # dropped


def test_a_result_not_delivered_within_commitment_keep_is_dropped(
        make_services: Callable[..., Services], memory_store: MemoryStore,
        caplog: pytest.LogCaptureFixture) -> None:
    """A requestor with an address whose node never takes its results (gone, refusing
    every association) had them tried for good, its share of the queue full and each
    of its later requests refused 0213: a result is dropped once
    ``PACS_COMMITMENT_KEEP`` seconds have passed since its request, logged per
    requestor (no instance named), unless a delivery holds it at that moment."""
    keep = 3600.0
    services = make_services(store=memory_store, commitment_max_pending=100,
                             commitment_keep=keep)
    clock = Clock()
    queue = services.commitments
    queue.clock = clock
    start = clock.now
    for _ in range(queue.max_per_requestor):
        recorded = queue.record(request("GONE"))
        assert recorded is not None
        queue.failed(recorded, "no association with 192.0.2.5:104")
    clock.now = start + keep / 2
    queue.release(queue.record(request("OTHER")))
    clock.now = start + keep - 1
    tried = queue.due(100)
    assert len(tried) == queue.max_per_requestor + 1  # tried still
    for pending in tried:
        queue.failed(pending, "no association")
    with pytest.raises(ResourceLimitation):
        queue.record(request("GONE"))
    (held,) = queue.of_requestor("GONE", 1)  # a delivery in progress
    clock.now = start + keep + 1
    with caplog.at_level(logging.WARNING, logger="pacs.core.commitment"):
        assert [p.request.requestor_ae for p in queue.due(100)] == ["OTHER"]
        queue.failed(held, "no association")  # given back: it goes at the next look
        assert queue.record(request("GONE")) is not None
        assert held.key not in {p.key for p in queue.of_requestor("GONE")}
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [
        f"storage commitment: {count} result(s) for GONE dropped: not delivered within "
        "3600 s of their request (PACS_COMMITMENT_KEEP); the requestor, never told, "
        "keeps its copies" for count in (queue.max_per_requestor - 1, 1)]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_full_share_is_freed_by_the_request_that_finds_it_expired(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    """A request counts only results still within their keeping, whether or not a
    delivery thread has looked at the queue since they expired."""
    services = make_services(store=memory_store, commitment_max_pending=10,
                             commitment_keep=60.0)
    clock = Clock()
    queue = services.commitments
    queue.clock = clock
    for _ in range(10):
        queue.release(queue.record(request("GONE")))
    with pytest.raises(ResourceLimitation):
        queue.record(request("MOD"))
    clock.now += 61
    assert queue.record(request("MOD")) is not None
    assert queue.next_time() is not None and len(queue.due(100)) == 0  # MOD's: held


def encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def action(information: bytes | None, **changes: object) -> commitment.ActionRequest:
    fields: dict[str, object] = {
        "message_id": 7, "sop_class_uid": PUSH_MODEL, "sop_instance_uid": PUSH_MODEL_INSTANCE,
        "action_type": 1, "action_information": information,
        "received": len(information or b""), "transfer_syntax": ExplicitVRLittleEndian,
        "calling_ae_title": "MOD  "}
    fields.update(changes)
    return commitment.ActionRequest(**fields)  # type: ignore[arg-type]


def information(transaction: str, refs: list[tuple[str, str]]) -> bytes:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return encoded(ds)


def test_references_with_every_optional_attribute_fit_the_bound(services: Services) -> None:
    """PS3.4 Table J.3-1: each reference may carry the Storage Media File-Set ID and
    UID besides its two UIDs; a request of ``max_references`` such references, each
    UID as long as it may be, is within the bytes read (only more references are
    refused, 0213)."""
    limit = 100
    ds = Dataset()
    ds.TransactionUID = "1." + "2" * 62
    ds.ReferencedSOPSequence = []
    for number in range(limit):
        item = Dataset()
        item.ReferencedSOPClassUID = "1." + "3" * 62
        item.ReferencedSOPInstanceUID = f"1.{number + 100}." + "4" * 58
        item.StorageMediaFileSetID = "F" * 16
        item.StorageMediaFileSetUID = "1." + "5" * 62
        ds.ReferencedSOPSequence.append(item)
    body = encoded(ds)
    assert len(body) <= commitment.max_action_bytes(limit)
    status, pending = commitment.accept(
        queue_of(services, Clock(), max_references=limit), services.access, action(body))
    assert status == SUCCESS and pending is not None
    assert len(pending.request.references) == limit


def test_an_n_action_is_recorded_before_success(services: Services) -> None:
    uid = generate_uid()
    status, pending = commitment.accept(
        services.commitments, services.access,
        action(information("1.2.3", [(CTImageStorage, uid)])))
    assert status == SUCCESS and pending is not None
    assert pending.request == Request("MOD", "1.2.3", (Reference(CTImageStorage, uid),))
    assert services.commitments.renew(pending)  # in the index, claimed by the caller


@pytest.mark.parametrize(("changes", "code"), [
    ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}, 0x0118),
    ({"abstract_syntax": "1.2.840.10008.1.1"}, 0x0122),  # on the Verification context
    ({"abstract_syntax": "1.2.840.10008.5.1.4.1.1.2"}, 0x0122),
    ({"sop_instance_uid": "1.2.3.4"}, 0x0112),
    ({"action_type": 2}, 0x0123),
    ({"action_type": None}, 0x0123),
    ({"action_information": None}, 0x0115),
    ({"action_information": b"\x08\x00\x95\x11UI\xff\xff1.2"}, 0x0115),
    ({"received": 10**9}, 0x0213),
])
def test_an_n_action_refused(services: Services, changes: dict[str, object],
                             code: int) -> None:
    body = information("1.2.3", [(CTImageStorage, generate_uid())])
    status, pending = commitment.accept(services.commitments, services.access,
                                        action(body, **changes))
    assert (status.code, pending) == (code, None)
    assert status.comment


def test_an_n_action_of_an_ae_without_the_store_right_is_refused(services: Services) -> None:
    """0124 (PS3.7 C.5.21) before anything is read: nothing recorded, nothing to report;
    an AE with the right (here: an unknown one, every right) is taken."""
    policy = AccessPolicy({"MOD": KnownAE("MOD", AE_RIGHTS - {STORE})})
    body = information("1.2.3", [(CTImageStorage, generate_uid())])
    status, pending = commitment.accept(services.commitments, policy, action(body))
    assert (status.code, pending) == (0x0124, None)
    assert status.comment
    waiting = services.index.connection().execute("SELECT count(*) FROM commitment")
    assert waiting.fetchone()[0] == 0
    status, pending = commitment.accept(services.commitments, policy,
                                        action(body, calling_ae_title="OTHER"))
    assert status == SUCCESS and pending is not None


def test_a_reference_without_valid_uids_is_an_invalid_argument(services: Services) -> None:
    body = information("1.2.3", [(CTImageStorage, "1.2.x")])
    status, _ = commitment.accept(services.commitments, services.access, action(body))
    assert status.code == 0x0115


def test_the_event_information_lists_every_reference() -> None:
    ok, bad = Reference(CTImageStorage, "1.2.3"), Reference(MRImageStorage, "1.2.4")
    info = commitment.event_information("9.8.7", Result((ok,), ((bad, 0x0119),)), "NODE")
    assert info.TransactionUID == "9.8.7" and info.RetrieveAETitle == "NODE"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in info.ReferencedSOPSequence] == [(CTImageStorage, "1.2.3")]
    (failed,) = info.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == ("1.2.4", 0x0119)
    none_committed = commitment.event_information("9.8.7", Result((), ((bad, 0x0112),)),
                                                  "NODE")
    assert "ReferencedSOPSequence" not in none_committed
    assert "RetrieveAETitle" not in none_committed


@pytest.mark.parametrize("address", [True, False], ids=["with an address", "without"])
def test_a_requestor_that_left_a_report_unanswered_is_held_off(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch,
        address: bool) -> None:
    """A report left unanswered on the requestor's association for the DIMSE timeout:
    the result waits ``SILENT_TIMEOUTS`` timeouts, and no new association to its
    address is opened meanwhile (each could hold the one report thread for another
    timeout; one was opened at once, then one at each retry, 2, 4, 8 s apart)."""
    from pacs.core.config import Modality
    from pacs.dimse import reports
    from pacs.dimse.seam import notify

    destinations = {"SILENT": Modality("SILENT", "192.0.2.9", 104)} if address else {}
    services = make_services(destinations=destinations)
    clock = Clock()
    queue = queue_of(services, clock)
    reporter = reports.Reporter(services)
    reporter.commitments = queue
    own = object()
    opened: list[object] = []
    monkeypatch.setattr(reporter, "_associations_of",
                        lambda _pending, assoc: [own] if assoc is own else [])
    monkeypatch.setattr(reporter, "_send_on", lambda *_: notify.NO_RESPONSE)
    monkeypatch.setattr(reporter, "_send_new",
                        lambda *args: opened.append(args) or notify.NO_RESPONSE)
    pending = queue.keep(queue.record(request("SILENT")), Result((), ()))
    reporter._deliver(pending, own)  # type: ignore[arg-type]
    hold = reports.SILENT_TIMEOUTS * services.settings.dimse_timeout
    assert queue.next_time() == pytest.approx(clock.now + hold)
    for _ in range(3):  # its next attempts, within the hold
        clock.now = queue.next_time()
        (again,) = queue.due()
        reporter._deliver(again, None)
    assert opened == []
