"""dicomweb-client (the PyPI library and its ``dicomweb_client`` command) against
``python -m pacs serve``: gunicorn and the DIMSE workers of one node, as an operator
starts it, on free ports with a fresh data folder.

Covers the README's quickstart search line verbatim (but for the port), searches at
every level with filters and paging, STOW-RS of a body large enough that the client
sends it chunked, stored bytes equal to the bytes sent, STOW-RS going on when the
analyser helpers are killed, and a clean stop on SIGTERM (helpers included).
WADO-RS retrieval is tested with the WADO module.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import generate_uid
from requests import HTTPError

from tests.conftest import free_port, sample, wait_for_port
from tests.interop.conftest import AE_TITLE, Node, assert_consistent, run_dcmtk

pytestmark = pytest.mark.interop

#: The README's quickstart search line.
QUICKSTART = "dicomweb_client --url http://localhost:5985 search studies"
#: CT_small is ~39 KB: thirty of them pass dicomweb-client's 1 MB chunking threshold.
CHUNKED_COUNT = 30


@pytest.fixture(scope="module")
def web_node(node_factory: Callable[..., Node]) -> Node:
    """A node whose DICOMweb port is free too (the default 5985 may be taken)."""
    node = node_factory("dicomweb", PACS_WEB_PORT=str(free_port()))
    wait_for_port(int(node.env["PACS_WEB_PORT"]))
    return node


def base_url(node: Node, host: str = "localhost") -> str:
    return f"http://{host}:{node.env['PACS_WEB_PORT']}"


@pytest.fixture(scope="module")
def client(web_node: Node) -> DICOMwebClient:
    return DICOMwebClient(url=base_url(web_node, "127.0.0.1"))


def ct(study: str, series: str, number: int, **changes: object) -> FileDataset:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def encoded(ds: Dataset) -> bytes:
    """The bytes dicomweb-client sends for ``ds`` (``store_instances`` encodes so)."""
    with io.BytesIO() as out:
        pydicom.dcmwrite(out, ds)
        return out.getvalue()


@pytest.fixture(scope="module")
def stored(web_node: Node, client: DICOMwebClient) -> dict[str, list[FileDataset]]:
    """Two studies stored with ``store_instances``: one of two series (one of them big
    enough to be sent chunked), one with another patient and modality."""
    big_study, small_study = generate_uid(), generate_uid()
    first, second, third = generate_uid(), generate_uid(), generate_uid()
    big = [ct(big_study, first, i + 1, PatientID="DWC1", PatientName="WEB^ALPHA",
              StudyDate="20200102") for i in range(CHUNKED_COUNT)]
    big += [ct(big_study, second, i + 1, PatientID="DWC1", PatientName="WEB^ALPHA",
               StudyDate="20200102", Modality="OT", SeriesNumber=2) for i in range(2)]
    small = [ct(small_study, third, 1, PatientID="DWC2", PatientName="WEB^BETA",
                StudyDate="20210304", Modality="MR")]
    assert sum(len(encoded(ds)) for ds in big) > 1_000_000  # sent chunked
    for study, datasets in ((big_study, big), (small_study, small)):
        response = client.store_instances(datasets)
        references = response.ReferencedSOPSequence
        assert [r.ReferencedSOPInstanceUID for r in references] == [
            d.SOPInstanceUID for d in datasets]
        assert "FailedSOPSequence" not in response
        assert response.RetrieveURL.endswith(f"/studies/{study}")
    return {"big": big, "small": small}


def analyser_helpers(node: Node) -> set[int]:
    """The node's STOW-RS analyser helpers (pacs/core/analysers.py), found by their command
    line and the data folder in their environment: they run in sessions of their own,
    outside the node's process group."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if (b"pacs.core.analysers" in cmdline
                and f"PACS_DATA_DIR={node.data_dir}".encode() in environ):
            found.add(int(entry.name))
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def uids(results: list[dict], key: str = "0020000D") -> set[str]:
    return {item[key]["Value"][0] for item in results}


def test_stored_bytes_equal_the_bytes_sent(web_node: Node,
                                           stored: dict[str, list[FileDataset]]) -> None:
    index = assert_consistent(web_node.data_dir)
    for ds in stored["big"] + stored["small"]:
        row = index[ds.SOPInstanceUID]
        assert web_node.object_path(row).read_bytes() == encoded(ds)


