"""C-MOVE and C-GET through the real pynetdicom stack (PS3.4 C.4.2, C.4.3).

The node runs in-process (:func:`pacs.dimse.server.start`); requestors and C-MOVE
destinations are pynetdicom AEs started by the tests.  What is checked: received data
sets byte-identical to the stored objects, sub-operation counts in every response,
Move Originator AE Title / Message ID (PS3.7 9.3.1.1), C-CANCEL, the refusal statuses
(A801, A900, A702), role selection for C-GET, and decompression for a destination that
only takes Explicit VR Little Endian.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet as PatientGet,
    PatientRootQueryRetrieveInformationModelMove as PatientMove,
    StudyRootQueryRetrieveInformationModelGet as StudyGet,
    StudyRootQueryRetrieveInformationModelMove as StudyMove,
)

from pacs.core import access, audit, config
from pacs.core.deletion import Target, reference
from pacs.core.errors import StorageError
from pacs.core.index.compiler import MAX_UIDS
from pacs.core.services import Services, drain
from pacs.core.storage import object_key
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import retrieve
from pacs.dimse.server import NodeServer, start, stop
from tests.conftest import SEAM, folder_store, free_port, sample, seam_only
from tests.factory import make_instance, uid_list_of_length

pytestmark = pytest.mark.dimse

NODE_AET = "INTELPIXEL"
REQUESTOR_AET = "RETRIEVER"

#: pydicom's compressed test files: JPEG baseline and extended (12 bit), JPEG lossless,
#: JPEG 2000 (lossless and lossy), RLE, JPEG-LS (lossless and near-lossless).
COMPRESSED = ("SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "JPEG-LL.dcm",
              "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
              "SC_rgb_rle.dcm", "MR_small_jpeg_ls_lossless.dcm",
              "JPEGLSNearLossless_16.dcm")
#: A JPEG Extended file whose pixel data pylibjpeg cannot decode ("misplaced marker").
UNDECODABLE = "JPEG-lossy.dcm"


# --- helpers ------------------------------------------------------------------------------

def dataset_part(part10: bytes) -> bytes:
    """What follows the file meta group of a Part 10 object (walked by lengths, so
    independent of the code under test; file meta is explicit VR little endian)."""
    assert part10[128:132] == b"DICM"
    position = 132
    while int.from_bytes(part10[position:position + 2], "little") == 0x0002:
        vr = part10[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            position += 12 + int.from_bytes(part10[position + 8:position + 12], "little")
        else:
            position += 8 + int.from_bytes(part10[position + 6:position + 8], "little")
    return part10[position:]


def uid_list(ident: Dataset | None) -> list[str]:
    """(0008,0058) Failed SOP Instance UID List as a list (one value reads as a str)."""
    assert ident is not None and "FailedSOPInstanceUIDList" in ident
    value = ident.FailedSOPInstanceUIDList
    return [value] if isinstance(value, str) else list(value)


def identifier(level: str, **keys: object) -> Dataset:
    """A retrieve identifier."""
    ds = Dataset()
    if level:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def with_new_uids(path: Path, study: str, series: str | None = None) -> bytes:
    """A pydicom test file under new UIDs, still in its own transfer syntax."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "COMPRESSED"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Received:
    """One C-STORE a destination or a C-GET requestor received."""

    sop_uid: str
    transfer_syntax: str
    data: bytes
    originator_aet: str | None
    originator_id: int | None
    calling_aet: str


def _recorder(into: list[Received], delay: float = 0.0) -> Callable[[Any], int]:
    def on_store(event: Any) -> int:
        request = event.request
        into.append(Received(
            sop_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            data=event.encoded_dataset(include_meta=False),
            originator_aet=request.MoveOriginatorApplicationEntityTitle,
            originator_id=request.MoveOriginatorMessageID,
            calling_aet=event.assoc.requestor.ae_title))
        if delay:
            time.sleep(delay)
        return 0x0000

    return on_store


@dataclass
class Destination:
    """A pynetdicom storage SCP acting as C-MOVE destination."""

    ae_title: str
    port: int
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    server: Any = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def start_destination(ae_title: str, syntaxes: list[str] | None = None,
                      refuse: bool = False) -> Destination:
    """A storage SCP accepting every storage class in ``syntaxes`` (all by default).

    ``refuse`` rejects every association (calling AE title not recognised).
    """
    dest = Destination(ae_title, free_port())
    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes or ALL_TRANSFER_SYNTAXES)
    if refuse:
        ae.require_calling_aet = ["SOMEONE-ELSE"]

    def opened(event: Any) -> None:
        dest.connections += 1

    dest.server = ae.start_server(
        ("127.0.0.1", dest.port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, _recorder(dest.received)),
                      (evt.EVT_CONN_OPEN, opened)])
    return dest


@dataclass
class Node:
    """The node under test: services and a running SCP."""

    services: Services
    port: int
    server: NodeServer

    def stored(self, study: str, series: str, sop: str) -> bytes:
        with self.services.store.open(object_key(study, series, sop)) as source:
            return source.read()

    def ingest(self, data: bytes) -> None:
        self.services.ingest.store_bytes(data, calling_ae="TEST")


