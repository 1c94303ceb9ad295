"""The loopback rule holds only for requests that name this node (DNS rebinding).

A web page on ``evil.example`` whose name is rebound to 127.0.0.1 makes the user's
browser send ``Host: evil.example`` to the node from loopback: without the Host check
it would read every study.  Such a request gets 421 and no data; a loopback name, a
loopback address or a configured ``PACS_WEB_HOSTS`` name keeps the rule.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from falcon import testing

from adapters.dicomweb.app import create_app
from adapters.http.auth import host_name, names_loopback
from pacs.core.services import Services
from pacs.node.apps import viewer_port


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:5985", "localhost"), ("LOCALHOST", "localhost"), ("[::1]:8080", "::1"),
    ("127.0.0.1:5985", "127.0.0.1"), ("pacs.example.org.", "pacs.example.org"),
    ("host:", "host"), ("[::1]", "::1"), ("Pacs.Example.Org.:443", "pacs.example.org")])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(("name", "loopback"), [
    ("localhost", True), ("viewer.localhost", True), ("localhost.", True),
    ("127.0.0.1", True), ("127.4.5.6", True), ("::1", True),
    ("evil.example", False), ("localhost.evil.example", False), ("10.0.0.1", False),
    ("0.0.0.0", False), ("", False)])
def test_names_loopback(name: str, loopback: bool) -> None:
    assert names_loopback(name) is loopback


@pytest.fixture
def client(make_services: Callable[..., Services]) -> testing.TestClient:
    services = make_services(web_user="alice", web_password="s3cret",
                             web_hosts=("pacs.example.org",))
    return testing.TestClient(create_app(services))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(("host", "status"), [
    ("localhost:5985", 200), ("127.0.0.1:5985", 200), ("[::1]:5985", 200),
    ("pacs.example.org", 200), ("PACS.EXAMPLE.ORG:443", 200),
    ("evil.example", 421), ("evil.example:5985", 421), ("127.0.0.1.evil.example", 421),
    ("localhost.evil.example", 421)])
def test_loopback_rule_needs_a_host_naming_the_node(client: testing.TestClient, host: str,
                                                    status: int) -> None:
    result = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={"Host": host})
    assert result.status_code == status
    if status == 421:
        assert result.json["title"] == "Misdirected request"
        assert "[" not in result.text  # no study list in the answer


@pytest.mark.parametrize("proxy_header", [
    ("X-Forwarded-Proto", "https"), ("Forwarded", "for=192.0.2.2;proto=https"),
    ("X-Forwarded-For", "192.0.2.2"), ("X-Forwarded-Host", "localhost"),
    ("X-Real-IP", "192.0.2.2")])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:5985", "[::1]", None])
def test_a_request_a_proxy_forwarded_gets_no_loopback_roles_for_a_loopback_name(
        client: testing.TestClient, proxy_header: tuple[str, str], host: str | None) -> None:
    """A TLS proxy on this host passes on the client's Host: a client anywhere that
    writes ``Host: localhost`` reached the node from loopback with a loopback name and
    got the loopback roles (every study read, studies deleted) without credentials.
    A forwarded request names this node by ``PACS_WEB_HOSTS`` only; its credentials
    decide (without: 421, as for the proxy's public name, the README)."""
    headers = dict([proxy_header])
    if host is not None:
        headers["Host"] = host
    refused = client.simulate_get("/studies", remote_addr="127.0.0.1", headers=headers)
    assert refused.status_code == 421
    assert "[" not in refused.text
    allowed = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        **headers, "Authorization": _basic("alice", "s3cret")})
    assert allowed.status_code == 200


def test_a_proxy_s_listed_name_keeps_the_loopback_rule(client: testing.TestClient) -> None:
    """A proxy that does its own access control forwards its public name, listed in
    ``PACS_WEB_HOSTS``: the loopback rule answers what it forwards (the README)."""
    result = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "pacs.example.org", "X-Forwarded-Proto": "https"})
    assert result.status_code == 200


def test_credentials_still_open_the_door_whatever_the_host(
        client: testing.TestClient) -> None:
    result = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "evil.example", "Authorization": _basic("alice", "s3cret")})
    assert result.status_code == 200
    wrong = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "evil.example", "Authorization": _basic("alice", "nope")})
    assert wrong.status_code == 421


def test_dicomweb_client_s_bearer_none_from_this_host_is_served(
        client: testing.TestClient) -> None:
    """dicomweb_client's command line (the README's quickstart) sends
    ``Authorization: Bearer None`` without a token: from this host it is answered as
    a request without credentials."""
    answer = client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "localhost", "Authorization": "Bearer None"})
    assert answer.status_code == 200


