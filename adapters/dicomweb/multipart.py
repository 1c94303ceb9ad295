"""``multipart/related`` (RFC 2387 over RFC 2046 5.1) read as a stream, and written.

Reading never holds the whole body: it reads fixed-size chunks, keeps each part in
memory up to :data:`SPOOL_MEMORY_BYTES` (on disk beyond), and yields a part only once
its closing delimiter line has arrived whole and proven one (RFC 2046 5.1.1: padding
and a line break after the delimiter, or ``--``), so neither a truncated part nor one
cut short by its boundary inside its data is handed on.  What it accepts, because real
clients send it:

- the boundary quoted (dicomweb-client: ``boundary="0f3c…"``) or bare;
- a preamble before the first delimiter, transport padding after a delimiter,
  and an epilogue after the close delimiter (RFC 2046 5.1.1);
- any chunking of the body (``Transfer-Encoding: chunked`` is undone by the server;
  this code sees a stream whose reads return any number of bytes);
- the bytes ``\\r\\n\\r\\n`` and ``--`` inside DICOM data (only ``CRLF--boundary`` ends
  a part).

Every size is bounded by a named limit, and every malformed body raises
:class:`MultipartError` with a short reason.  A part larger than its limit is not an
error of the body: its content past the limit is read and dropped, and it is yielded
marked ``oversize`` with only its first :data:`OVERSIZE_HEAD_BYTES` (enough to tell
which instance it was), so that the parts after it can still be stored
(PS3.18 10.5.3: each instance succeeds or fails on its own).  No falcon here.
"""

from __future__ import annotations

import io
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Protocol

#: Bytes read from the request per call.
CHUNK_BYTES = 1024 * 1024
#: A part stays in memory up to this size, then moves to a temporary file.
SPOOL_MEMORY_BYTES = 16 * 1024 * 1024
#: Largest part accepted (one DICOM object) unless the caller says otherwise
#: (STOW-RS passes ``PACS_MAX_OBJECT_BYTES``).
MAX_PART_BYTES = 2 * 1024 ** 3
#: What is kept of a part over its limit: its beginning, where a Part 10 object's
#: file meta and identifying UIDs are.
OVERSIZE_HEAD_BYTES = 64 * 1024
#: Largest header block of one part.
MAX_HEADER_BYTES = 16 * 1024
#: Largest preamble before the first delimiter.
MAX_PREAMBLE_BYTES = 64 * 1024
#: Most parts in one body.
MAX_PARTS = 10_000
#: Longest boundary accepted (RFC 2046 allows 70; some clients exceed it).
MAX_BOUNDARY = 200

CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body is not well-formed multipart, or it breaks a size limit."""


class Readable(Protocol):
    """What the reader needs of a request body."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end."""


@dataclass
class Part:
    """One body part: its headers (names lower-cased) and its spooled content.

    ``oversize`` parts were larger than the limit: ``size`` is their whole size and
    ``body`` holds only their first :data:`OVERSIZE_HEAD_BYTES`.
    """

    headers: dict[str, str]
    body: IO[bytes]
    size: int
    oversize: bool = False

    @property
    def content_type(self) -> str:
        """The part's media type, lower-cased, without parameters ('' when absent)."""
        return media_type(self.headers.get("content-type", ""))[0]

    def read(self) -> bytes:
        """The whole content (the caller holds one part in memory at a time)."""
        self.body.seek(0)
        return self.body.read()

    def close(self) -> None:
        """Drop the spooled content."""
        self.body.close()


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type into its lower-cased type and its parameters.

    Parameter names are lower-cased; values are unquoted (``"a\\"b"`` → ``a"b``).
    """
    pieces = split_unquoted(value, ";")
    kind = pieces[0].strip().lower() if pieces else ""
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, sep, raw = piece.partition("=")
        if sep:
            params[name.strip().lower()] = _unquote(raw.strip())
    return kind, params


def split_unquoted(value: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes (RFC 9110 quoted-string)."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return pieces


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type.

    Raises
    ------
    MultipartError
        When it is missing, empty, too long or holds a line break.
    """
    boundary = media_type(content_type)[1].get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY or "\r" in boundary or "\n" in boundary:
        raise MultipartError("the multipart boundary is missing or invalid")
    return boundary


