"""C-MOVE against destinations that misbehave (:mod:`tests.service.hostile_peer`).

The node runs in-process with a short DIMSE timeout; each destination is a raw socket
that does one wrong thing.  Whatever it does, the C-MOVE ends within a bound set by
the timeout (not by the destination), with counts that add up and every failed
instance in the Failed SOP Instance UID List (PS3.4 C.4.2.1.6, C.4.2.3.1); the
node closes its connection to the destination, its threads return to their number
before, and the requestor's association goes on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as StudyFind,
    StudyRootQueryRetrieveInformationModelGet as StudyGet,
    StudyRootQueryRetrieveInformationModelMove as StudyMove,
    Verification,
)

from pacs.core import config
from pacs.core.commitment import (
    Commitments,
    Reference,
    Request as CommitmentRequest,
    Result as CommitmentResult,
)
from pacs.core.config import Modality
from pacs.core.forwarding import Result
from pacs.core.query.model import InstanceRef
from pacs.core.services import Services, drain
from pacs.core.storage import local_path, object_key
from pacs.dimse import handlers
from pacs.dimse.forward import DimseSender
from pacs.dimse.reports import Reporter
from pacs.dimse.server import NodeServer, start, stop
from tests.auditcheck import read_trail
from tests.conftest import SEAM, folder_store, free_port, seam_only
from tests.service import hostile_peer as peer
from tests.service.test_retrieve import (
    NODE_AET,
    REQUESTOR_AET,
    Node,
    Study,
    counts,
    identifier,
    store_study,
)

pytestmark = pytest.mark.dimse

#: PACS_DIMSE_TIMEOUT of the node under test.
TIMEOUT = 2.0
#: A C-MOVE against a misbehaving destination ends within this (generous: a slow
#: machine; one timeout for the association, one for a response, one for the release).
WITHIN = 4 * TIMEOUT + 5
INSTANCES = 3


@pytest.fixture
def make_node(settings: config.Settings, make_services: Callable[..., Services],
              ) -> Iterator[Callable[..., Node]]:
    """A node with a short DIMSE timeout whose destinations are ``dests``."""
    servers: list[NodeServer] = []

    def make(*dests: Any, **changes: Any) -> Node:
        table = ",".join(f"{d.ae_title}=127.0.0.1:{d.port}" for d in dests)
        services = make_services(
            store=folder_store(settings.objects_dir), modalities=table,
            destinations=config.parse_modalities(table), pending_interval=0.0,
            dimse_timeout=TIMEOUT, **changes)
        port = free_port()
        server = start(services, ("127.0.0.1", port))
        servers.append(server)
        return Node(services, port, server)

    yield make
    for server in servers:
        stop(server, drain=1.0)


@pytest.fixture
def hostile() -> Iterator[Callable[..., peer.HostileDestination]]:
    started: list[peer.HostileDestination] = []

    def make(associate: str = "accept", answer: peer.Answer | None = None,
             releases: bool = True) -> peer.HostileDestination:
        dest = peer.HostileDestination("HOSTILE", associate, answer,
                                       releases=releases).start()
        started.append(dest)
        return dest

    yield make
    for dest in started:
        dest.stop()


def requestor(node: Node) -> Association:
    ae = AE(ae_title=REQUESTOR_AET)
    ae.add_requested_context(StudyMove)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    return assoc


def move(assoc: Association, study: str, destination: str = "HOSTILE"
         ) -> tuple[list[tuple[Dataset, Dataset | None]], float]:
    """The responses of a C-MOVE of ``study`` and the seconds it took."""
    began = time.monotonic()
    replies = list(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study),
                                     destination, StudyMove))
    return replies, time.monotonic() - began


def failed_uids(ident: Dataset | None) -> list[str]:
    if ident is None or "FailedSOPInstanceUIDList" not in ident:
        return []
    value = ident.FailedSOPInstanceUIDList
    return [value] if isinstance(value, str) else list(value)


def settle(baseline: int, within: float = 10.0) -> int:
    """The process' thread count once it is back at ``baseline`` (or after ``within``)."""
    end = time.monotonic() + within
    while threading.active_count() > baseline and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


