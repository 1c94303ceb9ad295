"""STOW-RS client (PS3.18 10.5): stored instances sent to a DICOMweb server, a batch per
request, as a forwarding :class:`~pacs.core.forwarding.Sender`.

The request is ``POST <base>/studies`` with ``multipart/related;
type="application/dicom"``: each part the stored object's bytes as received (Part 10,
never re-encoded), streamed from the store with a Content-Length computed from the
objects' sizes, so a batch is never held in memory.  Credentials in the URL
(``https://user:password@host/...``, percent-encoded, RFC 3986 3.2.1) go in a Basic
``Authorization`` header, decoded.

What the answer means for each instance (PS3.18 10.5.3, Table 10.5.3-1):

=========================  ==============================================================
200                        every instance stored, unless a body says otherwise (read
                           as for 202: an answer whose sequences list an instance
                           failed, or leave it out, is believed)
202, 409                   the response's FailedSOPSequence (0008,1198) lists failures:
                           refused for good, except FailureReason A7xx (out of
                           resources) and 0110 (processing failure), sent again;
                           instances in ReferencedSOPSequence (0008,1199) stored (not
                           after a 409: it stores none); others sent again
408, 429, 5xx, no answer   sent again after the destination's backoff, or after the
                           ``Retry-After`` of a 429 or 503 when longer (RFC 9110
                           10.2.3; at most ``PACS_FORWARD_RETRY_MAX``)
401, 403, 404, 405, 407,   the same: the destination refuses this node or has no such
421                        service (credentials expired or not yet given, a proxy's
                           route missing), which says nothing of the instances; refused
                           for good, a whole backlog would be failed in seconds
1xx                        interim: read past, to the final answer (RFC 9110 15.2)
other 4xx                  refused for good (the request's content is wrong: size,
                           media type, a malformed part)
=========================  ==============================================================

The answer is bounded in time and size: its head and body must arrive within eight
times the timeout of the request's end (a connection watchdog shuts the socket then, so
a head sent a byte at a time, or interim ``100`` responses without end, cannot hold the
sending thread), and a body past :func:`answer_limit` is not read.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from pacs.core.audit import Participant
from pacs.core.errors import NotFound
from pacs.core.forwarding import Delivery, Result
from pacs.core.logs import failure_text
from pacs.core.query.model import InstanceRef
from pacs.core.rejection import REFUSED_AGAIN
from pacs.core.routes import check_url, shown
from pacs.core.storage import ObjectStore

log = logging.getLogger(__name__)

#: A STOW-RS answer holds an item of a few hundred bytes per instance (its Referenced or
#: Failed SOP Sequence item, a Retrieve URL): the largest body read is this much per
#: instance of the batch, and a base (see :func:`answer_limit`).
ANSWER_BASE_BYTES, ANSWER_BYTES_PER_INSTANCE = 64 << 10, 16 << 10
#: Most bytes of the answer read at once (``read1``: what one receive brings).
ANSWER_PIECE = 64 << 10
#: Bytes read from the store per chunk of the request body.
CHUNK = 1 << 20
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
_REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON = "00081155", "00081197"


def _transient_reason(reason: int) -> bool:
    """A FailureReason worth sending again: out of resources (A7xx, but A771: the
    instance was rejected there, refused for good), processing failure (0110)."""
    return (reason >> 8 == 0xA7 and reason != REFUSED_AGAIN) or reason == 0x0110


class StowSender:
    """Sends batches to one STOW-RS endpoint.

    Parameters
    ----------
    url : str
        The DICOMweb base URL (``…/dicom-web``); requests go to ``<url>/studies``.
        One :func:`pacs.core.routes.check_url` refuses raises ConfigError.
    store : ObjectStore
        Where the objects are.
    timeout : float
        Seconds to connect; four times that for each send and receive, to wait for
        the answer (the server stores the whole batch before it answers) and to read
        it whole once it begins (a destination that sends it a byte at a time does not
        hold the sender for ever: it is given up at the first read past that time);
        eight times that for the answer, head and body, from the request's end, after
        which the connection is shut.
    """

    def __init__(self, url: str, store: ObjectStore, timeout: float) -> None:
        check_url(url)
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.endpoint = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/studies",
                                    "", ""))
        self.scheme, self.host = parts.scheme, parts.hostname or ""
        self.port = parts.port
        self.path = urlsplit(self.endpoint).path
        self.headers: dict[str, str] = {"Accept": "application/dicom+json"}
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
            if parts.scheme.lower() != "https":
                log.warning("forwarding to %s sends its credentials readable on the "
                            "network: use https", shown(url))
        self.store = store
        self.receiver = Participant(shown(url), False, address=parts.hostname or "")
        self.timeout = timeout
        self.answer_seconds = 4 * timeout

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        """POST ``refs`` in one request; a :class:`Delivery` per instance.  An
        instance whose object this node's store lacks is not sent, and sent again
        later (:class:`pacs.core.forwarding.Outbox` keeps it as failed once others
        have gone past it often enough); the others are sent."""
        sizes: dict[int, int] = {}
        missing: dict[int, Delivery] = {}
        for place, ref in enumerate(refs):
            try:
                sizes[place] = self.store.size(ref.object_key)
            except NotFound as exc:
                # Its own fault, counted as passed over even when the batch delivered
                # nothing (a batch of missing objects would stop the queue for good).
                missing[place] = Delivery(Result.RETRY, f"store: {failure_text(exc)}",
                                          suspect=True)
            except Exception as exc:  # noqa: BLE001 - the store is down: try again later
                return [Delivery(Result.RETRY, f"store: {failure_text(exc)}")] * len(refs)
        sent = self._post([refs[place] for place in sizes], list(sizes.values())) if sizes else []
        answered = dict(zip(sizes, sent, strict=True))
        return [missing[place] if place in missing else answered[place]
                for place in range(len(refs))]

    def _post(self, refs: Sequence[InstanceRef], sizes: Sequence[int]) -> list[Delivery]:
        """POST ``refs``, their objects of ``sizes`` bytes, in one request."""
        boundary = secrets.token_hex(16)
        length = sum(len(self._part_head(boundary)) + size + 2 for size in sizes)
        length += len(self._tail(boundary))
        headers = {**self.headers, "Content-Length": str(length),
                   "Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}"}
        limit = answer_limit(len(refs))
        try:
            status, answer, retry_after = self._exchange(
                self._body(refs, sizes, boundary), headers, limit)
        except Exception as exc:  # noqa: BLE001 - network, TLS, a short object: again later
            return [Delivery(Result.RETRY, failure_text(exc))] * len(refs)
        return deliveries(refs, status, answer, limit, retry_after)

    def _exchange(self, body: Iterator[bytes], headers: dict[str, str],
                  limit: int) -> tuple[int, bytes, float | None]:
        """POST ``body`` on a connection of its own; the answer's status, body and
        ``Retry-After`` (:func:`retry_after_seconds`).

        Once the body is sent, a watchdog shuts the connection down after twice
        :attr:`answer_seconds`: http.client reads a head line by line, and interim
        responses without end, each receive within its own timeout.
        """
        connection_class = _Secure if self.scheme == "https" else _Plain
        conn = connection_class(self.host, self.port, timeout=self.timeout)
        watchdog: threading.Timer | None = None
        try:
            conn.connect()
            # Each send and receive from here on: urllib3 sets the connection's timeout
            # on the socket again as the request starts and as its answer is awaited.
            conn.timeout = self.answer_seconds
            conn.request("POST", self.path, body=body, headers=headers,
                         preload_content=False)
            watchdog = threading.Timer(2 * self.answer_seconds, _shut, (conn,))
            watchdog.daemon = True
            watchdog.start()
            response = conn.getresponse()
            # Read only where it counts: never may a header decide a 2xx's outcome.
            asked = (retry_after_seconds(response.headers.get("Retry-After"))
                     if response.status in WAIT_ASKED else None)
            return (response.status,
                    _answer(response, time.monotonic() + self.answer_seconds, limit),
                    asked)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            conn.close()

    @staticmethod
    def _part_head(boundary: str) -> bytes:
        return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()

    @staticmethod
    def _tail(boundary: str) -> bytes:
        return f"--{boundary}--\r\n".encode()

    def _body(self, refs: Sequence[InstanceRef], sizes: Sequence[int],
              boundary: str) -> Iterator[bytes]:
        """The multipart body, read from the store a chunk at a time.

        Raises
        ------
        OSError
            An object whose size changed since it was measured (stored again meanwhile,
            shorter or longer): the request is cut short, before its last part ends,
            and the batch sent again; never a prefix of an object sent as whole.
        """
        for ref, size in zip(refs, sizes, strict=True):
            yield self._part_head(boundary)
            sent = 0
            with self.store.open(ref.object_key) as source:
                while sent < size:
                    chunk = source.read(min(CHUNK, size - sent))
                    if not chunk:
                        break
                    sent += len(chunk)
                    yield chunk
                grown = sent == size and source.read(1) != b""
            if sent != size or grown:
                raise OSError("an object changed while it was sent")
            yield b"\r\n"
        yield self._tail(boundary)

    def close(self) -> None:
        """Nothing is kept between batches (each has a connection of its own)."""


class _FinalAnswer(http.client.HTTPResponse):
    """A response read past every interim (1xx) response before the final one, as a
    client must (RFC 9110 15.2: a ``103 Early Hints`` before a STOW-RS answer was taken
    for the answer, and the batch sent again for ever); http.client skips ``100`` only.
    ``101`` (the connection leaves HTTP/1.1) is not skipped."""

    def _read_status(self) -> tuple[str, int, str]:
        version, status, reason = super()._read_status()  # type: ignore[misc]
        if 100 < status < 200 and status != 101:
            # begin() skips the head of a 100 and reads the next status line.
            return version, http.client.CONTINUE, reason
        return version, status, reason


class _Plain(HTTPConnection):
    response_class = _FinalAnswer


class _Secure(HTTPSConnection):
    response_class = _FinalAnswer


def _shut(conn: HTTPConnection) -> None:
    """The watchdog's end of an answer that took too long: a receive blocked on it
    returns at once."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def answer_limit(count: int) -> int:
    """The largest answer read for a batch of ``count`` instances."""
    return ANSWER_BASE_BYTES + ANSWER_BYTES_PER_INSTANCE * count


