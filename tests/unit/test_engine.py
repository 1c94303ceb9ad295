"""The query engine on an index whose answers are known."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from time import sleep

import apsw
import pytest

from pacs.core.attributes import BY_KEYWORD, STUDY_ROOT_REQUIRED, Level
from pacs.core.errors import Cancelled, IndexFailure, QueryLimitExceeded, QueryTooLarge
from pacs.core.index import writer
from pacs.core.index.compiler import (
    MAX_TERMS,
    MAX_UIDS,
    MAX_VALUE_CHARS,
    Compiled,
    compile_count,
    compile_find,
    compile_instances,
    glob_literal,
)
from pacs.core.query.matching import constraint
from pacs.core.query.model import Constraint, Match, Query, Term
from pacs.core.services import Services
from pacs.core.storage.memory import MemoryStore
from tests.factory import make_instance

STUDIES = [
    # PatientID, PatientName, StudyDate, StudyTime, AccessionNumber, modalities per series
    ("P1", "DOE^JOHN", "20150101", "101010", "A1", ["CT", "CT"]),
    ("P1", "DOE^JOHN", "20160505", "235959", "A2", ["MR"]),
    ("P2", "Doe^Jane", "20150615", "080000", "A3", ["CT", "PT"]),
    ("P3", "SMITH^[ANNA]", "20101231", "120000", "", ["US"]),
    ("P4", "", "", "", "A5", ["CT"]),
    ("P5", "MÜLLER^JÖRG", "20240229", "000000", "A-6", ["MR", "MR", "SR"]),
]


def _load(services: Services) -> dict[str, list[str]]:
    """Store the studies (two instances per series); return study UIDs by accession."""
    by_accession: dict[str, list[str]] = {}
    for n, (pid, name, date, time, accession, modalities) in enumerate(STUDIES):
        study = f"1.2.826.0.1.3680043.10.543.{n + 1}"
        for s, modality in enumerate(modalities):
            series = f"{study}.{s + 1}"
            for i in range(2):
                services.ingest.store_bytes(make_instance(
                    PatientID=pid, PatientName=name, StudyDate=date, StudyTime=time,
                    AccessionNumber=accession, Modality=modality, StudyInstanceUID=study,
                    SeriesInstanceUID=series, SOPInstanceUID=f"{series}.{i + 1}",
                    InstanceNumber=str(i + 1), SeriesNumber=str(s + 1)))
        by_accession.setdefault(accession, []).append(study)
    return by_accession


@pytest.fixture
def loaded(services: Services) -> Services:
    _load(services)
    return services


def _find(services: Services, level: Level = Level.STUDY, fuzzy: bool = False,
          **keys: str) -> list[dict[str, str | None]]:
    constraints = tuple(c for c in (constraint(BY_KEYWORD[k], v) for k, v in keys.items()) if c)
    returns = tuple(BY_KEYWORD[k] for k in ("AccessionNumber", "ModalitiesInStudy",
                                            "NumberOfStudyRelatedSeries",
                                            "NumberOfStudyRelatedInstances"))
    query = Query(level=level, constraints=constraints,
                  return_keys=returns if level is Level.STUDY else (), fuzzy=fuzzy)
    return [r.values for r in services.engine.find(query)]


def _accessions(rows: list[dict[str, str | None]]) -> list[str | None]:
    return [r["AccessionNumber"] for r in rows]


@pytest.mark.parametrize("keys, expected", [
    ({}, ["A1", "A2", "A3", None, "A5", "A-6"]),
    ({"PatientID": "P1"}, ["A1", "A2"]),
    ({"PatientID": "P*"}, ["A1", "A2", "A3", None, "A5", "A-6"]),
    # PN case-insensitive by default; an empty stored name (a Required key) matches anything
    # (PS3.4 C.2.2.1.2).
    ({"PatientName": "doe*"}, ["A1", "A2", "A3", "A5"]),
    ({"PatientName": "DOE^J?HN"}, ["A1", "A2", "A5"]),
    ({"PatientName": "SMITH^[ANNA]"}, [None, "A5"]),  # '[' is literal, not a GLOB class
    ({"PatientName": "*[ANNA]*"}, [None, "A5"]),
    ({"PatientName": "müller*"}, ["A5", "A-6"]),
    ({"StudyDate": "20150101-20151231"}, ["A1", "A3", "A5"]),
    ({"StudyDate": "2015"}, ["A1", "A3", "A5"]),
    ({"StudyDate": "-20101231"}, [None, "A5"]),
    ({"StudyDate": "20160101-"}, ["A2", "A5", "A-6"]),
    ({"StudyTime": "0800-1200"}, ["A1", "A3", None, "A5"]),
    ({"AccessionNumber": "A-6"}, [None, "A-6"]),  # '-' is literal; empty R key matches
    ({"AccessionNumber": "A?"}, ["A1", "A2", "A3", None, "A5"]),
    ({"ModalitiesInStudy": "PT"}, ["A3"]),
    ({"ModalitiesInStudy": "CT\\US"}, ["A1", "A3", None, "A5"]),
    ({"Modality": "SR"}, ["A-6"]),  # relational: a series key at study level
    ({"StudyInstanceUID": "1.2.826.0.1.3680043.10.543.1\\1.2.826.0.1.3680043.10.543.3"},
     ["A1", "A3"]),
])
def test_study_matching(loaded: Services, keys: dict[str, str],
                        expected: list[str | None]) -> None:
    assert _accessions(_find(loaded, **keys)) == expected


def test_computed_attributes(loaded: Services) -> None:
    rows = {r["AccessionNumber"]: r for r in _find(loaded)}
    assert rows["A1"]["ModalitiesInStudy"] == "CT"
    assert rows["A-6"]["ModalitiesInStudy"] == "MR\\SR"
    assert rows["A-6"]["NumberOfStudyRelatedSeries"] == "3"
    assert rows["A-6"]["NumberOfStudyRelatedInstances"] == "6"


#: The computed attributes of a study and of its patient (PS3.4 C.3.4).
STUDY_COMPUTED = ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "NumberOfPatientRelatedStudies",
                  "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")


@pytest.mark.parametrize("level", [Level.SERIES, Level.IMAGE])
@pytest.mark.parametrize("limit, offset", [(None, 0), (3, 2)])
def test_a_study_s_computed_attributes_below_study_level_are_the_study_s(
        loaded: Services, monkeypatch: pytest.MonkeyPatch, level: Level,
        limit: int | None, offset: int) -> None:
    """Computed once per study of the matches (a study's SOP Classes in Study walked
    all its instances once per instance of it): each row has its study's values, as a
    STUDY level query answers them, in pages and with limit and offset alike."""
    returns = tuple(BY_KEYWORD[k] for k in STUDY_COMPUTED)
    studies = {r.values["StudyInstanceUID"]: r.values for r in loaded.engine.find(
        Query(level=Level.STUDY, return_keys=returns))}
    query = Query(level=level, return_keys=returns, limit=limit, offset=offset)
    rows = [r.values for r in loaded.engine.find(query)]
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 3)
    paged = [r.values for page in loaded.engine.find_pages(query) for r in page]
    every = [r.values for r in loaded.engine.find(Query(level=level, return_keys=returns))]
    assert rows == every[offset:offset + limit if limit else None]
    assert paged == every and len(every) == (10 if level is Level.SERIES else 20)
    for row in every:
        study = studies[row["StudyInstanceUID"]]
        assert {k: row[k] for k in STUDY_COMPUTED} == {k: study[k] for k in STUDY_COMPUTED}
    assert studies["1.2.826.0.1.3680043.10.543.1"]["NumberOfPatientRelatedStudies"] == "2"


def test_levels(loaded: Services) -> None:
    assert len(_find(loaded, Level.PATIENT)) == 5
    assert len(_find(loaded, Level.SERIES)) == 10
    assert len(_find(loaded, Level.IMAGE)) == 20
    series = _find(loaded, Level.SERIES, StudyInstanceUID="1.2.826.0.1.3680043.10.543.6",
                   Modality="MR")
    assert [r["SeriesInstanceUID"] for r in series] == [
        "1.2.826.0.1.3680043.10.543.6.1", "1.2.826.0.1.3680043.10.543.6.2"]


def test_case_sensitive_person_names(make_services: Callable[..., Services]) -> None:
    services = make_services(store=MemoryStore(), pn_case_sensitive=True)
    _load(services)
    assert _accessions(_find(services, PatientName="DOE*")) == ["A1", "A2", "A5"]


def test_fuzzy_matches_any_name_component_prefix(loaded: Services) -> None:
    assert _accessions(_find(loaded, fuzzy=True, PatientName="jan")) == ["A3", "A5"]
    assert _accessions(_find(loaded, fuzzy=True, PatientName="jo")) == ["A1", "A2", "A5"]
    assert _accessions(_find(loaded, fuzzy=True, PatientName="jö")) == ["A5", "A-6"]


def test_paging_is_stable(loaded: Services) -> None:
    everything = _accessions(_find(loaded))
    query = Query(level=Level.STUDY, return_keys=(BY_KEYWORD["AccessionNumber"],))
    pages = []
    for offset in range(0, 6, 2):
        paged = Query(level=query.level, return_keys=query.return_keys, limit=2, offset=offset)
        pages += [r.values["AccessionNumber"] for r in loaded.engine.find(paged)]
    assert pages == everything


def test_row_cap_refuses_before_streaming(make_services: Callable[..., Services]) -> None:
    services = make_services(store=MemoryStore(), query_max_rows=3)
    _load(services)
    with pytest.raises(QueryLimitExceeded):
        next(iter(services.engine.find(Query(level=Level.STUDY))))
    assert len(list(services.engine.find(Query(level=Level.STUDY, limit=3)))) == 3


def test_cancel_stops_the_query_inside_sqlite(loaded: Services,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine._PROGRESS_STEPS", 1)
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 5

    with pytest.raises(Cancelled):
        loaded.engine.find(Query(level=Level.IMAGE), cancelled=cancelled)


def test_cancel_stops_between_pages(loaded: Services,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 3)
    seen: list[object] = []
    with pytest.raises(Cancelled):
        for page in loaded.engine.find_pages(Query(level=Level.IMAGE),
                                             cancelled=lambda: len(seen) >= 2):
            seen.extend(page)
    assert len(seen) == 3


@pytest.mark.parametrize("rows", [1, 3, 20, 256])
def test_pages_are_the_whole_result_in_order(loaded: Services, rows: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", rows)
    query = Query(level=Level.IMAGE, constraints=(constraint(
        BY_KEYWORD["Modality"], "CT\\MR"),))
    pages = list(loaded.engine.find_pages(query))
    assert all(0 < len(page) <= rows for page in pages)
    assert [r.values for page in pages for r in page] == [
        r.values for r in loaded.engine.find(query)]


def test_pages_end_at_the_last_key_when_the_query_began(
        loaded: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 2)
    pages = loaded.engine.find_pages(Query(level=Level.STUDY))
    first = next(pages)
    loaded.ingest.store_bytes(make_instance(AccessionNumber="LATE", PatientID="P9"))
    rest = [r for page in pages for r in page]
    assert len(first) + len(rest) == len(STUDIES)
    assert len(loaded.engine.find(Query(level=Level.STUDY))) == len(STUDIES) + 1


def test_row_cap_refuses_paged_queries_before_the_first_page(
        make_services: Callable[..., Services]) -> None:
    services = make_services(store=MemoryStore(), query_max_rows=3)
    _load(services)
    with pytest.raises(QueryLimitExceeded, match="more than 3"):
        next(services.engine.find_pages(Query(level=Level.STUDY)))


def _wal_checkpoint(services: Services) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` from another connection: busy is 1 when an
    open read transaction keeps the WAL from being reset."""
    other = apsw.Connection(str(services.index.path))
    try:
        other.set_busy_timeout(200)
        return tuple(other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    finally:
        other.close()


def test_no_read_transaction_is_held_while_results_are_consumed(
        loaded: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow consumer (a C-FIND peer reading slowly) must not keep the WAL from being
    checkpointed: results are in memory, pages each read in a short transaction."""
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 2)
    found = iter(loaded.engine.find(Query(level=Level.IMAGE)))
    pages = loaded.engine.find_pages(Query(level=Level.IMAGE))
    next(found), next(pages)  # both half consumed
    loaded.ingest.store_bytes(make_instance(AccessionNumber="NEW", PatientID="P9"))
    busy, wal_frames, done = _wal_checkpoint(loaded)
    assert (busy, wal_frames, done) == (0, 0, 0)  # checkpointed, WAL truncated
    assert len(list(found)) == 19 and sum(len(p) for p in pages) == 18


def test_time_limit_bounds_the_whole_query(loaded: Services,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each statement is quick, together they are not: the limit is for the query."""
    monkeypatch.setattr("pacs.core.query.engine._PROGRESS_STEPS", 1)
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 1)
    loaded.engine.time_limit = 0.3

    def slow() -> bool:  # SQLite's work made slow: every step of its machine costs 1 ms
        sleep(0.001)
        return False

    with pytest.raises(QueryLimitExceeded, match=r"longer than 0\.3 s"):
        loaded.engine.find(Query(level=Level.IMAGE), cancelled=slow)
    with pytest.raises(QueryLimitExceeded, match=r"longer than 0\.3 s"):
        for _ in loaded.engine.find_pages(Query(level=Level.IMAGE), cancelled=slow):
            pass


def test_time_paused_for_the_peer_does_not_count(loaded: Services,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 2)
    loaded.engine.time_limit = 0.5
    deadline = loaded.engine.deadline()
    pages = 0
    for _ in loaded.engine.find_pages(Query(level=Level.IMAGE), deadline=deadline):
        with deadline.paused():
            sleep(0.1)  # a slow reader: 10 pages take a second
        pages += 1
    assert pages == 10
    for _ in loaded.engine.instances(Query(level=Level.IMAGE)):
        sleep(0.05)  # sending each instance takes the caller's time, not the query's


def test_time_limit(loaded: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine._PROGRESS_STEPS", 1)
    loaded.engine.time_limit = -1.0
    with pytest.raises(QueryLimitExceeded, match="longer"):
        list(loaded.engine.find(Query(level=Level.IMAGE)))


def test_instances_for_retrieve(loaded: Services) -> None:
    query = Query(level=Level.SERIES, constraints=(constraint(
        BY_KEYWORD["SeriesInstanceUID"], "1.2.826.0.1.3680043.10.543.1.2"),))
    refs = list(loaded.engine.instances(query))
    assert [r.sop_uid for r in refs] == ["1.2.826.0.1.3680043.10.543.1.2.1",
                                        "1.2.826.0.1.3680043.10.543.1.2.2"]
    assert all(r.object_key.endswith(f"{r.sop_uid}.dcm") for r in refs)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_an_abandoned_stream_ends_quietly_after_its_connection_closed(
        loaded: Services) -> None:
    """A retrieve abandoned mid-way (its association gone) leaves its generator to the
    garbage collector, which may close it after the index closed the connection under
    it (the node stopping; :meth:`pacs.core.index.connection.Index.connection`): that
    ends without an error nobody can catch."""
    refs = loaded.engine.instances(Query(level=Level.STUDY))
    next(refs)
    loaded.index.close()
    refs.close()


def test_person_name_groups(services: Services) -> None:
    services.ingest.store_bytes(make_instance(
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", AccessionNumber="J1"))
    for value in ("Yamada^Tarou", "yamada^tarou", "=山田^太郎", "=山田^太郎=やまだ^たろう",
                  "*山田*", "Yamada*"):
        assert _accessions(_find(services, PatientName=value)) == ["J1"], value
    for value in ("Yamada", "=山田", "Tarou*"):
        assert _accessions(_find(services, PatientName=value)) == [], value


def test_names_of_multi_valued_and_grouped_person_names(services: Services) -> None:
    """PS3.4 C.2.2.3 with PS3.5 6.2.1: each name of a multi-valued PN attribute
    matches by its component groups as a single name does (the alphabetic group, or
    ``=`` and the ideographic one); a wildcard without ``=`` fits any group of a name."""
    services.ingest.store_bytes(make_instance(
        AccessionNumber="N1", ReferringPhysicianName="Yamada^Tarou=山田^太郎",
        NameOfPhysiciansReadingStudy=["Smith^Bob=スミス^ボブ", "Jones^Al"]))
    services.ingest.store_bytes(make_instance(
        AccessionNumber="N2", NameOfPhysiciansReadingStudy=["Bobson^Smith"]))
    services.ingest.store_bytes(make_instance(
        AccessionNumber="N3", PatientName="Abe=Q=X",
        NameOfPhysiciansReadingStudy=["Ito", "Abe=Q=X"]))
    for keys, expected in (
            ({"NameOfPhysiciansReadingStudy": "Smith^Bob"}, ["N1"]),
            ({"NameOfPhysiciansReadingStudy": "smith^bob"}, ["N1"]),
            ({"NameOfPhysiciansReadingStudy": "=スミス^ボブ"}, ["N1"]),
            ({"NameOfPhysiciansReadingStudy": "Jones^Al"}, ["N1"]),
            ({"NameOfPhysiciansReadingStudy": "Smith"}, []),
            ({"NameOfPhysiciansReadingStudy": "*Bob"}, ["N1"]),
            ({"NameOfPhysiciansReadingStudy": "Bob*"}, ["N2"]),
            ({"ReferringPhysicianName": "*Tarou"}, ["N1"]),
            ({"ReferringPhysicianName": "*太郎"}, ["N1"]),
            ({"PatientName": "=Q"}, ["N3"]),
            ({"PatientName": "=X"}, []),                   # X is the phonetic group
            ({"NameOfPhysiciansReadingStudy": "=X"}, []),
            ({"NameOfPhysiciansReadingStudy": "=Q"}, ["N3"])):
        assert sorted(a for a in _accessions(_find(services, **keys)) if a) == expected, keys


def test_a_study_without_patient_id_matches_any_in_the_study_root_model(
        services: Services) -> None:
    """PS3.4 C.2.2.1.2: a Required key the SCP holds empty matches any value; Patient ID
    is Required at the STUDY level of the Study Root model (Table C.6-5), Unique at the
    PATIENT level of the Patient Root (C.6-1), where it must match."""
    services.ingest.store_bytes(make_instance(AccessionNumber="R1", PatientID="P1"))
    services.ingest.store_bytes(make_instance(AccessionNumber="R2", PatientID=""))
    services.ingest.store_bytes(make_instance(AccessionNumber="R3", PatientID="P2"))
    key = constraint(BY_KEYWORD["PatientID"], "P1")
    assert key is not None
    answers = {}
    for required in ((), STUDY_ROOT_REQUIRED):
        query = Query(level=Level.STUDY, constraints=(key,),
                      return_keys=(BY_KEYWORD["AccessionNumber"],), required=required)
        answers[required] = sorted(r.values["AccessionNumber"] or ""
                                   for r in services.engine.find(query))
    assert answers == {(): ["R1"], STUDY_ROOT_REQUIRED: ["R1", "R2"]}


# Attributes of patients are attributes of studies (PS3.4 C.3.2): two studies of one
# Patient ID, each sent with its own name, birth date, sex and other IDs.
OWN = {
    "B1": {"PatientName": "OLD^NAME", "PatientBirthDate": "19700101", "PatientSex": "F",
           "OtherPatientIDs": "X1", "PatientComments": "first"},
    "B2": {"PatientName": "NEW^NAME", "PatientBirthDate": "19710202", "PatientSex": "M",
           "OtherPatientIDs": "X2\\X3", "PatientComments": "second"},
}
_PATIENT_KEYS = tuple(BY_KEYWORD[k] for k in (
    "PatientName", "PatientBirthDate", "PatientSex", "OtherPatientIDs", "PatientComments"))


def _load_own(services: Services) -> None:
    for n, (accession, attributes) in enumerate(OWN.items()):
        study = f"1.2.826.0.1.3680043.10.543.9{n}"
        for i in range(2):
            services.ingest.store_bytes(make_instance(
                PatientID="P9", AccessionNumber=accession, StudyInstanceUID=study,
                SeriesInstanceUID=f"{study}.1", SOPInstanceUID=f"{study}.1.{i + 1}",
                **attributes))


def _own(services: Services, level: Level, **keys: str) -> list[dict[str, str | None]]:
    constraints = tuple(c for c in (constraint(BY_KEYWORD[k], v) for k, v in keys.items()) if c)
    query = Query(level=level, constraints=constraints,
                  return_keys=(*_PATIENT_KEYS, BY_KEYWORD["AccessionNumber"]))
    return [r.values for r in services.engine.find(query)]


@pytest.mark.parametrize("level", [Level.STUDY, Level.SERIES, Level.IMAGE])
def test_each_study_answers_with_its_own_patient_attributes(services: Services,
                                                            level: Level) -> None:
    _load_own(services)
    rows = _own(services, level)
    assert len(rows) == {Level.STUDY: 2, Level.SERIES: 2, Level.IMAGE: 4}[level]
    for row in rows:
        assert row["PatientID"] == "P9"
        assert {k: row[k] for k in OWN["B1"]} == OWN[row["AccessionNumber"]]


@pytest.mark.parametrize("level", [Level.STUDY, Level.SERIES, Level.IMAGE])
@pytest.mark.parametrize("keys, accession", [
    ({"PatientName": "OLD^NAME"}, "B1"),
    ({"PatientName": "new*"}, "B2"),
    ({"PatientBirthDate": "1970"}, "B1"),
    ({"PatientSex": "M"}, "B2"),
    ({"OtherPatientIDs": "X3"}, "B2"),
    ({"PatientID": "P9", "PatientComments": "first"}, "B1"),
])
def test_patient_keys_match_each_study_on_its_own_values(
        services: Services, level: Level, keys: dict[str, str], accession: str) -> None:
    _load_own(services)
    rows = _own(services, level, **keys)
    assert rows and {r["AccessionNumber"] for r in rows} == {accession}


def test_retrieve_by_patient_name_selects_that_study(services: Services) -> None:
    _load_own(services)
    query = Query(level=Level.STUDY, constraints=(
        constraint(BY_KEYWORD["PatientName"], "OLD^NAME"),))
    assert {r.study_uid for r in services.engine.instances(query)} == {
        "1.2.826.0.1.3680043.10.543.90"}


def test_patient_level_answers_the_latest_values(services: Services) -> None:
    _load_own(services)
    rows = _own(services, Level.PATIENT)
    assert len(rows) == 1
    assert {k: rows[0][k] for k in OWN["B2"]} == OWN["B2"]
    assert len(_own(services, Level.PATIENT, PatientName="NEW^NAME")) == 1
    assert _own(services, Level.PATIENT, PatientName="OLD^NAME") == []


def test_a_removed_study_leaves_the_patient_row_to_the_remaining_one(
        services: Services) -> None:
    _load_own(services)
    with services.index.write() as conn:
        for i in (1, 2):
            writer.delete_instance(conn, f"1.2.826.0.1.3680043.10.543.91.1.{i}")
    rows = _own(services, Level.PATIENT)
    assert [{k: r[k] for k in OWN["B1"]} for r in rows] == [OWN["B1"]]


def test_a_study_moved_to_another_patient_leaves_its_values_behind(
        services: Services) -> None:
    _load_own(services)
    study = "1.2.826.0.1.3680043.10.543.91"
    for i in (1, 2):  # the newest study re-sent under another Patient ID
        services.ingest.store_bytes(make_instance(
            PatientID="P10", AccessionNumber="B2", StudyInstanceUID=study,
            SeriesInstanceUID=f"{study}.1", SOPInstanceUID=f"{study}.1.{i}", **OWN["B2"]))
    patients = {r["PatientID"]: r for r in _own(services, Level.PATIENT)}
    assert patients["P9"]["PatientName"] == "OLD^NAME"
    assert patients["P10"]["PatientName"] == "NEW^NAME"
    assert [r["PatientID"] for r in _own(services, Level.STUDY)] == ["P9", "P10"]


@pytest.mark.parametrize("level", [Level.STUDY, Level.SERIES, Level.IMAGE])
def test_no_patient_join_below_patient_level(level: Level) -> None:
    returns = tuple(a for a in BY_KEYWORD.values()
                    if a.level.depth <= level.depth and a.keyword != "PatientName")
    query = Query(level=level, return_keys=returns, constraints=(
        constraint(BY_KEYWORD["PatientName"], "DOE*"),))  # type: ignore[arg-type]
    for compiled in (compile_find(query), compile_count(query), compile_instances(query)):
        assert "JOIN patient" not in compiled.sql


def test_patient_counts_below_patient_level(services: Services) -> None:
    _load_own(services)
    keys = tuple(BY_KEYWORD[k] for k in ("NumberOfPatientRelatedStudies",
                                         "NumberOfPatientRelatedSeries",
                                         "NumberOfPatientRelatedInstances"))
    for level in (Level.PATIENT, Level.STUDY):
        rows = [r.values for r in services.engine.find(Query(level=level, return_keys=keys))]
        assert {tuple(r[k.keyword] for k in keys) for r in rows} == {("2", "2", "4")}


# --- queries larger than SQLite runs ----------------------------------------------------

def _values(count: int, prefix: str = "V") -> str:
    return "\\".join(f"{prefix}{n}" for n in range(count))


def _uids(count: int) -> str:
    return "\\".join(f"1.2.826.0.1.3680043.10.543.{n + 1}" for n in range(count))


def _sequence(keyword: str, item_keyword: str, raw: str) -> Constraint:
    item = constraint(BY_KEYWORD[item_keyword], raw)
    assert item is not None
    return Constraint(BY_KEYWORD[keyword], (Term(Match.SEQUENCE, items=(item,)),))


def _every_way(services: Services, query: Query) -> list[object]:
    """The query run by every statement the engine builds: find, count, pages and the
    instances of a retrieve."""
    return [services.engine.find(query), services.engine.count(query),
            list(services.engine.find_pages(query)), list(services.engine.instances(query))]


def _constraints(*pairs: tuple[str, str]) -> tuple[Constraint, ...]:
    found = tuple(c for k, v in pairs if (c := constraint(BY_KEYWORD[k], v)) is not None)
    assert len(found) == len(pairs)  # none universal
    return found


@pytest.mark.parametrize("level, constraints, fuzzy", [
    # One chain of values as deep as allowed, on the level itself and two levels down
    # (each value its own EXISTS), with multi-valued GLOBs: 4 parameters each.
    (Level.STUDY, _constraints(("AccessionNumber", _values(MAX_TERMS - 1, "A") + "\\A1")),
     False),
    (Level.STUDY, _constraints(("ImageType", _values(MAX_TERMS))), False),
    (Level.IMAGE, _constraints(("OperatorsName", _values(MAX_TERMS))), True),
    # The most parameters: every UID allowed, and the other values as multi-valued GLOBs.
    (Level.IMAGE, _constraints(("StudyInstanceUID", _uids(MAX_UIDS)),
                               ("ImageType", _values(MAX_TERMS - 1))), False),
    # Values inside a sequence item count with the others, and count three times in
    # SQLite's depth when the item is a level below the query's.
    *((level, (_sequence("RequestAttributesSequence", "AccessionNumber",
                         _values(MAX_TERMS - 3, "A")),
               *_constraints(("PatientID", "P1\\P2"))), False)
      for level in (Level.PATIENT, Level.STUDY, Level.SERIES)),
    # The longest value, four UTF-8 bytes a character, as the longest GLOB patterns.
    (Level.STUDY, _constraints(("OperatorsName", "\U0001d11e" * MAX_VALUE_CHARS)), True),
    (Level.STUDY, _constraints(("PatientName", "[" * MAX_VALUE_CHARS)), False),
])
def test_queries_at_the_size_bounds_run(loaded: Services, level: Level,
                                        constraints: tuple[Constraint, ...],
                                        fuzzy: bool) -> None:
    query = Query(level=level, constraints=constraints, fuzzy=fuzzy, limit=10, offset=1)
    found, count, pages, instances = _every_way(loaded, query)
    assert isinstance(count, int) and isinstance(found, list) and isinstance(pages, list)
    assert len(found) == min(10, max(0, count - 1))  # the page asked for
    assert sum(len(page) for page in pages) == count
    assert isinstance(instances, list)


@pytest.mark.parametrize("constraints, reason", [
    (_constraints(("AccessionNumber", _values(MAX_TERMS + 1))), "301 values"),
    (_constraints(("AccessionNumber", _values(MAX_TERMS - 1)), ("PatientID", "P1\\P2")),
     "301 values"),
    ((_sequence("RequestAttributesSequence", "AccessionNumber", _values(MAX_TERMS)),),
     "301 values"),  # the sequence's own term and its item's values
    (_constraints(("StudyInstanceUID", _uids(MAX_UIDS + 1))), "30001 UIDs"),
    (_constraints(("StudyInstanceUID", _uids(MAX_UIDS // 2 + 1)),
                  ("SeriesInstanceUID", _uids(MAX_UIDS // 2))), "30001 UIDs"),
    (_constraints(("PatientName", "x" * (MAX_VALUE_CHARS + 1))), "PatientName: a value"),
    (_constraints(("StudyInstanceUID", "1." + "2" * MAX_VALUE_CHARS + "\\1.2")),
     "StudyInstanceUID: a value"),
])
def test_queries_past_the_size_bounds_are_refused(loaded: Services,
                                                  constraints: tuple[Constraint, ...],
                                                  reason: str) -> None:
    query = Query(level=Level.IMAGE, constraints=constraints)
    for run in (loaded.engine.find, loaded.engine.count,
                lambda q: next(loaded.engine.find_pages(q)),
                lambda q: next(loaded.engine.instances(q))):
        with pytest.raises(QueryTooLarge, match=reason):
            run(query)


def test_the_size_bounds_are_below_sqlites_limits(services: Services) -> None:
    """The bounds hold against the SQLite the index runs on, not only the default build:
    at most 4 parameters per value, every UID one, and the paging operands."""
    conn = services.index.connection()
    variables = conn.limit(apsw.SQLITE_LIMIT_VARIABLE_NUMBER, -1)
    assert variables > 4 * MAX_TERMS + MAX_UIDS + 3
    assert conn.limit(apsw.SQLITE_LIMIT_EXPR_DEPTH, -1) > 3 * MAX_TERMS  # sequence items
    pattern = len(glob_literal("\U0001d11e" * MAX_VALUE_CHARS).encode()) + len("*[=^ ]*")
    assert pattern < conn.limit(apsw.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, -1)


def test_a_statement_sqlite_refuses_is_not_an_unavailable_index(
        loaded: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLITE_ERROR is the statement, not the index: retrying cannot help, so it is not
    reported as :class:`IndexFailure` (503 with Retry-After, A700); a failure to read
    still is."""
    broken = Compiled("SELECT no_such_column FROM study", (), ("x",))
    monkeypatch.setattr("pacs.core.query.engine.compile_find", lambda *args: broken)
    with pytest.raises(apsw.SQLError):
        loaded.engine.find(Query(level=Level.STUDY, limit=1))
    with pytest.raises(apsw.SQLError):
        next(loaded.engine.find_pages(Query(level=Level.STUDY)))

    def busy(*args: object) -> object:
        raise apsw.BusyError("database is locked")

    monkeypatch.setattr("pacs.core.query.engine.compile_find", busy)
    with pytest.raises(IndexFailure, match="database is locked"):
        loaded.engine.find(Query(level=Level.STUDY, limit=1))


def test_a_pattern_is_not_tested_against_stored_text_longer_than_any_conforming_value(
        services: Services) -> None:
    """A GLOB is one step of SQLite's machine: the time limit cannot stop it, and it
    costs the stored text times the pattern (9 s for one row of 1 MiB against a pattern
    of 8,000 characters).  Text longer than MAX_VALUE_CHARS is never given to it (its
    length is tested first), so it matches no pattern; the other rows match as before."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ImplicitVRLittleEndian

    from tests.factory import part10

    huge = dcmread(DicomBytesIO(make_instance(StudyInstanceUID="1.2.3.100")))
    huge.StudyDescription = "a" * (1 << 20)  # implicit VR: a 32-bit length
    services.ingest.store_bytes(part10(huge, ImplicitVRLittleEndian))
    services.ingest.store_bytes(make_instance(StudyInstanceUID="1.2.3.101",
                                              StudyDescription="abc"))
    tested: list[int] = []

    def glob(pattern: str, text: str | None) -> bool:
        tested.append(len(text or ""))
        return text is not None and fnmatch.fnmatchcase(text, pattern)

    services.index.connection().create_scalar_function("glob", glob, 2)
    key = BY_KEYWORD["StudyDescription"]
    found = constraint(key, "*" + "a" * 300 + "*")
    assert found is not None
    query = Query(level=Level.STUDY, constraints=(found,),
                  return_keys=(BY_KEYWORD["StudyInstanceUID"],))
    assert services.engine.find(query) == []
    found = constraint(key, "ab*")
    assert found is not None
    assert [r.values["StudyInstanceUID"] for r in services.engine.find(
        Query(level=Level.STUDY, constraints=(found,),
              return_keys=(BY_KEYWORD["StudyInstanceUID"],)))] == ["1.2.3.101"]
    assert tested and max(tested) <= MAX_VALUE_CHARS


@pytest.mark.parametrize("keys, expected", [
    ({"StudyTime": "0930"}, ["T2", "T3"]),
    ({"StudyTime": "0930-0930"}, ["T2", "T3"]),
    ({"StudyTime": "093000-100000"}, ["T2", "T3", "T4"]),
    ({"StudyTime": "09"}, ["T1", "T2", "T3", "T4"]),
    ({"StudyTime": "-0929"}, ["T1"]),
])
def test_a_stored_time_of_fewer_digits_matches_as_its_first_moment(
        services: Services, keys: dict[str, str], expected: list[str]) -> None:
    """PS3.5 6.2: a TM may be HH or HHMM.  Stored so, it stands for its first moment
    and matches as the query's partial times do (PS3.4 C.2.2.2.5): 0930 is 09:30:00."""
    for n, (accession, time) in enumerate((("T1", "09"), ("T2", "0930"),
                                           ("T3", "093000.5"), ("T4", "0959"))):
        services.ingest.store_bytes(make_instance(
            StudyInstanceUID=f"1.2.826.0.1.3680043.10.544.{n + 1}", StudyTime=time,
            AccessionNumber=accession, StudyDate="20200101"))
    assert sorted(a for a in _accessions(_find(services, **keys)) if a) == expected


def test_wildcards_match_one_value_and_name_groups_apart(services: Services) -> None:
    """PS3.4 C.2.2.3: a multi-valued attribute matches when one of its values does, so
    no wildcard runs over the ``\\`` between values (``P*L`` is no value of
    ORIGINAL\\PRIMARY\\AXIAL); PS3.5 6.2.1: a name's pattern naming component groups
    (``=山田*``) matches those groups."""
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID="1.2.826.0.1.3680043.10.545.1", AccessionNumber="M1",
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", OtherPatientIDs=["A1", "B2"],
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))
    for keys, expected in (
            ({"OtherPatientIDs": "A*2"}, []), ({"OtherPatientIDs": "B?"}, ["M1"]),
            ({"OtherPatientIDs": "A1"}, ["M1"]),
            ({"PatientName": "=山田*"}, ["M1"]), ({"PatientName": "=*^太郎=やま*"}, ["M1"]),
            ({"PatientName": "=やまだ*"}, []), ({"PatientName": "==やまだ*"}, ["M1"]),
            ({"PatientName": "Yamada^T*"}, ["M1"])):
        assert _accessions(_find(services, **keys)) == expected, keys
    for image_type, expected in (("P*L", []), ("ORIGINAL?PRIMARY", []), ("PRIM*", ["M1"]),
                                 ("*XIAL", ["M1"])):
        found = _find(services, level=Level.IMAGE,
                      StudyInstanceUID="1.2.826.0.1.3680043.10.545.1", ImageType=image_type)
        assert len(found) == len(expected), image_type


def test_patterns_of_many_stars_match_as_one_star_does(services: Services) -> None:
    """The patterns SQLite's GLOB cannot say are matched in Python, inside one SQLite
    call (one step of its machine: no time limit or cancel between).  As regular
    expressions, ``'*' * 21 + 'Z=*'`` took 46 s a name and ``'*' * 30 + 'Y'`` 2 s an
    image type; with 2,000 stars they answer as with one."""
    services.ingest.store_bytes(make_instance(
        StudyInstanceUID="1.2.826.0.1.3680043.10.546.1", AccessionNumber="S1",
        PatientName="SMITH^ANNA^^DR", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))
    stars = "*" * 2000
    for name, expected in ((stars + "Z=*", []), (stars + "R=*", ["S1"]),
                           (stars + "A" + stars + "DR=", ["S1"]), (stars + "=" + stars, ["S1"])):
        assert _accessions(_find(services, PatientName=name)) == expected, name[-4:]
    for image_type, count in ((stars + "Y", 1), (stars + "X", 0), (stars + "P?" + stars, 1)):
        found = _find(services, level=Level.IMAGE, ImageType=image_type)
        assert len(found) == count, image_type[-4:]


@pytest.mark.parametrize("level, lower", [
    (Level.STUDY, ("Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances",
                   "SOPInstanceUID")),
    (Level.SERIES, ("SOPInstanceUID", "InstanceNumber")),
])
def test_keys_of_lower_levels_come_back_empty_only_when_asked(
        loaded: Services, level: Level, lower: tuple[str, ...]) -> None:
    """A relational C-FIND answers every requested key, zero-length when the entity has
    no single value (PS3.4 C.4.1.1.3.2): ``empty_below``.  QIDO-RS returns no lower
    level's attribute (PS3.18 10.6.3.3): without it they are left out.  Matched either
    way; a study's computed attributes below STUDY level (computed per study) too."""
    modality = constraint(BY_KEYWORD["Modality"], "PT")
    assert modality is not None
    returns = tuple(BY_KEYWORD[k] for k in ("AccessionNumber", "ModalitiesInStudy", *lower))
    query = Query(level=level, constraints=(modality,), return_keys=returns)
    left_out = [r.values for r in loaded.engine.find(query)]
    empty = [r.values for r in loaded.engine.find(
        dataclasses.replace(query, empty_below=True))]
    assert [r["AccessionNumber"] for r in empty] == ["A3"]
    assert [r["ModalitiesInStudy"] for r in empty] == ["CT\\PT"]
    assert all(k not in r for r in left_out for k in lower)
    assert all(r[k] is None for r in empty for k in lower)
    assert left_out == [{k: v for k, v in r.items() if k not in lower} for r in empty]
