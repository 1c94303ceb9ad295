"""What a destination's answer means for each forwarded instance: C-STORE statuses
(:func:`pacs.dimse.forward.delivery_of`) and STOW-RS responses
(:class:`pacs.core.stow.StowSender`), and the routes' destinations as shown."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pacs.core import audit
from pacs.core.audit import AuditLog, AuditTrail, Participant, Source
from pacs.core.errors import ConfigError
from pacs.core.forwarding import Delivery, Result, transfer
from pacs.core.query.model import InstanceRef
from pacs.core.routes import load_routes
from pacs.core.storage.memory import MemoryStore
from pacs.core.stow import StowSender, answer_limit, deliveries, retry_after_seconds
from pacs.dimse.forward import delivery_of


@pytest.mark.parametrize(("status", "result"), [
    (0x0000, Result.SENT), (0xB000, Result.SENT), (0x0111, Result.SENT),
    (0xA700, Result.RETRY), (0xA7FF, Result.RETRY), (None, Result.RETRY),
    (0xA900, Result.REFUSED), (0xC000, Result.REFUSED), (0x0122, Result.REFUSED),
    # Not authorized: the destination refuses this node (its rules do not know it
    # yet), not the instance; refused for good, a whole backlog failed in seconds.
    (0x0124, Result.RETRY),
    # An instance a rejection note removed there, sent again: never accepted again
    # (IHE RAD TF-2 4.66.4); sent again after each backoff, it held the queue for good.
    (0xA771, Result.REFUSED),
    # A failure of the destination's own (this node answers it for a fault of its own),
    # as the STOW-RS sender takes it.
    (0x0110, Result.RETRY),
])
def test_c_store_statuses(status: int | None, result: Result) -> None:
    assert delivery_of(status).result is result
    # No response: the destination stopped answering on this instance.
    assert delivery_of(status).suspect is (status is None)


def _ref(uid: str) -> InstanceRef:
    return InstanceRef("1.2", "1.3", uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                       f"k/{uid}", 10)


def _item(uid: str, reason: int | None = None) -> dict[str, object]:
    item: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def test_stow_answers() -> None:
    sender = StowSender("https://user:secret@example.org:8443/dicom-web", MemoryStore(), 5)
    assert sender.endpoint == "https://example.org:8443/dicom-web/studies"
    assert sender.headers["Authorization"].startswith("Basic ")
    assert sender.receiver.user_id == "https://example.org:8443/dicom-web"  # no password
    refs = [_ref("1.1"), _ref("1.2"), _ref("1.3"), _ref("1.4")]
    answer = json.dumps({
        "00081198": {"vr": "SQ", "Value": [_item("1.1", 0xC000), _item("1.2", 0xA700),
                                             _item("1.4", 0xA771)]},
        "00081199": {"vr": "SQ", "Value": [_item("1.3")]}}).encode()
    results = [d.result for d in deliveries(refs, 202, answer)]
    assert results == [Result.REFUSED, Result.RETRY, Result.SENT, Result.REFUSED]
    assert {d.result for d in deliveries(refs, 200, b"")} == {Result.SENT}
    # 401, 403, 404, 405, 407, 421: the destination refuses this node or has no such
    # service (credentials expired, a proxy's route missing), which says nothing of
    # the instances: sent again after its backoff, not a whole backlog failed.
    for status, result in ((400, Result.REFUSED), (401, Result.RETRY), (403, Result.RETRY),
                           (404, Result.RETRY), (405, Result.RETRY), (407, Result.RETRY),
                           (421, Result.RETRY), (413, Result.REFUSED), (415, Result.REFUSED),
                           (408, Result.RETRY), (429, Result.RETRY),
                           (500, Result.RETRY), (503, Result.RETRY)):
        assert {d.result for d in deliveries(refs, status, b"")} == {result}
    # An answer that does not read: nothing is known to be stored.
    assert {d.result for d in deliveries(refs, 409, b"<html>")} == {Result.RETRY}
    sender.close()


def test_an_answer_nested_past_the_parser_is_unreadable() -> None:
    """A 202 answer of 100,000 nested arrays makes the JSON parser give up
    (RecursionError): nothing is known to be stored, so every instance waits for the
    destination's backoff."""
    refs = [_ref("1.1"), _ref("1.2")]
    assert {d.result for d in deliveries(refs, 202, b"[" * 100_000)} == {Result.RETRY}


