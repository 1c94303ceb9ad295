"""The gunicorn worker class of the node's HTTP ports (DICOMweb and viewer).

Why not gunicorn's own classes
------------------------------
``gthread`` gives a connection to a thread as soon as its first byte is readable; the
thread then blocks reading the rest of the head and the body, and later writing the
response, for as long as the client takes.  A hundred clients that send half a request
and stop hold every thread of every worker, and nobody else is answered.  The async
classes (``gevent``, ``eventlet``) would avoid that by monkey-patching the standard
library, which this application cannot afford: apsw (SQLite) and the helper processes
block in C, and a patched ``socket``/``threading`` under them is a risk nobody can test
exhaustively.  A buffering front (nginx) is another process to ship and configure in
the embedded default, and one more copy of every byte.

What this worker does
---------------------
One event loop per worker process (:mod:`selectors`, non-blocking sockets) does every
read from the network and every wait; threads only run the application:

* **Head**: bytes are collected until the head is complete (``\\r\\n\\r\\n``), within
  ``PACS_HTTP_TIMEOUT`` of the connection (or of the first byte of a request on a
  kept-alive connection), and within :data:`MAX_HEAD_BYTES`; gunicorn's own parser then
  reads it (``--limit-request-line``/``-fields``/``-field-size`` and every check of
  its parser apply, errors are its answers).
* **Body**: a ``Content-Length`` above ``PACS_MAX_REQUEST_BYTES`` is answered 413 at
  once, nothing of the body read.  Otherwise the body (``chunked`` is decoded here) is
  spooled: in memory up to :data:`MEMORY_BODY_BYTES` per request and
  :data:`MEMORY_BUDGET_BYTES` over the worker, in an unnamed temporary file in the data
  folder beyond that.  A client silent for ``PACS_HTTP_TIMEOUT`` in the middle of its
  body is disconnected.  Only a complete request reaches a thread of the application
  pool (``--threads``), so those threads never wait for a client to send.
* **Streaming**: a body of :data:`STREAM_MIN_BYTES` or more with a ``Content-Length``
  is not waited for when a thread of a second pool, the streaming pool (as many threads
  again), is free: that thread runs the application while the loop goes on spooling,
  and the application reads the body as it arrives (a large STOW-RS is parsed and
  stored while it is received, as it was under ``gthread``).  A client that stalls can
  hold only these threads, for ``PACS_HTTP_TIMEOUT`` at most, after which the body ends
  where it stopped (the application finds it incomplete); when none is free, bodies
  are spooled whole first.
* **Response**: a thread writes without blocking.  When the client does not take the
  bytes for :data:`WRITE_GRACE` seconds, the unsent rest (at most one piece of the
  response) is parked with the loop and the thread goes back to the pool; the loop
  sends it as the client reads, and a thread takes the response up again when it has
  gone.  A client that reads nothing for ``PACS_HTTP_TIMEOUT`` is disconnected.  Parked
  bytes are limited to :data:`PARK_BUDGET_BYTES` per worker; past that a thread waits
  (``PACS_HTTP_TIMEOUT`` at most without progress) instead of parking more.
* **Idle**: a kept-alive connection is closed after ``PACS_HTTP_KEEPALIVE`` seconds
  without a request.
* **Connections**: at the worker's limit (``--worker-connections``, within the
  descriptor limit, which is raised to its hard value) the worker does not stop
  accepting: it closes the oldest idle connection, else the oldest still sending its
  head, else the slowest sender of a body, else the oldest parked response.  A real
  client completes its head within milliseconds, so under a flood of slow ones it is
  theirs that go.  A per-address cap would not be needed on top, and would refuse the
  browsers behind one proxy or NAT.
* **Descriptors**: an accept that fails for want of them (EMFILE, ENFILE) or of memory
  closes one connection the same way, or, when none can go, stops accepting for
  :data:`ACCEPT_PAUSE`; the failures are counted in one WARNING line per
  :data:`REPORT_SECONDS`.

Bodies up to :data:`MEMORY_BODY_BYTES` reach the application as the pieces they
arrived in (no copy into one buffer); a larger one costs one more copy, to its file and
back.  A thread of the streaming pool does not park a response (it waits for its
reader itself, ``PACS_HTTP_TIMEOUT`` at most without progress).  What this buys is that
a thread of the application pool is only ever busy with work the application does.
Memory is bounded by these limits and the number of connections, never by what a
client declares (a declared length reserves memory budget; it allocates nothing).

If the application cannot be loaded (the object store unreachable while a worker
boots), the worker does not fail: it answers 503 to every request and builds the
application again in the background, with back-off, until it succeeds.  gunicorn would
otherwise stop altogether, and the node's HTTP side with it.  A port that answers 503
(``/health`` too, so a container's health check says unhealthy) tells a client what is
wrong, where a port that refuses connections while gunicorn is restarted over and over
does not; ``pacs serve`` still restarts a gunicorn that exits for another reason.

TLS
---
With ``PACS_TLS_CERT`` / ``PACS_TLS_KEY`` (:mod:`pacs.node.tls`) every connection is
TLS, done by this loop without ever waiting: the first byte tells a TLS handshake from
a plain HTTP request (answered ``400`` in clear, then closed); the handshake goes on as
the socket becomes readable or writable (``SSLWantReadError``/``SSLWantWriteError``),
within ``PACS_HTTP_TIMEOUT`` of the connection, head included, so a client that
connects and never finishes it is closed like a slow head, and under the connection
limit stalled handshakes go right after idle connections.  Reads take every decrypted
byte ready; bytes OpenSSL has decrypted but not yet handed out
(``SSLSocket.pending()``), which the kernel no longer reports as readable, are read in
the next round of the loop.  A TLS connection is used by one thread at a time, under
its lock (a streamed body is read by the loop while a thread may write the answer;
OpenSSL's objects are not for concurrent use), and a write encrypts at most
:data:`TLS_WRITE_BYTES` at once, repeated with the same bytes after
``SSLWantWriteError`` as OpenSSL requires.  Responses are always written from Python
(``sendfile`` would bypass TLS: file bodies are read in blocks, on plain connections
too).  Limits, spooling, streaming, parking and the connection limit are the same.
The application sees ``wsgi.url_scheme`` ``https`` (the access rule's condition for
credentials from other hosts).  gunicorn's own TLS (``--certfile``) is refused: it
would hand-shake blocking, outside the loop.

Only HTTP/1.x is served (ALPN offers ``http/1.1`` alone).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import json
import logging
import os
import queue
import resource
import select
import selectors
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, cast

from gunicorn.http import wsgi
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers import base

from adapters.http import CLIENT_GONE
from pacs.core.config import Settings
from pacs.core.errors import IncompleteBody
from pacs.core.offload import Job, cannot_start_thread, submit_job
from pacs.node import tls

log = logging.getLogger(__name__)

#: Largest request head (request line and header fields) collected; larger get 431.
MAX_HEAD_BYTES = 64 << 10
#: Largest body kept in memory; larger ones are spooled to a temporary file.
MEMORY_BODY_BYTES = 32 << 20
#: Received pieces of a body smaller than this are joined up to it in memory.
PIECE_BYTES = 64 << 10
#: Request bodies held in memory by one worker at most (the rest go to files).
MEMORY_BUDGET_BYTES = 64 << 20
#: Unsent response bytes parked with the loop by one worker at most.
PARK_BUDGET_BYTES = 64 << 20
#: Complete requests waiting for one of a worker's threads, per thread, at most; more
#: are answered 503 at once.  Waiting ones are not watched (their client may be gone):
#: unbounded, a client sending a thousand requests and hanging up on each kept every
#: thread busy answering nobody, and another client's query waited 15 to 40 s.
WAITING_PER_THREAD = 16
#: Bodies at least this large may be streamed to the application as they arrive.
STREAM_MIN_BYTES = 1 << 20
#: Seconds a thread waits for a slow reader before parking the response.
WRITE_GRACE = 0.05
#: Bytes read from a socket at once.
READ_BYTES = 1 << 20
#: Bytes read at once from a file a response streams (``wsgi.file_wrapper``).
FILE_BLOCK_BYTES = 256 << 10
#: Seconds a connection answered with an error is read (and discarded) before it is
#: closed, so that the client sees the answer rather than a reset.
LINGER_SECONDS = 2.0
#: Free space the data folder keeps: a body that would leave less is refused (503).
SPOOL_RESERVE_BYTES = 1 << 30
#: Longest chunk-size line or trailer section of a chunked body.
MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 16 << 10
#: Chunks a chunked body may come in beyond one per :data:`CHUNK_BYTES` of its data.
#: Each chunk costs the worker's loop a few microseconds whatever it holds: a body of
#: one-byte chunks took 7 s of CPU and 460 MB per MiB (each piece an object of its own),
#: the whole worker waiting.  Real clients send a chunk per buffer or per part (a
#: multipart part's head is the smallest, about a hundred bytes).
FREE_CHUNKS = 1024
#: See :data:`FREE_CHUNKS`.
CHUNK_BYTES = 64
#: Largest piece of a response encrypted by one TLS write (the connection's lock is
#: held that long).
TLS_WRITE_BYTES = 256 << 10
#: The first byte of a TLS connection: a handshake record (RFC 8446 5.1).
TLS_HANDSHAKE_RECORD = b"\x16"
#: Seconds between two looks of a :class:`ClientWatch` at its connection.
CLIENT_WATCH_INTERVAL = 0.05
#: What :class:`ClientWatch` takes for a client gone: it closed or shut down its end
#: (RDHUP), the connection broke (HUP, ERR), or the descriptor is closed (NVAL).
_GONE_EVENTS = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
#: Seconds of the loop's longest wait (timeouts are checked at least this often).
TICK = 0.25
#: Seconds between log lines counting the slow clients closed meanwhile.
REPORT_SECONDS = 10.0
#: errno values of ``accept`` that say the process or the system is out of something
#: (descriptors, socket buffers, memory), not that the client failed.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds the loop stops accepting after an accept failed for want of resources.
ACCEPT_PAUSE = 0.5
#: Back-off of a failed application load: first delay, longest delay.
RETRY_FIRST, RETRY_LONGEST = 1.0, 10.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)


class State(Enum):
    """Where a connection is."""

    HANDSHAKE = "handshake"  # a TLS handshake in progress (or its first byte awaited)
    HEAD = "head"          # reading a request head
    IDLE = "idle"          # kept alive, waiting for the next request
    BODY = "body"          # reading a request body
    BUSY = "busy"          # a thread has it
    PARKED = "parked"      # the loop sends a response's unsent rest
    CLOSING = "closing"    # answered with an error; discarding input until closed


@dataclass(frozen=True)
class Limits:
    """The limits and timeouts the worker applies (from the node's settings).

    Attributes
    ----------
    timeout : float
        Seconds for a request head to arrive, and of silence while a body is sent or
        a response read (``PACS_HTTP_TIMEOUT``).
    keepalive : float
        Seconds an idle kept-alive connection stays open (``PACS_HTTP_KEEPALIVE``).
    max_body : int
        Largest request body (``PACS_MAX_REQUEST_BYTES``).
    spool_dir : str
        Where bodies too large for memory are spooled (the data folder).
    """

    timeout: float
    keepalive: float
    max_body: int
    spool_dir: str

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Limits:
        """The limits of ``settings``, by default this process's (environment and
        ``.env``)."""
        from pacs.core import config

        settings = config.load() if settings is None else settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(timeout=max(0.5, settings.http_timeout),
                   keepalive=max(0.0, settings.http_keepalive),
                   max_body=max(0, settings.max_request_bytes),
                   spool_dir=str(settings.data_dir))


def _close_unless_read(conn: Any, resp: Any) -> None:
    """An answer whose head goes out before its request's body has all arrived (the
    application answered early: a refusal, a cut STOW-RS) says the connection closes
    after it, as it then does (RFC 9110 10.1.1, RFC 9112 9.6); it said keep-alive."""
    spool = conn.spool
    if not resp.headers_sent and spool is not None and not spool.finished:
        resp.force_close()


def _other_codings(req: Any) -> bool:
    """True when a request's Transfer-Encoding names another coding than ``chunked``."""
    codings = [coding.strip().lower() for name, value in req.headers
               if name == "TRANSFER-ENCODING" for coding in value.split(",")]
    return any(coding and coding != "chunked" for coding in codings)


