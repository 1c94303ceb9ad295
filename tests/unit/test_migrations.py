"""Schema by user_version, built from the attribute table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs.attributes import ATTRIBUTES, Level, case_folded_column
from pacs.index.connection import connect
from pacs.index.migrations import APPLICATION_ID, MIGRATIONS, migrate


def test_fresh_index(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.pragma("application_id") == APPLICATION_ID
    assert conn.pragma("journal_mode") == "wal"
    assert conn.pragma("synchronous") == 2  # FULL
    assert migrate(conn) == len(MIGRATIONS)  # idempotent


def test_every_stored_attribute_has_a_column(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    migrate(conn)
    for level in Level:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({level.table})")}
        for attribute in ATTRIBUTES:
            if attribute.level is level and attribute.column:
                expected = attribute.column if attribute.column != "patient_id" else "patient_id"
                assert expected in columns, attribute.keyword
                folded = case_folded_column(attribute)
                assert folded is None or folded in columns
    instance = {row[1] for row in conn.execute("PRAGMA table_info(instance)")}
    assert {"object_key", "size", "checksum", "transfer_syntax", "received_at",
            "calling_ae", "number_of_frames"} <= instance


def test_foreign_index_file_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    conn.pragma("application_id", 1234)
    with pytest.raises(RuntimeError, match="not a pacs index"):
        migrate(conn)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    conn.pragma("user_version", len(MIGRATIONS) + 1)
    with pytest.raises(RuntimeError, match="newer"):
        migrate(conn)
