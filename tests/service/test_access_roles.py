"""Roles of DICOMweb users (adapters/http/auth.py over pacs/core/access.py): read for
GET, write for POST, admin for DELETE; 401 with a challenge without valid credentials,
403 for a user without the role; the loopback roles; ``Access.require`` for routes that
need another role than their method's.  Through the applications' own middleware (the
real HTTPS ports: tests/interop/test_rights.py)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import falcon
import pytest
from falcon import testing
from pydicom import dcmread

from adapters.dicomweb.app import create_app
from adapters.http.auth import Access
from pacs.core import access
from pacs.core.services import Services
from pacs.node.apps import viewer_port
from tests.auditcheck import event_name, read_trail, requestor
from tests.factory import make_instance, make_rejection_note

REMOTE = "10.20.30.40"
ROLES = {"reader": ["read"], "writer": ["read", "write"], "boss": ["read", "write", "admin"],
         "nobody": []}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def access_file(tmp_path: Path) -> Path:
    lines = []
    for name, roles in ROLES.items():
        lines += ["[[user]]", f'name = "{name}"',
                  f'password = "{access.hash_password(name + "-pw")}"',
                  "roles = [" + ", ".join(f'"{r}"' for r in roles) + "]"]
    lines += ["[[user]]", 'name = "robot"',
              f'tokens = ["{access.hash_token("robot-token")}"]', 'roles = ["read"]']
    path = tmp_path / "access.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def services(make_services: Callable[..., Services], access_file: Path) -> Services:
    return make_services(access_file=str(access_file), loopback_roles=frozenset({"read"}),
                         web_delete=True)


def _headers(user: str | None) -> dict[str, str]:
    return {"Authorization": _basic(user, user + "-pw")} if user else {}


def _stow(client: testing.TestClient, user: str | None, remote: str = REMOTE,
          body: bytes | None = None) -> testing.Result:
    body = make_instance() if body is None else body
    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
               + f"\r\n--{boundary}--\r\n".encode())
    return client.simulate_post("/studies", remote_addr=remote, protocol="https",
                                body=payload, headers={
                                    **_headers(user), "Content-Type":
                                    f'multipart/related; type="application/dicom"; '
                                    f"boundary={boundary}"})


@pytest.mark.parametrize(("user", "search", "store", "remove"), [
    ("reader", 200, 403, 403), ("writer", 200, 200, 403), ("boss", 200, 200, 404),
    ("nobody", 403, 403, 403), (None, 401, 401, 401)])
def test_each_role_over_https(services: Services, user: str | None, search: int,
                              store: int, remove: int) -> None:
    client = testing.TestClient(create_app(services))
    found = client.simulate_get("/studies", remote_addr=REMOTE, protocol="https",
                                headers=_headers(user))
    assert found.status_code == search
    assert _stow(client, user).status_code == store
    removed = client.simulate_delete("/studies/1.2.3", remote_addr=REMOTE, protocol="https",
                                     headers=_headers(user))
    assert removed.status_code == remove  # 404: allowed, and no such study
    if user is None:
        assert found.headers["WWW-Authenticate"].startswith("Basic")
        assert "Bearer" in found.headers["WWW-Authenticate"]  # a token user exists


@pytest.mark.parametrize(("user", "web_delete", "applied"), [
    ("writer", True, False), ("boss", False, False), ("boss", True, True)])
def test_a_rejection_note_over_stow_needs_what_a_removal_needs(
        make_services: Callable[..., Services], access_file: Path, user: str,
        web_delete: bool, applied: bool) -> None:
    """An IOCM rejection note removes the instances it names: over STOW-RS it is taken
    only from a request that may DELETE (PACS_WEB_DELETE on, the admin role), and the
    audit trail names that user and address as removing them.  From any other it fails
    alone, FailureReason 0124 (Refused: Not authorized), and nothing of it is stored:
    the instance stays."""
    services = make_services(access_file=str(access_file), web_delete=web_delete,
                             loopback_roles=frozenset({"read"}))
    client = testing.TestClient(create_app(services))
    target = make_instance()
    assert _stow(client, "boss", body=target).status_code == 200
    ds = dcmread(BytesIO(target))
    note = make_rejection_note([(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID, ds.SOPClassUID)])
    answer = _stow(client, user, body=note)
    instances = client.simulate_get("/instances", remote_addr=REMOTE, protocol="https",
                                    headers=_headers("boss")).json
    found = {row["00080018"]["Value"][0] for row in instances}
    if applied:
        assert answer.status_code == 200
        assert ds.SOPInstanceUID not in found
        (removed,) = [event for event in read_trail(services.settings.data_dir / "audit.jsonl")
                      if event_name(event) == "DICOM Instances Accessed"]
        who = requestor(removed)
        assert (who["UserID"], who["NetworkAccessPointID"]) == ("boss", REMOTE)
    else:
        assert answer.status_code == 409  # no part stored
        failed = answer.json["00081198"]["Value"]
        assert [part["00081197"]["Value"] for part in failed] == [[0x0124]]
        assert found == {ds.SOPInstanceUID}


def test_a_token_user(services: Services) -> None:
    client = testing.TestClient(create_app(services))
    assert client.simulate_get("/studies", remote_addr=REMOTE, protocol="https", headers={
        "Authorization": "Bearer robot-token"}).status_code == 200
    assert client.simulate_get("/studies", remote_addr=REMOTE, protocol="https", headers={
        "Authorization": "Bearer robot-tokens"}).status_code == 401


def test_loopback_roles_and_credentials_from_this_host(services: Services) -> None:
    """From this host without credentials: the loopback roles (read here); a write
    asks for credentials (401, they may carry the role), which then count."""
    client = testing.TestClient(create_app(services))
    assert client.simulate_get("/studies", remote_addr="127.0.0.1").status_code == 200
    refused = _stow(client, None, remote="127.0.0.1")
    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    assert _stow(client, "writer", remote="127.0.0.1").status_code == 200
    assert _stow(client, "reader", remote="127.0.0.1").status_code == 403


def test_no_loopback_roles_means_credentials_from_this_host_too(
        make_services: Callable[..., Services], access_file: Path) -> None:
    client = testing.TestClient(create_app(make_services(
        access_file=str(access_file), loopback_roles=frozenset())))
    assert client.simulate_get("/studies", remote_addr="127.0.0.1").status_code == 401
    assert client.simulate_get("/studies", remote_addr="127.0.0.1",
                               headers=_headers("reader")).status_code == 200
    # A forged Host still gets 421 (the DNS rebinding rule), not a challenge.
    assert client.simulate_get("/studies", remote_addr="127.0.0.1",
                               headers={"Host": "evil.example"}).status_code == 421


def test_the_viewer_needs_the_read_role(services: Services, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    client = testing.TestClient(viewer_port(services, dist))
    for path in ("/", "/dicom-web/studies"):
        assert client.simulate_get(path, remote_addr=REMOTE, protocol="https",
                                   headers=_headers("reader")).status_code == 200
        assert client.simulate_get(path, remote_addr=REMOTE, protocol="https",
                                   headers=_headers("nobody")).status_code == 403


def test_require_is_the_check_a_route_asks(services: Services) -> None:
    """A route that needs a role other than its method's asks ``Access.require``."""
    rule = Access(services.settings, services.access)

    class Remove:
        def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
            who = rule.require(req, access.ADMIN)
            resp.media = {"by": who.name}

    app = falcon.App()
    app.add_route("/remove", Remove())
    client = testing.TestClient(app)
    done = client.simulate_post("/remove", remote_addr=REMOTE, protocol="https",
                                headers=_headers("boss"))
    assert done.status_code == 200 and done.json == {"by": "boss"}
    assert client.simulate_post("/remove", remote_addr=REMOTE, protocol="https",
                                headers=_headers("writer")).status_code == 403
    assert client.simulate_post("/remove", remote_addr=REMOTE,
                                protocol="https").status_code == 401


