"""Credentials over plain HTTP only from loopback (adapters/http/auth.py).

A request from another host over plain HTTP gets 403 "HTTPS required" whatever it
carries, without a challenge and without its secret being compared; over HTTPS the
credentials decide (401 without valid ones).  From loopback, credentials over plain HTTP
still open the door (a TLS proxy on the node's host, a local script).  The peer address
and the scheme are what the WSGI server says (``REMOTE_ADDR``, ``wsgi.url_scheme``): a
``X-Forwarded-Proto`` header of the client changes neither.

The node's HTTP ports run on real sockets in tests/interop/test_https.py; a source
address of another host cannot be had there (127.0.0.0/8 is loopback to the rule), so
the rule for other hosts is checked here, through the applications' own middleware.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from adapters.dicomweb.app import create_app
from adapters.http import auth
from pacs.core.access import AccessPolicy
from pacs.core.services import Services
from pacs.node.apps import viewer_port

REMOTE = "10.20.30.40"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


GOOD_BASIC = _basic("alice", "s3cret")
GOOD_BEARER = "Bearer tok-123"


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every secret the access rule checks (the policy's password and token checks,
    spied)."""
    seen: list[str] = []
    for name in ("by_password", "by_token"):
        original = getattr(AccessPolicy, name)

        def spy(self: AccessPolicy, *args: str, _original: Any = original) -> Any:
            seen.append(args[-1])
            return _original(self, *args)

        monkeypatch.setattr(AccessPolicy, name, spy)
    return seen


@pytest.fixture
def client(make_services: Callable[..., Services]) -> testing.TestClient:
    services = make_services(web_user="alice", web_password="s3cret", web_token="tok-123",
                             web_hosts=("pacs.example.org",))
    return testing.TestClient(create_app(services))


@pytest.mark.parametrize("authorization", [GOOD_BASIC, GOOD_BEARER, _basic("alice", "no"),
                                           "Bearer wrong", None])
def test_other_hosts_over_plain_http_get_403_and_no_secret_is_compared(
        client: testing.TestClient, compared: list[str], authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    result = client.simulate_get("/studies", remote_addr=REMOTE, headers=headers)
    assert result.status_code == 403
    assert result.json["title"] == "HTTPS required"
    assert "HTTPS" in result.json["description"]
    assert "WWW-Authenticate" not in result.headers  # no browser prompt over plain HTTP
    assert compared == []


def test_a_forwarded_proto_header_of_the_client_is_not_https(
        client: testing.TestClient, compared: list[str]) -> None:
    result = client.simulate_get("/studies", remote_addr=REMOTE, headers={
        "Authorization": GOOD_BASIC, "X-Forwarded-Proto": "https",
        "Forwarded": "proto=https"})
    assert result.status_code == 403
    assert compared == []


def test_stow_from_another_host_over_plain_http_is_refused_before_the_body(
        client: testing.TestClient, compared: list[str]) -> None:
    result = client.simulate_post("/studies", remote_addr=REMOTE, body=b"x" * 1000,
                                  headers={"Authorization": GOOD_BASIC,
                                           "Content-Type": "application/dicom"})
    assert result.status_code == 403
    assert compared == []


@pytest.mark.parametrize(("authorization", "status"), [
    (GOOD_BASIC, 200), (GOOD_BEARER, 200), (_basic("alice", "no"), 401),
    ("Bearer wrong", 401), (None, 401)])
def test_other_hosts_over_https_are_judged_by_their_credentials(
        client: testing.TestClient, compared: list[str], authorization: str | None,
        status: int) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    result = client.simulate_get("/studies", remote_addr=REMOTE, headers=headers,
                                 protocol="https")
    assert result.status_code == status
    if status == 401:
        assert "Basic" in result.headers["WWW-Authenticate"]
    if authorization:
        assert compared  # the secret was looked at, over HTTPS


def test_loopback_may_send_credentials_over_plain_http(
        client: testing.TestClient, compared: list[str]) -> None:
    # A TLS proxy on this host forwards its clients' credentials over plain HTTP with
    # their Host (a name not in PACS_WEB_HOSTS): the node checks them.
    good = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "proxy.example.org", "Authorization": GOOD_BASIC})
    assert good.status_code == 200
    assert compared
    wrong = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "proxy.example.org", "Authorization": _basic("alice", "no")})
    assert wrong.status_code == 421
    # And the loopback rule itself is unchanged: no credentials needed for its names.
    plain = client.simulate_get("/studies", remote_addr="::1", headers={"Host": "localhost"})
    assert plain.status_code == 200


