"""The data set a C-STORE sub-operation sends, from wherever its object is
(pacs.dimse.sender.data_set_source)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs.core.config import Settings
from pacs.core.query.model import InstanceRef
from pacs.core.storage import object_key
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import sender
from tests.factory import dataset_bytes, make_instance

UID = "1.2.826.0.1.3680043.8.498.91"
KEY = object_key(UID, f"{UID}.1", f"{UID}.1.1")


def _ref(data: bytes) -> InstanceRef:
    return InstanceRef(UID, f"{UID}.1", f"{UID}.1.1", "1.2.840.10008.5.1.4.1.1.2",
                       ExplicitVRLittleEndian, KEY, len(data))


def _sent(store: object, ref: InstanceRef) -> tuple[bytes, bool]:
    """The bytes the sub-operation would send, and whether they came from memory."""
    with sender.data_set_source(store, ref, ref.transfer_syntax, Settings()) as (source, length):
        data = source.read()
        assert len(data) == length
        return data, isinstance(source, io.BytesIO)


def test_a_small_object_that_is_no_file_is_sent_from_memory() -> None:
    data = make_instance()
    store = MemoryStore()
    store.put(KEY, io.BytesIO(data), len(data))
    assert _sent(store, _ref(data)) == (dataset_bytes(data), True)


def test_a_larger_one_goes_through_a_temporary_file(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_instance()
    monkeypatch.setattr(sender, "IN_MEMORY_BYTES", len(data) - 1)
    store = MemoryStore()
    store.put(KEY, io.BytesIO(data), len(data))
    assert _sent(store, _ref(data)) == (dataset_bytes(data), False)


def test_an_object_larger_than_its_row_says_goes_through_a_temporary_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_instance()
    monkeypatch.setattr(sender, "IN_MEMORY_BYTES", len(data) - 1)
    store = MemoryStore()
    store.put(KEY, io.BytesIO(data), len(data))
    ref = _ref(data[:100])  # the row's size is below the limit, the object is not
    assert _sent(store, ref) == (dataset_bytes(data), False)


def test_a_file_of_the_store_is_sent_from_the_file(tmp_path: Path) -> None:
    data = make_instance()
    store = FileStore(tmp_path)
    store.put(KEY, io.BytesIO(data), len(data))
    assert _sent(store, _ref(data)) == (dataset_bytes(data), False)
