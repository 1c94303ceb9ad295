"""``pacs serve`` with its companions: the upload watcher, the health endpoint, ``pacs
status``, and a node that runs on without the OHIF files."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pydicom
import pytest

from tests.conftest import sample
from tests.interop.conftest import Node, listening

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
