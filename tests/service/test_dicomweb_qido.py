"""QIDO-RS through falcon's test client over real services (index, ingest, engine).

What OHIF and dicomweb-client send (research/dicomweb.md, shared/ohif/requests) and
what PS3.18 10.6 asks of the answers.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from falcon import testing

from adapters.dicomweb.app import create_app
from adapters.http import CLIENT_GONE
from pacs.core.index.compiler import MAX_TERMS, MAX_UIDS
from pacs.core.services import Services
from tests.service.sample_studies import Archive, load

JSON = "application/dicom+json"

#: JSON keys of PS3.18 Table 10.6.3-3 (study defaults) that the index holds or computes.
STUDY_DEFAULT_KEYS = {
    "00080005", "00080020", "00080030", "00080050", "00080056", "00080061", "00080090",
    "00080201", "00081190", "00100010", "00100020", "00100030", "00100040", "0020000D",
    "00200010", "00201206", "00201208",
}
#: Table 10.6.3-4 (series defaults), without the Request Attributes Sequence.
SERIES_DEFAULT_KEYS = {"00080005", "00080060", "00080201", "0008103E", "00081190", "0020000E",
                       "00200011", "00201209", "00400244", "00400245"}
#: Table 10.6.3-5 (instance defaults).
INSTANCE_DEFAULT_KEYS = {"00080005", "00080016", "00080018", "00080056", "00080201",
                         "00081190", "00200013", "00280010", "00280011", "00280100",
                         "00280008"}


@pytest.fixture
def archive(services: Services) -> Archive:
    return load(services)


@pytest.fixture
def client(services: Services, archive: Archive) -> testing.TestClient:
    return testing.TestClient(create_app(services))


Get = Callable[..., testing.Result]


@pytest.fixture
def get(client: testing.TestClient) -> Get:
    """GET with a raw query string (exactly as a client encodes it)."""
    def run(path: str, query: str = "", **kwargs: Any) -> testing.Result:
        return client.simulate_get(path, query_string=query, **kwargs)

    return run


def values(result: testing.Result, key: str) -> list[Any]:
    """The first value of ``key`` in each returned object."""
    assert result.status_code == 200, result.text
    return [item[key]["Value"][0] for item in result.json if "Value" in item[key]]


def study_uids(result: testing.Result) -> set[str]:
    return set(values(result, "0020000D"))


# --- the answer's form -------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/dicom-web"])
def test_studies_answer_is_dicom_json_at_both_roots(get: Get, archive: Archive,
                                                    prefix: str) -> None:
    result = get(f"{prefix}/studies")
    assert result.status_code == 200
    assert result.headers["Content-Type"] == JSON
    assert study_uids(result) == {s.uid for s in archive.studies.values()}
    assert result.headers.get("Cross-Origin-Resource-Policy") == "same-site"


def test_study_defaults_and_computed_attributes(get: Get, archive: Archive) -> None:
    chest = archive["chest"]
    (item,) = get("/studies", f"StudyInstanceUID={chest.uid}").json
    assert set(item) >= STUDY_DEFAULT_KEYS
    assert item["00080061"] == {"vr": "CS", "Value": ["CT", "SR"]}
    assert item["00201206"] == {"vr": "IS", "Value": [2]}
    assert item["00201208"] == {"vr": "IS", "Value": [4]}
    assert item["00080005"]["Value"] == ["ISO_IR 192"]
    assert item["00080056"]["Value"] == ["ONLINE"]
    assert item["00081190"]["Value"][0].endswith(f"/studies/{chest.uid}")
    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    # Empty and unknown values have no "Value" (PS3.18 F.2.5).
    assert item["00080090"] == {"vr": "PN"}
    assert list(item) == sorted(item), "keys in tag order"


def test_person_name_groups_and_utf8(get: Get, archive: Archive) -> None:
    result = get("/studies", "PatientID=P3")
    assert "Διονύσιος".encode() in result.content  # UTF-8, not \\u escapes
    (item,) = result.json
    assert item["00100010"]["Value"] == [{"Alphabetic": "Διονύσιος^Ανδρέας",
                                          "Ideographic": "山田^太郎",
                                          "Phonetic": "やまだ^たろう"}]


def test_numbers_are_json_numbers(get: Get, archive: Archive) -> None:
    chest = archive["chest"]
    series = get(f"/studies/{chest.uid}/series").json
    assert sorted(s["00200011"]["Value"][0] for s in series) == [1, 2]
    assert sorted(s["00201209"]["Value"][0] for s in series) == [1, 3]
    instances = get(f"/studies/{chest.uid}/series/{chest.series[0].uid}/instances").json
    assert {i["00280010"]["Value"][0] for i in instances} == {128}
    assert sorted(i["00200013"]["Value"][0] for i in instances) == [1, 2, 3]


# --- matching: the same rules as C-FIND -------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("PatientID=P1", {"chest", "head"}),
    ("00100020=P1", {"chest", "head"}),  # by tag, as OHIF sends PatientID
    ("PatientName=DOE*", {"chest", "head", "knee"}),  # PN is case-insensitive
    ("PatientName=doe%2A", {"chest", "head", "knee"}),  # %2A is *
    ("PatientName=D?E^J*", {"chest", "head", "knee"}),
    ("PatientName=SMITH^ANNA", {"blank"}),
    ("StudyDate=20150101-20151231", {"chest", "knee", "blank"}),  # empty date matches
    ("StudyDate=20160101-", {"head", "greek", "blank"}),
    ("StudyDate=-20150310", {"chest", "blank"}),
    ("AccessionNumber=ACC1", {"chest", "blank"}),  # a required key unknown: matches
    ("StudyDescription=*chest*", {"chest"}),
    ("ModalitiesInStudy=CT", {"chest", "greek"}),
    ("00080061=MR", {"head", "knee"}),
    ("Modality=SR", {"chest"}),  # relational: a study with an SR series
    ("SOPClassUID=1.2.840.10008.5.1.4.1.1.7", {"blank"}),
    ("PatientName=", {"chest", "head", "knee", "greek", "blank"}),  # universal
    ("PatientName=*", {"chest", "head", "knee", "greek", "blank"}),
])
def test_study_matching(get: Get, archive: Archive, query: str, expected: set[str]) -> None:
    assert study_uids(get("/studies", query)) == {archive[n].uid for n in expected}


def test_a_backslash_in_a_text_value_of_one_value_is_a_character(
        get: Get, services: Services, archive: Archive) -> None:
    """LT, ST and UT hold one value, in which a backslash is a character (PS3.5 Table
    6.2-1): matched as written, not as a list of alternatives."""
    from tests.factory import make_instance

    stored = services.ingest.store_bytes(make_instance(
        PatientID="LT1", PatientComments="left\\right"))
    found = get("/studies", "PatientComments=left%5Cright").json
    assert [s["0020000D"]["Value"][0] for s in found] == [stored.study_uid]
    assert get("/studies", "PatientComments=left").json == []
    assert len(get("/studies", "PatientComments=left%5C*").json) == 1


def test_a_study_s_computed_key_matches_its_study_at_series_and_instance_level(
        get: Get, archive: Archive) -> None:
    """ModalitiesInStudy and SOPClassesInStudy are the study's (PS3.4 Table C.3-1):
    matched in a series or instance search, they find every series and instance of a
    study that has the value, not the entity's own Modality or SOP Class."""
    chest = archive["chest"].uid  # a CT series and an SR series
    series = {s["0020000E"]["Value"][0] for s in get(f"/studies/{chest}/series").json}
    assert len(series) == 2
    found = get("/series", "ModalitiesInStudy=SR").json
    assert {s["0020000E"]["Value"][0] for s in found} == series
    instances = get(f"/studies/{chest}/instances").json
    sr_class = next(i["00080016"]["Value"][0] for i in instances
                    if i["0020000E"]["Value"][0] in series)
    within = get(f"/studies/{chest}/instances", f"SOPClassesInStudy={sr_class}").json
    assert len(within) == len(instances)