class _Broken:
    receiver = Participant("BROKEN", False)

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        raise RecursionError("maximum recursion depth exceeded")

    def close(self) -> None:
        pass


def test_a_sender_that_raises_fails_its_batch_and_is_audited(tmp_path: Path) -> None:
    """A sender that raises all the same (a defect) settles its batch as failed, to be
    sent again after the backoff, and the attempt is in the audit trail: before, the
    exception escaped before both, and the forwarder sent the batch again a second
    later, for ever."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditLog(path), Source("NODE", "site"))
    results = transfer(_Broken(), [_ref("1.1"), _ref("1.2")], trail, "test")
    assert [d.result for d in results] == [Result.RETRY, Result.RETRY]
    assert "RecursionError" in results[0].detail
    trail.close()
    event = json.loads(path.read_text().splitlines()[-1])
    assert event["EventIdentification"]["EventOutcomeIndicator"] == audit.SERIOUS_FAILURE


#: What hostile STOW-RS destinations send once the request arrived, a piece every 0.1 s
#: (or at once, without end): each receive of the sender is within its own timeout.
_ANSWERS = {
    "a body a byte at a time": (b"HTTP/1.1 202 Accepted\r\nContent-Type: "
                                b"application/dicom+json\r\nContent-Length: 100000\r\n\r\n",
                                b" ", 0.1),
    "a head a byte at a time": (b"HTTP/1.1 202 Accepted\r\n", b"X", 0.1),
    "interim responses without end": (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 64, 0.0),
}


class _Destination:
    """A STOW-RS destination of one request: it reads the request's first bytes, then
    ``behave(connection, stop)``s."""

    def __init__(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/dicom-web"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(behave,), daemon=True)
        self.thread.start()

    def _serve(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
            try:
                behave(conn, self.stop)
            except OSError:
                return

    def send(self, timeout: float) -> Delivery:
        """One stored instance sent to it with ``timeout``; its delivery."""
        store = MemoryStore()
        ref = InstanceRef("1.2", "1.3", "1.4", "1.2.840.10008.5.1.4.1.1.2",
                          "1.2.840.10008.1.2.1", "1.2/1.3/1.4.dcm", 10)
        store.put(ref.object_key, io.BytesIO(b"x" * 10), 10)
        sender = StowSender(self.url, store, timeout)
        try:
            [delivery] = sender.send([ref])
        finally:
            self.stop.set()
            sender.close()
            self.server.close()
        self.thread.join(5)
        return delivery


@pytest.mark.parametrize("behaviour", sorted(_ANSWERS))
def test_an_answer_that_never_ends_is_given_up(behaviour: str) -> None:
    """An answer whose head, body or interim responses keep coming, each piece within
    the read timeout, is given up once the answer's own time has passed (twice four
    times the timeout from the request's end: the connection is shut), the batch to
    be sent again: before, each read's timeout was the only bound, and the forwarding
    thread waited (or spun a core on interim responses) for ever."""
    head, piece, pause = _ANSWERS[behaviour]

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.wait(pause):
            conn.sendall(piece)

    started = time.monotonic()
    delivery = _Destination(answer).send(0.25)
    assert delivery.result is Result.RETRY
    # Given up (the watchdog: eight times the 0.25 s timeout), where the peer would go
    # on for ever: a bound far above the watchdog, so that a loaded machine passes too.
    assert time.monotonic() - started < 30


def test_an_answer_within_four_times_the_timeout_is_awaited() -> None:
    """The destination stores the whole batch before it answers: its answer is awaited
    four times the timeout (urllib3 set the socket's timeout back to the timeout itself
    as the request started and as the answer was awaited: a batch stored and answered
    after it was sent again, for ever)."""
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait(1.0)  # twice the timeout below, half of four times it
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    delivery = _Destination(answer).send(0.5)
    assert delivery.result is Result.SENT, delivery


def test_interim_responses_before_the_answer_are_read_past() -> None:
    """A ``103 Early Hints`` (and a ``102``) before the answer: a client reads past every
    interim response to the final one (RFC 9110 15.2); before, the 103 was taken for the
    answer and the batch sent again, for ever."""
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n"
                     b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        stop.wait(10)  # open until the sender has read it

    delivery = _Destination(answer).send(1.0)
    assert delivery.result is Result.SENT, delivery


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date; unreadable or absent: none; a date
    past: no wait."""
    now = 1_000_000_000.0  # Sun, 09 Sep 2001 01:46:40 GMT
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds("Sun, 09 Sep 2001 01:47:40 GMT", now) == 60.0
    assert retry_after_seconds("Sun, 09 Sep 2001 01:45:40 GMT", now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("-5", now) is None
    assert retry_after_seconds(None, now) is None


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b3", "\u0664\u0662",
                                   "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
                                   "Mon, 01 Jan 10000 00:00:00 GMT", "1.5", "nan"])
