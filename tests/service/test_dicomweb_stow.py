"""STOW-RS through falcon's test client over real services: bodies as clients send
them, the PS3.18 10.5.3 response, and nothing stored from a refused part."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import pytest
from falcon import testing
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

import adapters.dicomweb.stow as stow_module
from adapters.dicomweb.app import create_app
from adapters.dicomweb.multipart import encode
from pacs.core import config
from pacs.core.errors import StorageError
from pacs.core.index import writer
from pacs.core.services import Services, build, drain
from pacs.core.storage.memory import MemoryStore
from tests.conftest import sample

JSON = "application/dicom+json"
BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"  # dicomweb-client's
QUOTED = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
BARE = f"multipart/related; type=application/dicom; boundary={BOUNDARY}"

# FailureReason codes (PS3.18 Table 10.5.3-2 / PS3.4 Table B.2-1).
STUDY_MISMATCH, CANNOT_UNDERSTAND, INVALID_UID = 0xC409, 0xC000, 0x0117
DUPLICATE, OUT_OF_RESOURCES = 0x0111, 0xA700


def instance(study_uid: str | None = None, **changes: Any) -> bytes:
    """CT_small with new UIDs (and the given study), as Part 10 bytes."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def uids(data: bytes) -> Dataset:
    return dcmread(DicomBytesIO(data), stop_before_pixels=True)


def body(*objects: bytes, boundary: str = BOUNDARY,
         headers: dict[str, str] | None = None) -> bytes:
    part_headers = {"Content-Type": "application/dicom"} if headers is None else headers
    return b"".join(encode(((part_headers, o) for o in objects), boundary))


@pytest.fixture(params=[0, 1], ids=["in-process", "helper"])
def services(request: pytest.FixtureRequest, settings: config.Settings,
             memory_store: MemoryStore) -> Iterator[Services]:
    """The parts analysed in the request's thread, then in a helper process."""
    built = build(settings.with_overrides(web_analysers=request.param), store=memory_store)
    yield built
    built.close()


@pytest.fixture
def client(services: Services) -> testing.TestClient:
    return testing.TestClient(create_app(services))


def post(client: testing.TestClient, payload: bytes, content_type: str = QUOTED,
         path: str = "/studies", headers: dict[str, str] | None = None,
         **kwargs: Any) -> testing.Result:
    return client.simulate_post(path, body=payload,
                                headers={"Content-Type": content_type, **(headers or {})},
                                **kwargs)


def stored(services: Services) -> set[str]:
    conn = services.index.connection()
    return {row[0] for row in conn.execute("SELECT sop_uid FROM instance")}


def items(result: testing.Result, key: str) -> list[dict[str, Any]]:
    return list(result.json.get(key, {}).get("Value", []))


def referenced(result: testing.Result) -> list[str]:
    return [item["00081155"]["Value"][0] for item in items(result, "00081199")]


def failures(result: testing.Result) -> list[tuple[str | None, int]]:
    return [(item["00081155"].get("Value", [None])[0], item["00081197"]["Value"][0])
            for item in items(result, "00081198")]