@pytest.mark.parametrize("separator", [",", "%2C", "%5C", "\\"])
def test_uid_lists_with_comma_or_backslash(get: Get, archive: Archive, separator: str) -> None:
    uids = [archive["chest"].uid, archive["knee"].uid]
    result = get("/studies", f"StudyInstanceUID={separator.join(uids)}")
    assert study_uids(result) == set(uids)


def test_repeated_match_parameter_is_a_list(get: Get, archive: Archive) -> None:
    result = get("/studies", "PatientID=P2&PatientID=P3")
    assert study_uids(result) == {archive["knee"].uid, archive["greek"].uid}


def test_fuzzy_matching_is_a_prefix_of_any_name_component(get: Get, archive: Archive) -> None:
    assert study_uids(get("/studies", "PatientName=jo")) == set()
    result = get("/studies", "PatientName=jo&fuzzymatching=true")
    assert study_uids(result) == {archive["chest"].uid, archive["head"].uid}
    result = get("/studies", "PatientName=ann&fuzzymatching=true")
    assert study_uids(result) == {archive["blank"].uid}


def test_empty_value_matching(get: Get, archive: Archive) -> None:
    result = get("/studies", 'AccessionNumber=""&emptyvaluematching=true')
    assert study_uids(result) == {archive["blank"].uid}


