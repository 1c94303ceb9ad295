"""Crash consistency: ``kill -9`` of the whole node in the middle of a large ``dcmsend``.

After a restart on the same data folder every instance whose C-STORE the sender saw
acknowledged (per dcmsend's own log) is present, readable and indexed, and the index
lists nothing the store lacks.  ``pacs fsck`` then makes index and store agree exactly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.interop.conftest import (
    AE_TITLE,
    DCMTK_ENV,
    Node,
    _describe,
    _group_members,
    acknowledged,
    assert_consistent,
    dcmtk,
    make_instances,
    start_dcmsend,
    stored_objects,
    temporaries,
)

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

#: Instances generated; the node is killed after KILL_AFTER acknowledgements.
INSTANCES = 300
KILL_AFTER = 80


def test_kill_9_during_dcmsend(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory("crash")
    made = make_instances(tmp_path / "send", INSTANCES, per_series=100,
                          patient_id="CRASHTEST")
    uids = {uid for _, uid in made}

    sender = start_dcmsend(node.port, tmp_path / "send", calling="CRASHSCU")
    sender.wait_for(KILL_AFTER)
    assert sender.process.poll() is None, "dcmsend ended before the kill:\n" + "".join(
        sender.lines[-40:])
    node.kill9()  # the parent and every worker, at once
    log = sender.finish()
    acked = acknowledged(log)

    assert sender.process.returncode != 0, "dcmsend did not notice the crash"
    assert KILL_AFTER <= len(acked) < INSTANCES, len(acked)
    assert acked <= uids

    # As the crash left it: each acknowledged instance indexed, its bytes in the intake
    # or the store.
    assert not (acked - set(assert_consistent(node.data_dir)))
    node.start()  # same port, same data folder
    node.wait_drained()  # the mover stores what the intake held
    index = assert_consistent(node.data_dir, exact=True)
    missing = acked - set(index)
    assert not missing, f"{len(missing)} acknowledged instances lost, e.g. {sorted(missing)[:3]}"
    for uid in acked:
        row = index[uid]
        ds = pydicom.dcmread(node.object_path(row))  # the whole object, pixel data too
        assert ds.SOPInstanceUID == uid
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8
    assert not temporaries(node.data_dir), "the start-up did not clean temporary files"
    node.assert_serving()

    before = node.snapshot()
    dry = node.cli("fsck")  # a dry run: reports, changes nothing
    assert dry.returncode in (0, 1), dry.stdout + dry.stderr
    assert node.snapshot() == before
    fsck = node.cli("fsck", "--repair")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert re.search(r"^checked \d+ index rows", fsck.stdout, re.MULTILINE), fsck.stdout
    index = assert_consistent(node.data_dir, exact=True)  # both ways now
    assert acked <= set(index)
    assert set(index) <= uids
    assert {row.object_key for row in index.values()} == set(stored_objects(node.data_dir))
    print(f"{len(acked)} acknowledged before kill -9; {len(index)} indexed after fsck; "
          f"fsck: {fsck.stdout.strip()}")

    # The sender can finish the job: the rest goes in, and nothing is duplicated.
    result = subprocess.run(
        [dcmtk("dcmsend"), "-aec", AE_TITLE, "-aet", "CRASHSCU", "+sd", "127.0.0.1",
         str(node.port), str(tmp_path / "send")],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120, check=False)
    assert result.returncode == 0, result.stdout
    node.wait_drained()
    index = assert_consistent(node.data_dir, exact=True)
    assert set(index) == uids


def test_the_node_s_processes_end_when_pacs_serve_alone_is_killed(
        node_factory: Callable[..., Node]) -> None:
    """SIGKILL to ``pacs serve`` alone (not to its process group, as a service manager
    would): its DIMSE workers, gunicorn and companions see their parent gone and stop
    (they kept serving associations, moving and forwarding for a node no longer
    there), and the node starts again."""
    node = node_factory("orphans")
    assert node.proc is not None
    group = node.proc.pid
    assert len(_group_members(group)) > 3, _describe(_group_members(group))
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while (left := _group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, _describe(left)
    node.start()
    node.assert_serving()