class _Reader:
    """Buffered reads from the body, with the position of the last search kept."""

    def __init__(self, stream: Readable, chunk_bytes: int) -> None:
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self.buffer = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """Append one chunk; False at the end of the body."""
        if self.eof:
            return False
        chunk = self.stream.read(self.chunk_bytes)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def find(self, needle: bytes, limit: int, what: str) -> int:
        """Read until ``needle`` is buffered; its index, at most ``limit`` (the bound
        holds whatever the reads' sizes: a needle found far past it in one large read
        is refused as surely as one still missing)."""
        start = 0
        while True:
            index = self.buffer.find(needle, start)
            if index > limit or (index < 0 and len(self.buffer) > limit):
                raise MultipartError(f"{what} is too long")
            if index >= 0:
                return index
            start = max(0, len(self.buffer) - len(needle) + 1)
            if not self.fill():
                raise MultipartError(f"the body ends inside {what}")

    def need(self, size: int) -> None:
        """Read until at least ``size`` bytes are buffered (or the body ends)."""
        while len(self.buffer) < size and self.fill():
            pass


def read_parts(stream: Readable, boundary: str, *, chunk_bytes: int = CHUNK_BYTES,
               max_part_bytes: int = MAX_PART_BYTES, max_parts: int = MAX_PARTS,
               spool_dir: str | None = None) -> Iterator[Part]:
    """Yield the parts of a multipart body as they complete.

    Parameters
    ----------
    stream :
        The body (any chunking).
    boundary :
        The boundary from the Content-Type (see :func:`boundary_of`).
    chunk_bytes, max_part_bytes, max_parts :
        Read size and limits (defaults: the module's named limits).  A part over
        ``max_part_bytes`` is yielded ``oversize`` (see the module docstring).
    spool_dir :
        Folder for parts larger than :data:`SPOOL_MEMORY_BYTES`.

    Raises
    ------
    MultipartError
        Malformed or truncated bodies, and bodies with too many parts.  Parts yielded
        before the error were complete.
    """
    reader = _Reader(stream, chunk_bytes)
    delimiter = b"--" + boundary.encode("latin-1")
    _skip_preamble(reader, delimiter)
    closed = _at_close_delimiter(reader)
    count = 0
    while not closed:
        count += 1
        if count > max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        headers = _headers(reader)
        part = _body(reader, CRLF + delimiter, headers, max_part_bytes, spool_dir)
        try:
            # The line the part's delimiter begins must be one (RFC 2046 5.1.1): a
            # boundary inside the data followed by anything else is a malformed body,
            # not the end of a part, whose bytes before it may read as a shorter
            # instance.  Proven before the part is handed on.
            closed = _at_close_delimiter(reader)
        except BaseException:
            part.body.close()
            raise
        yield part


def _skip_preamble(reader: _Reader, delimiter: bytes) -> None:
    """Drop everything up to and including the first delimiter."""
    reader.need(len(delimiter))
    if reader.buffer.startswith(delimiter):
        del reader.buffer[:len(delimiter)]
        return
    index = reader.find(CRLF + delimiter, MAX_PREAMBLE_BYTES, "the preamble")
    del reader.buffer[:index + len(CRLF) + len(delimiter)]


def _at_close_delimiter(reader: _Reader) -> bool:
    """After a delimiter: ``--`` closes the body, then transport padding and a line
    break before the epilogue, or the body's end; otherwise padding then a line break
    (RFC 2046 5.1.1).

    Raises
    ------
    MultipartError
        Anything else follows the delimiter: the boundary occurred inside a part's data.
    """
    reader.need(2)
    if reader.buffer.startswith(b"--"):
        del reader.buffer[:2]
        # The epilogue after the line break is ignored; the body may end instead.
        while (b"\n" not in reader.buffer and len(reader.buffer) <= MAX_HEADER_BYTES
               and reader.fill()):
            pass
        _padding_only(reader.buffer.split(b"\n", 1)[0])
        return True
    end = reader.find(b"\n", MAX_HEADER_BYTES, "a delimiter line")
    _padding_only(reader.buffer[:end])
    del reader.buffer[:end + 1]
    return False


def _padding_only(line: bytes | bytearray) -> None:
    """Raise :class:`MultipartError` unless the rest of a delimiter line is transport
    padding (and the carriage return of its line break)."""
    if line.rstrip(b"\r").strip(b" \t"):
        raise MultipartError("unexpected bytes after a boundary delimiter")


def _headers(reader: _Reader) -> dict[str, str]:
    """The part's header block, up to the empty line."""
    reader.need(2)
    if reader.buffer.startswith(CRLF):  # no headers at all (RFC 2046 defaults apply)
        del reader.buffer[:2]
        return {}
    end = reader.find(CRLF + CRLF, MAX_HEADER_BYTES, "part headers")
    block = bytes(reader.buffer[:end]).decode("latin-1")
    del reader.buffer[:end + 4]
    headers: dict[str, str] = {}
    for line in block.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError("a part header line is malformed")
        headers[name.strip().lower()] = value.strip()
    return headers


