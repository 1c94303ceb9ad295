"""Faults of the real parts under ``pacs serve``: the object store stalled (SeaweedFS
SIGSTOPped) or gone (killed), the data folder full (a small tmpfs), the index locked by
another writer.

For each: the peer gets a failure status (C-STORE A700) within its DIMSE timeout, nothing
is acknowledged that is not durable, the node keeps answering C-ECHO, C-FIND and QIDO
during the fault, and the next store succeeds once the fault is gone, without a restart
of the node.  Figures (time to the failure status, memory and descriptors before and
after) are printed for docs/reliability.md (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import pytest
import requests
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from pacs.core import config
from pacs.core.index.connection import busy_timeout_for
from pacs.core.services import build
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.s3 import timeouts_for
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    Resources,
    assert_consistent,
    fresh_ct,
    read_index,
    temporaries,
)
from tests.storage.seaweed import SeaweedServer
from tests.storage.test_store_faults import FullDisk, full_disk_scenario

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

#: The node's PACS_DIMSE_TIMEOUT here, and the peer's DIMSE timeout: every failure
#: status must arrive within it.
DIMSE_TIMEOUT = 16.0
CONNECT_TIMEOUT, READ_TIMEOUT = timeouts_for(DIMSE_TIMEOUT)
BUSY_TIMEOUT = busy_timeout_for(DIMSE_TIMEOUT)

BUCKET = "pacs-faults"
CUSTOMER = "acme"
OUT_OF_RESOURCES = 0xA700
#: Memory a node may gain during a fault (the hardening work's "done when").
MEMORY_GROWTH = 256 * 2**20


# --- peers -------------------------------------------------------------------------------

@dataclass
class Outcomes:
    """What a peer saw: each C-STORE's status (None: no answer) and its duration."""

    status: dict[str, int | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def acknowledged(self) -> set[str]:
        return {sop for sop, status in self.status.items() if status == 0x0000}

    def failed(self) -> set[str]:
        return {sop for sop, status in self.status.items() if status != 0x0000}


class Peer:
    """A pynetdicom storage SCU on one association, with the node's DIMSE timeout."""

    def __init__(self, node: Node, outcomes: Outcomes | None = None) -> None:
        ae = AE(ae_title="FAULTPEER")
        ae.dimse_timeout = DIMSE_TIMEOUT
        ae.acse_timeout = 30
        ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert self.assoc.is_established, node.log()
        self.outcomes = outcomes if outcomes is not None else Outcomes()

    def store(self, ds: Dataset) -> int | None:
        """Send one C-STORE; its status, or None when none came within the timeout."""
        started = time.monotonic()
        answer = self.assoc.send_c_store(ds)
        sop = str(ds.SOPInstanceUID)
        self.outcomes.seconds[sop] = time.monotonic() - started
        self.outcomes.status[sop] = int(answer.Status) if "Status" in answer else None
        return self.outcomes.status[sop]

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def store_all(node: Node, datasets: list[FileDataset],
              outcomes: Outcomes | None = None) -> Outcomes:
    """C-STORE each data set on one association."""
    peer = Peer(node, outcomes)
    try:
        for ds in datasets:
            peer.store(ds)
    finally:
        peer.close()
    return peer.outcomes


def find_studies(node: Node, patient_id: str) -> set[str]:
    """C-FIND at STUDY level for a patient; the Study Instance UIDs (success required)."""
    ae = AE(ae_title="FAULTFIND")
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established, node.log()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    found: set[str] = set()
    final = None
    try:
        for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            assert "Status" in status, "C-FIND got no answer within the DIMSE timeout"
            final = int(status.Status)
            if final in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.StudyInstanceUID))
    finally:
        assoc.release()
    assert final == 0x0000, f"C-FIND ended with {final}"
    return found


def qido_studies(node: Node, patient_id: str) -> set[str]:
    """QIDO-RS studies of a patient (200 or 204 required)."""
    response = requests.get(f"{node.web_url()}/studies", params={"PatientID": patient_id},
                            timeout=30)
    assert response.status_code in (200, 204), response.text[:300]
    if response.status_code == 204:
        return set()
    return {study["0020000D"]["Value"][0] for study in response.json()}


def stow(node: Node, ds: FileDataset) -> requests.Response:
    """STOW-RS of one instance."""
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    boundary = "pacs-faults-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode())
    return requests.post(
        f"{node.web_url()}/studies", data=body, timeout=60,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                 f'boundary={boundary}',
                 "Accept": "application/dicom+json"})


