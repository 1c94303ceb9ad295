"""Failed DICOMweb logins through the application's own middleware
(adapters/http/auth.py, pacs/core/logins.py): 429 with Retry-After before any password
is hashed, other clients untouched, the audit trail's User Authentication events and
Security Alert.

The node's own ports are in tests/interop/test_login_limit.py; here the clock is the
test's, so the window passes without waiting.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from falcon import testing

from adapters.dicomweb.app import create_app
from pacs.core import access
from pacs.core.logins import LoginLimiter
from pacs.core.services import Services
from tests.auditcheck import event_name, problems, read_trail
from tests.clock import Clock

LIMIT, WINDOW = 3, 60.0
MALLORY, ALICE_HOME = "192.0.2.66", "192.0.2.10"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode())
            .decode()}


@pytest.fixture
def clock() -> Clock:
    return Clock(5000.0)


@pytest.fixture
def node(make_services: Callable[..., Services], clock: Clock) -> Services:
    services = make_services(web_user="alice", web_password="s3cret", web_token="tok-123")
    services.logins = LoginLimiter(LIMIT, WINDOW, clock=clock)
    return services


@pytest.fixture
def client(node: Services) -> testing.TestClient:
    return testing.TestClient(create_app(node))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password the node runs scrypt over (verify_password, spied)."""
    seen: list[str] = []
    original = access.verify_password

    def spy(password: str, stored: str) -> bool:
        seen.append(password)
        return original(password, stored)

    monkeypatch.setattr(access, "verify_password", spy)
    return seen


def get(client: testing.TestClient, address: str,
        headers: dict[str, str] | None = None) -> testing.Result:
    return client.simulate_get("/studies", remote_addr=address, headers=headers or {},
                               protocol="https")


def test_after_the_limit_credentials_get_429_unchecked_until_the_window_passes(
        client: testing.TestClient, clock: Clock, hashed: list[str]) -> None:
    for guess in range(LIMIT):
        assert get(client, MALLORY, basic("alice", f"guess{guess}")).status_code == 401
    assert len(hashed) == LIMIT
    clock.now += 20
    for headers in (basic("alice", "s3cret"), basic("bob", "x"),
                    {"Authorization": "Bearer tok-123"}):
        refused = get(client, MALLORY, headers)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == str(int(WINDOW - 20))
        assert "WWW-Authenticate" not in refused.headers
    assert len(hashed) == LIMIT  # no scrypt for a refused request
    # Without credentials: the usual 401 and its challenge, nothing counted.
    assert get(client, MALLORY).status_code == 401
    # Another address, the right password: in (alice's name is locked only for
    # addresses that failed).
    assert get(client, ALICE_HOME, basic("alice", "s3cret")).status_code == 200
    clock.now += WINDOW - 20
    assert get(client, MALLORY, basic("alice", "s3cret")).status_code == 200
    assert get(client, MALLORY, basic("alice", "wrong")).status_code == 401  # checked


def test_failures_and_the_lockout_are_in_the_audit_trail(
        client: testing.TestClient, node: Services) -> None:
    for guess in range(LIMIT):
        get(client, MALLORY, basic("alice", f"guess{guess}"))
    assert get(client, MALLORY, basic("alice", "s3cret")).status_code == 429
    node.audit.flush(everything=True)  # the failures after the first are counted
    events = read_trail(node.settings.data_dir / "audit.jsonl")
    for event in events:
        assert problems(event) == [], event
    logins = [e for e in events if event_name(e) == "User Authentication"]
    alerts = [e for e in events if event_name(e) == "Security Alert"]
    assert len(logins) == 2  # the first failure, then one record of the others
    assert logins[1]["EventIdentification"]["EventOutcomeDescription"].startswith(
        f"wrong credentials; {LIMIT - 1} more refusal(s)")
    for event in logins:
        user, authenticator = event["ActiveParticipant"]
        assert (user["UserID"], user["NetworkAccessPointID"], user["UserIsRequestor"]) == (
            "alice", MALLORY, True)
        assert authenticator["UserIsRequestor"] is False  # the node
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
        assert event["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110122"
    (alert,) = alerts
    assert alert["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110126"
    assert "client address" in alert["EventIdentification"]["EventOutcomeDescription"]
    assert any(p.get("NetworkAccessPointID") == MALLORY for p in alert["ActiveParticipant"])
    text = (node.settings.data_dir / "audit.jsonl").read_text()
    assert "guess" not in text and "s3cret" not in text  # never a password


def test_a_success_does_not_reset_a_count(client: testing.TestClient) -> None:
    for guess in range(LIMIT - 1):
        get(client, MALLORY, basic("alice", f"guess{guess}"))
    assert get(client, MALLORY, basic("alice", "s3cret")).status_code == 200
    assert get(client, MALLORY, basic("alice", "last")).status_code == 401
    assert get(client, MALLORY, basic("alice", "s3cret")).status_code == 429


def test_a_claimed_user_name_is_cut_in_the_trail(client: testing.TestClient,
                                                  node: Services) -> None:
    # The name of a failed login is the client's text: a header's worth of it in every
    # event would let a guesser write kilobytes into the trail per try.
    claimed = "x" * 4000
    assert get(client, MALLORY, basic(claimed, "guess")).status_code == 401
    events = read_trail(node.settings.data_dir / "audit.jsonl")
    users = [p["UserID"] for e in events for p in e["ActiveParticipant"]
             if p["UserIsRequestor"]]
    assert users and all(user == claimed[:128] for user in users), users


def test_a_removal_checks_its_credentials_once(make_services: Callable[..., Services],
                                               clock: Clock, hashed: list[str]) -> None:
    """A DICOMweb removal is asked for its method's role by the middleware, then for
    ``admin`` by the removal: the credentials are checked, and a failure counted, once
    per request.  From this host the loopback roles let it in whatever its credentials
    (a study it does not find: 404); wrong ones counted twice per request locked the
    address out after half the limit."""
    services = make_services(web_user="alice", web_password="s3cret", web_delete=True)
    services.logins = LoginLimiter(LIMIT, WINDOW, clock=clock)
    client = testing.TestClient(create_app(services))
    for attempt in range(1, LIMIT + 1):
        result = client.simulate_delete("/studies/1.2.3", remote_addr="127.0.0.1",
                                        headers=basic("alice", f"wrong{attempt}"))
        assert result.status_code == 404, (attempt, result.status)
        assert len(hashed) == attempt  # one scrypt per request, while not locked out
    client.simulate_delete("/studies/1.2.3", remote_addr="127.0.0.1",
                           headers=basic("alice", "s3cret"))
    assert len(hashed) == LIMIT  # locked out after LIMIT requests: not checked
