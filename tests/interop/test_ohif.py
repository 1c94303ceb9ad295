"""OHIF v3 in headless Chromium against ``pacs serve``: the study list and the images.

The real parts: ``python -m pacs serve`` on free ports with a fresh
data folder, studies sent with dcmtk's ``dcmsend``, the prebuilt OHIF from
``vendor/ohif/dist`` and npm ``playwright-core`` from ``vendor/node`` (both fetched by
``scripts/fetch-ohif.sh``), and Debian's ``chromium``.  ``ohif_check.mjs`` beside this
file drives the browser; its screenshots, network log and ``results.json`` are kept in
``artifacts/ohif/`` (git-ignored) for a person to look at.

One study per encoding OHIF must decode in the browser, each stored as sent:
uncompressed CT (a stack), JPEG baseline, JPEG 2000, and two-frame RLE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import sample, wait_for_port
from tests.interop.conftest import AE_TITLE, Node, run_dcmtk

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "vendor" / "ohif" / "dist"
PLAYWRIGHT = ROOT / "vendor" / "node" / "node_modules" / "playwright-core" / "index.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCRIPT = Path(__file__).with_name("ohif_check.mjs")
ARTIFACTS = ROOT / "artifacts" / "ohif"
#: Seconds the whole browser session may take (four studies, ~15 s each on 2 cores).
BROWSER_TIMEOUT = 480


@dataclass(frozen=True)
class Study:
    """A study sent to the node: what the study list must show, and its encoding."""

    name: str
    text: str  # the accession number, shown in OHIF's study list
    uid: str
    transfer_syntax: str


def _retag(ds: pydicom.Dataset, name: str, study_uid: str, series_uid: str) -> None:
    """Give a test file its own patient, accession and UIDs (test files share UIDs)."""
    ds.PatientName = f"OHIF^{name.upper()}"
    ds.PatientID = f"OHIF-{name.upper()}"
    ds.AccessionNumber = f"ACC{name.upper()}"
    ds.StudyDescription = f"pacs OHIF check {name}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def make_studies(folder: Path) -> list[Study]:
    """Write the four studies into ``folder``; the pixel data is kept as encoded."""
    folder.mkdir(parents=True, exist_ok=True)
    studies = []
    # Uncompressed CT: a stack of 6 slices 5 mm apart, so OHIF builds a volume-able series.
    study_uid, series_uid = generate_uid(), generate_uid()
    for i in range(6):
        ds = pydicom.dcmread(sample("CT_small.dcm"))
        _retag(ds, "ct", study_uid, series_uid)
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.SliceLocation = z + 5.0 * i
        ds.save_as(folder / f"ct{i}.dcm", enforce_file_format=True)
    studies.append(Study("ct", "ACCCT", study_uid, "1.2.840.10008.1.2.1"))
    for name, file in (("jpeg", "SC_rgb_jpeg_dcmtk.dcm"), ("j2k", "JPEG2000.dcm"),
                       ("rle", "SC_rgb_rle_2frame.dcm")):
        ds = pydicom.dcmread(sample(file))
        study_uid = generate_uid()
        _retag(ds, name, study_uid, generate_uid())
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        studies.append(Study(name, f"ACC{name.upper()}", study_uid,
                             str(ds.file_meta.TransferSyntaxUID)))
    return studies


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """A GET's status, headers (lower-case names) and body; errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as response:
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def require_tools() -> str:
    """The node binary; fail (not skip: CI installs these) when a part is missing."""
    node = shutil.which("node")
    missing = [what for what, ok in (
        ("node (npm)", node is not None),
        (f"OHIF dist at {DIST}", (DIST / "index.html").is_file()),
        (f"playwright-core at {PLAYWRIGHT}", PLAYWRIGHT.is_file()),
        (f"Chromium at {CHROMIUM}", CHROMIUM.is_file()),
    ) if not ok]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}; run scripts/fetch-ohif.sh and "
                    "apt-get install chromium (scripts/test.sh does both)")
    assert node is not None
    return node


@pytest.fixture(scope="module")
def viewer_node(node_factory: Callable[..., Node]) -> Node:
    """A node with the viewer on its own free port."""
    require_tools()
    node = node_factory("ohif", PACS_VIEWER_DIST=str(DIST))
    wait_for_port(int(node.env["PACS_VIEWER_PORT"]), timeout=60)
    return node


@pytest.fixture(scope="module")
def base_url(viewer_node: Node) -> str:
    return f"http://127.0.0.1:{viewer_node.env['PACS_VIEWER_PORT']}"


def send(node: Node, folder: Path, made: list[Study]) -> list[Study]:
    """dcmsend a folder; each study must be stored with the transfer syntax it was sent in."""
    # dcmsend's defaults, as in the README's quickstart: for lossless-compressed files
    # (RLE) it also offers Explicit VR Little Endian; the node must choose the file's own
    # syntax, so that OHIF decodes RLE itself (checked below).
    sent = run_dcmtk("dcmsend", "-aec", AE_TITLE, "-aet", "OHIFTEST", "+sd",
                     "127.0.0.1", str(node.port), str(folder), timeout=120)
    assert sent.returncode == 0, sent.stdout
    stored = {(row.study_uid, row.transfer_syntax) for row in node.index().values()}
    for study in made:
        assert (study.uid, study.transfer_syntax) in stored, (study, stored)
    return made