def test_the_quickstart_search_run_again_and_again_is_never_locked_out(
        make_services: Callable[..., Services]) -> None:
    """``Bearer None`` is no login: the quickstart's search run past the failed-login
    limit is answered every time, counted nowhere (a wrong password from this host
    afterwards is the first failure, and is still let in with the loopback roles)."""
    services = make_services(web_user="alice", web_password="s3cret", auth_failures=3)
    client = testing.TestClient(create_app(services))
    answers = {client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "localhost", "Authorization": "Bearer None"}).status_code
        for _ in range(10)}
    assert answers == {200}
    from_elsewhere = client.simulate_get("/studies", remote_addr="10.1.2.3",
                                         protocol="https", headers={
                                             "Host": "pacs.example.org",
                                             "Authorization": "Bearer null"})
    assert from_elsewhere.status_code == 401  # no credentials, not a lock-out


def test_a_locked_out_request_from_this_host_keeps_the_loopback_roles(
        make_services: Callable[..., Services]) -> None:
    """Credentials that failed past the limit from this host are not looked at (no
    password hashed), and the request gets what it would without them: the loopback
    roles, not 429.  From another host the lock-out stands."""
    services = make_services(web_user="alice", web_password="s3cret", auth_failures=3)
    client = testing.TestClient(create_app(services))
    wrong = {"Authorization": _basic("alice", "nope")}
    local = [client.simulate_get("/studies", remote_addr="127.0.0.1",
                                 headers={"Host": "localhost", **wrong}).status_code
             for _ in range(6)]
    assert local == [200] * 6
    other = {"Authorization": _basic("bob", "nope")}  # alice's name is locked out now
    remote = [client.simulate_get("/studies", remote_addr="10.1.2.3", protocol="https",
                                  headers={"Host": "pacs.example.org", **other}).status_code
              for _ in range(5)]
    assert remote[:3] == [401] * 3 and remote[3:] == [429, 429]


def test_a_locked_out_request_from_this_host_needing_another_role_is_told_to_wait(
        make_services: Callable[..., Services]) -> None:
    """With the loopback roles read alone, a STOW-RS from this host needs credentials:
    once they failed past the limit it is 429 with Retry-After (the right password
    too, unchecked), not 401, which would call the right password wrong."""
    services = make_services(web_user="alice", web_password="s3cret", auth_failures=3,
                             loopback_roles=frozenset({"read"}))
    client = testing.TestClient(create_app(services))

    def post(password: str) -> testing.Result:
        return client.simulate_post("/studies", remote_addr="127.0.0.1", headers={
            "Host": "localhost", "Authorization": _basic("alice", password)})

    assert [post("nope").status_code for _ in range(5)] == [401, 401, 401, 429, 429]
    right = post("s3cret")
    assert right.status_code == 429 and int(right.headers["Retry-After"]) >= 1
    assert client.simulate_get("/studies", remote_addr="127.0.0.1", headers={
        "Host": "localhost", "Authorization": _basic("alice", "nope")}).status_code == 200


def test_other_hosts_are_unchanged(client: testing.TestClient) -> None:
    result = client.simulate_get("/studies", remote_addr="10.1.2.3", protocol="https",
                                 headers={"Host": "pacs.example.org"})
    assert result.status_code == 401
    assert "Basic" in result.headers["WWW-Authenticate"]


def test_open_on_purpose_answers_its_own_names_only(
        make_services: Callable[..., Services]) -> None:
    """``PACS_WEB_OPEN`` answers any host without credentials, but only requests that
    name this node: an address, a loopback name or one of ``PACS_WEB_HOSTS``.  A web
    page whose DNS name is rebound to the node's address would otherwise read (and
    store) everything in its own origin, where the browser lets it."""
    client = testing.TestClient(create_app(make_services(web_open=True,
                                                         web_hosts=("pacs.example.org",))))
    for host in ("10.0.0.5:5985", "[fd00::5]:5985", "localhost:5985", "pacs.example.org",
                 "PACS.example.org:5985", "pacs.example.org.:5985"):
        result = client.simulate_get("/studies", remote_addr="10.1.2.3",
                                     headers={"Host": host})
        assert result.status_code == 200, host
    for host in ("rebind.attacker.example", "rebind.attacker.example:5985", "10.0.0.5.nip.io"):
        for method in (client.simulate_get, client.simulate_post):
            result = method("/studies", remote_addr="10.1.2.3", headers={"Host": host})
            assert result.status_code == 421, (host, method)


def test_the_viewer_port_applies_the_same_rule(make_services: Callable[..., Services],
                                               tmp_path: object) -> None:
    from pathlib import Path

    dist = Path(str(tmp_path)) / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    client = testing.TestClient(viewer_port(make_services(), dist))
    for path in ("/", "/dicom-web/studies"):
        good = client.simulate_get(path, remote_addr="127.0.0.1",
                                   headers={"Host": "localhost:8080"})
        evil = client.simulate_get(path, remote_addr="127.0.0.1",
                                   headers={"Host": "evil.example:8080"})
        assert good.status_code == 200, path
        assert evil.status_code == 421, path
        assert b"OHIF" not in evil.content
