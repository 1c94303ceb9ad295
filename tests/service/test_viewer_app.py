"""The viewer port's application in-process: OHIF's files (SPA routes, media types,
caching, no way out of the dist), our app-config, DICOMweb under /dicom-web, /health,
and one access rule for all of it."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from falcon import testing

from adapters.viewer import static
from adapters.viewer.app import app_config
from pacs.core.services import Services
from pacs.node.apps import viewer_port as create_app
from tests.conftest import sample

HASHED = "app.bundle.0f6159c501addfe9.js"
WASM = "34b1e6b1deb5828e.wasm"


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    """A miniature OHIF dist."""
    folder = tmp_path / "dist"
    (folder / "assets").mkdir(parents=True)
    (folder / "index.html").write_text("<html><script src=/app-config.js></script></html>")
    (folder / "app-config.js").write_text("window.config = {remote: 'https://demo'};")
    (folder / HASHED).write_text("console.log(1)")
    (folder / WASM).write_bytes(b"\0asm\1\0\0\0")
    (folder / "app.bundle.css").write_text("body{}")
    (folder / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (tmp_path / "secret.txt").write_text("outside the dist")
    return folder


@pytest.fixture
def client(services: Services, dist: Path) -> testing.TestClient:
    return testing.TestClient(create_app(services, dist))


def test_index_and_client_side_routes(client: testing.TestClient) -> None:
    index = client.simulate_get("/")
    assert index.status_code == 200
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["cache-control"] == "no-cache"
    for route in ("/viewer", "/viewer/dicomweb", "/segmentation", "/studies"):
        result = client.simulate_get(route, query_string="StudyInstanceUIDs=1.2.3")
        assert result.status_code == 200 and result.text == index.text, route


def test_our_app_config_replaces_the_dists(client: testing.TestClient) -> None:
    result = client.simulate_get("/app-config.js")
    assert result.status_code == 200
    assert result.headers["cache-control"] == "no-store"
    assert result.content == app_config()
    assert b"supportsReject: false," in result.content  # PACS_WEB_DELETE is off
    assert b"supportsReject: true," in app_config(reject=True)
    assert b"qidoRoot: '/dicom-web'" in result.content and b"https://" not in result.content


@pytest.mark.parametrize("path, media_type, cached", [
    (f"/{HASHED}", "text/javascript; charset=utf-8", True),
    (f"/{WASM}", "application/wasm", True),
    ("/app.bundle.css", "text/css; charset=utf-8", False),
    ("/assets/favicon.ico", "image/x-icon", False),
])
def test_files_with_their_media_types(client: testing.TestClient, dist: Path, path: str,
                                      media_type: str, cached: bool) -> None:
    result = client.simulate_get(path)
    assert result.status_code == 200
    assert result.headers["content-type"] == media_type
    assert result.content == (dist / path.lstrip("/")).read_bytes()
    assert ("immutable" in result.headers["cache-control"]) is cached
    again = client.simulate_get(path, headers={"If-None-Match": result.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = client.simulate_head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(result.content))


@pytest.mark.parametrize("path", ["/missing.js", "/assets/missing.png", "/../secret.txt",
                                  "/assets/../../secret.txt", "/%2e%2e/secret.txt"])
def test_missing_assets_and_escapes_are_404(client: testing.TestClient, path: str) -> None:
    result = client.simulate_get(path)
    assert result.status_code == 404
    assert b"outside the dist" not in result.content


@pytest.mark.parametrize("path", ["/.env", "/%2eenv", "/.git/config", "/assets/.htpasswd"])
def test_hidden_files_of_a_dist_are_not_served(client: testing.TestClient, dist: Path,
                                               path: str) -> None:
    """A dist an operator gave may hold hidden files (``.env``, ``.git``): none is a
    part of the viewer, none is served (404, not the page either)."""
    (dist / ".env").write_text("SECRET=1")
    (dist / ".git").mkdir()
    (dist / ".git" / "config").write_text("SECRET=1")
    (dist / "assets" / ".htpasswd").write_text("SECRET=1")
    result = client.simulate_get(path)
    assert result.status_code == 404 and b"SECRET" not in result.content


@pytest.mark.parametrize(("path", "status"), [
    ("/" + "a" * 300, 200),  # a client-side route: the page
    ("/" + "a" * 300 + ".js", 404),  # a missing asset
    ("/assets/" + "b/" * 2100 + "c.js", 404),  # past PATH_MAX
])
def test_names_longer_than_the_file_system_holds_are_missing(
        client: testing.TestClient, path: str, status: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """ENAMETOOLONG is a missing file, not a 500 with a traceback quoting the path."""
    result = client.simulate_get(path)
    assert result.status_code == status
    assert "Traceback" not in caplog.text and "aaaa" not in caplog.text


def test_a_failure_of_ours_is_a_500_and_one_line(
        client: testing.TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(_self: object, _path: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(static.OhifFiles, "resolve", broken)
    with caplog.at_level(logging.INFO):
        result = client.simulate_get("/some-route")
    assert result.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "viewer: GET failed unexpectedly (RuntimeError)"]
    assert "Traceback" not in caplog.text and "some-route" not in caplog.text


def test_links_out_of_the_dist_are_not_followed(client: testing.TestClient,
                                               dist: Path) -> None:
    (dist / "leak.txt").symlink_to(dist.parent / "secret.txt")
    assert client.simulate_get("/leak.txt").status_code == 404


def test_only_get_and_head(client: testing.TestClient) -> None:
    assert client.simulate_post("/", body=b"x").status_code == 405


def test_dicomweb_and_health_on_the_same_origin(client: testing.TestClient,
                                                services: Services) -> None:
    services.ingest.store_bytes(sample("CT_small.dcm").read_bytes())
    studies = client.simulate_get("/dicom-web/studies")
    assert studies.status_code == 200
    assert studies.headers["content-type"] == "application/dicom+json"
    assert len(studies.json) == 1
    health = client.simulate_get("/health")
    assert health.status_code == 200 and health.json["counts"]["instance"] == 1


@pytest.fixture
def guarded(make_services: Callable[..., Services], dist: Path) -> testing.TestClient:
    services = make_services(web_user="viewer", web_password="s3cret")
    return testing.TestClient(create_app(services, dist))


@pytest.mark.parametrize("path", ["/", "/viewer", "/app-config.js", "/dicom-web/studies"])
def test_other_hosts_need_the_dicomweb_credentials(guarded: testing.TestClient,
                                                   path: str) -> None:
    remote = "192.168.1.30"
    refused = guarded.simulate_get(path, remote_addr=remote, protocol="https")
    # The browser asks for credentials on the page itself, then sends them along.
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Basic")
    token = base64.b64encode(b"viewer:s3cret").decode()
    allowed = guarded.simulate_get(path, remote_addr=remote, protocol="https",
                                   headers={"Authorization": f"Basic {token}"})
    assert allowed.status_code == 200
    assert guarded.simulate_get(path).status_code == 200  # loopback


def test_unhealthy_store_is_503(client: testing.TestClient, services: Services,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pacs.core.errors import ConfigError

    def unreachable(create: bool = True) -> None:
        raise ConfigError("cannot reach S3 at minio:9000")

    monkeypatch.setattr(services.store, "check", unreachable)
    result = client.simulate_get("/health")
    assert result.status_code == 503
    body = json.loads(result.text)
    assert body["status"] == "unhealthy" and body["store_reachable"] is False


def test_every_answer_has_nosniff_and_the_viewer_policy(client: testing.TestClient,
                                                        services: Services,
                                                        dist: Path) -> None:
    for path in ("/", "/viewer", f"/{WASM}", "/assets/favicon.ico", "/missing.js"):
        result = client.simulate_get(path)
        assert result.headers["x-content-type-options"] == "nosniff", path
        policy = result.headers["content-security-policy"]
        assert "script-src 'self' 'wasm-unsafe-eval'" in policy, path
        assert "'unsafe-eval'" not in policy and "worker-src 'self' blob:" in policy
    # Script files carry the policy their workers run under: eval allowed there only.
    for path in ("/app-config.js", f"/{HASHED}"):
        result = client.simulate_get(path)
        assert result.headers["x-content-type-options"] == "nosniff", path
        assert "script-src 'self' 'wasm-unsafe-eval' 'unsafe-eval';" in result.headers[
            "content-security-policy"]
    etag = client.simulate_get(f"/{HASHED}").headers["etag"]
    revalidated = client.simulate_get(f"/{HASHED}", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304
    assert "'unsafe-eval'" in revalidated.headers["content-security-policy"]
    # DICOMweb on the same port keeps its own (sandboxed) policy.
    api = client.simulate_get("/dicom-web/studies")
    assert "sandbox" in api.headers["content-security-policy"]
    assert api.headers["x-content-type-options"] == "nosniff"


def test_inline_scripts_of_the_page_are_allowed_by_hash_only(services: Services,
                                                             dist: Path) -> None:
    import hashlib

    script = b'window.PUBLIC_URL="/"'
    (dist / "index.html").write_bytes(b"<html><script>" + script + b"</script>"
                                      b"<script defer src=/app.js></script></html>")
    policy = testing.TestClient(create_app(services, dist)).simulate_get(
        "/").headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    script_src = next(d for d in policy.split("; ") if d.startswith("script-src"))
    assert script_src == f"script-src 'self' 'wasm-unsafe-eval' 'sha256-{digest}'"
    assert "'unsafe-inline'" not in script_src