@pytest.fixture
def destinations() -> Iterator[Callable[..., Destination]]:
    """Start C-MOVE destinations; all are stopped at the end."""
    started: list[Destination] = []

    def make(ae_title: str, **kwargs: Any) -> Destination:
        dest = start_destination(ae_title, **kwargs)
        started.append(dest)
        return dest

    yield make
    for dest in started:
        dest.stop()


@pytest.fixture
def make_node(settings: config.Settings, make_services: Callable[..., Services],
              ) -> Iterator[Callable[..., Node]]:
    """Start a node over a folder store (or ``store``) knowing ``destinations``; its
    retrieves send a pending response after every sub-operation unless
    ``pending_interval`` says otherwise (``PACS_PENDING_INTERVAL``)."""
    servers: list[NodeServer] = []

    def make(*dests: Destination, store: Any = None, modalities: str = "",
             pending_interval: float = 0.0) -> Node:
        table = ",".join([f"{d.ae_title}=127.0.0.1:{d.port}" for d in dests]
                         + ([modalities] if modalities else []))
        services = make_services(
            store=store if store is not None else folder_store(settings.objects_dir),
            modalities=table, destinations=config.parse_modalities(table),
            pending_interval=pending_interval)
        port = free_port()
        server = start(services, ("127.0.0.1", port))
        assert server.uses_seam is SEAM  # PACS_DIMSE_SEAM reached the node
        servers.append(server)
        return Node(services, port, server)

    yield make
    for server in servers:
        stop(server, drain=1.0)


@pytest.fixture
def requestors() -> Iterator[Callable[..., Association]]:
    """Open associations to a node; all are released (or aborted) at the end."""
    opened: list[Association] = []

    def associate(node: Node, *, get_classes: dict[str, list[str]] | None = None,
                  with_roles: bool = True, received: list[Received] | None = None,
                  delay: float = 0.0, identifier_syntaxes: list[str] | None = None
                  ) -> Association:
        ae = AE(ae_title=REQUESTOR_AET)
        for model in (StudyMove, PatientMove, StudyGet, PatientGet):
            if identifier_syntaxes:
                ae.add_requested_context(model, identifier_syntaxes)
            else:
                ae.add_requested_context(model)
        roles = []
        for sop_class, syntaxes in (get_classes or {}).items():
            ae.add_requested_context(sop_class, syntaxes)
            if with_roles:
                roles.append(build_role(sop_class, scp_role=True))
        handlers = [(evt.EVT_C_STORE, _recorder(received if received is not None else [],
                                                delay))]
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET,
                             ext_neg=roles or None, evt_handlers=handlers)
        assert assoc.is_established
        opened.append(assoc)
        return assoc

    yield associate
    for assoc in opened:
        if assoc.is_established:
            assoc.release()


def responses(generator: Iterator[tuple[Dataset, Dataset | None]]
              ) -> list[tuple[Dataset, Dataset | None]]:
    out = list(generator)
    assert out, "no response"
    return out


def counts(status: Dataset) -> tuple[int | None, int, int, int]:
    """(Remaining, Completed, Failed, Warning) of a response."""
    return (status.get("NumberOfRemainingSuboperations"),
            status.get("NumberOfCompletedSuboperations"),
            status.get("NumberOfFailedSuboperations"),
            status.get("NumberOfWarningSuboperations"))


def assert_counted(replies: list[tuple[Dataset, Dataset | None]], total: int,
                   final_status: int, completed: int, failed: int = 0) -> None:
    """Pending FF00 with decreasing Remaining after each sub-operation, then the final."""
    *pending, (final, _) = replies
    for number, (status, ident) in enumerate(pending, start=1):
        assert status.Status == 0xFF00
        assert ident is None
        remaining, done, fails, warns = counts(status)
        assert remaining == total - number
        assert done + fails + warns == number
    assert final.Status == final_status
    assert counts(final)[1:] == (completed, failed, 0)
    assert "NumberOfRemainingSuboperations" not in final or final_status == 0xFE00


# --- test data ------------------------------------------------------------------------------

@dataclass
class Study:
    """UIDs of a stored study: series UID -> SOP Instance UIDs."""

    uid: str
    series: dict[str, list[str]]
    patient_id: str

    @property
    def sops(self) -> list[str]:
        return [sop for sops in self.series.values() for sop in sops]

    def key(self, sop: str) -> tuple[str, str, str]:
        series = next(s for s, sops in self.series.items() if sop in sops)
        return self.uid, series, sop


def store_study(node: Node, series: int = 2, per_series: int = 2,
                patient_id: str = "RETRIEVE", **attributes: object) -> Study:
    """A CT study of small instances (Explicit VR Little Endian) stored in the node."""
    study = Study(generate_uid(), {}, patient_id)
    for _ in range(series):
        series_uid = generate_uid()
        study.series[series_uid] = []
        for _ in range(per_series):
            sop = generate_uid()
            node.ingest(make_instance(StudyInstanceUID=study.uid, SeriesInstanceUID=series_uid,
                                      SOPInstanceUID=sop, PatientID=patient_id, **attributes))
            study.series[series_uid].append(sop)
    return study


