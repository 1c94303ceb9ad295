"""``pacs serve`` with its companions: the upload watcher, the health endpoint, ``pacs
status``, a node that runs on without the OHIF files, and one that finds them next to
its source checkout while started in another folder."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.conftest import sample, wait_for_port
from tests.interop.conftest import Node, listening

#: The OHIF dist of this checkout (scripts/fetch-ohif.sh).
CHECKOUT_DIST = Path(__file__).resolve().parents[2] / "vendor" / "ohif" / "dist"

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory) -> Node:
    """A node without viewer files, scanning its upload folder twice a second."""
    missing = tmp_path_factory.mktemp("no-ohif") / "dist"
    return node_factory("companions", PACS_VIEWER_DIST=str(missing), PACS_UPLOADS_POLL="0.5")


def health(node: Node) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{node.env['PACS_WEB_PORT']}/health"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_without_the_viewer_files_the_node_says_how_and_runs(node: Node) -> None:
    log = node.log()
    assert "OHIF viewer is not installed" in log and "scripts/fetch-ohif.sh" in log
    node.assert_serving()
    assert not listening(int(node.env["PACS_VIEWER_PORT"]))
    status, body = health(node)
    assert status == 200 and body["status"] == "ok"


def test_files_dropped_in_the_upload_folder_are_stored_or_set_aside(node: Node) -> None:
    uploads = node.data_dir / "uploads"
    wait_for(uploads.is_dir)
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    # The usual drop: write under a temporary name, rename when complete.
    partial = uploads / "mr.dcm.part"
    ds.save_as(partial, enforce_file_format=True)
    partial.rename(uploads / "mr.dcm")
    (uploads / "readme.txt").write_text("not DICOM")
    wait_for(lambda: str(ds.SOPInstanceUID) in node.index())
    reason = uploads / "rejected" / "readme.txt.reason.txt"
    wait_for(reason.exists)
    assert "not a DICOM Part 10 object" in reason.read_text()
    wait_for(lambda: not (uploads / "mr.dcm").exists())  # PACS_UPLOADS_AFTER_STORE=delete
    status, body = health(node)
    assert status == 200 and body["counts"] == {  # type: ignore[comparison-overlap]
        "patient": 1, "study": 1, "series": 1, "instance": 1}

    result = node.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "instance: 1" in result.stdout
    assert "store: file, reachable" in result.stdout
    assert "0 waiting, 1 rejected" in result.stdout
    as_json = json.loads(node.cli("status", "--json").stdout)
    assert as_json["status"] == "ok"
    assert as_json["store_bytes"] == as_json["indexed_bytes"] > 0


def test_the_viewer_is_found_from_any_working_folder(
        node_factory: Callable[..., Node]) -> None:
    # As a service manager starts it: another working folder, no PACS_VIEWER_DIST (the
    # node's environment drops every PACS_ variable of ours). The viewer comes from the
    # checkout pacs is installed from (an editable install).
    assert (CHECKOUT_DIST / "index.html").is_file(), "run scripts/fetch-ohif.sh"
    anywhere = node_factory("viewer-anywhere", PACS_UPLOADS_POLL="0")
    assert "PACS_VIEWER_DIST" not in anywhere.env
    assert not (anywhere.root / "vendor").exists()
    port = int(anywhere.env["PACS_VIEWER_PORT"])
    wait_for_port(port, timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
        assert response.status == 200
        assert response.read() == (CHECKOUT_DIST / "index.html").read_bytes()
    assert f"files in {CHECKOUT_DIST} (from the source checkout)" in anywhere.log()
    status = anywhere.cli("status")
    assert f"viewer: {CHECKOUT_DIST} (from the source checkout)" in status.stdout, (
        status.stdout + status.stderr)
