"""Several customers on one node (``PACS_CUSTOMERS_FILE``), kept apart on every route.

Two customers, ``alpha`` (called AE title ALPHA, host alpha.example) and ``bravo``
(BRAVO, bravo.example), hold the same patient: the same Patient ID, Study, Series and
even SOP Instance UIDs, with different Patient Names (and one more instance at bravo).
dcmtk's storescu, findscu, getscu and movescu, dicomweb-client against the real
gunicorn (path prefix and Host header), the viewer port, DICOMweb DELETE and ``pacs
delete --customer`` each see, retrieve, overwrite and delete one customer's data only;
an unknown called AE title is rejected; each customer has its own access rules;
storage commitment verifies against the called customer and needs the store right of
its access rules; the node's own associations (C-MOVE sub-operations, a storage
commitment report on a new association, forwarding) call with the customer's AE title,
as a pynetdicom SCP sees it; each upload folder feeds its customer; ``pacs status``
and the container's health check report both; each customer's audit events name it.
On S3 (SeaweedFS) customers share a bucket under their own prefixes or have a bucket of
their own.
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, build_context, evt

from tests.conftest import free_port, seam_only
from tests.interop.conftest import (
    Node,
    answers_qido,
    dcmtk,
    fresh_ct,
    getscu_counts,
    run_dcmtk,
    start_storescp,
    wait_drained,
)
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

PATIENT_ID = "SHARED-PATIENT"
NAMES = {"alpha": "ALPHA^ONE", "bravo": "BRAVO^TWO"}
TITLES = {"alpha": "ALPHA", "bravo": "BRAVO"}
HOSTS = {"alpha": "alpha.example", "bravo": "bravo.example"}
#: alpha's C-MOVE destination; bravo has none of that name.
MOVE_SCP = "ALPHASCP"
#: Storage Commitment Push Model, and its well-known SOP Instance (PS3.4 J.3.5).
PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"


class Shared:
    """The UIDs both customers hold, and each customer's files."""

    def __init__(self, folder: Path) -> None:
        self.study, self.series = generate_uid(), generate_uid()
        self.sops = [generate_uid(), generate_uid()]
        self.extra = generate_uid()  # bravo's only
        self.files = {name: self._write(folder / name, name,
                                        self.sops + ([self.extra] if name == "bravo" else []))
                      for name in NAMES}

    def _write(self, folder: Path, name: str, sops: list[str]) -> list[Path]:
        folder.mkdir(parents=True)
        paths = []
        for sop in sops:
            ds = fresh_ct(StudyInstanceUID=self.study, SeriesInstanceUID=self.series,
                          SOPInstanceUID=sop, PatientID=PATIENT_ID, PatientName=NAMES[name])
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            path = folder / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp: alpha's C-MOVE destination."""
    folder = tmp_path_factory.mktemp("movescp")
    port, process = start_storescp(MOVE_SCP, folder)
    yield port, folder
    process.terminate()
    process.wait(timeout=10)


#: A destination of both customers (C-MOVE, storage commitment reports, bravo's
#: forwarding) that records who calls it.
RECORDER = "RECORDER"
#: The calling AE title whose instances bravo forwards to the recorder.
FORWARDED = "FORWARDED"


@dataclass
class Recorder:
    """A pynetdicom SCP (CT storage; the Push Model's SCP role for reports): what
    arrived and the calling AE title of the association it came on."""

    port: int
    stores: queue.Queue[tuple[str, str, str]] = field(default_factory=queue.Queue)
    reports: queue.Queue[tuple[str, str, str]] = field(default_factory=queue.Queue)

    def store(self, event: Any) -> int:
        """EVT_C_STORE: (calling AE title, SOP Instance UID, Move Originator)."""
        originator = event.request.MoveOriginatorApplicationEntityTitle or ""
        self.stores.put((str(event.assoc.requestor.ae_title).strip(),
                         str(event.request.AffectedSOPInstanceUID), str(originator).strip()))
        return 0x0000

    def report(self, event: Any) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT: (calling AE title, Transaction UID, Retrieve AE Title)."""
        info = event.event_information
        self.reports.put((str(event.assoc.requestor.ae_title).strip(),
                          str(info.TransactionUID), str(info.get("RetrieveAETitle", ""))))
        return 0x0000, None

    def stored(self, count: int) -> list[tuple[str, str, str]]:
        """The next ``count`` C-STOREs received."""
        return [self.stores.get(timeout=60) for _ in range(count)]


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    found = Recorder(free_port())
    ae = AE(ae_title=RECORDER)
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(PUSH_MODEL, scu_role=False, scp_role=True)
    server = ae.start_server(("127.0.0.1", found.port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, found.store), (evt.EVT_N_EVENT_REPORT, found.report)])
    yield found
    server.shutdown()


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory,
         storescp: tuple[int, Path], recorder: Recorder) -> Node:
    """A node serving alpha and bravo (bravo may delete over DICOMweb)."""
    for tool in ("findscu", "getscu", "movescu", "storescu"):
        dcmtk(tool)
    file = tmp_path_factory.mktemp("customers") / "customers.toml"
    file.write_text(f"""
