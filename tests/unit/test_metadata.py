"""The DICOM JSON metadata built at ingest (pacs.core.metadata) and WADO-RS Accept parsing."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.uid import DeflatedExplicitVRLittleEndian

from adapters.dicomweb import accept, wado
from adapters.dicomweb.accept import MediaRange
from adapters.dicomweb.wado import FramePlan, frame_plan, instance_choices, instance_syntax
from pacs.core import jsonmodel, metadata
from pacs.core.dataset import read_part10
from pacs.core.frames import Layout
from pacs.core.index import reads
from pacs.core.query.model import InstanceRef
from pacs.core.services import drain
from tests.conftest import sample
from tests.factory import grey_image, make_instance, part10

EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"


def prepared(path: Path) -> tuple[dict[str, Any], metadata.Prepared, bytes]:
    data = path.read_bytes()
    result = metadata.prepare(read_part10(data), data)
    assert result is not None
    return orjson.loads(result.json), result, data


def reference(path: Path) -> dict[str, Any]:
    """pydicom's own encoding, BulkDataURIs replaced by a marker."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.to_json_dict(bulk_data_threshold=1 << 30,  # type: ignore[no-any-return]
                           bulk_data_element_handler=lambda _e: "BULK")


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "JPEG2000.dcm",
                                  "MR_small_implicit.dcm", "rtplan.dcm", "emri_small.dcm"])
def test_same_values_as_pydicom(name: str) -> None:
    ours, _, _ = prepared(sample(name))
    for key, element in reference(sample(name)).items():
        if key == "00080005":
            continue  # ours says ISO_IR 192: the JSON text is Unicode
        if "BulkDataURI" in ours[key]:  # over our threshold; pydicom's was disabled
            assert len(base64.b64decode(element["InlineBinary"])) > metadata.BULK_DATA_THRESHOLD
            continue
        assert ours[key] == element, key


# The chrSQEncoding files hold only a sequence (no SOP Instance UID): not instances.
@pytest.mark.parametrize("path", [p for p in get_charset_files("*.dcm")
                                  if "SQEncoding" not in Path(p).name],
                         ids=lambda p: Path(p).name)
