"""The DICOMweb removal routes (adapters/dicomweb/removal.py) through falcon's test client
over real services: refused unless PACS_WEB_DELETE is on and the access rule admits the
request, 404 for what is absent, the instances gone from QIDO-RS and WADO-RS once
removed, and one audit event each, refused attempts included."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from falcon import testing
from pydicom.uid import generate_uid

from adapters.dicomweb.app import create_app
from pacs.core.errors import RejectedInstance
from pacs.core.index import reads
from pacs.core.services import Services
from tests.auditcheck import event_name, problems, read_trail, requestor, studies_in
from tests.factory import make_instance

OTHER_HOST = "10.20.30.40"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _study(services: Services, series: int = 2) -> tuple[str, list[str], list[str]]:
    study, series_uids, sops = generate_uid(), [], []
    for _ in range(series):
        series_uid = generate_uid()
        series_uids.append(series_uid)
        for _ in range(2):
            sop = generate_uid()
            sops.append(sop)
            services.ingest.store_bytes(make_instance(
                StudyInstanceUID=study, SeriesInstanceUID=series_uid, SOPInstanceUID=sop))
    return study, series_uids, sops


def _trail(services: Services) -> list[dict[str, Any]]:
    events = read_trail(services.settings.data_dir / "audit.jsonl")
    for event in events:
        assert problems(event) == [], event
    return events


@pytest.fixture
def enabled(make_services: Callable[..., Services]) -> Services:
    return make_services(web_delete=True, web_user="alice", web_password="s3cret")


def test_refused_while_deletion_is_off(services: Services) -> None:
    client = testing.TestClient(create_app(services))
    study, series, _ = _study(services)
    for method, path in (("DELETE", f"/studies/{study}"),
                         ("POST", f"/dicom-web/studies/{study}/series/{series[0]}"
                                  "/reject/113001%5EDCM")):
        response = client.simulate_request(method, path)
        assert response.status_code == 403, response.text
        assert "PACS_WEB_DELETE" in response.json["description"]
    assert reads.counts(services.index.connection())["instance"] == 4
    services.audit.flush(everything=True)  # the second refusal was counted
    refused = _trail(services)
    assert [event_name(e) for e in refused] == ["DICOM Instances Accessed"] * 2
    assert "; 1 more refusal(s) of this kind from this source" in refused[1][
        "EventIdentification"]["EventOutcomeDescription"]
    assert {e["EventIdentification"]["EventActionCode"] for e in refused} == {"D"}
    assert {e["EventIdentification"]["EventOutcomeIndicator"] for e in refused} == {8}


def test_refused_from_another_host_without_credentials(enabled: Services) -> None:
    client = testing.TestClient(create_app(enabled))
    study, _, _ = _study(enabled)
    response = client.simulate_delete(f"/studies/{study}", remote_addr=OTHER_HOST,
                                      headers={"Authorization": _basic("alice", "s3cret")})
    assert response.status_code == 403  # plain HTTP from another host
    assert reads.counts(enabled.index.connection())["instance"] == 4


def test_delete_a_series_then_the_study(enabled: Services) -> None:
    client = testing.TestClient(create_app(enabled))
    study, series, sops = _study(enabled)
    response = client.simulate_delete(f"/dicom-web/studies/{study}/series/{series[0]}")
    assert response.status_code == 204, response.text
    found = client.simulate_get(f"/studies/{study}/instances").json
    assert {row["00080018"]["Value"][0] for row in found} == set(sops[2:])
    assert client.simulate_get(
        f"/studies/{study}/series/{series[0]}/instances/{sops[0]}").status_code == 404
    assert client.simulate_delete(f"/studies/{study}/series/{series[0]}").status_code == 404
    assert client.simulate_delete(f"/studies/{study}").status_code == 204
    assert client.simulate_get("/studies").json == [] or \
        client.simulate_get("/studies").status_code == 204
    assert client.simulate_delete(f"/studies/{study}").status_code == 404
    events = [e for e in _trail(enabled) if e["EventIdentification"]["EventActionCode"] == "D"]
    assert [event_name(e) for e in events] == ["DICOM Instances Accessed",
                                               "DICOM Instances Accessed",
                                               "DICOM Study Deleted",
                                               "DICOM Instances Accessed"]
    assert [e["EventIdentification"]["EventOutcomeIndicator"] for e in events] == [0, 4, 0, 4]
    assert studies_in(events[2]) == [study] and requestor(events[2])["UserID"] == "loopback"


def test_ohifs_reject_request(enabled: Services) -> None:
    """What OHIF's dcm4cheeReject sends: POST, no body, the reason percent-encoded."""
    client = testing.TestClient(create_app(enabled))
    study, series, sops = _study(enabled)
    response = client.simulate_post(
        f"/dicom-web/studies/{study}/series/{series[1]}/reject/113001%5EDCM")
    assert response.status_code == 200, response.text
    assert response.json == {"count": 2}
    found = client.simulate_get(f"/studies/{study}/instances").json
    assert {row["00080018"]["Value"][0] for row in found} == set(sops[:2])
    with pytest.raises(RejectedInstance):
        enabled.ingest.store_bytes(make_instance(
            StudyInstanceUID=study, SeriesInstanceUID=series[1], SOPInstanceUID=sops[2]))
    one = client.simulate_post(
        f"/studies/{study}/series/{series[0]}/instances/{sops[0]}/reject/113039^DCM")
    assert one.json == {"count": 1}
    unknown = client.simulate_post(f"/studies/{study}/reject/113000^DCM")
    assert unknown.status_code == 400
    assert "CID 7010" in unknown.json["description"]
    assert client.simulate_post(f"/studies/{generate_uid()}/reject/113001^DCM"
                                ).status_code == 404


@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
     403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:8080"}, 403),  # same site, another port: another origin
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "http://localhost"}, 200),  # the node's own pages (the viewer)
    ({"Origin": "https://LOCALHOST:443", "Sec-Fetch-Site": "same-origin"}, 200),
    ({"Origin": "https://viewer.example"}, 200),  # listed in PACS_CORS_ORIGINS
    ({}, 200),  # no browser: curl, dicomweb-client
])
def test_a_removal_forged_by_a_page_of_another_origin_is_refused(
        make_services: Callable[..., Services], headers: dict[str, str],
        status: int) -> None:
    """A form of any site POSTs to the reject route without a preflight, and the
    browser adds this host's loopback trust (or a user's cached Basic credentials):
    a request that would change data from a page of another origin is 403, nothing
    removed; the node's own origin, a listed one and clients that are no browser are
    served."""
    services = make_services(web_delete=True, cors_origins=("https://viewer.example",))
    client = testing.TestClient(create_app(services))
    study, series, _ = _study(services)
    answer = client.simulate_post(
        f"/dicom-web/studies/{study}/series/{series[0]}/reject/113001%5EDCM",
        headers={"Host": "localhost", **headers}, body="x=1")
    assert answer.status_code == status, answer.text
    left = reads.counts(services.index.connection())["instance"]
    assert left == (4 if status == 403 else 2)
