"""STOW-RS client (PS3.18 10.5): stored instances sent to a DICOMweb server, a batch per
request, as a forwarding :class:`~pacs.core.forwarding.Sender`.

The request is ``POST <base>/studies`` with ``multipart/related;
type="application/dicom"``: each part the stored object's bytes as received (Part 10,
never re-encoded), streamed from the store with a Content-Length computed from the
objects' sizes, so a batch is never held in memory.  Credentials in the URL
(``https://user:password@host/...``) go in a Basic ``Authorization`` header.

What the answer means for each instance (PS3.18 10.5.3, Table 10.5.3-1):

=========================  ==============================================================
200                        every instance stored
202, 409                   the response's FailedSOPSequence (0008,1198) lists failures:
                           refused for good, except FailureReason A7xx (out of
                           resources) and 0110 (processing failure), sent again;
                           instances in ReferencedSOPSequence (0008,1199) stored; others
                           sent again
408, 429, 5xx, no answer   sent again after the destination's backoff
other 4xx                  refused for good (the request itself is wrong: credentials,
                           size, media type)
=========================  ==============================================================
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import urllib3

from pacs.core.audit import Participant
from pacs.core.forwarding import Delivery, Result
from pacs.core.query.model import InstanceRef
from pacs.core.routes import shown
from pacs.core.storage import ObjectStore

log = logging.getLogger(__name__)

#: Largest response body read (the JSON answer of a batch is a few KiB per instance).
MAX_RESPONSE_BYTES = 16 << 20
#: Most bytes of the answer read at once (``read1``: what one receive brings).
ANSWER_PIECE = 64 << 10
#: Bytes read from the store per chunk of the request body.
CHUNK = 1 << 20
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
_REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON = "00081155", "00081197"


def _transient_reason(reason: int) -> bool:
    """A FailureReason worth sending again: out of resources (A7xx), processing
    failure (0110)."""
    return reason >> 8 == 0xA7 or reason == 0x0110


class StowSender:
    """Sends batches to one STOW-RS endpoint.

    Parameters
    ----------
    url : str
        The DICOMweb base URL (``…/dicom-web``); requests go to ``<url>/studies``.
    store : ObjectStore
        Where the objects are.
    timeout : float
        Seconds to connect; four times that to wait for the answer (the server stores
        the whole batch before it answers), and to read it whole once it begins (a
        destination that sends it a byte at a time does not hold the sender for ever:
        it is given up at the first read past that time, each read bounded by it too).
    """

    def __init__(self, url: str, store: ObjectStore, timeout: float) -> None:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.endpoint = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/studies",
                                    "", ""))
        self.headers: dict[str, str] = {"Accept": "application/dicom+json"}
        if parts.username is not None:
            token = f"{parts.username}:{parts.password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        self.store = store
        self.receiver = Participant(shown(url), False, address=parts.hostname or "")
        self.answer_seconds = 4 * timeout
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=4 * timeout),
            retries=urllib3.Retry(total=0, redirect=0), maxsize=1)

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        """POST ``refs`` in one request; a :class:`Delivery` per instance."""
        boundary = secrets.token_hex(16)
        try:
            sizes = [self.store.size(ref.object_key) for ref in refs]
        except Exception as exc:  # noqa: BLE001 - the store is down: try again later
            return [Delivery(Result.RETRY, f"store: {type(exc).__name__}: {exc}")] * len(refs)
        length = sum(len(self._part_head(boundary)) + size + 2 for size in sizes)
        length += len(self._tail(boundary))
        headers = {**self.headers, "Content-Length": str(length),
                   "Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}"}
        try:
            response = self._pool.request(
                "POST", self.endpoint, body=self._body(refs, sizes, boundary),
                headers=headers, preload_content=False)
            try:
                status = response.status
                answer = _answer(response, time.monotonic() + self.answer_seconds)
            finally:
                response.release_conn()
        except Exception as exc:  # noqa: BLE001 - network, TLS, a short object: again later
            return [Delivery(Result.RETRY, f"{type(exc).__name__}: {exc}")] * len(refs)
        return deliveries(refs, status, answer)

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
            An object whose size changed since it was measured (stored again meanwhile):
            the request is cut short and the batch sent again.
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
            if sent != size:
                raise OSError("an object changed while it was sent")
            yield b"\r\n"
        yield self._tail(boundary)

    def close(self) -> None:
        """Close the connection pool."""
        self._pool.clear()


def _answer(response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
    """The answer's body, at most :data:`MAX_RESPONSE_BYTES` + 1 bytes (more is not
    read: unreadable), read by the piece until ``deadline``.

    Raises
    ------
    TimeoutError
        The answer was still arriving at ``deadline``.
    """
    body = bytearray()
    while len(body) <= MAX_RESPONSE_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took too long to arrive")
        piece = response.read1(min(ANSWER_PIECE, MAX_RESPONSE_BYTES + 1 - len(body)))
        if not piece:
            break
        body += piece
    return bytes(body)


def deliveries(refs: Sequence[InstanceRef], status: int, answer: bytes) -> list[Delivery]:
    """Each instance's outcome from a STOW-RS answer: its HTTP status and body (the
    module's table)."""
    if status == 200:
        return [Delivery(Result.SENT, "HTTP 200")] * len(refs)
    if status not in (202, 409):
        result = (Result.REFUSED if 400 <= status < 500 and status not in (408, 429)
                  else Result.RETRY)
        return [Delivery(result, f"HTTP {status}")] * len(refs)
    failed, stored = _sequences(answer)
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


def _sequences(answer: bytes) -> tuple[dict[str, int], set[str]]:
    """(failed SOP Instance UID -> FailureReason, stored SOP Instance UIDs) of a STOW-RS
    response body; empty when it cannot be read."""
    if len(answer) > MAX_RESPONSE_BYTES:
        return {}, set()
    try:
        document: Any = json.loads(answer or b"{}")
    except (ValueError, RecursionError):  # nested past the parser's depth: unreadable
        return {}, set()
    if isinstance(document, list) and document:  # some servers wrap it in an array
        document = document[0]
    if not isinstance(document, dict):
        return {}, set()
    failed: dict[str, int] = {}
    for item in _items(document, _FAILED_SOP_SEQUENCE):
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        reason = _first(item, _FAILURE_REASON)
        if isinstance(uid, str):
            failed[uid] = int(reason) if isinstance(reason, int) else 0x0110
    stored = {uid for item in _items(document, _REFERENCED_SOP_SEQUENCE)
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