def _body(reader: _Reader, delimiter: bytes, headers: dict[str, str], max_part_bytes: int,
          spool_dir: str | None) -> Part:
    """Gather the part's content up to the next delimiter.

    Content is kept as a list of byte strings joined once at the end (a spooled
    in-memory file copied each byte three times; the join briefly holds a part twice);
    past :data:`SPOOL_MEMORY_BYTES` it moves to a temporary file in ``spool_dir``;
    past ``max_part_bytes`` only its head is kept.
    """
    pieces = _Pieces(spool_dir, max_part_bytes)
    keep = len(delimiter) - 1  # a delimiter may straddle two reads
    try:
        while True:
            # After a flush only ``keep`` old bytes remain: each byte is searched ~once.
            index = reader.buffer.find(delimiter)
            if index >= 0:
                pieces.add(reader.buffer, index)
                del reader.buffer[:index + len(delimiter)]
                return Part(headers, pieces.finish(), pieces.size, pieces.oversize)
            flush = len(reader.buffer) - keep
            if flush > 0:
                pieces.add(reader.buffer, flush)
                del reader.buffer[:flush]
            if not reader.fill():
                raise MultipartError("the body ends inside a part (no closing boundary)")
    except BaseException:
        pieces.close()
        raise


class _Pieces:
    """A part's content as it arrives: in memory, then spooled to a file when large;
    past ``max_part_bytes`` only counted (its head kept, the rest dropped)."""

    def __init__(self, spool_dir: str | None, max_part_bytes: int = MAX_PART_BYTES) -> None:
        self.spool_dir = spool_dir
        self.max_part_bytes = max_part_bytes
        self.chunks: list[bytes] = []
        self.file: IO[bytes] | None = None
        self.size = 0
        self.oversize = False
        self.head = b""

    def add(self, buffer: bytearray, count: int) -> None:
        """Append the first ``count`` bytes of ``buffer``."""
        self.size += count
        if self.oversize:
            return
        if self.size > self.max_part_bytes:
            self._overflow(buffer, count)
            return
        with memoryview(buffer) as view:
            data = bytes(view[:count])
        if self.file is None and self.size > SPOOL_MEMORY_BYTES:
            # Kept open across add() calls; finish() hands it to the Part, close() drops it.
            self.file = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115
            for chunk in self.chunks:
                self.file.write(chunk)
            self.chunks = []
        if self.file is not None:
            self.file.write(data)
        else:
            self.chunks.append(data)

    def _overflow(self, buffer: bytearray, count: int) -> None:
        """The part is over its limit: keep its head, drop what was gathered."""
        head = bytearray()
        if self.file is not None:
            self.file.seek(0)
            head += self.file.read(OVERSIZE_HEAD_BYTES)
        for chunk in self.chunks:
            head += chunk[:OVERSIZE_HEAD_BYTES - len(head)]
        head += buffer[:max(0, min(count, OVERSIZE_HEAD_BYTES - len(head)))]
        self.close()
        self.head = bytes(head)
        self.oversize = True

    def finish(self) -> IO[bytes]:
        """The content (or an oversize part's head), positioned at its start."""
        if self.oversize:
            return io.BytesIO(self.head)
        if self.file is not None:
            self.file.seek(0)
            return self.file
        # BytesIO over a bytes object shares it: read() of the whole returns it uncopied.
        return io.BytesIO(self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks))

    def close(self) -> None:
        """Drop whatever was gathered."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.chunks = []


def new_boundary() -> str:
    """A boundary that cannot occur in the content by chance."""
    return uuid.uuid4().hex


def encode(parts: Iterable[tuple[Mapping[str, str], bytes | Iterable[bytes]]],
           boundary: str) -> Iterator[bytes]:
    """Write parts as a multipart body, streaming each part's chunks.

    Parameters
    ----------
    parts :
        (headers, content) pairs; content is bytes or an iterable of chunks.
    boundary :
        The boundary announced in the Content-Type.
    """
    mark = b"--" + boundary.encode("latin-1")
    first = True
    for headers, content in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        yield (b"" if first else CRLF) + mark + CRLF + head.encode("latin-1") + CRLF
        first = False
        if isinstance(content, bytes | bytearray | memoryview):
            yield bytes(content)
        else:
            yield from content
    yield (b"" if first else CRLF) + mark + b"--" + CRLF