def test_character_sets_decode_like_pydicom(path: str) -> None:
    ours, _, _ = prepared(Path(path))
    theirs = reference(Path(path))
    assert ours["00100010"] == theirs["00100010"]
    assert ours["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}  # the JSON is Unicode


def test_pixel_data_is_located_and_referenced() -> None:
    for name, length in (("CT_small.dcm", 128 * 128 * 2), ("SC_rgb_rle_2frame.dcm", -1),
                         ("MR_small_implicit.dcm", 64 * 64 * 2)):
        ours, result, data = prepared(sample(name))
        ds = pydicom.dcmread(sample(name))
        assert result.pixel_length == length
        assert result.pixel_offset is not None
        if length > 0:
            assert data[result.pixel_offset:result.pixel_offset + length] == ds.PixelData
        else:  # encapsulated: the value starts with the Basic Offset Table item
            assert data[result.pixel_offset:result.pixel_offset + 4] == b"\xfe\xff\x00\xe0"
        uri = ours["7FE00010"]["BulkDataURI"]
        assert uri == (f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                       f"/instances/{ds.SOPInstanceUID}/bulkdata/7FE00010")
        assert ours["00083002"]["Value"] == [ds.file_meta.TransferSyntaxUID]


def test_deflated_images_list_pixel_data_without_a_position() -> None:
    ours, result, _ = prepared(sample("image_dfl.dcm"))
    assert result.pixel_offset is None
    assert ours["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")


def test_empty_and_multiple_values() -> None:
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.StudyDescription = ""
    ds.ReferencedStudySequence = []
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    ours = orjson.loads(metadata.prepare(read_part10(data), data).json)  # type: ignore[union-attr]
    assert ours["00080008"]["Value"] == ["ORIGINAL", None, "AXIAL"]  # PS3.18 F.2.5
    assert ours["00081030"] == {"vr": "LO"}
    assert ours["00081110"] == {"vr": "SQ"}


def test_prepare_never_fails_an_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(metadata, "encode", broken)
    data = sample("CT_small.dcm").read_bytes()
    assert metadata.prepare(read_part10(data), data) is None


def test_pydicoms_encoding_names_bulk_data_in_sequence_items_by_their_path() -> None:
    """The fallback encoder (pydicom's) gives an element inside a sequence item the
    path WADO-RS's bulk data resource reads, as the project's encoder does."""
    icon = pydicom.Dataset()
    icon.add_new(0x7FE00010, "OB", bytes(2000))
    header = pydicom.Dataset()
    header.IconImageSequence = [icon]
    header.add_new(0x00420011, "OB", bytes(2000))  # Encapsulated Document
    text = metadata._pydicom_json(header, "1.2", "1.3", "1.4")
    found = orjson.loads(text)
    base = "studies/1.2/series/1.3/instances/1.4/bulkdata"
    assert found["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"] == (
        f"{base}/00880200/1/7FE00010")
    assert found["00420011"]["BulkDataURI"] == f"{base}/00420011"


def test_pydicoms_encoding_keeps_the_inline_value_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback encoder counts each raw value against INLINE_VALUE_BYTES before
    pydicom converts it (PS3.18 10.4.3.3.2): past it, a text or number value becomes
    a BulkDataURI and a value no URI may replace is left out, as with the project's
    encoder, instead of every value inline."""
    monkeypatch.setattr(jsonmodel, "INLINE_VALUE_BYTES", 4096)
    item = pydicom.Dataset()
    item.add_new(0x00400280, "ST", "x" * 3000)  # Comments on the Performed Procedure Step
    header = pydicom.Dataset()
    header.add_new(0x00080008, "CS", "\\".join(["A"] * 1000))  # Image Type: 18 KB
    header.PatientID = "P1"
    header.add_new(0x00204000, "LT", "y" * 3000)  # Image Comments
    header.RequestAttributesSequence = [item]  # its ST now past the budget
    text = metadata._pydicom_json(read_back(header), "1.2", "1.3", "1.4")
    found = orjson.loads(text)
    base = "studies/1.2/series/1.3/instances/1.4/bulkdata"
    assert "00080008" not in found  # CS: no BulkDataURI may replace it
    assert found["00100020"]["Value"] == ["P1"]
    assert found["00204000"]["Value"] == ["y" * 3000]
    assert found["00400275"]["Value"][0]["00400280"] == {
        "vr": "ST", "BulkDataURI": f"{base}/00400275/1/00400280"}


def read_back(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` written and read again: its elements raw, as a stored header's are."""
    out = io.BytesIO()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(out, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(out.getvalue()), stop_before_pixels=True)


def test_bulk_data_uris_become_absolute_and_values_are_untouched() -> None:
    text = orjson.dumps([{"00100010": {"vr": "PN", "Value": [
        {"Alphabetic": '"BulkDataURI":"x'}]}, "7FE00010": {"vr": "OW", "BulkDataURI": "studies/1"}}
    ]).decode()
    out = orjson.loads(metadata.absolute_bulk_data_uris(text, "http://h:1/dicom-web/"))
    assert out[0]["7FE00010"]["BulkDataURI"] == "http://h:1/dicom-web/studies/1"
    assert out[0]["00100010"]["Value"][0]["Alphabetic"] == '"BulkDataURI":"x'


# --- Accept headers ----------------------------------------------------------------------

@pytest.mark.parametrize(("header", "kind", "part", "syntax"), [
    ('multipart/related; type="application/dicom"', "multipart/related", "application/dicom",
     None),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*",
     "multipart/related", "application/octet-stream", "*"),
    ('multipart/related; type="application/octet-stream"; transfer-syntax="*"',
     "multipart/related", "application/octet-stream", "*"),
    (f'multipart/related; type="application/octet-stream; transfer-syntax={EXPLICIT}"',
     "multipart/related", "application/octet-stream", EXPLICIT),
    ("", "*/*", "*/*", None),
    (None, "*/*", "*/*", None),
])
def test_accept_spellings(header: str | None, kind: str, part: str,
                          syntax: str | None) -> None:
    [best] = accept.parse(header)
    assert (best.kind, best.part_type, best.transfer_syntax) == (kind, part, syntax)