def assert_identical(node: Node, study: Study, received: list[Received]) -> None:
    """Each received data set is the stored object's data set, byte for byte."""
    for item in received:
        stored = node.stored(*study.key(item.sop_uid))
        assert item.data == dataset_part(stored), f"{item.sop_uid} differs from the stored"
        assert item.transfer_syntax == pydicom.dcmread(io.BytesIO(stored)).file_meta \
            .TransferSyntaxUID


# --- C-GET --------------------------------------------------------------------------------

@pytest.mark.parametrize("store_kind", ["file", "memory"])
def test_get_study_sends_stored_bytes_with_counts(make_node: Callable[..., Node],
                                                  requestors: Callable[..., Association],
                                                  store_kind: str) -> None:
    """A folder store streams its files; a store without files goes via a temporary copy."""
    node = make_node(store=MemoryStore() if store_kind == "memory" else None)
    study = store_study(node, series=3, per_series=2)
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received)

    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet))

    assert_counted(replies, total=6, final_status=0x0000, completed=6)
    assert replies[-1][1] is None
    assert sorted(r.sop_uid for r in received) == sorted(study.sops)
    assert_identical(node, study, received)
    # C-GET sub-operations carry no Move Originator (PS3.7 9.3.1.1).
    assert {(r.originator_aet, r.originator_id) for r in received} == {(None, None)}


@pytest.mark.parametrize(("model", "level", "keys", "expected"), [
    (PatientGet, "PATIENT", lambda s: {"PatientID": s.patient_id}, lambda s: s.sops),
    (PatientGet, "STUDY", lambda s: {"PatientID": s.patient_id, "StudyInstanceUID": s.uid},
     lambda s: s.sops),
    (StudyGet, "SERIES", lambda s: {"StudyInstanceUID": s.uid,
                                    "SeriesInstanceUID": list(s.series)[1]},
     lambda s: s.series[list(s.series)[1]]),
    # A UID list at the retrieve level (C.2.2.2.2): two of the three series.
    (StudyGet, "SERIES", lambda s: {"SeriesInstanceUID": list(s.series)[:2]},
     lambda s: [sop for series in list(s.series)[:2] for sop in s.series[series]]),
    (PatientGet, "IMAGE", lambda s: {"PatientID": s.patient_id, "StudyInstanceUID": s.uid,
                                     "SeriesInstanceUID": list(s.series)[2],
                                     "SOPInstanceUID": s.series[list(s.series)[2]]},
     lambda s: s.series[list(s.series)[2]]),
    (StudyGet, "IMAGE", lambda s: {"SOPInstanceUID": [s.sops[0], s.sops[-1]]},
     lambda s: [s.sops[0], s.sops[-1]]),
])
def test_get_levels_of_both_models(make_node: Callable[..., Node],
                                   requestors: Callable[..., Association], model: str,
                                   level: str, keys: Callable[[Study], dict],
                                   expected: Callable[[Study], list[str]]) -> None:
    node = make_node()
    study = store_study(node, series=3, per_series=2, patient_id=f"P-{generate_uid()[-8:]}")
    store_study(node, series=1, per_series=2)  # another patient's study: never sent
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received)

    replies = responses(assoc.send_c_get(identifier(level, **keys(study)), model))

    want = expected(study)
    assert replies[-1][0].Status == 0x0000
    assert counts(replies[-1][0])[1:] == (len(want), 0, 0)
    assert sorted(r.sop_uid for r in received) == sorted(want)
    assert_identical(node, study, received)


@seam_only("pynetdicom's own C-GET loop sends a pending response after every sub-operation")
def test_get_pending_responses_follow_the_interval(make_node: Callable[..., Node],
                                                   requestors: Callable[..., Association],
                                                   ) -> None:
    """Pending responses are optional (PS3.4 C.4.3.3.1): a retrieve quicker than
    PACS_PENDING_INTERVAL has its final response only; a slower one reports its
    progress about once per interval, counts that add up, Remaining going down."""
    node = make_node(pending_interval=0.5)
    # Three instances, sent within milliseconds: a pending response could follow only
    # the first two, and only a hundred times later than they take.
    small = store_study(node, series=1, per_series=3)
    quick = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]})
    replies = responses(quick.send_c_get(identifier("STUDY", StudyInstanceUID=small.uid),
                                         StudyGet))
    assert [status.Status for status, _ in replies] == [0x0000]
    assert counts(replies[-1][0])[1:] == (3, 0, 0)

    study = store_study(node, series=1, per_series=30)
    # The requestor takes 30 x 50 ms at least to store them: 1.5 s, three intervals.
    slow = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                      received=[], delay=0.05)
    replies = responses(slow.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                        StudyGet))
    *pending, (final, _) = replies
    assert 1 <= len(pending) <= 10, len(pending)
    remaining = [counts(status)[0] for status, _ in pending]
    assert remaining == sorted(set(remaining), reverse=True)  # going down
    for status, _ in pending:
        left, done, fails, warns = counts(status)
        assert status.Status == 0xFF00 and left is not None and left + done + fails + warns == 30
    assert final.Status == 0x0000 and counts(final)[1:] == (30, 0, 0)