@pytest.fixture(scope="module")
def studies(viewer_node: Node, tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    """The four studies, sent with dcmsend and stored with their transfer syntaxes."""
    folder = tmp_path_factory.mktemp("ohif-data")
    return send(viewer_node, folder, make_studies(folder))


def run_browser(base_url: str, studies: list[Study], out: Path,
                **environment: str) -> dict[str, Any]:
    """Run ``ohif_check.mjs`` over ``studies``; its ``results.json`` plus its output."""
    node = require_tools()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "BASE_URL": base_url, "OUT": str(out),
           "PLAYWRIGHT_CORE": str(PLAYWRIGHT), "CHROMIUM": str(CHROMIUM),
           "STUDIES": json.dumps([{"name": s.name, "uid": s.uid, "text": s.text}
                                  for s in studies]), **environment}
    run = subprocess.run([node, str(SCRIPT)], check=False, env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=BROWSER_TIMEOUT,
                         stdin=subprocess.DEVNULL)
    (out / "check.log").write_text(run.stdout + run.stderr)
    results_file = out / "results.json"
    assert results_file.exists(), f"the browser check wrote no results:\n{run.stdout}{run.stderr}"
    results: dict[str, Any] = json.loads(results_file.read_text())
    results["log"] = run.stdout + run.stderr
    return results


@pytest.fixture(scope="module")
def ohif(base_url: str, studies: list[Study]) -> dict[str, Any]:
    """The browser run once over every study (screenshots in ``artifacts/ohif/``)."""
    return run_browser(base_url, studies, ARTIFACTS)


def _failures(results: dict[str, Any]) -> str:
    """The failed DICOMweb requests, one per line, for assertion messages."""
    return "\n".join(f"{r['status'] or r['failure']} {r['path']} (Accept: {r['accept']})"
                     for r in results.get("failedRequests", []))