def test_ohif_study_list_request(get: Get, archive: Archive) -> None:
    query = ("limit=101&offset=0&fuzzymatching=true"
             "&includefield=00081030%2C00080060%2C00080090%2C00100030")
    result = get("/dicom-web/studies", query, headers={"Accept": JSON})
    assert result.headers["Content-Type"] == JSON
    assert len(result.json) == 5
    assert all("00081030" in item for item in result.json)
    assert "Warning" not in result.headers
    filtered = get("/dicom-web/studies", "PatientName=*OHIF*&" + query)
    assert filtered.status_code == 200 and filtered.json == []


# --- includefield ---------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "includefield=StudyDescription&includefield=00081060",
    "includefield=StudyDescription,00081060",
    "includefield=StudyDescription%2C00081060",
    "includefield=00081030,NameOfPhysiciansReadingStudy",
])
def test_includefield_repeated_or_comma_list(get: Get, archive: Archive, query: str) -> None:
    items = get("/studies", query).json
    assert all({"00081030", "00081060"} <= set(item) for item in items)
    assert "00081030" not in get("/studies").json[0], "not a default attribute"


def test_includefield_all(get: Get, archive: Archive) -> None:
    item = get(f"/studies/{archive['chest'].uid}/series", "includefield=all").json[0]
    assert {"0008103E", "00180015", "00080070", "00100010", "00081030"} <= set(item)


def test_includefield_of_an_unindexed_attribute_is_ignored(get: Get, archive: Archive) -> None:
    result = get("/studies", "includefield=00181030,BodyPartThickness")
    assert result.status_code == 200 and len(result.json) == 5


# --- the six resources ------------------------------------------------------------------

def test_series_of_a_study_and_all_series(get: Get, archive: Archive) -> None:
    chest = archive["chest"]
    nested = get(f"/studies/{chest.uid}/series")
    assert set(values(nested, "0020000E")) == {s.uid for s in chest.series}
    assert all(set(item) >= SERIES_DEFAULT_KEYS for item in nested.json)
    assert all("00100010" not in item for item in nested.json)
    assert nested.json[0]["00081190"]["Value"][0].endswith(
        f"/studies/{chest.uid}/series/{nested.json[0]['0020000E']['Value'][0]}")
    everything = get("/series", "Modality=MR")
    assert set(values(everything, "0020000E")) == {
        se.uid for st, se in archive.all_series() if se.modality == "MR"}
    # Across studies, each series comes with its study's attributes (PS3.18 10.6.3.3).
    assert all((STUDY_DEFAULT_KEYS | SERIES_DEFAULT_KEYS) - {"00080056"} <= set(item)
               for item in everything.json)