def test_get_cancel_stops_between_sub_operations(make_node: Callable[..., Node],
                                                 requestors: Callable[..., Association],
                                                 ) -> None:
    """C-CANCEL: FE00 with the counts so far and Remaining = not started (C.4.3.3)."""
    node = make_node()
    study = store_study(node, series=1, per_series=30)
    received: list[Received] = []
    # The requestor is slow to store, so the cancel arrives while sub-operations remain.
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received, delay=0.02)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == StudyGet)

    replies = []
    for status, ident in assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                          StudyGet, msg_id=11):
        replies.append((status, ident))
        if len(replies) == 1:
            assoc.send_c_cancel(11, context_id)

    final = replies[-1][0]
    remaining, completed, failed, warning = counts(final)
    assert final.Status == 0xFE00
    assert remaining is not None and remaining > 0
    assert completed + failed + warning + remaining == 30
    assert completed == len(received) < 30
    assert all(status.Status == 0xFF00 for status, _ in replies[:-1])


@seam_only("pynetdicom empties its cancel requests as it dispatches a request")
def test_a_cancel_sent_at_once_after_the_get_cancels_it(
        make_node: Callable[..., Node], requestors: Callable[..., Association],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-CANCEL-RQ read before the node's association thread dispatches its C-GET
    (PS3.7 9.3.3.3: the requestor may cancel at once): FE00, nothing sent.  The node
    here waits for the cancel before it dispatches, as a busy one may; pynetdicom
    emptied its cancel requests then, and every sub-operation ran."""
    from pacs.dimse.seam import services as seam_services

    node = make_node()
    study = store_study(node, series=1, per_series=5)
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == StudyGet)
    keep = seam_services.keep_early_cancel

    def after_the_cancel(served: Association, msg: Any) -> None:
        deadline = time.monotonic() + 10
        while msg.MessageID not in served.dimse.cancel_req:
            assert time.monotonic() < deadline, "the cancel never arrived"
            time.sleep(0.01)
        keep(served, msg)

    monkeypatch.setattr(seam_services, "keep_early_cancel", after_the_cancel)
    canceller = threading.Timer(0.2, assoc.send_c_cancel, (12, context_id))
    canceller.start()
    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet, msg_id=12))
    canceller.join()
    final = replies[-1][0]
    remaining, completed, failed, warning = counts(final)
    # Seen while the instances were matched or before the first sub-operation, the
    # cancel ends the answer with none done: FE00 with the Completed, Failed and
    # Warning counts (PS3.4 C.4.3.3.1), Remaining only once the count was known.
    assert final.Status == 0xFE00 and len(replies) == 1
    assert (completed, failed, warning) == (0, 0, 0) and remaining in (None, 5)
    assert received == []


def test_get_without_scp_role_fails_each_sub_operation(make_node: Callable[..., Node],
                                                       requestors: Callable[..., Association],
                                                       ) -> None:
    """No role selection for the storage class: every sub-operation fails, cleanly (A702)."""
    node = make_node()
    study = store_study(node, series=1, per_series=3)
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       with_roles=False)

    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet))

    final, ident = replies[-1]
    assert final.Status == 0xA702
    assert counts(final)[1:] == (0, 3, 0)
    assert sorted(uid_list(ident)) == sorted(study.sops)
    assert assoc.is_established  # the association goes on
    echo = assoc.send_c_get(identifier("STUDY", StudyInstanceUID=generate_uid()), StudyGet)
    assert [s.Status for s, _ in echo] == [0x0000]


@pytest.mark.parametrize("where", ["intake", "store"])
def test_instances_removed_during_a_get_are_failed_not_sent(
        make_node: Callable[..., Node], requestors: Callable[..., Association],
        where: str) -> None:
    """A study removed while a C-GET sends it, its objects still in the intake, or in
    the store whose deletes fail (S3 answering 503: the objects stay readable until the
    mover deletes them, minutes later): what follows the removal is counted failed
    (B000), not read from a snapshot taken before it, nor from the objects left, and
    reported sent (PS3.4 C.4.3.3: the counts say what happened)."""
    node = make_node()
    study = store_study(node, series=1, per_series=20)
    assert node.services.store.size(object_key(*study.key(study.sops[0]))) > 0
    if where == "store":
        drain(node.services)

        def failing(_key: str) -> None:
            raise StorageError("the store answered 503")

        node.services.store.backend.delete = failing  # type: ignore[method-assign]
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received, delay=0.05)
    at_removal: list[int] = []

    def remove_once_sending() -> None:
        while not received:
            time.sleep(0.005)
        deleter = node.services.deleter
        rows = deleter.plan([Target(study.uid)])
        deleter.remove([reference(row) for row in rows], audit.Participant("tester", True),
                       audit.APPLICATION_SERVER)
        at_removal.append(len(received))

    remover = threading.Thread(target=remove_once_sending)
    remover.start()
    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet))
    remover.join()

    final = replies[-1][0]
    _, completed, failed, _ = counts(final)
    assert final.Status == 0xB000
    assert completed == len(received)
    # Sent after the removal: at most the one being sent and the one read ahead.
    assert completed <= at_removal[0] + 2 < 20
    assert failed == 20 - completed


def test_get_partial_failure_lists_failed_instances(make_node: Callable[..., Node],
                                                    requestors: Callable[..., Association],
                                                    ) -> None:
    """CT negotiated with the SCP role, MR not: B000 with the MR UIDs in (0008,0058)."""
    node = make_node()
    study = store_study(node, series=1, per_series=2)
    mr = pydicom.dcmread(sample("MR_small.dcm"))
    mr.StudyInstanceUID = study.uid
    mr.SeriesInstanceUID = generate_uid()
    mr.SOPInstanceUID = generate_uid()
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    out = io.BytesIO()
    mr.save_as(out, enforce_file_format=True)
    node.ingest(out.getvalue())
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received)

    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet))

    final, ident = replies[-1]
    assert final.Status == 0xB000
    assert counts(final)[1:] == (2, 1, 0)
    assert uid_list(ident) == [mr.SOPInstanceUID]
    assert sorted(r.sop_uid for r in received) == sorted(study.sops)


def test_get_converts_for_a_requestor_without_the_stored_syntax(
        make_node: Callable[..., Node], requestors: Callable[..., Association]) -> None:
    """Stored explicit VR, requestor takes implicit VR only: converted, same content."""
    node = make_node()
    study = store_study(node, series=1, per_series=2)
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ImplicitVRLittleEndian]},
                       received=received)

    replies = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study.uid),
                                         StudyGet))

    assert replies[-1][0].Status == 0x0000
    assert {r.transfer_syntax for r in received} == {ImplicitVRLittleEndian}
    for item in received:
        got = _read_dataset(item.data, ImplicitVRLittleEndian)
        original = pydicom.dcmread(io.BytesIO(node.stored(*study.key(item.sop_uid))))
        assert got.SOPInstanceUID == item.sop_uid
        assert got.PixelData == original.PixelData
        assert got.PatientName == original.PatientName


def _read_dataset(data: bytes, syntax: str) -> Dataset:
    """A received data set (no file meta) read in its transfer syntax."""
    uid = UID(syntax)
    return pydicom.filereader.read_dataset(io.BytesIO(data), uid.is_implicit_VR,
                                           uid.is_little_endian)


def test_get_with_more_uids_than_a_query_holds_is_c000(make_node: Callable[..., Node],
                                                      requestors: Callable[..., Association]
                                                      ) -> None:
    """Unable to process (PS3.4 Table C.4-3), not A900: the identifier is valid, the
    query too large for the node to run; the requestor must split it."""
    node = make_node()
    study = store_study(node, series=1, per_series=2)
    series = next(iter(study.series))
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received, identifier_syntaxes=[ImplicitVRLittleEndian])
    absent = [f"1.2.3.{n}" for n in range(MAX_UIDS - len(study.sops))]

    def get(sops: list[str]) -> list[tuple[Dataset, Dataset | None]]:
        return responses(assoc.send_c_get(identifier(
            "IMAGE", SpecificCharacterSet="ISO_IR 192", StudyInstanceUID=study.uid,
            SeriesInstanceUID=series, SOPInstanceUID=sops), StudyGet))

    refused = get(study.sops + absent + ["1.2.3.4.5"])
    assert [status.Status for status, _ in refused] == [0xC000]
    assert "UIDs" in refused[0][0].ErrorComment
    assert received == []
    assert_counted(get(study.sops + absent), total=2, final_status=0x0000, completed=2)
    assert sorted(r.sop_uid for r in received) == sorted(study.sops)


# --- identifiers as encoded ---------------------------------------------------------------

#: Identifier encodings a requestor may use, each with a UID list whose length trips a
#: reader that does not follow the negotiated syntax: in Explicit VR a list over 64 KB,
#: which a UI element's 16-bit length cannot hold and pydicom (like other writers)
#: sends as UN (PS3.5 6.2.2); in Implicit VR a first element whose length's low bytes
#: spell "DS", as an explicit VR would.
IDENTIFIER_ENCODINGS = [
    pytest.param(ExplicitVRLittleEndian, 70_000, b"UN", id="explicit-over-64KB"),
    pytest.param(ImplicitVRLittleEndian, 0x5344, b"DS", id="implicit-length-spells-DS"),
]


def listed_uids(first: str, last: str, syntax: str, length: int, spelled: bytes
                ) -> Dataset:
    """An IMAGE-level retrieve identifier whose SOP Instance UID list (its first
    element) is ``length`` bytes long, ``first`` and ``last`` at its ends; checks that
    it is encoded as the case needs (bytes 4-5 of the element: ``spelled``)."""
    uids = [*uid_list_of_length([first], length - len(last) - 1), last]
    ident = identifier("IMAGE", SOPInstanceUID=uids)
    uid = UID(syntax)
    assert encode(ident, uid.is_implicit_VR, uid.is_little_endian)[:6] == \
        b"\x08\x00\x18\x00" + spelled
    return ident


@pytest.mark.parametrize(("syntax", "length", "spelled"), IDENTIFIER_ENCODINGS)
def test_get_reads_the_identifier_in_its_syntax(make_node: Callable[..., Node],
                                                requestors: Callable[..., Association],
                                                syntax: str, length: int, spelled: bytes,
                                                ) -> None:
    """Exactly the listed instances, the first and the last of the list included."""
    node = make_node()
    study = store_study(node, series=2, per_series=2)
    wanted = [study.sops[0], study.sops[-1]]
    received: list[Received] = []
    assoc = requestors(node, get_classes={CTImageStorage: [ExplicitVRLittleEndian]},
                       received=received, identifier_syntaxes=[syntax])
    ident = listed_uids(*wanted, syntax, length, spelled)

    replies = responses(assoc.send_c_get(ident, StudyGet))

    assert_counted(replies, total=2, final_status=0x0000, completed=2)
    assert sorted(r.sop_uid for r in received) == sorted(wanted)
    assert_identical(node, study, received)


@pytest.mark.parametrize(("syntax", "length", "spelled"), IDENTIFIER_ENCODINGS)
def test_move_reads_the_identifier_in_its_syntax(make_node: Callable[..., Node],
                                                 destinations: Callable[..., Destination],
                                                 requestors: Callable[..., Association],
                                                 syntax: str, length: int, spelled: bytes,
                                                 ) -> None:
    """Exactly the listed instances, the first and the last of the list included."""
    dest = destinations("STORESCP")
    node = make_node(dest)
    study = store_study(node, series=2, per_series=2)
    wanted = [study.sops[0], study.sops[-1]]
    assoc = requestors(node, identifier_syntaxes=[syntax])
    ident = listed_uids(*wanted, syntax, length, spelled)

    replies = responses(assoc.send_c_move(ident, "STORESCP", StudyMove))

    assert_counted(replies, total=2, final_status=0x0000, completed=2)
    assert sorted(r.sop_uid for r in dest.received) == sorted(wanted)
    assert_identical(node, study, dest.received)


# --- C-MOVE -------------------------------------------------------------------------------

def test_move_sets_originator_and_sends_stored_bytes(make_node: Callable[..., Node],
                                                     destinations: Callable[..., Destination],
                                                     requestors: Callable[..., Association],
                                                     ) -> None:
    """Move Originator AE Title / Message ID are the requestor's (PS3.7 9.3.1.1)."""
    dest = destinations("STORESCP")
    node = make_node(dest)
    study = store_study(node, series=2, per_series=2)
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study.uid),
                                          "STORESCP", StudyMove, msg_id=4242))

    assert_counted(replies, total=4, final_status=0x0000, completed=4)
    assert sorted(r.sop_uid for r in dest.received) == sorted(study.sops)
    assert {(r.originator_aet, r.originator_id, r.calling_aet) for r in dest.received} == {
        (REQUESTOR_AET, 4242, NODE_AET)}
    assert_identical(node, study, dest.received)