[[customer]]
name = "alpha"
ae_titles = ["{TITLES['alpha']}"]
hosts = ["{HOSTS['alpha']}"]
modalities = "{MOVE_SCP}=127.0.0.1:{storescp[0]},{RECORDER}=127.0.0.1:{recorder.port}"

[[customer]]
name = "bravo"
ae_titles = ["{TITLES['bravo']}", "BRAVO2"]
hosts = ["{HOSTS['bravo']}"]
modalities = "OTHERSCP=127.0.0.1:9,{RECORDER}=127.0.0.1:{recorder.port}"
[customer.settings]
PACS_WEB_DELETE = true
PACS_ROUTES = "recorded: calling_ae={FORWARDED} -> {RECORDER}"
[customer.access]
[[customer.access.ae]]
title = "READER"
rights = "echo"
""", encoding="utf-8")
    # The customers' host names name this node for the loopback rule only as listed.
    started = node_factory("customers", PACS_CUSTOMERS_FILE=str(file), CUSTOMER="alpha",
                           PACS_UPLOADS_POLL="0.2", PACS_WEB_HOSTS=",".join(HOSTS.values()))
    answers_qido(started)
    return started


@pytest.fixture(scope="module")
def shared(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """The shared patient stored in both customers over C-STORE."""
    data = Shared(tmp_path_factory.mktemp("shared"))
    for name, files in data.files.items():
        sent = _storescu(node, TITLES[name], *files)
        assert sent.returncode == 0, sent.stdout + node.log()
    return data


def _storescu(node: Node, called: str, *files: Path,
              calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    return run_dcmtk("storescu", "-v", "-aet", calling, "-aec", called, "127.0.0.1",
                     str(node.port), *map(str, files), timeout=120)


def _find(node: Node, called: str, folder: Path) -> dict[str, str]:
    """findscu at IMAGE level of the shared patient: Patient Name by SOP Instance UID."""
    folder.mkdir(parents=True)
    result = run_dcmtk("findscu", "-S", "-aec", called, "-X", "-od", str(folder),
                       "-k", "QueryRetrieveLevel=IMAGE", "-k", f"PatientID={PATIENT_ID}",
                       "-k", "StudyInstanceUID=", "-k", "SeriesInstanceUID=",
                       "-k", "SOPInstanceUID=", "-k", "PatientName=",
                       "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stdout
    found = [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]
    return {str(ds.SOPInstanceUID): str(ds.PatientName) for ds in found}


def _names(folder: Path) -> dict[str, str]:
    """Patient Name by SOP Instance UID of the objects in ``folder``."""
    return {str(ds.SOPInstanceUID): str(ds.PatientName)
            for ds in (pydicom.dcmread(p) for p in folder.iterdir() if p.is_file())}


def _data_dir(node: Node, name: str) -> Path:
    return node.data_dir / name


def _index_names(node: Node, name: str) -> dict[str, str]:
    """Patient Name by SOP Instance UID, from the customer's stored objects (once its
    intake's mover has stored them)."""
    wait_drained(_data_dir(node, name))
    objects = _data_dir(node, name) / "objects"
    return {str(ds.SOPInstanceUID): str(ds.PatientName)
            for ds in (pydicom.dcmread(p) for p in objects.rglob("*.dcm"))}


