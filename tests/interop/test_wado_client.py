"""WADO-RS with a real client: dicomweb-client (PyPI) against ``python -m pacs serve``.

The node runs as an operator starts it (gunicorn workers under ``pacs serve``); data
goes in through ``pacs import`` (the ingest path), and comes out through the client's
own retrieve calls, with the Accept headers it builds itself.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import sample, wait_for_port
from tests.interop.conftest import Node

pytestmark = pytest.mark.interop

EXPLICIT = str(ExplicitVRLittleEndian)
RLE = "1.2.840.10008.1.2.5"
#: Size of the study retrieved to check that the server streams (RSS growth < 100 MB).
LARGE_STUDY_BYTES = int(os.environ.get("PACS_TEST_LARGE_STUDY_MB", "1024")) << 20
RSS_GROWTH_LIMIT = 100 << 20


def fresh(name: str, study: str, series: str | None = None) -> FileDataset:
    ds = pydicom.dcmread(sample(name))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class Data:
    """What was imported: the study UID and every data set by role."""

    def __init__(self, folder: Path) -> None:
        self.study = generate_uid()
        ct_series = generate_uid()
        self.ct = [fresh("CT_small.dcm", self.study, ct_series) for _ in range(3)]
        self.rle = fresh("SC_rgb_rle_2frame.dcm", self.study)
        self.multiframe = fresh("emri_small.dcm", self.study)
        self.implicit = fresh("MR_small_implicit.dcm", self.study)
        self.all = [*self.ct, self.rle, self.multiframe, self.implicit]
        folder.mkdir(parents=True, exist_ok=True)
        for ds in self.all:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def web(node_factory: Callable[..., Node]) -> Node:
    """A running node whose DICOMweb port answers."""
    node = node_factory("wado", PACS_WEB_WORKERS="2")
    wait_for_port(int(node.env["PACS_WEB_PORT"]))
    return node


def base_url(node: Node, prefix: str = "") -> str:
    return f"http://127.0.0.1:{node.env['PACS_WEB_PORT']}{prefix}"


def import_folder(node: Node, folder: Path) -> None:
    done = node.cli("import", "--quiet", str(folder), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rejected: 0" in done.stdout, done.stdout


@pytest.fixture(scope="module")
def data(web: Node, tmp_path_factory: pytest.TempPathFactory) -> Data:
    folder = tmp_path_factory.mktemp("wado-data")
    made = Data(folder)
    import_folder(web, folder)
    return made


@pytest.fixture(scope="module", params=["", "/dicom-web"])
def client(web: Node, request: pytest.FixtureRequest) -> DICOMwebClient:
    return DICOMwebClient(url=base_url(web, request.param))


def uids(datasets: Sequence[pydicom.Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


# --- retrieve --------------------------------------------------------------------------

def test_retrieve_study_series_instance(client: DICOMwebClient, data: Data) -> None:
    study = client.retrieve_study(data.study)
    assert uids(study) == uids(data.all)
    for ds in study:  # no syntax asked: everything arrives as Explicit VR Little Endian
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    series = client.retrieve_series(data.study, data.ct[0].SeriesInstanceUID)
    assert uids(series) == uids(data.ct)
    one = client.retrieve_instance(data.study, data.implicit.SeriesInstanceUID,
                                   data.implicit.SOPInstanceUID)
    assert np.array_equal(one.pixel_array, data.implicit.pixel_array)


def test_stored_bytes_come_back_unchanged(client: DICOMwebClient, data: Data) -> None:
    for ds in (data.ct[0], data.rle):
        got = client.retrieve_instance(data.study, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                       media_types=(("application/dicom", "*"),))
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        out = io.BytesIO()
        got.save_as(out, enforce_file_format=True)
        sent = io.BytesIO()
        ds.save_as(sent, enforce_file_format=True)
        assert out.getvalue() == sent.getvalue()


def test_iter_series_streams(client: DICOMwebClient, data: Data) -> None:
    got = list(client.iter_series(data.study, data.ct[0].SeriesInstanceUID))
    assert uids(got) == uids(data.ct)


# --- metadata and bulk data ------------------------------------------------------------

def test_metadata_at_every_level(client: DICOMwebClient, data: Data) -> None:
    study = client.retrieve_study_metadata(data.study)
    assert len(study) == len(data.all)
    series = client.retrieve_series_metadata(data.study, data.ct[0].SeriesInstanceUID)
    assert {m["00080018"]["Value"][0] for m in series} == uids(data.ct)
    instance = client.retrieve_instance_metadata(
        data.study, data.ct[0].SeriesInstanceUID, data.ct[0].SOPInstanceUID)
    loaded = pydicom.Dataset.from_json(instance, bulk_data_uri_handler=lambda *_: b"")
    assert loaded.PatientName == data.ct[0].PatientName
    assert loaded.Rows == data.ct[0].Rows


def test_bulk_data_uri_retrieves_pixel_data(client: DICOMwebClient, data: Data) -> None:
    ds = data.multiframe
    instance = client.retrieve_instance_metadata(data.study, ds.SeriesInstanceUID,
                                                 ds.SOPInstanceUID)
    uri = instance["7FE00010"]["BulkDataURI"]
    assert uri.startswith(client.base_url)
    frames = client.retrieve_bulkdata(uri)
    assert b"".join(frames) == ds.PixelData


# --- frames ----------------------------------------------------------------------------

def test_frames_with_the_clients_default_accept(client: DICOMwebClient, data: Data) -> None:
    ds = data.multiframe
    size = ds.Rows * ds.Columns * 2
    frames = client.retrieve_instance_frames(data.study, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID, frame_numbers=[2, 5])
    assert frames == [ds.PixelData[size:2 * size], ds.PixelData[4 * size:5 * size]]


def test_compressed_frames_native_or_as_stored(client: DICOMwebClient, data: Data) -> None:
    ds = data.rle
    native = client.retrieve_instance_frames(
        data.study, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[2],
        media_types=(("application/octet-stream", EXPLICIT),))
    assert native == [ds.pixel_array[1].tobytes()]
    stored = client.retrieve_instance_frames(
        data.study, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1],
        media_types=(("application/octet-stream", "*"),))
    assert stored == [get_frame(ds.PixelData, 0, number_of_frames=2)]


def test_ohif_frame_request(web: Node, data: Data) -> None:
    ds = data.rle
    response = requests.get(
        f"{base_url(web, '/dicom-web')}/studies/{data.study}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1",
        headers={"Accept": "multipart/related; type=application/octet-stream; "
                           "transfer-syntax=*"}, timeout=30)
    assert response.status_code == 200
    assert f"application/octet-stream; transfer-syntax={RLE}".encode() in response.content


# --- rendered --------------------------------------------------------------------------

def test_rendered_images(client: DICOMwebClient, data: Data) -> None:
    ds = data.ct[0]
    jpeg = client.retrieve_instance_rendered(data.study, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).size == (ds.Columns, ds.Rows)
    png = client.retrieve_series_rendered(data.study, ds.SeriesInstanceUID,
                                          media_types=("image/png",),
                                          params={"viewport": "64,64"})
    assert Image.open(io.BytesIO(png)).format == "PNG"
    frame = client.retrieve_instance_frames_rendered(
        data.study, data.rle.SeriesInstanceUID, data.rle.SOPInstanceUID, frame_numbers=[2],
        media_types=("image/png",))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(frame))), data.rle.pixel_array[1])


def test_unknown_study_is_404(client: DICOMwebClient) -> None:
    with pytest.raises(requests.HTTPError) as caught:
        client.retrieve_study_metadata("1.2.3.4.5")
    assert caught.value.response is not None
    assert caught.value.response.status_code == 404


# --- streaming: memory stays flat while a large study goes out --------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _web_workers(node: Node) -> list[int]:
    """The gunicorn worker processes of the node (children of its gunicorn master)."""
    assert node.proc is not None
    found = subprocess.run(["pgrep", "-g", str(os.getpgid(node.proc.pid)), "-f", "gunicorn"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _large_study(folder: Path, total: int) -> Iterator[Path]:
    """Files of a 512 x 512 CT study adding up to ``total`` bytes.

    pydicom encodes one file whose SOP Instance UID and Instance Number are placeholders
    of fixed width; each file is that encoding with them replaced (no length changes
    anywhere): encoding two thousand 512 KB data sets one by one took longer than the
    node's import of all of them.
    """
    rng = random.Random()
    # No UID holds a "+", nor can either placeholder occur in the 12-bit pixel data.
    sop_slot, number_slot = "1.2." + "9" * 60, "+99999"
    template = pydicom.dcmread(sample("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.PixelData = np.random.default_rng(7).integers(
        0, 4096, 512 * 512, dtype=np.uint16).tobytes()
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    template.SOPInstanceUID = sop_slot
    template.file_meta.MediaStorageSOPInstanceUID = sop_slot
    template.InstanceNumber = number_slot
    buffer = io.BytesIO()
    template.save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    assert encoded.count(sop_slot.encode()) == 2
    assert encoded.count(number_slot.encode()) == 1
    folder.mkdir(parents=True, exist_ok=True)
    count = total // (512 * 512 * 2) + 1
    for number in range(count):
        # 64 characters, as the placeholder: pydicom's root and 38 random digits.
        sop = "1.2.826.0.1.3680043.8.498." + str(rng.randrange(10**37, 10**38))
        path = folder / f"{number:05d}.dcm"
        path.write_bytes(encoded.replace(sop_slot.encode(), sop.encode())
                         .replace(number_slot.encode(), f"{number + 1:06d}".encode()))
        yield path


def test_large_study_streams_in_bounded_memory(web: Node,
                                               tmp_path: Path) -> None:
    paths = list(_large_study(tmp_path / "large", LARGE_STUDY_BYTES))
    study = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    import_folder(web, tmp_path / "large")
    for path in paths:
        path.unlink()  # the disk holds the store's copy only
    workers = _web_workers(web)
    assert workers, "no gunicorn workers found"
    before = {pid: _rss(pid) for pid in workers}
    peak = dict(before)
    received = 0
    with requests.get(f"{base_url(web)}/studies/{study}", stream=True, timeout=600,
                      headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
        assert r.status_code == 200
        last = time.monotonic()
        for chunk in r.iter_content(1 << 20):
            received += len(chunk)
            if time.monotonic() - last > 0.05:
                peak = {pid: max(peak[pid], _rss(pid)) for pid in workers}
                last = time.monotonic()
    peak = {pid: max(peak[pid], _rss(pid)) for pid in workers}
    assert received >= LARGE_STUDY_BYTES
    growth = max(peak[pid] - before[pid] for pid in workers)
    print(f"received {received >> 20} MB; largest worker RSS growth {growth >> 20} MB")
    assert growth < RSS_GROWTH_LIMIT, f"a worker grew by {growth >> 20} MB"
