"""One read path: SQL lives in :mod:`pacs.core.index` (and the query engine) only.

Every other module reads and writes the index through the named functions of
``pacs/core/index/`` (:mod:`pacs.core.index.reads`, :mod:`pacs.core.index.writer`) or
the query engine.  Read from the source: an SQL statement written as a string constant
(f-strings too), or a call that runs one (``execute``, ``executemany``, ``pragma``),
outside those packages fails here.  Docstrings are prose, not statements.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from pacs.core.index import reads
from pacs.core.services import Services, drain

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pacs", "adapters")
#: Where SQL belongs.
SQL_HOMES = ("pacs/core/index/", "pacs/core/query/")

#: Files outside the SQL homes that may still run SQL, each with the reason.  Only
#: ``pacs/dimse/`` files whose owner moves them to the index's functions may be listed;
#: an entry whose file no longer holds SQL fails (so the list only shrinks).  Empty:
#: every DIMSE module already reads through the query engine.
ALLOWED: dict[str, str] = {}

#: The start of a statement (upper-case keywords, as this code base writes SQL).
_STATEMENT = re.compile(
    r"^\s*(SELECT\s|INSERT\s|UPDATE\s+\S+\s+SET\b|DELETE\s+FROM\b|REPLACE\s+INTO\b|"
    r"PRAGMA\s|WITH\s+\w+\s+AS\b|CREATE\s|DROP\s|ALTER\s|BEGIN\b|COMMIT\b|ROLLBACK\b|"
    r"SAVEPOINT\b|RELEASE\s|VACUUM\b|ANALYZE\b|ATTACH\s)")
#: A statement inside a longer text, or a fragment built into one (a condition on a
#: bound parameter).
_FRAGMENT = re.compile(r"\b(SELECT\s+.+\s+FROM\s|INSERT\s+INTO\s|DELETE\s+FROM\s|"
                       r"WHERE\s+\w+(\.\w+)?\s*(=|IN\b|IS\b)|JOIN\s+\w+\s+ON\s)|"
                       r"\w+(\.\w+)?\s*(=|<=|>=|<|>|\bIN\b|\bGLOB\b|\bLIKE\b)\s*\(?\?")
#: Methods that run SQL on an apsw connection or cursor.
_RUNNERS = frozenset({"execute", "executemany", "pragma"})


def _files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                      | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                found.add(id(body[0].value))
    return found


def _texts(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string constant and f-string (its literal parts joined,
    ``{}`` for each placeholder), docstrings excepted."""
    skip = _docstrings(tree)
    inside_fstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                inside_fstrings.add(id(value))
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    parts.append(value.value)
                else:
                    parts.append("{}")
            yield node.lineno, "".join(parts)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in skip and id(node) not in inside_fstrings):
            yield node.lineno, node.value


def sql_in(source: str, name: str = "<source>") -> list[str]:
    """Where ``source`` holds SQL: ``line: what`` for each statement and each call that
    runs one."""
    tree = ast.parse(source, name)
    found = [f"{line}: SQL text {text.strip()[:60]!r}" for line, text in _texts(tree)
             if _STATEMENT.match(text) or _FRAGMENT.search(text)]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _RUNNERS):
            found.append(f"{node.lineno}: runs SQL with .{node.func.attr}()")
    return sorted(found, key=lambda entry: int(entry.split(":")[0]))


def _sql_outside_homes() -> dict[str, list[str]]:
    found = {}
    for path in _files():
        name = _relative(path)
        if name.startswith(SQL_HOMES):
            continue
        where = sql_in(path.read_text(), name)
        if where:
            found[name] = where
    return found


FOUND = _sql_outside_homes()


def test_no_sql_outside_the_index_and_the_query_engine() -> None:
    unexpected = {name: where for name, where in FOUND.items() if name not in ALLOWED}
    assert not unexpected, (
        "SQL outside pacs/core/index/ and pacs/core/query/ (give the index a named "
        f"function in pacs/core/index/reads.py or writer.py instead): {unexpected}")


def test_the_allowlist_names_only_dimse_files_that_still_hold_sql() -> None:
    assert all(name.startswith("pacs/dimse/") for name in ALLOWED), ALLOWED
    stale = sorted(name for name in ALLOWED if name not in FOUND)
    assert not stale, f"no SQL left in {stale}: remove them from ALLOWED"


