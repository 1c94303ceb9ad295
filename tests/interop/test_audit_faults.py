"""Fault: the audit trail cannot be written (docs/reliability.md, "Faults of the real
parts").  A node whose ``PACS_AUDIT_LOG`` lies under a regular file (so that it can be
neither created nor opened, whoever runs the test) answers C-STORE, C-FIND and QIDO-RS
as usual; each process logs the failure once at ERROR; once the folder exists, the
trail starts again with a Security Alert (Audit Recording Started) per process that
lost events, saying how many."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.auditcheck import event_name, problems, read_trail
from tests.conftest import sample
from tests.interop.conftest import AE_TITLE, Node, answers_qido, run_dcmtk

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

_CANNOT = re.compile(r"ERROR pacs\.core\.audit\[(\d+)\]: audit trail .* cannot be written")


def _files(folder: Path, count: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    study = generate_uid()
    paths = []
    for number in range(count):
        ds = pydicom.dcmread(sample("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{study}-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def _work(node: Node, folder: Path) -> int:
    """C-STORE (one association), C-FIND and five QIDO-RS, all answered; the number of
    audit events they make."""
    stored = run_dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(node.port),
                       *_files(folder, 2))
    assert stored.returncode == 0, f"{stored.stdout}\n{node.log()}"
    found = run_dcmtk("findscu", "-S", "-aec", AE_TITLE, "-k", "QueryRetrieveLevel=STUDY",
                      "-k", "StudyInstanceUID", "127.0.0.1", str(node.port))
    assert found.returncode == 0, f"{found.stdout}\n{node.log()}"
    for _ in range(5):
        assert requests.get(f"{node.web_url()}/studies", timeout=30).status_code == 200
    return 1 + 1 + 5


def test_an_unwritable_trail_never_stops_the_node(node_factory: Callable[..., Node],
                                                  tmp_path: Path) -> None:
    blocker = tmp_path / "trail"
    blocker.write_text("a file where the trail's folder should be")
    path = blocker / "audit.jsonl"
    node = node_factory("audit-fault", PACS_AUDIT_LOG=str(path), PACS_WEB_WORKERS="1")
    answers_qido(node)

    lost = _work(node, tmp_path / "first") + 1  # + the answers_qido search
    node.assert_serving()
    during = node.resources()
    failing = [int(pid) for pid in _CANNOT.findall(node.log(since_start=True))]
    assert failing, node.log()
    assert len(failing) == len(set(failing))  # once per process, not once per event

    blocker.unlink()
    blocker.mkdir()  # the operator makes room
    made = _work(node, tmp_path / "second")
    events = read_trail(path)
    assert all(problems(e) == [] for e in events)
    alerts = [e for e in events if event_name(e) == "Security Alert"]
    assert alerts and all(a["EventIdentification"]["EventTypeCode"][0]["csd-code"]
                          == "110134" for a in alerts)
    reported = [int(a["EventIdentification"]["EventOutcomeDescription"].split()[0])
                for a in alerts]
    assert all(n >= 1 for n in reported) and sum(reported) <= lost
    assert len(events) - len(alerts) == made  # nothing of the second round is missing
    assert "writing again;" in node.log(since_start=True)
    after = node.resources()
    print(f"\nunwritable audit trail: {lost} events lost in {len(failing)} processes, "
          f"{len(alerts)} alerts reporting {sum(reported)}; during the fault {during}, "
          f"after {after}")