def test_an_unknown_called_ae_title_is_rejected(node: Node, shared: Shared) -> None:
    result = run_dcmtk("echoscu", "-aec", "NOBODY", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout, result.stdout
    for title in ("ALPHA", "BRAVO", "BRAVO2"):
        assert run_dcmtk("echoscu", "-aec", title, "127.0.0.1",
                         str(node.port)).returncode == 0


def test_each_customer_has_its_own_access_rules(node: Node, shared: Shared,
                                                tmp_path: Path) -> None:
    """READER may only echo bravo (its access table), and do anything at alpha (whose
    unknown AEs have every right)."""
    def find(called: str) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("findscu", "-v", "-S", "-aet", "READER", "-aec", called,
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT_ID}",
                         "127.0.0.1", str(node.port))

    refused = find("BRAVO")  # 0124, which dcmtk does not name
    assert "Received Final Find Response (Unknown Status: 0x124)" in refused.stdout, \
        refused.stdout
    allowed = find("ALPHA")
    assert "Received Final Find Response (Success)" in allowed.stdout, allowed.stdout


def test_each_customer_holds_its_own_copy(node: Node, shared: Shared) -> None:
    assert _index_names(node, "alpha") == dict.fromkeys(shared.sops, NAMES["alpha"])
    assert _index_names(node, "bravo") == dict.fromkeys([*shared.sops, shared.extra],
                                                        NAMES["bravo"])


def test_c_find_sees_one_customer(node: Node, shared: Shared, tmp_path: Path) -> None:
    assert _find(node, "ALPHA", tmp_path / "a") == dict.fromkeys(shared.sops, NAMES["alpha"])
    bravo = dict.fromkeys([*shared.sops, shared.extra], NAMES["bravo"])
    assert _find(node, "BRAVO", tmp_path / "b") == bravo
    assert _find(node, "BRAVO2", tmp_path / "b2") == bravo


def test_c_get_retrieves_one_customers_objects(node: Node, shared: Shared,
                                               tmp_path: Path) -> None:
    for name, expected in (("alpha", shared.sops), ("bravo", [*shared.sops, shared.extra])):
        folder = tmp_path / name
        folder.mkdir()
        got = run_dcmtk("getscu", "-v", "-S", "-aec", TITLES[name], "-od", str(folder),
                        "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={shared.study}",
                        "127.0.0.1", str(node.port))
        assert getscu_counts(got.stdout)[1] == len(expected), got.stdout
        assert _names(folder) == dict.fromkeys(expected, NAMES[name])


def test_c_move_goes_to_the_customers_own_destinations(
        node: Node, shared: Shared, storescp: tuple[int, Path]) -> None:
    def move(called: str) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("movescu", "-v", "-S", "-aec", called, "-aem", MOVE_SCP,
                         "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={shared.study}",
                         "127.0.0.1", str(node.port))

    refused = move("BRAVO")  # alpha's destination is not bravo's
    assert "Refused: MoveDestinationUnknown" in refused.stdout, refused.stdout
    assert not list(storescp[1].iterdir())
    moved = move("ALPHA")
    assert moved.returncode == 0, moved.stdout
    assert _names(storescp[1]) == dict.fromkeys(shared.sops, NAMES["alpha"])


def test_dicomweb_by_path_prefix_and_host(node: Node, shared: Shared) -> None:
    base = node.web_url()
    for name in NAMES:
        for root in (f"{base}/customers/{name}", f"{base}/customers/{name}/dicom-web"):
            client = DICOMwebClient(url=root)
            studies = client.search_for_studies(search_filters={"PatientID": PATIENT_ID})
            assert [s["00100010"]["Value"][0]["Alphabetic"] for s in studies] == [NAMES[name]]
            instance = client.retrieve_instance(shared.study, shared.series, shared.sops[0])
            assert str(instance.PatientName) == NAMES[name]
            # Retrieve URLs keep the customer's prefix.
            assert studies[0]["00081190"]["Value"][0].startswith(root)
        by_host = requests.get(f"{base}/studies", params={"PatientID": PATIENT_ID},
                               headers={"Host": HOSTS[name]}, timeout=30)
        assert by_host.status_code == 200, by_host.text
        assert by_host.json()[0]["00100010"]["Value"][0]["Alphabetic"] == NAMES[name]
    # The root is CUSTOMER's (alpha); an unknown customer, or one under the host name of
    # another, is not found.
    root = requests.get(f"{base}/studies", params={"PatientID": PATIENT_ID}, timeout=30)
    assert root.json()[0]["00100010"]["Value"][0]["Alphabetic"] == NAMES["alpha"]
    assert requests.get(f"{base}/customers/nobody/studies", timeout=30).status_code == 404
    crossed = requests.get(f"{base}/customers/alpha/studies",
                           headers={"Host": HOSTS["bravo"]}, timeout=30)
    assert crossed.status_code == 404
    # A forged Host naming neither a customer nor the node: the loopback rule refuses it.
    forged = requests.get(f"{base}/studies", headers={"Host": "evil.example"}, timeout=30)
    assert forged.status_code == 421