def test_instances_at_three_depths(get: Get, archive: Archive) -> None:
    chest = archive["chest"]
    ct = chest.series[0]
    of_series = get(f"/studies/{chest.uid}/series/{ct.uid}/instances")
    assert set(values(of_series, "00080018")) == set(ct.instances)
    assert all(set(item) >= INSTANCE_DEFAULT_KEYS for item in of_series.json)
    url = of_series.json[0]["00081190"]["Value"][0]
    assert url.endswith(f"/studies/{chest.uid}/series/{ct.uid}/instances/"
                        f"{of_series.json[0]['00080018']['Value'][0]}")
    of_study = get(f"/dicom-web/studies/{chest.uid}/instances")
    assert set(values(of_study, "00080018")) == set(chest.instances)
    everything = get("/instances", "PatientID=P1&Modality=MR")
    assert set(values(everything, "00080018")) == set(archive["head"].instances)


def test_a_query_whose_client_hung_up_stops(get: Get, archive: Archive) -> None:
    """The server's watch of the connection (``environ[CLIENT_GONE]``) stops the
    query engine as a C-CANCEL does (503, for a client that is not there to read it)."""
    asked: list[int] = []

    def gone() -> bool:
        asked.append(1)
        return True

    assert get("/studies", extras={CLIENT_GONE: gone}).status_code == 503
    assert asked
    assert get("/studies", extras={CLIENT_GONE: lambda: False}).status_code == 200


def test_unknown_study_or_series_in_path_is_404(get: Get, archive: Archive) -> None:
    assert get("/studies/1.2.3.4/series").status_code == 404
    assert get("/studies/1.2.3.4/instances").status_code == 404
    chest, head = archive["chest"], archive["head"]
    # A series of another study is not a series of this one.
    path = f"/studies/{chest.uid}/series/{head.series[0].uid}/instances"
    assert get(path).status_code == 404
    # An existing study without matches is an empty answer, not a missing resource.
    result = get(f"/studies/{chest.uid}/series", "Modality=MR")
    assert result.status_code == 200 and result.json == []


# --- paging -----------------------------------------------------------------------------

def test_paging_is_stable_and_warns_when_cut(get: Get, archive: Archive) -> None:
    everything = [i["0020000D"]["Value"][0] for i in get("/studies").json]
    pages: list[str] = []
    for offset in range(0, 6, 2):
        result = get("/studies", f"limit=2&offset={offset}")
        pages += [i["0020000D"]["Value"][0] for i in result.json]
        remaining = 5 - offset - len(result.json)
        if remaining > 0:
            assert result.headers["Warning"] == (
                f'299 falconframework.org: "There are {remaining} additional results '
                f'that can be requested"')
        else:
            assert "Warning" not in result.headers
    assert pages == everything, "pages are disjoint, complete, in one order"
    assert get("/studies", "offset=5").json == []
    assert get("/studies", "offset=500").status_code == 200


def test_default_limit_and_maximum(make_services: Callable[..., Services]) -> None:
    services = make_services(qido_default_limit=2, query_max_rows=3)
    load(services)
    client = testing.TestClient(create_app(services))
    result = client.simulate_get("/studies")
    assert len(result.json) == 2 and "3 additional" in result.headers["Warning"]
    result = client.simulate_get("/studies", query_string="limit=100")
    assert len(result.json) == 3 and "2 additional" in result.headers["Warning"]


# --- client mistakes: 4xx with a reason, never 500 ----------------------------------------

