"""The ranged reader (``pacs.core.storage.ranged``): which ranges it fetches for which
reads, and that it holds a bounded buffer.  Its fetch here reads bytes in memory and
records each call; over S3 it is tested by tests/storage/test_storage_contract.py."""

from __future__ import annotations

import io
import random

import pytest

from pacs.core.errors import StorageError
from pacs.core.storage.ranged import MAX_READ_AHEAD, MIN_READ_AHEAD, RangedReader

DATA = random.Random(5).randbytes(6 * 1024 * 1024)


class Object:
    """An object's bytes, fetched range by range; the calls recorded."""

    def __init__(self, data: bytes = DATA, short: bool = False) -> None:
        self.data = data
        self.fetches: list[tuple[int, int]] = []
        self.stats = 0
        self.short = short

    def fetch(self, start: int, length: int) -> tuple[bytes, int]:
        self.fetches.append((start, length))
        end = start + length - (1 if self.short else 0)
        return self.data[start:end], len(self.data)

    def stat(self) -> int:
        self.stats += 1
        return len(self.data)

    def reader(self) -> RangedReader:
        return RangedReader(self.fetch, self.stat)


def test_a_read_after_a_jump_fetches_itself_or_the_least_read_ahead() -> None:
    obj = Object()
    with obj.reader() as stream:
        stream.seek(1_000_000)
        assert stream.read(8) == DATA[1_000_000:1_000_008]
        assert stream.read(100) == DATA[1_000_008:1_000_108]  # from the buffer
        stream.seek(3_000_000)
        assert stream.read(200_000) == DATA[3_000_000:3_200_000]
    assert obj.fetches == [(1_000_000, MIN_READ_AHEAD), (3_000_000, 200_000)]


def test_sequential_reads_double_the_read_ahead_up_to_its_ceiling() -> None:
    obj = Object()
    with obj.reader() as stream:
        read = b"".join(iter(lambda: stream.read(1000), b""))
    assert read == DATA
    lengths = [length for _start, length in obj.fetches]
    assert lengths[:3] == [MIN_READ_AHEAD, 2 * MIN_READ_AHEAD, 4 * MIN_READ_AHEAD]
    assert max(lengths) == MAX_READ_AHEAD
    assert sum(lengths) == len(DATA)  # nothing fetched twice
    starts = [start for start, _length in obj.fetches]
    assert starts == sorted(starts)


def test_the_buffer_keeps_at_most_the_ceiling() -> None:
    """After a read larger than the ceiling, a step back into its last part is served
    from the buffer, further back is fetched again."""
    obj = Object()
    with obj.reader() as stream:
        assert stream.read(3 * MAX_READ_AHEAD) == DATA[:3 * MAX_READ_AHEAD]
        stream.seek(-100, io.SEEK_CUR)
        assert stream.read(100) == DATA[3 * MAX_READ_AHEAD - 100:3 * MAX_READ_AHEAD]
        assert len(obj.fetches) == 1
        stream.seek(MAX_READ_AHEAD)
        assert stream.read(10) == DATA[MAX_READ_AHEAD:MAX_READ_AHEAD + 10]
    assert len(obj.fetches) == 2


def test_size_comes_from_the_first_fetch_or_a_stat() -> None:
    obj = Object()
    with obj.reader() as stream:
        stream.read(1)
        assert stream.seek(0, io.SEEK_END) == len(DATA)
    assert obj.stats == 0
    with obj.reader() as stream:
        assert stream.seek(-5, io.SEEK_END) == len(DATA) - 5
        assert stream.read() == DATA[-5:]
    assert obj.stats == 1


def test_reads_at_the_end_and_past_it() -> None:
    obj = Object(b"0123456789")
    with obj.reader() as stream:
        assert stream.read() == b"0123456789"
        assert stream.read(1) == b""
        stream.seek(50)
        assert stream.read(1) == b""
        stream.seek(7)
        buffer = bytearray(10)
        assert stream.readinto(buffer) == 3 and buffer[:3] == b"789"
    assert obj.fetches == [(0, 10)]  # the size known, no fetch past the end


def test_a_short_fetch_is_a_storage_error() -> None:
    with Object(short=True).reader() as stream, pytest.raises(StorageError, match="short"):
        stream.read(100)


def test_a_closed_stream_refuses_to_read_or_seek() -> None:
    stream = Object().reader()
    stream.close()
    for operation in (stream.read, stream.tell, lambda: stream.seek(0)):
        with pytest.raises(ValueError):
            operation()