@pytest.mark.parametrize(("user", "replaced"), [("writer", False), ("boss", True)])
def test_replacing_a_stored_object_over_stow_needs_the_admin_role(
        services: Services, user: str, replaced: bool) -> None:
    """A different object under a stored SOP Instance UID replaces it (the default
    ``overwrite`` duplicate policy) only for a user with the admin role, the
    counterpart of an AE's ``overwrite`` right: the replaced object is gone.  From a
    user with write alone the part fails, FailureReason 0111 (Duplicate SOP
    Instance), and the stored object stays as it was, in the index and in the store;
    a new instance from the same user is stored."""
    client = testing.TestClient(create_app(services))
    first = make_instance(PatientName="FIRST^STORED")
    assert _stow(client, "boss", body=first).status_code == 200
    ds = dcmread(BytesIO(first))
    other = make_instance(PatientName="OTHER^CONTENT", SOPInstanceUID=ds.SOPInstanceUID,
                          StudyInstanceUID=ds.StudyInstanceUID,
                          SeriesInstanceUID=ds.SeriesInstanceUID)
    again = _stow(client, user, body=other)
    fresh = _stow(client, user)
    assert fresh.status_code == 200
    actions = [event["EventIdentification"]["EventActionCode"]  # the stores' alone
               for event in read_trail(services.settings.data_dir / "audit.jsonl")
               if event_name(event) == "DICOM Instances Transferred"
               and event["EventIdentification"]["EventOutcomeIndicator"] == 0]
    found = client.simulate_get(f"/studies/{ds.StudyInstanceUID}/instances",
                                params={"includefield": "PatientName"},
                                remote_addr=REMOTE, protocol="https",
                                headers=_headers("boss")).json
    names = [row["00100010"]["Value"][0]["Alphabetic"] for row in found
             if row["00080018"]["Value"] == [ds.SOPInstanceUID]]
    served = client.simulate_get(
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}", remote_addr=REMOTE, protocol="https",
        headers={**_headers("boss"), "Accept": 'multipart/related; type="application/dicom"'})
    assert served.status_code == 200
    if replaced:
        assert again.status_code == 200
        assert names == ["OTHER^CONTENT"]
        assert other in served.content
        assert actions == ["C", "U", "C"]  # PS3.15 A.5.3.7: U, the copy held altered
    else:
        assert again.status_code == 409
        failed = again.json["00081198"]["Value"]
        assert [part["00081197"]["Value"] for part in failed] == [[0x0111]]
        assert names == ["FIRST^STORED"]
        assert first in served.content
        assert actions == ["C", "C"]