@pytest.mark.parametrize("query, status", [
    ("limit=abc", 400),
    ("limit=0", 400),
    ("offset=-1", 400),
    ("offset=%C2%B2", 400),  # a superscript two: str.isdigit says yes, int() says no
    ("limit=%C2%B2", 400),
    ("offset=99999999999999999999999", 400),  # past SQLite's 64-bit integers
    ("offset=" + "9" * 5000, 400),
    ("offset=9223372036854775807", 200),  # the largest offset SQLite takes: nothing there
    ("fuzzymatching=maybe", 400),
    ("NotAKeyword=1", 400),
    ("FFFF0000=1", 400),
    ("BodyPartThickness=10", 400),  # a DICOM attribute we do not index
    ("ReferencedStudySequence.ReferencedSOPInstanceUID=1.2", 400),
    ("StudyDate=20150101-20140101", 400),
    ("StudyDate=2015-01-01", 400),
    ("includefield=NotAKeyword", 400),
    ("StudyInstanceUID=", 200),
    ("StudyInstanceUID=*", 200),
    ("StudyInstanceUID=not-a-uid", 400),  # as in the path: never a match, not understood
    ("StudyInstanceUID=1.2..3", 400),
    ("StudyInstanceUID=1.2.3,abc", 400),  # one bad UID of a list
    ("SeriesInstanceUID=1.02.3", 400),  # a leading zero (PS3.5 9.1)
    ("SOPInstanceUID=" + "1" * 65, 400),
    ("SOPClassUID=1.2.840.10008.5.1.4.1.1.2%5C1.2.3", 200),
    ("SpecificCharacterSet=ISO_IR%20100", 200),  # never matched (as in C-FIND)
])
def test_bad_parameters(get: Get, archive: Archive, query: str, status: int) -> None:
    result = get("/studies", query)
    assert result.status_code == status, result.text
    if status == 400:
        assert result.json["description"]


def test_more_values_than_a_query_may_hold_is_400(get: Get, archive: Archive) -> None:
    """A client error, refused before SQLite sees it: SQLite's own refusal was reported
    as 503 Index unavailable, with a Retry-After that only made clients send it again."""
    accessions = [f"ACC{n}" for n in range(MAX_TERMS)]
    fits = get("/studies", "AccessionNumber=" + "%5C".join(accessions))
    assert fits.status_code == 200
    assert {s.accession for s in archive.studies.values()} & set(accessions) == set(
        values(fits, "00080050"))
    for query in ("AccessionNumber=" + "%5C".join([*accessions, "ACC"]),
                  "StudyInstanceUID=" + ",".join(f"1.2.{n}" for n in range(MAX_UIDS + 1))):
        result = get("/studies", query)
        assert result.status_code == 400, result.text
        assert result.json["title"] == "Query too large"
        assert "a query may hold" in result.json["description"]
        assert "Retry-After" not in result.headers


def test_malformed_uid_in_path_is_400(get: Get, archive: Archive) -> None:
    result = get("/studies/not-a-uid/series")
    assert result.status_code == 400 and "valid UID" in result.json["description"]