def test_move_with_a_uid_list_at_image_level(make_node: Callable[..., Node],
                                             destinations: Callable[..., Destination],
                                             requestors: Callable[..., Association]) -> None:
    dest = destinations("STORESCP")
    node = make_node(dest)
    study = store_study(node, series=2, per_series=3)
    wanted = study.sops[1:4]
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(
        identifier("IMAGE", PatientID=study.patient_id, StudyInstanceUID=study.uid,
                   SeriesInstanceUID=next(iter(study.series)), SOPInstanceUID=wanted[:2]),
        "STORESCP", PatientMove))

    assert replies[-1][0].Status == 0x0000
    assert sorted(r.sop_uid for r in dest.received) == sorted(wanted[:2])


def test_move_unknown_destination_is_a801(make_node: Callable[..., Node],
                                          destinations: Callable[..., Destination],
                                          requestors: Callable[..., Association]) -> None:
    dest = destinations("STORESCP")
    node = make_node(dest)
    study = store_study(node, series=1, per_series=1)
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study.uid),
                                          "NOBODY", StudyMove))

    assert [status.Status for status, _ in replies] == [0xA801]
    # A Refused response contains the Failed SOP Instance UID List, here empty
    # (PS3.4 C.4.2.1.4.2), with the seam and with pynetdicom's own loop.
    [(_, listed)] = replies
    assert listed is not None and "FailedSOPInstanceUIDList" in listed
    assert not listed.FailedSOPInstanceUIDList
    assert dest.connections == 0


