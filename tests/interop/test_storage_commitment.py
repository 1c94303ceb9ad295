"""Storage Commitment Push Model (PS3.4 Annex J) against a pynetdicom requestor (dcmtk
has no storage commitment SCU), with the seam and without it (``-m dimse``).

The requestor stores instances with C-STORE and asks the node to commit to them, to an
unknown instance, to a stored one under another SOP class and to one whose stored bytes
were altered; the Storage Commitment Result arrives

- (a) on the requestor's own association, which it keeps open (with the seam; without
  it, on a new association);
- (b) on a new association to the requestor's SCP (its address in PACS_MODALITIES),
  when the requestor releases at once;
- after a restart of the node, when the requestor's SCP was down until then;
- to a requestor that goes on storing on its association after its request, once the
  association is quiet, on it, or on a new one when it stays busy, every store answered;
- to a requestor without an address in PACS_MODALITIES that releases at once, on the
  next association it opens (with the seam);

an AE without the ``store`` right of the access rules is refused (0124) and nothing is
recorded.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import apsw
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from pacs.dimse.reports import QUIET, QUIET_WAIT
from tests.auditcheck import problems, read_trail
from tests.conftest import SEAM, free_port
from tests.interop.conftest import AE_TITLE, Node, fresh_ct

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: The Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3.5).
PUSH_MODEL, PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1"
#: The requestor, whose SCP address the node knows.
REQUESTOR = "REQUESTOR"
#: References one request may hold on the test node.
MAX_REFERENCES = 20
#: Seconds a report may take to arrive (a verification, the node's grace on the same
#: association, a retry after a restart).
WAIT = 60.0


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


#: A known AE with every right but ``store`` (unknown AEs have every right).
NO_STORE = "NOSTORE"
#: A requestor not in PACS_MODALITIES: no address to open an association to.
STRANGER = "STRANGER"


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], scp_port: int,
         tmp_path_factory: pytest.TempPathFactory) -> Node:
    rules = tmp_path_factory.mktemp("commitment-access") / "access.toml"
    rules.write_text(f'[[ae]]\ntitle = "{NO_STORE}"\n'
                     'rights = ["echo", "overwrite", "find", "retrieve"]\n')
    return node_factory("commitment", PACS_MODALITIES=f"{REQUESTOR}=127.0.0.1:{scp_port}",
                        PACS_COMMITMENT_MAX_REFERENCES=str(MAX_REFERENCES),
                        PACS_DIMSE_TIMEOUT="15", PACS_ACCESS_FILE=str(rules))


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT received: on which association, its event type and content."""

    assoc: Association
    event_type: int
    instance_uid: str
    transaction_uid: str
    retrieve_ae: str
    committed: set[tuple[str, str]]
    failed: dict[tuple[str, str], int]


def _report(event: Any, reports: queue.Queue[Report], answer: int = 0x0000
            ) -> tuple[int, None]:
    """EVT_N_EVENT_REPORT: keep what arrived, answer ``answer`` (Success)."""
    info = event.event_information
    reports.put(Report(
        event.assoc, int(event.event_type), str(event.request.AffectedSOPInstanceUID),
        str(info.TransactionUID), str(info.get("RetrieveAETitle", "")),
        {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
         for i in info.get("ReferencedSOPSequence", [])},
        {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)): int(i.FailureReason)
         for i in info.get("FailedSOPSequence", [])}))
    return answer, None


@dataclass
class RequestorSCP:
    """The requestor's SCP: accepts the node's association, on which the node proposes
    the SCP role (PS3.4 J.3.3.1.3; ``roles`` False: it does not answer the proposal),
    keeps the reports it receives and answers them ``answer``."""

    port: int
    reports: queue.Queue[Report]
    server: Any = None
    answer: int = 0x0000
    roles: bool = True

    def start(self) -> None:
        ae = AE(ae_title=REQUESTOR)
        if self.roles:
            ae.add_supported_context(PUSH_MODEL, scu_role=False, scp_role=True)
        else:
            ae.add_supported_context(PUSH_MODEL)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, _report, [self.reports, self.answer])])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def requestor_scp(scp_port: int) -> Iterator[RequestorSCP]:
    scp = RequestorSCP(scp_port, queue.Queue())
    yield scp
    scp.stop()


