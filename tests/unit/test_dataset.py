"""Header reading, UID validation and the completeness check."""

from __future__ import annotations

import pytest

from pacs.dataset import check_complete, read_part10, valid_uid
from pacs.errors import InvalidUID, UnreadableData
from tests.conftest import sample


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