class BadRequest(Exception):
    """A request the loop answers itself: ``status`` and a short plain-text reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Throttled:
    """One kind of refusal the loop logs: the first at once, the next ones counted in one
    line at most every :data:`REPORT_SECONDS` (the sweep flushes them), with the last
    one's detail.  A client that repeats a refused request as fast as it can does not
    write a line each time.  The loop notes most; a thread may too (a request whose
    application failed before answering), hence the lock.
    """

    def __init__(self, level: int, text: str) -> None:
        self.level = level
        self.text = text
        self.count = 0
        self.last = ""
        self.reported = -REPORT_SECONDS
        self._lock = threading.Lock()

    def note(self, now: float, detail: str) -> None:
        """One more, ``detail`` saying from whom and why."""
        with self._lock:
            self.count += 1
            self.last = detail
        self.flush(now)

    def flush(self, now: float) -> None:
        """Log the count when there is one and the last line is old enough."""
        with self._lock:
            if not self.count or now - self.reported < REPORT_SECONDS:
                return
            count, last, self.count, self.reported = self.count, self.last, 0, now
        log.log(self.level, "%s: %d since the last such line (the last: %s)",
                self.text, count, last)


#: The headers of every answer the loop writes itself, as the applications' answers
#: carry them: never sniffed as another type, a sandbox should a browser open it as a
#: page, and never cached (it may answer a request that named a patient).
ERROR_HEADERS = ("X-Content-Type-Options: nosniff\r\n"
                 "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'; "
                 "sandbox\r\nCache-Control: no-store\r\n")


def error_response(status: str, reason: str) -> bytes:
    """A complete ``Connection: close`` answer with a plain-text body (a 503 says when
    to try again: RFC 9110 10.2.3)."""
    body = (reason + "\n").encode("latin-1", "replace")
    retry = "Retry-After: 1\r\n" if status.startswith("503") else ""
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            f"{ERROR_HEADERS}{retry}Content-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1") + body


#: gunicorn's parser errors (:mod:`gunicorn.http.errors`, by name: not every version
#: has each) and the answer to each, the most specific first; any other of its
#: ``ParseException`` is 400.  A TLS error on a request is the client's too.
_PARSE_STATUSES = (
    ("LimitRequestLine", "414 URI Too Long"),
    ("LimitRequestHeaders", "431 Request Header Fields Too Large"),
    ("ExpectationFailed", "417 Expectation Failed"),
    ("UnsupportedTransferCoding", "501 Not Implemented"),
    ("ForbiddenProxyRequest", "403 Forbidden"),
    ("ConfigurationProblem", "500 Internal Server Error"),
    ("InvalidResponseHeader", "500 Internal Server Error"),
    ("InvalidResponseHeaderName", "500 Internal Server Error"),
    ("ParseException", "400 Bad Request"),
)


def parse_error_status(exc: BaseException) -> str | None:
    """The answer to a request gunicorn's parser refused (``None``: ``exc`` is not
    one of its errors, but a failure of ours)."""
    from gunicorn.http import errors as parse_errors
    for name, status in _PARSE_STATUSES:
        kind = getattr(parse_errors, name, None)
        if isinstance(kind, type) and isinstance(exc, kind):
            return status
    return "400 Bad Request" if isinstance(exc, ssl.SSLError) else None


# --- request bodies ---------------------------------------------------------------------

class Budget:
    """Bytes a worker holds for a purpose, shared by the loop and the threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Account ``size`` more bytes if they fit under the limit."""
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        """Return ``size`` bytes taken earlier."""
        with self._lock:
            self.used -= size


class Spool:
    """A request body as it arrives: in memory while small, in a file beyond that.

    The loop writes it; :meth:`reader` reads it, from a thread, while it arrives or
    once it has (a read waits for the bytes it asks for).  Every byte is kept until
    :meth:`close`, so a reader may step back (``readline``).

    Parameters
    ----------
    budget : Budget
        The worker's memory for bodies; a body that does not fit goes to a file.
    folder : str
        Where the file is made (unnamed: it disappears when closed, or on a crash).
    expected : int or None
        The declared length (``None`` for a chunked body).
    """

    def __init__(self, budget: Budget, folder: str, expected: int | None) -> None:
        self.budget = budget
        self.folder = folder
        self.size = 0
        self.finished = False  # every byte is here
        self.aborted = False   # no more bytes will come: the client stalled or left
        self.changed = threading.Condition()
        self._chunks: list[bytes | bytearray] = []
        self._starts: list[int] = []  # offset of each chunk in the body
        self._held = 0  # bytes taken from the budget
        self._file: Any = None
        if expected is not None and (expected > MEMORY_BODY_BYTES
                                     or not self._reserve(expected)):
            self._to_file(expected)

    def _reserve(self, size: int) -> bool:
        if self.budget.take(size):
            self._held += size
            return True
        return False

    def _to_file(self, expected: int | None) -> None:
        """Continue in a temporary file (with what was held so far)."""
        left = shutil.disk_usage(self.folder).free - (expected or 0)
        if left < SPOOL_RESERVE_BYTES:
            raise BadRequest("503 Service Unavailable",
                             "not enough free space to receive this request")
        # Kept open past this call: the spool owns it and closes it (close / abort).
        file = tempfile.TemporaryFile(dir=self.folder, buffering=0)  # noqa: SIM115
        for chunk in self._chunks:
            _write_all(file, chunk)
        self._file = file
        self._chunks, self._starts = [], []
        self._release()

    def _release(self) -> None:
        if self._held:
            self.budget.give(self._held)
            self._held = 0

    def write(self, data: bytes) -> None:
        """Append received body bytes (the loop)."""
        with self.changed:
            if self._file is None and self.size + len(data) > self._held:
                # A chunked body grows past what it holds: take more, or go to a file.
                more = self.size + len(data) - self._held
                if self.size + len(data) > MEMORY_BODY_BYTES or not self._reserve(more):
                    self._to_file(None)
            if self._file is not None:
                _write_all(self._file, data)
            else:
                self._keep(data)
            self.size += len(data)
            self.changed.notify_all()

    def _keep(self, data: bytes) -> None:
        """Keep ``data`` in memory: small pieces joined into one of up to
        :data:`PIECE_BYTES`, so that what a body holds stays close to its bytes (a piece
        of its own per receive cost a client that sends a byte at a time about 50
        times the bytes the budget counts)."""
        last = self._chunks[-1] if self._chunks else None
        if isinstance(last, bytearray) and len(last) + len(data) <= PIECE_BYTES:
            last += data
            return
        self._chunks.append(bytearray(data) if len(data) < PIECE_BYTES else data)
        self._starts.append(self.size)

    def finish(self) -> None:
        """Every byte has arrived."""
        with self.changed:
            self.finished = True
            self.changed.notify_all()

    def abort(self) -> None:
        """No more bytes will arrive: a reader waiting for them gets the end."""
        with self.changed:
            self.aborted = True
            self.changed.notify_all()

    def take(self, position: int, size: int) -> bytes:
        """``size`` bytes from ``position`` (all present; under :attr:`changed`)."""
        if self._file is not None:
            parts = []
            while size > 0:
                data = os.pread(self._file.fileno(), size, position)
                if not data:
                    raise OSError(errno.EIO, "the spooled body is shorter than written")
                parts.append(data)
                position += len(data)
                size -= len(data)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        index = bisect.bisect_right(self._starts, position) - 1
        first = self._chunks[index]
        offset = position - self._starts[index]
        if offset == 0 and len(first) == size:
            # Exactly one piece: as it arrived, no copy (a joined one may still grow).
            return bytes(first) if isinstance(first, bytearray) else first
        pieces: list[bytes | memoryview] = []
        while size > 0:
            chunk = memoryview(self._chunks[index])[offset:offset + size]
            pieces.append(chunk)
            size -= len(chunk)
            index, offset = index + 1, 0
        return b"".join(pieces)

    def reader(self, timeout: float) -> SpoolReader:
        """The body for ``wsgi.input``, from its start.

        Parameters
        ----------
        timeout : float
            Longest wait for more bytes before the reader gives up (the loop gives up
            on a silent client first, at ``PACS_HTTP_TIMEOUT``).
        """
        return SpoolReader(self, timeout)

    def close(self) -> None:
        """Free the memory or the file."""
        with self.changed:
            self.aborted = True
            self.size = 0
            self._chunks, self._starts = [], []
            self._release()
            if self._file is not None:
                self._file.close()
                self._file = None
            self.changed.notify_all()


def _write_all(file: Any, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while len(view):
        view = view[file.write(view):]


class SpoolReader:
    """``wsgi.input``: a :class:`Spool` read from its start.

    A read returns what it asks for, waiting while the body is still arriving; it
    returns less at the end of the body, or, asked for so many bytes, when the client
    stopped sending (the spool was aborted, or nothing came within the timeout) after
    some of them arrived.  A read that finds nothing more of a body the client stopped
    sending, or a read of all of it, raises
    :class:`~pacs.core.errors.IncompleteBody` rather than ending the body there: a
    single ``application/dicom`` body cut at an element boundary reads as a whole,
    shorter object, and must not be stored as one; the parts of a multipart body that
    arrived whole before the stop are.
    """

    def __init__(self, spool: Spool, timeout: float) -> None:
        self._spool = spool
        self._timeout = timeout
        self._position = 0

    def _wait(self) -> int:
        """Bytes available beyond the position (0: the end), waiting for some."""
        spool = self._spool
        while spool.size <= self._position and not spool.finished and not spool.aborted:
            if not spool.changed.wait(self._timeout):
                break
        return max(0, spool.size - self._position)

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (all the rest when ``size`` is negative or None)."""
        wanted = -1 if size is None or size < 0 else size
        whole = wanted < 0
        parts: list[bytes] = []
        spool = self._spool
        with spool.changed:
            while wanted != 0:
                available = self._wait()
                if not available:
                    if not spool.finished and (not parts or whole):
                        raise IncompleteBody("the request body stopped before its end")
                    # What a read of so many bytes found before the client stopped is
                    # returned first (the whole parts in it are stored); the next raises.
                    break
                take = available if wanted < 0 else min(available, wanted)
                parts.append(spool.take(self._position, take))
                self._position += take
                if wanted > 0:
                    wanted -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        """Up to and including the next ``\\n`` (at most ``size`` bytes)."""
        limit = -1 if size is None or size < 0 else size
        parts: list[bytes] = []
        taken = 0
        while limit < 0 or taken < limit:
            block = self.read(8192 if limit < 0 else min(8192, limit - taken))
            if not block:
                break
            end = block.find(b"\n")
            if end >= 0:
                self._position -= len(block) - end - 1  # the rest is read again later
                parts.append(block[:end + 1])
                break
            parts.append(block)
            taken += len(block)
        return b"".join(parts)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """Lines until the end (or until ``hint`` bytes were read)."""
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        """Nothing to free: the spool is the worker's."""


