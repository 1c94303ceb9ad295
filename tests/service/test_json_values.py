"""One DICOM JSON encoding of a value, whatever the route that answers it.

The same DS and IS texts, stored through STOW-RS, are read back through QIDO-RS (from
the index, at study, series and instance level), WADO-RS metadata prepared at ingest,
and WADO-RS metadata rebuilt from the stored object; each element must be the same
JSON text, and the one :func:`pacs.core.jsonmodel.element` gives (PS3.18 F.2.3).  The
Store Instances Response Module (PS3.18 Table 10.5.3-1) has no DS or IS attribute: the
STOW-RS response takes part only as the way in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from falcon import testing
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from adapters.dicomweb.app import create_app
from adapters.dicomweb.multipart import encode
from pacs.core import jsonmodel
from pacs.core.services import Services
from tests.conftest import sample

JSON = "application/dicom+json"
BOUNDARY = "b0f3c1e2"
PATIENT_WEIGHT, PATIENT_SIZE = 0x00101030, 0x00101020  # DS, study level
SERIES_NUMBER, INSTANCE_NUMBER = 0x00200011, 0x00200013  # IS, series and instance level

#: DS text as written in the data set -> the JSON Value array (None: no Value).
DS_CASES: list[tuple[str, list[Any] | None]] = [
    ("70", [70]), ("70.0", [70]), ("70.50", [70.5]), ("0.5", [0.5]),
    ("-1.25e-3", [-0.00125]), (" 12 ", [12]), ("+5", [5]), ("-0", [0]), ("1e3", [1000]),
    ("1\\2.5", [1, 2.5]), ("1\\\\3", [1, None, 3]), ("NaN", None), ("1e999", None),
    ("1,5", None),
]
#: IS text -> the JSON Value array (None: no Value).
IS_CASES: list[tuple[str, list[Any] | None]] = [
    ("7", [7]), (" 7", [7]), ("+7", [7]), ("7.0", [7]), ("-0", [0]), ("7.5", None),
    ("seven", None),
]


def raw(tag: int, vr: str, text: str) -> RawDataElement:
    """An element whose value bytes are ``text`` exactly (padded to even length)."""
    value = text.encode("ascii")
    value += b" " * (len(value) % 2)
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def instance(values: dict[int, tuple[str, str]]) -> tuple[str, bytes]:
    """CT_small with new UIDs and the given raw values; (study UID, Part 10 bytes)."""
    ds = dcmread(sample("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for tag, (vr, text) in values.items():
        ds[tag] = raw(tag, vr, text)
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return str(ds.StudyInstanceUID), out.getvalue()


@pytest.fixture(params=[0, 1], ids=["in-process", "helper"])
def node(request: pytest.FixtureRequest,
         make_services: Callable[..., Services]) -> tuple[Services, testing.TestClient]:
    """Parts analysed (metadata prepared) in the request's thread, then in a helper."""
    services = make_services(web_analysers=request.param)
    return services, testing.TestClient(create_app(services))


def stow(client: testing.TestClient, data: bytes) -> None:
    payload = b"".join(encode([({"Content-Type": "application/dicom"}, data)], BOUNDARY))
    result = client.simulate_post(
        "/studies", body=payload, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": JSON})
    assert result.status_code == 200, result.text
    assert "00081198" not in result.json  # no failed part


def get(client: testing.TestClient, path: str, query: str = "") -> list[dict[str, Any]]:
    result = client.simulate_get(path, query_string=query, headers={"Accept": JSON})
    assert result.status_code == 200, result.text
    rows = result.json
    assert isinstance(rows, list) and len(rows) == 1
    return rows


def text(element: dict[str, Any]) -> bytes:
    """An element as canonical JSON text: 70 and 70.0 differ here, unlike in ==."""
    return orjson.dumps(element, option=orjson.OPT_SORT_KEYS)


def every_route(client: testing.TestClient, services: Services, cases: dict[str, str],
                tag: int) -> dict[str, dict[str, bytes]]:
    """The element ``tag`` of each study's one instance through each route, by route
    then study."""
    key = jsonmodel.tag_key(tag)
    fields = ",".join(jsonmodel.tag_key(t) for t in (PATIENT_WEIGHT, PATIENT_SIZE,
                                                      SERIES_NUMBER, INSTANCE_NUMBER))

    def qido(study: str) -> dict[str, Any]:
        level = {SERIES_NUMBER: f"/studies/{study}/series",
                 INSTANCE_NUMBER: f"/studies/{study}/instances"}.get(tag, "/studies")
        query = f"includefield={fields}&StudyInstanceUID={study}"
        return get(client, level, query)[0][key]  # type: ignore[no-any-return]

    def wado(study: str) -> dict[str, Any]:
        return get(client, f"/studies/{study}/metadata")[0][key]  # type: ignore[no-any-return]

    answers = {"qido": {s: text(qido(s)) for s in cases},
               "wado-prepared": {s: text(wado(s)) for s in cases}}
    with services.index.write() as conn:  # rebuilt from the stored objects, then kept
        conn.execute("DELETE FROM instance_metadata")
    answers["wado-rebuilt"] = {s: text(wado(s)) for s in cases}
    return answers


def expected(vr: str, values: list[Any] | None) -> bytes:
    return text({"vr": vr, "Value": values} if values is not None else {"vr": vr})


def check(client: testing.TestClient, services: Services, tag: int, vr: str,
          cases: list[tuple[str, list[Any] | None]]) -> None:
    """Store one study per case through STOW-RS; every route answers the same JSON."""
    written: dict[str, str] = {}
    for value, _ in cases:
        study, data = instance({tag: (vr, value)})
        stow(client, data)
        written[study] = value
    want = {study: expected(vr, dict(cases)[value]) for study, value in written.items()}
    for route, got in every_route(client, services, written, tag).items():
        assert {written[s]: t for s, t in got.items()} == {
            written[s]: t for s, t in want.items()}, route
    for study, value in written.items():
        assert text(jsonmodel.element(vr, value)) == want[study]


@pytest.mark.parametrize("tag", [PATIENT_WEIGHT, PATIENT_SIZE], ids=["weight", "size"])
def test_ds_values_read_the_same_everywhere(node: tuple[Services, testing.TestClient],
                                            tag: int) -> None:
    services, client = node
    check(client, services, tag, "DS", DS_CASES)


@pytest.mark.parametrize("tag", [SERIES_NUMBER, INSTANCE_NUMBER], ids=["series", "instance"])
def test_is_values_read_the_same_everywhere(node: tuple[Services, testing.TestClient],
                                            tag: int) -> None:
    services, client = node
    check(client, services, tag, "IS", IS_CASES)
