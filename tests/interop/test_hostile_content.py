"""Hostile content against ``pacs serve``: deflate bombs (C-STORE and STOW-RS), bodies
over the request limit, frames declaring gigabytes, and active content.

In every attack the node keeps answering a real C-ECHO (dcmtk) and a QIDO-RS, its
memory (summed RSS of every node process, sampled while the attack runs) grows by
less than 256 MB, and nothing refused is stored.  The figures are printed for
docs/reliability.md (``pytest -s``).
"""

from __future__ import annotations

import io
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from adapters.dicomweb.multipart import encode as multipart_encode
from tests.conftest import wait_for_port
from tests.factory import jpeg_frame, make_instance, make_jpeg_instance
from tests.interop.conftest import (
    AE_TITLE,
    PATIENCE,
    Node,
    Resources,
    answers_echo,
    answers_qido,
    fresh_ct,
    run_dcmtk,
)

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

#: The most a node's memory may grow during an attack.
MEMORY_BOUND = 256 << 20
#: PACS_MAX_OBJECT_BYTES and PACS_MAX_REQUEST_BYTES of the limited node.
OBJECT_LIMIT = 16 << 20
REQUEST_LIMIT = 48 << 20
OUT_OF_RESOURCES = 0xA700
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
#: The prebuilt OHIF viewer (scripts/fetch-ohif.sh), for the viewer port's headers.
DIST = Path(__file__).resolve().parents[2] / "vendor" / "ohif" / "dist"
DICOM_MULTIPART = "multipart/related; type=\"application/dicom\"; boundary={}"


# --- the node's health during an attack ----------------------------------------------------

echo, qido = answers_echo, answers_qido


class Watch:
    """The node's resources before an attack and the peak sampled (every 20 ms) while
    it runs; C-ECHO and QIDO-RS are checked before, during and after."""

    def __init__(self, node: Node) -> None:
        self.node = node
        echo(node)
        qido(node)  # warmed up: first requests load modules and connections
        self.before = node.resources()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self.node.resources()
            if now.rss_bytes > self.peak.rss_bytes:
                self.peak = now
            time.sleep(0.02)

    @contextmanager
    def attack(self) -> Iterator[None]:
        """Sample memory while the block runs, and check the node answers meanwhile."""
        self._thread.start()
        serving = threading.Thread(target=self._serving_meanwhile, daemon=True)
        self.meanwhile: list[BaseException] = []
        serving.start()
        try:
            yield
        finally:
            serving.join(timeout=2 * PATIENCE)
            self._stop.set()
            self._thread.join(timeout=10)

    def _serving_meanwhile(self) -> None:
        try:
            echo(self.node)
            qido(self.node)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.meanwhile.append(exc)

    def check(self, name: str) -> Resources:
        """Print before → peak → after, and require the bounds."""
        echo(self.node)
        qido(self.node)
        now = self.node.resources()
        print(f"\n[{name}] memory {self.before.rss_bytes / 2**20:.0f} MiB -> peak "
              f"{self.peak.rss_bytes / 2**20:.0f} MiB -> {now.rss_bytes / 2**20:.0f} MiB; "
              f"fds {self.before.fds} -> {now.fds}")
        assert not self.meanwhile, f"not serving during the attack: {self.meanwhile}"
        grown = max(self.peak.rss_bytes, now.rss_bytes) - self.before.rss_bytes
        assert grown < MEMORY_BOUND, f"memory grew by {grown / 2**20:.0f} MiB"
        return now


@pytest.fixture(scope="module")
def limited(node_factory: Callable[..., Node]) -> Iterator[Node]:
    """A node with a 16 MiB object limit and a 48 MiB request limit."""
    node = node_factory("content", PACS_MAX_OBJECT_BYTES=str(OBJECT_LIMIT),
                        PACS_MAX_REQUEST_BYTES=str(REQUEST_LIMIT), PACS_VIEWER_DIST=str(DIST))
    yield node
    node.stop()


# --- deflate bombs ---------------------------------------------------------------------------

