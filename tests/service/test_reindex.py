"""``pacs reindex`` (:mod:`pacs.core.reindex`) on the folder store: an index rebuilt from
the objects alone equals the one ingest built, row by row in every table, and answers
the same C-FIND and QIDO-RS queries.

The data set (:func:`ingest_varied`) has several patients, studies and series (the
sample archive of ``sample_studies``, with a UTF-8 person name), a multi-frame object,
JPEG, JPEG-LS, JPEG 2000 and RLE objects, a deflated and a big-endian one, an instance
sent again with another value (overwritten), and one Patient ID whose two studies carry
different patient attributes: the patient row holds those received last, which the
rebuild can only know from the order of the writes (the later study has the smaller
key, so an order by key would get it wrong).  IOCM rejection notes
(:func:`ingest_rejections`) hide instances whose objects stay in the store (a failed
deletion, met before the note; an object the store wrote after the note), name an
instance never received and another patient's instance, and a Data Retention Policy
Expired note is followed by an instance sent again.  Then the store is damaged: bytes
that are no DICOM at an object key, and a copy of an instance at another instance's
key; both are reported, left in place, and not indexed (nor were they before).

The S3 variant against SeaweedFS is ``tests/storage/test_reindex_s3.py``; ``pacs
reindex`` as a command on a stopped node's data, then serving ``findscu``, is
``tests/interop/test_reindex_cli.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import apsw
import pytest
from falcon import testing
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom import AE

from adapters.dicomweb.app import create_app
from pacs.core import audit, config
from pacs.core.analysers import AnalyserPool
from pacs.core.attributes import IDENTITY
from pacs.core.audit import Participant
from pacs.core.deletion import Target, reference
from pacs.core.errors import ConfigError, IndexFailure, StorageError
from pacs.core.index import commitments, outbox, reads
from pacs.core.index.connection import connect
from pacs.core.intake import record_unsettled
from pacs.core.reconcile import Problem, reconcile
from pacs.core.reindex import (
    UNKNOWN_RECEIVED,
    Report,
    index_in_use,
    rebuild,
    stored_times,
)
from pacs.core.services import Services, build, drain, mover
from pacs.core.storage import object_key
from pacs.core.storage.base import exists
from pacs.core.storage.filesystem import FileStore
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import server
from tests.conftest import free_port, sample
from tests.factory import make_instance, make_rejection_note, relabelled
from tests.service.sample_studies import Archive, build_archive
from tests.service.test_one_engine import STUDY_ROOT_FIND, UID_OF_LEVEL, Case, cases

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
#: Columns a rebuild cannot derive from the objects (see pacs.core.reindex): when and
#: from whom the object came, and the order in which rows were written (forwarding's
#: change numbers).  Row keys (pk, *_pk) are compared through the UIDs.
NOT_DERIVABLE = {"instance": {"received_at", "calling_ae", "change_seq"},
                 "tombstone": {"removed_by", "removed_at"}}
#: pydicom's files in other encodings: (file, what it adds to the data set).
ENCODED = {
    "SC_rgb_rle_2frame.dcm": "RLE, multi-frame",
    "examples_ybr_color.dcm": "JPEG baseline, 30 frames",
    "JPEG2000.dcm": "JPEG 2000",
    "JPEG-lossy.dcm": "JPEG extended",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS",
    "image_dfl.dcm": "deflated data set",
    "MR_small_bigendian.dcm": "explicit VR big endian",
}
#: The Patient ID whose studies carry different patient attributes.
SHARED_ID = "PX-SHARED"
#: The later of its studies has the smaller UID (and key).
EARLIER_STUDY = "1.2.826.0.1.3680043.8.498.77.2"
LATER_STUDY = "1.2.826.0.1.3680043.8.498.77.1"
#: The study whose instances rejection notes reject, and its patient.
REJECTED_STUDY = "1.2.826.0.1.3680043.8.498.78"
REJECTED_ID = "PX-REJECTED"
#: Seconds between writes whose order the store's times must tell (file times advance
#: by the kernel's clock tick).
APART = 0.05
#: Another patient's instance, which a note names (and may not remove).
OTHER_PLACE = ("1.2.826.0.1.3680043.8.498.79", "1.2.826.0.1.3680043.8.498.79.1",
               "1.2.826.0.1.3680043.8.498.79.1.1")


# --- the data set ----------------------------------------------------------------------

def reencoded(name: str, number: int) -> bytes:
    """A pydicom test file with new UIDs and a Patient ID of its own, in its own
    transfer syntax (encapsulated pixel data kept as it is)."""
    ds = dcmread(sample(name))
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"ENC-{number}"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Varied:
    """What :func:`ingest_varied` stored."""

    archive: Archive
    objects: dict[str, bytes]  # every instance in the store, by SOP UID (last version)
    damaged: list[str]  # keys written around ingest: not instances of their key
    rejected: list[str]  # objects in the store of instances rejection notes removed
    tombstones: dict[str, str]  # rejection code of each UID the notes name, removed
    visible: list[str]  # UIDs the notes name that stay (another patient, sent again)


def shared_patient_study(study: str, name: str, birth: str, sex: str) -> list[bytes]:
    """Two instances of one study of :data:`SHARED_ID`."""
    series = f"{study}.1"
    return [make_instance(PatientID=SHARED_ID, PatientName=name, PatientBirthDate=birth,
                          PatientSex=sex, StudyInstanceUID=study, SeriesInstanceUID=series,
                          SOPInstanceUID=f"{series}.{n}", InstanceNumber=n)
            for n in (1, 2)]


def rejected_instance(series: int, number: int, **attributes: object) -> bytes:
    """Instance ``number`` of series ``series`` of :data:`REJECTED_STUDY`."""
    series_uid = f"{REJECTED_STUDY}.{series}"
    return make_instance(PatientID=REJECTED_ID, StudyInstanceUID=REJECTED_STUDY,
                         SeriesInstanceUID=series_uid, SOPInstanceUID=f"{series_uid}.{number}",
                         SeriesNumber=series, InstanceNumber=number, **attributes)


def uids(data: bytes) -> tuple[str, str, str, str]:
    """An object's (study, series, SOP instance, SOP class) UIDs: a note's reference."""
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def key_of(data: bytes) -> str:
    return object_key(*uids(data)[:3])


@contextmanager
def deletions_failing(services: Services, keys: set[str]) -> Iterator[None]:
    """The backend's deletion of ``keys`` fails meanwhile (the object stays, as a crash
    after the removal's transaction leaves it)."""
    backend = services.store.backend
    delete = backend.delete

    def failing(key: str) -> None:
        if key in keys:
            raise StorageError("simulated: the object deletion failed")
        delete(key)

    backend.delete = failing  # type: ignore[method-assign]
    try:
        yield
    finally:
        del backend.delete