def associate(node: Node, ae_title: str, reports: queue.Queue[Report] | None = None,
              address: str = "127.0.0.1") -> Association:
    """A requestor's association (from ``address``): CT storage, Study Root C-FIND and
    the Push Model; with ``reports``, it takes the N-EVENT-REPORT the node may send on
    it."""
    ae = AE(ae_title=ae_title)
    handlers = [] if reports is None else [(evt.EVT_N_EVENT_REPORT, _report, [reports])]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, evt_handlers=handlers,
                         contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian),
                                   build_context(StudyRootQueryRetrieveInformationModelFind),
                                   build_context(PUSH_MODEL)],
                         bind_address=(address, 0))
    assert assoc.is_established, node.log()
    return assoc


@dataclass(frozen=True)
class Case:
    """What one request references, and what the node must answer for each."""

    action: Dataset
    transaction_uid: str
    committed: set[tuple[str, str]]
    failed: dict[tuple[str, str], int]


def action_information(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    """The Action Information of a Storage Commitment Request (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def store_and_ask(node: Node, assoc: Association) -> Case:
    """Store four CT instances, alter the bytes of one in the store, and build the
    request: two intact ones, an unknown UID, one under another SOP class, the altered
    one."""
    stored = []
    for _ in range(4):
        ds = fresh_ct()
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000, node.log()
        stored.append(str(ds.SOPInstanceUID))
    intact, wrong_class, altered = stored[:2], stored[2], stored[3]
    path = node.object_path(node.index()[altered])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last pixel byte: still a readable object, not the one stored
    path.write_bytes(bytes(data))
    unknown = generate_uid()
    committed = {(CTImageStorage, uid) for uid in intact}
    failed = {(CTImageStorage, unknown): 0x0112, (MRImageStorage, wrong_class): 0x0119,
              (CTImageStorage, altered): 0x0110}
    transaction = generate_uid()
    action = action_information(transaction, [*sorted(committed), *failed])
    return Case(action, transaction, committed, failed)


def n_action(assoc: Association, action: Dataset | None, action_type: int = 1,
             instance_uid: str = PUSH_MODEL_INSTANCE) -> int:
    """Send an N-ACTION; its status."""
    status, _ = assoc.send_n_action(action, action_type, PUSH_MODEL,
                                    instance_uid)
    return int(status.Status)


def ask_and_release(node: Node, ae_title: str = REQUESTOR) -> Case:
    """A requestor that stores, asks and releases its association at once."""
    assoc = associate(node, ae_title)
    try:
        case = store_and_ask(node, assoc)
        assert n_action(assoc, case.action) == 0x0000, node.log()
    finally:
        assoc.release()
    return case


def assert_result(report: Report, case: Case) -> None:
    assert report.event_type == 2  # failures exist (PS3.4 J.3.3.1.2)
    assert report.instance_uid == PUSH_MODEL_INSTANCE
    assert report.transaction_uid == case.transaction_uid
    assert report.committed == case.committed
    assert report.failed == case.failed
    assert report.retrieve_ae == AE_TITLE


def waiting(node: Node) -> list[tuple[str, int, str]]:
    """(requestor, failed attempts, last error) of each request waiting in the index."""
    conn = apsw.Connection(str(node.data_dir / "index.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        return [(str(ae), int(n), str(error)) for ae, n, error in conn.execute(
            "SELECT requestor_ae, attempts, last_error FROM commitment")]
    finally:
        conn.close()


def forget_waiting(node: Node) -> None:
    """Remove every request waiting in the node's index."""
    conn = apsw.Connection(str(node.data_dir / "index.sqlite"))
    try:
        conn.set_busy_timeout(10_000)
        conn.execute("DELETE FROM commitment")
    finally:
        conn.close()


def assert_removed(node: Node) -> None:
    """The request leaves the queue once the node has the report's response (a moment
    after the requestor's handler ran)."""
    deadline = time.monotonic() + WAIT
    while waiting(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not waiting(node), node.log()


def test_the_result_comes_on_the_association_the_requestor_keeps_open(
        node: Node, requestor_scp: RequestorSCP) -> None:
    """With the seam; without it (no thread of the association's own to send it), on a
    new association to the requestor's address."""
    requestor_scp.start()
    reports: queue.Queue[Report] = queue.Queue()
    assoc = associate(node, REQUESTOR, reports)
    try:
        case = store_and_ask(node, assoc)
        assert n_action(assoc, case.action) == 0x0000, node.log()
        report = next_report(reports, requestor_scp.reports)
        assert (report.assoc is assoc) is SEAM
        # The requestor answers the report before it releases: its handler has run, but
        # the response leaves a moment later, and a release before it would leave the
        # result unconfirmed (and sent again on a new association).
        assert_removed(node)
    finally:
        assoc.release()
    assert_result(report, case)
    assert reports.empty() and requestor_scp.reports.empty()  # not sent again
    # The association's audit names the request (PS3.15 A.5.3.6).
    requested = [e for e in read_trail(node.data_dir / "audit.jsonl")
                 if "Storage commitment request of 5 instance(s): N-ACTION status 0000"
                 in e["EventIdentification"].get("EventOutcomeDescription", "")]
    assert len(requested) == 1 and problems(requested[0]) == [], requested
    assert requested[0]["ActiveParticipant"][0]["UserID"] == REQUESTOR


def next_report(*queues: queue.Queue[Report]) -> Report:
    """The first report to arrive on any of ``queues``."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for reports in queues:
            try:
                return reports.get(timeout=0.05)
            except queue.Empty:
                continue
    raise AssertionError("no storage commitment report arrived")


def store_one(assoc: Association) -> int:
    """One C-STORE; its status (none: no valid response)."""
    return int(assoc.send_c_store(fresh_ct()).get("Status", -1))


def find_studies(assoc: Association) -> int:
    """One Study Root C-FIND of every study; the final status."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    final = -1
    for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        final = int(status.get("Status", -1))
    return final


@pytest.mark.parametrize(("ae_title", "storing", "operation"), [
    (REQUESTOR, 3.0, store_one), (STRANGER, 3.0, store_one),
    (REQUESTOR, QUIET_WAIT + 3.0, store_one),  # busy past the wait: a new association
    (REQUESTOR, 3.0, find_studies),  # C-FIND answers written meanwhile
])
def test_a_requestor_that_goes_on_storing_after_its_request_loses_nothing(
        node: Node, requestor_scp: RequestorSCP, ae_title: str, storing: float,
        operation: Callable[[Association], int]) -> None:
    """One store, the request, then C-STOREs (or C-FINDs) back to back on the same
    association (a modality asking for commitment of one series while it sends the
    next): a request must not be taken for the report's response, nor the report
    written among the answers.  Every request is answered Success, the association is
    not aborted, and the result is delivered once: on the association once it is quiet,
    or, to a requestor with an address, on a new association when it stays busy; a
    requestor without one gets it on its own association."""
    if ae_title == STRANGER and not SEAM:
        pytest.skip("seam only (PACS_DIMSE_SEAM=off): a report on the requestor's "
                    "association is sent by the association's own thread")
    requestor_scp.start()
    reports: queue.Queue[Report] = queue.Queue()
    assoc = associate(node, ae_title, reports)
    try:
        first = fresh_ct()
        assert assoc.send_c_store(first).Status == 0x0000, node.log()
        transaction = generate_uid()
        committed = {(CTImageStorage, str(first.SOPInstanceUID))}
        assert n_action(assoc, action_information(transaction, sorted(committed))) \
            == 0x0000, node.log()
        started, stored = time.monotonic(), 0
        while time.monotonic() - started < storing:
            status = operation(assoc)
            assert assoc.is_established, node.log()
            assert status == 0x0000, (status, node.log())
            stored += 1
        report = next_report(reports, requestor_scp.reports)
        assert report.transaction_uid == transaction
        assert report.committed == committed and not report.failed
        if ae_title == STRANGER:
            assert report.assoc is assoc
        if storing > QUIET_WAIT + QUIET:
            assert report.assoc is not assoc  # it did not wait for the stores to end
        assert_removed(node)  # delivered: the requestor's Success was taken as such
        assert assoc.is_established, node.log()
    finally:
        assoc.release()
    assert reports.empty() and requestor_scp.reports.empty()  # delivered once
    assert stored > 2, stored  # requests kept coming while the report waited
    assert "invalid" not in node.log().lower(), node.log()


def test_the_result_comes_on_a_new_association_after_a_release(
        node: Node, requestor_scp: RequestorSCP) -> None:
    requestor_scp.start()
    case = ask_and_release(node)
    report = requestor_scp.reports.get(timeout=WAIT)
    assert_result(report, case)
    # The node requested the association, proposing the SCP role (PS3.4 J.3.3.1.3).
    assert report.assoc.requestor.ae_title == AE_TITLE
    accepted = {str(cx.abstract_syntax): cx for cx in report.assoc.accepted_contexts}
    assert accepted[PUSH_MODEL].as_scu  # the requestor's SCP: SCU here
    assert_removed(node)


def test_a_result_waiting_over_a_restart_is_delivered(
        node: Node, requestor_scp: RequestorSCP) -> None:
    case = ask_and_release(node)
    deadline = time.monotonic() + WAIT
    while not any(attempts for _, attempts, _ in waiting(node)):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)  # the requestor's SCP is down: the first attempt fails
    assert [ae for ae, _, _ in waiting(node)] == [REQUESTOR]
    status = node.cli("status")
    assert "storage commitment: 1 result(s) waiting for delivery" in status.stdout, status
    node.restart()
    requestor_scp.start()
    report = requestor_scp.reports.get(timeout=WAIT)
    assert_result(report, case)
    assert_removed(node)
    assert requestor_scp.reports.empty()  # delivered once


def test_the_result_for_a_requestor_without_an_address_waits_for_its_next_association(
        node: Node, requestor_scp: RequestorSCP) -> None:
    """Its own associations are the only way back: once it left the one it asked on,
    the result waits in the queue, sent nowhere else, and goes on the next association
    it opens, once that is quiet (with the seam; without it, it waits out its time)."""
    requestor_scp.start()
    case = ask_and_release(node, STRANGER)
    deadline = time.monotonic() + WAIT
    while not any(attempts for _, attempts, _ in waiting(node)):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)  # tried on its association, gone: kept
    assert [ae for ae, _, _ in waiting(node)] == [STRANGER]
    assert requestor_scp.reports.empty()
    if not SEAM:
        forget_waiting(node)  # kept for an hour: not for the tests that follow
        return
    reports: queue.Queue[Report] = queue.Queue()
    assoc = associate(node, STRANGER, reports)
    try:
        report = reports.get(timeout=WAIT)
        assert report.assoc is assoc
        assert_removed(node)
    finally:
        assoc.release()
    assert_result(report, case)
    assert requestor_scp.reports.empty()