def health(node: Node) -> tuple[int, float]:
    """GET /health: its status code and how long the answer took."""
    started = time.monotonic()
    response = requests.get(f"{node.web_url()}/health", timeout=60)
    return response.status_code, time.monotonic() - started


def study_of(patient_id: str, count: int) -> list[FileDataset]:
    """``count`` new CT instances of one new study of ``patient_id``."""
    first = fresh_ct(PatientID=patient_id)
    made = [first]
    for _ in range(count - 1):
        ds = fresh_ct(PatientID=patient_id, StudyInstanceUID=first.StudyInstanceUID,
                      SeriesInstanceUID=first.SeriesInstanceUID)
        made.append(ds)
    return made


def dimse_workers(node: Node) -> set[int]:
    """The DIMSE worker processes: ``pacs serve``'s forks (its own command line)."""
    assert node.proc is not None
    parent = node.proc.pid
    command = Path(f"/proc/{parent}/cmdline").read_bytes()
    workers = set()
    for pid in node.pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            same = Path(f"/proc/{pid}/cmdline").read_bytes() == command
        except OSError:
            continue
        if int(stat[1]) == parent and same:
            workers.add(pid)
    return workers


def replace_dimse_workers(node: Node, timeout: float = 30.0) -> None:
    """SIGKILL every DIMSE worker; wait until as many new ones answer a C-ECHO."""
    old = dimse_workers(node)
    assert old, "no DIMSE worker found"
    for pid in old:
        os.kill(pid, 9)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = dimse_workers(node) - old
        if len(fresh) == len(old) and node.echo().returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"DIMSE workers not replaced within {timeout} s:\n{node.log()}")


def assert_reads_answer(node: Node, patient_id: str, studies: set[str]) -> None:
    """C-ECHO, C-FIND and QIDO answer, with what was stored before the fault."""
    node.assert_serving()
    assert studies <= find_studies(node, patient_id)
    assert studies <= qido_studies(node, patient_id)


def warm_up(node: Node, patient: str) -> None:
    """Use every path once (C-STORE, C-FIND, STOW-RS, QIDO), so that what the node
    allocates on first use is not counted as growth during the fault."""
    assert len(store_all(node, study_of(patient, 1)).acknowledged()) == 1
    assert stow(node, fresh_ct(PatientID=patient)).status_code == 200
    find_studies(node, patient)
    qido_studies(node, patient)


def report(fault: str, before: Resources, after: Resources, **figures: object) -> None:
    """Print one fault's figures for docs/reliability.md and check the memory bound."""
    shown = ", ".join(f"{name} {value}" for name, value in figures.items())
    print(f"\n[{fault}] memory {before.rss_bytes / 2**20:.0f} -> "
          f"{after.rss_bytes / 2**20:.0f} MiB, fds {before.fds} -> {after.fds}; {shown}")
    assert after.rss_bytes - before.rss_bytes < MEMORY_GROWTH


# --- the S3 node -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server of this module's own: its tests stop and kill it."""
    server = SeaweedServer(tmp_path_factory.mktemp("weed-faults"))
    try:
        server.start()
        yield server
    finally:
        server.close()


def web_ready(node: Node) -> Node:
    """Wait until DICOMweb answers.  With one web worker, an answer means no worker is
    still booting: a worker that boots while S3 is down is the start-up case, not the
    fault of a running node tested here."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{node.web_url()}/studies", timeout=10).status_code in (200, 204):
                return node
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"DICOMweb did not answer:\n{node.log()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def s3_node(node_factory: Callable[..., Node], weed: SeaweedServer) -> Node:
    """An S3 node whose objects all take the direct path (``PACS_INTAKE_OBJECT_BYTES``
    0): written to the bucket before they are acknowledged, as objects over the limit
    are.  Through the intake a C-STORE does not wait for S3 at all
    (``tests/interop/test_intake.py``, S3 down)."""
    return web_ready(node_factory(
        "faults-s3", PACS_STORAGE="s3", PACS_S3_ENDPOINT=weed.s3.endpoint,
        PACS_S3_ACCESS_KEY=weed.s3.access_key, PACS_S3_SECRET_KEY=weed.s3.secret_key,
        PACS_S3_BUCKET=BUCKET, CUSTOMER=CUSTOMER, PACS_DIMSE_TIMEOUT=str(DIMSE_TIMEOUT),
        PACS_WEB_WORKERS="1", PACS_INTAKE_OBJECT_BYTES="0"))


@pytest.fixture
def weed_running(weed: SeaweedServer) -> Iterator[SeaweedServer]:
    """The module's server, running and writable again after the test, whatever it did."""
    yield weed
    if weed.process is None or weed.process.poll() is not None:
        weed.start()
    else:
        weed.resume()
        weed.wait_until_writable()


