"""Header reading, UID validation and the completeness check."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs.core import dataset, metadata
from pacs.core.attributes import Level
from pacs.core.dataset import (
    Elements,
    Instance,
    check_complete,
    extract,
    read_part10,
    valid_uid,
)
from pacs.core.errors import (
    InvalidUID,
    MediaDirectory,
    ObjectTooLarge,
    UIDMismatch,
    UnreadableData,
)
from pacs.core.index import reads
from pacs.core.ingest import Received
from pacs.core.services import Services
from tests.conftest import sample
from tests.factory import make_instance, relabelled


@pytest.mark.parametrize("uid, ok", [
    ("1.2.840.10008.1.2", True),
    ("0.1", True),
    ("1." + "1" * 62, True),
    ("1." + "1" * 63, False),  # 65 characters (PS3.5 9.1: at most 64)
    ("1.02.3", False),  # leading zero in a component
    ("1.2.abc", False),
    ("../../etc/passwd", False),
    ("", False),
    ("1..2", False),
    ("1.2.", False),
    ("1.2.3\n", False),  # a regular expression's "$" matches before a final newline
])
def test_uid_validation(uid: str, ok: bool) -> None:
    assert valid_uid(uid) is ok


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm",
    "image_dfl.dcm", "emri_small_jpeg_2k_lossless.dcm", "rtplan.dcm", "test-SR.dcm",
])
def test_whole_objects_read(name: str) -> None:
    data = sample(name).read_bytes()
    instance = read_part10(data)
    assert valid_uid(instance.sop_instance_uid)
    assert data[instance.dataset_offset:instance.dataset_offset + 2] != b""


@pytest.mark.parametrize("name, cut", [
    (name, cut)
    for name in ("CT_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm")
    for cut in (1, 3, 100, 1000)
] + [
    # The deflated sample ends with 8 bytes after the deflate stream: cut past them.
    ("image_dfl.dcm", 100), ("image_dfl.dcm", 1000),
])
def test_truncated_objects_are_unreadable(name: str, cut: int) -> None:
    data = sample(name).read_bytes()
    with pytest.raises(UnreadableData):
        read_part10(data[:-cut])


def test_not_part10_is_unreadable() -> None:
    with pytest.raises(UnreadableData, match="Part 10"):
        read_part10(b"\0" * 500)
    with pytest.raises(UnreadableData):
        read_part10(b"\0" * 128 + b"DICM" + b"\xff" * 300)


def test_invalid_sop_instance_uid_is_refused() -> None:
    data = sample("CT_small.dcm").read_bytes()
    original = read_part10(data).sop_instance_uid.encode()
    forged = original[:-4] + b".abc"
    with pytest.raises(InvalidUID, match="SOPInstanceUID"):
        read_part10(data.replace(original, forged))


def test_walker_accepts_nested_undefined_length_sequences() -> None:
    # Implicit VR LE: (0008,1140) SQ, undefined length, one item of undefined length
    # holding (0008,1150) UI "1.2", then item and sequence delimiters.
    element = bytes.fromhex("08004011ffffffff") + bytes.fromhex("feff00e0ffffffff") + \
        bytes.fromhex("0800501104000000") + b"1.2\0" + bytes.fromhex("feff0de000000000") + \
        bytes.fromhex("feffdde000000000")
    check_complete(memoryview(element), "1.2.840.10008.1.2")
    with pytest.raises(UnreadableData):
        check_complete(memoryview(element[:-8]), "1.2.840.10008.1.2")


def _all_test_files() -> list[str]:
    """pydicom's bundled test files (the local ones: nothing is downloaded)."""
    from pathlib import Path

    import pydicom.data

    root = Path(pydicom.data.__file__).parent
    return sorted(str(path) for folder in ("test_files", "charset_files")
                  for path in (root / folder).rglob("*.dcm"))