def until_tried(node: Node) -> list[tuple[str, int, str]]:
    """The waiting requests once one attempt to deliver has failed."""
    deadline = time.monotonic() + WAIT
    while not any(attempts for _, attempts, _ in waiting(node)):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)
    return waiting(node)


def ask(node: Node, refs: list[tuple[str, str]], transaction: str = "",
        ae_title: str = REQUESTOR, address: str = "127.0.0.1") -> tuple[str, int]:
    """One request on an association of its own; its Transaction UID and status."""
    transaction = transaction or generate_uid()
    assoc = associate(node, ae_title, address=address)
    try:
        return transaction, n_action(assoc, action_information(transaction, refs))
    finally:
        assoc.release()


def store_cts(node: Node, count: int) -> list[Dataset]:
    """``count`` CT instances stored, each of a study of its own."""
    assoc = associate(node, REQUESTOR)
    try:
        sent = [fresh_ct() for _ in range(count)]
        for ds in sent:
            assert assoc.send_c_store(ds).Status == 0x0000, node.log()
        return sent
    finally:
        assoc.release()


def test_an_instance_removed_after_the_check_is_reported_failed(
        node: Node, requestor_scp: RequestorSCP) -> None:
    """The result is checked when the request is answered and the committed instances
    looked up again before each delivery: one deleted in between (a rejection note, a
    deletion, a retention expiry) is reported failed (0112), never committed (Event Type
    1 lets the requestor delete its copy, PS3.4 J.3.3.1.2)."""
    kept, removed = store_cts(node, 2)
    refs = [(CTImageStorage, str(ds.SOPInstanceUID)) for ds in (kept, removed)]
    transaction, status = ask(node, refs)
    assert status == 0x0000, node.log()
    until_tried(node)  # checked: both committed; the requestor's SCP is down
    done = node.cli("delete", "--yes", "--quiet", str(removed.StudyInstanceUID))
    assert done.returncode == 0, done
    requestor_scp.start()
    report = requestor_scp.reports.get(timeout=WAIT)
    assert report.transaction_uid == transaction and report.event_type == 2
    assert report.committed == {refs[0]}
    assert report.failed == {refs[1]: 0x0112}
    assert_removed(node)