def test_readme_quickstart_search_line(web_node: Node, stored: dict[str, list[FileDataset]],
                                       tmp_path: Path) -> None:
    """The quickstart's two lines: dcmsend a file, then the search line verbatim."""
    readme = Path(__file__).parents[2] / "README.md"
    assert QUICKSTART in readme.read_text(), "README.md lost the quickstart line"
    sent = ct(generate_uid(), generate_uid(), 1, PatientID="DCMSEND")
    sent.save_as(tmp_path / "test.dcm", enforce_file_format=True)
    result = run_dcmtk("dcmsend", "-v", "localhost", str(web_node.port), "-aec", AE_TITLE,
                       "-aet", "ASTER", "+r", "+sd", "-nh", "test.dcm", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    line = QUICKSTART.replace(":5985", f":{web_node.env['PACS_WEB_PORT']}").split()
    command = [str(Path(sys.executable).parent / line[0]), *line[1:]]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + "\n--- server ---\n" + web_node.log()
    studies = json.loads(out.stdout)
    expected = {stored["big"][0].StudyInstanceUID, stored["small"][0].StudyInstanceUID,
                sent.StudyInstanceUID}
    assert expected <= uids(studies)


def test_search_studies_with_filters(client: DICOMwebClient,
                                     stored: dict[str, list[FileDataset]]) -> None:
    big, small = stored["big"][0].StudyInstanceUID, stored["small"][0].StudyInstanceUID
    assert uids(client.search_for_studies(search_filters={"PatientID": "DWC1"})) == {big}
    assert uids(client.search_for_studies(search_filters={"PatientName": "web^*"})) == {
        big, small}
    assert uids(client.search_for_studies(
        search_filters={"StudyDate": "20210101-20211231", "PatientName": "WEB*"})) == {small}
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "OT"})) == {big}
    assert uids(client.search_for_studies(
        search_filters={"StudyInstanceUID": [big, small]})) == {big, small}
    assert uids(client.search_for_studies(search_filters={"PatientName": "alp"},
                                          fuzzymatching=True)) == {big}
    (item,) = client.search_for_studies(search_filters={"PatientID": "DWC1"},
                                        fields=["StudyDescription", "PatientComments"])
    assert item["00201208"]["Value"] == [CHUNKED_COUNT + 2]
    assert item["00080061"]["Value"] == ["CT", "OT"]
    assert "00081030" in item


def test_paging_and_get_remaining(client: DICOMwebClient,
                                  stored: dict[str, list[FileDataset]]) -> None:
    study = stored["big"][0].StudyInstanceUID
    series = stored["big"][0].SeriesInstanceUID
    page = client.search_for_instances(study, series, limit=7)
    assert len(page) == 7
    everything = client.search_for_instances(study, series, limit=7, get_remaining=True)
    assert uids(everything, "00080018") == {d.SOPInstanceUID for d in stored["big"][:CHUNKED_COUNT]}
    assert len(everything) == CHUNKED_COUNT


def test_search_series_and_instances_at_every_level(
        client: DICOMwebClient, stored: dict[str, list[FileDataset]]) -> None:
    big = stored["big"]
    study = big[0].StudyInstanceUID
    assert uids(client.search_for_series(study), "0020000E") == {
        big[0].SeriesInstanceUID, big[-1].SeriesInstanceUID}
    assert uids(client.search_for_series(study, search_filters={"Modality": "OT"}),
                "0020000E") == {big[-1].SeriesInstanceUID}
    assert uids(client.search_for_series(search_filters={"PatientID": "DWC2"}),
                "0020000E") == {stored["small"][0].SeriesInstanceUID}
    assert uids(client.search_for_instances(study, big[-1].SeriesInstanceUID),
                "00080018") == {d.SOPInstanceUID for d in big[-2:]}
    numbered = client.search_for_instances(study, search_filters={"InstanceNumber": "2"})
    assert len(numbered) == 2
    assert uids(client.search_for_instances(search_filters={"PatientID": "DWC2"}),
                "00080018") == {stored["small"][0].SOPInstanceUID}


def test_unknown_study_is_an_http_error(client: DICOMwebClient) -> None:
    with pytest.raises(HTTPError) as info:
        client.search_for_series("1.2.3.4.5.6")
    assert info.value.response is not None and info.value.response.status_code == 404


def test_store_to_another_study_is_refused(client: DICOMwebClient, web_node: Node) -> None:
    ds = ct(generate_uid(), generate_uid(), 1)
    with pytest.raises(HTTPError) as info:
        client.store_instances([ds], study_instance_uid=generate_uid())
    assert info.value.response is not None and info.value.response.status_code == 409
    assert ds.SOPInstanceUID not in web_node.index()


def test_stow_goes_on_when_the_analyser_helpers_are_killed(
        client: DICOMwebClient, web_node: Node) -> None:
    # One helper per gunicorn worker (two workers), started as the workers boot.
    assert wait_until(lambda: len(analyser_helpers(web_node)) == 2)
    killed = analyser_helpers(web_node)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, i + 1) for i in range(4)]
    response = client.store_instances(datasets)
    # Nothing was being analysed when they died: every part is stored, by new helpers.
    assert "FailedSOPSequence" not in response
    assert [r.ReferencedSOPInstanceUID for r in response.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in datasets]
    assert {ds.SOPInstanceUID for ds in datasets} <= set(web_node.index())
    assert analyser_helpers(web_node) - killed
    assert client.search_for_instances(study_instance_uid=study)


def test_web_port_taken_is_a_clear_start_up_error(web_node: Node, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        env = {**web_node.env, "PACS_DATA_DIR": str(tmp_path / "data"),
               "PACS_DIMSE_PORT": str(free_port()),
               "PACS_WEB_PORT": str(taken.getsockname()[1])}
        result = subprocess.run([sys.executable, "-m", "pacs", "serve"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot listen on port" in result.stderr


def test_sigterm_stops_dimse_and_web(node_factory: Callable[..., Node]) -> None:
    port = free_port()
    node = node_factory("dicomweb-stop", PACS_WEB_PORT=str(port), PACS_WEB_WORKERS="2")
    wait_for_port(port)
    assert DICOMwebClient(url=f"http://127.0.0.1:{port}").search_for_studies() == []
    assert wait_until(lambda: len(analyser_helpers(node)) == 2)
    node.terminate()  # exit code 0, and every process of the group gone
    assert wait_until(lambda: not analyser_helpers(node), timeout=10), "helpers outlived"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert "Traceback" not in node.log(), node.log()