def test_move_to_itself_of_an_ae_known_on_a_network(make_node: Callable[..., Node],
                                                    destinations: Callable[..., Destination],
                                                    requestors: Callable[..., Association],
                                                    ) -> None:
    """An AE of the access rules known on a network, with a port, is reached at the
    address its association comes from when it moves to itself (with the seam and
    without: the destination is found by the same function)."""
    dest = destinations("STORESCP")
    node = make_node()
    node.services.access = access.AccessPolicy(aes={REQUESTOR_AET: access.KnownAE(
        REQUESTOR_AET, access.AE_RIGHTS, "127.0.0.0/8", dest.port)})
    study = store_study(node, series=1, per_series=2)
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study.uid),
                                          REQUESTOR_AET, StudyMove))

    assert replies[-1][0].Status == 0x0000
    assert sorted(r.sop_uid for r in dest.received) == sorted(study.sops)


@pytest.mark.parametrize(("service", "model", "ident"), [
    ("move", StudyMove, identifier("STUDY")),                              # no Study UID
    ("get", StudyGet, identifier("STUDY", StudyInstanceUID="")),
    ("move", StudyMove, identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"],
                                   SeriesInstanceUID="1.2.3.1")),          # list too high
    ("get", PatientGet, identifier("IMAGE", PatientID="X", StudyInstanceUID="1.2.3",
                                   SeriesInstanceUID=["1.2.3.1", "1.2.3.2"],
                                   SOPInstanceUID="1.2.3.1.1")),
    ("get", StudyGet, identifier("PATIENT", PatientID="X")),               # not in Study Root
    ("move", PatientMove, identifier("", StudyInstanceUID="1.2.3")),       # no level
    # Unique keys are matched by value (C.4.2.1.4.1, C.4.3.1.3.1): the stored patient is
    # RETRIEVE, and no wildcard may name it, or every patient.
    ("move", PatientMove, identifier("PATIENT", PatientID="RETRIEV*")),
    ("move", PatientMove, identifier("PATIENT", PatientID="?*")),
    ("get", PatientGet, identifier("PATIENT", PatientID="RETRIEV?")),
    ("move", PatientMove, identifier("STUDY", PatientID="R*", StudyInstanceUID="1.2.3")),
])
def test_bad_identifier_is_a900(make_node: Callable[..., Node],
                                destinations: Callable[..., Destination],
                                requestors: Callable[..., Association], service: str,
                                model: str, ident: Dataset) -> None:
    dest = destinations("STORESCP")
    node = make_node(dest)
    store_study(node, series=1, per_series=1)
    assoc = requestors(node)

    if service == "move":
        replies = responses(assoc.send_c_move(ident, "STORESCP", model))
    else:
        replies = responses(assoc.send_c_get(ident, model))

    if SEAM or service == "get":
        assert [status.Status for status, _ in replies] == [0xA900]
        assert replies[0][0].get("ErrorComment")
    else:
        # pynetdicom takes no status from a C-MOVE handler before the destination and
        # associates with it before the first: the refusal is its C514 (Unable to
        # process, pacs.dimse.handlers.handle_move).
        assert [status.Status for status, _ in replies] == [0xC514]
    assert dest.connections == 0