def test_raw_text_equals_pydicom_conversion() -> None:
    """The fast path from raw bytes indexes exactly what pydicom's conversion gives,
    for every text attribute of the table in every pydicom test file that reads."""
    import pydicom

    from pacs.core.attributes import ATTRIBUTES
    from pacs.core.dataset import _UNDECODED, _raw_text, _simple_codec, _text

    compared = 0
    for path in _all_test_files():
        try:
            fast = pydicom.dcmread(path, stop_before_pixels=True)
            slow = pydicom.dcmread(path, stop_before_pixels=True)
            codec = _simple_codec(fast)
        except Exception:  # noqa: BLE001 - files pydicom cannot read are not our concern
            continue
        for attribute in ATTRIBUTES:
            if attribute.vr == "SQ" or attribute.tag not in fast:
                continue
            text = _raw_text(fast, attribute, codec)
            if text is _UNDECODED:
                continue
            try:
                expected = _text(slow[attribute.tag].value)
            except Exception:  # noqa: BLE001 - a value pydicom cannot convert is not compared
                continue
            assert text == expected, (path, attribute.keyword)
            compared += 1
    assert compared > 500  # the fast path is actually taken


@pytest.mark.parametrize("charset, encoding", [
    (None, "latin_1"), ("ISO_IR 100", "latin_1"), ("ISO_IR 192", "utf_8")])
@pytest.mark.parametrize("keyword, raw", [
    ("PatientName", "Doe^John="), ("PatientName", "Doe^John^^^"),
    ("PatientName", "A^B=\\C^D=="), ("PatientName", " Müller^Jörg "),
    ("PatientID", " ID\\ 2 "), ("StudyDescription", "Thorax\\"),
    ("InstitutionName", "Hôpital\0"), ("PatientName", "\\"),
])
def test_raw_text_edge_cases(charset: str | None, encoding: str, keyword: str,
                             raw: str) -> None:
    """Values written by hand (padding, separators, empty groups) index as pydicom reads them."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pacs.core.attributes import BY_KEYWORD
    from pacs.core.dataset import _UNDECODED, _raw_text, _simple_codec, _text

    attribute = BY_KEYWORD[keyword]
    value = raw.encode(encoding)
    if len(value) % 2:
        value += b" "
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.add_new(attribute.tag, attribute.vr, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    fast = pydicom.dcmread(io.BytesIO(out.getvalue()))
    slow = pydicom.dcmread(io.BytesIO(out.getvalue()))
    text = _raw_text(fast, attribute, _simple_codec(fast))
    assert text is not _UNDECODED
    assert text == _text(slow[attribute.tag].value)


@pytest.mark.parametrize("little", [True, False])
@pytest.mark.parametrize("keyword, vr, value, raw_path", [
    ("InstanceNumber", "IS", b"05", True), ("InstanceNumber", "IS", b" 7 ", True),
    ("InstanceNumber", "IS", b"+3\\-4", True), ("InstanceNumber", "IS", b"12\0", True),
    ("InstanceNumber", "IS", b"1.0 ", False), ("InstanceNumber", "IS", b"abc ", False),
    ("InstanceNumber", "IS", b"1\\ ", False), ("InstanceNumber", "IS", b"  ", True),
    ("Rows", "US", (512).to_bytes(2, "little"), True),
    ("Rows", "US", b"\x00\x02\x00\x01", True), ("Rows", "US", b"\x01\x02\x03", False),
    ("Rows", "US", b"", False),
])
def test_integer_values_index_from_raw_bytes_as_pydicom_reads_them(
        little: bool, keyword: str, vr: str, value: bytes, raw_path: bool) -> None:
    """IS and US values are indexed from their bytes, with pydicom's text, in both byte
    orders; what pydicom would read otherwise ("1.0", garbage, odd lengths) is left to it."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

    from pacs.core.attributes import BY_KEYWORD
    from pacs.core.dataset import _UNDECODED, _raw_text, _text

    attribute = BY_KEYWORD[keyword]

    def header() -> Dataset:
        ds = Dataset()
        ds.set_original_encoding(False, little, None)
        ds[attribute.tag] = RawDataElement(BaseTag(attribute.tag), vr, len(value), value,
                                           0, False, little)
        return ds

    text = _raw_text(header(), attribute, "latin_1")
    assert (text is not _UNDECODED) == raw_path
    if raw_path:
        assert text == _text(header()[attribute.tag].value)


