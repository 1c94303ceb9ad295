"""Schema by user_version, built from the attribute table."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from pacs.core.attributes import ATTRIBUTES, Level, case_folded_column, table_attributes
from pacs.core.errors import ConfigError
from pacs.core.index.connection import connect
from pacs.core.index.migrations import APPLICATION_ID, MIGRATIONS, migrate
from pacs.core.services import Services, drain
from tests.factory import make_instance


def test_fresh_index(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.pragma("application_id") == APPLICATION_ID
    assert conn.pragma("journal_mode") == "wal"
    assert conn.pragma("synchronous") == 2  # FULL
    assert migrate(conn) == len(MIGRATIONS)  # idempotent


def test_a_new_index_is_made_whole_with_its_owner_in_one_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No other process may open a new index half made, or made without its owner: it
    would be accepted under any customer's name until the owner was recorded."""
    path = tmp_path / "i.sqlite"
    conn = connect(path)

    def broken(_: apsw.Connection) -> None:
        raise RuntimeError("the last migration fails")

    monkeypatch.setattr("pacs.core.index.migrations.MIGRATIONS", (*MIGRATIONS[:-1], broken))
    with pytest.raises(RuntimeError):
        migrate(conn, owner="alice")
    other = connect(path)
    assert other.pragma("user_version") == 0  # nothing of it was committed
    assert not other.execute("SELECT name FROM sqlite_master").fetchall()
    monkeypatch.undo()
    assert migrate(conn, owner="alice") == len(MIGRATIONS)
    assert migrate(other, owner="typo") == len(MIGRATIONS)  # made: its owner stays
    assert other.execute("SELECT customer FROM owner").fetchall() == [("alice",)]


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
    with pytest.raises(ConfigError, match="not a pacs index"):
        migrate(conn)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    conn.pragma("user_version", len(MIGRATIONS) + 1)
    with pytest.raises(ConfigError, match="newer"):
        migrate(conn)


def _study_copies(conn: apsw.Connection) -> dict[str, tuple]:
    names = [c for a in table_attributes(Level.STUDY) if a.level is Level.PATIENT
             for c in (a.column, case_folded_column(a)) if c]
    rows = conn.execute(f"SELECT accession_number, {', '.join(names)} FROM study").fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def _as_before_the_study_copies(conn: apsw.Connection) -> None:
    """The index as schema 3 left it: no study copies of the patient attributes."""
    copies = [c for a in table_attributes(Level.STUDY) if a.level is Level.PATIENT
              for c in (a.column, case_folded_column(a)) if c]
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                "tbl_name = 'study' AND name LIKE 'study_patient%'").fetchall():
        if name != "study_patient":
            conn.execute(f"DROP INDEX {name}")
    for column in copies:
        conn.execute(f"ALTER TABLE study DROP COLUMN {column}")
    conn.pragma("user_version", 3)


def test_study_copies_of_patient_attributes_are_filled_for_existing_studies(
        services: Services) -> None:
    """Schema 4: each existing study gets its own patient attributes from its stored
    metadata (or, without a metadata row, the patient row's values)."""
    own = {
        "B1": {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
               "PatientBirthDate": "19700101", "PatientSex": "F", "OtherPatientIDs": "X1\\X2",
               "PatientComments": "a\\b", "IssuerOfPatientID": "HOSP"},
        "B2": {"PatientName": "NEW^NAME", "PatientBirthDate": "19710202", "PatientSex": "M",
               "IssuerOfPatientID": "HOSP"},
        "B3": {"PatientName": "THIRD^NAME", "PatientBirthDate": "19720303",
               "IssuerOfPatientID": "HOSP"},
    }
    for accession, attributes in own.items():
        services.ingest.store_bytes(make_instance(PatientID="P9", AccessionNumber=accession,
                                                  **attributes))
    assert drain(services) == 3  # the mover keeps the metadata of what it moves
    conn = services.index.connection()
    expected = _study_copies(conn)
    assert expected["B1"][0] == own["B1"]["PatientName"]  # each study its own, as ingested
    patient = conn.execute("SELECT patient_name FROM patient").fetchall()
    assert patient == [("THIRD^NAME",)]
    with services.index.write() as conn:
        conn.execute("DELETE FROM instance_metadata WHERE instance_pk IN (SELECT instance.pk "
                     "FROM instance JOIN series ON series.pk = instance.series_pk JOIN study "
                     "ON study.pk = series.study_pk WHERE accession_number = 'B2')")
        _as_before_the_study_copies(conn)
    conn = services.index.connection()
    assert migrate(conn) == len(MIGRATIONS)
    migrated = _study_copies(conn)
    assert migrated["B1"] == expected["B1"]
    assert migrated["B3"] == expected["B3"]
    # No metadata row: the patient row's values (the latest known of each attribute:
    # B3's, and those B3 lacks from the studies before it).
    names = [c for a in table_attributes(Level.STUDY) if a.level is Level.PATIENT
             for c in (a.column, case_folded_column(a)) if c]
    assert migrated["B2"] == conn.execute(f"SELECT {', '.join(names)} FROM patient").fetchone()
    assert migrated["B2"][:2] == expected["B3"][:2] == ("THIRD^NAME", "THIRD^NAME")
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(study)")}
    assert {"study_patient_id", "study_patient_name", "study_patient_name_folded",
            "study_patient_birth_date"} <= indexes


