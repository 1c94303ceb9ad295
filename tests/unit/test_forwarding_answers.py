"""What a destination's answer means for each forwarded instance: C-STORE statuses
(:func:`pacs.dimse.forward.delivery_of`) and STOW-RS responses
(:class:`pacs.core.stow.StowSender`), and the routes' destinations as shown."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pacs.core import audit
from pacs.core.audit import AuditLog, AuditTrail, Participant, Source
from pacs.core.forwarding import Delivery, Result, transfer
from pacs.core.query.model import InstanceRef
from pacs.core.storage.memory import MemoryStore
from pacs.core.stow import StowSender, deliveries
from pacs.dimse.forward import delivery_of


@pytest.mark.parametrize(("status", "result"), [
    (0x0000, Result.SENT), (0xB000, Result.SENT), (0x0111, Result.SENT),
    (0xA700, Result.RETRY), (0xA7FF, Result.RETRY), (None, Result.RETRY),
    (0xA900, Result.REFUSED), (0xC000, Result.REFUSED), (0x0122, Result.REFUSED),
])
def test_c_store_statuses(status: int | None, result: Result) -> None:
    assert delivery_of(status).result is result


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
        "00081198": {"vr": "SQ", "Value": [_item("1.1", 0xC000), _item("1.2", 0xA700)]},
        "00081199": {"vr": "SQ", "Value": [_item("1.3")]}}).encode()
    results = [d.result for d in deliveries(refs, 202, answer)]
    assert results == [Result.REFUSED, Result.RETRY, Result.SENT, Result.RETRY]
    assert {d.result for d in deliveries(refs, 200, b"")} == {Result.SENT}
    for status, result in ((400, Result.REFUSED), (401, Result.REFUSED),
                           (413, Result.REFUSED), (408, Result.RETRY), (429, Result.RETRY),
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


def test_an_answer_sent_a_byte_at_a_time_is_given_up(tmp_path: Path) -> None:
    """A STOW-RS destination that answers its head at once, then a byte every 0.1 s
    (each within the read timeout) is given up once the answer's own time has passed
    (four times the timeout), the batch to be sent again: before, each read's
    timeout was the only bound, and the forwarding thread waited for ever."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/dicom+json"
                         b"\r\nContent-Length: 100000\r\n\r\n")
            while not stop.wait(0.1):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    store = MemoryStore()
    ref = InstanceRef("1.2", "1.3", "1.4", "1.2.840.10008.5.1.4.1.1.2",
                      "1.2.840.10008.1.2.1", "1.2/1.3/1.4.dcm", 10)
    store.put(ref.object_key, io.BytesIO(b"x" * 10), 10)
    sender = StowSender(f"http://127.0.0.1:{port}/dicom-web", store, 0.25)
    started = time.monotonic()
    try:
        [delivery] = sender.send([ref])
    finally:
        stop.set()
        sender.close()
        server.close()
    assert delivery.result is Result.RETRY and "TimeoutError" in delivery.detail
    assert time.monotonic() - started < 3.0
    thread.join(5)