def assert_s3_consistent(node: Node, weed: SeaweedServer, acknowledged: set[str]) -> set[str]:
    """Every acknowledged instance is indexed and its object in the bucket has the
    indexed checksum; every indexed object is there.  Returns the objects the bucket
    holds that the index does not list (writes the node gave up on, which the server
    completed later; ``pacs fsck`` indexes them)."""
    index = read_index(node.data_dir)
    assert acknowledged <= set(index), f"acknowledged but not indexed: {acknowledged - set(index)}"
    client = weed.s3.client()
    for row in index.values():
        response = client.get_object(BUCKET, f"{CUSTOMER}/{row.object_key}")
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        assert hashlib.sha256(data).hexdigest() == row.checksum, row.object_key
    names = {o.object_name for o in client.list_objects(BUCKET, prefix=f"{CUSTOMER}/",
                                                          recursive=True)}
    return names - {f"{CUSTOMER}/{row.object_key}" for row in index.values()}


def test_s3_stalled_mid_ingest(s3_node: Node, weed_running: SeaweedServer) -> None:
    """SIGSTOP of ``weed`` while a peer stores: each C-STORE gets A700 within the DIMSE
    timeout; C-FIND and QIDO answer meanwhile; after SIGCONT the next store succeeds."""
    weed, node = weed_running, s3_node
    patient = "FAULT-STALL"
    earlier = store_all(node, study_of(patient, 2))
    assert len(earlier.acknowledged()) == 2
    studies = {r.study_uid for r in read_index(node.data_dir).values()
               if r.sop_uid in earlier.acknowledged()}
    warm_up(node, patient)
    before = node.resources()

    # A peer storing continuously on one association.
    outcomes = Outcomes()
    stop = threading.Event()
    failures = threading.Semaphore(0)

    def sender() -> None:
        peer = Peer(node, outcomes)
        try:
            for ds in study_of(patient, 200):
                if stop.is_set():
                    break
                if peer.store(ds) != 0x0000:
                    failures.release()
        finally:
            peer.close()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(outcomes.acknowledged()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(outcomes.acknowledged()) >= 3, outcomes
        weed.pause()
        paused_at = time.monotonic()
        try:
            # Reads answer while stores wait for the stalled server.
            assert_reads_answer(node, patient, studies)
            # The health check says so, within one connect and one read timeout.
            unhealthy, checked_in = health(node)
            assert unhealthy == 503
            assert checked_in < 2 * CONNECT_TIMEOUT + READ_TIMEOUT + 5
            during = node.resources()
            for _ in range(2):
                assert failures.acquire(timeout=DIMSE_TIMEOUT + 10), outcomes
            stalled_for = time.monotonic() - paused_at
        finally:
            weed.resume()
    finally:
        stop.set()
        thread.join(timeout=DIMSE_TIMEOUT + 30)
    assert not thread.is_alive()

    # Every store got an answer within the DIMSE timeout: success or Out of Resources.
    assert None not in outcomes.status.values(), outcomes
    assert set(outcomes.status.values()) <= {0x0000, OUT_OF_RESOURCES}, outcomes
    slowest = max(outcomes.seconds.values())
    assert slowest < DIMSE_TIMEOUT
    # Recovery: once the server takes writes again, the node's next store succeeds.
    weed.wait_until_writable()
    assert health(node)[0] == 200
    retry = study_of(patient, 2)
    again = store_all(node, retry)
    assert again.acknowledged() == {str(ds.SOPInstanceUID) for ds in retry}, again
    acknowledged = earlier.acknowledged() | outcomes.acknowledged() | again.acknowledged()
    unlisted = assert_s3_consistent(node, weed, acknowledged)
    after = node.resources()
    report("S3 stalled", before, after, during=f"{during}",
           failed=len(outcomes.failed()), acknowledged=len(acknowledged),
           slowest_answer=f"{slowest:.1f} s", paused=f"{stalled_for:.1f} s",
           health_answer=f"{checked_in:.1f} s",
           unlisted_objects=len(unlisted))


def test_s3_killed_and_restarted(s3_node: Node, weed_running: SeaweedServer) -> None:
    """SIGKILL of ``weed``: C-STORE fails at once (A700), STOW-RS reports the part failed
    (A700), reads answer; ``weed`` started again on the same folder and ports: the next
    store succeeds, and what was acknowledged before is still there."""
    weed, node = weed_running, s3_node
    patient = "FAULT-KILL"
    earlier = store_all(node, study_of(patient, 3))
    assert len(earlier.acknowledged()) == 3
    studies = {r.study_uid for r in read_index(node.data_dir).values()
               if r.sop_uid in earlier.acknowledged()}
    warm_up(node, patient)
    unlisted = assert_s3_consistent(node, weed, earlier.acknowledged())
    before = node.resources()
    weed.kill()
    refused = store_all(node, study_of(patient, 3))
    assert set(refused.status.values()) == {OUT_OF_RESOURCES}, refused
    slowest = max(refused.seconds.values())
    assert slowest < READ_TIMEOUT  # refused connections: no timeout waited for
    response = stow(node, fresh_ct(PatientID=patient))
    assert response.status_code == 409, response.text[:300]  # no part stored
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [OUT_OF_RESOURCES]
    assert_reads_answer(node, patient, studies)
    assert health(node)[0] == 503
    # DIMSE workers that die while the store is down are replaced, and the
    # replacements serve: they do not need the store to start.
    replace_dimse_workers(node)
    assert_reads_answer(node, patient, studies)
    during = node.resources()

    weed.start()
    assert health(node)[0] == 200
    recovered = store_all(node, study_of(patient, 2))
    assert len(recovered.acknowledged()) == 2, recovered
    assert stow(node, fresh_ct(PatientID=patient)).status_code == 200
    # Refused at once: nothing reached the server, so nothing unlisted was added.
    assert assert_s3_consistent(
        node, weed, earlier.acknowledged() | recovered.acknowledged()) == unlisted
    after = node.resources()
    report("S3 killed", before, after, during=f"{during}",
           slowest_refusal=f"{slowest:.2f} s")


# --- the folder-store nodes ----------------------------------------------------------------

def _mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder``; False when this machine does not let us."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(folder)], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return result.returncode == 0


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _fill(folder: Path, leave: int, name: str = "balloon") -> Path:
    """A file taking all but ``leave`` bytes of the folder's file system (all of it when
    ``leave`` is 0: written until ENOSPC)."""
    balloon = folder / name
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    remaining = max(0, free - leave) if leave else 2**40
    chunk = b"\0" * 2**16
    with open(balloon, "wb", buffering=0) as out:
        while remaining > 0:
            try:
                remaining -= out.write(chunk[:remaining])
            except OSError:
                break  # full
    return balloon


def test_data_folder_full(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    """The data folder (objects and index) on a 20 MB tmpfs filled up: stores get A700,
    every acknowledged instance is indexed and stored with its checksum, no temporary
    file is left, reads answer; once space is freed the refused ones are stored.

    Where tmpfs cannot be mounted (not root), the same fault is injected into the
    object store of an in-process node instead (:class:`FullDisk`)."""
    node = node_factory("faults-full", start=False, PACS_DIMSE_TIMEOUT=str(DIMSE_TIMEOUT),
                        PACS_WEB_WORKERS="1")
    if not _mount_tmpfs(node.data_dir, "20m"):
        print("\n[data folder full] tmpfs cannot be mounted here: fault-injecting store")
        settings = config.load(overrides={"PACS_DATA_DIR": str(tmp_path / "data"),
                                          "PACS_DIMSE_TIMEOUT": str(DIMSE_TIMEOUT),
                                          "PACS_WEB_ANALYSERS": "0",
                                          "PACS_INTAKE_OBJECT_BYTES": "0"},
                               environ={}, env_file=None)
        store = FullDisk(FileStore(settings.objects_dir))
        services = build(settings, store=store)  # type: ignore[arg-type]
        try:
            full_disk_scenario(services)
        finally:
            services.close()
        return
    try:
        web_ready(node.start())
        patient = "FAULT-FULL"
        warm_up(node, patient)
        before = node.resources()
        balloon = _fill(node.data_dir, leave=2 * 2**20)
        sent = study_of(patient, 150)
        outcomes = Outcomes()
        peer = Peer(node, outcomes)
        try:
            for ds in sent:
                peer.store(ds)
                if len(outcomes.failed()) >= 5:
                    break
        finally:
            peer.close()
        # Then no room even for an object (through the intake: not even for a WAL frame).
        last = _fill(node.data_dir, leave=0, name="last-bytes")
        no_room = study_of(patient, 3)
        sent += no_room
        peer = Peer(node, outcomes)
        try:
            assert [peer.store(ds) for ds in no_room] == [OUT_OF_RESOURCES] * 3
        finally:
            peer.close()
        # Through the intake the index's commit meets the full disk (the object's own
        # write is the mover's, retried once there is room again).
        assert "index commit failed: database or disk is full" in node.log(since_start=True)
        stow_answer = stow(node, fresh_ct(PatientID=patient))
        assert stow_answer.status_code == 409, stow_answer.text[:300]
        assert set(outcomes.status.values()) == {0x0000, OUT_OF_RESOURCES}, outcomes
        assert max(outcomes.seconds.values()) < DIMSE_TIMEOUT
        # Acknowledged objects the full disk keeps the mover from storing wait in the
        # intake; each indexed one is in the intake or the store.
        index = assert_consistent(node.data_dir)
        assert outcomes.acknowledged() <= set(index)
        assert not outcomes.failed() & set(index)
        assert temporaries(node.data_dir) == []
        studies = {str(sent[0].StudyInstanceUID)}
        assert_reads_answer(node, patient, studies)
        during = node.resources()

        balloon.unlink()
        last.unlink()
        refused = [ds for ds in sent if str(ds.SOPInstanceUID) in outcomes.failed()]
        again = store_all(node, refused)
        assert again.acknowledged() == outcomes.failed(), again
        node.wait_drained()
        index = assert_consistent(node.data_dir, exact=True)
        assert outcomes.acknowledged() | again.acknowledged() <= set(index)
        after = node.resources()
        report("data folder full (tmpfs)", before, after, during=f"{during}",
               acknowledged=len(outcomes.acknowledged()), refused=len(outcomes.failed()))
    finally:
        node.stop()
        _unmount(node.data_dir)


def test_index_locked_by_another_writer(node_factory: Callable[..., Node]) -> None:
    """Another writer holds the index past the busy timeout: C-STORE gets A700 and
    STOW-RS reports the part failed, within the DIMSE timeout, the objects written for
    them are removed again; C-FIND, QIDO and WADO answer (WAL readers are not blocked);
    once the lock is released, stores succeed."""
    node = web_ready(node_factory("faults-index", PACS_DIMSE_TIMEOUT=str(DIMSE_TIMEOUT),
                                  PACS_WEB_WORKERS="1"))
    patient = "FAULT-LOCK"
    stored = study_of(patient, 2)
    earlier = store_all(node, stored)
    assert len(earlier.acknowledged()) == 2
    studies = {str(stored[0].StudyInstanceUID)}
    warm_up(node, patient)
    before = node.resources()

    holder = apsw.Connection(str(node.data_dir / "index.sqlite"))
    # The node's own writers (its intake's mover) may hold the lock a moment: wait for
    # their turn to end, as they do for ours.
    holder.set_busy_timeout(30_000)
    holder.execute("BEGIN IMMEDIATE")
    try:
        stow_answer: list[requests.Response] = []
        stow_thread = threading.Thread(
            target=lambda: stow_answer.append(stow(node, fresh_ct(PatientID=patient))))
        stow_thread.start()
        locked = store_all(node, study_of(patient, 2))
        assert set(locked.status.values()) == {OUT_OF_RESOURCES}, locked
        slowest = max(locked.seconds.values())
        assert BUSY_TIMEOUT <= slowest < DIMSE_TIMEOUT
        assert_reads_answer(node, patient, studies)
        wado = requests.get(
            f"{node.web_url()}/studies/{stored[0].StudyInstanceUID}/series/"
            f"{stored[0].SeriesInstanceUID}/instances/{stored[0].SOPInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"; '
                               'transfer-syntax=*'}, timeout=30)
        assert wado.status_code == 200
        stow_thread.join(timeout=60)
        [answer] = stow_answer
        assert answer.status_code == 409, answer.text[:300]
        [failed] = answer.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [OUT_OF_RESOURCES]
        during = node.resources()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Nothing of the refused stores is left: the store holds exactly what is indexed.
    node.wait_drained()
    assert_consistent(node.data_dir, exact=True)
    again = store_all(node, study_of(patient, 2))
    assert len(again.acknowledged()) == 2, again
    assert stow(node, fresh_ct(PatientID=patient)).status_code == 200
    node.wait_drained()
    index = assert_consistent(node.data_dir, exact=True)
    assert earlier.acknowledged() | again.acknowledged() <= set(index)
    after = node.resources()
    report("index locked", before, after, during=f"{during}",
           slowest_answer=f"{slowest:.1f} s", busy_timeout=f"{BUSY_TIMEOUT:.0f} s")