def test_move_without_matches_opens_no_association(make_node: Callable[..., Node],
                                                   destinations: Callable[..., Destination],
                                                   requestors: Callable[..., Association],
                                                   ) -> None:
    """Zero matches: final 0000 at once, the destination is not contacted (#436)."""
    dest = destinations("STORESCP")
    node = make_node(dest)
    store_study(node, series=1, per_series=1)
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(
        identifier("STUDY", StudyInstanceUID=generate_uid()), "STORESCP", StudyMove))

    assert [status.Status for status, _ in replies] == [0x0000]
    assert counts(replies[0][0])[1:] == (0, 0, 0)
    assert dest.connections == 0


def test_move_to_a_refusing_destination_is_a702(make_node: Callable[..., Node],
                                                destinations: Callable[..., Destination],
                                                requestors: Callable[..., Association],
                                                ) -> None:
    refusing = destinations("REFUSING", refuse=True)
    node = make_node(refusing, modalities=f"GONE=127.0.0.1:{free_port()}")
    study = store_study(node, series=1, per_series=2)
    assoc = requestors(node)

    for target in ("REFUSING", "GONE"):  # rejected; nothing listening
        replies = responses(assoc.send_c_move(
            identifier("STUDY", StudyInstanceUID=study.uid), target, StudyMove))
        # With the seam and without it: every instance failed, each one named (PS3.4
        # C.4.2.1.4.2).
        assert [status.Status for status, _ in replies] == [0xA702]
        assert counts(replies[0][0])[1:] == (0, 2, 0)
        named = replies[0][1].FailedSOPInstanceUIDList
        assert sorted(named) == sorted(study.sops)
    assert refusing.connections == 1
    assert refusing.received == []


def test_move_compressed_to_explicit_only_destination_decompresses(
        make_node: Callable[..., Node], destinations: Callable[..., Destination],
        requestors: Callable[..., Association]) -> None:
    """A destination taking only Explicit VR Little Endian gets the compressed
    test files decompressed, with the pixel data pydicom decodes from the originals."""
    dest = destinations("EXPLICIT", syntaxes=[ExplicitVRLittleEndian])
    node = make_node(dest)
    study_uid = generate_uid()
    originals: dict[str, Dataset] = {}
    for name in COMPRESSED:
        data = with_new_uids(sample(name), study_uid)
        node.ingest(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        originals[str(ds.SOPInstanceUID)] = ds
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study_uid),
                                          "EXPLICIT", StudyMove))

    assert_counted(replies, total=len(COMPRESSED), final_status=0x0000,
                   completed=len(COMPRESSED))
    assert sorted(r.sop_uid for r in dest.received) == sorted(originals)
    for item in dest.received:
        assert item.transfer_syntax == ExplicitVRLittleEndian
        got = _read_dataset(item.data, ExplicitVRLittleEndian)
        got.file_meta = pydicom.dataset.FileMetaDataset()
        got.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        original = originals[item.sop_uid]
        assert got.SOPInstanceUID == original.SOPInstanceUID
        assert got.Rows == original.Rows and got.Columns == original.Columns
        assert np.array_equal(got.pixel_array, original.pixel_array), item.sop_uid