def ingest_rejections(services: Services, objects: dict[str, bytes], pause: float
                      ) -> tuple[list[str], dict[str, str], list[str]]:
    """Rejection notes through the ingest path (their hook removes what they name), and
    objects they removed left in, or put back into, the store.

    Series 1, a quality rejection (113001): instance 1's deletion fails (its object,
    written before the note, is met before it), instance 2's object is written again
    after the note (met after it), instance 3 is deleted, instance 4 is not named; the
    note names a UID never received and :data:`OTHER_PLACE`, another patient's.
    Series 2, a Data Retention Policy Expired note (113039): instance 1 is deleted,
    instance 2 is sent again after it (stored again), instance 3's deletion fails.

    Returns the keys of the objects left of removed instances, the reason code of each
    tombstone, and the named UIDs that stay listed; ``objects`` gets what is stored.
    """
    first = [rejected_instance(1, n) for n in (1, 2, 3, 4)]
    second = [rejected_instance(2, n) for n in (1, 2, 3)]
    other = make_instance(PatientID="PX-OTHER", StudyInstanceUID=OTHER_PLACE[0],
                          SeriesInstanceUID=OTHER_PLACE[1], SOPInstanceUID=OTHER_PLACE[2])
    for data in [*first, *second, other]:
        services.ingest.store_bytes(data, calling_ae="TEST")
        objects[uids(data)[2]] = data
    never = (REJECTED_STUDY, f"{REJECTED_STUDY}.1", f"{REJECTED_STUDY}.1.9",
             uids(first[0])[3])
    quality = make_rejection_note([uids(d) for d in first[:3]] + [never, uids(other)],
                                  PatientID=REJECTED_ID,
                                  SOPInstanceUID=f"{REJECTED_STUDY}.8.1",
                                  SeriesInstanceUID=f"{REJECTED_STUDY}.8")
    retention = make_rejection_note([uids(d) for d in second], code="113039",
                                    meaning="Data Retention Policy Expired",
                                    PatientID=REJECTED_ID,
                                    SOPInstanceUID=f"{REJECTED_STUDY}.9.1",
                                    SeriesInstanceUID=f"{REJECTED_STUDY}.9")
    drain(services)
    time.sleep(max(pause, APART))
    with deletions_failing(services, {key_of(first[0]), key_of(second[2])}):
        for note in (quality, retention):
            services.ingest.store_bytes(note, calling_ae="TEST")
            objects[uids(note)[2]] = note
    # The mover would delete those two once the store answers; left out here, as a
    # write S3 carried out late leaves such objects, with nothing recorded: the
    # rebuild must keep them hidden by itself.
    with services.index.write() as conn:
        conn.execute("DELETE FROM object_deletion")
    for gone in (first[1], first[2], second[0], second[1]):
        del objects[uids(gone)[2]]
    drain(services)
    time.sleep(max(pause, APART))
    # Written after the notes: the removed instance's object put back (as a crash
    # between the removal's transaction and its deletion leaves it, met after the
    # note), and the instance the retention note let come back, sent again.
    services.store.backend.put(key_of(first[1]), io.BytesIO(first[1]), len(first[1]))
    objects[uids(first[1])[2]] = first[1]
    services.ingest.store_bytes(second[1], calling_ae="TEST")
    objects[uids(second[1])[2]] = second[1]
    drain(services)
    left = [key_of(first[0]), key_of(first[1]), key_of(second[2])]
    # The orders this data set is about, as the store dated the writes.
    times = stored_times(services.store.backend, [*left, key_of(second[1]),
                                                  key_of(quality), key_of(retention)])
    assert times[left[0]] < times[key_of(quality)] < times[left[1]]
    assert times[left[2]] < times[key_of(retention)] < times[key_of(second[1])]
    tombstones = {uids(data)[2]: "113001" for data in first[:3]}
    tombstones[never[2]] = "113001"
    tombstones.update({uids(data)[2]: "113039" for data in (second[0], second[2])})
    return left, tombstones, [uids(other)[2], uids(second[1])[2], uids(first[3])[2]]