def test_stow_rs_and_c_store_overwrite_only_their_customer(node: Node, shared: Shared,
                                                           tmp_path: Path) -> None:
    # STOW-RS to alpha of a new version of a shared instance; C-STORE to bravo of another.
    changed = fresh_ct(StudyInstanceUID=shared.study, SeriesInstanceUID=shared.series,
                       SOPInstanceUID=shared.sops[1], PatientID=PATIENT_ID,
                       PatientName="ALPHA^CHANGED")
    changed.file_meta.MediaStorageSOPInstanceUID = shared.sops[1]
    DICOMwebClient(url=f"{node.web_url()}/customers/alpha").store_instances([changed])
    again = fresh_ct(StudyInstanceUID=shared.study, SeriesInstanceUID=shared.series,
                     SOPInstanceUID=shared.sops[0], PatientID=PATIENT_ID,
                     PatientName="BRAVO^CHANGED")
    again.file_meta.MediaStorageSOPInstanceUID = shared.sops[0]
    path = tmp_path / "again.dcm"
    again.save_as(path, enforce_file_format=True)
    assert _storescu(node, "BRAVO", path).returncode == 0
    alpha, bravo = _index_names(node, "alpha"), _index_names(node, "bravo")
    assert alpha == {shared.sops[0]: NAMES["alpha"], shared.sops[1]: "ALPHA^CHANGED"}
    assert bravo == {shared.sops[0]: "BRAVO^CHANGED", shared.sops[1]: NAMES["bravo"],
                     shared.extra: NAMES["bravo"]}
    # Put the shared objects back for the tests that follow.
    for name, files in shared.files.items():
        assert _storescu(node, TITLES[name], *files).returncode == 0


@seam_only("a requestor without an address in PACS_MODALITIES gets its report on its "
           "own association, sent by the association's thread")
