"""The data set a C-STORE sub-operation sends, from wherever its object is
(pacs.dimse.sender.data_set_source); the forwarding sender's process runs the seam."""

from __future__ import annotations

import io
import subprocess
import sys
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


#: A process of its own (the forwarder companion, ``pacs send``): does making a
#: forwarding sender there install the seam's reactors?
SENDER_PROCESS = """
from pynetdicom.association import Association
from pacs.core.config import Modality, Settings
from pacs.core.storage.memory import MemoryStore
from pacs.dimse.forward import DimseSender
from pacs.dimse.seam import reactor
DimseSender(Modality("PEER", "127.0.0.1", 104), MemoryStore(), Settings(dimse_seam={seam}))
print(Association._run_reactor is reactor._assoc_run_reactor)
"""


@pytest.mark.parametrize("seam", [True, False])
def test_a_forwarding_sender_runs_the_seam_in_its_process_as_configured(seam: bool) -> None:
    """The forwarder and ``pacs send`` get the seam's requestor reactor (a response is
    never taken for a request, tests/service/test_hostile_destinations.py) unless
    PACS_DIMSE_SEAM is off."""
    out = subprocess.run([sys.executable, "-c", SENDER_PROCESS.format(seam=seam)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(seam)
