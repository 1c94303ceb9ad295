"""QIDO-RS and C-FIND give the same answers: one engine behind both edges
(docs/architecture.md: "If C-FIND and QIDO-RS disagree on the same data, that is a bug").

The same archive is queried through a real pynetdicom SCU against our SCP (started
in-process) and through falcon's test client; each query must return the same UIDs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from falcon import testing
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

from adapters.dicomweb.app import create_app
from pacs.core.services import Services
from pacs.dimse import server
from tests.conftest import free_port
from tests.service.sample_studies import OT_CLASS, Archive, load

pytestmark = pytest.mark.dimse

#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

UID_OF_LEVEL = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                "IMAGE": "SOPInstanceUID"}
QIDO_KEY = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}


@dataclass(frozen=True)
class Case:
    """One query, as a C-FIND identifier and as a QIDO-RS request."""

    name: str
    level: str
    keys: dict[str, str]
    path: str
    query: str
    relational: bool = False


def cases(a: Archive) -> list[Case]:
    chest, head, knee = a["chest"], a["head"], a["knee"]
    ct = chest.series[0]
    return [
        Case("all studies", "STUDY", {}, "/studies", ""),
        Case("name wildcard", "STUDY", {"PatientName": "DOE*"}, "/studies", "PatientName=DOE*"),
        Case("name case", "STUDY", {"PatientName": "doe^j*"}, "/studies",
             "PatientName=doe%5Ej%2A"),
        Case("name single char", "STUDY", {"PatientName": "D?E*"}, "/studies",
             "00100010=D%3FE*"),
        Case("non-ASCII name", "STUDY", {"PatientName": "Διον*"}, "/studies",
             "PatientName=%CE%94%CE%B9%CE%BF%CE%BD*"),
        Case("patient id", "STUDY", {"PatientID": "P1"}, "/studies", "PatientID=P1"),
        Case("date range", "STUDY", {"StudyDate": "20150101-20151231"}, "/studies",
             "StudyDate=20150101-20151231"),
        Case("open date range", "STUDY", {"StudyDate": "20160101-"}, "/studies",
             "StudyDate=20160101-"),
        Case("accession (required key unknown)", "STUDY", {"AccessionNumber": "ACC1"},
             "/studies", "AccessionNumber=ACC1"),
        Case("modalities in study", "STUDY", {"ModalitiesInStudy": "MR"}, "/studies",
             "ModalitiesInStudy=MR"),
        Case("modality list", "STUDY", {"ModalitiesInStudy": "SR\\OT"}, "/studies",
             "ModalitiesInStudy=SR%5COT"),
        Case("uid list", "STUDY", {"StudyInstanceUID": f"{chest.uid}\\{knee.uid}"}, "/studies",
             f"StudyInstanceUID={chest.uid},{knee.uid}"),
        Case("description wildcard", "STUDY", {"StudyDescription": "*e*"}, "/studies",
             "StudyDescription=*e*"),
        Case("relational modality", "STUDY", {"Modality": "SR"}, "/studies", "Modality=SR",
             relational=True),
        Case("series of a study", "SERIES", {"StudyInstanceUID": chest.uid},
             f"/studies/{chest.uid}/series", ""),
        Case("series by modality", "SERIES", {"StudyInstanceUID": chest.uid, "Modality": "CT"},
             f"/studies/{chest.uid}/series", "Modality=CT"),
        Case("series everywhere", "SERIES", {"Modality": "MR"}, "/series", "Modality=MR"),
        Case("series number", "SERIES", {"SeriesNumber": "2"}, "/series", "SeriesNumber=2"),
        Case("instances of a series", "IMAGE",
             {"StudyInstanceUID": chest.uid, "SeriesInstanceUID": ct.uid},
             f"/studies/{chest.uid}/series/{ct.uid}/instances", ""),
        Case("instance number", "IMAGE",
             {"StudyInstanceUID": chest.uid, "SeriesInstanceUID": ct.uid, "InstanceNumber": "2"},
             f"/studies/{chest.uid}/series/{ct.uid}/instances", "InstanceNumber=2"),
        Case("instances of a study", "IMAGE", {"StudyInstanceUID": head.uid},
             f"/studies/{head.uid}/instances", ""),
        Case("sop class everywhere", "IMAGE", {"SOPClassUID": OT_CLASS}, "/instances",
             f"SOPClassUID={OT_CLASS}"),
    ]


@pytest.fixture
def archive(services: Services) -> Archive:
    return load(services)


@pytest.fixture
def scp(services: Services) -> Iterator[int]:
    port = free_port()
    node = server.start(services, ("127.0.0.1", port))
    yield port
    server.stop(node, drain=1.0)


@pytest.fixture
def qido(services: Services, archive: Archive) -> testing.TestClient:
    return testing.TestClient(create_app(services))


def c_find(port: int, ae_title: str, case: Case) -> set[str]:
    """The UIDs a Study Root C-FIND returns for ``case``."""
    ae = AE(ae_title="ONE_ENGINE")
    ae.add_requested_context(STUDY_ROOT_FIND)
    negotiation: list[Any] = []
    if case.relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_ROOT_FIND
        item.service_class_application_information = b"\x01"
        negotiation.append(item)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, ext_neg=negotiation or None)
    assert assoc.is_established
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = case.level
    setattr(identifier, UID_OF_LEVEL[case.level], "")
    for keyword, value in case.keys.items():
        setattr(identifier, keyword, value)
    found: set[str] = set()
    try:
        for status, answer in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if answer is not None and status.Status in (0xFF00, 0xFF01):
                found.add(str(answer[UID_OF_LEVEL[case.level]].value))
    finally:
        assoc.release()
    return found


def qido_uids(client: testing.TestClient, case: Case) -> set[str]:
    result = client.simulate_get(case.path, query_string=case.query)
    assert result.status_code == 200, result.text
    return {item[QIDO_KEY[case.level]]["Value"][0] for item in result.json}


def test_qido_and_c_find_return_the_same_uids(services: Services, archive: Archive, scp: int,
                                              qido: testing.TestClient) -> None:
    disagreements = []
    for case in cases(archive):
        by_dimse = c_find(scp, services.settings.ae_title, case)
        by_qido = qido_uids(qido, case)
        if by_dimse != by_qido:
            disagreements.append(f"{case.name}: C-FIND {sorted(by_dimse)} != QIDO "
                                 f"{sorted(by_qido)}")
    assert not disagreements, "\n".join(disagreements)


def test_cases_are_not_trivial(archive: Archive, qido: testing.TestClient) -> None:
    """Each case selects some but (except the universal ones) not all entities."""
    sizes = {case.name: len(qido_uids(qido, case)) for case in cases(archive)}
    assert all(sizes.values()), sizes
    assert sizes["name wildcard"] == 3 and sizes["relational modality"] == 1
    assert sizes["non-ASCII name"] == 1 and sizes["accession (required key unknown)"] == 2


def _names_by_c_find(port: int, ae_title: str, level: str, keys: dict[str, str]
                     ) -> dict[str, str]:
    ae = AE(ae_title="ONE_ENGINE")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.PatientName = ""
    setattr(identifier, UID_OF_LEVEL[level], "")
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        return {str(answer[UID_OF_LEVEL[level]].value): str(answer.PatientName)
                for status, answer in assoc.send_c_find(identifier, STUDY_ROOT_FIND)
                if answer is not None and status.Status == 0xFF00}
    finally:
        assoc.release()


def _names_by_qido(client: testing.TestClient, level: str, query: str) -> dict[str, str]:
    path = {"STUDY": "/studies", "SERIES": "/series", "IMAGE": "/instances"}[level]
    result = client.simulate_get(path, query_string=query + "&includefield=00100010")
    assert result.status_code == 200, result.text
    return {item[QIDO_KEY[level]]["Value"][0]: item["00100010"]["Value"][0]["Alphabetic"]
            for item in result.json}


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
@pytest.mark.parametrize("keys, query, names", [
    ({"PatientID": "P9"}, "PatientID=P9", {"OLD^NAME", "NEW^NAME"}),
    ({"PatientName": "old*"}, "PatientName=old*", {"OLD^NAME"}),
    ({"PatientBirthDate": "1971"}, "PatientBirthDate=1971", {"NEW^NAME"}),
])
def test_both_answer_each_study_with_its_own_patient_attributes(
        services: Services, scp: int, level: str, keys: dict[str, str], query: str,
        names: set[str]) -> None:
    """Two studies of one Patient ID sent under different names (PS3.4 C.3.2)."""
    from tests.factory import make_instance

    for n, (name, birth) in enumerate((("OLD^NAME", "19700101"), ("NEW^NAME", "19710202"))):
        services.ingest.store_bytes(make_instance(
            PatientID="P9", PatientName=name, PatientBirthDate=birth,
            StudyInstanceUID=f"1.2.9.{n}", SeriesInstanceUID=f"1.2.9.{n}.1",
            SOPInstanceUID=f"1.2.9.{n}.1.1"))
    by_dimse = _names_by_c_find(scp, services.settings.ae_title, level, keys)
    by_qido = _names_by_qido(testing.TestClient(create_app(services)), level, query)
    assert by_dimse == by_qido
    assert set(by_dimse.values()) == names and len(by_dimse) == len(names)