def test_move_undecodable_object_fails_as_a_sub_operation(
        make_node: Callable[..., Node], destinations: Callable[..., Destination],
        requestors: Callable[..., Association]) -> None:
    """Pixel data that cannot be decoded: that sub-operation fails, the rest go (B000)."""
    dest = destinations("EXPLICIT", syntaxes=[ExplicitVRLittleEndian])
    node = make_node(dest)
    study = store_study(node, series=1, per_series=2)
    bad = with_new_uids(sample(UNDECODABLE), study.uid)
    node.ingest(bad)
    bad_uid = str(pydicom.dcmread(io.BytesIO(bad)).SOPInstanceUID)
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study.uid),
                                          "EXPLICIT", StudyMove))

    final, ident = replies[-1]
    assert final.Status == 0xB000
    assert counts(final)[1:] == (2, 1, 0)
    assert uid_list(ident) == [bad_uid]
    assert sorted(r.sop_uid for r in dest.received) == sorted(study.sops)
    assert assoc.is_established


def test_move_compressed_as_stored_when_the_destination_takes_it(
        make_node: Callable[..., Node], destinations: Callable[..., Destination],
        requestors: Callable[..., Association]) -> None:
    """Each stored syntax is proposed in its own context: no conversion is needed."""
    dest = destinations("ANYSYNTAX")
    node = make_node(dest)
    study_uid = generate_uid()
    sent: dict[str, pydicom.Dataset] = {}  # headers by SOP Instance UID
    for name in COMPRESSED:
        data = with_new_uids(sample(name), study_uid)
        node.ingest(data)
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sent[str(header.SOPInstanceUID)] = header
    assoc = requestors(node)

    replies = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study_uid),
                                          "ANYSYNTAX", StudyMove))

    assert replies[-1][0].Status == 0x0000
    assert sorted(r.sop_uid for r in dest.received) == sorted(sent)
    for item in dest.received:
        header = sent[item.sop_uid]
        stored = node.stored(study_uid, header.SeriesInstanceUID, item.sop_uid)
        assert item.transfer_syntax == header.file_meta.TransferSyntaxUID
        assert item.data == dataset_part(stored)


def test_move_cancel(make_node: Callable[..., Node], requestors: Callable[..., Association],
                     ) -> None:
    """C-CANCEL of a C-MOVE: FE00, Remaining = not started, nothing more is sent."""
    dest = Destination("SLOW", free_port())
    ae = AE(ae_title="SLOW")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    dest.server = ae.start_server(("127.0.0.1", dest.port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, _recorder(dest.received, delay=0.03))])
    try:
        node = make_node(dest)
        study = store_study(node, series=1, per_series=30)
        assoc = requestors(node)
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == StudyMove)
        replies = []
        for status, ident in assoc.send_c_move(
                identifier("STUDY", StudyInstanceUID=study.uid), "SLOW", StudyMove,
                msg_id=5):
            replies.append((status, ident))
            if len(replies) == 1:
                assoc.send_c_cancel(5, context_id)
        final = replies[-1][0]
        remaining, completed, failed, warning = counts(final)
        assert final.Status == 0xFE00
        assert remaining is not None and remaining > 0
        assert completed + failed + warning + remaining == 30
        assert len(dest.received) == completed
    finally:
        dest.stop()


# --- pieces -------------------------------------------------------------------------------

def test_failed_list_fits_an_explicit_vr_length() -> None:
    """(0008,0058) is UI, 2-byte length in explicit VR: a long list is cut to fit."""
    uids = [f"1.2.826.0.1.3680043.8.498.{10**19 + n}" for n in range(3000)]
    encoded = retrieve.failed_list(uids, ExplicitVRLittleEndian)
    decoded = _read_dataset(encoded, ExplicitVRLittleEndian)
    kept = uid_list(decoded)
    assert 0 < len(kept) < len(uids) and kept == uids[:len(kept)]
    implicit = retrieve.failed_list(uids, ImplicitVRLittleEndian)
    assert uid_list(_read_dataset(implicit, ImplicitVRLittleEndian)) == uids


def test_destination_contexts_one_syntax_each_and_at_most_128() -> None:
    classes = {CTImageStorage: {ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"},
               MRImageStorage: {ImplicitVRLittleEndian}}
    proposed = [(cx.abstract_syntax, tuple(cx.transfer_syntax))
                for cx in retrieve.destination_contexts(classes)]
    assert proposed == [
        (CTImageStorage, (ExplicitVRLittleEndian,)),
        (CTImageStorage, ("1.2.840.10008.1.2.4.50",)),
        (MRImageStorage, (ImplicitVRLittleEndian,)),
        (MRImageStorage, (ExplicitVRLittleEndian,)),
        (CTImageStorage, (ImplicitVRLittleEndian,)),
    ]
    many = {f"1.2.3.{n}": {ExplicitVRLittleEndian} for n in range(100)}
    assert len(retrieve.destination_contexts(many)) == 128


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, retrieve.Outcome.COMPLETED), (0xB000, retrieve.Outcome.WARNING),
    (0xB007, retrieve.Outcome.WARNING), (0x0111, retrieve.Outcome.WARNING),
    (0xA700, retrieve.Outcome.FAILED), (0xC000, retrieve.Outcome.FAILED),
    (0x0122, retrieve.Outcome.FAILED), (None, retrieve.Outcome.FAILED),
])
def test_store_status_outcomes(status: int | None, outcome: retrieve.Outcome) -> None:
    assert retrieve.classify(status) is outcome

