"""``pacs fsck`` beside a running ``pacs serve``: crash windows of store, overwrite and
move built on disk, a dry run that changes nothing, a repair while the node runs, and the
newest acknowledged version of each instance retrieved afterwards (C-GET and WADO-RS).

The known failure this guards: an instance re-sent under another Study / Series UID (so
another object key), the new object committed, and a crash before the old copy's
deletion.  An fsck that trusted what it found on disk re-indexed the old copy, deleted the
newest acknowledged object, then dropped the row.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.factory import dataset_bytes, make_instance
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    assert_consistent,
    fresh_ct,
    index_counts,
    key_of,
    run_dcmtk,
)
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

#: A value that must appear in no output of fsck (no patient data in logs or reports).
PATIENT_NAME = "FSCKTEST^SECRETNAME"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class Versions:
    """Versions of one SOP Instance UID, each in a study and series of its own."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.sop = generate_uid()
        self.count = 0

    def make(self, description: str) -> tuple[Path, str, pydicom.Dataset]:
        """(file, object key, data set) of a new version under new study / series UIDs."""
        ds = fresh_ct(PatientName=PATIENT_NAME, PatientID="FSCK",
                      SeriesDescription=description)
        ds.SOPInstanceUID = self.sop
        ds.file_meta.MediaStorageSOPInstanceUID = self.sop
        self.count += 1
        path = self.folder / f"{self.count}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path, key_of(ds.StudyInstanceUID, ds.SeriesInstanceUID, self.sop), ds


def storescu(node: Node, path: Path) -> None:
    result = run_dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(node.port), str(path))
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    node.wait_drained()  # in the store, where the crash windows below are built


def stored(node: Node, key: str) -> bytes:
    return (node.data_dir / "objects" / key).read_bytes()


def write_object(node: Node, key: str, data: bytes) -> None:
    """Leave an object at ``key`` as a crash would (complete, renamed into place)."""
    path = node.data_dir / "objects" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def wado(node: Node, key: str) -> bytes:
    """The instance as WADO-RS sends it."""
    study, series, name = key.split("/")
    response = requests.get(
        f"{node.web_url()}/studies/{study}/series/{series}/instances/"
        f"{name.removesuffix('.dcm')}", headers={"Accept": AS_STORED}, timeout=60)
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    [part] = response.content.split(f"--{boundary}".encode())[1:-1]
    return part.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n")