def test_xml_only_is_not_acceptable(get: Get, archive: Archive) -> None:
    xml = get("/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status_code == 406
    for accept in ("*/*", "application/dicom+json, application/json",
                   "application/dicom+json; q=0.9, */*; q=0.1"):
        result = get("/studies", headers={"Accept": accept})
        assert result.status_code == 200 and result.headers["Content-Type"] == JSON
    # The same body under the name a client accepts (RFC 9110 12.5.1: q=0 rules a type
    # out, so DICOM JSON refused is not the label of the answer).
    for accept in ("application/json", "application/dicom+json;q=0, application/json",
                   "application/json, application/dicom+json;q=0.2",
                   "application/json, */*;q=0.1"):
        result = get("/studies", headers={"Accept": accept})
        assert result.status_code == 200, accept
        assert result.headers["Content-Type"] == "application/json", accept
        assert study_uids(result) == {s.uid for s in archive.studies.values()}
    # RFC 9110 12.5.1: the most specific range decides; q=0 refuses DICOM JSON, which
    # is all a search answers, whatever */* allows.
    for accept in ("application/dicom+json;q=0, */*;q=0.5",
                   "application/dicom+json; q=0, application/*"):
        assert get("/studies", headers={"Accept": accept}).status_code == 406, accept


#: Valid Accept values that allow DICOM JSON, spelled as RFC 9110 lets a client spell
#: them: type and subtype case-insensitive (8.3.1), empty list elements (5.6.1.2), a
#: quoted parameter value holding a comma (5.6.6).
JSON_SPELLINGS = ["APPLICATION/DICOM+JSON", "application/dicom+json,",
                  "application/dicom+json, ,*/*", 'application/dicom+json; foo="a,b"',
                  "Application/Json"]


@pytest.mark.parametrize("accept", JSON_SPELLINGS)
def test_every_spelling_of_dicom_json_is_acceptable(get: Get, archive: Archive,
                                                    accept: str) -> None:
    result = get("/studies", headers={"Accept": accept})
    assert result.status_code == 200, result.text
    assert result.headers["Content-Type"] == (
        "application/json" if accept.lower() == "application/json" else JSON)


@pytest.mark.parametrize("query, status", [
    ("accept=application/dicom%2Bxml", 406),
    ("accept=multipart/related%3B%20type%3D%22application/dicom%2Bxml%22", 406),
    ("accept=application/dicom%2Bjson", 200),
    ("accept=application/dicom+json", 200),  # the unencoded + reaches falcon as a space
    ("accept=application/json", 200),
    ("accept=application/dicom%2Bxml,%20application/dicom%2Bjson%3Bq%3D0.5", 200),
])
def test_accept_query_parameter_replaces_the_header(get: Get, archive: Archive, query: str,
                                                    status: int) -> None:
    """PS3.18 8.3.3.1: the parameter, when given, is what the client accepts; the
    header says the opposite here, and is not read."""
    header = JSON if status == 406 else "application/dicom+xml"
    result = get("/studies", query, headers={"Accept": header})
    assert result.status_code == status, result.text
    if status == 200:
        assert result.headers["Content-Type"] == (
            "application/json" if query == "accept=application/json" else JSON)
        assert study_uids(result) == {s.uid for s in archive.studies.values()}


def test_unknown_route_is_404(get: Get) -> None:
    assert get("/patients").status_code == 404
    assert get("/dicom-web/studies/1.2.3/frames").status_code == 404


# --- access and browsers ------------------------------------------------------------------

def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def guarded(make_services: Callable[..., Services]) -> Iterator[testing.TestClient]:
    services = make_services(web_user="alice", web_password="s3cret", web_token="tok-123")
    load(services)
    yield testing.TestClient(create_app(services))


@pytest.mark.parametrize("remote, authorization, status", [
    ("127.0.0.1", None, 200),
    ("::1", None, 200),
    ("::ffff:127.0.0.1", None, 200),
    ("10.1.2.3", None, 401),
    ("10.1.2.3", _basic("alice", "s3cret"), 200),
    ("10.1.2.3", _basic("alice", "wrong"), 401),
    ("10.1.2.3", _basic("bob", "s3cret"), 401),
    ("10.1.2.3", "Bearer tok-123", 200),
    ("10.1.2.3", "Bearer tok-12", 401),
    ("10.1.2.3", "Basic !!!", 401),
])
def test_access(guarded: testing.TestClient, remote: str, authorization: str | None,
                status: int) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    result = guarded.simulate_get("/studies", remote_addr=remote, headers=headers,
                                  protocol="https")  # other hosts: HTTPS only
    assert result.status_code == status
    if status == 401:
        assert "Basic" in result.headers["WWW-Authenticate"]
        assert "Bearer" in result.headers["WWW-Authenticate"]


def test_remote_without_configured_credentials_is_refused(client: testing.TestClient) -> None:
    result = client.simulate_get("/studies", remote_addr="192.168.1.20",
                                 headers={"Authorization": _basic("", "")}, protocol="https")
    assert result.status_code == 401


def test_open_on_purpose(make_services: Callable[..., Services]) -> None:
    client = testing.TestClient(create_app(make_services(web_open=True)))
    assert client.simulate_get("/studies", remote_addr="192.168.1.20").status_code == 200


def test_cors_preflight_and_exposed_headers(make_services: Callable[..., Services]) -> None:
    services = make_services(cors_origins=("http://viewer.example",),
                             web_user="alice", web_password="s3cret")
    load(services)
    client = testing.TestClient(create_app(services))
    origin = {"Origin": "http://viewer.example"}
    preflight = client.simulate_options("/dicom-web/studies", remote_addr="10.0.0.9", headers={
        **origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    assert "GET" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    result = client.simulate_get("/dicom-web/studies", query_string="limit=1",
                                 remote_addr="10.0.0.9", protocol="https",
                                 headers={**origin, "Authorization": _basic("alice", "s3cret")})
    assert result.status_code == 200
    assert result.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    exposed = result.headers["Access-Control-Expose-Headers"]
    assert {"Warning", "Content-Location", "Content-Range"} <= set(exposed.split(", "))
    assert result.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    # Errors carry CORS headers too, so a script can read the reason.
    refused = client.simulate_get("/dicom-web/studies", remote_addr="10.0.0.9", headers=origin,
                                  protocol="https")
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    other = client.simulate_get("/studies", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_by_default(get: Get) -> None:
    result = get("/studies", headers={"Origin": "http://viewer.example"})
    assert "Access-Control-Allow-Origin" not in result.headers


@pytest.mark.parametrize("open_node", [False, True])
def test_any_origin_reads_only_answers_to_credentials(
        make_services: Callable[..., Services], open_node: bool) -> None:
    """With ``PACS_CORS_ORIGINS=*`` a page of any origin may call with credentials,
    but never read what the node answers for where a request comes from alone (this
    host's loopback roles, or an open node): any page the user opens would read it."""
    services = make_services(cors_origins=("*",), web_user="alice", web_password="s3cret",
                             web_open=open_node)
    load(services)
    client = testing.TestClient(create_app(services))
    origin = {"Origin": "http://evil.example"}
    trusted = client.simulate_get("/dicom-web/studies", headers=origin)  # loopback
    assert trusted.status_code == 200 and trusted.json
    assert "Access-Control-Allow-Origin" not in trusted.headers
    assert "Access-Control-Expose-Headers" not in trusted.headers
    preflight = client.simulate_options("/dicom-web/studies", headers={
        **origin, "Access-Control-Request-Method": "GET"})
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    if open_node:
        return  # credentials are not looked at
    proven = client.simulate_get("/dicom-web/studies", headers={
        **origin, "Authorization": _basic("alice", "s3cret")})
    assert proven.status_code == 200 and proven.json
    assert proven.headers["Access-Control-Allow-Origin"] == "*"
    refused = client.simulate_get("/dicom-web/studies", remote_addr="10.0.0.9",
                                  protocol="https", headers=origin)
    assert refused.status_code == 401  # no data: its reason is readable
    assert refused.headers["Access-Control-Allow-Origin"] == "*"


def test_sequence_matching_and_items_in_series_results(tmp_path) -> None:
    """``RequestAttributesSequence.ScheduledProcedureStepID`` (PS3.18 8.3.4.1 attribute
    path; PS3.4 C.2.2.2.6), and the sequence among the series' default attributes
    (PS3.18 Table 10.6.3-4)."""
    import falcon.testing
    from pydicom.dataset import Dataset as Item

    from adapters.dicomweb.app import create_app
    from pacs.core import config
    from pacs.core.services import build
    from pacs.core.storage.memory import MemoryStore
    from tests.factory import make_instance

    settings = config.load(overrides={"PACS_DATA_DIR": str(tmp_path / "d"),
                                      "PACS_WEB_HOSTS": "falconframework.org"},
                           environ={}, env_file=None)
    services = build(settings, store=MemoryStore())
    try:
        for n, sps in enumerate(("SPS1", "SPS2")):
            item = Item()
            item.ScheduledProcedureStepID, item.RequestedProcedureID = sps, "RP1"
            services.ingest.store_bytes(make_instance(
                StudyInstanceUID="1.2.6", SeriesInstanceUID=f"1.2.6.{n}",
                SOPInstanceUID=f"1.2.6.{n}.1", RequestAttributesSequence=[item]))
        client = falcon.testing.TestClient(create_app(services))
        found = client.simulate_get(
            "/series", query_string="RequestAttributesSequence.ScheduledProcedureStepID=SPS2")
        assert found.status_code == 200, found.text
        assert [s["0020000E"]["Value"] for s in found.json] == [["1.2.6.1"]]
        items = found.json[0]["00400275"]
        assert items["vr"] == "SQ"
        assert items["Value"] == [{"00400009": {"vr": "SH", "Value": ["SPS2"]},
                                   "00401001": {"vr": "SH", "Value": ["RP1"]}}]
        by_tag = client.simulate_get("/series", query_string="00400275.00401001=RP1")
        assert len(by_tag.json) == 2
        unknown = client.simulate_get("/series", query_string="RequestAttributesSequence.X=1")
        assert unknown.status_code == 400
    finally:
        services.close()


def test_time_limit_counts_writing_the_json(services: Services, get: Get,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """PACS_QUERY_TIME_LIMIT bounds the whole request, the JSON rows included: 413."""
    from adapters.dicomweb import dicomjson

    row = dicomjson.Renderer.row

    def slow_row(self: dicomjson.Renderer, values: Any) -> Any:
        time.sleep(0.05)
        return row(self, values)

    assert len(get("/instances").json) > 6
    monkeypatch.setattr(dicomjson.Renderer, "row", slow_row)
    services.engine.time_limit = 0.3
    assert get("/instances").status_code == 413
    services.engine.time_limit = 30.0
    assert get("/instances").status_code == 200


# --- patient attributes are attributes of studies (PS3.4 C.3.2) --------------------------

def _two_names(services: Services) -> testing.TestClient:
    """Two studies of Patient ID P9, each sent with its own name, birth date and sex."""
    from tests.factory import make_instance

    for n, (name, birth, sex) in enumerate((("OLD^NAME", "19700101", "F"),
                                            ("NEW^NAME", "19710202", "M"))):
        for i in range(2):
            services.ingest.store_bytes(make_instance(
                PatientID="P9", PatientName=name, PatientBirthDate=birth, PatientSex=sex,
                StudyInstanceUID=f"1.2.9.{n}", SeriesInstanceUID=f"1.2.9.{n}.1",
                SOPInstanceUID=f"1.2.9.{n}.1.{i}", AccessionNumber=f"B{n}"))
    return testing.TestClient(create_app(services))


def _patient_of(item: dict[str, Any]) -> tuple[str, str, str, str]:
    return (item["00080050"]["Value"][0], item["00100010"]["Value"][0]["Alphabetic"],
            item["00100030"]["Value"][0], item["00100040"]["Value"][0])


_OWN = {"B0": ("B0", "OLD^NAME", "19700101", "F"), "B1": ("B1", "NEW^NAME", "19710202", "M")}


@pytest.mark.parametrize("path, per_study", [
    ("/studies", 1), ("/series", 1), ("/instances", 2),
    ("/studies/1.2.9.0/series", 1), ("/studies/1.2.9.1/instances", 2),
])
def test_each_study_answers_with_its_own_patient_attributes(services: Services, path: str,
                                                            per_study: int) -> None:
    client = _two_names(services)
    result = client.simulate_get(path, query_string=(
        "includefield=00080050,00100010,00100030,00100040"))
    assert result.status_code == 200, result.text
    found = sorted(_patient_of(item) for item in result.json)
    studies = [uid for uid in ("B0", "B1") if f"1.2.9.{uid[1]}" in path] or ["B0", "B1"]
    assert found == sorted(_OWN[b] for b in studies for _ in range(per_study))


@pytest.mark.parametrize("query, accession", [
    ("PatientName=OLD%5ENAME", "B0"),
    ("PatientName=new*", "B1"),
    ("00100010=new&fuzzymatching=true", "B1"),
    ("PatientBirthDate=19710101-19711231", "B1"),
    ("PatientSex=F", "B0"),
])
def test_patient_keys_match_each_study_on_its_own_values(services: Services, query: str,
                                                          accession: str) -> None:
    client = _two_names(services)
    for path in ("/studies", "/series", "/instances"):
        result = client.simulate_get(path, query_string=query + "&includefield=00080050")
        assert result.status_code == 200, result.text
        assert {item["00080050"]["Value"][0] for item in result.json} == {accession}, path


def test_metadata_of_each_study_carries_its_own_patient_attributes(
        services: Services) -> None:
    """WADO-RS metadata is each instance's own data set."""
    client = _two_names(services)
    for n, accession in enumerate(("B0", "B1")):
        result = client.simulate_get(f"/studies/1.2.9.{n}/metadata")
        assert result.status_code == 200, result.text
        assert {_patient_of(item) for item in result.json} == {_OWN[accession]}