def test_the_accept_parameter_replaces_the_header_with_its_plus_signs() -> None:
    """``accept=multipart/related; type="application/dicom+xml"`` unencoded: form
    decoding made the ``+`` a space, which a media type name cannot hold."""
    req = falcon.testing.create_req(
        query_string='accept=multipart/related;+type="application/dicom+xml"',
        headers={"Accept": "image/png"})
    [best] = accept.from_request(req)
    assert (best.kind, best.part_type) == ("multipart/related", "application/dicom+xml")


def test_accept_weights() -> None:
    ranges = accept.parse("image/png;q=0.5, image/jpeg, image/gif;q=0")
    assert [r.kind for r in ranges] == ["image/jpeg", "image/png"]


@pytest.mark.parametrize(("header", "stored", "expected"), [
    ('multipart/related; type="application/dicom"', EXPLICIT, EXPLICIT),
    ('multipart/related; type="application/dicom"', "1.2.840.10008.1.2", EXPLICIT),
    ('multipart/related; type="application/dicom"; transfer-syntax=*', RLE, RLE),
    ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
     EXPLICIT, None),
    ("application/dicom+json", EXPLICIT, None),
    ("*/*", RLE, EXPLICIT),
])
def test_instance_syntax(header: str, stored: str, expected: str | None) -> None:
    assert instance_syntax(accept.parse(header), stored) == expected


def test_a_study_plan_chooses_once_per_stored_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice scans every alternative of the Accept header (a client may send
    thousands): a study's plan makes it once per stored syntax, not once per instance."""
    calls: list[str] = []

    def counted(ranges: Sequence[MediaRange], stored: str) -> tuple[wado.Choice, ...]:
        calls.append(stored)
        return instance_choices(ranges, stored)

    monkeypatch.setattr(wado, "instance_choices", counted)
    refs = [InstanceRef("1.2", "1.2.3", f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2",
                        RLE if n % 2 else EXPLICIT, f"k{n}", 10) for n in range(100)]
    ranges = accept.parse('multipart/related; type="application/dicom"; '
                          "transfer-syntax=*, " * 50 + "*/*")
    plan = wado.Instances._plan(refs, ranges)
    assert [choices[0].syntax for _, choices in plan] == [ref.transfer_syntax for ref in refs]
    assert sorted(calls) == sorted({RLE, EXPLICIT})


def _layout(syntax: str, encapsulated: bool) -> Layout:
    return Layout(syntax, 8, 8, 1, 16, 1, "MONOCHROME2", 100,
                  metadata.UNDEFINED_LENGTH if encapsulated else 128)


@pytest.mark.parametrize(("header", "stored", "encapsulated", "plan"), [
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", RLE, True,
     FramePlan(True, "application/octet-stream")),
    ('multipart/related; type="application/octet-stream"', RLE, True,
     FramePlan(False, "application/octet-stream")),
    ('multipart/related; type="*/*"', EXPLICIT, False,
     FramePlan(False, "application/octet-stream")),
    ('multipart/related; type="image/dicom-rle"', RLE, True, FramePlan(True, "image/dicom-rle")),
    ('multipart/related; type="image/x-dicom-rle"', RLE, True,
     FramePlan(True, "image/dicom-rle")),
    ('multipart/related; type="image/jp2"', RLE, True, None),
    ("application/octet-stream", EXPLICIT, False,
     FramePlan(False, "application/octet-stream", multipart=False)),
])
def test_frame_plans(header: str, stored: str, encapsulated: bool,
                     plan: FramePlan | None) -> None:
    assert frame_plan(accept.parse(header), _layout(stored, encapsulated)) == plan


def test_ingest_analysis_prepares_the_same_metadata_as_a_fresh_header() -> None:
    """analyse() prepares the WADO metadata before it extracts the index values, whose
    conversions would otherwise change how some elements are encoded."""
    from pathlib import Path

    import pydicom.data

    from pacs.core import metadata
    from pacs.core.dataset import read_part10
    from pacs.core.errors import PacsError
    from pacs.core.ingest import analyse

    root = Path(pydicom.data.__file__).parent
    compared = 0
    for path in sorted((root / "test_files").rglob("*.dcm")):
        data = path.read_bytes()
        try:
            expected = metadata.prepare(read_part10(data), data)
            analysed = analyse(data).metadata
        except PacsError:
            continue  # not an object ingest accepts
        assert analysed == expected, path.name
        compared += 1
    assert compared > 50