def test_an_unreadable_retry_after_asks_no_wait(value: str) -> None:
    """Digits other than ASCII (a head is decoded as Latin-1: byte B2 is "²") and dates
    past any calendar are no wait asked: ``float("²")`` and a year past the largest
    raised, and the delivery was sent again."""
    assert retry_after_seconds(value, 1_000_000_000.0) is None


def test_a_stored_batch_is_sent_whatever_its_retry_after() -> None:
    """A 200 carrying a ``Retry-After`` the sender cannot read is a batch stored: the
    header is read for a 429 or 503 only (a 200 with byte B2 there was sent again, for
    ever)."""
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n")
        stop.wait(10)  # open until the sender has read it

    delivery = _Destination(answer).send(1.0)
    assert delivery.result is Result.SENT, delivery


def test_only_a_429_or_503_carries_its_retry_after() -> None:
    ref = InstanceRef("1.2", "1.3", "1.4", "1.2.840.10008.5.1.4.1.1.2",
                      "1.2.840.10008.1.2.1", "1.2/1.3/1.4.dcm", 10)
    [busy] = deliveries([ref], 503, b"", retry_after=30.0)
    assert (busy.result, busy.retry_after) == (Result.RETRY, 30.0)
    [limited] = deliveries([ref], 429, b"", retry_after=5.0)
    assert limited.retry_after == 5.0
    [broken] = deliveries([ref], 500, b"", retry_after=30.0)
    assert (broken.result, broken.retry_after) == (Result.RETRY, None)


def test_a_destination_s_retry_after_reaches_the_delivery() -> None:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 42\r\n"
                     b"Content-Length: 0\r\n\r\n")
        stop.wait(10)  # open until the sender has read it

    delivery = _Destination(answer).send(1.0)
    assert (delivery.result, delivery.retry_after) == (Result.RETRY, 42.0), delivery


def test_a_delivery_s_detail_is_one_bounded_line() -> None:
    """What a destination sent (an HTTP status line in an error) reaches ``pacs status``
    and the logs with its control characters escaped, cut short: a terminal escape
    cleared the operator's screen."""
    detail = Delivery(Result.RETRY, "BadStatusLine: '2OO \x1b[2J\x1b[31mA\r" + "A" * 70000).detail
    assert "\x1b" not in detail and "\r" not in detail and "\\x1b[2J" in detail
    assert len(detail) < 400


def test_what_a_destination_sent_stays_out_of_a_failed_delivery() -> None:
    """An answer http.client cannot read is kept as its type alone: its message is the
    destination's own line (which the delivery's detail carries to the log, the
    audit trail and ``pacs status``)."""
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"MARKER PATIENT DOE^JOHN 19010203\r\n\r\n")
        stop.wait(10)  # open until the answer is read (closed: the body's send may break)

    delivery = _Destination(answer).send(2.0)
    assert delivery.result is Result.RETRY
    assert delivery.detail == "BadStatusLine" and "MARKER" not in delivery.detail


def test_a_refused_connection_says_so() -> None:
    """The error a library wraps around a refused connection keeps the system's words
    for it (``[Errno 111] Connection refused``): refused, unreachable and timed out
    stay apart in ``pacs status``."""
    from tests.conftest import free_port

    store = MemoryStore()
    ref = InstanceRef("1.2", "1.3", "1.4", "1.2.840.10008.5.1.4.1.1.2",
                      "1.2.840.10008.1.2.1", "1.2/1.3/1.4.dcm", 10)
    store.put(ref.object_key, io.BytesIO(b"x" * 10), 10)
    sender = StowSender(f"http://127.0.0.1:{free_port()}/dicom-web", store, 2.0)
    try:
        [delivery] = sender.send([ref])
    finally:
        sender.close()
    assert delivery.result is Result.RETRY
    assert "Connection refused" in delivery.detail, delivery.detail


