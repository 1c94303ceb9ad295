"""C-FIND with dcmtk's findscu against ``pacs serve``, on data whose answers are known,
and the same queries against dcmtk's own ``dcmqrscp`` where the standard is unambiguous.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from tests.conftest import start_listening
from tests.factory import make_instance, uid_list_of_length
from tests.interop.conftest import AE_TITLE, DCMTK_ENV, Node, dcmtk, run_dcmtk

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

CHARSET_DIR = Path(pydicom.__file__).parent / "data" / "charset_files"
#: One file per object (the *Multi / ExplicitIR6 variants repeat a SOP Instance UID).
CHARSET_FILES = ["chrArab.dcm", "chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm",
                 "chrH32.dcm", "chrHbrw.dcm", "chrI2.dcm", "chrJapMulti.dcm",
                 "chrKoreanMulti.dcm", "chrRuss.dcm", "chrX1.dcm", "chrX2.dcm"]


@dataclass(frozen=True)
class Spec:
    """One generated instance: what the index must answer about it."""

    patient_id: str
    name: str
    study: str
    date: str
    accession: str
    series: str
    modality: str
    sop: str


def _specs() -> list[Spec]:
    rows = [("PA", "DOE^JOHN", "20150101", "AC1", ["CT", "MR"]),
            ("PA", "DOE^JOHN", "20160202", "AC2", ["CT"]),
            ("PB", "DOE^JANE", "20150710", "AC3", ["PT", "CT"]),
            ("PC", "ROE^RICHARD", "20101231", "AC-4", ["US"]),
            ("PD", "SMITH^ANNA", "20240229", "AC5", ["MR", "SR"])]
    specs = []
    for n, (pid, name, date, accession, modalities) in enumerate(rows, start=1):
        study = f"1.2.826.0.1.3680043.10.543.77.{n}"
        for s, modality in enumerate(modalities, start=1):
            for i in range(1, 3):
                specs.append(Spec(pid, name, study, date, accession, f"{study}.{s}", modality,
                                  f"{study}.{s}.{i}"))
    return specs


SPECS = _specs()


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for spec in SPECS:
        (folder / f"{spec.sop}.dcm").write_bytes(make_instance(
            PatientID=spec.patient_id, PatientName=spec.name, StudyInstanceUID=spec.study,
            StudyDate=spec.date, AccessionNumber=spec.accession,
            SeriesInstanceUID=spec.series, Modality=spec.modality, SOPInstanceUID=spec.sop,
            SpecificCharacterSet=None))


class Finder:
    """Runs findscu with a query data set against one SCP; returns the responses."""

    def __init__(self, port: int, aet: str, work: Path) -> None:
        self.port, self.aet, self.work = port, aet, work
        self.count = 0

    def __call__(self, model: str, level: str, *options: str, **keys: object
                 ) -> list[Dataset]:
        """The responses to a query of ``keys`` (findscu's ``options`` added)."""
        self.count += 1
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        folder = self.work / f"q{self.count}"
        folder.mkdir(parents=True)
        query_file = folder / "query.dcm"
        query.save_as(query_file, implicit_vr=False, little_endian=True)
        result = run_dcmtk("findscu", "-" + model, *options, "-aec", self.aet, "-X", "-od",
                           str(folder), "127.0.0.1", str(self.port), str(query_file))
        assert result.returncode == 0, result.stdout
        return [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("find-inputs")
    _write_inputs(folder / "generated")
    (folder / "charsets").mkdir()
    for name in CHARSET_FILES:
        shutil.copy(CHARSET_DIR / name, folder / "charsets" / name)
    return folder


@pytest.fixture(scope="module")
def pacs_find(node_factory: Callable[..., Node], inputs: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Finder:
    node = node_factory("find")
    for sub in ("generated", "charsets"):
        sent = run_dcmtk("storescu", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(node.port),
                         str(inputs / sub))
        assert sent.returncode == 0, sent.stdout
    return Finder(node.port, AE_TITLE, tmp_path_factory.mktemp("pacs-rsp"))


@pytest.fixture(scope="module")
def dcmqrscp_find(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finder]:
    """dcmtk's reference Q/R SCP holding the generated instances."""
    root = tmp_path_factory.mktemp("dcmqrscp")
    (root / "db").mkdir()

    def start(port: int) -> subprocess.Popen[bytes]:
        (root / "qr.cfg").write_text(
            f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nDCMQRSCP {root / 'db'} RW (500, 1024mb) ANY\nAETable END\n")
        with open(root / "qr.log", "wb") as log:  # the child keeps its own
            return subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(root / "qr.cfg"),
                                     str(port)], env=DCMTK_ENV, stdout=log,
                                    stderr=subprocess.STDOUT)

    port, proc = start_listening(start)
    try:
        sent = run_dcmtk("storescu", "-aec", "DCMQRSCP", "+sd", "127.0.0.1", str(port),
                         str(inputs / "generated"))
        assert sent.returncode == 0, sent.stdout
        yield Finder(port, "DCMQRSCP", root)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _uids(responses: list[Dataset], keyword: str) -> set[str]:
    return {str(r.get(keyword)) for r in responses}


def _expected(keyword: str, predicate: Callable[[Spec], bool]) -> set[str]:
    attribute = {"StudyInstanceUID": "study", "SeriesInstanceUID": "series",
                 "SOPInstanceUID": "sop", "PatientID": "patient_id"}[keyword]
    return {getattr(s, attribute) for s in SPECS if predicate(s)}


def test_patient_root_every_level(pacs_find: Finder) -> None:
    patients = pacs_find("P", "PATIENT", PatientID="PA", PatientName="",
                         NumberOfPatientRelatedStudies="")
    assert _uids(patients, "PatientID") == {"PA"}
    assert patients[0].NumberOfPatientRelatedStudies == 2
    studies = pacs_find("P", "STUDY", PatientID="PA", StudyInstanceUID="")
    assert _uids(studies, "StudyInstanceUID") == _expected("StudyInstanceUID",
                                                           lambda s: s.patient_id == "PA")
    study = SPECS[0].study
    series = pacs_find("P", "SERIES", PatientID="PA", StudyInstanceUID=study,
                       SeriesInstanceUID="", Modality="")
    assert _uids(series, "SeriesInstanceUID") == _expected("SeriesInstanceUID",
                                                           lambda s: s.study == study)
    images = pacs_find("P", "IMAGE", PatientID="PA", StudyInstanceUID=study,
                       SeriesInstanceUID=f"{study}.1", SOPInstanceUID="")
    assert _uids(images, "SOPInstanceUID") == {f"{study}.1.1", f"{study}.1.2"}


#: (keys, predicate on the generated specs) for Study Root STUDY-level queries.
STUDY_QUERIES: list[tuple[dict[str, str], Callable[[Spec], bool]]] = [
    ({"PatientID": "PA"}, lambda s: s.patient_id == "PA"),
    ({"PatientName": "DOE*"}, lambda s: s.name.startswith("DOE")),
    ({"PatientName": "DOE^J?HN"}, lambda s: s.name == "DOE^JOHN"),
    ({"StudyDate": "20150101-20151231"}, lambda s: s.date.startswith("2015")),
    ({"StudyDate": "20160101-"}, lambda s: s.date >= "20160101"),
    ({"StudyDate": "-20101231"}, lambda s: s.date <= "20101231"),
    ({"AccessionNumber": "AC-4"}, lambda s: s.accession == "AC-4"),
    ({"StudyInstanceUID": f"{SPECS[0].study}\\{SPECS[-1].study}"},
     lambda s: s.study in (SPECS[0].study, SPECS[-1].study)),
]


@pytest.mark.parametrize("keys, predicate", STUDY_QUERIES)
def test_study_root_study_level(pacs_find: Finder, keys: dict[str, str],
                                predicate: Callable[[Spec], bool]) -> None:
    responses = pacs_find("S", "STUDY", **{"StudyInstanceUID": "", **keys})
    generated = {r.StudyInstanceUID for r in responses if r.StudyInstanceUID.startswith(
        "1.2.826.0.1.3680043.10.543.77.")}
    assert generated == _expected("StudyInstanceUID", predicate)


def test_study_root_series_and_image_levels(pacs_find: Finder) -> None:
    study = SPECS[-1].study
    series = pacs_find("S", "SERIES", StudyInstanceUID=study, Modality="SR",
                       SeriesInstanceUID="", NumberOfSeriesRelatedInstances="")
    assert _uids(series, "SeriesInstanceUID") == {f"{study}.2"}
    assert series[0].NumberOfSeriesRelatedInstances == 2
    images = pacs_find("S", "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2",
                       SOPInstanceUID="", InstanceNumber="")
    assert _uids(images, "SOPInstanceUID") == {f"{study}.2.1", f"{study}.2.2"}


@pytest.mark.parametrize(("proposed", "length"), [
    # Over 64 KB in Explicit VR: findscu sends the list as UN, a UI element's 16-bit
    # length cannot hold it (PS3.5 6.2.2).
    pytest.param("-xe", 70_000, id="explicit-over-64KB"),
    # In Implicit VR the first element's length (0x5344) has the bytes of a VR, "DS".
    pytest.param("-xi", 0x5344, id="implicit-length-spells-DS"),
])
def test_a_uid_list_in_either_vr_encoding(pacs_find: Finder, proposed: str,
                                          length: int) -> None:
    """An IMAGE-level query by a list of SOP Instance UIDs (its first element) finds
    exactly the listed instances, the first and the last of the list included."""
    wanted = [SPECS[0].sop, SPECS[-1].sop]
    uids = [*uid_list_of_length(wanted[:1], length - len(wanted[1]) - 1), wanted[1]]
    images = pacs_find("S", "IMAGE", proposed, SOPInstanceUID=uids)
    assert sorted(str(image.SOPInstanceUID) for image in images) == sorted(wanted)


def test_computed_study_attributes(pacs_find: Finder) -> None:
    study = SPECS[0].study
    [response] = pacs_find("S", "STUDY", StudyInstanceUID=study, ModalitiesInStudy="",
                           NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                           SOPClassesInStudy="")
    assert list(response.ModalitiesInStudy) == ["CT", "MR"]
    assert response.NumberOfStudyRelatedSeries == 2
    assert response.NumberOfStudyRelatedInstances == 4
    assert response.SOPClassesInStudy == "1.2.840.10008.5.1.4.1.1.2"
    assert response.RetrieveAETitle == AE_TITLE


@pytest.mark.parametrize("charset, query_name, expected_file", [
    ("ISO_IR 100", "Buc^Jérôme", "chrFren.dcm"),
    ("ISO_IR 100", "äneas*", "chrGerm.dcm"),          # PN matching is case-insensitive
    ("ISO_IR 126", "Διονυσιος", "chrGreek.dcm"),
    ("ISO_IR 144", "Люкceмбypг", "chrRuss.dcm"),  # noqa: RUF001 - the Cyrillic name of the sample file
    ("ISO_IR 138", "שרון^דבורה", "chrHbrw.dcm"),
    ("ISO_IR 127", "قباني^لنزار", "chrArab.dcm"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou", "chrH31.dcm"),
    (["", "ISO 2022 IR 87"], "=山田^太郎", "chrH31.dcm chrH32.dcm"),  # same ideographic name
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "chrI2.dcm"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東", "chrX1.dcm"),
    ("GB18030", "Wang^XiaoDong=王^小东", "chrX2.dcm"),
    ("ISO_IR 192", "김희중", "chrKoreanMulti.dcm"),
])
def test_person_names_in_character_sets(pacs_find: Finder, charset: str | list[str],
                                        query_name: str, expected_file: str) -> None:
    """The query is encoded in its character set by pydicom and decoded by the node; the
    answer comes back in a character set that represents the stored name."""
    stored = [pydicom.dcmread(CHARSET_DIR / name) for name in expected_file.split()]
    responses = pacs_find("S", "STUDY", SpecificCharacterSet=charset, PatientName=query_name,
                          StudyInstanceUID="")
    assert {r.StudyInstanceUID for r in responses} == {s.StudyInstanceUID for s in stored}
    assert {str(r.PatientName) for r in responses} == {str(s.PatientName) for s in stored}


@pytest.mark.parametrize("charset, patient_id, stored_file", [
    ("ISO_IR 100", "SCSRUSS", "chrRuss.dcm"),
    ("ISO 2022 IR 6", "SCSGERM", "chrGerm.dcm"),   # the default repertoire is ASCII
    ("ISO_IR 6", "SCSFREN", "chrFren.dcm"),
    ("ISO_IR 13", "H31EXAMPLE", "chrH31.dcm"),     # JIS X 0201 holds no kanji
    ("ISO_IR 13", "H32EXAMPLE", "chrH32.dcm"),
])
def test_answers_in_utf8_when_the_request_charset_cannot_represent_them(
        pacs_find: Finder, charset: str, patient_id: str, stored_file: str) -> None:
    """PS3.4 C.4.1.1.3.2, PS3.5 6.1: the bytes sent are those of the character set the
    response names (pydicom's codecs would write Latin-1 as ISO-IR 6, Shift-JIS kanji as
    ISO-IR 13)."""
    stored = pydicom.dcmread(CHARSET_DIR / stored_file)
    [response] = pacs_find("S", "STUDY", SpecificCharacterSet=charset,
                           PatientID=patient_id, PatientName="", StudyInstanceUID="")
    assert response.SpecificCharacterSet == "ISO_IR 192"
    sent = response.get_item("PatientName").value
    assert sent.rstrip(b" ") == str(stored.PatientName).encode("utf-8")


@pytest.mark.parametrize("keys", [keys for keys, _ in STUDY_QUERIES] + [
    {"PatientID": "P*"}, {"AccessionNumber": "AC?"},
    # Study Root: Patient ID is a Required Key of the Study level (PS3.4 C.6.2.1)
    {"PatientID": "P?"}, {"PatientID": "?A"}, {"PatientID": "P*D"}])
def test_same_answers_as_dcmqrscp(pacs_find: Finder, dcmqrscp_find: Finder,
                                  keys: dict[str, str]) -> None:
    keys = {"StudyInstanceUID": "", **keys}
    ours = {r.StudyInstanceUID for r in pacs_find("S", "STUDY", **keys)
            if r.StudyInstanceUID.startswith("1.2.826.0.1.3680043.10.543.77.")}
    reference = _uids(dcmqrscp_find("S", "STUDY", **keys), "StudyInstanceUID")
    assert ours == reference


def test_series_answers_match_dcmqrscp(pacs_find: Finder, dcmqrscp_find: Finder) -> None:
    for spec_study in sorted({s.study for s in SPECS}):
        keys = {"StudyInstanceUID": spec_study, "SeriesInstanceUID": "", "Modality": "CT"}
        assert _uids(pacs_find("S", "SERIES", **keys), "SeriesInstanceUID") == _uids(
            dcmqrscp_find("S", "SERIES", **keys), "SeriesInstanceUID")


def test_a900_for_keys_below_the_level(pacs_find: Finder) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.SOPInstanceUID = ""
    path = pacs_find.work / "bad.dcm"
    query.save_as(path, implicit_vr=False, little_endian=True)
    result = run_dcmtk("findscu", "-v", "-S", "-aec", AE_TITLE, "127.0.0.1",
                       str(pacs_find.port), str(path))
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stdout, result.stdout  # A900



# --- patient attributes are attributes of studies (PS3.4 C.3.2) --------------------------

#: Two studies of Patient ID PX, sent one after the other, each under its own name.
OWN_STUDIES = {
    "1.2.826.0.1.3680043.10.543.78.1": ("OLD^NAME", "19700101", "F", "AX1"),
    "1.2.826.0.1.3680043.10.543.78.2": ("NEW^NAME", "19710202", "M", "AX2"),
}


@pytest.fixture(scope="module")
def own_names(node_factory: Callable[..., Node],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Node, Finder]:
    node = node_factory("own-names")
    work = tmp_path_factory.mktemp("own-names")
    for study, (name, birth, sex, accession) in OWN_STUDIES.items():
        folder = work / accession
        folder.mkdir()
        for i in (1, 2):
            (folder / f"{i}.dcm").write_bytes(make_instance(
                PatientID="PX", PatientName=name, PatientBirthDate=birth, PatientSex=sex,
                AccessionNumber=accession, StudyInstanceUID=study,
                SeriesInstanceUID=f"{study}.1", SOPInstanceUID=f"{study}.1.{i}",
                SpecificCharacterSet=None))
        sent = run_dcmtk("storescu", "-aec", AE_TITLE, "+sd", "127.0.0.1", str(node.port),
                         str(folder))
        assert sent.returncode == 0, sent.stdout
    return node, Finder(node.port, AE_TITLE, work / "rsp")


def _own(study: str) -> tuple[str, str, str, str]:
    name, birth, sex, _ = OWN_STUDIES[study]
    return study, name, birth, sex


@pytest.mark.parametrize("level, unique, per_study", [
    ("STUDY", "StudyInstanceUID", 1), ("SERIES", "SeriesInstanceUID", 1),
    ("IMAGE", "SOPInstanceUID", 2)])
def test_study_root_answers_each_study_with_its_own_patient_attributes(
        own_names: tuple[Node, Finder], level: str, unique: str, per_study: int) -> None:
    _, find = own_names
    responses = find("S", level, **{"PatientID": "PX", "StudyInstanceUID": "",
                                    "PatientName": "", "PatientBirthDate": "",
                                    "PatientSex": "", unique: ""})
    found = sorted((str(r.StudyInstanceUID), str(r.PatientName), r.PatientBirthDate,
                    r.PatientSex) for r in responses)
    assert found == sorted(_own(study) for study in OWN_STUDIES for _ in range(per_study))


@pytest.mark.parametrize("keys, study", [
    ({"PatientName": "OLD^NAME"}, "1.2.826.0.1.3680043.10.543.78.1"),
    ({"PatientName": "new*"}, "1.2.826.0.1.3680043.10.543.78.2"),
    ({"PatientBirthDate": "19700101"}, "1.2.826.0.1.3680043.10.543.78.1"),
    ({"PatientSex": "M"}, "1.2.826.0.1.3680043.10.543.78.2"),
])
def test_study_root_matches_patient_keys_on_each_studys_own_values(
        own_names: tuple[Node, Finder], keys: dict[str, str], study: str) -> None:
    _, find = own_names
    responses = find("S", "STUDY", **{"StudyInstanceUID": "", "PatientName": "", **keys})
    assert [(str(r.StudyInstanceUID), str(r.PatientName)) for r in responses] == [
        _own(study)[:2]]


def test_patient_root_patient_level_answers_the_latest_values(
        own_names: tuple[Node, Finder]) -> None:
    _, find = own_names
    responses = find("P", "PATIENT", PatientID="PX", PatientName="", PatientSex="",
                     NumberOfPatientRelatedStudies="")
    assert [(str(r.PatientName), r.PatientSex, r.NumberOfPatientRelatedStudies)
            for r in responses] == [("NEW^NAME", "M", 2)]


@pytest.mark.parametrize("path, per_study", [("studies", 1), ("series", 1),
                                             ("instances", 2)])
def test_qido_answers_each_study_with_its_own_patient_attributes(
        own_names: tuple[Node, Finder], path: str, per_study: int) -> None:
    node, _ = own_names
    response = requests.get(f"{node.web_url()}/{path}", timeout=60, params={
        "PatientID": "PX", "includefield": "0020000D,00100010,00100030,00100040"})
    assert response.status_code == 200, response.text
    found = sorted((item["0020000D"]["Value"][0],
                    item["00100010"]["Value"][0]["Alphabetic"],
                    item["00100030"]["Value"][0], item["00100040"]["Value"][0])
                   for item in response.json())
    assert found == sorted(_own(study) for study in OWN_STUDIES for _ in range(per_study))
    response = requests.get(f"{node.web_url()}/{path}", timeout=60,
                            params={"PatientName": "OLD*", "includefield": "0020000D"})
    assert response.status_code == 200, response.text
    assert {item["0020000D"]["Value"][0] for item in response.json()} == {
        "1.2.826.0.1.3680043.10.543.78.1"}


def test_wado_metadata_carries_each_studys_own_patient_attributes(
        own_names: tuple[Node, Finder]) -> None:
    node, _ = own_names
    for study in OWN_STUDIES:
        response = requests.get(f"{node.web_url()}/studies/{study}/metadata", timeout=60)
        assert response.status_code == 200, response.text
        assert {(item["0020000D"]["Value"][0], item["00100010"]["Value"][0]["Alphabetic"],
                 item["00100030"]["Value"][0], item["00100040"]["Value"][0])
                for item in response.json()} == {_own(study)}