# --- one encoder, whichever way pydicom left an element ------------------------------------

def _with_raw_values(values: dict[int, tuple[str, bytes]]) -> bytes:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    ds = pydicom.dcmread(sample("CT_small.dcm"))
    for tag, (vr, value) in values.items():
        value += b" " * (len(value) % 2)
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


RAW_VALUES = {
    0x00101030: ("DS", b"70"), 0x00101020: ("DS", b" 1.50\\2e1"),
    0x00200013: ("IS", b"+7"), 0x00200012: ("IS", b"7.0"), 0x00200011: ("IS", b"7.5"),
    0x00100010: ("PN", b"=Yamada^Tarou"), 0x00081070: ("PN", b"A^B\\\\C^D"),
    0x00080008: ("CS", b"ORIGINAL\\\\AXIAL"),
}


def test_elements_pydicom_converted_encode_as_raw_ones() -> None:
    """An element pydicom has converted (read during ingest, or decoded for us) goes
    through the same encoder as a raw one: the JSON does not depend on who read it."""
    from pacs.core import jsonmodel

    data = _with_raw_values(RAW_VALUES)
    raw = orjson.loads(metadata.prepare(read_part10(data), data).json)  # type: ignore[union-attr]
    instance = read_part10(data)
    for tag in RAW_VALUES:
        instance.header[tag]  # pydicom converts the element in place
    converted = orjson.loads(metadata.prepare(instance, data).json)  # type: ignore[union-attr]
    for tag, (vr, value) in RAW_VALUES.items():
        key = f"{tag:08X}"
        assert orjson.dumps(raw[key]) == orjson.dumps(converted[key]), key
        assert raw[key] == jsonmodel.element(vr, value.decode()), key
    assert raw["00101030"] == {"vr": "DS", "Value": [70]}
    assert raw["00101020"] == {"vr": "DS", "Value": [1.5, 20]}
    assert raw["00200012"] == {"vr": "IS", "Value": [7]}
    assert raw["00200011"] == {"vr": "IS"}  # not an integer: no number to send
    assert raw["00100010"] == {"vr": "PN", "Value": [{"Ideographic": "Yamada^Tarou"}]}
    assert raw["00081070"]["Value"] == [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C^D"}]


def test_metadata_of_an_older_encoding_is_rebuilt_after_migration(services: Any) -> None:
    """The migration to the one encoder drops the stored rows; each is rebuilt from its
    object on first request."""
    from pacs.core.index.migrations import MIGRATIONS, migrate

    data = _with_raw_values({0x00101030: ("DS", b"70")})
    services.ingest.store_bytes(data)
    assert drain(services) == 1  # the mover keeps its metadata
    study = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    older = '{"00101030":{"vr":"DS","Value":[70.0]}}'
    with services.index.write() as conn:
        conn.execute("UPDATE instance_metadata SET json = ?", (older,))
        conn.pragma("user_version", [m.__name__ for m in MIGRATIONS].index(
            "_metadata_encoding"))
    assert migrate(services.index.connection()) == len(MIGRATIONS)
    count = services.index.connection().execute("SELECT count(*) FROM instance_metadata")
    assert count.fetchone() == (0,)
    [doc] = metadata.documents(services.index, services.store, study)
    assert orjson.loads(doc.json)["00101030"] == {"vr": "DS", "Value": [70]}
    assert '"Value":[70]' in doc.json


def test_the_mover_keeps_the_metadata_of_what_ingest_acknowledged_through_the_intake(
        services: Any) -> None:
    """A small object's metadata is not encoded on the acknowledgement's path: it is
    built from the intake copy when requested before the mover moves it, and by the
    mover from the bytes it moves otherwise - the same document either way."""
    from pydicom.uid import generate_uid

    from tests.factory import make_instance

    study, requested, moved = generate_uid(), generate_uid(), generate_uid()
    objects = {sop: make_instance(StudyInstanceUID=study, SOPInstanceUID=sop,
                                  PatientName="Yamada^Tarou", InstanceNumber=number)
               for number, sop in enumerate((requested, moved), 1)}
    for data in objects.values():
        services.ingest.store_bytes(data)
    conn = services.index.connection()
    keys = metadata.instance_keys(services.index, study)
    assert [row[7] for row in reads.metadata_rows(conn, keys)] == [None, None]

    [doc] = metadata.documents(services.index, services.store, study, sop_uid=requested)
    data = objects[requested]
    assert doc.json == metadata.prepare(read_part10(data), data).json  # type: ignore[union-attr]

    assert drain(services) == 2
    rows = {row[1]: row for row in reads.metadata_rows(conn, keys)}
    for sop, data in objects.items():
        expected = metadata.prepare(read_part10(data), data)
        assert expected is not None
        assert rows[sop][5:] == (expected.pixel_offset, expected.pixel_length, expected.json)


# --- values past INLINE_VALUE_BYTES ---------------------------------------------------

def with_elements(*elements: tuple[int, bytes, bytes]) -> bytes:
    """A CT object with explicit VR ``(tag, VR, value)`` elements of group 0008 after
    Modality (0008,0060) added, in tag order."""
    data = make_instance()
    at = data.index(b"\x10\x00\x10\x00PN")  # Patient's Name (0010,0010)
    encoded = b""
    for tag, vr, value in elements:
        if vr in (b"UC", b"UT"):
            encoded += struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value))
        else:
            encoded += struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value))
        encoded += value
    return data[:at] + encoded + data[at:]