@pytest.mark.parametrize("url", [
    "https://localhost:41282/Zq9+w@archive.example.org/dicom-web",  # a '/' in a password
    "https://svc:#Zq9w@archive.example.org/dicom-web",              # a '#'
    "https://svc:Se#cret@archive.example.org/dicom-web",            # a port that is none
    "https://svc:a?b@archive.example.org/dicom-web",                # a '?'
    "https:///dicom-web",                                           # no host
])
def test_a_url_that_would_send_elsewhere_is_refused(url: str) -> None:
    """A user name or password holding '/', '?' or '#' not percent-encoded made the rest
    of the URL the host: the study went to ``localhost:41282`` (RFC 3986 3.2.1); a
    '#' made the start of the password a port, and ``pacs status`` a traceback that
    showed it."""
    with pytest.raises(ConfigError):
        StowSender(url, MemoryStore(), 5)
    with pytest.raises(ConfigError):
        load_routes(f"out: -> {url}", "")


def test_percent_encoded_credentials_are_sent_decoded() -> None:
    sender = StowSender("https://svc%40north:p%2Fss%23w@archive.example.org/dicom-web",
                        MemoryStore(), 5)
    token = sender.headers["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(token) == b"svc@north:p/ss#w"
    assert sender.endpoint == "https://archive.example.org/dicom-web/studies"


def test_a_409_stores_nothing_and_every_data_set_of_an_array_counts() -> None:
    """PS3.18 Table 10.5.3-1: a 409 stores none of the instances, whatever its body
    lists as stored; an answer wrapped in an array is read whole (only its first data
    set was)."""
    refs = [_ref("1.1"), _ref("1.2")]
    stored = json.dumps({"00081199": {"vr": "SQ", "Value": [_item("1.1"), _item("1.2")]}})
    assert {d.result for d in deliveries(refs, 409, stored.encode())} == {Result.RETRY}
    wrapped = json.dumps([{"00081199": {"vr": "SQ", "Value": [_item("1.1")]}},
                          {"00081198": {"vr": "SQ", "Value": [_item("1.2", 0xC000)]}}])
    assert [d.result for d in deliveries(refs, 202, wrapped.encode())] == [
        Result.SENT, Result.REFUSED]


def test_a_200_answer_that_lists_failures_is_believed() -> None:
    """A 200 whose body lists instances failed (or leaves some out of its stored ones)
    is read as a 202 is: before, every instance of a 200 was taken as delivered."""
    refs = [_ref("1.1"), _ref("1.2"), _ref("1.3")]
    answer = json.dumps({"00081198": {"vr": "SQ", "Value": [_item("1.1", 0x0122)]},
                         "00081199": {"vr": "SQ", "Value": [_item("1.2")]}}).encode()
    assert [d.result for d in deliveries(refs, 200, answer)] == [
        Result.REFUSED, Result.SENT, Result.RETRY]
    assert {d.result for d in deliveries(refs, 200, b"")} == {Result.SENT}


def test_an_answer_past_the_batch_s_limit_is_not_parsed() -> None:
    """An answer far larger than a batch's (16 MiB of empty objects took 430 MB to
    parse): unreadable, nothing known stored."""
    refs = [_ref("1.1")]
    huge = b"[" + b"{}," * (answer_limit(1) // 3) + b"{}]"
    assert {d.result for d in deliveries(refs, 202, huge)} == {Result.RETRY}


def test_credentials_over_plain_http_are_warned_about(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    StowSender("http://svc:hunter2@archive.example.org/dicom-web", MemoryStore(), 5)
    assert "use https" in caplog.text and "hunter2" not in caplog.text
    caplog.clear()
    StowSender("https://svc:hunter2@archive.example.org/dicom-web", MemoryStore(), 5)
    assert caplog.text == ""



def test_pacs_send_names_its_operator_as_the_requestor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pacs send`` is told from the node's own forwarding in the trail: its events
    name the operator (login name, host) as requestor, as ``pacs delete`` does, and
    the node as a source that is not."""
    import getpass

    import pydicom
    from click.testing import CliRunner

    from pacs.cli import main
    from tests.conftest import free_port, sample

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_MODALITIES", f"GONE=127.0.0.1:{free_port()}")  # no one there
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(sample("CT_small.dcm").read_bytes())
    runner = CliRunner()
    assert runner.invoke(main, ["import", "--quiet", str(folder)]).exit_code == 0
    study = str(pydicom.dcmread(folder / "ct.dcm", stop_before_pixels=True).StudyInstanceUID)
    result = runner.invoke(main, ["send", "--quiet", "--to", "GONE", study])
    assert result.exit_code == 1, result.output  # not delivered, and audited
    events = [json.loads(line) for line in
              (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if "pacs send" in
                e["EventIdentification"].get("EventOutcomeDescription", "")]
    node, destination, operator = event["ActiveParticipant"]
    assert operator["UserID"] == getpass.getuser() and operator["UserIsRequestor"]
    assert operator["NetworkAccessPointID"] == socket.gethostname()
    assert not node["UserIsRequestor"] and destination["UserID"] == "GONE"


class _Recording(BaseHTTPRequestHandler):
    """A STOW-RS destination that stores every request it reads whole (200) and keeps
    the bytes of each request as it got them (``bodies`` of the server)."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        self.server.bodies.append(body)  # type: ignore[attr-defined]
        if len(body) == length:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def _recording() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web", server.bodies  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def _stored(store: MemoryStore, uid: str, data: bytes) -> InstanceRef:
    ref = InstanceRef("1.2", "1.3", uid, "1.2.840.10008.5.1.4.1.1.2",
                      "1.2.840.10008.1.2.1", f"1.2/1.3/{uid}.dcm", len(data))
    store.put(ref.object_key, io.BytesIO(data), len(data))
    return ref


def test_an_object_missing_here_is_sent_again_later_and_the_others_now() -> None:
    """An instance whose object this node's store lacks is not sent (sent again later,
    and kept as failed by the outbox once passed over often enough); the rest of the
    batch goes: before, the whole batch was sent again for ever, and nothing after it
    ever reached the destination."""
    store = MemoryStore()
    first = _stored(store, "1.4.1", b"a" * 40)
    lost = _stored(store, "1.4.2", b"b" * 40)
    last = _stored(store, "1.4.3", b"c" * 40)
    store.delete(lost.object_key)
    with _recording() as (url, bodies):
        results = StowSender(url, store, 5).send([first, lost, last])
    assert [d.result for d in results] == [Result.SENT, Result.RETRY, Result.SENT]
    assert "no such object" in results[1].detail or "store:" in results[1].detail
    # Its own fault: counted as passed over even in a batch that delivered nothing.
    assert [d.suspect for d in results] == [False, True, False]
    (body,) = bodies
    assert b"a" * 40 in body and b"c" * 40 in body and b"b" * 40 not in body


class _Racy(MemoryStore):
    """Opening the first object is when another association stores the second again."""

    def __init__(self) -> None:
        super().__init__()
        self.then: Callable[[], None] | None = None

    def open(self, key: str) -> Any:
        if self.then is not None:
            then, self.then = self.then, None
            then()
        return super().open(key)


@pytest.mark.parametrize("grown", [True, False])
def test_an_object_stored_again_while_sent_is_never_sent_cut(grown: bool) -> None:
    """The second object is stored again, longer or shorter, after the request's
    length was counted: the request is cut short before that part ends and the batch
    sent again, so the destination never has a whole request holding a prefix of the
    new object (or the old one padded) as if it were whole."""
    store = _Racy()
    first = _stored(store, "1.4.1", b"a" * 40)
    second = _stored(store, "1.4.2", b"b" * 40)
    again = b"B" * (60 if grown else 20)
    store.then = lambda: store.put(second.object_key, io.BytesIO(again), len(again))
    with _recording() as (url, bodies):
        results = StowSender(url, store, 5).send([first, second])
    assert [d.result for d in results] == [Result.RETRY, Result.RETRY]
    assert all(not body.rstrip().endswith(b"--") for body in bodies)  # no closing boundary