def test_storage_commitment_verifies_against_the_called_customer(
        node: Node, shared: Shared) -> None:
    """alpha commits to the shared instances (its own copies) and not to bravo's extra
    one (0112, no such object); the result names alpha's AE title."""
    reports: queue.Queue[Any] = queue.Queue()

    def report(event: Any) -> tuple[int, None]:
        reports.put(event.event_information)
        return 0x0000, None

    ae = AE(ae_title="REQUESTOR")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=TITLES["alpha"],
                         contexts=[build_context(PUSH_MODEL)],
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, report)])
    assert assoc.is_established
    try:
        action = Dataset()
        action.TransactionUID = generate_uid()
        action.ReferencedSOPSequence = []
        for sop in [*shared.sops, shared.extra]:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, sop
            action.ReferencedSOPSequence.append(item)
        status, _ = assoc.send_n_action(action, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
        assert status.Status == 0x0000, node.log()
        result = reports.get(timeout=30)
    finally:
        assoc.release()
    assert str(result.RetrieveAETitle) == TITLES["alpha"]
    assert {str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence} == \
        set(shared.sops)
    assert [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
            for i in result.FailedSOPSequence] == [(shared.extra, 0x0112)]


def _commitment_request(node: Node, calling: str, called: str, sops: list[str],
                        transaction: str) -> int:
    """A Storage Commitment Request of ``calling`` to ``called``, its association
    released at once; the N-ACTION status."""
    ae = AE(ae_title=calling)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called,
                         contexts=[build_context(PUSH_MODEL)])
    assert assoc.is_established, node.log()
    try:
        action = Dataset()
        action.TransactionUID = transaction
        action.ReferencedSOPSequence = []
        for sop in sops:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, sop
            action.ReferencedSOPSequence.append(item)
        status, _ = assoc.send_n_action(action, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
        return int(status.Status)
    finally:
        assoc.release()


def test_storage_commitment_needs_the_store_right_of_the_called_customer(
        node: Node, shared: Shared) -> None:
    """READER may only echo at bravo (0124, PS3.7 C.5.21); alpha's rules let it ask."""
    assert _commitment_request(node, "READER", "BRAVO", shared.sops,
                               generate_uid()) == 0x0124
    assert _commitment_request(node, "READER", "ALPHA", shared.sops,
                               generate_uid()) == 0x0000


def test_c_move_calls_the_destination_with_the_called_ae_title(
        node: Node, shared: Shared, recorder: Recorder) -> None:
    """The sub-operations' association is requested with the title the C-MOVE came in
    on (the customer's, not PACS_AE_TITLE's), the requestor as Move Originator."""
    for called, count in (("ALPHA", len(shared.sops)), ("BRAVO2", len(shared.sops) + 1)):
        moved = run_dcmtk("movescu", "-v", "-S", "-aet", "MOVER", "-aec", called,
                          "-aem", RECORDER, "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={shared.study}",
                          "127.0.0.1", str(node.port))
        assert moved.returncode == 0, moved.stdout + node.log()
        assert {(calling, originator) for calling, _, originator
                in recorder.stored(count)} == {(called, "MOVER")}


def test_a_commitment_report_on_a_new_association_calls_with_the_called_ae_title(
        node: Node, shared: Shared, recorder: Recorder) -> None:
    """A requestor that released at once gets its result on a new association to its
    address in the customer's PACS_MODALITIES, called by the title it asked (BRAVO2,
    bravo's second), which is also the Retrieve AE Title."""
    transaction = generate_uid()
    assert _commitment_request(node, RECORDER, "BRAVO2", shared.sops,
                               transaction) == 0x0000
    assert recorder.reports.get(timeout=60) == ("BRAVO2", transaction, "BRAVO2")


def test_forwarding_calls_with_the_customers_first_ae_title(
        node: Node, shared: Shared, recorder: Recorder, tmp_path: Path) -> None:
    """bravo forwards what FORWARDED stores (received on BRAVO2) to the recorder,
    calling with bravo's first AE title."""
    ds = fresh_ct(PatientID="FORWARDED-PATIENT")
    path = tmp_path / "forwarded.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert _storescu(node, "BRAVO2", path, calling=FORWARDED).returncode == 0
    assert recorder.stored(1) == [("BRAVO", str(ds.SOPInstanceUID), "")]
    # Gone again: the tests that follow count bravo's instances.
    done = node.cli("delete", "--customer", "bravo", "--yes", "--quiet",
                    str(ds.StudyInstanceUID))
    assert done.returncode == 0, done.stdout + done.stderr


def test_viewer_port_by_host(node: Node, shared: Shared) -> None:
    viewer = f"http://127.0.0.1:{node.env['PACS_VIEWER_PORT']}"
    for name in NAMES:
        page = requests.get(f"{viewer}/", headers={"Host": HOSTS[name]}, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        for path, headers in ((f"{viewer}/dicom-web/studies", {"Host": HOSTS[name]}),
                              (f"{viewer}/customers/{name}/dicom-web/studies", {})):
            found = requests.get(path, params={"PatientID": PATIENT_ID}, headers=headers,
                                 timeout=30)
            assert found.status_code == 200, found.text
            assert found.json()[0]["00100010"]["Value"][0]["Alphabetic"] == NAMES[name]


def test_status_lists_each_customer_and_audit_names_it(node: Node, shared: Shared) -> None:
    status = node.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "customer alpha (AE titles ALPHA; hosts alpha.example)" in status.stdout
    assert "customer bravo (AE titles BRAVO, BRAVO2; hosts bravo.example)" in status.stdout
    one = node.cli("status", "--json", "--customer", "bravo")
    assert json.loads(one.stdout)["counts"]["instance"] == 3
    for name in NAMES:
        trail = (_data_dir(node, name) / "audit.jsonl").read_text(encoding="utf-8")
        sites = {json.loads(line)["AuditSourceIdentification"]["AuditEnterpriseSiteID"]
                 for line in trail.splitlines()}
        assert sites == {name}, sites


def test_each_upload_folder_feeds_its_customer(node: Node, shared: Shared) -> None:
    dropped = fresh_ct(StudyInstanceUID=shared.study, SeriesInstanceUID=shared.series,
                       PatientID=PATIENT_ID, PatientName="BRAVO^UPLOAD")
    uploads = _data_dir(node, "bravo") / "uploads"
    uploads.mkdir(exist_ok=True)
    dropped.save_as(uploads / "dropped.dcm", enforce_file_format=True)
    sop = str(dropped.SOPInstanceUID)
    deadline = time.monotonic() + 30
    while sop not in _index_names(node, "bravo") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _index_names(node, "bravo")[sop] == "BRAVO^UPLOAD", node.log()
    assert sop not in _index_names(node, "alpha")
    assert not (_data_dir(node, "alpha") / "uploads" / "dropped.dcm").exists()
    # The upload is bravo's last instance of the shared study: it goes with it below.


def test_the_container_healthcheck_asks_each_customer(node: Node, shared: Shared) -> None:
    checked = subprocess.run([sys.executable, "-m", "pacs.node.healthcheck"], cwd=node.root,
                             env=node.env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.split() == ["/customers/alpha/health:", "ok",
                                      "/customers/bravo/health:", "ok"]


def test_deletion_removes_one_customers_study(node: Node, shared: Shared,
                                              tmp_path: Path) -> None:
    # DICOMweb DELETE is bravo's alone (PACS_WEB_DELETE in its table).
    base = node.web_url()
    bravo = _find(node, "BRAVO", tmp_path / "b0")
    assert len(bravo) >= 3
    assert requests.delete(f"{base}/customers/alpha/studies/{shared.study}",
                           timeout=30).status_code == 403
    done = node.cli("delete", "--customer", "alpha", "--yes", "--quiet", shared.study)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 2 instance(s)" in done.stdout
    assert _find(node, "ALPHA", tmp_path / "a") == {}
    assert _find(node, "BRAVO", tmp_path / "b") == bravo
    assert requests.delete(f"{base}/customers/bravo/studies/{shared.study}",
                           timeout=30).status_code == 204
    assert _find(node, "BRAVO", tmp_path / "b2") == {}
    unknown = node.cli("delete", "--customer", "nobody", shared.study)
    assert unknown.returncode != 0 and "no customer 'nobody'" in unknown.stderr


def test_customers_on_s3_share_a_bucket_by_prefix_or_have_their_own(
        node_factory: Callable[..., Node], seaweed_s3: SeaweedS3,  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    """alpha and bravo in the node's bucket (under alpha/ and bravo/), carol in a bucket
    of its own; the same SOP Instance UID in all three, each its own object."""
    file = tmp_path / "customers.toml"
    file.write_text("""
[[customer]]
name = "alpha"
ae_titles = "ALPHA"
[[customer]]
name = "bravo"
ae_titles = "BRAVO"
[[customer]]
name = "carol"
ae_titles = "CAROL"
[customer.settings]
PACS_S3_BUCKET = "pacs-customer-carol"
""", encoding="utf-8")
    node = node_factory(
        "customers-s3", PACS_CUSTOMERS_FILE=str(file), PACS_STORAGE="s3",
        PACS_S3_ENDPOINT=seaweed_s3.endpoint, PACS_S3_ACCESS_KEY=seaweed_s3.access_key,
        PACS_S3_SECRET_KEY=seaweed_s3.secret_key, PACS_S3_BUCKET="pacs-customers-shared")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    for name in ("alpha", "bravo", "carol"):
        ds = fresh_ct(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                      PatientID=PATIENT_ID, PatientName=f"{name.upper()}^S3")
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert _storescu(node, name.upper(), path).returncode == 0
    for name in ("alpha", "bravo", "carol"):
        wait_drained(node.data_dir / name)  # each customer's mover, into its bucket
    client = seaweed_s3.client()
    key = f"{study}/{series}/{sop}.dcm"
    for bucket, name in (("pacs-customers-shared", "alpha"), ("pacs-customers-shared", "bravo"),
                         ("pacs-customer-carol", "carol")):
        stored = client.get_object(bucket, f"{name}/{key}")
        try:
            assert str(pydicom.dcmread(io.BytesIO(stored.read())).PatientName) == \
                f"{name.upper()}^S3"
        finally:
            stored.close()
        assert _find(node, name.upper(), tmp_path / f"find-{name}") == {
            sop: f"{name.upper()}^S3"}
    assert [o.object_name for o in client.list_objects("pacs-customers-shared",
                                                       recursive=True)] == [
        f"alpha/{key}", f"bravo/{key}"]
    assert [o.object_name for o in client.list_objects("pacs-customer-carol",
                                                       recursive=True)] == [f"carol/{key}"]