# --- success ------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [QUOTED, BARE])
@pytest.mark.parametrize("prefix", ["", "/dicom-web"])
def test_store_two_instances(client: testing.TestClient, services: Services,
                             memory_store: MemoryStore, content_type: str, prefix: str) -> None:
    study = generate_uid()
    first, second = instance(study), instance(study)
    result = post(client, body(first, second), content_type, path=f"{prefix}/studies")
    assert result.status_code == 200, result.text
    assert result.headers["Content-Type"] == JSON
    sops = [uids(first).SOPInstanceUID, uids(second).SOPInstanceUID]
    assert referenced(result) == sops
    assert "00081198" not in result.json, "no FailedSOPSequence when nothing failed"
    assert result.json["00081190"]["Value"][0].endswith(f"{prefix}/studies/{study}")
    item = items(result, "00081199")[0]
    assert item["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    ds = uids(first)
    assert item["00081190"]["Value"][0].endswith(
        f"{prefix}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    # Stored exactly as sent.
    for data in (first, second):
        ds = uids(data)
        key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        with services.store.open(key) as stream:  # in the intake, then in the store
            assert stream.read() == data
    assert drain(services) == 2
    for data in (first, second):
        ds = uids(data)
        key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert memory_store.objects[key] == data
    assert stored(services) == set(sops)


def test_instances_of_two_studies_leave_the_retrieve_url_empty(
        client: testing.TestClient) -> None:
    """The response's Retrieve URL is Type 2 (PS3.18 Table 10.5.3-1): present, and
    empty when the stored instances are of no one study."""
    result = post(client, body(instance(generate_uid()), instance(generate_uid())))
    assert result.status_code == 200, result.text
    assert result.json["00081190"] == {"vr": "UR"}


def test_store_to_a_study(client: testing.TestClient, services: Services) -> None:
    study = generate_uid()
    result = post(client, body(instance(study)), path=f"/studies/{study}")
    assert result.status_code == 200
    assert result.json["00081190"]["Value"][0].endswith(f"/studies/{study}")


def test_stored_instances_are_found_by_qido(client: testing.TestClient) -> None:
    data = instance(PatientID="STOWED")
    assert post(client, body(data)).status_code == 200
    found = client.simulate_get("/studies", params={"PatientID": "STOWED"}).json
    assert found[0]["0020000D"]["Value"] == [uids(data).StudyInstanceUID]


def test_same_instance_twice_is_success(client: testing.TestClient) -> None:
    data = instance()
    assert post(client, body(data)).status_code == 200
    again = post(client, body(data, data))
    assert again.status_code == 200 and len(referenced(again)) == 2


def test_preamble_epilogue_padding_and_part_without_content_type(
        client: testing.TestClient, services: Services) -> None:
    data = instance()
    payload = (b"preamble to ignore\r\n--" + BOUNDARY.encode() + b"  \t\r\n\r\n" + data
               + b"\r\n--" + BOUNDARY.encode() + b"--\r\nepilogue to ignore")
    result = post(client, payload)
    assert result.status_code == 200, result.text
    assert stored(services) == {uids(data).SOPInstanceUID}


def test_part_content_type_with_transfer_syntax_parameter(client: testing.TestClient) -> None:
    headers = {"Content-Type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}
    content_type = ('multipart/related; type="application/dicom"; '
                    f'transfer-syntax=1.2.840.10008.1.2.1; boundary="{BOUNDARY}"')
    assert post(client, body(instance(), headers=headers), content_type).status_code == 200


def test_single_part_application_dicom_body(client: testing.TestClient,
                                            services: Services) -> None:
    data = instance()
    result = post(client, data, "application/dicom")
    assert result.status_code == 200
    assert stored(services) == {uids(data).SOPInstanceUID}


def test_single_part_body_short_of_its_length_is_not_stored(client: testing.TestClient,
                                                              services: Services) -> None:
    def cut(data: bytes) -> bytes:
        # Before Pixel Data: an element boundary, so what is left reads as a whole object.
        return data[:data.index(b"\xe0\x7f\x10\x00")]

    whole, short = instance(), instance()
    assert post(client, cut(whole), "application/dicom").status_code == 200  # sent as such
    result = post(client, cut(short), "application/dicom",
                  headers={"Content-Length": str(len(short))})
    assert result.status_code == 400
    assert "ended after" in result.json["description"]
    assert stored(services) == {uids(whole).SOPInstanceUID}


# --- partial failures: 202 / 409 with reasons; refused parts are not stored --------------

def test_study_mismatch_is_refused_and_not_stored(client: testing.TestClient,
                                                  services: Services) -> None:
    study = generate_uid()
    good, other = instance(study), instance()
    result = post(client, body(good, other), path=f"/studies/{study}")
    assert result.status_code == 202
    assert referenced(result) == [uids(good).SOPInstanceUID]
    assert failures(result) == [(uids(other).SOPInstanceUID, STUDY_MISMATCH)]
    assert stored(services) == {uids(good).SOPInstanceUID}
    none = post(client, body(instance()), path=f"/studies/{study}")
    assert none.status_code == 409
    assert [reason for _, reason in failures(none)] == [STUDY_MISMATCH]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("bad, reason, known_uid", [
    (lambda: b"this is not DICOM at all", CANNOT_UNDERSTAND, False),
    (lambda: instance()[:-200], CANNOT_UNDERSTAND, True),  # truncated pixel data
    (lambda: instance(SOPInstanceUID="1.2.03.x"), INVALID_UID, False),
], ids=["garbage", "truncated", "invalid-uid"])
def test_bad_part_among_good_ones(client: testing.TestClient, services: Services,
                                  bad: Callable[[], bytes], reason: int,
                                  known_uid: bool) -> None:
    good = instance()
    result = post(client, body(good, bad()))
    assert result.status_code == 202, result.text
    ((sop, code),) = failures(result)
    assert code == reason
    assert (sop is not None) == known_uid
    assert items(result, "00081198")[0]["00081150"]["vr"] == "UI"
    assert stored(services) == {uids(good).SOPInstanceUID}


def test_a_request_of_unreadable_parts_only_is_bad_syntax(client: testing.TestClient,
                                                         services: Services) -> None:
    """PS3.18 10.5.3.1: 400 when no instance could be stored for bad syntax (every
    part unreadable), 409 for a conflict (another study, in the test above); the
    failed parts are listed either way."""
    result = post(client, body(b"this is not DICOM at all", instance()[:-200]))
    assert result.status_code == 400, result.text
    assert [reason for _, reason in failures(result)] == [CANNOT_UNDERSTAND] * 2
    assert stored(services) == set()


def test_many_refused_parts_make_one_log_line(client: testing.TestClient,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A request may hold thousands of parts: their refusals are one WARNING line for
    the request, by FailureReason with the first one's reason, not a line per part."""
    garbage = [b"not DICOM %d" % n for n in range(300)]
    with caplog.at_level(logging.DEBUG, logger="adapters.dicomweb.stow"):
        result = post(client, body(instance(), *garbage))
    assert result.status_code == 202
    assert len(failures(result)) == 300
    lines = [r for r in caplog.records
             if r.name == "adapters.dicomweb.stow" and r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith(f"STOW-RS: 1 stored, 300 failed: "
                                            f"{CANNOT_UNDERSTAND:04X} x 300 (")


def test_part_of_another_media_type_is_refused(client: testing.TestClient,
                                               services: Services) -> None:
    good = instance()
    payload = b"".join(encode([({"Content-Type": "application/dicom"}, good),
                               ({"Content-Type": "image/jpeg"}, b"\xff\xd8\xff")], BOUNDARY))
    result = post(client, payload)
    assert result.status_code == 202
    assert [reason for _, reason in failures(result)] == [CANNOT_UNDERSTAND]
    assert stored(services) == {uids(good).SOPInstanceUID}


def test_duplicate_rejected_by_policy(make_services: Callable[..., Services]) -> None:
    services = make_services(store=MemoryStore(), duplicate_policy="reject")
    client = testing.TestClient(create_app(services))
    data = instance()
    assert post(client, body(data)).status_code == 200
    changed = dcmread(DicomBytesIO(data))
    changed.PatientName = "OTHER^NAME"
    out = DicomBytesIO()
    changed.save_as(out, enforce_file_format=True)
    result = post(client, body(out.getvalue()))
    assert result.status_code == 409
    assert failures(result) == [(changed.SOPInstanceUID, DUPLICATE)]


def test_a_duplicate_the_keep_policy_discards_names_the_kept_instance(
        make_services: Callable[..., Services]) -> None:
    """``PACS_DUPLICATE_POLICY=keep``: a different object under a stored SOP Instance
    UID, in another study, is discarded; the instance is stored (the first object), and
    the answer's Retrieve URL names where it is, not where the discarded one would
    have been."""
    services = make_services(store=MemoryStore(), duplicate_policy="keep")
    client = testing.TestClient(create_app(services))
    data = instance()
    assert post(client, body(data)).status_code == 200
    changed = dcmread(DicomBytesIO(data))
    first_study, first_series = changed.StudyInstanceUID, changed.SeriesInstanceUID
    changed.StudyInstanceUID, changed.SeriesInstanceUID = generate_uid(), generate_uid()
    out = DicomBytesIO()
    changed.save_as(out, enforce_file_format=True)
    for payload in (body(out.getvalue()), body(instance(), out.getvalue())):  # alone, batched
        result = post(client, payload)
        assert result.status_code == 200, result.text
        [url] = [item["00081190"]["Value"][0] for item in items(result, "00081199")
                 if item["00081155"]["Value"] == [changed.SOPInstanceUID]]
        assert url.endswith(f"/studies/{first_study}/series/{first_series}/instances/"
                            f"{changed.SOPInstanceUID}")
        assert client.simulate_get(url.split("falconframework.org", 1)[-1] + "/metadata",
                                   headers={"Accept": JSON}).status_code == 200


class FailingStore(MemoryStore):
    """A store whose writes fail (a full disk, an S3 outage)."""

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        raise StorageError("the store is unavailable")


def test_store_failure_is_out_of_resources(make_services: Callable[..., Services]) -> None:
    """The direct path (no intake): the store's failure fails the parts."""
    services = make_services(store=FailingStore(), intake_object_bytes=0)
    client = testing.TestClient(create_app(services))
    result = post(client, body(instance(), instance()))
    assert result.status_code == 409
    assert [reason for _, reason in failures(result)] == [OUT_OF_RESOURCES] * 2
    assert writer.counts(services.index.connection())["instance"] == 0


def test_body_broken_after_a_stored_part(client: testing.TestClient,
                                         services: Services) -> None:
    good = instance()
    payload = body(good, instance())[:-500]  # the second part never ends
    result = post(client, payload)
    assert result.status_code == 202
    assert referenced(result) == [uids(good).SOPInstanceUID]
    assert failures(result) == [(None, CANNOT_UNDERSTAND)]
    assert stored(services) == {uids(good).SOPInstanceUID}


@pytest.mark.parametrize("inside", [b"XYZ", b"--"], ids=["delimiter", "close-delimiter"])
def test_a_boundary_inside_a_part_stores_nothing_cut_off(client: testing.TestClient,
                                                         services: Services,
                                                         inside: bytes) -> None:
    """The boundary inside an instance's data, just before its Pixel Data, followed by
    more of it: what precedes reads as a whole instance without pixels.  It is not
    stored as such, nor is a whole instance after it dropped under a 200 (RFC 2046
    5.1.1; PS3.18 10.5.3: 200 only when every instance was stored)."""
    cut, after = instance(), instance()
    pixels = cut.index(b"\xe0\x7f\x10\x00")
    delimiter = b"\r\n--" + BOUNDARY.encode()
    payload = (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
               + cut[:pixels] + delimiter + inside + cut[pixels:] + delimiter
               + b"\r\nContent-Type: application/dicom\r\n\r\n" + after + delimiter
               + b"--\r\n")
    result = post(client, payload)
    assert result.status_code == 400, result.text
    assert stored(services) == set()


# --- malformed requests: 4xx with a reason, nothing stored ---------------------------------

@pytest.mark.parametrize("payload, content_type, status", [
    (body(instance())[:-300], QUOTED, 400),  # no closing boundary
    (body(instance(), boundary="another"), QUOTED, 400),  # boundary never appears
    (b"", QUOTED, 400),  # no parts at all
    (b"--" + BOUNDARY.encode() + b"--\r\n", QUOTED, 400),  # only the close delimiter
    (b"--" + BOUNDARY.encode() + b"\r\nbroken header\r\n\r\nx\r\n--" + BOUNDARY.encode()
     + b"--", QUOTED, 400),
    (body(instance()), 'multipart/related; type="application/dicom"', 400),  # no boundary
    (body(instance()), "application/json", 415),
    (body(instance()), f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
     415),
    (body(instance()), "", 415),
], ids=["unterminated", "wrong-boundary", "empty", "close-only", "bad-part-header",
        "no-boundary", "json", "dicom-json-parts", "no-content-type"])
def test_malformed_requests(client: testing.TestClient, services: Services, payload: bytes,
                            content_type: str, status: int) -> None:
    result = post(client, payload, content_type)
    assert result.status_code == status, result.text
    assert result.json["description"]
    assert stored(services) == set()


def test_malformed_study_uid_in_path(client: testing.TestClient, services: Services) -> None:
    result = post(client, body(instance()), path="/studies/abc")
    assert result.status_code == 400
    assert stored(services) == set()


def test_xml_only_accept_is_406(client: testing.TestClient, services: Services) -> None:
    result = post(client, body(instance()), headers={"Accept": "application/dicom+xml"})
    assert result.status_code == 406
    assert stored(services) == set()


@pytest.mark.parametrize("accept", [
    "APPLICATION/DICOM+JSON", "application/dicom+json,", "application/dicom+json, ,*/*",
    'application/dicom+json; foo="a,b"'])
def test_every_spelling_of_dicom_json_is_acceptable(client: testing.TestClient,
                                                    services: Services, accept: str) -> None:
    """RFC 9110: type and subtype are case-insensitive (8.3.1), empty list elements are
    ignored (5.6.1.2), a quoted parameter value may hold a comma (5.6.6)."""
    data = instance()
    result = post(client, body(data), headers={"Accept": accept})
    assert result.status_code == 200, result.text
    assert result.headers["Content-Type"] == JSON
    assert stored(services) == {uids(data).SOPInstanceUID}


def test_remote_without_credentials_stores_nothing(client: testing.TestClient,
                                                   services: Services) -> None:
    result = post(client, body(instance()), remote_addr="10.9.8.7", protocol="https")
    assert result.status_code == 401
    assert stored(services) == set()


def test_many_parts_in_one_request(client: testing.TestClient, services: Services) -> None:
    objects = [instance() for _ in range(25)]
    result = post(client, body(*objects))
    assert result.status_code == 200
    assert len(stored(services)) == 25


# --- sizes: PACS_MAX_OBJECT_BYTES per part, PACS_MAX_REQUEST_BYTES per body ---------------

def deflate_bomb(zeros: int) -> bytes:
    """A deflated CT whose pixel data is ``zeros`` zero bytes: a few KB as sent."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.PixelData = zeros // 2048, 1024, b"\0" * zeros
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def limited_client(make_services: Callable[..., Services], memory_store: MemoryStore,
                   **limits: int) -> tuple[testing.TestClient, Services]:
    services = make_services(store=memory_store, **limits)
    return testing.TestClient(create_app(services)), services


def test_a_part_over_the_object_limit_fails_alone(make_services: Callable[..., Services],
                                                  memory_store: MemoryStore) -> None:
    small = instance()
    large = instance(PixelData=b"\0" * 200_000, Rows=100, Columns=1000)
    client, services = limited_client(make_services, memory_store,
                                      max_object_bytes=len(large) - 1)
    result = post(client, body(small, large, small.replace(b"\0", b"\0")))
    assert result.status_code == 202, result.text
    assert referenced(result) == [uids(small).SOPInstanceUID] * 2
    assert failures(result) == [(uids(large).SOPInstanceUID, OUT_OF_RESOURCES)]
    assert stored(services) == {uids(small).SOPInstanceUID}
    # Alone, as a single application/dicom body: the same failure (409, nothing stored).
    alone = post(client, large, "application/dicom")
    assert alone.status_code == 409
    assert failures(alone) == [(uids(large).SOPInstanceUID, OUT_OF_RESOURCES)]


def test_a_part_over_the_limit_whose_uids_are_unknown_fails_the_request(
        make_services: Callable[..., Services], memory_store: MemoryStore) -> None:
    client, services = limited_client(make_services, memory_store, max_object_bytes=10_000)
    for payload, content_type in ((body(b"\1" * 20_000, instance()), QUOTED),
                                  (b"\1" * 20_000, "application/dicom")):
        result = post(client, payload, content_type)
        assert result.status_code == 413, result.text
        assert result.json["description"]
    assert stored(services) == set()


@pytest.mark.parametrize("analysers", [0, 1], ids=["in-process", "helper"])
def test_a_deflate_bomb_part_is_out_of_resources(make_services: Callable[..., Services],
                                                 memory_store: MemoryStore,
                                                 analysers: int) -> None:
    bomb = deflate_bomb(16 << 20)
    assert len(bomb) < 100_000
    client, services = limited_client(make_services, memory_store,
                                      max_object_bytes=4 << 20, web_analysers=analysers)
    good = instance()
    result = post(client, body(bomb, good))
    assert result.status_code == 202, result.text
    assert failures(result) == [(uids(bomb).SOPInstanceUID, OUT_OF_RESOURCES)]
    assert stored(services) == {uids(good).SOPInstanceUID}


def test_a_body_over_the_request_limit_is_413(make_services: Callable[..., Services],
                                              memory_store: MemoryStore) -> None:
    parts = [instance() for _ in range(60)]  # 2.3 MB: read in three 1 MiB reads
    payload = body(*parts)
    client, services = limited_client(make_services, memory_store,
                                      max_request_bytes=len(payload) - 1)
    # By its Content-Length: refused before anything is read.
    assert post(client, payload).status_code == 413
    assert post(client, parts[0], "application/dicom",
                headers={"Content-Length": str(len(payload))}).status_code == 413
    assert stored(services) == set()
    # Chunked (no Content-Length): counted as read; the parts stored before the limit
    # are reported, the rest is one failure.
    result = post(client, payload, extras={"CONTENT_LENGTH": ""})
    assert result.status_code == 202, result.text
    done = referenced(result)
    assert 0 < len(done) < 60 and set(done) == stored(services)
    assert failures(result) == [(None, OUT_OF_RESOURCES)]
    # Chunked and over the limit before any part was stored: 413.
    small, _ = limited_client(make_services, memory_store, max_request_bytes=1000)
    assert post(small, body(instance()), extras={"CONTENT_LENGTH": ""}).status_code == 413


def test_a_failure_of_ours_after_a_stored_part_answers_what_was_stored(
        client: testing.TestClient, services: Services,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The body's reading fails for a reason of the node's (its temporary folder gone,
    no thread) after a part was stored: 202 naming the stored instance, the break a
    processing failure (0110) (it was a 500 that named none of what was stored)."""
    good = instance()
    reading = stow_module.parts_of

    def failing(*args: object, **kwargs: object) -> Iterator[object]:
        parts = reading(*args, **kwargs)  # type: ignore[arg-type]
        yield next(parts)
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(stow_module, "parts_of", failing)
    result = post(client, body(good, instance()))
    assert result.status_code == 202, result.text
    assert referenced(result) == [uids(good).SOPInstanceUID]
    assert failures(result) == [(None, 0x0110)]
    assert stored(services) == {uids(good).SOPInstanceUID}


def test_a_body_with_a_content_encoding_is_415(client: testing.TestClient,
                                               services: Services) -> None:
    """A gzip-encoded body was read as it came: 400, a multipart body ending inside
    its preamble; a content coding is not accepted (RFC 9110 15.5.16)."""
    result = client.simulate_post("/studies", body=body(instance()), headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Content-Encoding": "gzip", "Accept": "application/dicom+json"})
    assert result.status_code == 415, result.text
    assert stored(services) == set()