def test_a_transaction_uid_names_one_request(node: Node, requestor_scp: RequestorSCP
                                             ) -> None:
    """A request sent again while its result waits is answered Success and by the one
    report; the same Transaction UID with other references is refused (0115: PS3.3
    C.14.1.1 0131, duplicate transaction UID) and changes nothing."""
    first, second = store_cts(node, 2)
    refs = [(CTImageStorage, str(first.SOPInstanceUID))]
    transaction, status = ask(node, refs)
    assert status == 0x0000, node.log()
    assert ask(node, refs, transaction) == (transaction, 0x0000)
    other = [*refs, (CTImageStorage, str(second.SOPInstanceUID))]
    assert ask(node, other, transaction) == (transaction, 0x0115)
    assert len(until_tried(node)) == 1
    requestor_scp.start()
    report = requestor_scp.reports.get(timeout=WAIT)
    assert report.transaction_uid == transaction and report.committed == set(refs)
    assert_removed(node)
    time.sleep(QUIET + 1.0)  # anything else would have followed by now
    assert requestor_scp.reports.empty()


@pytest.mark.parametrize(("answer", "kept"), [(0x0113, False), (0x0110, True)])
def test_a_report_refused_for_good_is_dropped_and_one_refused_for_now_kept(
        node: Node, scp_port: int, answer: int, kept: bool) -> None:
    """0113 (No such event type, PS3.7 10.1.1.1.8) will be answered again: the result
    is dropped after it (sent again for ever, its requestor's share of the queue filled
    and its later requests refused); 0110 (Processing failure) may not: sent again."""
    scp = RequestorSCP(scp_port, queue.Queue(), answer=answer)
    scp.start()
    try:
        (stored,) = store_cts(node, 1)
        transaction, status = ask(node, [(CTImageStorage, str(stored.SOPInstanceUID))])
        assert status == 0x0000, node.log()
        assert scp.reports.get(timeout=WAIT).transaction_uid == transaction
        if kept:
            assert [ae for ae, _, _ in until_tried(node)] == [REQUESTOR]
            forget_waiting(node)
        else:
            assert_removed(node)
            assert "is dropped: it was answered 0113" in node.log()
    finally:
        scp.stop()