def test_values_with_code_extensions_are_left_to_pydicom() -> None:
    """An ESC in a value starts an ISO 2022 code extension (PS3.5 6.1.2.5.3): pydicom
    interprets it; the raw path must not index the escape bytes as text."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

    from pacs.core.attributes import BY_KEYWORD
    from pacs.core.dataset import _UNDECODED, _raw_text

    attribute = BY_KEYWORD["PatientName"]
    ds = Dataset()
    ds[attribute.tag] = RawDataElement(BaseTag(attribute.tag), "PN", 8, b"\x1b(BABC^D",
                                       0, False, True)
    assert _raw_text(ds, attribute, "latin_1") is _UNDECODED


def _pydicom_samples() -> list[Path]:
    """Every Part 10 object pydicom ships as test data (many encodings and oddities)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.read_bytes()[128:132] == b"DICM")


@pytest.mark.parametrize("path", _pydicom_samples(), ids=lambda p: p.name)
def test_walked_header_reads_as_pydicom(path: Path) -> None:
    """The header the completeness walk builds gives the index values and metadata that
    pydicom's own reader gives, for every object either of them reads."""
    data = path.read_bytes()
    try:
        instance = read_part10(data)
    except (UnreadableData, InvalidUID, MediaDirectory):
        return  # refused: nothing is indexed from it (the refusals are tested above)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Instance(elements=Elements.of(
            pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)),
            **instance.identity())
        for level in Level:
            # From the raw elements, as ingest reads them, and from pydicom's data set.
            assert extract(instance.elements, level) == extract(reference.header, level)
            assert extract(instance.header, level) == extract(reference.header, level)
        assert metadata.prepare(instance, data) == metadata.prepare(reference, data)


# --- how many elements a data set may hold -------------------------------------------

def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 7.1.2)."""
    if vr in (b"SQ", b"UN", b"OB", b"UT"):
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _item(content: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _private(count: int, group: int = 0x0009) -> bytes:
    """A private block of ``count`` two-character LO elements (after its creator)."""
    return _explicit((group << 16) | 0x0010, b"LO", b"AB") + b"".join(
        _explicit((group << 16) | (0x1000 + n), b"LO", b"AB") for n in range(count))


#: Where elements of groups 0009 to 000F go in :func:`make_instance`'s object, in tag
#: order: before Patient's Name (0010,0010); and those of groups up to 7FDF.
PATIENT_NAME, PIXEL_DATA = b"\x10\x00\x10\x00PN", b"\xe0\x7f\x10\x00OW"


def _with(elements: bytes, before: bytes = PATIENT_NAME) -> bytes:
    """A CT object with ``elements`` inserted before the element ``before``."""
    data = make_instance()
    at = data.index(before)
    return data[:at] + elements + data[at:]


def test_a_header_wider_than_any_real_one_is_not_kept_by_the_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A top level of a million tiny elements, kept by the walk until their count
    refused them, grew the node by hundreds of MB: past TOP_LEVEL_KEPT elements the
    walk keeps none and the header is pydicom's, read after a walk that only counts;
    its values are the same."""
    monkeypatch.setattr(dataset, "TOP_LEVEL_KEPT", 100)
    base = make_instance()
    at = base.index(PATIENT_NAME)
    data = base[:at] + _private(150) + base[at:]
    offset = dataset.dataset_offset(data)
    walker = dataset._Walker(memoryview(data)[offset:], implicit=False, little=True)
    assert walker.top_level() is None
    instance = read_part10(data)
    assert instance.elements.raw is None  # pydicom read it
    narrow = read_part10(base[:at] + _private(50) + base[at:])
    assert narrow.elements.raw is not None
    for level in Level:
        assert extract(instance.elements, level) == extract(narrow.elements, level)


