"""The intake against real peers: ``pacs serve`` with dcmtk, DICOMweb and SeaweedFS.

- read your writes: with the mover held (``PACS_INTAKE_MOVER=off``), an instance just
  stored is found (C-FIND, QIDO-RS) and sent back byte for byte (WADO-RS, C-GET) from
  the intake, while the store holds nothing;
- back-pressure: past ``PACS_INTAKE_MAX_BYTES`` a C-STORE gets A700 and a STOW-RS 503
  with Retry-After; once drained the node takes objects again;
- ``kill -9`` of the node during four associations storing at once, on the folder and on
  S3: every acknowledged instance is indexed and readable after the restart, in the
  store once the mover drained, the intake empty, ``pacs fsck`` clean;
- ``kill -9`` of the mover alone in the middle of its batches: nothing lost, nothing
  doubled;
- S3 down: C-STORE goes on succeeding into the intake; the mover drains it once S3 is
  back.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from pacs.core.index.connection import WAL_SIZE_LIMIT
from tests.conftest import sample
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    acknowledged,
    assert_consistent,
    intake_files,
    make_instances,
    read_index,
    read_intake,
    run_dcmtk,
    start_dcmsend,
    stored_objects,
    temporaries,
)
from tests.interop.test_fsck import c_get, qido_instances, wado
from tests.storage.seaweed import SeaweedServer

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

BUCKET = "pacs-intake"


def storescu(node: Node, *paths: Path) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("storescu", "-v", "-aec", AE_TITLE, "127.0.0.1", str(node.port),
                     *map(str, paths), timeout=120)


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    """storescu's C-STORE was answered Out of Resources (A700)."""
    return bool(re.search(r"0xa700|Out ?Of ?Resources", result.stdout, re.IGNORECASE))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_of(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _nice(pid: int) -> int:
    """The niceness of ``pid`` (field 19 of /proc/<pid>/stat, proc(5))."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[16])


def test_the_mover_yields_the_cpu_to_acknowledgements(node_factory: Callable[..., Node]
                                                      ) -> None:
    """The mover runs NICENESS below pacs serve; the DIMSE workers run as pacs serve."""
    from pacs.node.mover import NICENESS

    node = node_factory("niceness")
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in node.pids()}
    movers = [pid for pid, command in commands.items() if b"pacs.node.mover" in command]
    assert len(movers) == 1, commands
    serve = _nice(node.proc.pid)  # type: ignore[union-attr]
    assert _nice(movers[0]) == min(19, serve + NICENESS)
    workers = [pid for pid, command in commands.items()
               if command.split(b"\0")[1:3] == [b"-m", b"pacs"] and pid != node.proc.pid]
    assert workers and all(_nice(pid) == serve for pid in workers), commands


def test_read_your_writes_while_the_mover_is_held(node_factory: Callable[..., Node],
                                                   tmp_path: Path) -> None:
    node = node_factory("held", PACS_INTAKE_MOVER="off")
    path = sample("CT_small.dcm")
    sent = storescu(node, path)
    assert sent.returncode == 0, sent.stdout
    key = key_of(path)
    [row] = read_index(node.data_dir).values()
    assert read_intake(node.data_dir) == {key: row.checksum}
    assert stored_objects(node.data_dir) == {}  # nothing in the store: all from the intake
    study, series, name = key.split("/")
    found = run_dcmtk("findscu", "-S", "-aec", AE_TITLE, "-k", "QueryRetrieveLevel=IMAGE",
                      "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}",
                      "-k", "SOPInstanceUID", "127.0.0.1", str(node.port))
    assert found.returncode == 0 and name.removesuffix(".dcm") in found.stdout, found.stdout
    assert qido_instances(node, study) == [name.removesuffix(".dcm")]
    served = wado(node, key)
    assert sha(served) == row.checksum
    assert pydicom.dcmread(io.BytesIO(served)).PixelData == pydicom.dcmread(path).PixelData
    got = pydicom.dcmread(io.BytesIO(c_get(node, key, tmp_path / "get")))
    assert got.SOPInstanceUID == name.removesuffix(".dcm")
    assert got.PixelData == pydicom.dcmread(io.BytesIO(served)).PixelData
    status = node.cli("status")
    assert re.search(r"^intake: 1 object\(s\)", status.stdout, re.MULTILINE), status.stdout
    health = requests.get(f"{node.web_url()}/health", timeout=30).json()
    assert health["intake_objects"] == 1


#: C-STOREs refused on one association while the intake is full.
REFUSED = 10


def test_back_pressure_refuses_past_the_limit_and_takes_again_once_drained(
        node_factory: Callable[..., Node]) -> None:
    node = node_factory("full", PACS_INTAKE_MOVER="off", PACS_INTAKE_MAX_BYTES="1")
    first, second = sample("CT_small.dcm"), sample("MR_small.dcm")
    assert storescu(node, first).returncode == 0  # the intake was empty: taken
    answer = run_dcmtk("storescu", "-v", "--no-halt", "-aec", AE_TITLE, "127.0.0.1",
                       str(node.port), *[str(second)] * REFUSED, timeout=120)
    assert refused(answer), answer.stdout
    assert len(re.findall(r"0xa700|Out ?Of ?Resources", answer.stdout, re.IGNORECASE)) \
        >= REFUSED
    stow = requests.post(
        f"{node.web_url()}/studies", data=b"--b\r\n\r\n--b--",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                 "Accept": "application/dicom+json"}, timeout=30)
    assert stow.status_code == 503 and int(stow.headers["Retry-After"]) > 0, stow.text
    # Refusals are counted and logged as a WARNING per interval and process, not as an
    # ERROR each.
    log = node.log(since_start=True)
    assert "cannot take more objects" not in "".join(
        line for line in log.splitlines(keepends=True) if " ERROR " in line), log
    assert 1 <= log.count("the intake is full (PACS_INTAKE_MAX_BYTES)") < REFUSED + 1, log
    assert key_of(second) not in {row.object_key for row in read_index(node.data_dir).values()}
    node.env["PACS_INTAKE_MOVER"] = "on"
    node.restart()
    node.wait_drained()
    assert storescu(node, second).returncode == 0
    node.wait_drained()
    assert set(stored_objects(node.data_dir)) == {key_of(first), key_of(second)}


# --- kill -9 -----------------------------------------------------------------------------

#: Instances per association, associations, acknowledgements (each) before the kill.
PER_SENDER, SENDERS, KILL_AFTER = 60, 4, 15
#: CT slices each sender sends besides, on S3 (files of the intake there).
LARGE_PER_SENDER = 15


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server of this module's own: its tests kill and start it."""
    server = SeaweedServer(tmp_path_factory.mktemp("weed-intake"))
    try:
        server.start()
        yield server
    finally:
        server.close()


def s3_settings(weed: SeaweedServer, customer: str, **extra: str) -> dict[str, str]:
    return {"PACS_STORAGE": "s3", "PACS_S3_ENDPOINT": weed.s3.endpoint,
            "PACS_S3_ACCESS_KEY": weed.s3.access_key,
            "PACS_S3_SECRET_KEY": weed.s3.secret_key, "PACS_S3_BUCKET": BUCKET,
            "CUSTOMER": customer, **extra}


def bucket_objects(weed: SeaweedServer, customer: str) -> dict[str, str]:
    """The customer's objects in the bucket: key -> SHA-256."""
    client = weed.s3.client()
    found = {}
    for item in client.list_objects(BUCKET, prefix=f"{customer}/", recursive=True):
        name = str(item.object_name)
        if "/quarantine/" in name:
            continue
        response = client.get_object(BUCKET, name)
        try:
            found[name.removeprefix(f"{customer}/")] = sha(response.read())
        finally:
            response.close()
            response.release_conn()
    return found


def stored(node: Node, weed: SeaweedServer | None) -> dict[str, str]:
    """The store's objects: key -> SHA-256 (the folder, or the node's bucket prefix)."""
    if weed is None:
        return {key: sha(path.read_bytes())
                for key, path in stored_objects(node.data_dir).items()}
    return bucket_objects(weed, node.env["CUSTOMER"])


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_kill_9_during_four_associations(node_factory: Callable[..., Node],
                                         request: pytest.FixtureRequest, tmp_path: Path,
                                         backend: str) -> None:
    weed: SeaweedServer | None = request.getfixturevalue("weed") if backend == "s3" else None
    # A mover killed with PUTs in flight leaves its keys unsettled for PACS_S3_SETTLE
    # (600 s by default) after the restart: short here, so the drain is seen.
    settings = s3_settings(weed, "killed", PACS_S3_SETTLE="2") if weed else {}
    node = node_factory(f"kill9-{backend}", **settings)
    # The crash meets a WAL the mover wrote ahead as it started (Index.write_wal_ahead):
    # SQLite recovers the commits from the frames before its zeros.
    wal = node.data_dir / "index.sqlite-wal"
    deadline = time.monotonic() + 60
    while not (wal.exists() and wal.stat().st_size >= WAL_SIZE_LIMIT):
        assert time.monotonic() < deadline, "the WAL was not written ahead"
        time.sleep(0.05)
    folders = [tmp_path / f"send{n}" for n in range(SENDERS)]
    made = [make_instances(folder, PER_SENDER, per_series=30, patient_id=f"KILL{n}")
            for n, folder in enumerate(folders)]
    if weed is not None:  # CT slices too, which the intake keeps as its files on S3
        made += [make_instances(folder, LARGE_PER_SENDER, per_series=30, rows=512,
                                patient_id=f"KILL{n}", name="{:05d}-ct.dcm")
                 for n, folder in enumerate(folders)]
    senders = [start_dcmsend(node.port, folder, calling=f"KILLSCU{n}")
               for n, folder in enumerate(folders)]
    deadline = time.monotonic() + 120
    for sender in senders:  # each association well under way
        while len(acknowledged("".join(sender.lines))) < KILL_AFTER:
            assert time.monotonic() < deadline and sender.process.poll() is None, (
                "".join(sender.lines[-30:]))
            time.sleep(0.02)
    node.kill9()
    acked: set[str] = set()
    for sender in senders:
        acked |= acknowledged(sender.finish())
    assert len(acked) >= SENDERS * KILL_AFTER
    assert acked <= {uid for batch in made for _, uid in batch}
    if weed is not None:  # files sent in directory order: the slices among the rest
        assert acked & {uid for batch in made[SENDERS:] for _, uid in batch}

    # As the crash left it: every acknowledged instance indexed, its bytes in the
    # intake (checksum as indexed) or, moved already, in the store.
    index = read_index(node.data_dir)
    assert acked <= set(index), f"lost: {sorted(acked - set(index))[:3]}"
    intake = read_intake(node.data_dir)
    objects = stored(node, weed)
    for row in index.values():
        assert intake.get(row.object_key, objects.get(row.object_key)) == row.checksum

    node.start()
    node.wait_drained()
    objects = stored(node, weed)
    index = read_index(node.data_dir)
    assert acked <= set(index)
    assert read_intake(node.data_dir) == {} and intake_files(node.data_dir) == []
    assert {row.object_key: row.checksum for row in index.values()} == objects
    for uid in sorted(acked)[:5]:  # readable, bytes as sent
        assert sha(wado(node, index[uid].object_key)) == index[uid].checksum
    fsck = node.cli("fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "index and store agree" in fsck.stdout


def test_kill_9_of_the_mover_mid_batch(node_factory: Callable[..., Node],
                                       tmp_path: Path) -> None:
    """The mover alone, killed while it writes batches, then run again: every object
    once in the store with its checksum, every row once, the intake empty."""
    count = 300
    node = node_factory("mover-kill", PACS_INTAKE_MOVER="off")
    made = make_instances(tmp_path / "send", count, per_series=100, patient_id="MOVER")
    sent = run_dcmtk("dcmsend", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(node.port),
                     str(tmp_path / "send"), timeout=300)
    assert sent.returncode == 0, sent.stdout
    node.terminate()
    assert len(read_intake(node.data_dir)) == count

    env = {**node.env, "PACS_INTAKE_MOVER": "on"}

    def start_mover() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "pacs.node.mover"], cwd=node.root,
                                env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    mover = start_mover()
    try:
        deadline = time.monotonic() + 60
        while len(read_intake(node.data_dir)) == count:  # its first batch done
            assert time.monotonic() < deadline and mover.poll() is None
            time.sleep(0.005)
        os.kill(mover.pid, signal.SIGKILL)
        mover.wait(30)
        left = len(read_intake(node.data_dir))
        assert 0 < left < count, left  # killed mid-way
        node.env["PACS_INTAKE_MOVER"] = "on"
        node.start()  # removes temporaries of the killed writes; its mover finishes
        node.wait_drained()
    finally:
        if mover.poll() is None:
            mover.kill()
    index = read_index(node.data_dir)
    assert set(index) == {uid for _, uid in made}
    assert len(index) == count
    objects = stored(node, None)
    assert {row.object_key: row.checksum for row in index.values()} == objects
    assert not temporaries(node.data_dir)
    assert_consistent(node.data_dir, exact=True)


def test_s3_down_ingest_goes_on_into_the_intake(node_factory: Callable[..., Node],
                                                weed: SeaweedServer, tmp_path: Path) -> None:
    """weed killed: C-STOREs keep succeeding (into the intake), ``pacs status`` shows the
    backlog and the mover's error, and past the limit the node refuses (A700); weed
    started again: the mover drains, and the bucket holds every acknowledged object."""
    made = make_instances(tmp_path / "send", 12, per_series=12, patient_id="S3DOWN")
    size = made[0][0].stat().st_size
    # Room for nine objects of about that size, not for a tenth.
    node = node_factory("s3-down", **s3_settings(
        weed, "down", PACS_INTAKE_MAX_BYTES=str(9 * size + size // 2)))
    weed.kill()
    try:
        results = [storescu(node, path) for path, _ in made]
        outcomes = ["refused" if refused(r) else "ok" if r.returncode == 0 else r.stdout
                    for r in results]
        assert outcomes == ["ok"] * 9 + ["refused"] * 3, outcomes
        health = requests.get(f"{node.web_url()}/health", timeout=60)
        assert health.status_code == 503  # the store is down: said so
        found = health.json()
        assert found["intake_objects"] == 9 and found["intake_bytes"] >= 9 * (size - 1000)
        deadline = time.monotonic() + 60
        while not found["intake_error"]:  # the mover's first failure, recorded
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
            found = requests.get(f"{node.web_url()}/health", timeout=60).json()
    finally:
        weed.start()
    node.wait_drained(timeout=120)
    index = read_index(node.data_dir)
    assert len(index) == 9
    assert {row.object_key: row.checksum for row in index.values()} == bucket_objects(weed, "down")
    assert storescu(node, made[-1][0]).returncode == 0  # room again