def test_no_report_goes_where_the_scp_role_was_not_accepted(
        node: Node, scp_port: int) -> None:
    """The node proposes the SCP role on the association it opens to report; an
    acceptor that does not answer the proposal leaves it the SCU role only (PS3.7
    D.3.3.4), on which no N-EVENT-REPORT request may go: the result waits."""
    scp = RequestorSCP(scp_port, queue.Queue(), roles=False)
    scp.start()
    try:
        (stored,) = store_cts(node, 1)
        _, status = ask(node, [(CTImageStorage, str(stored.SOPInstanceUID))])
        assert status == 0x0000, node.log()
        [(_, _, error)] = until_tried(node)
        assert "SCP role" in error, error
        assert scp.reports.empty()
    finally:
        scp.stop()
        forget_waiting(node)


def test_a_result_goes_on_no_association_from_another_address(node: Node) -> None:
    """Another host calling itself by the requestor's AE title is not sent the
    requestor's result (nor does its Success drop it); the requestor's own next
    association from the request's address gets it."""
    if not SEAM:
        pytest.skip("seam only (PACS_DIMSE_SEAM=off): a report on the requestor's "
                    "association is sent by the association's own thread")
    (stored,) = store_cts(node, 1)
    transaction, status = ask(node, [(CTImageStorage, str(stored.SOPInstanceUID))],
                              ae_title=STRANGER)
    assert status == 0x0000, node.log()
    until_tried(node)
    for address, expected in (("127.0.0.2", False), ("127.0.0.1", True)):
        reports: queue.Queue[Report] = queue.Queue()
        assoc = associate(node, STRANGER, reports, address)
        try:
            if expected:
                assert reports.get(timeout=WAIT).transaction_uid == transaction
                assert_removed(node)
            else:
                time.sleep(QUIET + QUIET_WAIT)
                assert reports.empty() and waiting(node), node.log()
        finally:
            assoc.release()


@pytest.mark.parametrize(("change", "expected"), [
    ("action type 2", 0x0123),        # no such action
    ("another instance", 0x0112),     # not the well-known instance
    ("no action information", 0x0115),
    ("no transaction uid", 0x0115),
    ("no reference", 0x0115),
    ("too many references", 0x0213),  # PACS_COMMITMENT_MAX_REFERENCES
])
def test_a_request_the_node_cannot_take_is_refused(node: Node, change: str,
                                                   expected: int) -> None:
    refs = [(CTImageStorage, generate_uid())]
    if change == "too many references":
        refs *= MAX_REFERENCES + 1
    action: Dataset | None = action_information(generate_uid(), refs)
    assert action is not None
    action_type, instance = 1, PUSH_MODEL_INSTANCE
    if change == "action type 2":
        action_type = 2
    elif change == "another instance":
        instance = generate_uid()
    elif change == "no action information":
        action = None
    elif change == "no transaction uid":
        del action.TransactionUID
    elif change == "no reference":
        action.ReferencedSOPSequence = []
    assoc = associate(node, REQUESTOR)
    try:
        assert n_action(assoc, action, action_type, instance) == expected
        assert assoc.is_established  # a refusal, not an abort
    finally:
        assoc.release()
    assert not waiting(node)  # nothing recorded