def getscu(node: Node, key: str, folder: Path) -> str:
    """C-GET of one instance (getscu, Study Root, IMAGE level) into ``folder``; the log."""
    study, series, name = key.split("/")
    folder.mkdir(parents=True)
    result = run_dcmtk("getscu", "-v", "-S", "+B", "-aec", AE_TITLE, "-od", str(folder),
                       "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                       "-k", f"SeriesInstanceUID={series}",
                       "-k", f"SOPInstanceUID={name.removesuffix('.dcm')}",
                       "127.0.0.1", str(node.port), timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n--- server ---\n{node.log()}"
    return result.stdout


def c_get(node: Node, key: str, folder: Path) -> bytes:
    """The instance as C-GET sends it."""
    getscu(node, key, folder)
    [received] = list(folder.iterdir())
    return received.read_bytes()


def qido_instances(node: Node, study: str) -> list[str]:
    """SOP Instance UIDs QIDO-RS lists in a study."""
    response = requests.get(f"{node.web_url()}/studies/{study}/instances", timeout=60)
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return [item["00080018"]["Value"][0] for item in response.json()]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fsck_beside_a_running_node_keeps_the_newest_acknowledged(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory("fsck")

    # (c) moved, committed, the old copy left: the row's object B is the newest acknowledged.
    moved = Versions(tmp_path, "moved")
    path_a, key_a, _ = moved.make("A")
    path_b, key_b, _ = moved.make("B")
    storescu(node, path_a)
    old = stored(node, key_a)
    storescu(node, path_b)
    new = stored(node, key_b)
    assert not (node.data_dir / "objects" / key_a).exists()  # the ingest removed it
    write_object(node, key_a, old)  # ... which a crash before that would have left

    # (b) moved, written but not committed: the acknowledged row's object C stays.
    unacked_move = Versions(tmp_path, "unacked-move")
    path_c, key_c, _ = unacked_move.make("C")
    path_d, key_d, _ = unacked_move.make("D")
    storescu(node, path_c)
    acked_c = stored(node, key_c)
    never_acked = path_d.read_bytes()
    write_object(node, key_d, never_acked)

    # (b) a new instance written but not committed: indexed by the repair.
    new_instance = Versions(tmp_path, "new")
    path_e, key_e, _ = new_instance.make("E")
    unindexed = path_e.read_bytes()
    write_object(node, key_e, unindexed)

    # (d) changed in place (same study and series) outside the node: an object of its
    # size replacing another goes through the intake, so this is no later write of the
    # node's: damaged, reported and left, its row keeping what was acknowledged.
    in_place = Versions(tmp_path, "in-place")
    path_f, key_f, ds_f = in_place.make("F")
    storescu(node, path_f)
    node.wait_drained()
    acked_f = (node.data_dir / "objects" / key_f).read_bytes()
    ds_f.SeriesDescription = "F, sent again"
    ds_f.save_as(tmp_path / "f2.dcm", enforce_file_format=True)
    rewritten = (tmp_path / "f2.dcm").read_bytes()
    write_object(node, key_f, rewritten)

    # (e) an indexed object gone (deleted outside pacs), no copy: listed, not sendable.
    gone = Versions(tmp_path, "gone")
    path_g, key_g, _ = gone.make("G")
    storescu(node, path_g)
    (node.data_dir / "objects" / key_g).unlink()
    assert gone.sop in qido_instances(node, key_g.split("/")[0])
    failed_get = getscu(node, key_g, tmp_path / "get-gone")
    assert re.search(r"Number of Failed Suboperations\s*:\s*1\b", failed_get), failed_get

    # (a) a temporary file of a write interrupted long ago.
    stale = node.data_dir / "objects" / key_e.rsplit("/", 1)[0] / ".tmp-interrupted"
    stale.write_bytes(unindexed[:1000])
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    node.assert_serving()
    memory_before = node.resources()
    before = node.snapshot()
    dry = node.cli("fsck")
    assert dry.returncode == 1, dry.stdout + dry.stderr  # problems found, not repaired
    assert node.snapshot() == before, "the dry run changed something"
    for problem, key in (("superseded", key_a), ("superseded", key_d),
                         ("unacknowledged", key_e), ("damaged", key_f),
                         ("missing", key_g), ("temporary", stale.name)):
        assert any(line.startswith(problem) and key in line
                   for line in dry.stdout.splitlines()), dry.stdout
    assert "nothing changed" in dry.stdout
    assert node.index()[moved.sop].object_key == key_b

    repair = node.cli("fsck", "--repair")
    assert repair.returncode == 1, repair.stdout + repair.stderr  # the damaged one left
    assert any(line.startswith("damaged") and key_f in line
               for line in repair.stdout.splitlines()), repair.stdout
    # Left as it was found, its row as acknowledged; the operator restores the
    # acknowledged bytes (from a backup) for what follows.
    assert (node.data_dir / "objects" / key_f).read_bytes() == rewritten
    assert node.index()[in_place.sop].checksum == sha(acked_f)
    write_object(node, key_f, acked_f)
    node.assert_serving()
    memory_after = node.resources()
    print(f"fsck --repair beside the running node:\n{repair.stdout}")
    print(f"node before fsck: {memory_before}; after fsck and fsck --repair: {memory_after}")
    assert memory_after.rss_bytes - memory_before.rss_bytes < 256 * 2**20
    for output in (dry.stdout, dry.stderr, repair.stdout, repair.stderr):
        assert PATIENT_NAME.split("^")[0] not in output  # UIDs only, no patient data
    # The log counts the changes; the report (stdout) names them, the log does not.
    assert "fsck: repaired " in repair.stderr and "quarantine" in repair.stderr
    for key in (key_a, key_d, key_e, key_f, moved.sop):
        assert key not in repair.stderr and key.rsplit("/", 1)[-1] not in repair.stderr

    # The newest acknowledged version of each instance is indexed and served.
    index = assert_consistent(node.data_dir, exact=True)
    assert (index[moved.sop].object_key, index[moved.sop].checksum) == (key_b, sha(new))
    assert (index[unacked_move.sop].object_key, index[unacked_move.sop].checksum) == (
        key_c, sha(acked_c))
    assert (index[new_instance.sop].object_key, index[new_instance.sop].checksum) == (
        key_e, sha(unindexed))
    assert wado(node, key_b) == new
    assert dataset_bytes(c_get(node, key_b, tmp_path / "get-b")) == dataset_bytes(new)
    assert wado(node, key_c) == acked_c
    assert wado(node, key_e) == unindexed
    assert (index[in_place.sop].object_key, index[in_place.sop].checksum) == (
        key_f, sha(acked_f))
    assert wado(node, key_f) == acked_f
    assert gone.sop not in index and gone.sop not in qido_instances(
        node, key_g.split("/")[0])
    assert not stale.exists()

    # Nothing is lost: what was taken out of service is in the quarantine.
    quarantine = node.data_dir / "quarantine"
    kept = {p.relative_to(quarantine).as_posix().split("/", 1)[1]: p.read_bytes()
            for p in quarantine.rglob("*.dcm")}
    assert kept == {key_a: old, key_d: never_acked}

    again = node.cli("fsck", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["findings"] == []


def _imported(tmp_path: Path, name: str, count: int, **settings: str) -> Node:
    """A node (not started) whose store holds ``count`` instances, imported by the
    command; the intake is drained by the import."""
    node = Node(tmp_path / name, **settings)
    inputs = tmp_path / f"{name}-in"
    inputs.mkdir()
    for number in range(count):
        (inputs / f"{number}.dcm").write_bytes(make_instance(PatientName=PATIENT_NAME))
    imported = node.cli("import", "--quiet", str(inputs))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    return node


def test_fsck_creates_nothing_and_repairs_nothing_by_assumption(tmp_path: Path) -> None:
    """An objects folder that is not there (a volume not mounted): fsck reports it and
    does not create it.  An empty folder in its place (the bare mount point): the dry
    run and ``--repair`` change nothing and exit 1, saying why; with the real folder
    back fsck is clean; ``--allow-mass-drop`` drops rows only when told to."""
    node = _imported(tmp_path, "unmounted", 3)
    objects = node.data_dir / "objects"
    real = node.data_dir / "objects.real"
    counts = index_counts(node.data_dir)
    assert counts["instance"] == 3
    objects.rename(real)

    for args in (("fsck",), ("fsck", "--repair")):
        missing = node.cli(*args)
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert "does not exist" in missing.stderr and str(objects) in missing.stderr
        assert not objects.exists(), "fsck created the folder it checks"

    objects.mkdir()
    dry = node.cli("fsck")
    assert dry.returncode == 1 and "would refuse" in dry.stdout, dry.stdout + dry.stderr
    refused = node.cli("fsck", "--repair", "--json")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    report = json.loads(refused.stdout)
    assert "lists no objects" in report["refused"] and not report["ok"]
    assert not any(finding["done"] for finding in report["findings"])
    assert index_counts(node.data_dir) == counts
    text = node.cli("fsck", "--repair")
    assert text.returncode == 1 and "repair refused, nothing changed" in text.stdout
    assert "--allow-mass-drop" in text.stdout
    for output in (dry.stdout, dry.stderr, refused.stdout, text.stdout, text.stderr):
        assert PATIENT_NAME.split("^")[0] not in output

    objects.rmdir()
    real.rename(objects)
    clean = node.cli("fsck", "--repair")
    assert clean.returncode == 0 and "index and store agree" in clean.stdout, clean.stdout

    objects.rename(real)
    objects.mkdir()
    dropped = node.cli("fsck", "--repair", "--allow-mass-drop")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert "rows dropped: 3" in dropped.stdout
    assert index_counts(node.data_dir)["instance"] == 0


def test_fsck_refuses_a_missing_index(tmp_path: Path) -> None:
    """No index for the customer named (a mistyped --customer or data folder): fsck
    says so and creates neither index nor data folder."""
    node = Node(tmp_path / "none")
    result = node.cli("fsck", "--repair", "--customer", "nosuch")
    assert result.returncode == 1 and "no index at" in result.stderr, result.stderr
    assert not (node.data_dir / "nosuch").exists() and not node.data_dir.exists()


def test_commands_refuse_another_customers_index(tmp_path: Path) -> None:
    """A mistyped ``--customer`` beside the right ``PACS_DATA_DIR`` (no customers
    file): the commands refuse the index, which records the customer that made it,
    instead of acting on it under the other name; the right name still works."""
    node = _imported(tmp_path, "owned", 2, CUSTOMER="acme")
    counts = index_counts(node.data_dir)
    for command in (("fsck", "--repair"), ("status",)):
        refused = node.cli(*command, "--customer", "acme-typo")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "is customer 'acme''s, not 'acme-typo''s" in refused.stderr
    assert index_counts(node.data_dir) == counts
    clean = node.cli("fsck", "--repair")
    assert clean.returncode == 0 and "index and store agree" in clean.stdout, clean.stdout


def test_fsck_on_a_wrong_bucket_changes_nothing(
        tmp_path: Path, seaweed_s3: SeaweedS3) -> None:  # noqa: F811 - the fixture
    """S3: a PACS_S3_BUCKET that does not exist is reported, not created; one that
    exists but holds nothing of the node's gets repair refused, the index unchanged."""
    bucket = "pacs-fsck-" + generate_uid()[-12:].replace(".", "")
    settings = {"PACS_STORAGE": "s3", "PACS_S3_ENDPOINT": seaweed_s3.endpoint,
                "PACS_S3_ACCESS_KEY": seaweed_s3.access_key,
                "PACS_S3_SECRET_KEY": seaweed_s3.secret_key, "PACS_S3_BUCKET": bucket,
                "CUSTOMER": "acme"}
    node = _imported(tmp_path, "s3", 3, **settings)
    counts = index_counts(node.data_dir)
    admin = seaweed_s3.client()
    wrong = bucket + "-typo"

    missing = node.cli("fsck", "--repair", env={"PACS_S3_BUCKET": wrong})
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert f"no bucket '{wrong}'" in missing.stderr
    assert not admin.bucket_exists(bucket_name=wrong), "fsck created the bucket it checks"

    admin.make_bucket(bucket_name=wrong)
    try:
        refused = node.cli("fsck", "--repair", env={"PACS_S3_BUCKET": wrong})
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "repair refused, nothing changed" in refused.stdout
        assert index_counts(node.data_dir) == counts
    finally:
        admin.remove_bucket(bucket_name=wrong)
    clean = node.cli("fsck", "--repair")
    assert clean.returncode == 0 and "index and store agree" in clean.stdout, clean.stdout