def test_more_elements_than_allowed_are_refused_before_pydicom_reads_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """1.7 million two-character elements (16 MiB) took 5.6 s and 864 MB to read,
    1.6 GB with their metadata; they are counted as the walk reads their headers."""
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 200)
    monkeypatch.setattr(pydicom, "dcmread", None)  # never reached
    with pytest.raises(ObjectTooLarge, match="more than 200 elements"):
        read_part10(_with(_private(250)))


def _implicit(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element (PS3.5 7.1.3)."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


@pytest.mark.parametrize("implicit", [False, True])
def test_elements_inside_sequences_of_defined_length_count(
        monkeypatch: pytest.MonkeyPatch, implicit: bool) -> None:
    """Items of defined length were passed by their length, unread: their elements
    reached pydicom (and the metadata) uncounted, and nested without bound.  Here a
    Referenced Study Sequence (0008,1110) of defined length holds 5 items of 41
    elements: 211 headers with the sequence's own."""
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 200)
    if implicit:
        ds = pydicom.dcmread(io.BytesIO(make_instance()))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        base = out.getvalue()
        content = _implicit(0x00090010, b"AB") + b"".join(
            _implicit(0x00091000 + n, b"AB") for n in range(40))
        sequence = _implicit(0x00081110, _item(content) * 5)
        at = base.index(b"\x10\x00\x10\x00", dataset.dataset_offset(base))
    else:
        base = make_instance()
        sequence = _explicit(0x00081110, b"SQ", _item(_private(40)) * 5)
        at = base.index(PATIENT_NAME)
    data = base[:at] + sequence + base[at:]
    with pytest.raises(ObjectTooLarge, match="more than 200 elements"):
        read_part10(data)
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 400)
    assert len(read_part10(data).header.ReferencedStudySequence) == 5


def test_sequences_of_defined_length_nest_no_deeper_than_undefined_ones() -> None:
    """PS3.5 7.5: the same limit of 64 levels, whichever way the lengths are encoded."""
    def nested(depth: int) -> bytes:
        inner = b""
        for _ in range(depth):
            inner = _explicit(0x0040A730, b"SQ", _item(inner))
        return inner

    assert read_part10(_with(nested(60), PIXEL_DATA)).header.get((0x0040, 0xA730))
    with pytest.raises(UnreadableData, match="nested too deeply"):
        read_part10(_with(nested(300), PIXEL_DATA))


def test_deflated_elements_count_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 200)
    data = _with(_private(250))
    offset = dataset.dataset_offset(data)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(data[offset:]) + deflater.flush()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = io.BytesIO()
    pydicom.dcmwrite(meta, ds, enforce_file_format=True)
    head = meta.getvalue()[:dataset.dataset_offset(meta.getvalue())]
    with pytest.raises(ObjectTooLarge, match="more than 200 elements"):
        read_part10(head + body)
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 400)
    assert read_part10(head + body).transfer_syntax == DeflatedExplicitVRLittleEndian


def _implicit_with_name(name: bytes) -> bytes:
    """make_instance's object in implicit VR little endian, Patient's Name ``name``
    (implicit VR lengths are 32-bit: PS3.5 7.1.3)."""
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    base = out.getvalue()
    at = base.index(b"\x10\x00\x10\x00", dataset.dataset_offset(base))
    length = struct.unpack_from("<I", base, at + 4)[0]
    return base[:at] + _implicit(0x00100010, name) + base[at + 8 + length:]


