"""Failed DICOMweb logins against ``pacs serve`` (adapters/http/auth.py,
pacs/core/logins.py): a client guessing passwords gets 429 with Retry-After after
``PACS_AUTH_FAILURES`` failures, while another client address logs in; once the window
has passed, its credentials are checked again.  The failures and the lock-out are in
the audit trail and the node's log, without the passwords.

Clients call from different loopback addresses (127.0.0.2, 127.0.0.3: a socket bound
to its source address; the node listens on 127.0.0.1) with ``PACS_LOOPBACK_ROLES``
empty, so that loopback needs credentials as another host would.  One web worker, so
that every request meets the same count (it is kept per worker process).
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Callable

import pytest

from tests.auditcheck import event_name, problems, read_trail
from tests.interop.conftest import PATIENCE, Node

pytestmark = [pytest.mark.interop]

USER, PASSWORD = "alice", "right-horse-battery"
FAILURES, WINDOW = 3, 10  # the guesses fit in the window on a loaded machine
GUESSER, OTHER = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory("login-limit", PACS_WEB_WORKERS="1", PACS_VIEWER_PORT="0",
                        PACS_LOOPBACK_ROLES="", PACS_WEB_USER=USER,
                        PACS_WEB_PASSWORD=PASSWORD, PACS_AUTH_FAILURES=str(FAILURES),
                        PACS_AUTH_WINDOW=str(WINDOW), PACS_UPLOADS_POLL="0")


def get(node: Node, source: str, password: str | None = None,
        user: str = USER) -> http.client.HTTPResponse:
    """GET /studies from ``source`` on a new connection (read whole)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(node.env["PACS_WEB_PORT"]),
                                            timeout=30, source_address=(source, 0))
    headers = {}
    if password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        connection.request("GET", "/studies", headers=headers)
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def wait_ready(node: Node) -> None:
    """Until the web worker answers (503 while it builds its application); a request
    without credentials is not a failed login."""
    deadline = time.monotonic() + PATIENCE
    while get(node, OTHER).status == 503 and time.monotonic() < deadline:
        time.sleep(0.2)


def test_guessing_is_refused_after_the_limit_and_heard_again_after_the_window(
        node: Node) -> None:
    wait_ready(node)
    assert get(node, OTHER).status == 401  # no credentials: the challenge, as always
    for guess in range(FAILURES):
        assert get(node, GUESSER, f"guess-{guess}").status == 401
    locked = get(node, GUESSER, PASSWORD)  # even the right password is not looked at
    assert locked.status == 429
    assert 1 <= int(locked.getheader("Retry-After") or "0") <= WINDOW
    assert get(node, GUESSER).status == 401  # without credentials: still 401
    # Another address logs in with the right password, and is refused a wrong one.
    assert get(node, OTHER, PASSWORD).status == 200
    assert get(node, OTHER, "nope").status == 401
    # Once the window has passed, the guesser's credentials are checked again.
    deadline = time.monotonic() + WINDOW + PATIENCE
    while (answer := get(node, GUESSER, PASSWORD)).status == 429 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer.status == 200
    assert get(node, GUESSER, "one-more-guess").status == 401
    trail_and_log_name_the_failures_but_no_password(node)


def trail_and_log_name_the_failures_but_no_password(node: Node) -> None:
    """The failed logins of both addresses and the guesser's lock-out are in the trail
    (PS3.15 A.5.3.12, A.5.3.11) and the log; no password is in either."""
    path = node.data_dir / "audit.jsonl"
    events = read_trail(path)
    for event in events:
        assert problems(event) == [], event
    failed = [e["ActiveParticipant"][0]["NetworkAccessPointID"] for e in events
              if event_name(e) == "User Authentication"]
    # The guesser's first failure in each web worker is written at once, the others of
    # its minute counted into one record later (pacs.core.audit.Coalescer).
    assert GUESSER in failed and OTHER in failed
    alerts = [e for e in events if event_name(e) == "Security Alert"
              and any(p.get("NetworkAccessPointID") == GUESSER
                      for p in e["ActiveParticipant"])]
    assert alerts, json.dumps(events, indent=1)
    log = node.log()
    assert f"Failed DICOMweb login from {GUESSER}" in log
    assert f"DICOMweb logins of address {GUESSER} refused" in log
    for secret in (PASSWORD, "guess-0", "nope"):
        assert secret not in log and secret not in path.read_text()