def test_open_on_purpose_answers_plain_http_and_ignores_credentials(
        make_services: Callable[..., Services], compared: list[str]) -> None:
    client = testing.TestClient(create_app(make_services(
        web_open=True, web_user="alice", web_password="s3cret")))
    for authorization in (GOOD_BASIC, _basic("alice", "no")):
        result = client.simulate_get("/studies", remote_addr=REMOTE,
                                     headers={"Authorization": authorization})
        assert result.status_code == 200
    assert compared == []


def test_cors_preflights_pass_over_plain_http(make_services: Callable[..., Services]) -> None:
    services = make_services(cors_origins=("http://viewer.example",),
                             web_user="alice", web_password="s3cret")
    client = testing.TestClient(create_app(services))
    preflight = client.simulate_options("/studies", remote_addr=REMOTE, headers={
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"})
    assert preflight.status_code in (200, 204)
    refused = client.simulate_get("/studies", remote_addr=REMOTE,
                                  headers={"Origin": "http://viewer.example",
                                           "Authorization": GOOD_BASIC})
    assert refused.status_code == 403
    assert refused.headers["Access-Control-Allow-Origin"] == "http://viewer.example"


@pytest.mark.parametrize("path", ["/", "/app-config.js", "/dicom-web/studies"])
def test_the_viewer_port_applies_the_same_rule(make_services: Callable[..., Services],
                                               tmp_path: Path, compared: list[str],
                                               path: str) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    client = testing.TestClient(viewer_port(
        make_services(web_user="alice", web_password="s3cret"), dist))
    plain = client.simulate_get(path, remote_addr=REMOTE,
                                headers={"Authorization": GOOD_BASIC})
    assert plain.status_code == 403
    assert "WWW-Authenticate" not in plain.headers
    assert compared == []
    secure = client.simulate_get(path, remote_addr=REMOTE, protocol="https",
                                 headers={"Authorization": GOOD_BASIC})
    assert secure.status_code == 200
    asked = client.simulate_get(path, remote_addr=REMOTE, protocol="https")
    assert asked.status_code == 401
    assert asked.headers["WWW-Authenticate"].startswith("Basic")


def test_the_verdicts() -> None:
    from pacs.core.config import Settings

    access = auth.Access(Settings(web_user="alice", web_password="s3cret"))
    verdict = auth.Verdict
    assert access.decide(REMOTE, GOOD_BASIC, "x", secure=False) is verdict.HTTPS_REQUIRED
    assert access.decide(REMOTE, GOOD_BASIC, "x", secure=True) is verdict.ALLOW
    assert access.decide(REMOTE, None, "x", secure=True) is verdict.UNAUTHORIZED
    assert access.decide("127.0.0.1", None, "evil.example") is verdict.MISDIRECTED
    assert access.decide("127.0.0.1", GOOD_BASIC, "evil.example") is verdict.ALLOW
    assert access.decide("127.0.0.1", None, "localhost") is verdict.ALLOW
    assert not access.allowed(REMOTE, GOOD_BASIC, "x")


def test_answers_over_https_ask_for_https_alone(
        make_services: Callable[..., Services], tmp_path: Path) -> None:
    """Strict-Transport-Security (RFC 6797) on every answer over HTTPS, refusals
    included, on the DICOMweb port and on both parts of the viewer port: a browser
    then lets no certificate warning be clicked through on an origin that takes
    passwords.  Over plain HTTP it is not sent."""
    services = make_services(web_user="alice", web_password="s3cret")
    (tmp_path / "index.html").write_text("<!doctype html><title>OHIF</title>")
    ports = ((create_app(services), ("/studies",)),
             (viewer_port(services, tmp_path), ("/", "/dicom-web/studies")))
    for app, paths in ports:
        client = testing.TestClient(app)
        for path in paths:
            for headers in ({}, {"Authorization": GOOD_BASIC}):  # 401, 200
                answer = client.simulate_get(path, remote_addr=REMOTE, protocol="https",
                                             headers=headers)
                assert answer.headers.get("Strict-Transport-Security") == \
                    "max-age=31536000", (path, answer.status_code)
            plain = client.simulate_get(path, remote_addr="127.0.0.1")
            assert plain.status_code == 200
            assert "Strict-Transport-Security" not in plain.headers