def _answer(response: urllib3.BaseHTTPResponse, deadline: float, limit: int) -> bytes:
    """The answer's body, at most ``limit`` + 1 bytes (more is not read: unreadable),
    read by the piece until ``deadline``.

    Raises
    ------
    TimeoutError
        The answer was still arriving at ``deadline``.
    """
    body = bytearray()
    while len(body) <= limit:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took too long to arrive")
        piece = response.read1(min(ANSWER_PIECE, limit + 1 - len(body)))
        if not piece:
            break
        body += piece
    return bytes(body)


#: The 4xx answers after which a batch is sent again (the module's table): a timeout, too
#: many requests, and the refusals of this node or of the request's target, not of its
#: instances (RFC 9110 15.5).
AGAIN_4XX = frozenset({401, 403, 404, 405, 407, 408, 421, 429})
#: The answers whose ``Retry-After`` the sender heeds: Too Many Requests and Service
#: Unavailable (RFC 9110 10.2.3, RFC 6585 4).
WAIT_ASKED = (429, 503)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds an HTTP ``Retry-After`` asks to wait (RFC 9110 10.2.3: delay-seconds or
    an HTTP-date), none below 0; ``None`` when absent or unreadable.

    The value is the destination's, so anything may come: digits other than ASCII
    (http.client decodes a head as Latin-1: ``"²"``), a date past any calendar.
    Whatever cannot be read is no wait asked, never an error.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # an HTTP-date is GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def deliveries(refs: Sequence[InstanceRef], status: int, answer: bytes,
               limit: int | None = None, retry_after: float | None = None
               ) -> list[Delivery]:
    """Each instance's outcome from a STOW-RS answer: its HTTP status, body and
    ``Retry-After`` in seconds (the module's table; ``limit``: the largest body read,
    :func:`answer_limit`)."""
    if status not in (200, 202, 409):
        result = (Result.REFUSED if 400 <= status < 500 and status not in AGAIN_4XX
                  else Result.RETRY)
        asked = retry_after if status in WAIT_ASKED else None
        return [Delivery(result, f"HTTP {status}", asked)] * len(refs)
    failed, stored = _sequences(answer, answer_limit(len(refs)) if limit is None else limit)
    if status == 200 and not failed and not stored:
        return [Delivery(Result.SENT, "HTTP 200")] * len(refs)
    if status == 409:
        stored = set()  # "unable to store any instances" (PS3.18 Table 10.5.3-1)
    found = []
    for ref in refs:
        if ref.sop_uid in failed:
            reason = failed[ref.sop_uid]
            result = Result.RETRY if _transient_reason(reason) else Result.REFUSED
            found.append(Delivery(result, f"HTTP {status}, FailureReason "
                                               f"{reason:04X}"))
        elif ref.sop_uid in stored:
            found.append(Delivery(Result.SENT, f"HTTP {status}"))
        else:
            found.append(Delivery(Result.RETRY, f"HTTP {status}, not in the answer"))
    return found


def _sequences(answer: bytes, limit: int) -> tuple[dict[str, int], set[str]]:
    """(failed SOP Instance UID -> FailureReason, stored SOP Instance UIDs) of a STOW-RS
    response body; empty when it cannot be read (or is over ``limit``)."""
    if len(answer) > limit:
        return {}, set()
    try:
        document: Any = json.loads(answer or b"{}")
    except (ValueError, RecursionError):  # nested past the parser's depth: unreadable
        return {}, set()
    # Some servers wrap it in an array: every data set of it counts.
    documents = document if isinstance(document, list) else [document]
    failed: dict[str, int] = {}
    stored: set[str] = set()
    for one in documents:
        if not isinstance(one, dict):
            continue
        for item in _items(one, _FAILED_SOP_SEQUENCE):
            uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
            reason = _first(item, _FAILURE_REASON)
            if isinstance(uid, str):
                failed[uid] = int(reason) if isinstance(reason, int) else 0x0110
        stored |= {uid for item in _items(one, _REFERENCED_SOP_SEQUENCE)
                   if isinstance(uid := _first(item, _REFERENCED_SOP_INSTANCE_UID), str)}
    return failed, stored


def _items(document: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = document.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> object:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None