def echo_works(node: Node) -> bool:
    ae = AE(ae_title="ECHOER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


# --- destinations that never get as far as a response --------------------------------------

BROKEN = {
    "never-answers-a-store": peer.never,
    "wrong-message-id": peer.wrong_message_id,
    "wrong-command": peer.wrong_command,
    "giant-pdu": peer.giant_pdu,
    "malformed-pdv": peer.malformed_pdv,
    "abort": peer.abort,
}


@pytest.mark.parametrize("behaviour", sorted(BROKEN))
def test_a_destination_that_breaks_the_first_store(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        behaviour: str) -> None:
    """Every instance fails (A702): the one whose response never came right, and the
    others, since nothing more can be trusted on that association (it is aborted);
    each failed UID is listed (PS3.4 C.4.2.1.6)."""
    dest = hostile(answer=BROKEN[behaviour])
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = requestor(node)
    baseline = threading.active_count()
    try:
        replies, took = move(assoc, study.uid)
        final, ident = replies[-1]
        assert final.Status == 0xA702, hex(final.Status)
        assert counts(final)[1:] == (0, INSTANCES, 0)
        assert sorted(failed_uids(ident)) == sorted(study.sops)
        assert took < WITHIN
        assert len(dest.requests) == 1  # nothing more written after the broken one
        assert dest.wait_closed(WITHIN)
        assert assoc.is_established
    finally:
        assoc.release()
    assert settle(baseline) <= baseline
    assert echo_works(node)


@seam_only("pynetdicom bounds each recv of a response, not the whole of it")
def test_a_destination_that_trickles_its_response(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    """A response a byte every 0.3 s (about 30 s in all) is cut at the DIMSE timeout."""
    dest = hostile(answer=peer.trickle(0.3))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = requestor(node)
    try:
        replies, took = move(assoc, study.uid)
        final, ident = replies[-1]
        assert final.Status == 0xA702
        assert sorted(failed_uids(ident)) == sorted(study.sops)
        assert took < WITHIN
    finally:
        assoc.release()


@pytest.mark.parametrize("associate", ["silent", "giant", "reject-contexts", "tiny-pdu"])
def test_a_destination_that_takes_no_store(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        associate: str) -> None:
    """TCP accepted and the A-ASSOCIATE-RQ never answered (or an A-ASSOCIATE-AC
    declaring 4 GB begun, one with every presentation context rejected, or one whose
    Maximum Length is 16 bytes, under the node's floor): nothing is sent; A702 (after
    the ACSE timeout when nothing answers), with every instance counted as failed and
    named, and the connection closed."""
    dest = hostile(associate=associate)
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = requestor(node)
    try:
        replies, took = move(assoc, study.uid)
        final, ident = replies[-1]
        assert final.Status == 0xA702
        assert counts(final)[1:] == (0, INSTANCES, 0)
        assert sorted(failed_uids(ident)) == sorted(study.sops)
        assert took < WITHIN
        assert dest.requests == []
        assert dest.wait_closed(WITHIN)
        if associate == "tiny-pdu":
            assert dest.ended_by == [peer.A_ABORT]  # nothing else sent
    finally:
        assoc.release()


# --- statuses ----------------------------------------------------------------------------------

#: C-STORE response statuses and what a sub-operation counts them as (PS3.4 B.2.3,
#: PS3.7 C: 0000 success; 0001, 0107, 0116, Bxxx warnings, 0111 as warning by choice;
#: A7xx, A9xx, Cxxx failures; any code the standard does not give a C-STORE is a failure).
STATUSES = {0x0000: "completed", 0xB000: "warning", 0x0107: "warning", 0xB007: "warning",
            0x0111: "warning", 0xA700: "failed", 0xC123: "failed", 0x1234: "failed",
            0xFF00: "failed", 0xFE00: "failed", 0x0122: "failed"}


def test_odd_statuses_are_counted_by_their_meaning(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    codes = list(STATUSES)
    dest = hostile(answer=peer.statuses(codes))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=len(codes))
    assoc = requestor(node)
    try:
        replies, _ = move(assoc, study.uid)
    finally:
        assoc.release()
    final, ident = replies[-1]
    outcome = {request.sop_instance: STATUSES[code]
               for request, code in zip(dest.requests, codes, strict=True)}
    expected = {kind: sum(1 for v in outcome.values() if v == kind)
                for kind in ("completed", "failed", "warning")}
    assert final.Status == 0xB000
    assert counts(final)[1:] == (expected["completed"], expected["failed"],
                                 expected["warning"])
    assert sorted(failed_uids(ident)) == sorted(
        uid for uid, kind in outcome.items() if kind == "failed")


# --- forwarding ----------------------------------------------------------------------------------

def refs_of(node: Node, study: Study) -> list[InstanceRef]:
    """The stored instances of ``study`` as the forwarder reads them from its outbox."""
    refs = []
    for series, sops in study.series.items():
        for sop in sops:
            key = object_key(study.uid, series, sop)
            refs.append(InstanceRef(study.uid, series, sop, CTImageStorage,
                                    ExplicitVRLittleEndian, key, len(node.stored(
                                        study.uid, series, sop))))
    return refs


FORWARD_BROKEN = dict(BROKEN, trickle=peer.trickle(0.3))


@pytest.mark.parametrize("behaviour", sorted(FORWARD_BROKEN))
def test_forwarding_to_a_destination_that_breaks_a_store(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        behaviour: str) -> None:
    """Nothing is taken as sent without the C-STORE-RSP to its own request (PS3.7
    9.3.1.2: Message ID Being Responded To): every instance stays to be sent again
    (an instance taken as sent leaves the outbox for good)."""
    if behaviour == "trickle" and not SEAM:
        pytest.skip("seam only (PACS_DIMSE_SEAM=off): pynetdicom bounds each recv")
    dest = hostile(answer=FORWARD_BROKEN[behaviour])
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    sender = DimseSender(Modality("HOSTILE", "127.0.0.1", dest.port), node.services.store,
                         node.services.settings)
    began = time.monotonic()
    deliveries = sender.send(refs_of(node, study))
    assert time.monotonic() - began < WITHIN
    assert [d.result for d in deliveries] == [Result.RETRY] * INSTANCES, deliveries
    assert dest.wait_closed(WITHIN)


def test_forwarding_to_a_destination_that_takes_none_of_the_classes_refuses_them(
        make_node: Callable[..., Node]) -> None:
    """A destination that accepts the association and none of the batch's SOP classes
    (an MR-only archive sent CT): refused for good, as a class it refuses in a batch it
    took, not "no association", tried again for ever behind a growing backoff."""
    from pynetdicom.sop_class import MRImageStorage

    scp = AE(ae_title="MRONLY")
    scp.add_supported_context(MRImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        node = make_node()
        study = store_study(node, series=1, per_series=INSTANCES)
        sender = DimseSender(Modality("MRONLY", "127.0.0.1", server.server_address[1]),
                             node.services.store, node.services.settings)
        deliveries = sender.send(refs_of(node, study))
    finally:
        server.shutdown()
    assert [d.result for d in deliveries] == [Result.REFUSED] * INSTANCES, deliveries
    assert "accepted no presentation context for CT Image Storage" in deliveries[0].detail


class LateWake(threading.Event):
    """An association's pause checkpoint whose waiter resumes late, as a thread the
    scheduler runs late does."""

    def wait(self, timeout: float | None = None) -> bool:
        blocked = not self.is_set()
        woke = super().wait(timeout)
        if blocked:
            time.sleep(0.05)
        return woke


@seam_only("pynetdicom's own association thread takes the response for a request")
def test_a_response_arriving_as_the_association_thread_resumes_is_the_senders(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE sent while the association thread is still waking from the previous
    store's pause (its ``_is_paused`` still True) gets its response: the thread, once
    awake, does not take it as a request ("Received unexpected C-STORE service
    message"), which left the store unanswered until the DIMSE timeout and the instance
    to be sent again.  The thread is made to wake late, the sender to look for its
    response late, so that the response is there when the thread resumes."""
    dest = hostile(answer=peer.status(0x0000))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    opened = handlers.open_association

    def late(*args: Any, **kwargs: Any) -> Association | None:
        assoc = opened(*args, **kwargs)
        if assoc is not None:
            get_msg = assoc.dimse.get_msg

            def get_late(block: bool = False) -> Any:
                if block:  # the sender waiting for its response, not the thread
                    time.sleep(0.15)
                return get_msg(block)

            assoc.dimse.get_msg = get_late  # type: ignore[method-assign]
            checkpoint = LateWake()
            checkpoint.set()
            assoc._reactor_checkpoint = checkpoint
        return assoc

    monkeypatch.setattr(handlers, "open_association", late)
    sender = DimseSender(Modality("HOSTILE", "127.0.0.1", dest.port), node.services.store,
                         node.services.settings)
    deliveries = sender.send(refs_of(node, study))
    assert [d.result for d in deliveries] == [Result.SENT] * INSTANCES, deliveries


# --- a long C-MOVE -------------------------------------------------------------------------------

def test_a_move_longer_than_the_network_timeout_keeps_its_association(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    """A C-MOVE whose sub-operations take longer in all than PACS_DIMSE_TIMEOUT (each
    within it) is not idleness of the requestor's association: it is not aborted after
    the final response, and serves the next request."""
    dest = hostile(answer=peer.slowly(TIMEOUT / 2))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=3)  # 3 s of stores, timeout 2 s
    assoc = requestor(node)
    try:
        replies, took = move(assoc, study.uid)
        assert took > TIMEOUT
        assert replies[-1][0].Status == 0x0000
        assert counts(replies[-1][0])[1:] == (3, 0, 0)
        time.sleep(0.3)  # what the node would do after the response, it has done
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000  # and it serves the next request
    finally:
        if assoc.is_established:
            assoc.release()


# --- storage commitment reports on an association of their own ------------------------------------

REPORT_BROKEN = {"wrong-message-id": peer.wrong_message_id,
                 "wrong-command": peer.wrong_command, "never-answers": peer.never,
                 "giant-pdu": peer.giant_pdu, "abort": peer.abort}


@pytest.mark.parametrize("behaviour", sorted(REPORT_BROKEN))
def test_a_report_answered_wrongly_is_kept_to_be_sent_again(
        make_services: Callable[..., Services], hostile: Callable[..., peer.HostileDestination],
        behaviour: str) -> None:
    """A storage commitment result is delivered only when the requestor answers its
    N-EVENT-REPORT with the N-EVENT-REPORT-RSP to it (PS3.7 10.3.1.2): else it stays
    in the queue (delivered results are removed, and never sent again)."""
    dest = hostile(answer=REPORT_BROKEN[behaviour])
    table = f"HOSTILE=127.0.0.1:{dest.port}"
    services = make_services(modalities=table, destinations=config.parse_modalities(table),
                             dimse_timeout=TIMEOUT)
    queue = Commitments(services.index, 3, 5, 100.0, time.time)
    reporter = Reporter(services)
    reporter.commitments = queue
    pending = queue.keep(queue.record(CommitmentRequest(
        "HOSTILE", generate_uid(), (Reference(CTImageStorage, generate_uid()),))),
        CommitmentResult((), ()))
    assert pending is not None
    began = time.monotonic()
    reporter._deliver(pending, None)
    assert time.monotonic() - began < WITHIN
    assert len(dest.requests) == 1
    assert queue.next_time() is not None  # kept for another attempt
    assert dest.wait_closed(WITHIN)


# --- the requestor goes away ------------------------------------------------------------------

def test_a_requestor_that_aborts_during_the_sub_operations(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    """The requestor aborts after the first pending response: the sub-operations stop
    after the one under way, the destination's association is released, and the
    node's threads return to their number before."""
    dest = hostile(answer=peer.slowly(0.2))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=20)
    warm = requestor(node)
    move(warm, store_study(node, series=1, per_series=1).uid)  # the node's lazy threads
    warm.release()
    baseline = settle(threading.active_count())
    assoc = requestor(node)
    for status, _ in assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study.uid),
                                       "HOSTILE", StudyMove):
        assert status.Status == 0xFF00
        assoc.abort()
        break
    assert dest.wait_closed(WITHIN)
    assert len(dest.requests) <= 1 + 3  # the warm-up's, the one under way, one more
    assert settle(baseline) <= baseline, [t.name for t in threading.enumerate()]
    assert echo_works(node)


def test_a_move_to_a_dead_destination_names_every_instance_it_could_not_send(
        make_node: Callable[..., Node]) -> None:
    """A702 with every instance counted failed and named in the Failed SOP Instance
    UID List (PS3.4 C.4.2.1.4.2), with the seam and through pynetdicom's own loop."""
    dead = peer.HostileDestination("DEAD", port=free_port())
    node = make_node(dead)
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = requestor(node)
    try:
        replies, _ = move(assoc, study.uid, "DEAD")
    finally:
        assoc.release()
    final, ident = replies[-1]
    assert final.Status == 0xA702, hex(final.Status)
    assert counts(final)[1:] == (0, INSTANCES, 0)
    assert sorted(failed_uids(ident)) == sorted(study.sops)
    audited = [e for e in read_trail(node.services.settings.data_dir / "audit.jsonl")
               if "C-MOVE" in e["EventIdentification"].get("EventOutcomeDescription", "")]
    assert [e["EventIdentification"]["EventOutcomeDescription"] for e in audited] == [
        f"C-MOVE status A702: 0 completed, 0 warning, {INSTANCES} failed"]


def test_many_moves_to_a_dead_destination_leave_nothing_behind(
        make_node: Callable[..., Node]) -> None:
    """60 C-MOVEs to a port nobody listens on: each A702 at once, and the node's
    threads and descriptors return to their number before."""
    dead = peer.HostileDestination("DEAD", port=free_port())
    node = make_node(dead)
    study = store_study(node, series=1, per_series=2)
    assoc = requestor(node)
    move(assoc, study.uid, "DEAD")  # first use: lazy imports and caches
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(60):
            replies, _ = move(assoc, study.uid, "DEAD")
            final = replies[-1][0]
            assert final.Status == 0xA702
    finally:
        assoc.release()
    assert settle(threads) <= threads
    assert len(os.listdir("/proc/self/fd")) <= fds + 2


# --- a C-GET requestor that answers its C-STOREs wrongly ---------------------------------------

def get_requestor(node: Node, answer: Callable[[Any], None]) -> Association:
    """A C-GET requestor taking CT images whose C-STORE responses ``answer`` alters
    as they go (the message is encoded after EVT_DIMSE_SENT)."""
    ae = AE(ae_title=REQUESTOR_AET)
    ae.add_requested_context(StudyGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000),
                                       (evt.EVT_DIMSE_SENT, answer)])
    assert assoc.is_established
    return assoc


