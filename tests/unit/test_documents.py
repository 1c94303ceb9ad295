"""Encapsulated documents found in their stored object and read a chunk at a time
(pacs.core.documents)."""

from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from pacs.core import documents
from pacs.core.errors import NotFound, ObjectTooLarge
from pacs.core.storage.memory import MemoryStore
from tests.factory import part10

KEY = "1.2/1.2.3/1.2.3.4.dcm"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 64 + b"%%EOF\n"


def stored(document: bytes | None, syntax: str = ExplicitVRLittleEndian) -> MemoryStore:
    """A store holding an Encapsulated PDF object (no document when ``None``), with an
    element after the document."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if document is not None:
        ds.EncapsulatedDocument = document
    ds.add_new(0x00431010, "LO", "after the document")
    data = part10(ds, syntax)
    store = MemoryStore()
    store.put(KEY, io.BytesIO(data), len(data))
    return store


def read(store: MemoryStore, chunk: int = 1000) -> bytes:
    document = documents.open_document(store, KEY, 1 << 30)
    data = b"".join(document.chunks(chunk))
    assert len(data) == document.length
    return data


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_the_document_is_read_from_where_it_lies(syntax: str) -> None:
    assert read(stored(PDF, syntax)) == PDF


def test_the_pad_byte_of_an_odd_length_document_is_not_sent() -> None:
    assert read(stored(PDF + b"!")) == PDF + b"!"


def test_an_object_without_a_document_is_not_found() -> None:
    with pytest.raises(NotFound):
        documents.open_document(stored(None), KEY, 1 << 30)


def test_a_deflated_document_inflates_within_the_object_limit() -> None:
    with pytest.raises(ObjectTooLarge):
        documents.open_document(stored(bytes(1 << 20), DeflatedExplicitVRLittleEndian),
                                KEY, 1 << 19)