def test_a_long_specific_character_set_is_not_kept_between_objects() -> None:
    """The encodings of a real Specific Character Set are kept for the next objects; a
    value longer than any real one (implicit VR lets a sender make it megabytes) is
    read for its object and not kept in memory after it."""
    def with_charset(value: bytes) -> bytes:
        base = _implicit_with_name(b"DOE^JOHN")
        at = base.index(b"\x08\x00\x05\x00", dataset.dataset_offset(base))
        length = struct.unpack_from("<I", base, at + 4)[0]
        return base[:at] + _implicit(0x00080005, value) + base[at + 8 + length:]

    dataset._cached_encodings.cache_clear()
    short = read_part10(with_charset(b"ISO_IR 100"))
    assert dataset._cached_encodings.cache_info().currsize == 1
    long_value = b"\\".join([b"ISO_IR 100"] * 40)
    assert len(long_value) > dataset.CACHED_CHARSET_BYTES
    long = read_part10(with_charset(long_value))
    assert dataset._cached_encodings.cache_info().currsize == 1
    assert short.header.original_character_set == ["latin_1"]
    assert long.header.original_character_set == ["latin_1"] * 40


def test_a_value_past_the_index_bound_is_indexed_by_its_first_values() -> None:
    """32 MiB of backslashes in a Patient's Name took 3.1 s and 544 MB to index
    (32 million values); the values within MAX_INDEX_VALUE_BYTES are indexed."""
    names = b"DOE^JOHN\\" * ((4 << 20) // 9)
    header = read_part10(_implicit_with_name(names)).header
    tracemalloc.start()
    try:
        values = extract(header, Level.PATIENT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    indexed = values["patient_name"]
    assert indexed is not None and len(indexed) <= dataset.MAX_INDEX_VALUE_BYTES
    assert set(indexed.split("\\")) == {"DOE^JOHN"}
    assert peak < 16 * dataset.MAX_INDEX_VALUE_BYTES, peak
    one = read_part10(_implicit_with_name(b"A" * (2 << 20))).header
    assert extract(one, Level.PATIENT)["patient_name"] == "A" * dataset.MAX_INDEX_VALUE_BYTES


def test_an_item_key_past_the_index_bound_is_indexed_by_its_first_values() -> None:
    """The same bound inside the items of an indexed sequence (a Procedure Code
    Sequence's Code Value, PS3.4 C.2.2.2.6), in implicit VR: 3 MiB of values took
    85 MB to index; within the bound, about 32 MB."""
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    base = out.getvalue()
    code = b"X1\\" * ((3 << 20) // 3)
    item = _implicit(0x00080100, code) + _implicit(0x00080102, b"99X ")
    sequence = _implicit(0x00081032, _item(item))  # Procedure Code Sequence
    at = base.index(b"\x10\x00\x10\x00", dataset.dataset_offset(base))
    header = read_part10(base[:at] + sequence + base[at:]).header
    tracemalloc.start()
    try:
        indexed = extract(header, Level.STUDY)["procedure_codes"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * dataset.MAX_INDEX_VALUE_BYTES, peak
    assert indexed is not None and len(indexed) < 2 * dataset.MAX_INDEX_VALUE_BYTES


def test_an_element_of_an_unknown_vr_is_indexed_as_unknown_and_stored(
        services: Services) -> None:
    """Referring Physician's Name sent with the VR ``PJ``: pydicom cannot read its
    value (NotImplementedError), which escaped the analysis: a C-STORE failed
    unexpectedly and an upload stayed in the folder for good, read again at every
    scan.  As any value that does not decode, it is indexed as unknown; the object is
    stored as sent."""
    data = bytearray(sample("CT_small.dcm").read_bytes())
    at = data.find(b"\x08\x00\x90\x00PN")
    data[at + 4:at + 6] = b"PJ"
    result = services.ingest.store_bytes(bytes(data))
    row = reads.lookup(services.index.connection(), result.sop_instance_uid)
    assert row is not None
    study = services.index.connection().execute(
        "SELECT referring_physician_name FROM study").fetchall()
    assert study == [(None,)]


def _with_pixels(name: str, cut: int = 0, **attributes: Any) -> bytes:
    """Sample ``name`` with ``attributes`` set and its Pixel Data cut by ``cut`` bytes
    (padded by as many zero bytes when negative)."""
    ds = dcmread(sample(name))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    pixels = bytes(ds.PixelData)
    ds.PixelData = pixels[:len(pixels) - cut] if cut >= 0 else pixels + bytes(-cut)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("name, cut, attributes, refused", [
    ("CT_small.dcm", 32668, {}, True),                 # 100 bytes of 128 x 128 x 16 bits
    ("CT_small.dcm", 2, {}, True),                     # one pixel short
    ("CT_small.dcm", -2, {}, False),                   # longer: read (padding)
    ("CT_small.dcm", 0, {"NumberOfFrames": 2}, True),  # a second frame declared, absent
    ("CT_small.dcm", 2, {"NumberOfFrames": ""}, False),  # empty: nothing to check against
    ("CT_small.dcm", 0, {}, False),
    # 4:2:2, two samples' worth per pixel: 128 x 128 x 2 x 1 byte.
    ("CT_small.dcm", 0, {"SamplesPerPixel": 3, "BitsAllocated": 8, "BitsStored": 8,
                         "HighBit": 7, "PhotometricInterpretation": "YBR_PARTIAL_422"},
     False),
    ("CT_small.dcm", 2, {"SamplesPerPixel": 3, "BitsAllocated": 8, "BitsStored": 8,
                         "HighBit": 7, "PhotometricInterpretation": "YBR_FULL_422"}, True),
])
def test_native_pixel_data_shorter_than_its_frames_is_refused(
        services: Services, name: str, cut: int, attributes: dict[str, Any],
        refused: bool) -> None:
    """PS3.5 8.1.1: native Pixel Data holds Rows x Columns x Samples per Pixel x Bits
    Allocated / 8 bytes per frame.  Shorter, no reader shows its last frames (a CT cut
    to 100 bytes was stored with Success); refused by ingest, read as it is when stored
    already.  Longer is read (padding)."""
    data = _with_pixels(name, cut, **attributes)
    instance = read_part10(data)
    assert (instance.pixel_mismatch is not None) is refused
    if refused:
        assert "image attributes declare" in (instance.pixel_mismatch or "")
        with pytest.raises(UnreadableData, match="image attributes declare"):
            services.ingest.store_bytes(data)
    else:
        services.ingest.store_bytes(data)


@pytest.mark.parametrize("name, syntax, found", [
    ("CT_small.dcm", "1.2.840.10008.1.2.4.50", "native"),        # on a JPEG context
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.1", "encapsulated"),
])
def test_pixel_data_in_the_other_encoding_than_its_syntax_is_refused(
        services: Services, name: str, syntax: str, found: str) -> None:
    """PS3.5 A.4: Pixel Data is encapsulated (undefined length) under a syntax that
    encapsulates it, native (a defined length) otherwise.  The other way round, no
    reader takes the object as meant: refused by ingest, not stored; read as it is
    when stored already (``pacs reindex``, ``pacs fsck`` keep what was acknowledged)."""
    data = relabelled(sample(name).read_bytes(), syntax)
    instance = read_part10(data)  # read as it is: one stored already stays readable
    assert instance.pixel_mismatch is not None and f"Pixel Data is {found}" in (
        instance.pixel_mismatch)
    with pytest.raises(UnreadableData, match=f"Pixel Data is {found}"):
        services.ingest.store_bytes(data)
    assert reads.counts(services.index.connection())["instance"] == 0


# --- elements of undefined length, and VRs the walk and pydicom could read apart -----------

_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _undefined(tag: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR element of undefined length, ``value`` then its delimiter."""
    return (struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, _UNDEFINED_LENGTH)
            + value + _SEQUENCE_END)


def _implicit_private(count: int, group: int = 0x0011) -> bytes:
    """A private block of ``count`` elements in implicit VR (a UN sequence's items)."""
    return _implicit((group << 16) | 0x0010, b"AB") + b"".join(
        _implicit((group << 16) | (0x1000 + n), b"AB") for n in range(count))


def test_a_un_sequence_is_read_as_the_standard_writes_it_and_its_items_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.5 6.2.2: a UN element of undefined length is a sequence whose items are in
    implicit VR little endian (what an archive sends for a private sequence it does
    not know).  Walked as explicit VR, a conformant one was refused (C000); its items'
    elements, skipped unread, reached pydicom uncounted (5,000 past a limit of 200)."""
    creator = _explicit(0x00090010, b"LO", b"AB")
    conformant = read_part10(_with(creator + _undefined(
        0x00091001, b"UN", _item(_implicit(0x00080100, b"ABCD") + _implicit(0x00080102,
                                                                             b"DCM ")))))
    assert conformant.header is not None
    monkeypatch.setattr(dataset, "MAX_ELEMENTS", 200)
    with pytest.raises(ObjectTooLarge):
        read_part10(_with(creator + _undefined(0x00091001, b"UN",
                                               _item(_implicit_private(250)))))


def test_a_value_of_undefined_length_that_is_no_sequence_is_refused(
        services: Services) -> None:
    """An OB of undefined length holding an item that holds elements: one reader took
    them as the top level's (the Patient ID and Study UID indexed were the hidden
    ones), this walk as a value (PS3.5 7.1.2: only SQ, UN and Pixel Data may be of
    undefined length)."""
    hidden = (_explicit(0x00100010, b"PN", b"EVIL^PATIENT")
              + _explicit(0x00100020, b"LO", b"EVIL-ID "))
    smuggled = _with(_explicit(0x00090010, b"LO", b"AB") + _undefined(
        0x00091001, b"OB", struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED_LENGTH) + hidden
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)))
    with pytest.raises(UnreadableData, match="undefined length"):
        services.ingest.store_bytes(smuggled)
    assert reads.counts(services.index.connection())["instance"] == 0


def test_vr_bytes_that_are_not_letters_inside_an_item_are_refused() -> None:
    """Inside an item, an element whose VR bytes are not two capital letters: pydicom
    reads the item on in implicit VR, this walk with a 16-bit length, and each saw
    other elements (3,001 hidden in 64 KiB); refused.  A VR of letters it does not
    know is read alike by both, and stays accepted."""
    odd = struct.pack("<HH2sH", 0x0011, 0x1001, b"\xff\xff", 4) + b"ABCD"
    with pytest.raises(UnreadableData, match="capital letters"):
        read_part10(_with(_explicit(0x00090010, b"LO", b"AB") + _explicit(
            0x00091001, b"SQ", _item(odd))))
    letters = struct.pack("<HH2sH", 0x0011, 0x1001, b"PJ", 4) + b"ABCD"
    read_part10(_with(_explicit(0x00090010, b"LO", b"AB") + _explicit(
        0x00091001, b"SQ", _item(letters))))


def test_an_object_whose_file_meta_names_another_instance_is_refused(
        services: Services) -> None:
    """PS3.10 7.1: the file meta's Media Storage SOP Instance and Class UIDs are the
    data set's.  One that names another (a STOW-RS part, an import) was stored, and
    served as a file naming an instance it is not; refused, in a batch too."""
    ds = pydicom.dcmread(io.BytesIO(make_instance(SOPInstanceUID="1.2.3.6.1")))
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.6.999"
    out = io.BytesIO()
    ds.save_as(out)  # as it is (enforcing the file format rewrites the meta)
    with pytest.raises(UIDMismatch, match="file meta"):
        services.ingest.store_bytes(out.getvalue())
    [result] = services.ingest.store_batch([Received.of(out.getvalue())])
    assert isinstance(result, UIDMismatch)
    assert reads.counts(services.index.connection())["instance"] == 0
