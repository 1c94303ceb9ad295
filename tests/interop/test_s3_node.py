"""The whole node on S3: ``pacs serve`` with PACS_STORAGE=s3 against a real SeaweedFS
server: dcmsend in, objects under the customer's prefix, C-GET and
WADO-RS back byte for byte; wrong credentials stop the node at start-up with a reason."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests

from tests.conftest import sample
from tests.interop.conftest import AE_TITLE, Node, dataset_bytes, run_dcmtk
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.interop

FILES = ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm")


def _s3_settings(server: SeaweedS3, bucket: str, **extra: str) -> dict[str, str]:
    return {"PACS_STORAGE": "s3", "PACS_S3_ENDPOINT": server.endpoint,
            "PACS_S3_ACCESS_KEY": server.access_key, "PACS_S3_SECRET_KEY": server.secret_key,
            "PACS_S3_BUCKET": bucket, "CUSTOMER": "acme", **extra}


@pytest.mark.dimse
def test_store_and_retrieve_through_s3(node_factory: Callable[..., Node],
                                       seaweed_s3: SeaweedS3,  # noqa: F811 - the fixture
                                       tmp_path: Path) -> None:
    node = node_factory("s3node", **_s3_settings(seaweed_s3, "pacs-node-e2e"))
    for name in FILES:
        sent = run_dcmtk("dcmsend", "127.0.0.1", str(node.port), "-aec", AE_TITLE,
                         "-aet", "ASTER", str(sample(name)))
        assert sent.returncode == 0, sent.stdout
    client = seaweed_s3.client()
    keys = sorted(o.object_name for o in client.list_objects("pacs-node-e2e", prefix="acme/",
                                                              recursive=True))
    originals = {pydicom.dcmread(sample(n)).SOPInstanceUID: sample(n) for n in FILES}
    assert len(keys) == len(FILES)
    assert {k.rsplit("/", 1)[1][:-4] for k in keys} == set(originals)
    assert not (node.data_dir / "objects").exists() or not any(
        (node.data_dir / "objects").rglob("*.dcm"))  # nothing went to the folder store

    # C-GET back over DIMSE: stored bytes, as sent.
    out = tmp_path / "get"
    out.mkdir()
    study = pydicom.dcmread(sample("CT_small.dcm")).StudyInstanceUID
    got = run_dcmtk("getscu", "-S", "+B", "-aec", AE_TITLE, "-od", str(out), "-k",
                    "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                    "127.0.0.1", str(node.port))
    assert got.returncode == 0, got.stdout
    [received] = list(out.iterdir())
    stored = client.get_object("pacs-node-e2e", next(k for k in keys if study in k))
    try:
        stored_bytes = stored.read()
    finally:
        stored.close()
        stored.release_conn()
    received_ds = pydicom.dcmread(received)
    stored_ds = pydicom.dcmread(__import__("io").BytesIO(stored_bytes))
    syntaxes = (received_ds.file_meta.TransferSyntaxUID, stored_ds.file_meta.TransferSyntaxUID)
    assert dataset_bytes(received.read_bytes()) == dataset_bytes(stored_bytes), syntaxes

    # WADO-RS instance as stored, from loopback without credentials.
    sop = pydicom.dcmread(sample("MR_small_RLE.dcm")).SOPInstanceUID
    series = pydicom.dcmread(sample("MR_small_RLE.dcm")).SeriesInstanceUID
    mr_study = pydicom.dcmread(sample("MR_small_RLE.dcm")).StudyInstanceUID
    web_port = node.env["PACS_WEB_PORT"]
    response = requests.get(
        f"http://127.0.0.1:{web_port}/studies/{mr_study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30)
    assert response.status_code == 200, response.text[:200]
    stored = client.get_object("pacs-node-e2e", next(k for k in keys if sop in k))
    try:
        stored_mr = stored.read()
    finally:
        stored.close()
        stored.release_conn()
    assert stored_mr in response.content  # the part is the stored object, as stored


def test_wrong_credentials_stop_the_node_with_a_reason(
        seaweed_s3: SeaweedS3, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    env = {"PATH": "/usr/bin:/bin", "PACS_DATA_DIR": str(tmp_path / "data"),
           **_s3_settings(seaweed_s3, "pacs-node-bad", PACS_S3_SECRET_KEY="not-the-secret")}
    result = subprocess.run([sys.executable, "-m", "pacs", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "credentials" in message.lower(), message
    assert "not-the-secret" not in message
