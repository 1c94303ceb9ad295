"""WADO-RS through falcon's test client over real services (index, ingest, store).

Accept headers are the ones dicomweb-client and OHIF send (their source, and the
requests tests/interop/test_ohif.py records); expectations are PS3.18 10.4 and 8.7.
Every test runs twice: over the memory store, whose streams seek, and over the same
store read as S3 is read, parts of an object through a ranged reader
(:class:`RangedMemoryStore`; the S3 store itself: tests/interop/test_s3_node.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tracemalloc
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pydicom
import pytest
from falcon import testing
from PIL import Image
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate, generate_frames, get_frame
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from adapters.dicomweb import wado
from adapters.dicomweb.app import create_app
from pacs.core import audit, frames as core_frames, ingest as ingest_module, metadata
from pacs.core.deletion import Target, reference
from pacs.core.errors import NotFound, UnreadableData
from pacs.core.services import Services
from pacs.core.storage.memory import MemoryStore
from pacs.core.storage.ranged import RangedReader
from tests.conftest import sample
from tests.factory import jpeg_frame, make_instance, make_jpeg_instance

JSON = "application/dicom+json"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'  # dicomweb-client
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
OHIF_FRAMES_QUOTED = 'multipart/related; type="application/octet-stream"; transfer-syntax="*"'
CLIENT_FRAMES = 'multipart/related; type="*/*"'  # dicomweb-client's default
OCTET_FRAMES = 'multipart/related; type="application/octet-stream"'
EXPLICIT = str(ExplicitVRLittleEndian)
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


# --- fixtures and helpers ---------------------------------------------------------------

class RangedMemoryStore(MemoryStore):
    """The memory store with :class:`~pacs.core.storage.RandomAccess`: parts of an
    object are read through :class:`RangedReader`, range by range, as from S3."""

    def open_ranged(self, key: str) -> RangedReader:
        with self._lock:
            if key not in self.objects:
                raise NotFound("no such object")
            data = self.objects[key]

        def fetch(start: int, length: int) -> tuple[bytes, int]:
            return data[start:start + length], len(data)

        return RangedReader(fetch, lambda: len(data))


@pytest.fixture(params=["seekable", "ranged"])
def memory_store(request: pytest.FixtureRequest) -> MemoryStore:
    """The store of the ``services`` fixture: each test runs over both kinds."""
    return RangedMemoryStore() if request.param == "ranged" else MemoryStore()


def encode(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def fresh(name: str, study: str | None = None, series: str | None = None,
          **changes: Any) -> FileDataset:
    """A bundled test file with new UIDs (optionally in a given study / series)."""
    ds = pydicom.dcmread(sample(name))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


Put = Callable[..., tuple[FileDataset, bytes]]


@pytest.fixture
def put(services: Services) -> Put:
    """Store a fresh copy of a bundled file through the ingest path."""
    def run(name: str, **kwargs: Any) -> tuple[FileDataset, bytes]:
        ds = fresh(name, **kwargs)
        data = encode(ds)
        services.ingest.store_bytes(data)
        return ds, data

    return run


@pytest.fixture
def client(services: Services) -> testing.TestClient:
    return testing.TestClient(create_app(services))


def url(ds: Dataset, level: str = "instance", prefix: str = "") -> str:
    path = f"{prefix}/studies/{ds.StudyInstanceUID}"
    if level in ("series", "instance"):
        path += f"/series/{ds.SeriesInstanceUID}"
    if level == "instance":
        path += f"/instances/{ds.SOPInstanceUID}"
    return path


def parts(result: testing.Result) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, content)."""
    content_type = result.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = result.content
    assert body.startswith(b"--" + boundary + b"\r\n")
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    chunks = body[len(boundary) + 4:-(len(boundary) + 8)].split(b"\r\n--" + boundary + b"\r\n")
    out = []
    for chunk in chunks:
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, content))
    return out


def frame_bytes(ds: Dataset, number: int) -> bytes:
    """Native frame ``number`` of an uncompressed data set."""
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return bytes(ds.PixelData[(number - 1) * size:number * size])


def served(client: testing.TestClient, path: str,
           accept: str) -> tuple[str, dict[str, str], Iterable[bytes]]:
    """Call the app as a WSGI server does: its status, headers and body, the body not
    read yet (falcon's test client would gather it into one bytes object)."""
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> None:
        answer["status"], answer["headers"] = status, {k.lower(): v for k, v in headers}

    body = client.app(testing.create_environ(path=path, headers={"Accept": accept}),
                      start_response)
    return answer["status"], answer["headers"], body


def _consumed(body: Iterable[bytes]) -> tuple[bytes, int]:
    """Read a streamed body (never one bytes object or a list) chunk by chunk, keeping
    none: its SHA-256 and length."""
    assert not isinstance(body, bytes | list)
    digest, length = hashlib.sha256(), 0
    for chunk in body:
        digest.update(chunk)
        length += len(chunk)
    return digest.digest(), length


def rle_cine(frames: int) -> FileDataset:
    """An RLE Lossless image of ``frames`` frames, each the same 256 x 256 noise of 12
    bits (which RLE cannot shrink: 135 KB a frame as stored, 128 KB decoded)."""
    ds = fresh("CT_small.dcm")
    ds.Rows = ds.Columns = 256
    noise = np.random.default_rng(1).integers(0, 4096, (256, 256), dtype=np.int16)
    ds.compress(RLELossless, noise)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame] * frames, has_bot=True)
    ds.NumberOfFrames = frames
    return ds


# --- study, series, instance ------------------------------------------------------------

def test_instance_as_stored_when_explicit_little_endian(client: testing.TestClient,
                                                        put: Put) -> None:
    ds, data = put("CT_small.dcm")
    result = client.simulate_get(url(ds), headers={"Accept": DICOM_ACCEPT})
    assert result.status_code == 200
    assert 'type="application/dicom"' in result.headers["content-type"]
    [(headers, content)] = parts(result)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert content == data  # no syntax asked: Explicit VR LE, which is what is stored


def test_default_syntax_converts_implicit_to_explicit(client: testing.TestClient,
                                                      put: Put) -> None:
    ds, _ = put("MR_small_implicit.dcm")
    [(headers, content)] = parts(client.simulate_get(url(ds), headers={"Accept": DICOM_ACCEPT}))
    assert headers["content-type"].endswith(f"transfer-syntax={EXPLICIT}")
    got = pydicom.dcmread(io.BytesIO(content))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(got.pixel_array, ds.pixel_array)


def test_star_sends_compressed_objects_as_stored(client: testing.TestClient, put: Put) -> None:
    ds, data = put("SC_rgb_rle_2frame.dcm")
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    [(headers, content)] = parts(client.simulate_get(url(ds), headers={"Accept": accept}))
    assert headers["content-type"] == f"application/dicom; transfer-syntax={RLE}"
    assert content == data


def test_compressed_object_is_decompressed_by_default(client: testing.TestClient,
                                                      put: Put) -> None:
    ds, _ = put("SC_rgb_rle_2frame.dcm")
    [(_, content)] = parts(client.simulate_get(url(ds), headers={"Accept": DICOM_ACCEPT}))
    got = pydicom.dcmread(io.BytesIO(content))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(got.pixel_array, ds.pixel_array)


def test_unproducible_syntax_is_406(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}'
    assert client.simulate_get(url(ds), headers={"Accept": accept}).status_code == 406
    assert client.simulate_get(url(ds), headers={"Accept": JSON}).status_code == 406


def test_alternatives_are_tried_in_order(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    accept = (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE},'
              f' multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT};q=0.5')
    [(headers, _)] = parts(client.simulate_get(url(ds), headers={"Accept": accept}))
    assert headers["content-type"].endswith(EXPLICIT)


def test_study_and_series_stream_every_instance(client: testing.TestClient, put: Put) -> None:
    first, _ = put("CT_small.dcm")
    second, _ = put("CT_small.dcm", study=first.StudyInstanceUID,
                    series=first.SeriesInstanceUID)
    other, _ = put("MR_small.dcm", study=first.StudyInstanceUID)
    study = client.simulate_get(url(first, "study"), headers={"Accept": DICOM_ACCEPT})
    got = {pydicom.dcmread(io.BytesIO(c)).SOPInstanceUID for _, c in parts(study)}
    assert got == {first.SOPInstanceUID, second.SOPInstanceUID, other.SOPInstanceUID}
    series = client.simulate_get(url(first, "series", "/dicom-web"),
                                 headers={"Accept": DICOM_ACCEPT})
    assert len(parts(series)) == 2