def test_a_value_of_many_empty_values_is_referenced_not_encoded() -> None:
    """A UC value of 24 MiB of backslashes is 24 million empty values: as Python and
    JSON values that was 1.3 GB for 64 MiB.  Past INLINE_VALUE_BYTES it is a
    BulkDataURI (PS3.18 10.4.3.3.2), and encoding it holds next to nothing."""
    data = with_elements((0x00080119, b"UC", b"\\" * (24 << 20)))
    instance = read_part10(data)
    tracemalloc.start()
    try:
        result = metadata.prepare(instance, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result is not None
    document = orjson.loads(result.json)
    assert document["00080119"] == {
        "vr": "UC", "BulkDataURI": f"studies/{instance.study_uid}/series/"
        f"{instance.series_uid}/instances/{instance.sop_instance_uid}/bulkdata/00080119"}
    assert peak < 4 << 20, peak


def test_values_past_the_budget_are_referenced_or_left_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is the instance's: values written before it is spent stay inline;
    after, a VR PS3.18 10.4.3.3.2 lets be referenced gets a BulkDataURI, any other
    (a code string here) is left out."""
    monkeypatch.setattr(jsonmodel, "INLINE_VALUE_BYTES", 20_000)
    cost = jsonmodel.VALUE_COST  # per value, beside the bytes
    data = with_elements((0x00080070, b"LO", b"ON\\" * 700),  # 2100 + 701 values: within
                         (0x00080119, b"UC", b"A\\" * 1000),  # 2000 + 1001: referenced
                         (0x0008011A, b"CS", b"X\\" * 500))  # 1000 + 501: left out
    assert 2100 + 701 * cost < 20_000 - 500 < 2100 + 701 * cost + 1001 * cost
    document = orjson.loads(metadata.prepare(read_part10(data), data).json)
    assert len(document["00080070"]["Value"]) == 701
    assert document["00080119"]["BulkDataURI"].endswith("/bulkdata/00080119")
    assert "0008011A" not in document
    assert document["00100010"]["Value"] == [{"Alphabetic": "DOE^JOHN"}]  # small ones go on


def test_a_deflated_image_whose_bits_allocated_is_no_number_keeps_its_study_readable(
        make_services: Any) -> None:
    """Bits Allocated sent as two values, in a deflated image ingest took: its metadata
    failed (TypeError) each time the study's metadata was asked for."""
    services = make_services()
    study, series = "1.2.3.5.1", "1.2.3.5.2"
    bad, good = grey_image(8, 8), grey_image(8, 8)
    for ds, sop in ((bad, "1.2.3.5.3"), (good, "1.2.3.5.4")):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    bad.BitsAllocated = [8, 8]
    services.ingest.store_bytes(part10(good))
    services.ingest.store_bytes(part10(bad, DeflatedExplicitVRLittleEndian))
    drain(services)
    documents = list(metadata.documents(services.index, services.store, study))
    assert len(documents) == 2