def test_a_requestor_without_the_store_right_is_refused(node: Node) -> None:
    """0124 (Refused: not authorized, PS3.7 C.5.21): an AE that may not store may not
    ask about what it stored; the request is neither recorded nor reported, and the
    refusal is in the audit trail."""
    assoc = associate(node, REQUESTOR)
    try:
        ds = fresh_ct()
        assert assoc.send_c_store(ds).Status == 0x0000, node.log()
    finally:
        assoc.release()
    transaction = generate_uid()
    action = action_information(transaction, [(CTImageStorage, str(ds.SOPInstanceUID))])
    refused = associate(node, NO_STORE)
    try:
        assert n_action(refused, action) == 0x0124, node.log()
        assert refused.is_established  # a refusal, not an abort
    finally:
        refused.release()
    assert not waiting(node)  # nothing recorded: nothing to report
    wanted = "Storage commitment request of 0 instance(s): N-ACTION status 0124"
    deadline = time.monotonic() + WAIT
    while not (events := [e for e in read_trail(node.data_dir / "audit.jsonl")
                          if wanted in e["EventIdentification"].get(
                              "EventOutcomeDescription", "")]):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)  # the association's events are written once it ended
    assert events[0]["ActiveParticipant"][0]["UserID"] == NO_STORE
    assert events[0]["EventIdentification"]["EventOutcomeIndicator"] == 8


#: The DIMSE timeout of the node whose requestor never answers its report.
SHORT_TIMEOUT = 3


def test_a_requestor_that_never_answers_its_report_is_aborted_and_held_off(
        node_factory: Callable[..., Node]) -> None:
    """A requestor that keeps its association and never answers the N-EVENT-REPORT held
    the worker's one report thread for a DIMSE timeout per result, and the association
    stayed, the next report sent on it with the first unanswered (PS3.7 D.3.3.3: no
    Asynchronous Operations Window).  The association is aborted after the timeout,
    and the requestor's next association claims nothing for a while, so that another
    requestor's report goes at once."""
    if not SEAM:
        pytest.skip("reports on the requestor's association need the seam's reactor")
    node = node_factory("commitment-silent", PACS_DIMSE_TIMEOUT=str(SHORT_TIMEOUT),
                        PACS_DIMSE_WORKERS="1")
    received: list[int] = []

    def silent(event: Any) -> tuple[int, None]:
        received.append(int(event.request.MessageID))
        time.sleep(SHORT_TIMEOUT + QUIET + 1)
        return 0x0000, None

    ae = AE(ae_title="SILENT")
    quiet = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         contexts=[build_context(PUSH_MODEL), build_context(Verification)],
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, silent)])
    assert quiet.is_established, node.log()
    unknown = [(CTImageStorage, generate_uid())]
    for _ in range(3):
        assert n_action(quiet, action_information(generate_uid(), unknown)) == 0x0000
    # Kept alive (an idle association ends at the network timeout anyway), with pauses
    # longer than QUIET for the report to go in.
    deadline = time.monotonic() + WAIT
    while quiet.is_established:
        assert time.monotonic() < deadline, node.log()
        with contextlib.suppress(Exception):  # aborted meanwhile
            quiet.send_c_echo()
        time.sleep(QUIET + 0.5)
    assert quiet.is_aborted
    assert len(received) == 1  # one report, unanswered; none sent after it
    while "did not answer a report within the DIMSE timeout" not in node.log():
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)

    again: queue.Queue[Report] = queue.Queue()
    reconnected = associate(node, "SILENT", again)
    honest: queue.Queue[Report] = queue.Queue()
    other = associate(node, "HONEST", honest)
    try:
        assert n_action(other, action_information(generate_uid(), unknown)) == 0x0000
        assert honest.get(timeout=WAIT).assoc is other
        time.sleep(QUIET + 1)
        assert again.empty()  # its results wait: this association claimed none
    finally:
        for assoc in (reconnected, other):
            assoc.release()
