"""Forwarding with real peers: dcmtk's storescp as the DIMSE destination, a second
``pacs serve`` as the STOW-RS destination, dcmtk's storescu as the modality.

One node forwards by three routes; the tests run in order over it: the rules (what
does not match is not sent), a destination down at first (the backlog grows, then
drains when it comes up: nothing lost, nothing twice), a restart with a backlog, and
``pacs send``.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import SecondaryCaptureImageStorage

from tests.auditcheck import event_name, problems, read_trail, studies_in
from tests.conftest import free_port, wait_for_port
from tests.interop.conftest import AE_TITLE, Node, fresh_ct, run_dcmtk

pytestmark = pytest.mark.interop

#: Seconds the tests wait at most for a delivery (the node retries every second).
WAIT = 60.0


class StoreSCP:
    """dcmtk's storescp on a fixed port, writing each received object to its own file
    (``+uf``: a second copy of an instance is a second file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen(["/usr/bin/storescp", "+uf", "-od", str(self.folder),
                                      str(self.port)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The node's settings name this port and it comes back on it after a stop, so it
        # cannot move to another (start_listening): a port taken meanwhile fails at once.
        wait_for_port(self.port, process=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def received(self) -> Counter[str]:
        """SOP Instance UID -> how many times it arrived (a file storescp is still
        writing counts once it can be read)."""
        found: Counter[str] = Counter()
        for path in self.folder.iterdir():
            try:
                found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
            except (InvalidDicomError, AttributeError, EOFError, OSError):
                continue
        return found


def _until(done: Callable[[], bool], what: str, node: Node) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT} s: {what}\n--- node log ---\n{node.log()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path_factory.mktemp("storescp"))
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def web_peer(node_factory: Callable[..., Node]) -> Node:
    return node_factory("stow-peer", PACS_VIEWER_PORT="0", PACS_UPLOADS_POLL="0")


@pytest.fixture(scope="module")
def forwarding(node_factory: Callable[..., Node], archive: StoreSCP, web_peer: Node) -> Node:
    routes = (f"ct: calling_ae=CT1, modality=CT -> ARCHIVE; "
              f"sc: sop_class={SecondaryCaptureImageStorage} -> "
              f"{web_peer.web_url()}/dicom-web")
    return node_factory("forwarding", PACS_VIEWER_PORT="0", PACS_UPLOADS_POLL="0",
                        PACS_MODALITIES=f"ARCHIVE=127.0.0.1:{archive.port}",
                        PACS_ROUTES=routes, PACS_FORWARD_BATCH="2",
                        PACS_FORWARD_RETRY_MAX="1")


def _send(node: Node, folder: Path, calling: str, count: int,
          **changes: object) -> list[str]:
    """Store ``count`` new instances with storescu as ``calling``; their SOP UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, uids = [], []
    study = fresh_ct().StudyInstanceUID
    for _ in range(count):
        ds = fresh_ct(StudyInstanceUID=study, **changes)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
        uids.append(str(ds.SOPInstanceUID))
    result = run_dcmtk("storescu", "-aet", calling, "-aec", AE_TITLE, "127.0.0.1",
                       str(node.port), *paths, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return uids


def _status(node: Node, destination: str) -> str:
    result = node.cli("status")
    return next((line for line in result.stdout.splitlines()
                 if line.startswith(f"forwarding to {destination}:")), "")


def test_backlog_grows_while_the_destination_is_down_then_drains(
        forwarding: Node, archive: StoreSCP, web_peer: Node, tmp_path: Path) -> None:
    matching = _send(forwarding, tmp_path / "ct1", "CT1", 3)
    _send(forwarding, tmp_path / "other", "OTHER", 2)        # another calling AE
    _send(forwarding, tmp_path / "mr", "CT1", 1, Modality="MR")  # another modality
    web = _send(forwarding, tmp_path / "sc", "OTHER", 2,
                SOPClassUID=SecondaryCaptureImageStorage, Modality="OT")
    _until(lambda: "ARCHIVE: 3 waiting" in _status(forwarding, "ARCHIVE")
           and "last error" in _status(forwarding, "ARCHIVE"),
           "the backlog of the unreachable destination", forwarding)
    _until(lambda: set(web) <= set(web_peer.index()), "STOW-RS delivery", forwarding)
    assert len(web_peer.index()) == 2  # the other instances did not go there
    archive.start()
    _until(lambda: set(archive.received()) == set(matching), "the backlog drained",
           forwarding)
    _until(lambda: "ARCHIVE: 0 waiting" in _status(forwarding, "ARCHIVE"),
           "an empty backlog", forwarding)
    assert archive.received() == Counter(dict.fromkeys(matching, 1))  # nothing twice
    assert "last success 2" in _status(forwarding, "ARCHIVE")
    log = forwarding.log()
    assert "forwarded 2 instance(s) to ARCHIVE" in log
    assert all(uid not in log for uid in matching)  # no UIDs at INFO
    # Each batch is a DICOM Instances Transferred event naming the destination.
    batches = [e for e in read_trail(forwarding.data_dir / "audit.jsonl")
               if event_name(e) == "DICOM Instances Transferred"
               and any(p["UserID"] == "ARCHIVE" for p in e["ActiveParticipant"])
               and e["EventIdentification"]["EventOutcomeIndicator"] == 0]
    assert len(batches) == 2 and all(problems(e) == [] for e in batches), batches
    assert set(studies_in(batches[0])) == {str(pydicom.dcmread(
        next((tmp_path / "ct1").iterdir())).StudyInstanceUID)}


def test_a_restart_with_a_backlog_still_delivers(
        forwarding: Node, archive: StoreSCP, tmp_path: Path) -> None:
    archive.stop()
    before = archive.received()
    later = _send(forwarding, tmp_path / "later", "CT1", 3)
    _until(lambda: "ARCHIVE: 3 waiting" in _status(forwarding, "ARCHIVE"),
           "the backlog", forwarding)
    forwarding.restart()
    archive.start()
    _until(lambda: set(later) <= set(archive.received()), "delivery after a restart",
           forwarding)
    assert archive.received() == before + Counter(dict.fromkeys(later, 1))


def test_pacs_send_on_demand_with_progress_and_exit_code(
        forwarding: Node, archive: StoreSCP, web_peer: Node, tmp_path: Path) -> None:
    uids = _send(forwarding, tmp_path / "old", "OTHER", 3)  # matches no route
    study = str(pydicom.dcmread(next((tmp_path / "old").iterdir())).StudyInstanceUID)
    before = archive.received()
    sent = forwarding.cli("send", "--to", "ARCHIVE", study)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "3 of 3 instance(s) sent to ARCHIVE" in sent.stdout
    assert "to ARCHIVE" in sent.stderr  # the progress bar's label
    assert archive.received() == before + Counter(dict.fromkeys(uids, 1))
    web = forwarding.cli("send", "--quiet", "--to", f"{web_peer.web_url()}/dicom-web", study)
    assert web.returncode == 0, web.stdout + web.stderr
    assert set(uids) <= set(web_peer.index())
    archive.stop()
    down = forwarding.cli("send", "--to", "ARCHIVE", study)
    assert down.returncode == 1 and "3 not delivered" in down.stdout
    unknown = forwarding.cli("send", "--to", "NOBODY", study)
    assert unknown.returncode == 1 and "PACS_MODALITIES" in unknown.stderr
    missing = forwarding.cli("send", "--to", "ARCHIVE", "1.2.3.4")
    assert missing.returncode == 1 and "no study" in missing.stderr
    requeued = forwarding.cli("send", "--to", "ARCHIVE", "--requeue")
    assert requeued.returncode == 0 and "0 refused instance(s) queued again" in requeued.stdout
