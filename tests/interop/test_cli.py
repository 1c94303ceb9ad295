"""The ``pacs`` command as an operator runs it: import, config, and stopping ``serve``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.conftest import sample
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    acknowledged,
    assert_consistent,
    make_instances,
    start_dcmsend,
)

pytestmark = pytest.mark.interop

_SUMMARY = re.compile(r"stored: (?P<stored>\d+), unchanged duplicates: (?P<unchanged>\d+), "
                      r".*rejected: (?P<rejected>\d+)")


def _summary(output: str) -> dict[str, int]:
    match = _SUMMARY.search(output)
    assert match, f"no summary line in:\n{output}"
    return {k: int(v) for k, v in match.groupdict().items()}


# --- pacs import ------------------------------------------------------------------------------

def test_import_folder_recursively(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory("import", start=False)
    folder = tmp_path / "incoming"
    made = make_instances(folder / "a", 3, patient_id="CLIIMPORT")
    made += make_instances(folder / "b" / "c", 2, patient_id="CLIIMPORT")
    shutil.copy(sample("MR_small.dcm"), folder / "b" / "mr.dcm")
    made.append((folder / "b" / "mr.dcm", str(pydicom.dcmread(sample("MR_small.dcm"))
                                              .SOPInstanceUID)))
    (folder / "b" / "c" / "notes.txt").write_text("not DICOM at all\n")
    (folder / "truncated.dcm").write_bytes(sample("CT_small.dcm").read_bytes()[:20000])
    # Odd bytes in a header, first in the walk: a Specific Character Set with a NUL in
    # a term (unreadable: rejected), a Modality of a VR pydicom does not know (stored,
    # its Modality unknown in the index); the files after them are imported.
    ct = sample("CT_small.dcm").read_bytes()
    (folder / "0-charset.dcm").write_bytes(ct.replace(b"ISO_IR 100", b"ISO_IR\x00100", 1))
    (folder / "1-vr.dcm").write_bytes(ct.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00ZZ", 1))
    made.append((folder / "1-vr.dcm", str(pydicom.dcmread(sample("CT_small.dcm"))
                                          .SOPInstanceUID)))

    first = node.cli("import", "--quiet", str(folder))
    assert first.returncode != 0, "rejected files must make the exit code non-zero"
    counts = _summary(first.stdout)
    assert counts == {"stored": 7, "unchanged": 0, "rejected": 3}, first.stdout
    assert "notes.txt" in first.stdout and "truncated.dcm" in first.stdout, first.stdout
    assert "0-charset.dcm: the Specific Character Set does not decode" in first.stdout

    index = assert_consistent(node.data_dir, exact=True)
    assert set(index) == {uid for _, uid in made}
    assert {row.calling_ae for row in index.values()} == {""}
    query = node.cli("query", "--level", "image", "PatientID=CLIIMPORT")
    assert query.returncode == 0, query.stdout + query.stderr
    for _, uid in made[:5]:
        assert uid in query.stdout, query.stdout

    again = node.cli("import", "--quiet", str(folder))
    assert again.returncode != 0
    assert _summary(again.stdout) == {"stored": 0, "unchanged": 7, "rejected": 3}, again.stdout
    assert set(assert_consistent(node.data_dir, exact=True)) == set(index)


def test_import_with_progress_bar_to_stderr(node_factory: Callable[..., Node],
                                            tmp_path: Path) -> None:
    node = node_factory("progress", start=False)
    make_instances(tmp_path / "in", 3)
    result = node.cli("import", str(tmp_path / "in"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _summary(result.stdout) == {"stored": 3, "unchanged": 0, "rejected": 0}
    assert "3/3" in result.stderr, result.stderr  # tqdm's bar, kept off stdout


# --- pacs config ------------------------------------------------------------------------------

def test_config_masks_secrets(node_factory: Callable[..., Node]) -> None:
    node = node_factory("config", start=False)
    result = node.cli("config", env={"PACS_S3_SECRET_KEY": "very-secret-value-42",
                                     "PACS_S3_ACCESS_KEY": "ACCESSKEYVALUE7"})
    assert result.returncode == 0, result.stderr
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert settings["PACS_S3_SECRET_KEY"] == "****"
    assert settings["PACS_S3_ACCESS_KEY"] == "****"
    assert "very-secret-value-42" not in result.stdout + result.stderr
    assert "ACCESSKEYVALUE7" not in result.stdout + result.stderr
    assert settings["PACS_DIMSE_PORT"] == str(node.port)
    assert settings["PACS_DATA_DIR"] == str(node.data_dir)
    assert settings["PACS_AE_TITLE"] == AE_TITLE


def test_config_reads_dotenv_and_environment_wins(node_factory: Callable[..., Node]) -> None:
    node = node_factory("dotenv", start=False)
    (node.root / ".env").write_text("PACS_AE_TITLE=FROMDOTENV\nPACS_S3_BUCKET=dotenvbucket\n"
                                    "PACS_S3_SECRET_KEY=dotenv-secret\n")
    try:
        result = node.cli("config", env={"PACS_S3_BUCKET": "envbucket"})
    finally:
        (node.root / ".env").unlink()
    assert result.returncode == 0, result.stderr
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert settings["PACS_AE_TITLE"] == "FROMDOTENV"
    assert settings["PACS_S3_BUCKET"] == "envbucket"
    assert settings["PACS_S3_SECRET_KEY"] == "****"
    assert "dotenv-secret" not in result.stdout


# --- stopping pacs serve ----------------------------------------------------------------------

def test_sigterm_when_idle_exits_cleanly(node_factory: Callable[..., Node]) -> None:
    node = node_factory("sigterm")
    node.assert_serving()
    assert node.terminate(signal.SIGTERM) == 0
    assert "stopped" in node.log()


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_ctrl_c_or_a_closed_terminal_exits_cleanly(node_factory: Callable[..., Node],
                                                   number: int) -> None:
    """Ctrl-C in a terminal (SIGINT), or the terminal closed (SIGHUP), to the whole
    foreground process group: the node stops as on SIGTERM.  Started with SIGHUP's
    default disposition, as from a terminal (this suite may run under nohup, whose
    ignored SIGHUP the node would keep: see the next test)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        node = node_factory("sigint" if number == signal.SIGINT else "sighup")
    finally:
        signal.signal(signal.SIGHUP, previous)
    node.assert_serving()
    assert node.terminate(number, group=True) == 0
    assert "stopped" in node.log()


