"""Encapsulated documents (PS3.3 C.24.2: PDF, CDA, STL …) read from their stored object
a chunk at a time.

The Encapsulated Document (0042,0011) value is most of such an object, up to
``PACS_MAX_OBJECT_BYTES``.  :func:`open_document` reads the elements before it (a
few KB), learns where its value lies from its header and sends it from there, so a
request holds a chunk, not the object.  A deflated data set (PS3.5 A.5) has no such
place in the stored bytes: it is inflated to a temporary file first, within
``PACS_MAX_OBJECT_BYTES``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, BinaryIO

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)

from pacs.core.dataset import (
    HEAD_PROBE_BYTES,
    dataset_offset,
    inflated_copy,
    meta_transfer_syntax,
)
from pacs.core.errors import NotFound, UnreadableData
from pacs.core.storage import open_ranged

if TYPE_CHECKING:
    from pacs.core.storage import ObjectStore

#: Encapsulated Document (0042,0011), OB (PS3.3 C.24.2).
ENCAPSULATED_DOCUMENT = 0x00420011
#: Values before the document longer than this are passed over, not read.
DEFER_BYTES = 64 << 10
#: Explicit VRs the document's value may be stored with: OB, or UN from a sender that
#: did not know the attribute (PS3.5 7.1.2: both have a 32-bit length).
_LONG_VRS = frozenset({b"OB", b"UN"})


class StoredDocument:
    """An encapsulated document found in its stored object, open until its chunks have
    been read (or :meth:`close`).

    Attributes
    ----------
    length :
        Bytes of the document: the value without the pad byte of an odd-length
        document (PS3.3 C.24.2.1).
    """

    def __init__(self, stack: ExitStack, source: BinaryIO, offset: int, length: int) -> None:
        self._stack = stack
        self._source = source
        self._offset = offset
        self.length = length

    def chunks(self, size: int) -> Iterator[bytes]:
        """The document, ``size`` bytes at a time; closed at the end.

        Raises
        ------
        UnreadableData
            The stored object ends before the value does.
        """
        try:
            self._source.seek(self._offset)
            left = self.length
            while left:
                chunk = self._source.read(min(size, left))
                if not chunk:
                    raise UnreadableData("the stored object is truncated")
                left -= len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Release the stored object (and a deflated one's inflated copy)."""
        self._stack.close()


def open_document(store: ObjectStore, key: str, max_object_bytes: int) -> StoredDocument:
    """The Encapsulated Document of the stored object ``key``; the caller reads its
    chunks or closes it.

    Raises
    ------
    NotFound
        The object holds no Encapsulated Document at its top level.
    ObjectTooLarge
        A deflated data set inflating past ``max_object_bytes``.
    UnreadableData
        The object does not parse up to its document.
    """
    with ExitStack() as stack:
        source = stack.enter_context(open_ranged(store, key))
        head = source.read(HEAD_PROBE_BYTES)
        offset = dataset_offset(head)
        stored = meta_transfer_syntax(head, offset)
        if stored is None or offset >= len(head):
            raise UnreadableData("the file meta does not parse")
        syntax = UID(stored)
        if syntax == DeflatedExplicitVRLittleEndian:
            source = stack.enter_context(inflated_copy(source, offset, max_object_bytes))
            offset, syntax = 0, ExplicitVRLittleEndian
        value, length = _value_place(source, offset, syntax)
        document = StoredDocument(stack.pop_all(), source, value, _unpadded(source, value,
                                                                           length))
    return document


def _value_place(source: BinaryIO, offset: int, syntax: UID) -> tuple[int, int]:
    """Where the document's value starts and its length: pydicom reads the elements
    before it, then its own header is read (PS3.5 7.1.2: OB has a 32-bit length).

    Raises
    ------
    NotFound, UnreadableData
        As :func:`open_document`.
    """
    source.seek(offset)
    try:
        # Values past DEFER_BYTES are skipped, not read: only the positions matter.
        read_dataset(source, syntax.is_implicit_VR, syntax.is_little_endian,
                     stop_when=_at_document, defer_size=DEFER_BYTES)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad data
        raise UnreadableData(f"the data set does not parse: {type(exc).__name__}") from None
    order = "<" if syntax != ExplicitVRBigEndian else ">"
    start = source.tell()
    head = source.read(8 if syntax.is_implicit_VR else 12)
    if len(head) < 8 or struct.unpack_from(order + "HH", head) != (0x0042, 0x0011):
        raise NotFound("the instance holds no document")
    at = 4 if syntax.is_implicit_VR else 8
    if len(head) < at + 4 or (not syntax.is_implicit_VR and head[4:6] not in _LONG_VRS):
        raise UnreadableData("the document's element is not an OB value")
    length = struct.unpack_from(order + "I", head, at)[0]
    if length == 0xFFFFFFFF:
        raise UnreadableData("the document's value has an undefined length")
    return start + len(head), length


def _at_document(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Stop at the document, or where it would have been."""
    return int(tag) >= ENCAPSULATED_DOCUMENT


def _unpadded(source: BinaryIO, value: int, length: int) -> int:
    """The document's length: PS3.3 C.24.2.1 pads an odd-length document with one
    byte, which is not the document's."""
    if not length:
        return 0
    source.seek(value + length - 1)
    return length - 1 if source.read(1) == b"\0" else length


__all__ = ["ENCAPSULATED_DOCUMENT", "StoredDocument", "open_document"]