def test_an_instance_removed_while_its_study_is_sent_is_passed_over(
        client: testing.TestClient, services: Services, put: Put) -> None:
    """As C-MOVE and C-GET do: each instance is asked for just before it is read, so
    one removed since the study was listed (a deletion, a rejection) is not sent, and
    the answer is whole without it rather than cut short."""
    first, _ = put("CT_small.dcm")
    second, _ = put("CT_small.dcm", study=first.StudyInstanceUID,
                    series=first.SeriesInstanceUID)
    third, _ = put("CT_small.dcm", study=first.StudyInstanceUID,
                   series=first.SeriesInstanceUID)
    status, _, body = served(client, url(first, "study"), DICOM_ACCEPT)
    assert status.startswith("200"), status
    chunks = iter(body)
    received = [next(chunks)]  # the first instance is being sent
    services.deleter.remove(
        [reference(row) for row in services.deleter.plan([Target(first.StudyInstanceUID)])
         if row.sop_uid == second.SOPInstanceUID],
        audit.Participant("admin", True), audit.WEB_SERVER)
    sent = b"".join([*received, *chunks])
    assert first.SOPInstanceUID.encode() in sent and third.SOPInstanceUID.encode() in sent
    assert second.SOPInstanceUID.encode() not in sent
    assert sent.rstrip().endswith(b"--")  # the close delimiter: the answer is whole


def test_single_part_dicom_is_for_an_instance_only(client: testing.TestClient,
                                                   put: Put) -> None:
    """PS3.18 10.4.4: ``application/dicom`` without multipart/related is for individual
    Instance Resources; for a study or series it is ignored, and 406 when nothing else
    is acceptable - even when the study holds one instance."""
    ds, data = put("CT_small.dcm")
    single = {"Accept": "application/dicom"}
    for level in ("study", "series"):
        assert client.simulate_get(url(ds, level), headers=single).status_code == 406, level
    one = client.simulate_get(url(ds), headers=single)
    assert one.status_code == 200
    assert one.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert one.content == data
    either = {"Accept": f"application/dicom, {DICOM_ACCEPT}; q=0.5"}
    [(_, content)] = parts(client.simulate_get(url(ds, "study"), headers=either))
    assert content == data


@pytest.mark.parametrize(("accept", "multipart"), [
    (f"application/dicom; transfer-syntax={JPEG_BASELINE}, {DICOM_ACCEPT}", True),
    (f"{DICOM_ACCEPT}; transfer-syntax={JPEG_BASELINE}, application/dicom", False),
    ("application/*", False),  # a single part range: application/dicom alone
])
def test_single_or_multipart_is_the_matched_alternative(client: testing.TestClient, put: Put,
                                                        accept: str, multipart: bool) -> None:
    """PS3.18 8.7.3.5, 10.4.4: the answer is the alternative that can be produced, with
    its own packaging; the first alternative, which cannot (JPEG from Explicit VR
    Little Endian), says nothing of it."""
    ds, data = put("CT_small.dcm")
    result = client.simulate_get(url(ds), headers={"Accept": accept})
    assert result.status_code == 200, result.text
    if multipart:
        [(headers, content)] = parts(result)
    else:
        headers, content = dict(result.headers), result.content
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert content == data


def test_an_excluded_instance_media_type_is_never_sent(client: testing.TestClient,
                                                       put: Put) -> None:
    """RFC 9110 12.5.1: ``q=0`` rules a type out, whatever a broader range allows."""
    ds, _ = put("CT_small.dcm")
    for accept in (f"{DICOM_ACCEPT}; q=0, */*", f"*/*, {DICOM_ACCEPT}; q=0",
                   f"{DICOM_ACCEPT}; transfer-syntax={EXPLICIT}; q=0, */*"):
        result = client.simulate_get(url(ds), headers={"Accept": accept})
        assert result.status_code == 406, accept
    allowed = client.simulate_get(url(ds), headers={
        "Accept": f"multipart/related; q=0, {DICOM_ACCEPT}"})  # the more specific wins
    assert allowed.status_code == 200 and parts(allowed)