@pytest.mark.parametrize("source", [
    'conn.execute("SELECT pk FROM instance WHERE sop_uid = ?", (uid,))',
    'SQL = "DELETE FROM instance_metadata"',
    'SQL = ("SELECT series.pk, instance.sop_uid FROM instance "\n'
    '       "JOIN series ON series.pk = instance.series_pk")',
    'sql = f"UPDATE {table} SET x = ?"',
    'sql = base + " AND series.series_uid = ?"',
    'x = "PRAGMA quick_check"',
    'conn.pragma("user_version")',
    'row = cursor.executemany(statement, rows)',
])
def test_the_scan_finds_sql(source: str) -> None:
    assert sql_in(source)


@pytest.mark.parametrize("source", [
    '"""Run ``PRAGMA quick_check`` and SELECT what FROM where."""',
    'def f():\n    """DELETE FROM the quarantine, never."""\n',
    'DELETE = "delete"',
    'log.info("select the studies from the index where the user asked")',
    'msg = "no such study, series or instance"',
    'resp.set_header("Content-Disposition", "attachment")',
])
def test_the_scan_leaves_prose_alone(source: str) -> None:
    assert sql_in(source) == []


def test_the_named_reads_use_bound_parameters(tmp_path: Path) -> None:
    """A UID that is SQL text is only ever a value."""
    from pacs.core.index.connection import connect
    from pacs.core.index.migrations import migrate

    conn = connect(tmp_path / "index.sqlite")
    migrate(conn)
    hostile = "1' OR '1'='1"
    assert reads.instance_keys(conn, hostile) == []
    assert reads.instance_keys(conn, hostile, hostile, hostile) == []
    assert reads.first_series_images(conn, hostile, hostile) == []
    assert reads.lookup(conn, hostile) is None
    assert reads.study_patients(conn, [hostile]) == {}
    assert reads.metadata_rows(conn, []) == []
    assert reads.counts(conn) == {"patient": 0, "study": 0, "series": 0, "instance": 0}
    assert reads.indexed_bytes(conn) == 0
    assert reads.quick_check(conn) == "ok"
    with pytest.raises(ValueError):
        reads.metadata_rows(conn, list(range(reads.MAX_KEYS + 1)))
    with pytest.raises(ValueError):
        reads.study_patients(conn, [str(n) for n in range(reads.MAX_KEYS + 1)])
    conn.close()


def test_a_failing_read_is_an_index_failure(tmp_path: Path) -> None:
    from pacs.core.errors import IndexFailure
    from pacs.core.index.connection import connect

    conn = connect(tmp_path / "index.sqlite")  # no schema: every table is missing
    with pytest.raises(IndexFailure, match="count failed") as caught:
        reads.counts(conn)
    assert isinstance(caught.value.__cause__, apsw.Error)
    conn.close()


def test_the_first_series_images_follow_series_and_instance_numbers(services: Services
                                                                     ) -> None:
    """The study's first series with images by Series Number (a series without Rows is
    skipped), its images by Instance Number (as numbers, not text)."""
    from pydicom.uid import generate_uid

    from tests.factory import make_instance

    study, late, early, no_images = generate_uid(), generate_uid(), generate_uid(), \
        generate_uid()
    sops: dict[tuple[str, int], str] = {}
    for series, number in ((late, 10), (early, 2)):
        for instance_number in (10, 9, 1):
            sop = generate_uid()
            sops[(series, instance_number)] = sop
            services.ingest.store_bytes(make_instance(
                StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                SeriesNumber=number, InstanceNumber=instance_number))
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID=study, SeriesInstanceUID=no_images, SeriesNumber=1, Rows=None,
        Columns=None, PixelData=None))
    conn = services.index.connection()
    assert reads.first_series_images(conn, study) == [
        sops[(early, 1)], sops[(early, 9)], sops[(early, 10)]]
    assert reads.first_series_images(conn, study, late) == [
        sops[(late, 1)], sops[(late, 9)], sops[(late, 10)]]
    assert reads.first_series_images(conn, study, no_images) == []
    keys = reads.instance_keys(conn, study)
    assert len(keys) == 7 and reads.instance_keys(conn, study, early) == sorted(
        reads.instance_keys(conn, study, early))
    rows = reads.metadata_rows(conn, keys)
    assert sorted(row[0] for row in rows) == sorted(keys)
    # Small objects: acknowledged through the intake, their metadata left to the mover.
    assert all(row[7] is None for row in rows)
    assert drain(services) == 7
    rows = reads.metadata_rows(conn, keys)
    assert all(row[7] is not None for row in rows)  # built from the bytes it moved