def test_under_nohup_a_closed_terminal_leaves_the_node_serving(tmp_path: Path) -> None:
    """``nohup pacs serve &``: SIGHUP is ignored, and stays so for the node and its
    workers, which go on serving when the terminal closes."""
    node = Node(tmp_path / "nohup")
    node.root.mkdir(parents=True, exist_ok=True)
    with open(node.log_path, "ab") as log:
        node.proc = subprocess.Popen(["nohup", sys.executable, "-m", "pacs", "serve"],
                                     cwd=node.root, env=node.env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while " listening on " not in node.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert " listening on " in node.log(), node.log()
        os.killpg(node.proc.pid, signal.SIGHUP)  # the terminal went away
        time.sleep(2)
        assert node.proc.poll() is None, node.log()
        node.assert_serving()
    finally:
        node.stop()


@pytest.mark.dimse
def test_sigterm_during_transfer_loses_no_acknowledged_instance(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    """SIGTERM while a peer sends: exit 0 within the stop timeout, and every instance
    the peer saw acknowledged is stored and indexed."""
    node = node_factory("drain")
    made = make_instances(tmp_path / "send", 40)
    sender = start_dcmsend(node.port, tmp_path / "send")
    sender.wait_for(10)
    assert sender.process.poll() is None, "dcmsend ended before SIGTERM"
    assert node.terminate(signal.SIGTERM) == 0
    acked = acknowledged(sender.finish())
    assert len(acked) >= 10

    index = assert_consistent(node.data_dir, exact=True)
    assert acked <= set(index) <= {uid for _, uid in made}
    node.start()
    node.assert_serving()


# --- the suite's node --------------------------------------------------------------------------

def test_a_node_whose_port_was_taken_before_it_started_serves_on_another(
        node_factory: Callable[..., Node]) -> None:
    """A port picked free can be taken before the node binds it (by another socket on
    loopback): the node refuses to start on it ("Address already in use") and the suite's
    ``Node`` starts it again on newly picked ports."""
    node = node_factory("port-taken", start=False)
    taken = node.port
    with socket.create_server(("127.0.0.1", taken)):
        node.start()
        assert node.port != taken
        assert "Address already in use" in node.log()
        node.assert_serving()


def test_a_second_serve_on_a_running_nodes_data_leaves_its_writes_alone(
        node_factory: Callable[..., Node]) -> None:
    """``pacs serve`` cleans up the temporary files of interrupted writes before its
    workers start, but only when no other process has the index open: beside a running
    node on the same data folder, they are its writes in progress.  The second one
    stops when it cannot take the ports; the first goes on, its files untouched."""
    node = node_factory("second-serve")
    in_flight = [node.data_dir / "objects" / ".tmp-in-flight",
                 node.data_dir / "intake" / ".tmp-in-flight"]
    for path in in_flight:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"being written")

    second = node.cli("serve", timeout=60)

    assert second.returncode != 0, second.stdout + second.stderr
    assert "another process has the index open" in second.stderr, second.stderr
    assert all(path.exists() for path in in_flight)
    node.assert_serving()
    node.stop()
    node.start()  # alone on its data: the clean-up runs
    assert not any(path.exists() for path in in_flight)
    node.assert_serving()