def test_unknown_and_malformed_uids(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    assert client.simulate_get("/studies/1.2.3.4").status_code == 404
    assert client.simulate_get(f"{url(ds, 'series')}/instances/1.2.3").status_code == 404
    assert client.simulate_get("/studies/1.2.3/metadata").status_code == 404
    assert client.simulate_get("/studies/abc").status_code == 400


# --- metadata ---------------------------------------------------------------------------

def test_series_metadata_is_dicom_json_with_bulk_data_uris(client: testing.TestClient,
                                                          put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    for prefix in ("", "/dicom-web"):
        result = client.simulate_get(url(ds, "series", prefix) + "/metadata",
                                     headers={"Accept": JSON})
        assert result.status_code == 200
        assert result.headers["content-type"] == JSON
        [instance] = result.json
        assert instance["00080018"] == {"vr": "UI", "Value": [ds.SOPInstanceUID]}
        assert instance["00280010"] == {"vr": "US", "Value": [ds.Rows]}
        assert instance["00100010"]["Value"] == [{"Alphabetic": str(ds.PatientName)}]
        assert instance["00083002"]["Value"] == [EXPLICIT]  # AvailableTransferSyntaxUID
        pixel_uri = instance["7FE00010"]["BulkDataURI"]
        assert pixel_uri == f"http://falconframework.org{prefix}{url(ds)}/bulkdata/7FE00010"


def test_metadata_matches_pydicom(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("MR_small.dcm")
    [ours] = client.simulate_get(url(ds) + "/metadata").json
    reference = pydicom.dcmread(io.BytesIO(encode(ds)), stop_before_pixels=True).to_json_dict()
    for key, element in reference.items():
        if key != "00080005":
            assert ours[key] == element, key


def test_study_metadata_lists_every_instance(client: testing.TestClient, put: Put) -> None:
    first, _ = put("CT_small.dcm")
    put("MR_small.dcm", study=first.StudyInstanceUID)
    result = client.simulate_get(url(first, "study") + "/metadata")
    assert len(result.json) == 2


def test_large_metadata_answers_stream_in_batches(client: testing.TestClient, put: Put,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = put("MR_small.dcm")
    for _ in range(4):
        put("MR_small.dcm", study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
    monkeypatch.setattr(metadata, "BATCH", 2)
    result = client.simulate_get(url(first, "series") + "/metadata")
    assert result.headers["content-type"] == JSON
    assert len(result.json) == 5
    assert len({item["00080018"]["Value"][0] for item in result.json}) == 5


def test_study_metadata_is_sent_an_instance_at_a_time(client: testing.TestClient,
                                                      services: Services,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """24 instances of 60 KB of metadata each (1.5 MB): read in batches of at most
    BATCH_BYTES of JSON and sent in chunks, never the whole array (nor its copies)."""
    study = generate_uid()
    for _ in range(24):
        ds = fresh("CT_small.dcm", study=study)
        ds.ImageComments = "c" * (60 << 10)
        services.ingest.store_bytes(encode(ds))
    monkeypatch.setattr(metadata, "BATCH_BYTES", 256 << 10)
    monkeypatch.setattr(wado, "CHUNK_BYTES", 128 << 10)
    every = client.simulate_get(f"/studies/{study}/metadata", headers={"Accept": JSON})
    tracemalloc.start()
    try:
        status, _, body = served(client, f"/studies/{study}/metadata", JSON)
        digest, length = _consumed(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status.startswith("200"), status
    assert length > 24 * (60 << 10)
    # A batch (256 KB of JSON, held while its instances are sent), a chunk and an
    # instance's copies (about 0.95 MB): not the 1.5 MB array, which the answer built
    # whole with its copies (5.2 MB).
    assert peak < 3 << 19, peak
    assert hashlib.sha256(every.content).digest() == digest
    assert len(every.json) == 24
    assert all(item["00204000"]["Value"] == ["c" * (60 << 10)] for item in every.json)


def test_metadata_of_old_instances_is_built_and_kept(client: testing.TestClient,
                                                    services: Services, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    with services.index.write() as conn:
        conn.execute("DELETE FROM instance_metadata")
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    assert instance["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert "BulkDataURI" in instance["7FE00010"]
    rows = services.index.connection().execute(
        "SELECT count(*) FROM instance_metadata").fetchall()
    assert rows == [(1,)]


def test_metadata_refuses_xml_only(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    accept = 'multipart/related; type="application/dicom+xml"'
    assert client.simulate_get(url(ds) + "/metadata",
                               headers={"Accept": accept}).status_code == 406
    # The accept query parameter replaces the header (PS3.18 8.3.3.1).
    assert client.simulate_get(url(ds) + "/metadata",
                               query_string="accept=application/dicom%2Bxml",
                               headers={"Accept": JSON}).status_code == 406
    assert client.simulate_get(url(ds) + "/metadata",
                               query_string="accept=application/dicom%2Bjson",
                               headers={"Accept": accept}).status_code == 200


@pytest.mark.parametrize("accept", [
    "APPLICATION/DICOM+JSON", "application/dicom+json,", "application/dicom+json, ,*/*",
    'application/dicom+json; foo="a,b"'])
def test_metadata_accepts_every_spelling_of_dicom_json(client: testing.TestClient, put: Put,
                                                       accept: str) -> None:
    """RFC 9110: type and subtype are case-insensitive (8.3.1), empty list elements are
    ignored (5.6.1.2), a quoted parameter value may hold a comma (5.6.6)."""
    ds, _ = put("CT_small.dcm")
    result = client.simulate_get(url(ds) + "/metadata", headers={"Accept": accept})
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == JSON
    for refused in ("application/dicom+json;q=0, */*", "APPLICATION/DICOM+JSON;Q=0, */*"):
        assert client.simulate_get(url(ds) + "/metadata",
                                   headers={"Accept": refused}).status_code == 406, refused


@pytest.mark.parametrize("syntax", [EXPLICIT, "1.2.840.10008.1.2.1.99"],
                         ids=["explicit", "deflated"])
def test_large_binary_values_are_bulk_data(client: testing.TestClient, services: Services,
                                           put: Put, syntax: str) -> None:
    blob = bytes(range(256)) * 8  # 2048 bytes, above the inline threshold
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00291010, "OB", blob)
    ds.file_meta.TransferSyntaxUID = syntax
    services.ingest.store_bytes(encode(ds))
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    uri = instance["00291010"]["BulkDataURI"]
    path = uri.removeprefix("http://falconframework.org")
    [(headers, content)] = parts(client.simulate_get(path))
    assert headers["content-type"] == "application/octet-stream"
    assert content == blob
    single = client.simulate_get(path, headers={"Accept": "application/octet-stream"})
    assert single.content == blob


def test_metadata_row_is_written_with_the_instance(services: Services, put: Put) -> None:
    ds, data = put("CT_small.dcm")
    doc = metadata.documents(services.index, services.store, ds.StudyInstanceUID)[0]
    assert doc.pixel_offset is not None and doc.pixel_length is not None
    assert data[doc.pixel_offset:doc.pixel_offset + doc.pixel_length] == ds.PixelData


# --- frames -----------------------------------------------------------------------------

@pytest.mark.parametrize("accept", [OHIF_FRAMES, OHIF_FRAMES_QUOTED, CLIENT_FRAMES,
                                    OCTET_FRAMES, None])
def test_native_frame_for_every_client_accept(client: testing.TestClient, put: Put,
                                              accept: str | None) -> None:
    ds, _ = put("CT_small.dcm")
    headers = {"Accept": accept} if accept else {}
    result = client.simulate_get(url(ds) + "/frames/1", headers=headers)
    assert result.status_code == 200
    [(part, content)] = parts(result)
    assert part["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert content == frame_bytes(ds, 1)


def test_an_excluded_frame_media_type_is_never_sent(client: testing.TestClient,
                                                    put: Put) -> None:
    """RFC 9110 12.5.1: the most specific range that matches a type decides; ``q=0``
    there rules it out, and another type is chosen, or none (406)."""
    ds, _ = put("CT_small.dcm")
    for accept in (f"{OCTET_FRAMES};q=0, */*", f"*/*, {OCTET_FRAMES};q=0",
                   f"{OCTET_FRAMES}; transfer-syntax={EXPLICIT};q=0, */*"):
        result = client.simulate_get(url(ds) + "/frames/1", headers={"Accept": accept})
        assert result.status_code == 406, (accept, result.headers)
    rle, _ = put("SC_rgb_rle_2frame.dcm")  # decoded by default, as stored when excluded
    accept = f"{OCTET_FRAMES}; transfer-syntax={EXPLICIT};q=0, */*"
    [(part, content)] = parts(client.simulate_get(url(rle) + "/frames/2",
                                                  headers={"Accept": accept}))
    assert part["content-type"] == f"application/octet-stream; transfer-syntax={RLE}"
    assert content == get_frame(rle.PixelData, 1, number_of_frames=2)


def test_frame_list_in_the_order_asked(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("emri_small.dcm")
    result = client.simulate_get(url(ds) + "/frames/3,1,10", headers={"Accept": OHIF_FRAMES})
    assert [c for _, c in parts(result)] == [frame_bytes(ds, n) for n in (3, 1, 10)]


def test_compressed_frames_as_stored_for_star(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("SC_rgb_rle_2frame.dcm")
    result = client.simulate_get(url(ds) + "/frames/2", headers={"Accept": OHIF_FRAMES})
    [(part, content)] = parts(result)
    assert part["content-type"] == f"application/octet-stream; transfer-syntax={RLE}"
    assert content == get_frame(ds.PixelData, 1, number_of_frames=2)


def test_compressed_frames_without_an_offset_table(client: testing.TestClient,
                                                  put: Put) -> None:
    """No Basic Offset Table (PS3.5 A.4): frames found by walking the fragments, from
    a copy of the object when the store reads in ranges."""
    ds = pydicom.dcmread(sample("SC_rgb_rle_2frame.dcm"))
    stored = list(generate_frames(ds.PixelData, number_of_frames=2))
    ds, _ = put("SC_rgb_rle_2frame.dcm", PixelData=encapsulate(stored, has_bot=False))
    for number in (2, 1):
        result = client.simulate_get(url(ds) + f"/frames/{number}",
                                     headers={"Accept": OHIF_FRAMES})
        [(_, content)] = parts(result)
        assert content == stored[number - 1]
    picture = image(client.simulate_get(url(ds) + "/frames/2/rendered",
                                        query_string="accept=image/png"))
    assert picture.mode == "RGB" and picture.size == (ds.Columns, ds.Rows)


def test_compressed_frames_decoded_when_no_syntax_is_asked(client: testing.TestClient,
                                                           put: Put) -> None:
    ds, _ = put("SC_rgb_rle_2frame.dcm")
    for accept in (OCTET_FRAMES, CLIENT_FRAMES):
        result = client.simulate_get(url(ds) + "/frames/2", headers={"Accept": accept})
        [(part, content)] = parts(result)
        assert part["content-type"].endswith(f"transfer-syntax={EXPLICIT}")
        assert content == ds.pixel_array[1].tobytes()


def test_compressed_frames_as_image_media_type(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("SC_rgb_jpeg_dcmtk.dcm")
    result = client.simulate_get(url(ds) + "/frames/1",
                                 headers={"Accept": 'multipart/related; type="image/jpeg"'})
    [(part, content)] = parts(result)
    assert part["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    assert content[:2] == b"\xff\xd8"
    native, _ = put("CT_small.dcm")
    refused = client.simulate_get(url(native) + "/frames/1",
                                  headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert refused.status_code == 406


def test_one_bit_frames_that_start_inside_a_byte(client: testing.TestClient,
                                                 services: Services) -> None:
    """PS3.5 8.1.1: 5 x 7 one-bit pixels are 35 bits a frame, packed one after the
    other; each frame is sent repacked from its own first bit."""
    pixels = np.random.default_rng(3).integers(0, 2, size=(6, 35), dtype=np.uint8)
    ds = fresh("CT_small.dcm", Rows=5, Columns=7, NumberOfFrames=6, BitsAllocated=1,
               BitsStored=1, HighBit=0, PixelRepresentation=0)
    ds.PixelData = np.packbits(pixels.ravel(), bitorder="little").tobytes()
    services.ingest.store_bytes(encode(ds))
    result = client.simulate_get(url(ds) + "/frames/2,5,1", headers={"Accept": OCTET_FRAMES})
    assert [c for _, c in parts(result)] == [
        np.packbits(pixels[n - 1], bitorder="little").tobytes() for n in (2, 5, 1)]


def test_a_frame_listed_twice_is_400(client: testing.TestClient, put: Put) -> None:
    """PS3.18 6.5.4 (2017 editions): a frame list holds non duplicate frame numbers."""
    ds, _ = put("emri_small.dcm")
    for frames in ("1,1", "2,1,2", ",".join(["1"] * 400)):
        result = client.simulate_get(url(ds) + f"/frames/{frames}",
                                     headers={"Accept": "application/octet-stream"})
        assert result.status_code == 400, frames
    assert client.simulate_get(url(ds) + "/frames/2,1").status_code == 200


@pytest.mark.parametrize("suffix, accept", [
    ("/bulkdata/7FE00010", "application/octet-stream; transfer-syntax=*"),
    ("/bulkdata/7FE00010", OHIF_FRAMES),
    ("/frames/" + ",".join(str(n) for n in range(64, 0, -1)), "application/octet-stream"),
], ids=["bulk-single-part", "bulk-multipart", "frames-decoded-single-part"])
def test_many_frames_are_sent_one_at_a_time(client: testing.TestClient, services: Services,
                                            suffix: str, accept: str) -> None:
    """All 64 frames of an object, as one body or one part each, stored or decoded:
    streamed, never more than about one frame held (each 128 KB or more; 8 MB in all)."""
    ds = rle_cine(64)
    services.ingest.store_bytes(encode(ds))
    tracemalloc.start()
    try:
        status, _, body = served(client, url(ds) + suffix, accept)
        assert not isinstance(body, bytes | list)
        sizes = [len(chunk) for chunk in body]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status.startswith("200"), status
    assert sum(sizes) >= 64 * 128 * 1024
    assert max(sizes) <= 136 * 1024
    assert peak < 4 * 1024 * 1024, peak  # the read-ahead of a ranged read, and a frame or two


def test_native_frames_without_multipart_have_a_content_length(
        client: testing.TestClient, put: Put) -> None:
    ds, _ = put("emri_small.dcm")
    status, headers, body = served(client, url(ds) + "/frames/3,1,10",
                                   "application/octet-stream")
    content = b"".join(body)
    assert status.startswith("200")
    assert content == b"".join(frame_bytes(ds, n) for n in (3, 1, 10))
    assert headers["content-length"] == str(len(content))


def test_a_frame_that_fails_after_the_first_cuts_the_response_short(
        client: testing.TestClient, services: Services,
        caplog: pytest.LogCaptureFixture) -> None:
    """Frame 2's place in the Basic Offset Table is wrong: asked first it is answered
    500 (the stored object does not read); asked after frame 1, which was sent with
    its 200, it can only end the response without its close delimiter (the error
    reaches the HTTP server, which closes the connection)."""
    stored = list(generate_frames(pydicom.dcmread(sample("SC_rgb_rle_2frame.dcm")).PixelData,
                                  number_of_frames=2))
    value = bytearray(encapsulate([*stored, stored[0]], has_bot=True))
    value[16:20] = (int.from_bytes(value[16:20], "little") + 4).to_bytes(4, "little")
    ds = fresh("SC_rgb_rle_2frame.dcm", NumberOfFrames=3, PixelData=bytes(value))
    services.ingest.store_bytes(encode(ds))
    assert client.simulate_get(url(ds) + "/frames/2",
                               headers={"Accept": OHIF_FRAMES}).status_code == 500
    status, _, body = served(client, url(ds) + "/frames/1,2", OHIF_FRAMES)
    assert status.startswith("200")
    chunks = iter(body)
    first = next(chunks) + next(chunks)  # the first part's headers, then its frame
    assert first.endswith(stored[0])
    with caplog.at_level(logging.ERROR), pytest.raises(UnreadableData):
        next(chunks)
    assert "WADO-RS response cut short" in caplog.text


def test_bad_frame_numbers(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("emri_small.dcm")
    assert client.simulate_get(url(ds) + "/frames/11").status_code == 404
    assert client.simulate_get(url(ds) + "/frames/0").status_code == 404
    assert client.simulate_get(url(ds) + "/frames/1,x").status_code == 400
    # Numbers are ASCII digits (a superscript two passes str.isdigit(), not int()),
    # up to the largest Number of Frames an IS can hold.
    for malformed in ("%C2%B2", "1,%C2%B2", "%D9%A3", "9" * 5000, "2147483648"):
        result = client.simulate_get(url(ds) + f"/frames/{malformed}")
        assert result.status_code == 400, malformed
        assert "frame numbers" in result.json["description"]
    assert client.simulate_get(url(ds) + "/frames/2147483647").status_code == 404
    sr, _ = put("CT_small.dcm")
    assert client.simulate_get(url(sr) + "/frames/2").status_code == 404


@pytest.mark.parametrize("keyword, vr, dtype", [("FloatPixelData", "OF", "<f4"),
                                               ("DoubleFloatPixelData", "OD", "<f8")])
def test_float_pixel_data_is_bulk_data(client: testing.TestClient, services: Services,
                                       keyword: str, vr: str, dtype: str) -> None:
    """Float and Double Float Pixel Data follow the header the other bulk data values
    are read from: they are sent from where ingest found them in the stored object."""
    ds = fresh("CT_small.dcm", NumberOfFrames=2, BitsAllocated=int(dtype[2]) * 8)
    for absent in ("PixelData", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, absent)
    value = np.linspace(-1.5, 1.5, 2 * ds.Rows * ds.Columns, dtype=dtype).tobytes()
    setattr(ds, keyword, value)
    services.ingest.store_bytes(encode(ds))
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    tag = f"{ds[keyword].tag:08X}"
    assert instance[tag]["vr"] == vr
    path = instance[tag]["BulkDataURI"].removeprefix("http://falconframework.org")
    [(headers, content)] = parts(client.simulate_get(path))
    assert headers == {"content-type": "application/octet-stream",
                       "content-length": str(len(value)),
                       "content-location": instance[tag]["BulkDataURI"]}
    assert content == value
    single = client.simulate_get(path, headers={"Accept": "application/octet-stream"})
    assert single.content == value
    assert single.headers["content-length"] == str(len(value))
    missing = "7FE00009" if tag == "7FE00008" else "7FE00008"
    assert client.simulate_get(f"{url(ds)}/bulkdata/{missing}").status_code == 404


def test_bulk_data_inside_a_sequence_item(client: testing.TestClient,
                                         services: Services) -> None:
    blob = bytes(range(256)) * 8
    ds = fresh("CT_small.dcm")
    item = Dataset()
    item.add_new(0x00291010, "OB", blob)
    ds.add_new(0x00291020, "SQ", [Dataset(), item])
    services.ingest.store_bytes(encode(ds))
    bulk = url(ds) + "/bulkdata/00291020/2/00291010"
    single = client.simulate_get(bulk, headers={"Accept": "application/octet-stream"})
    assert single.status_code == 200 and single.content == blob
    for missing in ("00291020/1/00291010", "00291020/3/00291010", "00291020/0/00291010"):
        assert client.simulate_get(url(ds) + f"/bulkdata/{missing}").status_code == 404


@pytest.mark.parametrize("path", [
    "00100010/1/00100010",  # into a person name
    "00080008/1/00100010",  # into a multi-valued code string
    "00080008/2/00100010",
    "00100010/%C2%B2/00100010",  # an item number in superscript digits
    "00291020/%D9%A1/00291010",  # or in Arabic-Indic ones
    "00291020/99999999999999999999999999/00291010",
    "+0291020/1/00291010",  # int(text, 16) would take a sign
    "0029_020/1/00291010",  # or an underscore
    "00100010",  # an element that holds text, not bytes
    "00291020",  # a sequence
    "00291020/1",  # an item
])
def test_bulk_data_path_that_names_no_binary_value_is_404(client: testing.TestClient,
                                                           services: Services,
                                                           path: str) -> None:
    ds = fresh("CT_small.dcm")
    item = Dataset()
    item.add_new(0x00291010, "OB", b"\x01\x02")
    ds.add_new(0x00291020, "SQ", [item])
    services.ingest.store_bytes(encode(ds))
    result = client.simulate_get(url(ds) + f"/bulkdata/{path}")
    assert result.status_code == 404, result.text
    assert client.simulate_get(url(ds) + "/bulkdata/00291020/1/00291010",
                               headers={"Accept": "application/octet-stream"}
                               ).content == b"\x01\x02"


def test_a_text_value_past_the_metadata_budget_is_sent_as_bulk_data(
        client: testing.TestClient, services: Services,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.18 10.4.3.3.2: a UT value the metadata references is retrieved as its bytes
    from its BulkDataURI, as stored (here past a budget of 100 bytes)."""
    from pacs.core import jsonmodel

    monkeypatch.setattr(jsonmodel, "INLINE_VALUE_BYTES", 100)
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00204000, "LT", "x" * 150)  # Image Comments
    services.ingest.store_bytes(encode(ds))
    [document] = client.simulate_get(url(ds) + "/metadata").json
    uri = document["00204000"]["BulkDataURI"].removeprefix("http://falconframework.org")
    result = client.simulate_get(uri, headers={"Accept": "application/octet-stream"})
    assert result.status_code == 200 and result.content == b"x" * 150


@pytest.mark.parametrize(("accept", "multipart"), [
    (f"text/html, {OCTET_FRAMES}", True),
    ('multipart/related; type="image/jpeg", application/octet-stream', False),
    ("application/*", False),
    ("*/*", True),
])
def test_bulk_data_is_packaged_as_the_matched_alternative(client: testing.TestClient,
                                                          put: Put, accept: str,
                                                          multipart: bool) -> None:
    """The alternative that allows ``application/octet-stream`` says whether it comes
    in multipart/related, not the first one (PS3.18 8.7.3.5)."""
    ds, _ = put("CT_small.dcm")
    result = client.simulate_get(url(ds) + "/bulkdata/00280010", headers={"Accept": accept})
    assert result.status_code == 200, result.text
    value = ds.Rows.to_bytes(2, "little")
    if multipart:
        [(headers, content)] = parts(result)
        assert headers["content-type"] == "application/octet-stream"
    else:
        content = result.content
        assert result.headers["content-type"] == "application/octet-stream"
    assert content == value


def test_an_excluded_bulk_data_type_is_never_sent(client: testing.TestClient,
                                                  put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    for accept in (f"{OCTET_FRAMES};q=0, */*", "application/octet-stream;q=0, application/*"):
        result = client.simulate_get(url(ds) + "/bulkdata/00280010",
                                     headers={"Accept": accept})
        assert result.status_code == 406, accept


def test_bulk_data_parts_carry_their_bulk_data_uri(client: testing.TestClient,
                                                   services: Services) -> None:
    """PS3.18 10.4.3.3.5: bulk data in a multipart response has a Content-Location
    that corresponds to the BulkDataURI of its element in the metadata."""
    ds = fresh("CT_small.dcm")
    ds.add_new(0x00291010, "OB", bytes(range(256)) * 8)
    services.ingest.store_bytes(encode(ds))
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    uri = instance["00291010"]["BulkDataURI"]
    [(headers, content)] = parts(client.simulate_get(
        uri.removeprefix("http://falconframework.org"), headers={"Accept": OCTET_FRAMES}))
    assert headers["content-location"] == uri
    assert content == bytes(range(256)) * 8


def test_pixel_data_frames_carry_their_frame_uri(client: testing.TestClient,
                                                 put: Put) -> None:
    """Pixel data answered frame by frame: each part is located at its frame of the
    BulkDataURI (``{BulkDataURI}/frames/{n}``), which answers that frame; the Frames
    resource's own parts have no Content-Location."""
    ds, _ = put("emri_small.dcm")
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    uri = instance["7FE00010"]["BulkDataURI"]
    answer = parts(client.simulate_get(uri.removeprefix("http://falconframework.org")))
    assert [h["content-location"] for h, _ in answer] == [
        f"{uri}/frames/{n}" for n in range(1, 11)]
    path = f"{uri}/frames/3".removeprefix("http://falconframework.org")
    [(headers, content)] = parts(client.simulate_get(path))
    assert headers["content-location"] == f"{uri}/frames/3"
    assert content == frame_bytes(ds, 3)
    [(headers, _)] = parts(client.simulate_get(url(ds) + "/frames/3"))
    assert "content-location" not in headers


def test_pixel_data_bulk_data_uri_answers_every_frame(client: testing.TestClient,
                                                      put: Put) -> None:
    ds, _ = put("emri_small.dcm")
    [instance] = client.simulate_get(url(ds) + "/metadata").json
    path = instance["7FE00010"]["BulkDataURI"].removeprefix("http://falconframework.org")
    result = client.simulate_get(path)
    assert [c for _, c in parts(result)] == [frame_bytes(ds, n) for n in range(1, 11)]


# --- rendered and thumbnail -------------------------------------------------------------

def image(result: testing.Result) -> Image.Image:
    assert result.status_code == 200, result.text
    return Image.open(io.BytesIO(result.content))


def test_rendered_instance_is_a_windowed_jpeg(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    result = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "image/jpeg"})
    assert result.headers["content-type"] == "image/jpeg"
    picture = image(result)
    assert picture.size == (ds.Columns, ds.Rows) and picture.mode == "L"
    assert np.asarray(picture).std() > 10  # a real image, not a flat field


def test_rendered_parameters(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    png = client.simulate_get(url(ds) + "/rendered", query_string="viewport=32,16",
                              headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    assert image(png).size == (16, 16)  # fitted, aspect kept
    narrow = client.simulate_get(url(ds) + "/rendered", query_string="window=0,1")
    wide = client.simulate_get(url(ds) + "/rendered", query_string="window=0,100000")
    assert np.asarray(image(narrow)).std() > np.asarray(image(wide)).std()
    for bad in ("quality=0", "viewport=0,10", "window=1", "window=1,2,cubic"):
        assert client.simulate_get(url(ds) + "/rendered", query_string=bad).status_code == 400


def test_a_small_image_is_enlarged_only_so_far(client: testing.TestClient, put: Put) -> None:
    """A 128 x 128 image in an 8192 x 8192 viewport: 2048 x 2048 (MAX_ENLARGED), not
    67 million pixels for a 200-byte request; within that bound, fitted as asked."""
    ds, _ = put("CT_small.dcm")  # 128 x 128
    for query, size in (("viewport=8192,8192", (2048, 2048)),
                        ("viewport=8192,512", (512, 512)),
                        ("viewport=8192,8192,0,0,16,32", (1024, 2048))):
        result = client.simulate_get(url(ds) + "/rendered", query_string=query,
                                     headers={"Accept": "image/png"})
        assert image(result).size == size, query


def test_rendered_source_region(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")  # 128 x 128

    def drawn(query: str = "") -> np.ndarray:
        return np.asarray(image(client.simulate_get(url(ds) + "/rendered", query_string=query,
                                                    headers={"Accept": "image/png"})))

    whole = drawn()
    assert np.array_equal(drawn("viewport=32,16,96,112,32,16"), whole[112:128, 96:128])
    assert np.array_equal(drawn("viewport=128,128,0,0,128,128"), whole)
    # A negative extent flips the region (PS3.18 8.3.5.1.3).
    assert np.array_equal(drawn("viewport=64,128,64,0,-64,128"), whole[:, 63::-1])


@pytest.mark.parametrize("query", [
    "quality=inf", "quality=nan", "quality=1e400",
    "viewport=1e400,10", "viewport=10,-inf",
    "window=nan,1", "window=1,inf", "window=1e400,1",
    # Widths float32 arithmetic holds as 0 (drawn as NaN): no window.
    "window=40,1e-320,linear-exact", "window=40,1e-320,sigmoid", "window=40,1e-39,sigmoid",
    # Source regions without extent, or not within the 128 x 128 image.
    "viewport=10,10,0,0,0,0", "viewport=10,10,0,0,5,0",
    "viewport=10,10,0,0,13000,13000", "viewport=10,10,0,0,129,128",
    "viewport=10,10,-1,0,5,5", "viewport=10,10,124,0,5,5", "viewport=10,10,4,0,-5,5",
])
def test_rendered_parameters_out_of_range_are_400(client: testing.TestClient, put: Put,
                                                  query: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ds, _ = put("CT_small.dcm")

    def not_decoded(*_: object, **__: object) -> None:
        raise AssertionError("refused only after the frame was decoded")

    monkeypatch.setattr(core_frames, "decoded", not_decoded)
    for suffix in ("/rendered", "/thumbnail"):
        result = client.simulate_get(url(ds) + suffix, query_string=query)
        assert result.status_code == 400, result.text
        assert result.json["description"].startswith(query.split("=")[0] + ":")


def test_rendered_frame_of_a_colour_multiframe(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("SC_rgb_rle_2frame.dcm")
    picture = image(client.simulate_get(url(ds) + "/frames/2/rendered",
                                        query_string="accept=image/png"))
    assert picture.mode == "RGB"
    assert np.array_equal(np.asarray(picture), ds.pixel_array[1])


def test_thumbnails_at_every_level_as_ohif_asks(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("MR2_J2KI.dcm")  # 1024 x 1024
    headers = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for level in ("study", "series", "instance"):
        result = client.simulate_get(url(ds, level, "/dicom-web") + "/thumbnail",
                                     query_string="accept=image%2Fjpeg", headers=headers)
        assert result.headers["content-type"] == "image/jpeg"
        assert max(image(result).size) <= 128


def test_series_rendered_uses_the_middle_image(client: testing.TestClient, put: Put) -> None:
    first, _ = put("CT_small.dcm", InstanceNumber=1)
    middle, _ = put("MR_small.dcm", study=first.StudyInstanceUID,
                    series=first.SeriesInstanceUID, InstanceNumber=2)
    put("CT_small.dcm", study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
        InstanceNumber=3)
    picture = image(client.simulate_get(url(first, "series") + "/rendered"))
    assert picture.size == (middle.Columns, middle.Rows)


def test_rendered_refusals(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    assert client.simulate_get(url(ds) + "/rendered",
                               headers={"Accept": "image/webp"}).status_code == 406
    assert client.simulate_get("/studies/1.2.3/rendered").status_code == 404


@pytest.mark.parametrize(("accept", "expected"), [
    ("image/jpeg;q=0, */*", "image/png"),
    ("image/*, image/jpeg;q=0", "image/png"),
    ("image/*;q=0, image/gif", "image/gif"),  # the more specific range wins
    ("image/jpeg;q=0, image/png;q=0, image/*", "image/gif"),
    ("image/jpeg;q=0", None),
    ("image/*;q=0, */*", None),
])
def test_an_excluded_rendered_type_is_never_sent(client: testing.TestClient, put: Put,
                                                 accept: str, expected: str | None) -> None:
    """RFC 9110 12.5.1: the most specific range that matches a type decides; ``q=0``
    there rules it out, and the next type is chosen, or none (406)."""
    ds, _ = put("CT_small.dcm")
    for suffix in ("/rendered", "/thumbnail"):
        result = client.simulate_get(url(ds) + suffix, headers={"Accept": accept})
        if expected is None:
            assert result.status_code == 406, (accept, result.headers)
        else:
            assert result.headers["content-type"] == expected, accept


def test_rendered_gif_as_ps3_18_requires(client: testing.TestClient, put: Put) -> None:
    """PS3.18 Table 8.7.4-1: image/gif is a required rendered type of single-frame
    images, as image/png (image/jpeg the default)."""
    ds, _ = put("CT_small.dcm")
    gif = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "image/gif"})
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert image(gif).format == "GIF" and image(gif).size == (ds.Columns, ds.Rows)
    thumb = client.simulate_get(url(ds) + "/thumbnail", query_string="accept=image/gif")
    assert thumb.headers["content-type"] == "image/gif"


def test_encapsulated_pdf_is_rendered_as_itself(client: testing.TestClient,
                                                services: Services) -> None:
    ds = fresh("CT_small.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.104.1")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 test document\n%%EOF\n"
    services.ingest.store_bytes(encode(ds))
    result = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "application/pdf"})
    assert result.headers["content-type"] == "application/pdf"
    assert result.content == ds.EncapsulatedDocument
    # Never inline in this origin (see adapters.dicomweb.rendered).
    assert result.headers["content-disposition"] == 'attachment; filename="document.pdf"'
    assert "sandbox" in result.headers["content-security-policy"]
    assert result.headers["x-content-type-options"] == "nosniff"


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(kind: str, name: Dataset, relationship: str = "CONTAINS",
          **values: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, kind
    item.ConceptNameCodeSequence = [name]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def structured_report() -> Dataset:
    """A Basic Text SR: a finding (TEXT, with markup in it), a code, a measurement."""
    ds = fresh("CT_small.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.Modality = "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "Diagnostic Imaging Report", "LN")]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    measurement = Dataset()
    measurement.NumericValue = "12.5"
    measurement.MeasurementUnitsCodeSequence = [_code("mm", "millimeter", "UCUM")]
    findings = _item("CONTAINER", _code("121070", "Findings"),
                     ContinuityOfContent="SEPARATE")
    findings.ContentSequence = [
        _item("TEXT", _code("121071", "Finding"),
              TextValue="Nodule <script>alert(1)</script> & more"),
        _item("CODE", _code("121072", "Impression"),
              ConceptCodeSequence=[_code("T-28000", "Lung", "SRT")]),
        _item("NUM", _code("121206", "Distance"), MeasuredValueSequence=[measurement])]
    ds.ContentSequence = [findings]
    return ds


def _list_depths(document: str) -> list[tuple[str, int]]:
    """(label, how many lists hold it) of each item of an HTML document, its markup
    checked balanced."""
    found: list[tuple[str, int]] = []
    stack: list[str] = []

    class Reader(HTMLParser):
        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag in ("ul", "li", "b"):
                stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if tag in ("ul", "li", "b"):
                assert stack.pop() == tag

        def handle_data(self, data: str) -> None:
            if stack and stack[-1] == "b":
                found.append((data, stack.count("ul")))

    Reader().feed(document)
    assert not stack
    return found


def test_a_structured_report_is_rendered_as_text(client: testing.TestClient,
                                                 services: Services) -> None:
    """PS3.18 8.7.4, the Text category: text/html by default, text/plain when asked;
    no image of it; what the sender wrote never becomes markup."""
    ds = structured_report()
    services.ingest.store_bytes(encode(ds))
    plain = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "text/plain"})
    assert plain.status_code == 200, plain.text
    assert plain.headers["content-type"] == "text/plain; charset=utf-8"
    assert plain.text.splitlines() == [
        "Diagnostic Imaging Report",
        f"  Patient: {ds.PatientName}",
        f"  Patient ID: {ds.PatientID}",
        f"  Study date: {ds.StudyDate}",
        "  Completion: COMPLETE",
        "  Verification: UNVERIFIED",
        "  Findings",
        "    Finding: Nodule <script>alert(1)</script> & more",
        "    Impression: Lung",
        "    Distance: 12.5 mm"]
    default = client.simulate_get(url(ds) + "/rendered")
    assert default.headers["content-type"] == "text/html; charset=utf-8"
    assert "Nodule &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in default.text
    assert "<script>" not in default.text
    assert "sandbox" in default.headers["content-security-policy"]
    # The tree is the lists' nesting: the policy drops style attributes.
    assert "style=" not in default.text
    assert _list_depths(default.text) == [
        ("Patient", 1), ("Patient ID", 1), ("Study date", 1), ("Completion", 1),
        ("Verification", 1), ("Findings", 1), ("Finding", 2), ("Impression", 2),
        ("Distance", 2)]
    refused = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "image/jpeg"})
    assert refused.status_code == 406


def test_a_document_is_streamed_from_where_it_lies(client: testing.TestClient,
                                                  services: Services,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MiB document is sent a chunk at a time from its place in the stored object:
    reading the object whole held it, and pydicom's copy of its value, at once."""
    monkeypatch.setattr(wado, "CHUNK_BYTES", 64 << 10)
    ds = fresh("CT_small.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.104.1")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n" + bytes(range(256)) * (4 << 12) + b"%%EOF\n"
    services.ingest.store_bytes(encode(ds))
    tracemalloc.start()
    try:
        status, headers, body = served(client, url(ds) + "/rendered", "application/pdf")
        digest, length = _consumed(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status.startswith("200"), status
    assert headers["content-length"] == str(length) == str(len(ds.EncapsulatedDocument))
    assert digest == hashlib.sha256(ds.EncapsulatedDocument).digest()
    # A few chunks and a ranged read's buffer (up to 1 MiB, its read-ahead and a
    # copy): less than the document, which the answer held whole with pydicom's copy.
    assert peak < 5 << 19, peak


@pytest.mark.parametrize("declared, sent", [
    ("text/html", "application/octet-stream"),
    ("image/svg+xml", "application/octet-stream"),
    ("Text/HTML; charset=utf-8", "application/octet-stream"),
    # Run as a script, a worker or a service worker of this origin by any page that
    # includes it, whatever this answer's own policy says.
    ("text/javascript", "application/octet-stream"),
    ("text/css", "application/octet-stream"),
    ("application/wasm", "application/octet-stream"),
    ("text/html\r\nSet-Cookie: a=b", "application/octet-stream"),
    ("<script>", "application/octet-stream"),
    ("Application/PDF; version=1.7", "application/pdf"),
    ("text/XML", "text/xml"),
])
def test_stored_documents_are_never_served_inline(client: testing.TestClient,
                                                  services: Services, declared: str,
                                                  sent: str) -> None:
    ds = fresh("CT_small.dcm")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.104.1")
    ds.MIMETypeOfEncapsulatedDocument = declared
    ds.EncapsulatedDocument = b"<html><script>alert(document.domain)</script></html>"
    services.ingest.store_bytes(encode(ds))
    result = client.simulate_get(url(ds) + "/rendered", headers={"Accept": "*/*"})
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == sent
    assert result.headers["content-disposition"].startswith("attachment;")
    policy = result.headers["content-security-policy"]
    assert "sandbox" in policy and "default-src 'none'" in policy
    assert result.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in result.headers


def test_every_dicomweb_answer_is_nosniff_and_sandboxed(client: testing.TestClient,
                                                        put: Put) -> None:
    ds, _ = put("CT_small.dcm")
    for path in ("/studies", url(ds) + "/metadata", url(ds) + "/rendered",
                 "/studies/1.2.3/metadata", "/no/such/route"):
        result = client.simulate_get(path)
        assert result.headers["x-content-type-options"] == "nosniff", path
        assert "sandbox" in result.headers["content-security-policy"], path


def test_no_dicomweb_answer_is_kept_by_any_cache(client: testing.TestClient,
                                                 put: Put) -> None:
    # Patient data in every answer (errors may name UIDs): neither a shared cache nor
    # the browser's keeps a copy; frames and bulk data included, since an instance may
    # be overwritten or removed under the same URL.
    ds, _ = put("CT_small.dcm")
    for path in ("/studies", url(ds), url(ds) + "/metadata", url(ds) + "/frames/1",
                 url(ds) + "/rendered", url(ds) + "/thumbnail",
                 "/dicom-web/studies/1.2.3/metadata", "/no/such/route", "/health"):
        result = client.simulate_get(path)
        assert result.headers.get("cache-control") == "no-store", (path, result.status)


def declaring(rows: int, columns: int, samples: int, frames: int = 1,
              name: str = "CT_small.dcm") -> FileDataset:
    """A small image whose header declares frames of another size (never decoded at
    ingest, so it is stored as sent)."""
    ds = fresh(name)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    if samples == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def test_frames_declared_over_the_ceiling_are_not_decoded(make_services: Callable[..., Services],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pacs.core import frames

    services = make_services(max_frame_bytes=1 << 20)
    client = testing.TestClient(create_app(services))

    def no_decoder(*_: Any, **__: Any) -> None:
        raise AssertionError("a decoder was called")

    monkeypatch.setattr(frames, "pixel_array", no_decoder)
    huge = declaring(65535, 65535, 3)  # 12.9 GB declared, 32 KB stored
    stored_before(services, encode(huge), monkeypatch)
    for suffix in ("/rendered", "/thumbnail", "/frames/1/rendered"):
        result = client.simulate_get(url(huge) + suffix)
        assert result.status_code == 400, (suffix, result.text)
        assert "PACS_MAX_FRAME_BYTES" in result.json["description"]
    # 1 MiB per frame is allowed; a deflated data set's frames are inflated one at a
    # time (no longer read whole: 4 MiB here, up to PACS_MAX_OBJECT_BYTES).
    monkeypatch.undo()
    deflated = declaring(512, 1024, 1, frames=4, name="image_dfl.dcm")
    deflated.BitsAllocated = deflated.BitsStored = 16
    deflated.HighBit, deflated.PixelRepresentation = 15, 0
    deflated.PixelData = b"".join(bytes([n]) * (512 * 1024 * 2) for n in range(4))
    services.ingest.store_bytes(encode(deflated))
    result = client.simulate_get(url(deflated) + "/frames/3",
                                 headers={"Accept": "application/octet-stream"})
    assert result.status_code == 200, result.text
    assert result.content == b"\2" * (512 * 1024 * 2)


def stored_before(services: Services, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store ``data``, whose native Pixel Data is shorter than its frames, as a node that
    did not refuse such an object did: one stored already is read as it is."""
    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "_ambiguity", lambda _analysis: None)
        services.ingest.store_bytes(data)


@pytest.mark.parametrize("changes, problem", [
    ({"NumberOfFrames": 2147483647}, "fewer than the"),
    ({"NumberOfFrames": 3}, "fewer than the 3 frames"),
    ({"Columns": 0}, "frames of no pixels"),
    ({"BitsAllocated": 0}, "frames of no pixels"),
])
def test_native_frames_the_value_does_not_hold_are_refused_before_the_answer(
        client: testing.TestClient, services: Services, changes: dict[str, int],
        problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CT_small holds one 128 x 128 frame of 16 bits (PS3.5 8.1.1).  A header that
    declares more frames than that, or frames of no bits, is 500 (a stored object
    that does not read as it must) before the status line for every frame list that
    asks for one it lacks: before, all frames began
    200 (with a Content-Length of 64 TiB for 2^31 frames) and broke off at frame 2,
    and frames of no bits were sent as empty parts, as many as declared."""
    ds = fresh("CT_small.dcm", **changes)
    stored_before(services, encode(ds), monkeypatch)
    listed = "/frames/1,3" if changes.get("NumberOfFrames") else "/frames/1"
    for suffix, accept in (("/bulkdata/7FE00010", OCTET_FRAMES),
                           ("/bulkdata/7FE00010", "application/octet-stream"),
                           (listed, OHIF_FRAMES)):
        result = client.simulate_get(url(ds) + suffix, headers={"Accept": accept})
        assert result.status_code == 500, (suffix, accept, result.status_code)
        assert result.json["title"] == "Stored object unreadable"
        assert problem in result.json["description"], (suffix, result.json)
    if changes.get("NumberOfFrames"):  # the frame the value holds is still sent
        result = client.simulate_get(url(ds) + "/frames/1", headers={"Accept": OHIF_FRAMES})
        assert result.status_code == 200
        assert pydicom.dcmread(sample("CT_small.dcm")).PixelData in result.content


def test_a_codestream_declaring_another_image_is_never_decoded(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 x 16 JPEG whose frame header declares 20000 x 20000 pixels (400 MB and
    seconds of decoding, in 700 bytes): every resource that would decode it answers
    406 before a decoder runs (no accepted representation can be made); as stored it
    is still sent."""
    from pacs.core import frames, transcode

    def no_decoding(*_: Any, **__: Any) -> None:
        raise AssertionError("something was decoded")

    monkeypatch.setattr(frames, "pixel_array", no_decoding)
    monkeypatch.setattr(pydicom.Dataset, "decompress", no_decoding)
    services = make_services(max_frame_bytes=1 << 20)
    client = testing.TestClient(create_app(services))
    data = make_jpeg_instance(jpeg_frame(declared=(20000, 20000)))
    services.ingest.store_bytes(data)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    for path, accept in ((url(ds) + "/rendered", "image/jpeg"),
                         (url(ds) + "/thumbnail", "image/png"),
                         (url(ds) + "/frames/1", OCTET_FRAMES),
                         (url(ds), DICOM_ACCEPT),
                         (url(ds), f"application/dicom; transfer-syntax={EXPLICIT}")):
        result = client.simulate_get(path, headers={"Accept": accept})
        assert result.status_code == 406, (path, accept, result.text)
        assert "20000 x 20000" in result.json["description"], (path, accept)
    assert transcode.can_convert(JPEG_BASELINE, EXPLICIT)
    result = client.simulate_get(url(ds) + "/frames/1", headers={"Accept": OHIF_FRAMES})
    assert result.status_code == 200 and jpeg_frame(declared=(20000, 20000)) in result.content


def test_a_deflated_frame_is_inflated_alone(client: testing.TestClient,
                                            services: Services) -> None:
    """A deflated CT (80 KB stored) with 32 MiB of zeros after its pixel data: each
    frame or rendered request inflated and parsed the whole data set (up to
    PACS_MAX_OBJECT_BYTES, from a small object); the frame's bytes are inflated alone
    now, nothing of the data set after them."""
    ds = fresh("CT_small.dcm")
    ds.add_new(0x7FE10010, "LO", "TRAILER")
    ds.add_new(0x7FE11010, "OB", bytes(32 << 20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = encode(ds)
    assert len(data) < 1 << 20
    services.ingest.store_bytes(data)
    pixels = pydicom.dcmread(sample("CT_small.dcm")).PixelData
    for suffix, accept in (("/frames/1", "application/octet-stream"),
                           ("/rendered", "image/png")):
        tracemalloc.start()
        try:
            result = client.simulate_get(url(ds) + suffix, headers={"Accept": accept})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.status_code == 200, result.text
        assert peak < 8 << 20, (suffix, peak)
        if suffix == "/frames/1":
            assert result.content == pixels


def test_sizes_over_the_ceilings_are_refused_before_the_answer(
        make_services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two RLE frames of 100 x 100 RGB: 30000 bytes each decoded, 60000 both.  Over
    PACS_MAX_FRAME_BYTES every answer that would decode them is 400 before anything is
    sent (the sizes are in the metadata), whether one frame or several are asked, as
    frames, pixel bulk data or converted instances; stored frames and objects still go,
    also to a client whose Accept header allows them after decoded ones."""
    from pacs.core import frames, transcode

    def no_decoding(*_: Any, **__: Any) -> None:
        raise AssertionError("something was decoded")

    monkeypatch.setattr(frames, "pixel_array", no_decoding)
    monkeypatch.setattr(transcode, "convert", no_decoding)
    services = make_services(max_frame_bytes=29_999)
    client = testing.TestClient(create_app(services))
    ds = fresh("SC_rgb_rle_2frame.dcm")
    services.ingest.store_bytes(encode(ds))
    for path, accept in ((url(ds) + "/frames/1,2", OCTET_FRAMES),
                         (url(ds) + "/frames/2", "application/octet-stream"),
                         (url(ds), DICOM_ACCEPT), (url(ds), "application/dicom"),
                         (url(ds, "series"), DICOM_ACCEPT), (url(ds, "study"), "*/*")):
        result = client.simulate_get(path, headers={"Accept": accept})
        assert result.status_code == 400, (path, accept, result.text)
        assert "PACS_MAX_FRAME_BYTES" in result.json["description"]
    as_stored = {"frames/1,2": OHIF_FRAMES, "": f"{DICOM_ACCEPT}; transfer-syntax=*",
                 "bulkdata/7FE00010": CLIENT_FRAMES,
                 "frames/2": f"{OCTET_FRAMES}, {OHIF_FRAMES}; q=0.5"}
    for suffix, accept in as_stored.items():
        path = f"{url(ds)}/{suffix}".rstrip("/")
        assert client.simulate_get(path, headers={"Accept": accept}).status_code == 200
    # One frame within, both over PACS_MAX_OBJECT_BYTES: a conversion holds them all.
    services = make_services(max_object_bytes=59_999)
    client = testing.TestClient(create_app(services))
    services.ingest.store_bytes(encode(ds))
    result = client.simulate_get(url(ds, "study"), headers={"Accept": DICOM_ACCEPT})
    assert result.status_code == 400, result.text
    assert "PACS_MAX_OBJECT_BYTES" in result.json["description"]


# --- non-seekable stores (S3) -----------------------------------------------------------

class _ForwardOnly(io.RawIOBase):
    """A stream that cannot seek, like an S3 object body."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._inner.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_frames_from_a_store_that_cannot_seek(client: testing.TestClient, services: Services,
                                              put: Put, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, _ = put("SC_rgb_rle_2frame.dcm")
    opened = services.store.open

    def forward_only(key: str) -> Any:
        with opened(key) as stream:
            return io.BufferedReader(_ForwardOnly(stream.read()))

    monkeypatch.setattr(services.store, "open", forward_only)
    result = client.simulate_get(url(ds) + "/frames/1", headers={"Accept": OHIF_FRAMES})
    [(_, content)] = parts(result)
    assert content == get_frame(ds.PixelData, 0, number_of_frames=2)
    assert image(client.simulate_get(url(ds) + "/rendered")).mode == "RGB"


def test_deflated_frames_are_decoded(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("image_dfl.dcm")
    [(part, content)] = parts(client.simulate_get(url(ds) + "/frames/1",
                                                  headers={"Accept": OHIF_FRAMES}))
    assert part["content-type"].endswith(EXPLICIT)
    assert content == ds.pixel_array.tobytes()
    assert image(client.simulate_get(url(ds) + "/rendered")).size == (ds.Columns, ds.Rows)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm"])
def test_big_endian_frames_are_the_stored_samples_in_little_endian(
        client: testing.TestClient, put: Put, name: str) -> None:
    """PS3.5 A.3, 8.2: a big endian object's frames are its stored samples, each
    sample's bytes swapped, as the metadata describes them (16-bit MR; 8-bit RGB of
    Planar Configuration 1, sent planar, not pydicom's interleaved pixels)."""
    ds, _ = put(name)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    [(part, content)] = parts(client.simulate_get(url(ds) + "/frames/1",
                                                  headers={"Accept": OHIF_FRAMES}))
    assert part["content-type"].endswith(EXPLICIT)
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    stored = ds.PixelData[:size]
    unit = ds.BitsAllocated // 8
    expected = (np.frombuffer(stored, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()
                if unit > 1 else stored)
    assert content == expected


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm"])
def test_a_big_endian_instance_is_converted_to_little_endian(
        client: testing.TestClient, put: Put, name: str) -> None:
    """The default retrieve of an instance stored big endian (PS3.18 8.7.3.5.2:
    Explicit VR Little Endian): the same pixels and values, every binary value's
    samples swapped."""
    ds, _ = put(name)
    [(part, content)] = parts(client.simulate_get(url(ds), headers={"Accept": DICOM_ACCEPT}))
    assert part["content-type"].startswith("application/dicom")
    converted = pydicom.dcmread(io.BytesIO(content))
    assert converted.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(converted.pixel_array, ds.pixel_array)
    assert (converted.PatientName, converted.Rows) == (ds.PatientName, ds.Rows)


def test_implicit_little_endian_frames(client: testing.TestClient, put: Put) -> None:
    ds, _ = put("MR_small_implicit.dcm")
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    [(part, content)] = parts(client.simulate_get(url(ds) + "/frames/1",
                                                  headers={"Accept": OHIF_FRAMES}))
    assert part["content-type"].endswith(EXPLICIT)
    assert content == frame_bytes(ds, 1)


def test_head_answers_wherever_get_does(client: testing.TestClient, put: Put) -> None:
    """RFC 9110 9.1, 9.3.2: the status and headers of the GET, no content; a streamed
    answer whose length the GET would not know has no made-up Content-Length."""
    ds, _ = put("CT_small.dcm")
    for path in ("/studies", url(ds), url(ds) + "/metadata", url(ds, "study") + "/series",
                 url(ds) + "/rendered"):
        got = client.simulate_get(path)
        head = client.simulate_head(path)
        assert (head.status_code, got.status_code) == (200, 200), path
        assert head.content == b"" and got.content, path
        # The same type (a multipart boundary is drawn for each answer).
        assert head.headers["content-type"].split(";")[0] == \
            got.headers["content-type"].split(";")[0], path
        assert head.headers.get("content-length") in (None, got.headers.get(
            "content-length")), path
    assert client.simulate_head("/studies/1.2.3.4.5").status_code == 404


# --- pixel data that does not decode here: the next accepted alternative ---------------

def test_an_instance_that_does_not_decode_goes_by_the_next_accepted_alternative(
        make_services: Callable[..., Services]) -> None:
    """PS3.18 8.7.3.5: the first acceptable representation that can be produced is sent.
    A JPEG whose codestream does not decode into the frame its data set describes
    (a variant the decoders lack decodes no better) cannot be converted: a study sends
    it as stored when the Accept header allows that after the converted form, its other
    instances converted (the response no longer ends at it); an instance, a frame and
    a rendered view answer 406 when nothing else is accepted, never 400 (the request
    was not wrong)."""
    services = make_services()
    client = testing.TestClient(create_app(services))
    good = make_jpeg_instance(jpeg_frame())
    study = pydicom.dcmread(io.BytesIO(good), stop_before_pixels=True).StudyInstanceUID
    bad = make_jpeg_instance(jpeg_frame(declared=(64, 64)), StudyInstanceUID=study)
    for data in (good, bad):
        services.ingest.store_bytes(data)
    bad_ds = pydicom.dcmread(io.BytesIO(bad), stop_before_pixels=True)
    fallback = f"{DICOM_ACCEPT}, {DICOM_ACCEPT}; transfer-syntax=*; q=0.5"
    result = client.simulate_get(f"/studies/{study}", headers={"Accept": fallback})
    assert result.status_code == 200, result.text
    syntaxes = sorted(headers["content-type"].split("transfer-syntax=")[1]
                      for headers, _ in parts(result))
    assert syntaxes == sorted([EXPLICIT, JPEG_BASELINE])
    assert bad in [content for _, content in parts(result)]
    for path, accept in ((url(bad_ds), DICOM_ACCEPT),
                         (url(bad_ds) + "/frames/1", OCTET_FRAMES),
                         (url(bad_ds) + "/rendered", "image/png")):
        result = client.simulate_get(path, headers={"Accept": accept})
        assert result.status_code == 406, (path, result.text)
    result = client.simulate_get(url(bad_ds) + "/frames/1", headers={"Accept": "*/*"})
    assert result.status_code == 200 and jpeg_frame(declared=(64, 64)) in result.content


def test_a_stored_object_that_does_not_read_is_a_server_failure(
        make_services: Callable[..., Services]) -> None:
    """An object damaged in the store (cut short in its pixel data) answers 500: the
    request was right, the node cannot read what it holds."""
    services = make_services(intake_object_bytes=0)  # written to the store at once
    client = testing.TestClient(create_app(services))
    ds = fresh("CT_small.dcm")
    data = encode(ds)
    services.ingest.store_bytes(data)
    key = services.index.connection().execute(
        "SELECT object_key FROM instance WHERE sop_uid = ?", (ds.SOPInstanceUID,)
    ).fetchone()[0]
    cut = data[:len(data) - 1000]
    services.store.backend.put(key, io.BytesIO(cut), len(cut))
    result = client.simulate_get(url(ds) + "/frames/1",
                                 headers={"Accept": "application/octet-stream"})
    assert result.status_code == 500, result.text
    assert result.json["title"] == "Stored object unreadable"


@pytest.mark.parametrize(("tag", "vr", "value", "suffix"), [
    (0x00280010, "LO", "abc", "/frames/1"),          # Rows
    (0x00280100, "LO", "16x", "/frames/1"),          # Bits Allocated
    (0x00280008, "LO", "abc", "/rendered"),          # Number of Frames
    (0x00281053, "LO", "xyz", "/rendered"),          # Rescale Slope
    (0x00280004, "CS", "PALETTE COLOR", "/rendered"),  # without its palette
    (0x00283010, "SQ", [Dataset()], "/rendered"),     # an empty VOI LUT item
], ids=["rows", "bits allocated", "number of frames", "rescale slope", "no palette",
        "empty voi lut item"])
def test_values_that_describe_no_image_are_406_not_a_failure_of_ours(
        client: testing.TestClient, services: Services, caplog: pytest.LogCaptureFixture,
        tag: int, vr: str, value: Any, suffix: str) -> None:
    """An object ingest accepts may hold an Image Pixel or LUT value that describes no
    image (PS3.3 C.7.6.3, C.11): a Rows of VR LO, a Rescale Slope that is no number,
    a palette colour image without its palette.  Frames or a rendered view of it
    cannot be made: 406, as for pixels no decoder decodes, where it was a 500
    "Internal error" with a traceback logged as a bug; the object itself is still
    sent as stored."""
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    ds.add_new(tag, vr, value)
    data = encode(ds)
    services.ingest.store_bytes(data)
    caplog.set_level(logging.ERROR)
    result = client.simulate_get(url(ds) + suffix)
    assert result.status_code == 406, result.text
    assert result.json["title"] == "Cannot decode the stored pixels"
    assert not caplog.records
    result = client.simulate_get(url(ds), headers={
        "Accept": f"{DICOM_ACCEPT}; transfer-syntax=*"})
    assert result.status_code == 200 and parts(result)[0][1] == data


def test_frames_other_than_declared_go_as_stored_when_that_is_accepted(
        client: testing.TestClient, services: Services) -> None:
    """Two RLE frames under a Number of Frames of 3: no converted object is made of
    them (its Pixel Data would not hold what its header says), and a client that
    accepts the stored object after the converted one gets it, not an error."""
    ds = fresh("SC_rgb_rle_2frame.dcm", NumberOfFrames=3)
    data = encode(ds)
    services.ingest.store_bytes(data)
    result = client.simulate_get(url(ds), headers={"Accept": DICOM_ACCEPT})
    assert result.status_code == 406 and "not the 3 declared" in result.text
    fallback = f"{DICOM_ACCEPT}, {DICOM_ACCEPT}; transfer-syntax=*; q=0.5"
    result = client.simulate_get(url(ds), headers={"Accept": fallback})
    assert result.status_code == 200, result.text
    [(headers, content)] = parts(result)
    assert headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.5")
    assert content == data