def _deflate(raw: bytes, final: bool = False) -> bytes:
    """One self-contained piece of a raw deflate stream (PS3.5 A.5): after a full flush
    nothing refers back, so pieces concatenate, and a repeated piece costs nothing."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def _explicit_le(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(out, ds)
    return out.getvalue()


#: 16 MiB of zeros, deflated once (~16 KB).
_BLOCK = 16 << 20
_ZEROS = _deflate(bytes(_BLOCK))


def deflate_bomb(inflated: int, where: str) -> tuple[bytes, Dataset]:
    """A CT whose deflated data set inflates to more than ``inflated`` bytes.

    ``where``: ``private`` puts the zeros in a private OB element (its length says
    how much follows); ``fragments`` in encapsulated pixel data fragments of 16 MiB
    (undefined length: only counting what inflates can stop it).
    """
    blocks = -(-inflated // _BLOCK)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bomb^Deflate", "BOMB"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID, ds.SOPInstanceUID)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    if where == "private":
        front = Dataset()
        front.SOPClassUID, front.SOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        front.Modality = ds.Modality
        front.add_new(0x00090010, "LO", "PACS BOMB")
        back = Dataset()
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(back, keyword, getattr(ds, keyword))
        element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, blocks * _BLOCK)
        stream = (_deflate(_explicit_le(front) + element) + _ZEROS * blocks
                  + _deflate(_explicit_le(back), final=True))
    else:
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
        item = struct.pack("<HHI", 0xFFFE, 0xE000, _BLOCK)
        stream = (_deflate(_explicit_le(ds)
                           + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
                           + struct.pack("<HHI", 0xFFFE, 0xE000, 0))
                  + (_deflate(item) + _ZEROS) * blocks
                  + _deflate(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), final=True))
    return out.getvalue() + stream, ds


def c_store_file(node: Node, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """C-STORE a Part 10 file as its bytes are (pynetdicom sends the data set from the
    file without decoding it), proposing Deflated Explicit VR Little Endian."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established, node.log()
    try:
        response = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert "Status" in response, f"no C-STORE response\n{node.log()}"
    return int(response.Status)


def assert_not_stored(node: Node, ds: Dataset) -> None:
    assert ds.SOPInstanceUID not in node.index()
    assert not any(ds.SOPInstanceUID in key for key in node.objects())
    found = requests.get(f"{node.web_url()}/instances",
                         params={"SOPInstanceUID": ds.SOPInstanceUID}, timeout=30)
    assert found.status_code == 200 and found.json() == []


