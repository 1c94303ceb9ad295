"""The streaming multipart/related reader: any chunking, limits, malformed bodies."""

from __future__ import annotations

import io
import os

import pytest

from adapters.dicomweb import multipart
from adapters.dicomweb.multipart import MultipartError, boundary_of, encode, media_type, read_parts


class Trickle(io.RawIOBase):
    """A body that returns at most ``size`` bytes per read (as chunked bodies do)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.position = 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        count = self.size if size < 0 else min(size, self.size)
        chunk = self.data[self.position:self.position + count]
        self.position += len(chunk)
        return chunk


def parse(data: bytes, boundary: str = "b0undary", size: int = 1 << 20,
          max_part_bytes: int = multipart.MAX_PART_BYTES,
          max_parts: int = multipart.MAX_PARTS) -> list[tuple[dict[str, str], bytes]]:
    parts = []
    for part in read_parts(Trickle(data, size), boundary, chunk_bytes=max(size, 1),
                           max_part_bytes=max_part_bytes, max_parts=max_parts):
        parts.append((part.headers, part.read()))
        part.close()
    return parts


#: Contents that look like delimiters to a careless parser.
TRICKY = [
    b"",
    b"\r\n\r\n",
    b"--b0undary",  # no CRLF before: not a delimiter
    b"\r\n--b0undar",
    b"x\r\n-b0undary--\r\n",
    os.urandom(3000),
    b"\r\n--" * 100,
]


@pytest.mark.parametrize("size", [1, 2, 7, 64, 4096, 1 << 20])
def test_round_trip_at_any_chunking(size: int) -> None:
    contents = TRICKY
    data = b"".join(encode(((({"Content-Type": "application/dicom"}), c) for c in contents),
                           "b0undary"))
    parsed = parse(data, size=size)
    assert [content for _, content in parsed] == contents
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in parsed)


def test_preamble_padding_epilogue_and_no_headers() -> None:
    data = (b"ignored preamble\r\n--b0undary \t\r\n\r\nfirst\r\n--b0undary\r\n"
            b"Content-Type: application/dicom\r\nContent-Location: a\r\n\r\nsecond"
            b"\r\n--b0undary--  \r\nignored epilogue\r\n--b0undary\r\n")
    parsed = parse(data, size=3)
    assert parsed == [({}, b"first"),
                      ({"content-type": "application/dicom", "content-location": "a"},
                       b"second")]


def test_large_part_spools_to_disk() -> None:
    big = os.urandom(multipart.SPOOL_MEMORY_BYTES + 10)
    data = b"".join(encode([({}, big)], "b0undary"))
    parts = list(read_parts(io.BytesIO(data), "b0undary"))
    assert parts[0].size == len(big)
    assert not isinstance(parts[0].body, io.BytesIO)  # a temporary file, not memory
    assert parts[0].read() == big


def test_small_part_stays_in_memory() -> None:
    small = os.urandom(1000)
    parts = list(read_parts(io.BytesIO(b"".join(encode([({}, small)], "b0undary"))),
                            "b0undary", chunk_bytes=7))
    assert isinstance(parts[0].body, io.BytesIO)
    assert parts[0].read() == small


@pytest.mark.parametrize("data, message", [
    (b"--b0undary\r\n\r\nno end", "ends inside a part"),
    (b"--b0undary\r\nContent-Type: application/dicom\r\n", "ends inside part headers"),
    (b"--b0undary\r\nbroken\r\n\r\nx\r\n--b0undary--", "header line is malformed"),
    (b"--b0undaryX\r\n\r\nx\r\n--b0undary--", "unexpected bytes"),
    (b"no delimiter anywhere", "ends inside the preamble"),
    (b"", "ends inside the preamble"),
])
def test_malformed_bodies(data: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(data, size=5)


def test_parts_before_a_break_are_complete() -> None:
    data = b"".join(encode([({}, b"complete"), ({}, b"cut off")], "b0undary"))[:-12]
    reader = read_parts(io.BytesIO(data), "b0undary")
    assert next(reader).read() == b"complete"
    with pytest.raises(MultipartError):
        next(reader)


@pytest.mark.parametrize("body", [
    # The boundary inside the first part's data, followed by more data: not a delimiter
    # line; what precedes it may read as a whole (shorter) instance.
    b"--b0undary\r\n\r\nhead\r\n--b0undaryXYZ tail\r\n--b0undary--\r\n",
    # A close delimiter inside the data, the rest of the part and another part after it.
    b"--b0undary\r\n\r\nhead\r\n--b0undary--tail\r\n--b0undary\r\n\r\nnext"
    b"\r\n--b0undary--\r\n",
])
@pytest.mark.parametrize("size", [1, 3, 1 << 20])
def test_a_part_is_not_handed_on_before_its_delimiter_line_is_proven(
        body: bytes, size: int) -> None:
    """RFC 2046 5.1.1: a delimiter line holds the delimiter, transport padding and a
    line break, or closes the body with ``--``; a body that breaks it fails before the
    part it ends is yielded, so a cut-off instance is never stored."""
    reader = read_parts(Trickle(body, size), "b0undary", chunk_bytes=size)
    with pytest.raises(MultipartError, match="unexpected bytes after a boundary"):
        next(reader)


@pytest.mark.parametrize("ending", [b"", b"  \t", b"\r\n", b" \r\nepilogue",
                                    b"\nepilogue\r\n--b0undary\r\n"])
@pytest.mark.parametrize("size", [1, 3, 1 << 20])
def test_what_may_follow_the_close_delimiter(ending: bytes, size: int) -> None:
    """The body's end, transport padding, or a line break and an epilogue."""
    body = b"--b0undary\r\n\r\nonly\r\n--b0undary--" + ending
    assert parse(body, size=size) == [({}, b"only")]