def host_refusal(req: Request) -> str | None:
    """Why a request's Host is not acceptable (``None``: it is); an absolute-form
    request target's authority replaces the Host header first.

    RFC 9112 3.2: an HTTP/1.1 request without a Host header, or with more than one,
    gets 400.  3.2.2: a server given a request target in absolute form uses its
    authority, not the Host header, so that the rules on the host a request names (the
    loopback rule, the customer of a host name) see the one the request is for.
    """
    hosts = [i for i, (name, _) in enumerate(req.headers) if name == "HOST"]
    if len(hosts) > 1:
        return "more than one Host header"
    target = str(req.uri or "")
    authority = urllib.parse.urlsplit(target).netloc if "://" in target else ""
    if authority:
        authority = authority.rpartition("@")[2]  # no user information in a Host
        if hosts:
            req.headers[hosts[0]] = ("HOST", authority)
        else:
            req.headers.append(("HOST", authority))
        return None
    if not hosts and (req.version or (1, 1)) >= (1, 1):
        return "an HTTP/1.1 request without a Host header"
    return None


class Chunked:
    """An incremental decoder of a ``chunked`` body (RFC 9112 section 7.1)."""

    def __init__(self) -> None:
        self._state = "size"  # size, data, data-end, trailer, done
        self._left = 0
        self._line = bytearray()
        self._trailers = 0
        self._chunks = 0
        self._bytes = 0

    @property
    def done(self) -> bool:
        """The last chunk and the trailer section were read."""
        return self._state == "done"

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Decode what ``data`` holds: (body pieces, bytes of ``data`` consumed).

        The data of the chunks in ``data`` come as one piece (a body of small chunks is
        not held as as many objects).

        Raises
        ------
        BadRequest
            When the framing is invalid, or the chunks are more than the data allows
            (:data:`FREE_CHUNKS`).
        """
        out: list[bytes] = []
        position, end = 0, len(data)
        while position < end and self._state != "done":
            if self._state == "data":
                take = min(self._left, end - position)
                out.append(data[position:position + take])
                position += take
                self._left -= take
                if not self._left:
                    self._state = "data-end"
                continue
            newline = data.find(b"\n", position)
            if newline < 0:
                self._line += data[position:]
                position = end
            else:
                self._line += data[position:newline + 1]
                position = newline + 1
            limit = MAX_TRAILER_BYTES if self._state == "trailer" else MAX_CHUNK_LINE
            if len(self._line) > limit:
                raise BadRequest("400 Bad Request", "chunked framing line too long")
            if newline >= 0:
                line, self._line = bytes(self._line), bytearray()
                self._take_line(line)
        return (out if len(out) < 2 else [b"".join(out)]), position

    def _take_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise BadRequest("400 Bad Request", "bare LF in chunked framing")
        line = line[:-2]
        if self._state == "data-end":
            if line:
                raise BadRequest("400 Bad Request", "chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise BadRequest("400 Bad Request", "invalid chunk size")
            self._left = int(size, 16)
            self._state = "data" if self._left else "trailer"
            self._chunks += bool(self._left)  # the last chunk holds no data
            self._bytes += self._left
            if self._chunks > FREE_CHUNKS + self._bytes // CHUNK_BYTES:
                raise BadRequest("400 Bad Request",
                                 f"{self._chunks} chunks for {self._bytes} bytes of data")
        elif line:  # a trailer field: read and dropped
            self._trailers += len(line)
            if self._trailers > MAX_TRAILER_BYTES:
                raise BadRequest("431 Request Header Fields Too Large", "trailers too large")
        else:
            self._state = "done"


# --- responses --------------------------------------------------------------------------

class ClientWatch:
    """Whether the client of a request has closed its end of the connection, for the
    application (``environ[CLIENT_GONE]``): a query for a client that hung up stops,
    as a C-FIND stops when its requestor is gone, rather than run to its time limit
    with a thread of the worker.

    A look is one ``poll`` of the descriptor without waiting (the TCP connection's
    state, under TLS too; bytes the client sent ahead, a pipelined request, are not a
    close), at most every :data:`CLIENT_WATCH_INTERVAL` seconds: the query engine asks
    from SQLite's progress handler.  A client that shuts down only its sending side
    counts as gone, as it does for common proxies.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone = False
        self._due = 0.0

    def __call__(self) -> bool:
        if self.gone:
            return True
        now = time.monotonic()
        if now < self._due:
            return False
        self._due = now + CLIENT_WATCH_INTERVAL
        poller = select.poll()
        poller.register(self.fd, _GONE_EVENTS)
        self.gone = any(events & _GONE_EVENTS for _, events in poller.poll(0))
        return self.gone