def test_study_copies_migrate_an_empty_index_of_schema_3(tmp_path: Path) -> None:
    conn = connect(tmp_path / "i.sqlite")
    for number, migration in enumerate(MIGRATIONS[:3]):
        migration(conn)
        conn.pragma("user_version", number + 1)
    assert migrate(conn) == len(MIGRATIONS)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(study)")}
    assert {a.column for a in table_attributes(Level.STUDY)} <= columns


def test_forwarding_numbers_existing_instances_and_every_change_after(
        services: Services) -> None:
    """The forwarding migration: instances indexed before it get their key as change
    number; each insert or overwrite after it takes a number past every other."""
    first = make_instance(PatientName="A^B")
    services.ingest.store_bytes(first)
    services.ingest.store_bytes(make_instance())
    with services.index.write() as conn:
        conn.execute("DROP TRIGGER instance_change_insert")
        conn.execute("DROP TRIGGER instance_change_update")
        conn.execute("DROP INDEX instance_change_seq")
        conn.execute("ALTER TABLE instance DROP COLUMN change_seq")
        # The version before the forwarding migration (later ones run again, as they
        # may: each is idempotent).
        conn.pragma("user_version",
                    [step.__name__ for step in MIGRATIONS].index("_forwarding"))
    conn = services.index.connection()
    assert migrate(conn) == len(MIGRATIONS)
    rows = conn.execute("SELECT pk, change_seq FROM instance ORDER BY pk").fetchall()
    assert [pk for pk, _ in rows] == [seq for _, seq in rows]
    services.ingest.store_bytes(first.replace(b"A^B", b"C^D"))  # overwritten in place
    again = conn.execute("SELECT pk, change_seq FROM instance ORDER BY pk").fetchall()
    assert again[0][0] == rows[0][0] and again[0][1] == rows[-1][1] + 1


@pytest.mark.parametrize("refused_url, waiting_url", [
    ("https://u:a@host/dw", "https://u:b@host/dw"),
    ("https://u:b@host/dw", "https://u:a@host/dw")], ids=["refused first", "waiting first"])
def test_forwarding_destinations_lose_their_credentials(
        services: Services, refused_url: str, waiting_url: str) -> None:
    """An outbox written when it named a STOW-RS destination by its URL with its
    credentials: the migration names it without them (one entry of an instance queued
    under two such URLs kept), so that the forwarder of the present settings finds it."""
    with services.index.write() as conn:
        # One instance under both URLs: an old change refused for good, a newer one
        # waiting; the newer is kept, whichever URL is migrated first.
        for pk, url, seq, failed in ((1, refused_url, 1, 10.0), (2, waiting_url, 7, None)):
            conn.execute("INSERT INTO outbox (pk, destination, route, sop_uid, change_seq, "
                         "queued_at, failed_at) VALUES (?, ?, 'a', '1.2.3', ?, 0, ?)",
                         (pk, url, seq, failed))
        conn.execute("INSERT INTO outbox (pk, destination, route, sop_uid, change_seq, "
                     "queued_at) VALUES (3, ?, 'a', '1.2.4', 2, 0)", (refused_url,))
        conn.execute("INSERT INTO forward_destination (name, failures) "
                     "VALUES (?, 3), ('PEER', 1)", (refused_url,))
        conn.pragma("user_version", [step.__name__ for step in MIGRATIONS].index(
            "_destinations_without_credentials"))
    conn = services.index.connection()
    assert migrate(conn) == len(MIGRATIONS)
    assert sorted(conn.execute(
        "SELECT destination, sop_uid, change_seq, failed_at FROM outbox")) == [
        ("https://host/dw", "1.2.3", 7, None), ("https://host/dw", "1.2.4", 2, None)]
    assert sorted(conn.execute("SELECT name, failures FROM forward_destination")) == [
        ("PEER", 1), ("https://host/dw", 3)]


def test_instances_indexed_before_their_own_patient_read_as_their_study_s(
        services: Services) -> None:
    """``instance.patient_key`` is added to an index without it; rows stored before
    (NULL) read as their study's patient, rows stored after keep their own."""
    from pacs.core.index import reads

    services.ingest.store_bytes(make_instance(SOPInstanceUID="1.2.3.4.1", PatientID="A"))
    with services.index.write() as conn:
        conn.execute("ALTER TABLE instance DROP COLUMN patient_key")
        conn.pragma("user_version",
                    [step.__name__ for step in MIGRATIONS].index("_instance_patients"))
    conn = services.index.connection()
    assert migrate(conn) == len(MIGRATIONS)
    [before] = reads.located(conn, ["1.2.3.4.1"])
    assert before.patient_key.startswith("A\x1f")
    assert conn.execute("SELECT patient_key FROM instance").fetchall() == [(None,)]
    services.ingest.store_bytes(make_instance(SOPInstanceUID="1.2.3.4.2", PatientID="B"))
    [after] = reads.located(conn, ["1.2.3.4.2"])
    assert after.patient_key.startswith("B\x1f")