@pytest.mark.parametrize("limits, message", [
    ({"max_parts": 2}, "more than 2 parts"),
])
def test_limits(limits: dict[str, int], message: str) -> None:
    data = b"".join(encode([({}, b"x" * 11)] * 3, "b0undary"))
    with pytest.raises(MultipartError, match=message):
        parse(data, size=4, **limits)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 4, 1 << 20])
@pytest.mark.parametrize("spool", [False, True])
def test_a_part_over_its_limit_is_yielded_as_oversize_with_its_head(
        size: int, spool: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if spool:  # the part had moved to a temporary file before it went over
        monkeypatch.setattr(multipart, "SPOOL_MEMORY_BYTES", 8)
    monkeypatch.setattr(multipart, "OVERSIZE_HEAD_BYTES", 12)
    big = bytes(range(100)) * 3
    data = b"".join(encode([({}, b"small"), ({}, big), ({}, b"after")], "b0undary"))
    parts = list(read_parts(Trickle(data, size), "b0undary", chunk_bytes=size,
                            max_part_bytes=200))
    assert [(p.oversize, p.size) for p in parts] == [(False, 5), (True, 300), (False, 5)]
    assert [p.read() for p in parts] == [b"small", big[:12], b"after"]
    exact = list(read_parts(io.BytesIO(data), "b0undary", max_part_bytes=300))
    assert [p.oversize for p in exact] == [False, False, False]  # the limit is inclusive
    assert exact[1].read() == big


def test_header_block_limit() -> None:
    data = b"--b0undary\r\nX-Long: " + b"a" * (multipart.MAX_HEADER_BYTES + 10)
    with pytest.raises(MultipartError, match="too long"):
        parse(data)


@pytest.mark.parametrize("what, data", [
    ("part headers", b"--b0undary\r\nX-Long: " + b"a" * (multipart.MAX_HEADER_BYTES + 10)
     + b"\r\n\r\nbody\r\n--b0undary--"),
    ("the preamble", b"x" * (multipart.MAX_PREAMBLE_BYTES + 10)
     + b"\r\n--b0undary\r\n\r\nbody\r\n--b0undary--"),
])
def test_limits_hold_when_one_read_brings_the_end_too(what: str, data: bytes) -> None:
    """A header block or preamble over its limit is refused even when one large read
    holds it whole, its end included (before, only a search that failed looked at
    the limit: 829 KB of part headers passed in a 1 MiB read)."""
    with pytest.raises(MultipartError, match=f"{what} is too long"):
        list(read_parts(io.BytesIO(data), "b0undary", chunk_bytes=1 << 20))


@pytest.mark.parametrize("content_type, boundary", [
    ('multipart/related; type="application/dicom"; boundary="0f3c-41ef"', "0f3c-41ef"),
    ("multipart/related; type=application/dicom; boundary=0f3c-41ef", "0f3c-41ef"),
    ('multipart/related;boundary="a;b=c";type="application/dicom"', "a;b=c"),
    ('Multipart/Related; BOUNDARY=abc', "abc"),
])
def test_boundary_quoted_or_bare(content_type: str, boundary: str) -> None:
    assert boundary_of(content_type) == boundary
    assert media_type(content_type)[0] == "multipart/related"


@pytest.mark.parametrize("content_type", [
    "multipart/related", 'multipart/related; boundary=""',
    "multipart/related; boundary=" + "x" * 300,
])
def test_bad_boundary(content_type: str) -> None:
    with pytest.raises(MultipartError):
        boundary_of(content_type)


def test_media_type_parameters() -> None:
    kind, params = media_type('Multipart/Related; Type="application/dicom"; '
                              'transfer-syntax=1.2.840.10008.1.2.1; x="a\\"b"')
    assert kind == "multipart/related"
    assert params == {"type": "application/dicom", "transfer-syntax": "1.2.840.10008.1.2.1",
                      "x": 'a"b'}
