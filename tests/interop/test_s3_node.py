"""The whole node on S3: ``pacs serve`` with PACS_STORAGE=s3 against a real SeaweedFS
server: dcmsend in, objects under the customer's prefix, C-GET and
WADO-RS back byte for byte; frames read one by one fetch about the object once (bytes
counted on the wire); wrong credentials stop the node at start-up with a reason."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    generate_uid,
)

from tests.conftest import sample
from tests.factory import dataset_bytes
from tests.interop.conftest import AE_TITLE, Node, run_dcmtk
from tests.storage.proxy import CountingRelay
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
    node.wait_drained()  # the mover writes them from the intake to the bucket
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


# --- frames read one by one ---------------------------------------------------------

FRAMES = 50
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def multiframe(path: Path, syntax: str) -> Dataset:
    """A 50-frame 256x256 16-bit image written to ``path`` in ``syntax`` (native or
    RLE, one fragment per frame after a Basic Offset Table)."""
    ds = Dataset()
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid() for _ in range(3))
    ds.Modality, ds.PatientID, ds.PatientName = "OT", "FRAMES", "FRAMES^TEST"
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.NumberOfFrames = FRAMES
    rows, columns = np.mgrid[0:256, 0:256]
    noise = np.random.default_rng(7).integers(0, 64, (FRAMES, 256, 256))
    pixels = ((rows * 3 + columns * 7)[None] + np.arange(FRAMES)[:, None, None] * 11
              ) % 4096 + noise
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels.astype(np.uint16), encoding_plugin="pylibjpeg")
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def single_part(response: requests.Response) -> bytes:
    """The content of a one-part multipart/related answer."""
    assert response.status_code == 200, response.text[:200]
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0]
    body = response.content
    closing = f"\r\n--{boundary.strip(chr(34))}--\r\n".encode()
    assert body.endswith(closing)
    return body[:-len(closing)].split(b"\r\n\r\n", 1)[1]


@pytest.mark.dimse
def test_frames_one_by_one_fetch_the_object_about_once(
        node_factory: Callable[..., Node], seaweed_s3: SeaweedS3,  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    """OHIF asks for each frame of a multi-frame object by itself: on S3 each request
    reads its frame with ranged GETs, so all 50 frames (and a rendered one) fetch from
    S3 about the object's size, not 50 times it.  Counted on the wire by a relay
    between the node and SeaweedFS."""
    with CountingRelay(seaweed_s3.endpoint) as relay:
        node = node_factory("s3frames", **_s3_settings(
            seaweed_s3, "pacs-node-frames", PACS_S3_ENDPOINT=relay.endpoint))
        web = f"http://127.0.0.1:{node.env['PACS_WEB_PORT']}"
        for syntax in (ExplicitVRLittleEndian, RLELossless):
            path = tmp_path / f"{syntax}.dcm"
            ds = multiframe(path, syntax)
            sent = run_dcmtk("dcmsend", "127.0.0.1", str(node.port), "-aec", AE_TITLE,
                             str(path))
            assert sent.returncode == 0, sent.stdout
            # Acknowledged through the intake: until the mover has put it in the bucket
            # the frames would be read from the intake, past the relay.
            node.wait_drained()
            size = path.stat().st_size
            base = (f"{web}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
            relay.reset()
            for number in range(1, FRAMES + 1):
                frame = single_part(requests.get(f"{base}/frames/{number}", timeout=30,
                                                 headers={"Accept": OHIF_FRAMES}))
                if syntax == RLELossless:
                    assert frame == get_frame(ds.PixelData, number - 1,
                                              number_of_frames=FRAMES)
                else:
                    frame_size = 256 * 256 * 2
                    assert frame == ds.PixelData[(number - 1) * frame_size:
                                                 number * frame_size]
            rendered = requests.get(f"{base}/frames/{FRAMES}/rendered", timeout=30,
                                    headers={"Accept": "image/png"})
            assert rendered.status_code == 200, rendered.text[:200]
            assert Image.open(io.BytesIO(rendered.content)).size == (256, 256)
            # The object's size, plus per request HTTP headers and at most a read-ahead
            # (measured: 1.02x native, 1.08x RLE, where reading the whole object for
            # each request fetched it 51 times).
            assert relay.received < 1.15 * size, (syntax, relay.received, size)
