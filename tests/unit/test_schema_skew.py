"""A ``pacs`` command beside a running node of an older pacs: it would upgrade the
index's schema under that node, whose processes then refuse the index as newer than
they are (a restarted intake mover never drains the intake).  Refused instead, the
index left as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import apsw
import pytest
from click.testing import CliRunner

from pacs.cli import main
from pacs.core import config
from pacs.core.index.migrations import MIGRATIONS, stored_version
from pacs.core.services import build


def test_a_command_does_not_upgrade_an_index_a_node_of_an_older_pacs_has_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    settings = config.load(overrides={"PACS_DATA_DIR": str(tmp_path / "data")},
                           env_file=None)
    build(settings).close()
    older = len(MIGRATIONS) - 1
    conn = apsw.Connection(str(settings.index_path))
    conn.pragma("user_version", older)  # as the previous pacs left it
    conn.close()
    # The older node: a process that keeps the index open (WAL: its -shm locked).
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, apsw; c = apsw.Connection(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM sqlite_master').fetchall(); "
         "print('open', flush=True); sys.stdin.readline()", str(settings.index_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        for command in (["fsck"], ["query"], ["status"]):
            refused = CliRunner().invoke(main, command)
            assert refused.exit_code != 0, (command, refused.output)
            assert f"is of schema {older}, this pacs of {len(MIGRATIONS)}" in \
                refused.output, refused.output
        assert stored_version(settings.index_path) == older
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # Alone with the index, the command upgrades it.
    assert CliRunner().invoke(main, ["query"]).exit_code == 0
    assert stored_version(settings.index_path) == len(MIGRATIONS)