def ingest_varied(services: Services, pause: float = 0.0) -> Varied:
    """Store the data set of the module docstring through the ingest path, then damage
    the store.

    ``pause`` comes before each write whose order against the previous ones decides a
    row (the overwrite, the second study of :data:`SHARED_ID`): a store whose times are
    whole seconds (S3) cannot order writes within one second otherwise.  The intake is
    drained before each pause, so that the store's times keep the order of arrival.
    """
    archive = build_archive()
    objects = dict(archive.objects)
    for number, name in enumerate(ENCODED, start=1):
        data = reencoded(name, number)
        objects[dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = data
    for data in objects.values():
        services.ingest.store_bytes(data, calling_ae="TEST")
    # An instance sent again with another description: overwritten (the default policy).
    chest = archive["chest"].series[0].instances[0]
    changed = dcmread(io.BytesIO(objects[chest]))
    changed.StudyDescription = "chest study, corrected"
    out = DicomBytesIO()
    changed.save_as(out, enforce_file_format=True)
    objects[chest] = out.getvalue()
    drain(services)
    time.sleep(pause)
    services.ingest.store_bytes(objects[chest], calling_ae="TEST")
    # One Patient ID, two studies, different patient attributes, received in turn.
    for study, name, birth, sex in (
            (EARLIER_STUDY, "EARLY^NAME", "19500101", "F"),
            (LATER_STUDY, "LATE^NAME", "19600606", "M")):
        drain(services)
        time.sleep(pause)
        for data in shared_patient_study(study, name, birth, sex):
            services.ingest.store_bytes(data, calling_ae="TEST")
            objects[dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = data
    drain(services)
    rejected, tombstones, visible = ingest_rejections(services, objects, pause)
    # Damage: no DICOM at an object key, and an instance's copy at another's key.
    store = services.store
    garbage = object_key("1.2.826.0.1.3680043.8.498.66", "1.2.826.0.1.3680043.8.498.66.1",
                         "1.2.826.0.1.3680043.8.498.66.1.1")
    store.put(garbage, io.BytesIO(b"not DICOM at all" * 20), 320)
    elsewhere = object_key("1.2.826.0.1.3680043.8.498.67", "1.2.826.0.1.3680043.8.498.67.1",
                           "1.2.826.0.1.3680043.8.498.67.1.1")
    copied = objects[chest]
    store.put(elsewhere, io.BytesIO(copied), len(copied))
    return Varied(archive, objects, [garbage, elsewhere], rejected, tombstones, visible)


# --- reading an index row by row ---------------------------------------------------------

Dump = dict[str, dict[str, dict[str, Any]]]


def dump(path: Path) -> Dump:
    """Every table of the index at ``path``: rows by their identity (UIDs, the patient
    key, or for a table without one the row it belongs to), row keys replaced by the
    identity of the row they name."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        identities = {level.table: column for level, column in IDENTITY.items()}
        names: dict[str, dict[int, str]] = {
            table: dict(conn.execute(f"SELECT pk, {column} FROM {table}"))
            for table, column in identities.items()}
        found: Dump = {}
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            rows: dict[str, dict[str, Any]] = {}
            for values in conn.execute(f"SELECT * FROM {table}"):
                row = dict(zip(columns, values, strict=True))
                row.pop("pk", None)
                for column in [c for c in row if c.endswith("_pk")]:
                    row[column] = names[column.removesuffix("_pk")][row[column]]
                identity = (row[identities[table]] if table in identities
                            else next((row[c] for c in columns if c.endswith("_pk")),
                                      str(values[0])))  # the intake's: its id
                assert identity not in rows, (table, identity)
                rows[identity] = row
            found[table] = rows
        found["user_version"] = {"": {"": conn.pragma("user_version")}}
        return found
    finally:
        conn.close()


def without(found: Dump, excluded: dict[str, set[str]]) -> Dump:
    return {table: {identity: {c: v for c, v in row.items()
                               if c not in excluded.get(table, set())}
                    for identity, row in rows.items()}
            for table, rows in found.items()}


def assert_same_rows(original: Dump, rebuilt: Dump) -> None:
    """Every table, row by row, except :data:`NOT_DERIVABLE`; then what those hold."""
    before, after = without(original, NOT_DERIVABLE), without(rebuilt, NOT_DERIVABLE)
    assert set(before) == set(after)
    for table in before:
        assert set(before[table]) == set(after[table]), table
        for identity, row in before[table].items():
            assert after[table][identity] == row, (table, identity)
    for sop, row in rebuilt["instance"].items():
        received = original["instance"][sop]["received_at"]
        assert row["calling_ae"] == "" and original["instance"][sop]["calling_ae"] == "TEST"
        # The object's write time: moments after its row was committed (the intake's
        # mover wrote it), or before (the direct path of large objects).
        assert abs(parse(received) - parse(row["received_at"])) < 10, sop
    for sop, row in rebuilt["tombstone"].items():
        # Carried from the previous index: who removed it and when, as recorded.
        assert row == original["tombstone"][sop], sop


def assert_rejections_applied(report: Report, varied: Varied, original: Dump,
                              rebuilt: Dump) -> None:
    """What the notes removed is hidden and tombstoned in both indexes alike (the rows
    are compared by :func:`assert_same_rows`), though its objects are in the store."""
    # Left out by the previous index's tombstones (a note applied again finds them
    # gone already).
    assert (report.removed, report.rejected) == (len(varied.rejected), 0)
    assert any("previous index records removed" in line for line in report.lines())
    for found in (original, rebuilt):
        assert {sop: row["reason_code"] for sop, row in found["tombstone"].items()} == \
            varied.tombstones
        assert not set(varied.tombstones) & set(found["instance"])
        assert set(varied.visible) <= set(found["instance"])


def parse(received_at: str) -> float:
    return datetime.strptime(received_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


# --- the same queries on both --------------------------------------------------------------

#: Return keys of each level's C-FIND, patient attributes and computed ones included.
RETURN_KEYS = {
    "PATIENT": ["PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"],
    "STUDY": ["PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyDescription", "StudyID",
              "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"],
    "SERIES": ["Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"],
}


def query_cases(varied: Varied) -> list[Case]:
    """The engine test's cases, and some on the rest of the data set."""
    return [*cases(varied.archive),
            Case("shared patient id", "STUDY", {"PatientID": SHARED_ID}, "/studies",
                 f"PatientID={SHARED_ID}"),
            Case("late name", "STUDY", {"PatientName": "LATE*"}, "/studies",
                 "PatientName=LATE*"),
            Case("encoded patients", "STUDY", {"PatientID": "ENC-*"}, "/studies",
                 "PatientID=ENC-*"),
            Case("every series", "SERIES", {}, "/series", ""),
            Case("rejected study", "IMAGE", {"StudyInstanceUID": REJECTED_STUDY},
                 f"/studies/{REJECTED_STUDY}/instances", ""),
            Case("every instance", "IMAGE", {}, "/instances", "")]


def c_find(port: int, ae_title: str, level: str, keys: dict[str, str],
           model: str = STUDY_ROOT_FIND, relational: bool = False) -> list[dict[str, Any]]:
    """Every answer of a C-FIND, as DICOM JSON, in a stable order."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    ae = AE(ae_title="REINDEX_TEST")
    ae.add_requested_context(model)
    negotiation = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = model
        item.service_class_application_information = b"\x01"
        negotiation.append(item)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, ext_neg=negotiation or None)
    assert assoc.is_established
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = level
    if level in UID_OF_LEVEL:
        setattr(identifier, UID_OF_LEVEL[level], "")
    for keyword in RETURN_KEYS[level]:
        setattr(identifier, keyword, "")
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers = []
    try:
        for status, answer in assoc.send_c_find(identifier, model):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if answer is not None and status.Status in (0xFF00, 0xFF01):
                answers.append(answer.to_json_dict())
    finally:
        assoc.release()
    return sorted(answers, key=repr)


def qido(client: testing.TestClient, case: Case) -> list[dict[str, Any]]:
    query = "&".join(q for q in (case.query, "includefield=all") if q)
    result = client.simulate_get(case.path, query_string=query)
    assert result.status_code == 200, result.text
    return sorted(result.json, key=repr)


@dataclass
class Node:
    """An in-process SCP and a DICOMweb client over one index."""

    services: Services
    port: int
    web: testing.TestClient


@pytest.fixture
def serve() -> Iterator[Callable[[Services], Node]]:
    started: list[server.NodeServer] = []

    def start(services: Services) -> Node:
        port = free_port()
        started.append(server.start(services, ("127.0.0.1", port)))
        return Node(services, port, testing.TestClient(create_app(services)))

    yield start
    for running in started:
        server.stop(running, drain=1.0)


def assert_same_answers(original: Node, rebuilt: Node, varied: Varied) -> None:
    """C-FIND (Study Root at every level, Patient Root at PATIENT) and QIDO-RS give the
    same answers, attribute for attribute, on both indexes."""
    title = original.services.settings.ae_title
    answered = 0
    for case in query_cases(varied):
        before = c_find(original.port, title, case.level, case.keys,
                        relational=case.relational)
        after = c_find(rebuilt.port, title, case.level, case.keys, relational=case.relational)
        assert after == before, case.name
        assert qido(rebuilt.web, case) == qido(original.web, case), case.name
        answered += bool(before)
    assert answered == len(query_cases(varied))
    for keys in ({}, {"PatientID": SHARED_ID}, {"PatientName": "LATE*"}):
        before = c_find(original.port, title, "PATIENT", keys, PATIENT_ROOT_FIND)
        assert c_find(rebuilt.port, title, "PATIENT", keys, PATIENT_ROOT_FIND) == before
        assert before, keys


# --- the tests ----------------------------------------------------------------------------

def previous_index(report: Report, folder: Path) -> Path:
    """The index the rebuild replaced, copied alone into ``folder`` (for a node of its own)."""
    assert report.previous is not None and report.previous.exists()
    folder.mkdir(parents=True)
    shutil.copy(report.previous, folder / "index.sqlite")
    return folder / "index.sqlite"


def test_a_rebuilt_index_equals_the_original_row_by_row_and_answers_alike(
        settings: config.Settings, tmp_path: Path,
        serve: Callable[[Services], Node]) -> None:
    services = build(settings)
    assert isinstance(services.store.backend, FileStore)
    varied = ingest_varied(services)
    drain(services)
    services.close()  # the node stops: no process has the index open
    listed = set(FileStore(settings.objects_dir).keys())

    pool = AnalyserPool(2, settings.max_object_bytes)
    try:
        report = rebuild(settings.index_path, FileStore(settings.objects_dir), pool)
    finally:
        pool.close()

    assert report.objects == len(listed) == len(varied.objects) + len(varied.damaged)
    assert report.indexed == len(varied.objects) - len(varied.rejected)
    reasons = {s.key: s.reason for s in report.skipped}
    garbage, elsewhere = varied.damaged
    assert set(reasons) == {garbage, elsewhere}
    assert reasons[garbage].startswith("not a readable instance")
    assert reasons[elsewhere] == "its UIDs name another key"
    assert report.undated == 0 and not report.duplicates
    # Nothing was deleted or moved: the damaged objects are where they were.
    assert set(FileStore(settings.objects_dir).keys()) == listed

    original = previous_index(report, tmp_path / "original")
    rebuilt = dump(settings.index_path)
    assert_same_rows(dump(original), rebuilt)
    assert_rejections_applied(report, varied, dump(original), rebuilt)
    assert report.counts == {table: len(rebuilt[table])
                             for table in ("patient", "study", "series", "instance")}
    # The patient row holds the attributes received last.
    shared = next(row for row in rebuilt["patient"].values() if row["patient_id"] == SHARED_ID)
    assert shared["patient_name"] == "LATE^NAME" and shared["patient_sex"] == "M"
    # Each study row keeps its own copy.
    assert rebuilt["study"][EARLIER_STUDY]["patient_name"] == "EARLY^NAME"

    served_original = build(settings.with_overrides(data_dir=original.parent),
                            store=MemoryStore())
    served_rebuilt = build(settings)
    try:
        assert_same_answers(serve(served_original), serve(served_rebuilt), varied)
    finally:
        served_original.close()
        served_rebuilt.close()


def test_an_index_rebuilt_in_place_of_a_lost_one_is_the_customer_s(
        settings: config.Settings) -> None:
    """The rebuilt index keeps the owner of the index it replaces; with none left (a
    lost node replaced), it records the customer it was rebuilt for."""
    store = MemoryStore()
    services = build(replace(settings, customer="alice"), store=store)
    services.ingest.store_bytes(shared_patient_study(EARLIER_STUDY, "A^B", "19500101", "F")[0])
    drain(services)
    services.close()
    rebuild(settings.index_path, store, AnalyserPool(0), customer="bob")
    assert reads.owner(connect(settings.index_path)) == "alice"
    for leftover in settings.index_path.parent.glob(settings.index_path.name + "*"):
        leftover.unlink()
    rebuild(settings.index_path, store, AnalyserPool(0), customer="alice")
    assert reads.owner(connect(settings.index_path)) == "alice"
    with pytest.raises(ConfigError, match="customer 'alice'"):
        build(replace(settings, customer="typo"), store=store)


def test_an_object_ingest_would_refuse_now_is_indexed_again(
        settings: config.Settings) -> None:
    """A rebuild indexes what the store holds, as it is: an object acknowledged before
    ingest refused its kind (encapsulated Pixel Data under Explicit VR Little Endian)
    is not lost from the rebuilt index."""
    data = sample("SC_rgb_jpeg_dcmtk.dcm").read_bytes()
    meta = dcmread(io.BytesIO(data), stop_before_pixels=True)
    native = relabelled(data, "1.2.840.10008.1.2.1")
    store = MemoryStore()
    key = object_key(meta.StudyInstanceUID, meta.SeriesInstanceUID, meta.SOPInstanceUID)
    store.put(key, io.BytesIO(native), len(native))
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert report.indexed == 1, report.lines()


def test_without_stored_times_the_order_is_the_keys_and_the_time_unknown(
        settings: config.Settings) -> None:
    """A store that does not tell when objects were written: received time unknown,
    rows written in key order (so the later study of a shared Patient ID, whose key
    sorts first, does not win the patient row), and the report says so."""
    store = MemoryStore()
    services = build(settings, store=store)
    for study, name in ((EARLIER_STUDY, "EARLY^NAME"), (LATER_STUDY, "LATE^NAME")):
        for data in shared_patient_study(study, name, "19500101", "F"):
            services.ingest.store_bytes(data)
    drain(services)
    services.close()
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert report.undated == report.objects == report.indexed == 4
    rebuilt = dump(settings.index_path)
    assert {row["received_at"] for row in rebuilt["instance"].values()} == {UNKNOWN_RECEIVED}
    [patient] = rebuilt["patient"].values()
    assert patient["patient_name"] == "EARLY^NAME"  # the last key, not the last write
    assert any("without a stored time" in line for line in report.lines())


def test_a_uid_stored_at_two_keys_is_indexed_from_the_newest(
        settings: config.Settings, tmp_path: Path) -> None:
    """A copy a crash left (an instance moved to another series, its old object not yet
    deleted): the object written last is indexed, the other reported and kept."""
    services = build(settings)
    old = make_instance(SOPInstanceUID="1.2.826.0.1.3680043.8.498.88.1.1",
                        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.88.2",
                        StudyInstanceUID="1.2.826.0.1.3680043.8.498.88")
    moved = make_instance(SOPInstanceUID="1.2.826.0.1.3680043.8.498.88.1.1",
                          SeriesInstanceUID="1.2.826.0.1.3680043.8.498.88.1",
                          StudyInstanceUID="1.2.826.0.1.3680043.8.498.88")
    services.ingest.store_bytes(old)
    services.ingest.store_bytes(moved)
    old_key = object_key("1.2.826.0.1.3680043.8.498.88", "1.2.826.0.1.3680043.8.498.88.2",
                         "1.2.826.0.1.3680043.8.498.88.1.1")
    new_key = object_key("1.2.826.0.1.3680043.8.498.88", "1.2.826.0.1.3680043.8.498.88.1",
                         "1.2.826.0.1.3680043.8.498.88.1.1")
    assert not exists(services.store, old_key)  # ingest removed the moved instance's copy
    drain(services)
    services.close()
    # The crash window: the old copy is back (written before the moved one).
    store = FileStore(settings.objects_dir)
    store.put(old_key, io.BytesIO(old), len(old))
    moved_time = store.local_file(new_key).stat().st_mtime_ns
    os.utime(store.local_file(old_key), ns=(moved_time - 10**9, moved_time - 10**9))
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert report.duplicates == {"1.2.826.0.1.3680043.8.498.88.1.1": [old_key, new_key]}
    assert report.indexed == 2 and report.counts["instance"] == 1
    assert dump(settings.index_path)["instance"]["1.2.826.0.1.3680043.8.498.88.1.1"][
        "object_key"] == new_key
    assert set(store.keys()) == {old_key, new_key}


def _two_copies(settings: config.Settings, *, apart_ns: int) -> tuple[FileStore, str, str]:
    """An instance moved to another series, its old copy back (a crash's window),
    dated ``apart_ns`` after the moved one: the store, the old key, the moved key."""
    services = build(settings)
    study, sop = "1.2.826.0.1.3680043.8.498.89", "1.2.826.0.1.3680043.8.498.89.1.1"
    old = make_instance(SOPInstanceUID=sop, SeriesInstanceUID=f"{study}.2",
                        StudyInstanceUID=study)
    services.ingest.store_bytes(old)
    services.ingest.store_bytes(make_instance(SOPInstanceUID=sop, StudyInstanceUID=study,
                                              SeriesInstanceUID=f"{study}.1"))
    drain(services)
    services.close()
    store = FileStore(settings.objects_dir)
    old_key, new_key = (object_key(study, f"{study}.{n}", sop) for n in (2, 1))
    store.put(old_key, io.BytesIO(old), len(old))
    moved_time = store.local_file(new_key).stat().st_mtime_ns
    os.utime(store.local_file(old_key), ns=(moved_time + apart_ns,) * 2)
    return store, old_key, new_key


def test_the_previous_index_decides_which_copy_of_a_uid_is_indexed(
        settings: config.Settings) -> None:
    """The store's times are not the order of acknowledgement (S3 dates writes to the
    second, a folder file keeps the time it was staged): where the previous index names
    one of a UID's copies, that one is indexed, even dated before the other."""
    store, old_key, new_key = _two_copies(settings, apart_ns=10**9)
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    sop = "1.2.826.0.1.3680043.8.498.89.1.1"
    assert report.duplicates == {sop: [old_key, new_key]} and report.tied == []
    assert dump(settings.index_path)["instance"][sop]["object_key"] == new_key
    assert set(store.keys()) == {old_key, new_key}


def test_copies_dated_alike_without_a_previous_index_are_reported_tied(
        settings: config.Settings) -> None:
    """A lost index, two copies of a UID dated alike (S3's whole seconds): the order of
    writes is not known, and the report says so rather than guess in silence."""
    store, old_key, new_key = _two_copies(settings, apart_ns=0)
    for path in settings.index_path.parent.glob(settings.index_path.name + "*"):
        path.unlink()
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    sop = "1.2.826.0.1.3680043.8.498.89.1.1"
    assert report.tied == [sop] and sorted(report.duplicates[sop]) == sorted(
        [old_key, new_key])
    assert any(sop in line and "not known" in line for line in report.lines())
    assert report.as_json()["tied"] == [sop]


class FailingStore(MemoryStore):
    """A store whose reads fail after some objects (S3 gone in the middle)."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.reads = 0
        self.fail_after = fail_after

    def open(self, key: str) -> BinaryIO:
        self.reads += 1
        if self.reads > self.fail_after:
            raise StorageError("S3 read failed: connection refused")
        return super().open(key)


def test_a_failed_rebuild_leaves_the_index_as_it_was(settings: config.Settings) -> None:
    store = FailingStore(fail_after=1000)
    services = build(settings, store=store)
    for number in range(1, 6):
        services.ingest.store_bytes(make_instance(PatientID=f"F{number}"))
    drain(services)
    services.close()
    before = dump(settings.index_path)
    files = sorted(p.name for p in settings.index_path.parent.iterdir())
    store.fail_after = store.reads + 3
    with pytest.raises(StorageError, match=r"^[0-9.]+/[0-9.]+/[0-9.]+\.dcm: S3 read failed"):
        rebuild(settings.index_path, store, AnalyserPool(0), readers=1)
    assert dump(settings.index_path) == before
    assert sorted(p.name for p in settings.index_path.parent.iterdir()) == files


def test_a_folder_store_holding_a_link_is_not_rebuilt(settings: config.Settings,
                                                       tmp_path: Path) -> None:
    """A study folder moved to another disk and linked back: the store's listing does
    not follow links, so a rebuild would drop the rows of every object behind it.  It
    refuses, naming the link, and leaves the index as it was."""
    services = build(settings)
    uids = [services.ingest.store_bytes(make_instance(PatientID=f"L{number}")).study_uid
            for number in range(2)]
    drain(services)
    services.close()
    before = dump(settings.index_path)
    moved = tmp_path / "other-disk" / uids[0]
    moved.parent.mkdir()
    shutil.move(settings.objects_dir / uids[0], moved)
    (settings.objects_dir / uids[0]).symlink_to(moved, target_is_directory=True)
    with pytest.raises(StorageError, match=f"1 symbolic link\\(s\\) to folders \\({uids[0]}\\)"):
        rebuild(settings.index_path, FileStore(settings.objects_dir), AnalyserPool(0))
    assert dump(settings.index_path) == before


def test_the_new_files_of_a_rebuild_killed_before_its_swap_are_removed_by_the_next(
        settings: config.Settings) -> None:
    """A kill -9 skips a failed rebuild's clean-up: its new index (and WAL) stayed
    beside the index for good.  The next rebuild removes such files, unless a process
    has one open (another rebuild running)."""
    store = MemoryStore()
    services = build(settings, store=store)
    services.ingest.store_bytes(make_instance())
    drain(services)
    services.close()
    folder = settings.index_path.parent
    killed = folder / f"{settings.index_path.name}.reindex-20261205T000000.000000Z"
    shutil.copy(settings.index_path, killed)
    Path(f"{killed}-wal").write_bytes(b"")
    recent = folder / f"{settings.index_path.name}.reindex-20261205T000001.000000Z"
    shutil.copy(settings.index_path, recent)  # another rebuild's, written just now
    an_hour_ago = time.time() - 3700
    os.utime(killed, (an_hour_ago, an_hour_ago))
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert report.leftovers == 1
    assert [p.name for p in folder.glob("*.reindex-*")] == [recent.name]


def test_a_wal_left_by_an_index_moved_aside_is_not_replayed_into_the_rebuilt_one(
        settings: config.Settings) -> None:
    """After a crash, the operator moves a damaged index aside and rebuilds: its
    ``-wal`` stayed, and the next open replayed it into the rebuilt file ("Rowid out of
    order", fsck failing).  The rebuild keeps it under another name instead."""
    store = MemoryStore()
    services = build(settings, store=store)
    stored = {services.ingest.store_bytes(make_instance()).sop_instance_uid
              for _ in range(20)}
    drain(services)
    wal = Path(f"{settings.index_path}-wal")
    crashed = wal.read_bytes()  # the WAL as a kill -9 leaves it
    services.close()
    assert crashed
    settings.index_path.rename(settings.index_path.with_name("damaged.sqlite"))
    wal.write_bytes(crashed)
    rebuild(settings.index_path, store, AnalyserPool(0))
    assert not wal.exists() or wal.read_bytes() != crashed
    assert list(settings.index_path.parent.glob("*-wal.before-reindex-*"))
    conn = connect(settings.index_path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert {row[0] for row in conn.execute("SELECT sop_uid FROM instance")} == stored
    finally:
        conn.close()


def test_the_rebuild_refuses_while_another_process_has_the_index_open(
        settings: config.Settings) -> None:
    services = build(settings, store=MemoryStore())
    services.ingest.store_bytes(make_instance())
    drain(services)
    services.close()
    assert not index_in_use(settings.index_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from pacs.core.index.connection import Index; "
         f"i = Index(Path({str(settings.index_path)!r})); i.connection(); "
         "print('open', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert index_in_use(settings.index_path)
        before = dump(settings.index_path)
        with pytest.raises(IndexFailure, match="open in another process"):
            rebuild(settings.index_path, MemoryStore(), AnalyserPool(0))
        assert dump(settings.index_path) == before
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not index_in_use(settings.index_path)


def test_the_rebuild_refuses_while_the_intake_holds_objects(
        settings: config.Settings) -> None:
    """Acknowledged objects still in the intake are not in the store: a rebuild from
    the store would lose them.  Refused before it starts; the index as it was."""
    store = MemoryStore()
    services = build(settings, store=store)
    services.ingest.store_bytes(make_instance())
    services.close()  # not drained
    before = dump(settings.index_path)
    with pytest.raises(IndexFailure, match="intake"):
        rebuild(settings.index_path, store, AnalyserPool(0))
    assert dump(settings.index_path) == before
    assert not list(settings.index_path.parent.glob("index.sqlite.*"))


def test_an_index_older_than_the_unsettled_keys_still_refuses_with_objects_in_its_intake(
        settings: config.Settings) -> None:
    """An index written before the schema recorded unsettled keys (its intake there,
    the ``unsettled`` table not yet): its acknowledged objects in the intake still
    refuse the rebuild (reading the intake's totals did not depend on the newer table)."""
    store = MemoryStore()
    services = build(settings, store=store)
    services.ingest.store_bytes(make_instance())
    services.close()  # not drained
    conn = connect(settings.index_path)
    try:
        conn.execute("DROP TABLE unsettled")
    finally:
        conn.close()
    with pytest.raises(IndexFailure, match="holds 1 acknowledged object"):
        rebuild(settings.index_path, store, AnalyserPool(0))
    assert not list(settings.index_path.parent.glob("index.sqlite.*"))


def test_the_rebuilt_index_keeps_the_keys_whose_write_went_unanswered(
        settings: config.Settings) -> None:
    """A write S3 did not answer may still land: the key stays unsettled in the rebuilt
    index (the store cannot tell), with the time its write went unanswered, so that a
    write of it goes through the intake until that time is long enough ago."""
    store = MemoryStore()
    services = build(settings, store=store)
    data = make_instance()
    services.ingest.store_bytes(data)
    drain(services)
    record_unsettled(services.index, key_of(data))
    services.close()
    conn = connect(settings.index_path)
    try:
        before = reads.unsettled_keys(conn)
    finally:
        conn.close()
    assert [key for key, _ in before] == [key_of(data)]
    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert report.indexed == 1
    conn = connect(settings.index_path)
    try:
        assert reads.unsettled_keys(conn) == before
    finally:
        conn.close()


def test_the_rebuild_refuses_to_swap_when_a_node_left_objects_in_the_intake(
        settings: config.Settings) -> None:
    """A node started and stopped while the rebuild ran (each check saw the index
    closed) and acknowledged an instance it left in the intake: the intake is asked
    again before the swap, which is refused.  The index keeps the instance, the new
    file is removed, and no previous index is set aside."""
    store = MemoryStore()
    services = build(settings, store=store)
    for number in range(3):
        services.ingest.store_bytes(make_instance(PatientID=f"R{number}"))
    drain(services)
    services.close()
    late = make_instance(PatientID="LATE")
    calls = 0

    def a_node_starts_and_stops() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # during the rebuild, between the two checks
            node = build(settings, store=store)
            assert node.ingest.store_bytes(late).outcome.value == "stored"
            node.close()  # its mover never ran: the object stays in the intake

    with pytest.raises(IndexFailure, match="written while it was rebuilt"):
        rebuild(settings.index_path, store, AnalyserPool(0), on_object=a_node_starts_and_stops)
    after = dump(settings.index_path)
    assert len(after["instance"]) == 4 and calls == 3
    assert not list(settings.index_path.parent.glob("index.sqlite.*"))  # new, previous
    node = build(settings, store=store)
    try:
        assert drain(node) == 1  # the acknowledged object, moved at last
    finally:
        node.close()


def _three_stored(settings: config.Settings, store: MemoryStore,
                  patient: str) -> tuple[Services, list[bytes]]:
    """A node's services over ``store`` holding three instances (of three patients
    named after ``patient``), moved to the store."""
    services = build(settings, store=store)
    made = [make_instance(PatientID=f"{patient}{number}") for number in range(3)]
    for data in made:
        services.ingest.store_bytes(data)
    drain(services)
    return services, made


@pytest.mark.parametrize("kept", [0, 1], ids=["empty", "a third"])
def test_a_store_far_smaller_than_the_index_is_not_rebuilt_from(
        settings: config.Settings, kept: int) -> None:
    """A folder not mounted, a wrong bucket: the store lists none, or under half, of
    the objects the index holds.  The rebuild refuses and the index stays as it was
    (it swapped in an empty index, exit 0); asked to, it rebuilds all the same."""
    store = MemoryStore()
    services, made = _three_stored(settings, store, "M")
    services.close()
    elsewhere = MemoryStore()
    for data in made[:kept]:
        elsewhere.put(key_of(data), io.BytesIO(data), len(data))
    before = dump(settings.index_path)
    with pytest.raises(IndexFailure, match="nothing rebuilt"):
        rebuild(settings.index_path, elsewhere, AnalyserPool(0))
    assert dump(settings.index_path) == before
    report = rebuild(settings.index_path, elsewhere, AnalyserPool(0), allow_mass_drop=True)
    assert report.indexed == kept


@pytest.mark.parametrize("meanwhile", ["import", "delete"])
def test_the_rebuild_refuses_to_swap_when_the_index_was_written_meanwhile(
        settings: config.Settings, meanwhile: str) -> None:
    """A command ran while the rebuild did (each check saw the index closed): an
    import acknowledged an instance whose object the rebuild never listed, or a
    deletion removed instances and wrote their tombstones.  The swap would lose the
    one and bring the others back: it is refused, the index keeps what was done, the
    new file is removed."""
    store = MemoryStore()
    services, made = _three_stored(settings, store, "W")
    services.close()
    calls = 0

    def a_command_runs() -> None:
        nonlocal calls
        calls += 1
        if calls != 1:
            return
        node = build(settings, store=store)
        try:
            if meanwhile == "import":
                node.ingest.store_bytes(make_instance(PatientID="LATE"))
                drain(node)  # in the store, not in what the rebuild listed
            else:
                [row] = node.deleter.plan([Target(dcmread(
                    DicomBytesIO(made[0])).StudyInstanceUID)])
                node.deleter.remove([reference(row)], Participant("admin", True),
                                    audit.APPLICATION_SERVER)
        finally:
            node.close()

    with pytest.raises(IndexFailure, match="written while it was rebuilt"):
        rebuild(settings.index_path, store, AnalyserPool(0), on_object=a_command_runs)
    after = dump(settings.index_path)
    assert len(after["instance"]) == (4 if meanwhile == "import" else 2)
    assert len(after["tombstone"]) == (0 if meanwhile == "import" else 1)
    assert not list(settings.index_path.parent.glob("index.sqlite.*"))


def test_a_command_that_writes_while_the_carried_rows_are_copied_stops_the_swap(
        settings: config.Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying what the new index carries over (forwarding's queue may be long) takes
    its time after the rebuild's check of the index: an import that opened, wrote and
    closed the index then would be set aside with the previous index.  The index is
    checked again after the copy: the swap is refused, the import kept."""
    import pacs.core.reindex as rebuilding

    store = MemoryStore()
    services, _made = _three_stored(settings, store, "C")
    services.close()
    copy = rebuilding._keep_carried

    def copied_while_a_command_runs(new_path: Path, carried: Any) -> None:
        copy(new_path, carried)
        node = build(settings, store=store)
        try:
            node.ingest.store_bytes(make_instance(PatientID="LATE"))
            drain(node)
        finally:
            node.close()

    monkeypatch.setattr(rebuilding, "_keep_carried", copied_while_a_command_runs)
    with pytest.raises(IndexFailure, match="written while it was rebuilt"):
        rebuild(settings.index_path, store, AnalyserPool(0))
    assert len(dump(settings.index_path)["instance"]) == 4
    assert not list(settings.index_path.parent.glob("index.sqlite.*"))


def test_removals_a_crash_cut_short_are_finished_before_a_rebuild(
        settings: config.Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejection note committed with its pending row, the crash before its removals:
    the node's start-up would finish them.  The rebuild refuses such an index (it
    dropped the pending row, and the instances the note removes stayed listed), and
    ``pacs reindex`` finishes them first, as the start-up does."""
    from click.testing import CliRunner

    from pacs.cli import main

    services = build(settings)
    named = [rejected_instance(5, n) for n in (1, 2)]
    for data in named:
        services.ingest.store_bytes(data, calling_ae="TEST")
    note = make_rejection_note([uids(d) for d in named], PatientID=REJECTED_ID,
                               SOPInstanceUID=f"{REJECTED_STUDY}.8.5",
                               SeriesInstanceUID=f"{REJECTED_STUDY}.8")

    def crashed(*_: object) -> None:
        raise IndexFailure("simulated crash before the removals")

    monkeypatch.setattr(services.ingest, "on_rejection", crashed)
    with pytest.raises(IndexFailure):
        services.ingest.store_bytes(note, calling_ae="QA")
    drain(services)
    services.close()
    before = dump(settings.index_path)
    assert {uids(d)[2] for d in named} <= set(before["instance"])

    with pytest.raises(IndexFailure, match="cut short"):
        rebuild(settings.index_path, FileStore(settings.objects_dir), AnalyserPool(0))
    assert dump(settings.index_path) == before

    monkeypatch.setenv("PACS_DATA_DIR", str(settings.data_dir))
    result = CliRunner().invoke(main, ["reindex", "--quiet", "--jobs", "0"])
    assert result.exit_code == 0, result.output
    rebuilt = dump(settings.index_path)
    assert set(rebuilt["instance"]) == {uids(note)[2]}
    assert set(rebuilt["tombstone"]) == {uids(d)[2] for d in named}
    assert not rebuilt["rejection_pending"]


def test_a_removed_instance_whose_object_outlived_its_removal_stays_removed(
        settings: config.Settings) -> None:
    """On S3 a removal's object deletion can fail or go unanswered, and a late write
    land after it: the object of a removed instance is in the store, its tombstone in
    the index.  The rebuild carries the tombstones over and leaves that object out
    (counted removed, left for ``pacs fsck --repair``): the DELETE answered stays done."""
    store = MemoryStore()
    services, made = _three_stored(settings, store, "D")
    gone = dcmread(DicomBytesIO(made[0]))
    key = object_key(gone.StudyInstanceUID, gone.SeriesInstanceUID, gone.SOPInstanceUID)
    [row] = services.deleter.plan([Target(gone.StudyInstanceUID)])
    services.deleter.remove([reference(row)], Participant("admin", True),
                            audit.WEB_SERVER)
    store.put(key, io.BytesIO(made[0]), len(made[0]))  # the deletion that did not happen
    services.close()

    report = rebuild(settings.index_path, store, AnalyserPool(0))
    assert (report.indexed, report.removed) == (2, 1)
    after = dump(settings.index_path)
    assert len(after["instance"]) == 2 and len(after["tombstone"]) == 1
    assert any("previous index records removed" in line for line in report.lines())


def test_a_pending_deletion_outlives_a_rebuild(settings: config.Settings) -> None:
    """A removal whose object deletion failed: the rebuilt index keeps its key pending,
    and the intake's mover deletes the object once the store answers."""
    store = MemoryStore()
    services, made = _three_stored(settings, store, "P")
    gone = dcmread(DicomBytesIO(made[0]))
    key = object_key(gone.StudyInstanceUID, gone.SeriesInstanceUID, gone.SOPInstanceUID)
    [row] = services.deleter.plan([Target(gone.StudyInstanceUID)])
    with deletions_failing(services, {key}):
        services.deleter.remove([reference(row)], Participant("admin", True),
                                audit.WEB_SERVER)
    services.close()

    rebuild(settings.index_path, store, AnalyserPool(0))
    assert list(dump(settings.index_path)["object_deletion"]) == [key]
    rebuilt = build(settings, store=store)
    try:
        with rebuilt.index.write() as conn:  # past the removal's own time for it
            conn.execute("UPDATE object_deletion SET since = since - 3600")
        assert mover(rebuilt).delete_removed() == 1
        assert key not in set(store.keys())
    finally:
        rebuilt.close()


def _three_numbered(settings: config.Settings, store: MemoryStore, name: str
                    ) -> tuple[Services, dict[str, int]]:
    """:func:`_three_stored`, and each instance's change number by SOP Instance UID, in
    the order of the numbers."""
    services, made = _three_stored(settings, store, name)
    sops = [str(dcmread(DicomBytesIO(data)).SOPInstanceUID) for data in made]
    with services.index.write() as conn:
        numbered = {sop: int(seq) for sop, seq in conn.execute(
            "SELECT sop_uid, change_seq FROM instance")}
    return services, {sop: numbered[sop] for sop in sorted(sops, key=numbered.__getitem__)}


def test_storage_commitment_requests_and_forwarding_outlive_a_rebuild(
        settings: config.Settings) -> None:
    """The work waiting in the previous index is taken over as it was: a storage
    commitment request not answered yet, forwarding's queue (an instance waiting for
    one destination, one refused by another); and the instances forwarding had not read
    yet come after its cursor again, in their order, so that they are forwarded."""
    store = MemoryStore()
    services, seqs = _three_numbered(settings, store, "F")
    first, *unread = seqs
    with services.index.write() as conn:
        commitments.record(conn, "REQUESTOR", "1.2.3.4", "20261206", '[["1.2", "1.3"]]',
                           1000.0, 0.0, "", "PACS", "127.0.0.1")
        outbox.move_cursor(conn, seqs[first])  # forwarding read the first change only
        outbox.queue(conn, [("DEST", "all", first, seqs[first]),
                            ("OTHER", "all", first, seqs[first])], 1000.0)
        [refused] = [pk for (pk,) in conn.execute(
            "SELECT pk FROM outbox WHERE destination = 'OTHER'")]
        outbox.mark_failed(conn, [(refused, seqs[first], "refused")], 1001.0)
    services.close()
    before = dump(settings.index_path)

    rebuild(settings.index_path, store, AnalyserPool(0))

    after = dump(settings.index_path)
    assert after["commitment"] == before["commitment"] and len(after["commitment"]) == 1
    assert after["outbox"] == before["outbox"] and len(after["outbox"]) == 2
    conn = connect(settings.index_path)
    try:
        cursor = outbox.cursor(conn)
        assert cursor is not None
        assert [change.sop_uid for change in outbox.changes(conn, cursor, 10)] == unread
    finally:
        conn.close()


def test_a_rebuild_passes_over_what_runs_without_routes_stored(
        settings: config.Settings) -> None:
    """A run without routes marked where it began (``forward_unrouted``): of the
    instances forwarding had not read, those it stored are not put after the rebuilt
    index's cursor again, the one the last run with routes stored is."""
    store = MemoryStore()
    services, seqs = _three_numbered(settings, store, "U")
    first, routed, _unrouted = seqs
    with services.index.write() as conn:
        outbox.move_cursor(conn, seqs[first])
        outbox.mark_unrouted(conn, seqs[routed])  # a run without routes began here
    services.close()

    rebuild(settings.index_path, store, AnalyserPool(0))

    conn = connect(settings.index_path)
    try:
        cursor = outbox.cursor(conn)
        assert cursor is not None
        assert [change.sop_uid for change in outbox.changes(conn, cursor, 10)] == [routed]
    finally:
        conn.close()


def test_a_rebuild_gives_no_change_number_its_carried_queue_holds(
        settings: config.Settings) -> None:
    """The previous index numbered far more changes (overwrites, deletions) than the
    rebuild, which numbers every instance anew from 1: forwarding's carried entry keeps
    its number, and the instances changed again after the cursor, or stored later, are
    numbered past it; one given the same number would be taken for the entry being
    sent, and its new version never forwarded."""
    store = MemoryStore()
    services, made = _three_stored(settings, store, "N")
    sops = [str(dcmread(DicomBytesIO(data)).SOPInstanceUID) for data in made]
    with services.index.write() as conn:
        outbox.move_cursor(conn, 500)
        outbox.queue(conn, [("DEST", "all", sops[0], 500)], 1000.0)
    services.close()

    rebuild(settings.index_path, store, AnalyserPool(0))

    later = build(settings, store=store)
    try:
        later.ingest.store_bytes(make_instance())
    finally:
        later.close()
    conn = connect(settings.index_path)
    try:
        cursor = outbox.cursor(conn)
        assert cursor is not None and cursor >= 500
        numbers = sorted(seq for (seq,) in conn.execute("SELECT change_seq FROM instance"))
        assert len(numbers) == 4 and numbers[-1] > 500
    finally:
        conn.close()


class _SameTimes(MemoryStore):
    """A store that dates every object at the same second (S3's whole seconds, a
    folder's coarse file times: one mover batch)."""

    def modified_times(self) -> Iterator[tuple[str, float]]:
        return ((key, 1_700_000_000.0) for key in self.keys())


@pytest.mark.parametrize("store_class", [MemoryStore, _SameTimes],
                         ids=["no times", "the same time"])
def test_an_instance_the_store_cannot_order_against_its_retention_note_stays(
        settings: config.Settings, store_class: type[MemoryStore]) -> None:
    """A Data Retention Policy Expired note (113039, which lets an instance come back)
    removed an instance, which was sent again and acknowledged; the mover wrote both
    in one batch.  Where the store's times cannot tell which came first, the rebuild
    keeps the instance indexed and reports it undecided: hidden, ``pacs fsck --repair``
    deleted its acknowledged object."""
    store = store_class()
    services = build(settings, store=store)
    again = rejected_instance(3, 1)
    note = make_rejection_note([uids(again)], code="113039",
                               meaning="Data Retention Policy Expired", PatientID=REJECTED_ID,
                               SOPInstanceUID=f"{REJECTED_STUDY}.7.1",
                               SeriesInstanceUID=f"{REJECTED_STUDY}.7")
    services.ingest.store_bytes(again, calling_ae="TEST")
    drain(services)
    services.ingest.store_bytes(note, calling_ae="TEST")
    services.ingest.store_bytes(again, calling_ae="TEST")  # sent again: stored
    drain(services)
    services.close()

    report = rebuild(settings.index_path, store, AnalyserPool(0))

    assert report.undecided == 1 and report.rejected == 0
    assert any("kept indexed" in line for line in report.lines())
    services = build(settings, store=store)
    try:
        conn = services.index.connection()
        assert reads.lookup(conn, uids(again)[2]) is not None
        assert reads.tombstone(conn, uids(again)[2]) is None
        reconcile(services, full=True, repair=True)
        assert exists(store, key_of(again))
    finally:
        services.close()


class _WriteTimes(MemoryStore):
    """A store that dates each object when it is written, as S3 does (the intake's
    mover writes an object after those acknowledged later and written directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, float] = {}

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        super().put(key, source, length)
        self.written[key] = time.time()

    def modified_times(self) -> Iterator[tuple[str, float]]:
        return ((key, self.written[key]) for key in self.keys())


def test_an_instance_sent_again_after_its_retention_note_stays_whatever_the_store_s_times(
        settings: config.Settings) -> None:
    """A Data Retention Policy Expired note (113039) removed an instance, which was
    sent again and acknowledged; the note, small, waited in the intake and was written
    by the mover after the instance, large, written directly.  The store's times say
    the instance came first: the rebuild keeps it all the same (undecided), where
    hiding it made ``pacs fsck --repair`` delete its acknowledged object."""
    store = _WriteTimes()
    services = build(settings.with_overrides(intake_object_bytes=64 << 10), store=store)
    again = rejected_instance(4, 1, Rows=256, Columns=256, PixelData=bytes(256 * 256 * 2))
    note = make_rejection_note([uids(again)], code="113039",
                               meaning="Data Retention Policy Expired", PatientID=REJECTED_ID,
                               SOPInstanceUID=f"{REJECTED_STUDY}.6.1",
                               SeriesInstanceUID=f"{REJECTED_STUDY}.6")
    assert len(note) < 64 << 10 < len(again)  # the note held by the intake, not the instance
    services.ingest.store_bytes(again, calling_ae="TEST")
    drain(services)
    services.ingest.store_bytes(note, calling_ae="TEST")
    time.sleep(APART)
    services.ingest.store_bytes(again, calling_ae="TEST")  # sent again: stored
    time.sleep(APART)
    drain(services)  # the note written now, after the instance
    services.close()
    times = dict(store.modified_times())
    assert times[key_of(again)] < times[key_of(note)]

    report = rebuild(settings.index_path, store, AnalyserPool(0))

    assert report.undecided == 1 and report.rejected == 0
    services = build(settings, store=store)
    try:
        conn = services.index.connection()
        assert reads.lookup(conn, uids(again)[2]) is not None
        assert reads.tombstone(conn, uids(again)[2]) is None
        assert reconcile(services, full=True, repair=True).ok
        assert exists(store, key_of(again))
    finally:
        services.close()


def test_the_patient_row_holds_the_attributes_acknowledged_last(
        settings: config.Settings) -> None:
    """A small instance (kept by the intake, written by its mover later) acknowledged
    before a large one (written directly) of the same Patient ID with other patient
    attributes: the mover dates the small object when it was acknowledged, so the
    rebuilt patient row holds the large one's attributes, as the original does (it
    held the small one's: the store's order of writes)."""
    services = build(settings)
    study = f"{REJECTED_STUDY}.20"
    small = make_instance(PatientID="PX-ORDER", PatientName="OLD^NAME",
                          StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1",
                          SOPInstanceUID=f"{study}.1.1")
    large = make_instance(PatientID="PX-ORDER", PatientName="NEW^NAME",
                          StudyInstanceUID=f"{study}9", SeriesInstanceUID=f"{study}9.1",
                          SOPInstanceUID=f"{study}9.1.1", Rows=512, Columns=512,
                          PixelData=bytes(512 * 512 * 2))
    services.ingest.store_bytes(small, calling_ae="TEST")  # held by the intake
    time.sleep(APART)
    services.ingest.store_bytes(large, calling_ae="TEST")  # written directly
    time.sleep(APART)
    drain(services)  # the small one written now
    services.close()
    original = dump(settings.index_path)
    [patient] = original["patient"].values()
    assert patient["patient_name"] == "NEW^NAME"

    rebuild(settings.index_path, FileStore(settings.objects_dir), AnalyserPool(0))

    assert dump(settings.index_path)["patient"] == original["patient"]


def test_a_lost_index_is_rebuilt_where_there_was_none(settings: config.Settings) -> None:
    """The replaced node: a data folder without any index, the objects elsewhere."""
    store = MemoryStore()
    source = build(settings.with_overrides(data_dir=settings.data_dir / "old"),
                   store=store)
    source.ingest.store_bytes(make_instance())
    drain(source)
    source.close()
    index = settings.data_dir / "new" / "index.sqlite"
    report = rebuild(index, store, AnalyserPool(0))
    assert report.previous is None and report.indexed == 1
    assert len(dump(index)["instance"]) == 1


@pytest.mark.parametrize("note_series", ["1.2.826.0.1.3680043.8.498.81.0",
                                         "1.2.826.0.1.3680043.8.498.81.9"],
                         ids=["note met first", "note met last"])
def test_a_rejection_note_hides_what_it_names_whichever_is_met_first(
        settings: config.Settings, note_series: str) -> None:
    """A store without times is read in key order: the note's key before or after that
    of the instance it rejected, whose object a crash left; either way the instance
    stays hidden and tombstoned, its object in place for ``pacs fsck --repair``."""
    store = MemoryStore()
    services = build(settings, store=store)
    study = "1.2.826.0.1.3680043.8.498.81"
    kept, rejected = (make_instance(StudyInstanceUID=study, SeriesInstanceUID=f"{study}.5",
                                    SOPInstanceUID=f"{study}.5.{n}") for n in (1, 2))
    for data in (kept, rejected):
        services.ingest.store_bytes(data)
    note = make_rejection_note([uids(rejected)], SeriesInstanceUID=note_series,
                               SOPInstanceUID=f"{note_series}.1")
    services.ingest.store_bytes(note)
    drain(services)
    assert key_of(rejected) not in set(store.keys())  # the note removed it
    store.put(key_of(rejected), io.BytesIO(rejected), len(rejected))  # a crash left it
    services.close()
    keys = sorted(store.keys())
    first = keys.index(key_of(note)) < keys.index(key_of(rejected))
    assert first == note_series.endswith(".0")

    report = rebuild(settings.index_path, store, AnalyserPool(0))

    # Hidden by the previous index's tombstone (removed), or else by the note applied
    # again (rejected): once either way.
    assert (report.undated, report.indexed, report.removed + report.rejected) == (3, 2, 1)
    rebuilt = dump(settings.index_path)
    assert set(rebuilt["instance"]) == {uids(kept)[2], uids(note)[2]}
    assert {sop: row["reason_code"] for sop, row in rebuilt["tombstone"].items()} == {
        uids(rejected)[2]: "113001"}
    assert sorted(store.keys()) == keys  # nothing deleted
    repaired = build(settings, store=store)
    try:
        assert [f.problem for f in reconcile(repaired).findings] == [Problem.REMOVED]
        assert reconcile(repaired, repair=True).ok
        assert key_of(rejected) not in set(store.keys())
    finally:
        repaired.close()