def _other_message_id(event: Any) -> None:
    message = event.message
    if isinstance(message, C_STORE_RSP) and message.command_set is not None:
        command = message.command_set
        command.MessageIDBeingRespondedTo = (command.MessageIDBeingRespondedTo + 7) % 0xFFFF


def test_a_get_requestor_answering_another_message_id(
        make_node: Callable[..., Node]) -> None:
    """C-STORE responses to other Message IDs answer none of the sub-operations: they
    fail (the association cannot be trusted and is aborted), none counts completed."""
    node = make_node()
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = get_requestor(node, _other_message_id)
    try:
        replies = list(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                        StudyGet))
    finally:
        if assoc.is_established:
            assoc.release()
    finals = [status for status, _ in replies if status and status.Status != 0xFF00]
    assert all(counts(status)[1] == 0 for status, _ in replies if status), replies
    assert not finals or finals[-1].Status != 0x0000


def test_a_destination_that_never_answers_the_release(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    """Every store answered, the A-RELEASE-RQ never: the C-MOVE's final response and
    the forwarded batch still come within the timeouts, and the connection is closed."""
    dest = hostile(answer=peer.status(0x0000), releases=False)
    node = make_node(dest)
    study = store_study(node, series=1, per_series=INSTANCES)
    assoc = requestor(node)
    try:
        replies, took = move(assoc, study.uid)
    finally:
        assoc.release()
    assert replies[-1][0].Status == 0x0000
    assert took < WITHIN
    assert dest.wait_closed(WITHIN)
    sender = DimseSender(Modality("HOSTILE", "127.0.0.1", dest.port), node.services.store,
                         node.services.settings)
    began = time.monotonic()
    deliveries = sender.send(refs_of(node, study))
    assert time.monotonic() - began < WITHIN
    assert [d.result for d in deliveries] == [Result.SENT] * INSTANCES
    assert dest.wait_closed(WITHIN)


def test_a_forwarding_failure_names_no_instance_in_its_detail(
        make_node: Callable[..., Node], hostile: Callable[..., peer.HostileDestination],
        ) -> None:
    """The detail of a failed delivery is logged at WARNING: an error of the system
    (here the object file gone, its path made of the UIDs) is named by its type only,
    the instance at DEBUG (as for sub-operations, :func:`pacs.dimse.sender.log_failure`)."""
    dest = hostile(answer=peer.status(0x0000))
    node = make_node(dest)
    study = store_study(node, series=1, per_series=1)
    drain(node.services)  # out of the intake, into the folder store
    (ref,) = refs_of(node, study)
    path = local_path(node.services.store, ref.object_key)
    assert path is not None
    path.unlink()
    sender = DimseSender(Modality("HOSTILE", "127.0.0.1", dest.port), node.services.store,
                         node.services.settings)
    (delivery,) = sender.send([ref])
    assert delivery.result is Result.RETRY
    for uid in (ref.study_uid, ref.series_uid, ref.sop_uid):
        assert uid not in delivery.detail


def test_a_find_longer_than_the_network_timeout_keeps_its_association(
        make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-FIND whose matching takes longer than PACS_DIMSE_TIMEOUT (the index slow,
    the requestor waiting) does not have its association aborted as idle after the
    final response."""
    node = make_node()
    store_study(node, series=1, per_series=1)
    engine = node.services.engine
    pages = engine.find_pages

    def slow_pages(*args: Any, **kwargs: Any) -> Any:
        time.sleep(TIMEOUT + 0.5)
        return pages(*args, **kwargs)

    monkeypatch.setattr(engine, "find_pages", slow_pages)
    ae = AE(ae_title=REQUESTOR_AET)
    ae.add_requested_context(StudyFind)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        replies = list(assoc.send_c_find(identifier("STUDY", StudyInstanceUID=""),
                                         StudyFind))
        assert replies[-1][0].Status == 0x0000
        time.sleep(0.3)
        assert assoc.is_established
        monkeypatch.setattr(engine, "find_pages", pages)  # the next request, at once
        replies = list(assoc.send_c_find(identifier("STUDY", StudyInstanceUID=""),
                                         StudyFind))
        assert replies[-1][0].Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