@pytest.mark.timeout(120)
def test_viewer_port_serves_ohif_with_our_config(base_url: str) -> None:
    status, headers, body = get(base_url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"app-config.js" in body
    # Client-side routes get index.html; a missing asset is a real 404.
    assert get(base_url + "/viewer/dicomweb")[2] == body
    assert get(base_url + "/no-such-bundle.js")[0] == 404
    status, headers, config = get(base_url + "/app-config.js")
    assert status == 200 and headers["cache-control"] == "no-store"
    assert b"qidoRoot: '/dicom-web'" in config and b"http" not in config  # no remote server
    wasm = next(DIST.glob("*.wasm")).name
    status, headers, _ = get(f"{base_url}/{wasm}")
    assert status == 200 and headers["content-type"] == "application/wasm"
    status, headers, body = get(base_url + "/dicom-web/studies")
    assert status == 200 and headers["content-type"] == "application/dicom+json"
    assert isinstance(json.loads(body), list)


@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
def test_study_list_shows_every_study(ohif: dict[str, Any], studies: list[Study]) -> None:
    listed = ohif["studyList"]["listed"]
    assert listed == {s.name: True for s in studies}, (
        f"{listed}\nfailed requests:\n{_failures(ohif)}\n{ohif['log']}")
    assert ohif["studyList"]["errors"] == []
    assert (ARTIFACTS / "study-list.png").stat().st_size > 0
    # The recorded DICOMweb requests are kept for a person to look at.
    assert (ARTIFACTS / "dicomweb-requests.tsv").stat().st_size > 0


@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
@pytest.mark.parametrize("name", ["ct", "jpeg", "j2k", "rle"])
def test_viewer_draws_the_image(ohif: dict[str, Any], name: str) -> None:
    study = ohif["studies"][name]
    assert study.get("exception") is None, f"{study}\n{_failures(ohif)}"
    canvas = study["canvas"]
    assert canvas and canvas["nonBlack"] > 500 and canvas["distinctRed"] > 10, (
        f"blank canvas: {canvas}\nfailed requests:\n{_failures(ohif)}")
    assert study["errors"] == [], f"error text on the page: {study['errors']}"
    # Thumbnails are drawn from /frames too (thumbnailRendering 'wadors').
    thumbnails = study["thumbnails"]
    assert thumbnails and all(t["complete"] and t["w"] > 0 for t in thumbnails), thumbnails
    assert (ARTIFACTS / f"viewer-{name}.png").stat().st_size > 0


@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
def test_every_dicomweb_request_of_ohif_succeeded(ohif: dict[str, Any]) -> None:
    assert ohif["failedRequests"] == [], f"failed requests:\n{_failures(ohif)}"
    # What the viewer cancelled itself (its viewport laid out again while frames were
    # loading, which depends on timing) may only be image loads.
    cancelled = [r["path"] for r in ohif["cancelledRequests"]]
    assert all(re.search(r"/(frames/[0-9,]+|rendered|thumbnail)$", r) for r in cancelled), (
        cancelled)


@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
def test_ohif_stays_on_this_host(ohif: dict[str, Any]) -> None:
    assert ohif["blocked"] == [], "OHIF tried to reach other hosts"


# --- a browser on another host, as in compose ------------------------------------------

def host_address() -> str | None:
    """A non-loopback IPv4 address of this machine (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
def test_a_browser_on_another_host_gets_in_with_the_credentials(
        node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The compose setup: not loopback, so HTTPS (with the certificate compose's
    scripts/make-cert.sh makes) and HTTP Basic on the page and every request."""
    require_tools()
    address = host_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to browse from")
    tls = tmp_path_factory.mktemp("ohif-remote-tls")
    made = subprocess.run([str(ROOT / "scripts" / "make-cert.sh"), str(tls), address],
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    node = node_factory("ohif-remote", PACS_VIEWER_DIST=str(DIST), PACS_BIND_ADDRESS="0.0.0.0",
                        PACS_WEB_USER="viewer", PACS_WEB_PASSWORD="not-so-secret",
                        PACS_TLS_CERT=str(tls / "cert.pem"), PACS_TLS_KEY=str(tls / "key.pem"))
    port = int(node.env["PACS_VIEWER_PORT"])
    wait_for_port(port, timeout=60)
    base = f"https://{address}:{port}"
    trusted = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    status, headers, _ = get(base + "/", trusted)
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    assert get(base + "/dicom-web/studies", trusted)[0] == 401
    assert get(f"http://{address}:{port}/")[0] == 400  # HTTPS only: no password in clear
    # The certificate was verified above with its CA; the browser is told to accept it.
    view_ct_as(node, base, tmp_path_factory.mktemp("ohif-remote-data"), "remote",
               "viewer", "not-so-secret")


def view_ct_as(node: Node, base: str, folder: Path, name: str, user: str,
               password: str) -> None:
    """Send the CT study, then list and view it in the browser logged in as ``user``
    (HTTP Basic over HTTPS, the node's certificate accepted)."""
    ct = [s for s in make_studies(folder) if s.name == "ct"]
    for other in ("jpeg", "j2k", "rle"):
        (folder / f"{other}.dcm").unlink()
    send(node, folder, ct)
    results = run_browser(base, ct, ARTIFACTS / name, HTTP_USER=user,
                          HTTP_PASSWORD=password, ACCEPT_CERTIFICATE="1")
    assert results["studyList"]["listed"] == {"ct": True}, results["log"]
    assert results["studies"]["ct"]["passed"], results["log"]
    assert results["failedRequests"] == [], _failures(results)


# --- a user of the access file, with roles ---------------------------------------------

@pytest.mark.timeout(BROWSER_TIMEOUT + 120)
def test_a_reader_of_the_access_file_logs_in_and_views(
        node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Known AEs and users only (PACS_UNKNOWN_AE_RIGHTS and PACS_LOOPBACK_ROLES empty, as
    closed as compose): the browser logs in with HTTP Basic over HTTPS as a user with the
    read role, and OHIF lists and draws the study; without credentials 401, a user
    without the read role 403, the page and DICOMweb alike."""
    from pacs.core import access
    from tests.tlsfiles import make_pki

    require_tools()
    folder = tmp_path_factory.mktemp("ohif-users")
    pki = make_pki(folder / "pki")
    (folder / "access.toml").write_text(
        '[[ae]]\ntitle = "OHIFTEST"\nrights = ["store"]\n\n'
        f'[[user]]\nname = "reader"\npassword = "{access.hash_password("look-only")}"\n'
        'roles = ["read"]\n\n'
        f'[[user]]\nname = "uploader"\npassword = "{access.hash_password("up-only")}"\n'
        'roles = ["write"]\n')
    node = node_factory("ohif-users", PACS_VIEWER_DIST=str(DIST),
                        PACS_ACCESS_FILE=str(folder / "access.toml"),
                        PACS_UNKNOWN_AE_RIGHTS="", PACS_LOOPBACK_ROLES="",
                        PACS_TLS_CERT=str(pki.server_cert), PACS_TLS_KEY=str(pki.server_key))
    port = int(node.env["PACS_VIEWER_PORT"])
    wait_for_port(port, timeout=60)
    base = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    for path in ("/", "/dicom-web/studies"):
        status, headers, _ = get(base + path, trusted)
        assert status == 401 and headers["www-authenticate"].startswith("Basic"), path
        assert _get_as(base + path, trusted, "uploader", "up-only") == 403, path
        assert _get_as(base + path, trusted, "reader", "look-only") == 200, path
    view_ct_as(node, base, tmp_path_factory.mktemp("ohif-users-data"), "users", "reader",
               "look-only")
    trail = (node.data_dir / "audit.jsonl").read_text()
    assert '"UserID":"reader"' in trail  # the viewer's requests, under the user's name


def _get_as(url: str, context: ssl.SSLContext, user: str, password: str) -> int:
    """The status of a GET with HTTP Basic credentials."""
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
