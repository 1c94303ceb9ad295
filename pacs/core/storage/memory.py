"""A dict-backed store for unit tests (same contract as the real backends)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import BinaryIO

from pacs.core.errors import NotFound, StorageError
from pacs.core.storage.base import is_object_key, quarantine_folder


class MemoryStore:
    """Objects in a dict; ``fail_puts`` makes every write fail (for failure tests).

    Capability (:mod:`pacs.core.storage`): :class:`~pacs.core.storage.Quarantine`.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        #: Objects moved by :meth:`quarantine`, by their quarantine name.
        self.quarantined: dict[str, bytes] = {}
        self.fail_puts = False
        self._lock = threading.Lock()

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Store the bytes, or fail without storing anything."""
        if not is_object_key(key):
            raise StorageError("refusing an object key that is not derived from UIDs")
        if self.fail_puts:
            raise StorageError("simulated store failure")
        data = source.read(length)
        if len(data) != length:
            raise StorageError(f"short write: {len(data)} of {length} bytes")
        with self._lock:
            self.objects[key] = data

    def open(self, key: str) -> BinaryIO:
        """A stream of the stored bytes."""
        with self._lock:
            if key not in self.objects:
                raise NotFound("no such object")
            return io.BytesIO(self.objects[key])

    def size(self, key: str) -> int:
        """The object's size."""
        with self._lock:
            if key not in self.objects:
                raise NotFound("no such object")
            return len(self.objects[key])

    def delete(self, key: str) -> None:
        """Remove the object if present."""
        with self._lock:
            self.objects.pop(key, None)

    def keys(self) -> Iterator[str]:
        """A snapshot of the keys."""
        with self._lock:
            return iter(list(self.objects))

    def quarantine(self, key: str, folder: str) -> str:
        """Move the object to :attr:`quarantined` as ``quarantine/<folder>/<key>``."""
        name = f"quarantine/{quarantine_folder(folder)}/{key}"
        with self._lock:
            if key not in self.objects:
                raise NotFound("no such object")
            self.quarantined[name] = self.objects.pop(key)
        return name

    def check(self, create: bool = True) -> None:
        """Always usable."""

    def close(self) -> None:
        """Nothing to release."""