class Writer:
    """The socket as gunicorn's response sees it: writes never block.

    What the kernel does not take at once is kept (in order) in :attr:`pending`, to be
    sent by :meth:`flush` (a thread, waiting a little) or :meth:`send_some` (the loop).

    Parameters
    ----------
    sock : socket.socket
        The connection (an ``ssl.SSLSocket`` for TLS).
    lock : threading.Lock, optional
        The TLS connection's lock, held during each write (see :meth:`_send`).
    """

    def __init__(self, sock: socket.socket, lock: threading.Lock | None = None) -> None:
        self.sock = sock
        self.lock = lock
        self.pending: list[memoryview] = []
        self.pending_bytes = 0
        self.wants_read = False  # the last TLS write waits for the client's bytes

    def _send(self, view: memoryview) -> int:
        """One non-blocking send of the start of ``view``; the bytes taken.

        Over TLS at most :data:`TLS_WRITE_BYTES` are encrypted at once, under the
        connection's lock.  After ``SSLWantWriteError`` OpenSSL has kept part of those
        bytes and must be given the same ones again: the caller keeps ``view`` and
        calls again with it (a fresh slice of the same start).

        Raises
        ------
        BlockingIOError
            When nothing can be sent now.
        """
        if self.lock is None:
            return self.sock.send(view)
        with self.lock:
            try:
                sent = self.sock.send(view[:TLS_WRITE_BYTES])
            except ssl.SSLWantWriteError:
                raise BlockingIOError(errno.EAGAIN, "TLS write would block") from None
            except ssl.SSLWantReadError:
                # Only a renegotiation makes a TLS write wait for input, and the
                # context refuses those; wait for input all the same rather than spin.
                self.wants_read = True
                raise BlockingIOError(errno.EAGAIN, "TLS write waits for input") from None
        self.wants_read = False
        return sent

    def sendall(self, data: bytes) -> None:
        """Send what the kernel takes now and keep the rest."""
        view = memoryview(data)
        if not self.pending:
            try:
                sent = self._send(view)
            except BlockingIOError:
                sent = 0
            view = view[sent:]
        if len(view):
            self.pending.append(view)
            self.pending_bytes += len(view)

    def send(self, data: bytes) -> int:
        """:meth:`sendall`, except for gunicorn's interim ``100 Continue``.

        gunicorn answers ``Expect: 100-continue`` itself when it builds the WSGI
        environ (``gunicorn.http.wsgi.create``, with ``send``), which here is after the
        whole body was read: the loop has answered the expectation already, before
        reading the body (:func:`expects_continue`), or had the body without asking
        for it.  A second, late 100 is dropped here rather than unset in gunicorn's
        request, whose flag for it is private.
        """
        if data == _CONTINUE:
            return len(data)
        self.sendall(data)
        return len(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_some(self) -> int:
        """Send pending bytes until the kernel takes no more; the number sent."""
        total = 0
        while self.pending:
            view = self.pending[0]
            try:
                sent = self._send(view)
            except BlockingIOError:
                break
            total += sent
            self.pending_bytes -= sent
            if sent == len(view):
                self.pending.pop(0)
            else:
                self.pending[0] = view[sent:]
                if self.lock is None:
                    break  # the kernel took part: its buffer is full
        return total

    def flush(self, wait: float) -> bool:
        """Send every pending byte, waiting at most ``wait`` s each time nothing moves.

        Returns False when the client took nothing for ``wait`` seconds.
        """
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        while self.pending:
            if self.send_some():
                continue
            poller.modify(self.sock.fileno(),
                          select.POLLIN if self.wants_read else select.POLLOUT)
            if not poller.poll(wait * 1000):
                return False
        return True


def tls_recv_into(sock: ssl.SSLSocket, view: memoryview, size: int) -> tuple[int, bool]:
    """Read the decrypted bytes ready on a TLS connection into ``view[:size]``.

    Record after record until none is complete (or ``size`` is reached): one readable
    event takes what the kernel holds, not one record of it.

    Returns
    -------
    tuple of (int, bool)
        The bytes read (0: the client closed the connection) and whether decrypted
        bytes are left in OpenSSL's buffer, of which the kernel says nothing: the
        caller must read again without waiting for the socket.

    Raises
    ------
    BlockingIOError
        When no complete record is there yet.
    OSError
        ``ssl.SSLError`` for a broken record or alert, or a reset.
    """
    total = 0
    while total < size:
        try:
            count = sock.recv_into(view[total:size])
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError,
                InterruptedError):
            # SSLWantWriteError: OpenSSL has an answer to send first (a key update);
            # the next readable event tries again.
            if not total:
                raise BlockingIOError(errno.EAGAIN, "no complete TLS record") from None
            break
        if not count:
            return total, False  # the end: reported as 0 by the next read
        total += count
    return total, total >= size and sock.pending() > 0


@dataclass
class Exchange:
    """One request being answered: gunicorn's response and the application's body."""

    req: Request
    resp: Any
    environ: MutableMapping[str, Any]
    body: Any  # wsgi.input
    started: datetime
    respiter: Any = None
    chunks: Iterator[bytes] | None = None
    finished: bool = False  # the response is complete (maybe not yet sent)
    keep: bool = False      # the connection may serve another request
    parked: int = 0         # bytes taken from the park budget
    streamed: bool = False  # runs in the streaming pool (the body was still arriving)


class Connection:
    """One client connection and where it is (see :class:`State`)."""

    __slots__ = ("chunked", "data", "deadline", "exchange", "left", "lock", "peer", "req",
                 "requests", "scanned", "server", "since", "sock", "spool", "state", "streamed",
                 "tls_environ", "writer")

    def __init__(self, sock: socket.socket, peer: Any, server: Any) -> None:
        self.sock = sock
        self.peer = peer
        self.server = server
        self.state = State.HEAD
        self.data = bytearray()  # head bytes, or what followed a complete request
        self.scanned = 0  # bytes of ``data`` searched for the end of the head
        self.deadline = 0.0
        self.since = time.monotonic()
        self.requests = 0
        self.req: Request | None = None
        self.spool: Spool | None = None
        self.left = 0  # body bytes still to read (Content-Length)
        self.chunked: Chunked | None = None
        self.writer = Writer(sock)
        self.exchange: Exchange | None = None
        self.streamed = False  # the application runs while the body arrives
        # TLS (set when its handshake starts): one thread at a time in OpenSSL.
        self.lock: threading.Lock | None = None
        self.tls_environ: dict[str, str] = {}  # TLS: what the application is told


#: A WSGI application, as gunicorn's worker holds it (PEP 3333).
WSGIApp = Callable[[MutableMapping[str, Any], Callable[..., Any]], Iterable[bytes]]