@pytest.mark.dimse
@pytest.mark.parametrize("where", ["private", "fragments"])
def test_deflate_bomb_via_c_store(limited: Node, tmp_path: Path, where: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """~1 MB on the wire inflating to 1 GiB, against a 16 MiB object limit: A700 (Out
    of resources), nothing stored, no memory spike."""
    data, ds = deflate_bomb(1 << 30, where)
    assert len(data) < 2 << 20
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    watch = Watch(limited)
    with watch.attack():
        status = c_store_file(limited, path, monkeypatch)
    watch.check(f"deflate bomb ({where}) 1 GiB via C-STORE, limit 16 MiB")
    assert status == OUT_OF_RESOURCES, hex(status)
    assert_not_stored(limited, ds)


@pytest.mark.dimse
def test_deflate_bomb_over_the_default_limit(node_factory: Callable[..., Node],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default settings (2 GiB): 2.6 MB of fragments inflating to 2.25 GiB are
    inflated as a stream and refused once past 2 GiB; then an ordinary CT is stored."""
    node = node_factory("defaults")
    try:
        data, ds = deflate_bomb(2304 << 20, "fragments")
        path = tmp_path / "bomb.dcm"
        path.write_bytes(data)
        watch = Watch(node)
        started = time.monotonic()
        with watch.attack():
            status = c_store_file(node, path, monkeypatch)
        elapsed = time.monotonic() - started
        watch.check(f"deflate bomb 2.25 GiB via C-STORE, default limit ({elapsed:.1f} s)")
        assert status == OUT_OF_RESOURCES, hex(status)
        assert_not_stored(node, ds)
        good = fresh_ct()
        good_path = tmp_path / "good.dcm"
        good.save_as(good_path, enforce_file_format=True)
        result = run_dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(node.port),
                           str(good_path), timeout=60)
        assert result.returncode == 0, result.stdout
        assert good.SOPInstanceUID in node.index()
    finally:
        node.stop()


def stow(node: Node, *parts: bytes, timeout: float = 120) -> requests.Response:
    boundary = "hostile-content-boundary"
    body = b"".join(multipart_encode((({"Content-Type": "application/dicom"}, p)
                                      for p in parts), boundary))
    return requests.post(f"{node.web_url()}/studies", data=body, timeout=timeout,
                         headers={"Content-Type": DICOM_MULTIPART.format(boundary),
                                  "Accept": "application/dicom+json"})


def failures(response: requests.Response) -> list[tuple[str | None, int]]:
    return [(item["00081155"].get("Value", [None])[0], item["00081197"]["Value"][0])
            for item in response.json().get("00081198", {}).get("Value", [])]


@pytest.mark.parametrize("where", ["private", "fragments"])
def test_deflate_bomb_via_stow(limited: Node, where: str) -> None:
    """The same bomb as a STOW-RS part, beside a good part: the bomb fails alone with
    A700 under its SOP Instance UID (read without inflating it), the good one is
    stored."""
    data, ds = deflate_bomb(1 << 30, where)
    good = fresh_ct()
    buffer = io.BytesIO()
    good.save_as(buffer, enforce_file_format=True)
    watch = Watch(limited)
    with watch.attack():
        response = stow(limited, data, buffer.getvalue())
    watch.check(f"deflate bomb ({where}) 1 GiB via STOW-RS, limit 16 MiB")
    assert response.status_code == 202, response.text
    assert failures(response) == [(ds.SOPInstanceUID, OUT_OF_RESOURCES)]
    assert_not_stored(limited, ds)
    assert good.SOPInstanceUID in limited.index()


# --- request and part sizes ---------------------------------------------------------------

def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(PATIENCE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_request_declaring_10_gb_is_413_before_its_body(limited: Node) -> None:
    """Content-Length 10 GB over the 48 MiB request limit: 413 with no body sent."""
    host, port = limited.web_url().removeprefix("http://").split(":")
    watch = Watch(limited)
    with watch.attack(), socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        answer = _read_response(sock)
    watch.check("STOW-RS Content-Length 10 GB, limit 48 MiB")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_chunked_body_over_the_request_limit_is_413(limited: Node) -> None:
    """A chunked body that never ends: read until it passes 48 MiB, then 413; the part
    being read (UIDs unknown) is not stored."""
    host, port = limited.web_url().removeprefix("http://").split(":")
    boundary = "chunked-boundary"
    before = limited.index()
    watch = Watch(limited)
    answer = b""
    with watch.attack(), socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: " + DICOM_MULTIPART.format(boundary).encode()
                     + b"\r\n\r\n")
        chunk = b"\1" * (1 << 20)
        first = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        pieces = [first] + [chunk] * 128  # 128 MiB if it were all read
        try:
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        except OSError:
            pass  # the node closed its end: the answer was sent before
        answer = _read_response(sock)
    watch.check("STOW-RS chunked body past 48 MiB")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert limited.index() == before


def test_part_over_the_object_limit_fails_alone(limited: Node) -> None:
    """A 24 MiB part between two small ones, with a 16 MiB object limit: read to its
    end without being kept, listed as failed (A700) under its UID; the others stored."""
    big = fresh_ct()
    big.Rows, big.Columns = 3072, 4096
    big.PixelData = b"\0" * (3072 * 4096 * 2)
    parts = []
    for ds in (fresh_ct(), big, fresh_ct()):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        parts.append((ds, buffer.getvalue()))
    assert OBJECT_LIMIT < len(parts[1][1]) < REQUEST_LIMIT
    watch = Watch(limited)
    with watch.attack():
        response = stow(limited, *(data for _, data in parts))
    watch.check("STOW-RS part of 24 MiB, object limit 16 MiB")
    assert response.status_code == 202, response.text
    assert failures(response) == [(big.SOPInstanceUID, OUT_OF_RESOURCES)]
    assert_not_stored(limited, big)
    assert {parts[0][0].SOPInstanceUID, parts[2][0].SOPInstanceUID} <= set(limited.index())


# --- frames declaring gigabytes -------------------------------------------------------------

def test_frame_declaring_65535_by_65535_rgb_is_refused(limited: Node) -> None:
    """A 32 KB CT whose header declares one 65535 x 65535 RGB frame (12.9 GB decoded):
    its native Pixel Data does not hold that frame, so it is refused at once (PS3.5
    8.1.1); a JPEG whose header declares as much is stored as sent (ingest never
    decodes), and refused with 400 by /rendered and /thumbnail before any decoder
    runs."""
    native = fresh_ct()
    native.Rows = native.Columns = 65535
    native.SamplesPerPixel, native.PhotometricInterpretation = 3, "RGB"
    native.PlanarConfiguration = 0
    buffer = io.BytesIO()
    native.save_as(buffer, enforce_file_format=True)
    assert stow(limited, buffer.getvalue()).status_code in (400, 409)
    data = make_jpeg_instance(jpeg_frame(), rows=65535, columns=65535, SamplesPerPixel=3,
                              PhotometricInterpretation="YBR_FULL_422",
                              PlanarConfiguration=0)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert stow(limited, data).status_code == 200
    base = (f"{limited.web_url()}/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    watch = Watch(limited)
    with watch.attack():
        answers = [requests.get(base + suffix, timeout=60)
                   for suffix in ("/rendered", "/thumbnail", "/frames/1/rendered")]
    watch.check("frame declaring 65535 x 65535 x 3 via /rendered")
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert "PACS_MAX_FRAME_BYTES" in answer.json()["description"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_jpeg_declaring_20000_by_20000_behind_16_by_16_is_refused(limited: Node) -> None:
    """A 16 x 16 JPEG whose frame header declares 20000 x 20000 pixels: the decoder
    would fill 400 MB (2 GB of RSS, 6.6 s, then fail to fit them in 256 bytes).  Every
    resource that decodes answers 406 from the codestream's header (nothing it may
    send can be made); the stored frame is still sent as stored."""
    data = make_jpeg_instance(jpeg_frame(declared=(20000, 20000)))
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert stow(limited, data).status_code == 200
    base = (f"{limited.web_url()}/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    explicit = "1.2.840.10008.1.2.1"
    asked = (("/rendered", "image/jpeg"), ("/thumbnail", "image/png"),
             ("/frames/1", f"multipart/related; type=application/octet-stream; "
                           f"transfer-syntax={explicit}"),
             ("", f"application/dicom; transfer-syntax={explicit}"))
    watch = Watch(limited)
    with watch.attack():
        answers = [requests.get(base + suffix, headers={"Accept": accept}, timeout=60)
                   for _ in range(3) for suffix, accept in asked]
    watch.check("JPEG declaring 20000 x 20000 behind 16 x 16, 12 requests")
    for answer in answers:
        assert answer.status_code == 406, answer.text
        assert "20000 x 20000" in answer.json()["description"]
    stored = requests.get(base + "/frames/1", timeout=60, headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert stored.status_code == 200 and jpeg_frame(declared=(20000, 20000)) in stored.content


# --- headers that cost more than their bytes ------------------------------------------------

def _before_patient_name(elements: bytes, **attributes: object) -> tuple[bytes, Dataset]:
    """A small CT with explicit VR ``elements`` (groups 0008 to 000F) before Patient's
    Name, and its header."""
    data = make_instance(**attributes)
    at = data.index(b"\x10\x00\x10\x00PN")
    data = data[:at] + elements + data[at:]
    return data, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def test_many_tiny_elements_are_refused_by_their_count(limited: Node) -> None:
    """A STOW-RS part of 1.25 million two-character private elements (12 MiB): the
    node grew by 1.2 GB reading it and encoding its metadata; refused by the walk's
    count (A700) beside a good part."""
    count = 1_250_000
    element = struct.Struct("<HH2sH")
    blocks = [element.pack(0x0009 + 2 * (n // 0xEF00), 0x0010, b"LO", 2) + b"AB"
              + b"".join(element.pack(0x0009 + 2 * (n // 0xEF00), 0x1000 + e, b"LO", 2)
                         + b"AB" for e in range(min(0xEF00, count - n)))
              for n in range(0, count, 0xEF00)]
    tiny, tiny_ds = _before_patient_name(b"".join(blocks))
    good, good_ds = _before_patient_name(b"")
    watch = Watch(limited)
    with watch.attack():
        answer = stow(limited, tiny, good)
    watch.check("12 MiB of 1.25 million tiny elements via STOW-RS")
    assert answer.status_code == 202, answer.text
    assert failures(answer) == [(tiny_ds.SOPInstanceUID, OUT_OF_RESOURCES)]
    indexed = limited.index()
    assert good_ds.SOPInstanceUID in indexed and tiny_ds.SOPInstanceUID not in indexed


def test_many_empty_values_are_referenced_in_the_metadata(limited: Node) -> None:
    """A STOW-RS part whose UC value is 12 MiB of backslashes (12 million empty
    values; the node grew by 324 MiB encoding them as metadata): stored, the value
    referenced by a BulkDataURI in its metadata and sent as its bytes from there."""
    value = b"\\" * (12 << 20)
    empty, empty_ds = _before_patient_name(
        struct.pack("<HH2s2xI", 0x0008, 0x0119, b"UC", len(value)) + value)
    watch = Watch(limited)
    with watch.attack():
        answer = stow(limited, empty)
    watch.check("12 MiB of empty values via STOW-RS")
    assert answer.status_code == 200, answer.text
    base = (f"{limited.web_url()}/studies/{empty_ds.StudyInstanceUID}/series/"
            f"{empty_ds.SeriesInstanceUID}/instances/{empty_ds.SOPInstanceUID}")
    [document] = requests.get(base + "/metadata", timeout=60).json()
    assert document["00080119"]["BulkDataURI"].endswith("/bulkdata/00080119")
    assert requests.get(document["00080119"]["BulkDataURI"], timeout=60, headers={
        "Accept": "application/octet-stream"}).content == value


# --- active content -------------------------------------------------------------------------

def test_html_document_is_never_served_inline(limited: Node) -> None:
    """An Encapsulated PDF instance whose MIME Type of Encapsulated Document says
    text/html: /rendered sends it as application/octet-stream (the declared type is
    not an inert one), an attachment, sandboxed, nosniff."""
    ds = fresh_ct()
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    ds.MIMETypeOfEncapsulatedDocument = "text/html"
    ds.EncapsulatedDocument = b"<html><script>fetch('/studies')</script></html>"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert stow(limited, buffer.getvalue()).status_code == 200
    url = (f"{limited.web_url()}/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered")
    # Its declared type is not an inert one: offered as application/octet-stream only.
    assert requests.get(url, headers={"Accept": "text/html"}, timeout=30).status_code == 406
    for accept in ("*/*", "text/html,application/xhtml+xml,*/*;q=0.8"):
        answer = requests.get(url, headers={"Accept": accept}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "application/octet-stream"
        assert answer.content == ds.EncapsulatedDocument
        assert answer.headers["Content-Disposition"].startswith("attachment;")
        policy = answer.headers["Content-Security-Policy"]
        assert "sandbox" in policy and "default-src 'none'" in policy
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        print(f"\n[text/html document, Accept {accept}] "
              f"{answer.headers['Content-Type']}; {answer.headers['Content-Disposition']}; "
              f"CSP {policy}")


def test_nosniff_and_policies_on_both_ports(limited: Node) -> None:
    """DICOMweb answers (found or not) are nosniff and sandboxed; the viewer's pages
    and files carry nosniff and the viewer's Content-Security-Policy."""
    web = limited.web_url()
    for url in (f"{web}/studies", f"{web}/studies/1.2.3/metadata", f"{web}/nothing"):
        answer = requests.get(url, timeout=30)
        assert answer.headers["X-Content-Type-Options"] == "nosniff", url
        assert "sandbox" in answer.headers["Content-Security-Policy"], url
    port = int(limited.env["PACS_VIEWER_PORT"])
    wait_for_port(port, timeout=60)
    viewer = f"http://127.0.0.1:{port}"
    for path in ("/", "/viewer", "/missing.js"):
        answer = requests.get(viewer + path, timeout=30)
        assert answer.headers["X-Content-Type-Options"] == "nosniff", path
        policy = answer.headers["Content-Security-Policy"]
        assert "script-src 'self' 'wasm-unsafe-eval' 'sha256-" in policy, path
        assert "'unsafe-eval'" not in policy
    print(f"\n[viewer CSP, page] {policy}")
    script = requests.get(viewer + "/app-config.js", timeout=30)
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    print(f"[viewer CSP, scripts (workers)] {script.headers['Content-Security-Policy']}")
    api = requests.get(viewer + "/dicom-web/studies", timeout=30)
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in api.headers["Content-Security-Policy"]
