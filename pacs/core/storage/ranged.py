"""A seekable stream over an object read in ranges (:class:`RangedReader`).

A store whose objects are remote (S3) serves a reader that seeks and reads a part of
an object (a frame, a header, one bulk data value) with the :class:`RandomAccess
<pacs.core.storage.base.RandomAccess>` capability: each read outside the buffer
becomes one ranged request, so a frame costs about its own size instead of the whole
object.

The buffer is bounded: a read that misses it fetches what it asks for, at least
:data:`MIN_READ_AHEAD` bytes; that read-ahead doubles while the reads go on where the
previous fetch ended (a header parsed element by element, a document read whole) up
to :data:`MAX_READ_AHEAD`, and drops back after a jump.  The stream holds at most
the larger of that and the caller's own read.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Protocol

from pacs.core.errors import StorageError

#: The least a read that missed the buffer fetches: a page, enough for an item header
#: and a Basic Offset Table, or a small header, in one request.  Small, because a
#: frame request pays it once beside its frame (an encapsulated frame: the offset
#: table, then the fragments in one read); a longer header costs a few doubling GETs.
MIN_READ_AHEAD = 4 << 10

#: The read-ahead of a long run of sequential reads, and the most a stream buffers
#: beyond what its caller asked for.
MAX_READ_AHEAD = 1 << 20


class Fetch(Protocol):
    """Reads one range of an object."""

    def __call__(self, start: int, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes from ``start`` (fewer only at the end of the object)
        and the object's size; ``start`` at or past the end gives no bytes."""


class RangedReader(io.BufferedIOBase):
    """A read-only, seekable stream of an object, fetched range by range.

    Seeking costs nothing; a read is served from the buffer when it can be, else by one
    call of ``fetch`` (module docstring).  The object's size is learnt from the first
    fetch (or from ``stat`` when a seek from the end comes first).

    Parameters
    ----------
    fetch : Fetch
        Reads a range of the object; raises the store's errors
        (:class:`~pacs.core.errors.NotFound`, :class:`~pacs.core.errors.StorageError`).
    stat : Callable[[], int]
        The object's size, for a seek from the end before anything was fetched.
    """

    def __init__(self, fetch: Fetch, stat: Callable[[], int]) -> None:
        super().__init__()
        self._fetch = fetch
        self._stat = stat
        self._size: int | None = None
        self._position = 0
        self._buffer = b""
        self._buffer_start = 0
        self._read_ahead = MIN_READ_AHEAD

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The current position."""
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position (no request, except a stat for the first ``SEEK_END``)."""
        self._check_open()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._position + offset
        elif whence == io.SEEK_END:
            target = self._known_size() + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if target < 0:
            raise ValueError("negative seek position")
        self._position = target
        return target

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all the rest for ``-1``)."""
        self._check_open()
        if size is None or size < 0:
            size = max(0, self._known_size() - self._position)
        if self._size is not None:
            size = min(size, max(0, self._size - self._position))
        if size == 0:
            return b""
        data = self._buffered(self._position, size)
        if len(data) < size:
            data += self._fetched(self._position + len(data), size - len(data))
        self._position += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        """:meth:`read` (one fetch at most when ``size`` is given)."""
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read into ``buffer``; the number of bytes read."""
        data = self.read(len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)

    def close(self) -> None:
        """Drop the buffer (nothing else is held: each fetch has completed)."""
        self._buffer = b""
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed stream")

    def _known_size(self) -> int:
        if self._size is None:
            self._size = self._stat()
        return self._size

    def _buffered(self, start: int, size: int) -> bytes:
        """What the buffer holds of ``size`` bytes from ``start`` (a prefix, maybe empty)."""
        offset = start - self._buffer_start
        if 0 <= offset < len(self._buffer):
            return self._buffer[offset:offset + size]
        return b""

    def _fetched(self, start: int, size: int) -> bytes:
        """``size`` bytes from ``start`` in one fetch (fewer at the end of the object),
        at least the read-ahead's worth, the last part kept as the buffer."""
        sequential = bool(self._buffer) and start == self._buffer_start + len(self._buffer)
        self._read_ahead = (min(2 * self._read_ahead, MAX_READ_AHEAD) if sequential
                            else MIN_READ_AHEAD)
        length = max(size, self._read_ahead)
        if self._size is not None:
            length = min(length, self._size - start)
        data, self._size = self._fetch(start, length)
        expected = min(length, max(0, self._size - start))
        if len(data) != expected:
            raise StorageError(f"short ranged read: {len(data)} of {expected} bytes")
        # Kept whole when small (pydicom steps back a few bytes now and then), else
        # its last part: the buffer never grows past the largest read-ahead.
        keep = min(len(data), MAX_READ_AHEAD)
        self._buffer = data[len(data) - keep:] if keep < len(data) else data
        self._buffer_start = start + len(data) - keep
        return data[:size] if size < len(data) else data