def unavailable_app(retry_after: float) -> Callable[..., list[bytes]]:
    """A WSGI application that answers every request 503 (the real one is missing)."""
    body = json.dumps({"status": "unhealthy",
                       "reason": "the web application is not running yet; see the "
                                 "node's log"}).encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("503 Service Unavailable", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Retry-After", str(max(1, round(retry_after)))), ("Cache-Control", "no-store")])
        return [body]

    return app


# --- the worker -------------------------------------------------------------------------

class HttpWorker(base.Worker):
    """gunicorn worker: an event loop for the network, threads for the application.

    Use with ``--worker-class pacs.node.httpworker.HttpWorker``; ``--threads`` is the number
    of application threads, ``--worker-connections`` the connection limit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: Limits | None = None
        self.connections: dict[int, Connection] = {}
        self.poller: selectors.BaseSelector | None = None
        self.pool: futures.ThreadPoolExecutor | None = None
        self.stream_pool: futures.ThreadPoolExecutor | None = None
        self.streams = Budget(0)  # requests in the streaming pool
        # Complete requests waiting for a thread of the pool (sized by init_process).
        self.waiting = Budget(WAITING_PER_THREAD)
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake_fds: tuple[int, int] = (-1, -1)
        self.memory = Budget(MEMORY_BUDGET_BYTES)
        self.park = Budget(PARK_BUDGET_BYTES)
        self.scratch = memoryview(bytearray(READ_BYTES))
        self.max_connections = 0
        self.accepting = False
        self.last_sweep = 0.0
        self.last_notify = 0.0
        self.last_report = 0.0
        self.slow_closed = 0  # slow or stalled clients closed since the last report
        self.tls: ssl.SSLContext | None = None  # PACS_TLS_CERT: every connection is TLS
        self.ready: set[Connection] = set()  # TLS bytes decrypted but not yet read
        self.tls_failed = 0  # failed handshakes since the last report
        self.tls_reason = ""  # why the last one failed
        self.accept_failed = 0  # accepts failed for want of descriptors, since the report
        self.accept_error = ""  # the last such failure
        self.accept_paused_until = 0.0  # no accepting before (monotonic)
        self.last_shortage_report = -REPORT_SECONDS
        self.thread_failed = 0  # pool threads that could not start, since the report
        self.thread_error = ""
        self.last_thread_report = -REPORT_SECONDS
        self.too_large = Throttled(logging.INFO, "refused request bodies over "
                                   "PACS_MAX_REQUEST_BYTES")
        self.no_room = Throttled(logging.WARNING, "refused request bodies")
        self.spool_failed = Throttled(logging.ERROR, "cannot spool request bodies")
        self.too_busy = Throttled(logging.WARNING, "refused requests (503): too many "
                                  "waited for a thread")
        self.invalid = Throttled(logging.INFO, "invalid requests refused")

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """gunicorn's own TLS is refused: this worker does TLS itself, in its loop."""
        if cfg.is_ssl:
            raise RuntimeError("pacs.node.httpworker.HttpWorker does TLS itself: set "
                               "PACS_TLS_CERT and PACS_TLS_KEY, not --certfile/--keyfile")

    # -- start-up --

    def init_process(self) -> None:
        """Limits, TLS, loop and thread pool, then gunicorn's start-up (which runs
        :meth:`run`)."""
        from pacs.core import config

        settings = config.load()
        self.limits = Limits.from_settings(settings)
        self.tls = tls.server_context(settings)
        self.max_connections = self._connection_limit()
        self.poller = selectors.DefaultSelector()
        threads = max(1, self.cfg.threads)
        self.pool = futures.ThreadPoolExecutor(max_workers=threads,
                                               thread_name_prefix="pacs-http")
        self.stream_pool = futures.ThreadPoolExecutor(max_workers=threads,
                                                      thread_name_prefix="pacs-http-stream")
        self.streams = Budget(threads)
        self.waiting = Budget(WAITING_PER_THREAD * threads)
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self.wake_fds = (read, write)
        super().init_process()

    def _connection_limit(self) -> int:
        """``--worker-connections``, within what the descriptor limit allows.

        The soft limit is raised to the hard one first (a body spooled to a file holds
        a second descriptor per connection).
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
        return max(16, min(int(self.cfg.worker_connections), (soft - 256) // 2))

    def load_wsgi(self) -> None:
        """Load the application; when it cannot be, answer 503 and retry in the background."""
        try:
            self.wsgi = cast(WSGIApp, self.app.wsgi())  # a WSGI app (not ASGI)
        except Exception as exc:  # noqa: BLE001 - any failure to build it
            # The exception as an argument: pacs.core.logs names it without its values.
            log.error("the web application cannot start (%s); answering 503 and retrying "
                      "in %g s", exc, RETRY_FIRST)
            self.wsgi = unavailable_app(RETRY_FIRST)
            threading.Thread(target=self._retry_load, name="pacs-http-load",
                             daemon=True).start()

    def _retry_load(self) -> None:
        delay = RETRY_FIRST
        while self.alive:
            time.sleep(delay)
            try:
                app = cast(WSGIApp, self.app.wsgi())
            except Exception as exc:  # noqa: BLE001 - any failure to build it
                delay = min(delay * 2, RETRY_LONGEST)
                log.error("the web application still cannot start (%s); retrying in %g s",
                          exc, delay)
                self.wsgi = unavailable_app(delay)
                continue
            self.wsgi = app
            log.info("the web application started; serving requests")
            return

    # -- signals --

    def handle_quit(self, sig: int, frame: Any) -> None:
        """SIGQUIT / SIGINT: stop now."""
        for pool in (self.pool, self.stream_pool):
            if pool is not None:
                pool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    # -- the loop --

    def run(self) -> None:
        """Serve until told to stop, then let running requests finish (graceful timeout)."""
        assert self.poller is not None
        self.poller.register(self.PIPE[0], selectors.EVENT_READ, self._drain_signals)
        self.poller.register(self.wake_fds[0], selectors.EVENT_READ, self._run_calls)
        self._accept_enabled(True)
        try:
            while self.alive:
                self._heartbeat()
                self._cycle()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    self.alive = False
            self._stop_gracefully()
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            for pool in (self.pool, self.stream_pool):
                if pool is not None:
                    pool.shutdown(wait=False)
            self.poller.close()
            for fd in self.wake_fds:
                os.close(fd)

    def _stop_gracefully(self) -> None:
        """Stop accepting; finish what is running within the graceful timeout.

        The listening sockets are closed at once: a gunicorn started again after its
        master died can bind the port while this worker finishes.
        """
        self._accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            for conn in list(self.connections.values()):
                if conn.state in (State.IDLE, State.HANDSHAKE) or (
                        conn.state is State.HEAD and not conn.data):
                    self._close(conn)
            if not self.connections:
                return
            self._heartbeat()
            self._cycle()

    def _heartbeat(self) -> None:
        """Tell the arbiter this worker is alive (at most every :data:`TICK`)."""
        now = time.monotonic()
        if now - self.last_notify >= TICK:
            self.last_notify = now
            self.notify()

    def _cycle(self) -> None:
        """Wait for events (at most :data:`TICK`), handle them, expire timeouts."""
        assert self.poller is not None
        try:
            events = self.poller.select(0 if self.ready else TICK)
        except InterruptedError:
            events = []
        for key, mask in events:
            if not isinstance(key.data, Connection):
                key.data(key.fileobj, mask)
                continue
            try:
                if key.data.state is State.HANDSHAKE:
                    self._handshake(key.data)
                elif mask & selectors.EVENT_WRITE:
                    self._on_writable(key.data)
                else:
                    self._on_readable(key.data)
            except Exception:
                self.log.exception("Error handling an HTTP connection")
                self._close(key.data)
        if self.ready:
            self._read_ready()
        now = time.monotonic()
        if now - self.last_sweep >= TICK / 2:
            self.last_sweep = now
            for conn in [c for c in self.connections.values()
                         if c.deadline and c.deadline <= now]:
                self._expire(conn)
            self._resume_accepting(now)
            if self.accept_failed and now - self.last_shortage_report >= REPORT_SECONDS:
                log.warning("cannot accept HTTP connections: %d failure(s) since the last "
                            "such line (the last: %s)", self.accept_failed,
                            self.accept_error)
                self.accept_failed, self.last_shortage_report = 0, now
            if self.thread_failed and now - self.last_thread_report >= REPORT_SECONDS:
                log.warning("cannot start HTTP request threads: %d failure(s) since the "
                            "last such line (the last: %s)",
                            self.thread_failed, self.thread_error)
                self.thread_failed, self.last_thread_report = 0, now
            for refusals in (self.too_large, self.no_room, self.spool_failed, self.too_busy,
                             self.invalid):
                refusals.flush(now)
            if ((self.slow_closed or self.tls_failed)
                    and now - self.last_report >= REPORT_SECONDS):
                if self.slow_closed:
                    log.info("closed %d slow or stalled HTTP connection(s) since the last "
                             "such line (PACS_HTTP_TIMEOUT, connection limit)",
                             self.slow_closed)
                if self.tls_failed:
                    log.info("%d TLS handshake(s) failed since the last such line (the "
                             "last: %s)", self.tls_failed, self.tls_reason)
                self.slow_closed, self.tls_failed, self.last_report = 0, 0, now

    def _read_ready(self) -> None:
        """Read TLS connections with decrypted bytes left in OpenSSL's buffer."""
        ready, self.ready = self.ready, set()
        for conn in ready:
            if (self.connections.get(conn.sock.fileno()) is conn
                    and conn.state in (State.HEAD, State.IDLE, State.BODY, State.CLOSING)):
                try:
                    self._on_readable(conn)
                except Exception:
                    self.log.exception("Error handling an HTTP connection")
                    self._close(conn)

    def _drain_signals(self, fileobj: Any, mask: int) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:
            pass

    def _run_calls(self, fileobj: Any, mask: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self.wake_fds[0], 4096)
        while True:
            try:
                call = self.calls.get_nowait()
            except queue.Empty:
                return
            call()

    def _post(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the loop (from a thread)."""
        self.calls.put(call)
        with contextlib.suppress(OSError):  # the pipe is full: the loop wakes anyway
            os.write(self.wake_fds[1], b"\0")

    # -- connections --

    def _accept_enabled(self, enabled: bool) -> None:
        assert self.poller is not None
        if enabled == self.accepting:
            return
        for listener in self.sockets:
            if enabled:
                listener.setblocking(False)
                self.poller.register(listener, selectors.EVENT_READ, self._accept)
            else:
                self.poller.unregister(listener)
        self.accepting = enabled

    def _accept(self, listener: Any, mask: int) -> None:
        for _ in range(64):
            if len(self.connections) >= self.max_connections and not self._make_room():
                self._accept_enabled(False)
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._short_of_descriptors(exc)
                    return
                raise
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer, listener.getsockname())
            conn.deadline = time.monotonic() + self._limits.timeout
            if self.tls is not None:
                conn.state = State.HANDSHAKE
            self.connections[sock.fileno()] = conn
            self._watch(conn, selectors.EVENT_READ)

    def _short_of_descriptors(self, exc: OSError) -> None:
        """An accept failed for want of descriptors (or memory): close one connection
        as at the connection limit and accept on, or, when none can go, stop accepting
        for :data:`ACCEPT_PAUSE`.

        Connections queued by a flood of silent clients are accepted before a real
        client's: each closed one frees its descriptor at once, so the queue is worked
        through as fast as at the connection limit.  The pause ends by the clock
        (:meth:`_resume_accepting`), not only when one of this worker's connections
        closes: a shortage caused elsewhere (ENFILE, another process; descriptors held
        by the application's threads) left a worker without connections never
        accepting again.  Failures are counted for one log line every
        :data:`REPORT_SECONDS`.
        """
        self.accept_failed += 1
        self.accept_error = str(exc)
        if self._make_room():
            return
        self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
        self._accept_enabled(False)

    def _resume_accepting(self, now: float) -> None:
        """Accept again once a pause for want of descriptors is over (sweep)."""
        if (not self.accepting and self.alive and now >= self.accept_paused_until
                and len(self.connections) < self.max_connections):
            self._accept_enabled(True)

    def _make_room(self) -> bool:
        """Close one connection to make room for a new one; False when none can go.

        The oldest idle connection goes first, then the oldest one still in its TLS
        handshake, then the oldest one still sending its head, then one answered with an
        error, then the slowest sender of a body, then the oldest parked response: under
        a flood of slow clients, it is theirs.
        """
        now = time.monotonic()

        def rate(conn: Connection) -> float:
            received = conn.spool.size if conn.spool is not None else 0
            return received / max(now - conn.since, 1e-3)

        for state in (State.IDLE, State.HANDSHAKE, State.HEAD, State.CLOSING, State.BODY,
                      State.PARKED):
            # A streamed body is left to its timeout: its thread holds the connection.
            waiting = [c for c in self.connections.values()
                       if c.state is state and not c.streamed]
            if not waiting:
                continue
            victim = (min(waiting, key=rate) if state is State.BODY
                      else min(waiting, key=lambda c: c.since))
            log.debug("HTTP connection limit reached: closing a %s connection from %s",
                      state.value, _host(victim.peer))
            self.slow_closed += 1
            if state is State.PARKED:
                self._abort_parked(victim)
            else:
                self._close(victim)
            return True
        return False

    @property
    def _limits(self) -> Limits:
        assert self.limits is not None
        return self.limits

    def _watch(self, conn: Connection, events: int) -> None:
        assert self.poller is not None
        try:
            self.poller.modify(conn.sock, events, conn)
        except KeyError:
            self.poller.register(conn.sock, events, conn)
        if conn.lock is not None and events & selectors.EVENT_READ:
            # Bytes OpenSSL decrypted earlier (a pipelined request) wake no poll.
            with conn.lock:
                if _tls_socket(conn).pending():
                    self.ready.add(conn)

    def _unwatch(self, conn: Connection) -> None:
        assert self.poller is not None
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(conn.sock)

    def _close(self, conn: Connection) -> None:
        """Forget the connection and free what it holds (loop only)."""
        self._unwatch(conn)
        self.connections.pop(conn.sock.fileno(), None)
        self.ready.discard(conn)
        if conn.spool is not None:
            conn.spool.close()
            conn.spool = None
        if conn.lock is not None and conn.state not in (State.HANDSHAKE, State.CLOSING):
            self._close_notify(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._resume_accepting(time.monotonic())

    def _expire(self, conn: Connection) -> None:
        """A deadline passed: say why when the client is waiting for an answer."""
        if conn.state in (State.HANDSHAKE, State.HEAD, State.BODY, State.PARKED):
            self.slow_closed += 1
        if conn.state is State.HANDSHAKE:
            log.debug("HTTP client %s did not complete its TLS handshake in %g s",
                      _host(conn.peer), self._limits.timeout)
            self._close(conn)
        elif conn.state is State.HEAD and conn.data:
            log.debug("HTTP client %s sent no complete request head in %g s",
                      _host(conn.peer), self._limits.timeout)
            self._refuse(conn, BadRequest("408 Request Timeout",
                                          "the request head did not arrive in time"))
        elif conn.state is State.BODY:
            log.debug("HTTP client %s stopped sending its request body", _host(conn.peer))
            if conn.streamed:
                self._abort_stream(conn)
            else:
                self._refuse(conn, BadRequest("408 Request Timeout",
                                              "the request body stopped arriving"))
        elif conn.state is State.PARKED:
            log.debug("HTTP client %s stopped reading its response", _host(conn.peer))
            self._abort_parked(conn)
        else:  # idle, a silent new connection, or the end of lingering
            self._close(conn)

    def _refuse(self, conn: Connection, error: BadRequest) -> None:
        """Answer ``error`` and close once the client has had time to read it."""
        self._send_and_linger(conn, error_response(error.status, error.reason))

    def _send_and_linger(self, conn: Connection, answer: bytes) -> None:
        if conn.spool is not None:
            conn.spool.close()
            conn.spool = None
        try:
            if conn.lock is not None:
                if answer:
                    conn.sock.send(answer)
                self._close_notify(conn)
            else:
                conn.sock.send(answer)
            # On a TLS socket this also drops TLS: what lingers is read raw, discarded.
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = State.CLOSING
        conn.data = bytearray()
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._watch(conn, selectors.EVENT_READ)

    # -- TLS (loop) --

    def _handshake(self, conn: Connection) -> None:
        """Take the TLS handshake one step further, as far as the socket allows."""
        if conn.lock is None and not self._start_tls(conn):
            return
        try:
            _tls_socket(conn).do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except OSError as exc:  # ssl.SSLError (protocol, certificate) or a reset
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            log.debug("TLS handshake with %s failed: %s", _host(conn.peer), reason)
            self.tls_failed += 1
            self.tls_reason = str(reason)
            self._close(conn)
            return
        # The head follows within the same deadline: handshake and head together get
        # PACS_HTTP_TIMEOUT, as a plain connection's head does.
        conn.state = State.HEAD
        conn.tls_environ = tls.peer_environ(_tls_socket(conn))
        self._watch(conn, selectors.EVENT_READ)

    def _start_tls(self, conn: Connection) -> bool:
        """Wrap a new connection in TLS once its first byte shows a handshake; a plain
        HTTP request instead is answered 400 in clear.  False: not now, or not TLS."""
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._close(conn)
            return False
        if not first:
            self._close(conn)
            return False
        if first != TLS_HANDSHAKE_RECORD:
            log.debug("HTTP client %s sent plain HTTP to an HTTPS port", _host(conn.peer))
            self.tls_failed += 1
            self.tls_reason = "plain HTTP to an HTTPS port"
            self._refuse(conn, BadRequest("400 Bad Request",
                                          "this port serves HTTPS only: use https://"))
            return False
        assert self.tls is not None
        self._unwatch(conn)
        conn.sock = self.tls.wrap_socket(conn.sock, server_side=True,
                                         do_handshake_on_connect=False)
        conn.lock = threading.Lock()
        conn.writer = Writer(conn.sock, conn.lock)
        return True

    def _close_notify(self, conn: Connection) -> None:
        """Tell a TLS client that nothing follows (close_notify), without waiting."""
        assert conn.lock is not None
        with conn.lock, contextlib.suppress(OSError, ValueError):
            # Sends the alert, then wants the client's (SSLWantReadError): not awaited.
            _tls_socket(conn).unwrap()

    def _receive(self, conn: Connection, size: int) -> int:
        """Read up to ``size`` bytes into the scratch buffer; 0 when the client closed.

        Raises
        ------
        BlockingIOError
            When nothing can be read now.
        """
        if conn.lock is None:
            return conn.sock.recv_into(self.scratch, size)
        with conn.lock:
            count, more = tls_recv_into(_tls_socket(conn), self.scratch, size)
        if more:
            self.ready.add(conn)
        return count

    # -- reading (loop) --

    def _on_readable(self, conn: Connection) -> None:
        if conn.state is State.BODY:
            self._read_body(conn)
            return
        try:
            count = self._receive(conn, len(self.scratch)
                                  if conn.state is State.CLOSING else 64 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not count or conn.state is State.CLOSING:
            if not count:
                self._close(conn)
            return  # lingering: input is discarded
        if conn.state is State.IDLE:
            conn.state = State.HEAD
            conn.since = time.monotonic()
            conn.deadline = conn.since + self._limits.timeout
        conn.data += self.scratch[:count]
        self._take_head(conn)

    def _take_head(self, conn: Connection) -> None:
        """Parse the head once it is complete; refuse one that grows too large."""
        data = conn.data
        start = max(0, conn.scanned - 3)
        end = data.find(b"\r\n\r\n", start)
        bare = data.find(b"\n\n", start)  # a bare-LF head: let the parser refuse it
        if end < 0 and bare < 0:
            conn.scanned = len(data)
            if len(data) > MAX_HEAD_BYTES:
                self._head_error(conn, bytes(data))
            return
        stop = bare + 2 if end < 0 or 0 <= bare < end else end + 4
        if stop > MAX_HEAD_BYTES:
            self._head_error(conn, bytes(data[:stop]))
            return
        head = bytes(data[:stop])
        del data[:stop]
        conn.scanned = 0
        try:
            req = Request(self.cfg, IterUnreader([head]), conn.peer, conn.requests + 1)
        except Exception as exc:  # noqa: BLE001 - gunicorn's parser errors
            self._parse_error(conn, exc)
            return
        refusal = host_refusal(req)
        if refusal is not None:
            self._refuse(conn, BadRequest("400 Bad Request", refusal))
            return
        conn.requests += 1
        self._start_body(conn, req)

    def _head_error(self, conn: Connection, data: bytes) -> None:
        """A head over :data:`MAX_HEAD_BYTES`: gunicorn's verdict when it has one, or 431."""
        try:
            Request(self.cfg, IterUnreader([data]), conn.peer, conn.requests + 1)
        except Exception as exc:  # noqa: BLE001 - gunicorn's parser errors
            if type(exc).__name__ != "NoMoreData":
                self._parse_error(conn, exc)
                return
        self._refuse(conn, BadRequest("431 Request Header Fields Too Large",
                                      "the request head is too large"))

    def _parse_error(self, conn: Connection, exc: Exception) -> None:
        """The answer to a head gunicorn's parser refused (:meth:`handle_error`), then
        close once the client has had time to read it."""
        status = self._error_status(conn.peer, exc)
        self._send_and_linger(conn, error_response(status, status.split(" ", 1)[1]))

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's hook for a request that failed before the application answered,
        answered as the loop's own refusals are (:func:`error_response`: plain text,
        :data:`ERROR_HEADERS`), not with gunicorn's HTML page; one log line that names
        the error's type, never the request's text (its line may name a patient)."""
        status = self._error_status(addr, exc)
        try:
            client.sendall(error_response(status, status.split(" ", 1)[1]))
        except Exception:  # the client went away meanwhile
            log.debug("the answer to a failed request could not be sent", exc_info=True)

    def _error_status(self, addr: Any, exc: BaseException) -> str:
        """The status of a request that failed before the application answered, logged
        (invalid ones counted, in one line per interval)."""
        status = parse_error_status(exc)
        host = addr[0] if isinstance(addr, tuple) and addr else "?"
        if status is None or status == "500 Internal Server Error":
            log.error("a request from %s failed unexpectedly (%s)", host, type(exc).__name__)
            log.debug("the failure", exc_info=exc)
            return status or "500 Internal Server Error"
        self.invalid.note(time.monotonic(), f"{status} to {host}, {type(exc).__name__}")
        return status

    def _start_body(self, conn: Connection, req: Request) -> None:
        """Decide how the body is framed (as gunicorn's parser did) and start reading it."""
        from gunicorn.http.body import ChunkedReader, LengthReader

        reader = getattr(req.body, "reader", None)
        length: int | None
        if _other_codings(req):
            # gunicorn takes gzip, deflate or compress before chunked; only the chunked
            # framing is undone here, and the application would read compressed bytes
            # as the body (RFC 9112 6.1: a coding the server does not implement, 501).
            self._refuse(conn, BadRequest("501 Not Implemented",
                                          "no transfer coding but chunked"))
            return
        if isinstance(reader, ChunkedReader):
            length = None
        elif isinstance(reader, LengthReader):
            length = reader.length
        else:
            # No Content-Length and not chunked: a request has no body (RFC 9112 6.3).
            length = 0
        if length is not None and length > self._limits.max_body:
            self.too_large.note(time.monotonic(), f"{length} bytes from {_host(conn.peer)}, "
                                f"the limit {self._limits.max_body}")
            self._refuse(conn, _too_large(self._limits.max_body))
            return
        conn.req = req
        expects = expects_continue(req)
        if expects:
            # Answered here, before the body is read; the application must not see it
            # (and gunicorn's own late answer is dropped: Writer.send).
            req.headers = [(k, v) for k, v in req.headers if k != "EXPECT"]
        if length == 0:
            self._dispatch(conn)
            return
        try:
            conn.spool = Spool(self.memory, self._limits.spool_dir, length)
        except BadRequest as error:
            self.no_room.note(time.monotonic(), f"from {_host(conn.peer)}: {error.reason}")
            self._refuse(conn, error)
            return
        except OSError as exc:
            self.spool_failed.note(time.monotonic(), f"in {self._limits.spool_dir}: {exc}")
            self._refuse(conn, BadRequest("503 Service Unavailable",
                                          "the request cannot be received now"))
            return
        conn.state = State.BODY
        conn.since = time.monotonic()
        conn.left = length or 0
        conn.chunked = Chunked() if length is None else None
        conn.deadline = time.monotonic() + self._limits.timeout
        if expects and not conn.data:
            with contextlib.suppress(OSError):
                conn.sock.send(_CONTINUE)
        if conn.data:
            early, conn.data = bytes(conn.data), bytearray()
            self._take_body(conn, early)
        if (conn.state is State.BODY and length is not None and length >= STREAM_MIN_BYTES
                and self.streams.take(1)):
            # A thread of the streaming pool runs the application while the body
            # arrives: a client that stalls holds one of those, never one that other
            # requests need.  Chunked bodies are not streamed: past the limit they must
            # be answered 413, which only the loop can do before the application starts.
            conn.streamed = True
            self._dispatch(conn)

    def _read_body(self, conn: Connection) -> None:
        want = min(READ_BYTES, conn.left) if conn.chunked is None else READ_BYTES
        try:
            if conn.lock is None:
                data = conn.sock.recv(want)
            else:  # decrypted into the scratch buffer: one copy, as a plain body's
                data = bytes(self.scratch[:self._receive(conn, want)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            log.debug("HTTP client %s left in the middle of its request body",
                      _host(conn.peer))
            if conn.streamed:
                self._abort_stream(conn)
            else:
                self._close(conn)
            return
        conn.deadline = time.monotonic() + self._limits.timeout
        self._take_body(conn, data)

    def _take_body(self, conn: Connection, data: bytes) -> None:
        """Spool body bytes; what follows the body is kept for the next request."""
        assert conn.spool is not None
        try:
            if conn.chunked is None:
                take = min(len(data), conn.left)
                conn.spool.write(data[:take] if take < len(data) else data)
                conn.left -= take
                rest, complete = data[take:], not conn.left
            else:
                pieces, used = conn.chunked.feed(data)
                for piece in pieces:
                    conn.spool.write(piece)
                if conn.spool.size > self._limits.max_body:
                    self.too_large.note(time.monotonic(), f"chunked, from "
                                        f"{_host(conn.peer)}, the limit "
                                        f"{self._limits.max_body}")
                    raise _too_large(self._limits.max_body)
                rest, complete = data[used:], conn.chunked.done
        except (BadRequest, OSError) as exc:
            if isinstance(exc, OSError):
                self.spool_failed.note(time.monotonic(),
                                       f"in {self._limits.spool_dir}: {exc}")
                exc = BadRequest("503 Service Unavailable",
                                 "the request cannot be received now")
            if conn.streamed:  # the application answers; its body is incomplete
                self._abort_stream(conn)
            else:
                self._refuse(conn, exc)
            return
        if complete:
            conn.data = bytearray(rest)
            conn.spool.finish()
            if conn.streamed:  # a thread has it already
                self._unwatch(conn)
                conn.state = State.BUSY
                conn.deadline = 0.0
            else:
                self._dispatch(conn)

    def _dispatch(self, conn: Connection) -> None:
        """A thread runs the application: for a complete request, one of the pool;
        for a streamed one (its body still arriving), one of the streaming pool."""
        assert self.pool is not None and self.stream_pool is not None
        if not conn.streamed:
            self._unwatch(conn)
            conn.state = State.BUSY
            conn.deadline = 0.0
        body = (conn.spool.reader(2 * self._limits.timeout) if conn.spool is not None
                else io.BytesIO(b""))
        if conn.streamed:
            job = Job(self._serve, conn, body)
        elif self.waiting.take(1):
            job = Job(self._serve_waited, conn, body)
        else:
            self.too_busy.note(time.monotonic(), f"from {_host(conn.peer)}")
            self._refuse(conn, BadRequest("503 Service Unavailable",
                                          "too many requests wait for an answer"))
            return
        if not submit_job(self.stream_pool if conn.streamed else self.pool, job):
            if conn.streamed:
                self.streams.give(1)  # taken when its streaming began
            else:
                self.waiting.give(1)
            self._no_thread("can't start new thread")
            self._refuse(conn, BadRequest("503 Service Unavailable",
                                          "no thread can answer the request now"))

    def _serve_waited(self, conn: Connection, body: Any) -> None:
        """:meth:`_serve` for a request that waited for a thread (counted in
        :attr:`waiting` until now)."""
        self.waiting.give(1)
        self._serve(conn, body)

    def _no_thread(self, error: str) -> None:
        """A pool's thread could not be started: counted for the log (sweep)."""
        self.thread_failed += 1
        self.thread_error = error

    def _resume(self, call: Callable[..., None], *args: Any) -> None:
        """Hand a running response back to the pool (``_pump``, ``_finish``).  When no
        further thread can start, the call waits in the queue for one of the threads
        that served the request so far: it is not refused."""
        assert self.pool is not None
        try:
            self.pool.submit(call, *args)
        except RuntimeError as exc:
            if not cannot_start_thread(exc):
                raise
            self._no_thread(str(exc))

    def _abort_stream(self, conn: Connection) -> None:
        """A streamed body stops arriving: the application's next read past what
        arrived fails (:class:`SpoolReader`) and it answers (the answer may not reach
        the client); the connection closes after it."""
        assert conn.spool is not None
        conn.spool.abort()
        self._unwatch(conn)
        conn.state = State.BUSY
        conn.deadline = 0.0

    # -- responses (threads, and the loop for parked ones) --

    def _serve(self, conn: Connection, body: Any) -> None:
        """Run the application for the request of ``conn`` and start the response."""
        req = conn.req
        assert req is not None
        exchange = Exchange(req=req, resp=None, environ={}, body=body,
                            started=datetime.now(), streamed=conn.streamed)
        conn.exchange = exchange
        try:
            self.cfg.pre_request(self, req)
            # The writer stands in for the socket: gunicorn's response only sends on it.
            resp, environ = wsgi.create(req, cast(socket.socket, conn.writer), conn.peer,
                                        conn.server, self.cfg)
            exchange.resp, exchange.environ = resp, environ
            environ.update(conn.tls_environ)  # https, whatever a forwarder's header said
            environ["wsgi.input"] = body
            environ["wsgi.multithread"] = True
            environ[CLIENT_GONE] = ClientWatch(conn.sock.fileno())
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
                self._post(lambda: None)
            if not self.alive or self._limits.keepalive <= 0:
                resp.force_close()
            application: WSGIApp = self.wsgi  # start_response takes exc_info too
            exchange.respiter = application(environ, resp.start_response)
            if isinstance(exchange.respiter, wsgi.FileWrapper):
                exchange.respiter.blksize = max(exchange.respiter.blksize, FILE_BLOCK_BYTES)
            exchange.chunks = iter(exchange.respiter)
        except Exception as exc:  # noqa: BLE001 - the application's or the head's error
            if exchange.resp is not None and exchange.resp.headers_sent:
                self._abandon(conn, exc)
                return
            self.handle_error(req, cast(socket.socket, conn.writer), conn.peer, exc)
            exchange.finished, exchange.keep = True, False
        self._pump(conn)

    def _pump(self, conn: Connection) -> None:
        """Write the response until it is done, or park it when the client lags."""
        exchange = conn.exchange
        assert exchange is not None
        try:
            while True:
                if conn.writer.pending and not self._flush_or_park(conn):
                    return  # parked: the loop sends the rest, then calls us again
                if exchange.finished:
                    break
                assert exchange.chunks is not None and exchange.resp is not None
                try:
                    item = next(exchange.chunks)
                except StopIteration:
                    _close_unless_read(conn, exchange.resp)
                    exchange.resp.close()
                    exchange.finished = True
                    exchange.keep = self.alive and not exchange.resp.should_close()
                    continue
                _close_unless_read(conn, exchange.resp)
                exchange.resp.write(item)
        except Exception as exc:  # noqa: BLE001 - the client left, or the application failed
            self._abandon(conn, exc)
            return
        self._finish(exchange)
        self._post(lambda: self._done(conn, exchange.keep))

    def _flush_or_park(self, conn: Connection) -> bool:
        """Send what is pending; False when the rest was parked with the loop.

        Raises
        ------
        TimeoutError
            When the park budget is spent and the client read nothing for
            ``PACS_HTTP_TIMEOUT`` seconds.
        """
        writer, exchange = conn.writer, conn.exchange
        assert exchange is not None
        if exchange.streamed:
            # A thread of the streaming pool (the loop may still be reading the body):
            # it waits for the reader itself.
            if writer.flush(self._limits.timeout):
                return True
            raise TimeoutError("the client stopped reading the response")
        if writer.flush(WRITE_GRACE):
            return True
        size = writer.pending_bytes
        if self.park.take(size):
            exchange.parked = size
            self._post(lambda: self._park(conn))
            return False
        if writer.flush(self._limits.timeout):
            return True
        raise TimeoutError("the client stopped reading the response")

    def _park(self, conn: Connection) -> None:
        conn.state = State.PARKED
        conn.since = time.monotonic()
        conn.deadline = conn.since + self._limits.timeout
        self._watch(conn, selectors.EVENT_WRITE)

    def _on_writable(self, conn: Connection) -> None:
        """Send a parked response's rest; give it back to a thread once it has gone."""
        assert self.pool is not None
        try:
            sent = conn.writer.send_some()
        except OSError:
            self._abort_parked(conn)
            return
        if sent:
            conn.deadline = time.monotonic() + self._limits.timeout
        if conn.writer.pending:
            return
        self._unpark(conn)
        self._unwatch(conn)
        conn.state = State.BUSY
        conn.deadline = 0.0
        self._resume(self._pump, conn)

    def _unpark(self, conn: Connection) -> None:
        if conn.exchange is not None and conn.exchange.parked:
            self.park.give(conn.exchange.parked)
            conn.exchange.parked = 0

    def _abort_parked(self, conn: Connection) -> None:
        """The client of a parked response stopped reading (or left): drop it."""
        assert self.pool is not None
        self._unpark(conn)
        exchange = conn.exchange
        self._close(conn)
        if exchange is not None:
            self._resume(self._finish, exchange)

    def _abandon(self, conn: Connection, exc: BaseException) -> None:
        """A response that cannot be completed: log why, close the connection."""
        if isinstance(exc, TimeoutError):
            log.debug("HTTP client %s stopped reading its response", _host(conn.peer))
        elif isinstance(exc, OSError) and exc.errno in _GONE:
            log.debug("HTTP client %s left before its response was sent", _host(conn.peer))
        else:
            self.log.exception("Error handling request")
        if conn.exchange is not None:
            self._finish(conn.exchange)
        self._post(lambda: self._close(conn))

    def _finish(self, exchange: Exchange) -> None:
        """Close the application's iterable; gunicorn's access log and hook."""
        if exchange.streamed:
            self.streams.give(1)
        try:
            if hasattr(exchange.respiter, "close"):
                exchange.respiter.close()
        except Exception:
            self.log.exception("Error closing the response")
        if exchange.resp is not None:
            self.log.access(exchange.resp, exchange.req, exchange.environ,
                            datetime.now() - exchange.started)
        try:
            self.cfg.post_request(self, exchange.req, exchange.environ, exchange.resp)
        except Exception:
            self.log.exception("Exception in post_request hook")

    def _done(self, conn: Connection, keep: bool) -> None:
        """The response was sent: wait for the next request, or close (loop)."""
        if conn.state is State.BODY:
            # Answered before its body had arrived (a refusal): the rest is not read.
            self._send_and_linger(conn, b"")
            return
        if conn.spool is not None:
            keep = keep and conn.spool.finished and not conn.spool.aborted
            conn.spool.close()
            conn.spool = None
        conn.exchange = None
        conn.req = None
        conn.streamed = False
        if not keep or not self.alive:
            self._close(conn)
            return
        now = time.monotonic()
        conn.since = now
        if conn.data:  # the client sent its next request already
            conn.state = State.HEAD
            conn.deadline = now + self._limits.timeout
            self._watch(conn, selectors.EVENT_READ)
            self._take_head(conn)
        else:
            conn.state = State.IDLE
            conn.deadline = now + self._limits.keepalive
            self._watch(conn, selectors.EVENT_READ)


def expects_continue(req: Request) -> bool:
    """True when the client waits for ``100 Continue`` before sending the body.

    RFC 9110 10.1.1: ``Expect: 100-continue`` (case-insensitive) on an HTTP/1.1 or
    later request; an HTTP/1.0 request's expectation is ignored.  gunicorn's parser has
    refused any other expectation (417); read from the parsed head's public headers.
    """
    version = req.version or (1, 0)
    return tuple(version) >= (1, 1) and any(
        name == "EXPECT" and value.strip().lower() == "100-continue"
        for name, value in req.headers)


def _too_large(limit: int) -> BadRequest:
    return BadRequest("413 Content Too Large",
                      f"the request body is larger than this server accepts ({limit} bytes)")


def _tls_socket(conn: Connection) -> ssl.SSLSocket:
    """The socket of a TLS connection, as such."""
    return cast(ssl.SSLSocket, conn.sock)


def _host(peer: Any) -> str:
    """The client's address for the log (a port means nothing to a reader)."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
