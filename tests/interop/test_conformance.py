"""The conformance statement against the running node (``pacs serve``).

The statement is read as JSON from ``pacs conformance --format json`` with the node's
own settings.  Then, over DIMSE with pynetdicom: every (SOP Class, transfer syntax)
pair it lists is proposed, in associations of up to 128 presentation contexts, and
must be accepted in that syntax; the syntax chosen among several is the one it names
first; a sample of pairs it does not list (other SOP Classes, unknown and private
transfer syntaxes) must be rejected; role selection and extended negotiation are
answered as it says.  Over DICOMweb, through the real gunicorn: every resource it
lists answers each of its media types (and each listed transfer-syntax value) with a
2xx of that Content-Type, and an unlisted media type with 406 (but DELETE, which
answers no body).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, build_context, build_role
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from tests.conftest import sample, seam_only
from tests.interop.conftest import AE_TITLE, Node, answers_qido, run_dcmtk

pytestmark = pytest.mark.interop

ELE = str(ExplicitVRLittleEndian)
#: pynetdicom proposes at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255).
BATCH = 128
TIMEOUT = 60.0
#: A media type no DICOMweb resource of the node offers (PS3.18 XML is not served).
UNLISTED_MEDIA_TYPE = "application/dicom+xml"
#: A transfer syntax UID that no standard defines (a private root).
MADE_UP_SYNTAX = "1.2.826.0.1.3680043.9.9999.42"

#: Pairs the node must not accept: (SOP Class UID, transfer syntax UID, why).
UNLISTED_PAIRS = (
    ("1.2.840.10008.5.1.4.31", ELE, "Modality Worklist Information Model - FIND"),
    ("1.2.840.10008.1.20.1", str(JPEGBaseline8Bit), "Storage Commitment Push Model, JPEG"),
    ("1.2.840.10008.1.20.2", ELE, "Storage Commitment Pull Model (retired)"),
    ("1.2.840.10008.3.1.2.3.3", ELE, "Modality Performed Procedure Step"),
    ("1.2.840.10008.5.1.4.1.2.3.1", ELE, "Patient/Study Only Q/R FIND (retired)"),
    ("1.2.826.0.1.3680043.9.9999.7", ELE, "a made-up SOP Class"),
    ("1.2.840.10008.5.1.4.1.1.2", MADE_UP_SYNTAX, "CT Image Storage, private syntax"),
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.1000",
     "CT Image Storage, an unknown syntax of the DICOM root"),
    ("1.2.840.10008.5.1.4.1.2.2.1", str(JPEGBaseline8Bit), "Study Root FIND, JPEG"),
    ("1.2.840.10008.1.1", MADE_UP_SYNTAX, "Verification, private syntax"),
)

#: Presentation context results (PS3.8 Table 9-18).
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x03, 0x04


# --- the node and its statement ---------------------------------------------------------

@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node]) -> Node:
    started = node_factory("conformance")
    answers_qido(started)  # the DICOMweb workers answer too
    return started


@pytest.fixture(scope="module")
def statement(node: Node) -> dict[str, Any]:
    result = node.cli("conformance", "--format", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def listed_pairs(statement: dict[str, Any]) -> list[tuple[str, str]]:
    return [(cx["sop_class"], ts) for cx in statement["presentation_contexts"]
            for ts in cx["transfer_syntaxes"]]


def associate(node: Node, contexts: Sequence[PresentationContext],
              ext_neg: Sequence[Any] | None = None) -> Association:
    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    assoc = ae.associate("127.0.0.1", node.port, contexts=list(contexts), ae_title=AE_TITLE,
                         ext_neg=list(ext_neg or []))
    assert assoc.is_established, f"association refused:\n{node.log()}"
    return assoc


def rq_length(contexts: Sequence[tuple[str, Sequence[str]]]) -> int:
    """A generous estimate of an A-ASSOCIATE-RQ's length (PS3.8 9.3.2): its fixed
    fields, application context and user information, and each presentation context
    item with its abstract and transfer syntax sub-items."""
    return 1024 + sum(8 + 4 + len(uid) + sum(4 + len(ts) for ts in syntaxes)
                      for uid, syntaxes in contexts)


def batches(contexts: Sequence[tuple[str, Sequence[str]]], max_rq: int,
            ) -> Iterator[list[tuple[str, Sequence[str]]]]:
    """Contexts in associations of at most 128 contexts and ``max_rq`` bytes of request."""
    batch: list[tuple[str, Sequence[str]]] = []
    for context in contexts:
        if batch and (len(batch) == BATCH or rq_length([*batch, context]) > max_rq):
            yield batch
            batch = []
        batch.append(context)
    if batch:
        yield batch


def accepted(assoc: Association) -> set[tuple[str, str]]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts}


def test_the_statement_is_of_this_node(node: Node, statement: dict[str, Any]) -> None:
    assert statement["network"]["dimse_port"] == node.port
    assert statement["network"]["ae_title"] == AE_TITLE
    assert statement["dicomweb"]["port"] == int(node.env["PACS_WEB_PORT"])
    assert len(listed_pairs(statement)) > 1000  # every storage class in every syntax


# --- DIMSE --------------------------------------------------------------------------------

@pytest.mark.dimse
def test_every_listed_pair_is_accepted_in_that_syntax(node: Node,
                                                      statement: dict[str, Any]) -> None:
    pairs = listed_pairs(statement)
    refused: list[tuple[str, str]] = []
    for start in range(0, len(pairs), BATCH):
        batch = pairs[start:start + BATCH]
        assoc = associate(node, [build_context(uid, [ts]) for uid, ts in batch])
        try:
            refused += sorted(set(batch) - accepted(assoc))
        finally:
            assoc.release()
    assert not refused, f"{len(refused)} listed pairs refused, e.g. {refused[:5]}"


@pytest.mark.dimse
def test_the_first_listed_syntax_is_chosen(node: Node, statement: dict[str, Any]) -> None:
    """Selection rule: the node's order decides, not the requestor's (all of a class's
    syntaxes proposed in reverse, then only its last two)."""
    cxs = statement["presentation_contexts"]
    max_rq = statement["association"]["max_associate_rq_bytes"]
    first = {cx["sop_class"]: cx["transfer_syntaxes"] for cx in cxs}
    for take in (slice(None), slice(-2, None)):
        proposed = [(cx["sop_class"], cx["transfer_syntaxes"][take][::-1]) for cx in cxs]
        for batch in batches(proposed, max_rq):
            assoc = associate(node, [build_context(uid, list(ts)) for uid, ts in batch])
            try:
                chosen = dict(accepted(assoc))
            finally:
                assoc.release()
            for uid, syntaxes in batch:
                # The node's first among those proposed.
                expected = next(ts for ts in first[uid] if ts in syntaxes)
                assert chosen.get(uid) == expected, uid


@pytest.mark.dimse
@seam_only("the A-ASSOCIATE-RQ ceiling is checked in the seam's receive path")
def test_a_request_past_the_listed_length_is_not_read(node: Node,
                                                      statement: dict[str, Any]) -> None:
    """Every listed context of every SOP Class at once: longer than the statement's
    A-ASSOCIATE-RQ limit, so the node aborts instead of reading it."""
    cxs = [(cx["sop_class"], cx["transfer_syntaxes"])
           for cx in statement["presentation_contexts"]][:BATCH]
    assert rq_length(cxs) - 1024 > statement["association"]["max_associate_rq_bytes"]
    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.network_timeout = TIMEOUT
    assoc = ae.associate("127.0.0.1", node.port, contexts=[
        build_context(uid, list(ts)) for uid, ts in cxs], ae_title=AE_TITLE)
    assert assoc.is_aborted and not assoc.is_established


@pytest.mark.dimse
def test_unlisted_pairs_are_rejected(node: Node, statement: dict[str, Any]) -> None:
    listed = set(listed_pairs(statement))
    classes = {uid for uid, _ in listed}
    for uid, syntax, why in UNLISTED_PAIRS:
        assert (uid, syntax) not in listed, f"the statement lists {why}"
    # One listed context keeps the association up; each unlisted one is rejected.
    contexts = [build_context("1.2.840.10008.1.1", [ELE]),
                *(build_context(uid, [syntax]) for uid, syntax, _ in UNLISTED_PAIRS)]
    assoc = associate(node, contexts)
    try:
        assert accepted(assoc) == {("1.2.840.10008.1.1", ELE)}
        results = {cx.context_id: cx.result for cx in assoc.rejected_contexts}
        proposed = assoc.requestor.requested_contexts[1:]  # in order, with their IDs
    finally:
        assoc.release()
    for context, (uid, _, why) in zip(proposed, UNLISTED_PAIRS, strict=True):
        assert str(context.abstract_syntax) == uid
        expected = (TRANSFER_SYNTAXES_NOT_SUPPORTED if uid in classes
                    else ABSTRACT_SYNTAX_NOT_SUPPORTED)
        assert results.get(context.context_id) == expected, why


@pytest.mark.dimse
def test_scp_role_selection_is_accepted_where_listed(node: Node,
                                                     statement: dict[str, Any]) -> None:
    """A C-GET requestor's SCP role (PS3.7 D.3.3.4): accepted on every class the
    statement marks, refused (default roles) on the others."""
    cxs = statement["presentation_contexts"]
    assert any(cx["role_selection"] for cx in cxs)
    for start in range(0, len(cxs), BATCH):
        batch = cxs[start:start + BATCH]
        roles = [build_role(cx["sop_class"], scu_role=True, scp_role=True) for cx in batch]
        assoc = associate(node, [build_context(cx["sop_class"], [cx["transfer_syntaxes"][0]])
                                 for cx in batch], roles)
        try:
            as_scp = {str(cx.abstract_syntax): bool(cx.as_scp) for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
        for cx in batch:
            assert as_scp[cx["sop_class"]] == cx["role_selection"], cx["name"]


@pytest.mark.dimse
def test_extended_negotiation_is_answered_as_listed(node: Node,
                                                    statement: dict[str, Any]) -> None:
    items = []
    for entry in statement["extended_negotiation"]:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = entry["sop_class"]
        item.service_class_application_information = b"\x01" * len(entry["supported"])
        items.append(item)
    contexts = [build_context(entry["sop_class"], [ELE])
                for entry in statement["extended_negotiation"]]
    assoc = associate(node, contexts, items)
    try:
        answers = {str(uid): bytes(info)
                   for uid, info in assoc.acceptor.sop_class_extended.items()}
    finally:
        assoc.release()
    for entry in statement["extended_negotiation"]:
        if entry["answered"]:
            expected = bytes(int(flag) for flag in entry["supported"].values())
            assert answers.get(entry["sop_class"]) == expected, entry["name"]
        else:
            assert entry["sop_class"] not in answers, entry["name"]


@pytest.mark.dimse
def test_unanswered_negotiation_items_get_no_answer(node: Node,
                                                    statement: dict[str, Any]) -> None:
    """Asynchronous Operations Window and User Identity: the association is accepted
    and the A-ASSOCIATE-AC carries no answer, as the statement says."""
    assoc_policy = statement["association"]
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"someone"
    identity.positive_response_requested = True
    assoc = associate(node, [build_context("1.2.840.10008.1.1", [ELE])], [window, identity])
    try:
        items = assoc.acceptor.user_information
        assert any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in items) \
            == assoc_policy["asynchronous_operations_window"]
        assert any(isinstance(i, UserIdentityNegotiation) for i in items) \
            == assoc_policy["user_identity"]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


# --- DICOMweb -----------------------------------------------------------------------------

#: A pydicom sample stored in each transfer syntax the statement's image media types
#: name (relabelled where no sample exists: the node sends those frames as stored and
#: never decodes them on that path).
SAMPLES = {
    "1.2.840.10008.1.2.4.50": ("SC_rgb_jpeg_dcmtk.dcm", False),
    "1.2.840.10008.1.2.4.51": ("JPEG-lossy.dcm", False),
    "1.2.840.10008.1.2.4.57": ("JPGLosslessP14SV1_1s_1f_8b.dcm", True),  # a process 14
    "1.2.840.10008.1.2.4.70": ("JPGLosslessP14SV1_1s_1f_8b.dcm", False),
    "1.2.840.10008.1.2.4.80": ("MR_small_jpeg_ls_lossless.dcm", False),
    "1.2.840.10008.1.2.4.81": ("JPEGLSNearLossless_08.dcm", False),
    "1.2.840.10008.1.2.4.90": ("MR_small_jp2klossless.dcm", False),
    "1.2.840.10008.1.2.4.91": ("JPEG2000.dcm", False),
    "1.2.840.10008.1.2.4.92": ("MR_small_jp2klossless.dcm", True),
    "1.2.840.10008.1.2.4.93": ("JPEG2000.dcm", True),
    "1.2.840.10008.1.2.4.201": ("MR_small_jp2klossless.dcm", True),
    "1.2.840.10008.1.2.4.202": ("MR_small_jp2klossless.dcm", True),
    "1.2.840.10008.1.2.4.203": ("JPEG2000.dcm", True),
    "1.2.840.10008.1.2.5": ("MR_small_RLE.dcm", False),
}


@dataclass(frozen=True)
class Stored:
    """One imported instance: its UIDs and the transfer syntax it is stored in."""

    study: str
    series: str
    sop: str
    syntax: str

    def url(self, base: str, template: str) -> str:
        path = (template.replace("{study}", self.study).replace("{series}", self.series)
                .replace("{instance}", self.sop).replace("{frames}", "1")
                .replace("{path:path}", "7FE00010").replace("{reason}", "113001^DCM"))
        return base + path


def _write(ds: pydicom.Dataset, folder: Path, syntax: str | None = None) -> Stored:
    ds.PatientID = "CONFORMANCE"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return Stored(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                  str(ds.file_meta.TransferSyntaxUID))


@dataclass(frozen=True)
class Instances:
    """An uncompressed CT, and one instance per stored syntax of the image types."""

    native: Stored
    by_syntax: dict[str, Stored]


@pytest.fixture(scope="module")
def instances(node: Node, statement: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Instances:
    folder = tmp_path_factory.mktemp("conformance-data")
    native = _write(pydicom.dcmread(sample("CT_small.dcm")), folder)
    wanted = {syntax for resource in statement["dicomweb"]["resources"]
              for offer in resource["media_types"] for syntax in offer["stored_syntaxes"] or ()}
    missing = wanted - set(SAMPLES)
    assert not missing, f"no sample for the stored syntaxes {missing}: add them to SAMPLES"
    by_syntax = {}
    for syntax in sorted(wanted):
        name, relabel = SAMPLES[syntax]
        by_syntax[syntax] = _write(pydicom.dcmread(sample(name)), folder,
                                   syntax if relabel else None)
        assert by_syntax[syntax].syntax == syntax
    done = node.cli("import", "--quiet", str(folder), timeout=300)
    assert done.returncode == 0 and "rejected: 0" in done.stdout, done.stdout + done.stderr
    return Instances(native, by_syntax)


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type's type and parameters (lower-case names)."""
    message = Message()
    message["content-type"] = value
    params = dict(message.get_params()[1:])  # type: ignore[index]
    return message.get_content_type(), {k.lower(): v for k, v in params.items()}


def first_part_type(response: requests.Response) -> str:
    """The Content-Type of the first part of a multipart/related body."""
    boundary = media_type(response.headers["Content-Type"])[1]["boundary"]
    part = response.content.split(b"--" + boundary.encode(), 2)[1]
    head = part.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            return value.strip()
    raise AssertionError(f"no Content-Type in the first part: {head!r}")


def served_syntax(offer: str, response: requests.Response) -> str | None:
    """The transfer-syntax the answer states: its own, or its first part's."""
    kind = media_type(offer)[0]
    part = first_part_type(response) if kind == "multipart/related" else \
        response.headers["Content-Type"]
    return media_type(part)[1].get("transfer-syntax")


@dataclass(frozen=True)
class Request:
    """One request a listed resource and media type imply."""

    url: str
    accept: str
    offer: str
    expected_syntax: str | None


def requests_of(statement: dict[str, Any], data: Instances, base: str,
                resource: dict[str, Any]) -> Iterator[Request]:
    """Every (route, media type, transfer-syntax value, instance) of a GET resource."""
    for offer in resource["media_types"]:
        routes = [r for r in resource["routes"] if offer["levels"] is None
                  or any(r.endswith(level) for level in offer["levels"])]
        stored = ([data.by_syntax[s] for s in offer["stored_syntaxes"]]
                  if offer["stored_syntaxes"] is not None else [data.native])
        for route in routes:
            for instance in stored:
                for syntax in [None, *offer["transfer_syntaxes"]]:
                    accept = offer["media_type"] + (f"; transfer-syntax={syntax}"
                                                    if syntax else "")
                    if syntax is None:
                        expected = offer["default_syntax"] or (
                            instance.syntax if offer["stored_syntaxes"] else None)
                    else:
                        expected = instance.syntax if syntax == "*" else syntax
                    yield Request(instance.url(base, route), accept, offer["media_type"],
                                  expected)


def resource_named(statement: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in statement["dicomweb"]["resources"] if r["name"] == name)


def test_every_get_resource_serves_each_listed_media_type(
        node: Node, statement: dict[str, Any], instances: Instances) -> None:
    base = node.web_url()
    resources = [r for r in statement["dicomweb"]["resources"] if r["method"] == "GET"]
    assert {r["name"] for r in resources} >= {
        "Search", "Retrieve Instances", "Retrieve Metadata", "Retrieve Frames",
        "Retrieve Bulkdata", "Retrieve Rendered", "Retrieve Thumbnail"}
    uncompressed = tuple(statement["initiation"]["conversion_targets"])
    failures: list[str] = []
    count = 0
    with requests.Session() as session:
        for resource in resources:
            frames = resource["name"] in ("Retrieve Frames", "Retrieve Bulkdata")
            for request in requests_of(statement, instances, base, resource):
                count += 1
                response = session.get(request.url, headers={"Accept": request.accept},
                                       timeout=TIMEOUT)
                what = f"{resource['name']} GET {request.url} Accept: {request.accept}"
                if not 200 <= response.status_code < 300:
                    failures.append(f"{what}: {response.status_code} {response.text[:200]}")
                    continue
                got, params = media_type(response.headers.get("Content-Type", ""))
                want, want_params = media_type(request.offer)
                if got != want or params.get("type") != want_params.get("type"):
                    failures.append(f"{what}: Content-Type {response.headers['Content-Type']}")
                    continue
                if request.expected_syntax is None:
                    continue
                syntax = served_syntax(request.offer, response)
                # Uncompressed frames are labelled with one uncompressed syntax
                # whichever was asked (the statement's note on Retrieve Frames).
                if frames and request.expected_syntax in uncompressed:
                    ok = syntax in uncompressed
                else:
                    ok = syntax == request.expected_syntax
                if not ok:
                    failures.append(f"{what}: transfer-syntax {syntax}, expected "
                                    f"{request.expected_syntax}")
    assert count > 100
    assert not failures, f"{len(failures)} of {count} requests failed:\n" + "\n".join(
        failures[:20])


def test_an_unlisted_media_type_is_406(node: Node, statement: dict[str, Any],
                                       instances: Instances) -> None:
    base = node.web_url()
    for resource in statement["dicomweb"]["resources"]:
        assert all(not o["media_type"].startswith(UNLISTED_MEDIA_TYPE)
                   for o in resource["media_types"])
        if not resource["media_types"]:
            continue  # no answer body (DELETE): nothing to negotiate
        for route in resource["routes"]:
            url = instances.native.url(base, route)
            if resource["method"] == "GET":
                response = requests.get(url, headers={"Accept": UNLISTED_MEDIA_TYPE},
                                        timeout=TIMEOUT)
            else:
                response = requests.post(url, data=b"", timeout=TIMEOUT, headers={
                    "Accept": UNLISTED_MEDIA_TYPE, "Content-Type": "application/dicom"})
            assert response.status_code == 406, f"{resource['name']} {url}: " \
                f"{response.status_code} {response.text[:200]}"


def test_an_unlisted_transfer_syntax_is_406(node: Node, statement: dict[str, Any],
                                            instances: Instances) -> None:
    """The uncompressed CT asked for in JPEG Baseline, which no listed value produces."""
    jpeg = str(JPEGBaseline8Bit)
    base = node.web_url()
    for name in ("Retrieve Instances", "Retrieve Frames"):
        resource = resource_named(statement, name)
        default = next(o for o in resource["media_types"] if o["default"])
        assert jpeg not in default["transfer_syntaxes"]
        url = instances.native.url(base, resource["routes"][-1])
        response = requests.get(url, timeout=TIMEOUT, headers={
            "Accept": f"{default['media_type']}; transfer-syntax={jpeg}"})
        assert response.status_code == 406, f"{name}: {response.status_code}"


def part10(study: str | None = None) -> bytes:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.PatientID = "CONFORMANCE"
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_stow_takes_each_listed_request_type(node: Node, statement: dict[str, Any],
                                             instances: Instances) -> None:
    store = resource_named(statement, "Store Instances")
    answer = next(o["media_type"] for o in store["media_types"] if o["default"])
    base = node.web_url()
    boundary = "conformance-boundary"
    for route in store["routes"]:
        url = instances.native.url(base, route)
        for request_type in store["request_media_types"]:
            body = part10(instances.native.study)
            kind, params = media_type(request_type)
            if kind == "multipart/related":
                content_type = f"{request_type}; boundary={boundary}"
                body = (f"--{boundary}\r\nContent-Type: {params['type']}\r\n\r\n".encode()
                        + body + f"\r\n--{boundary}--\r\n".encode())
            else:
                content_type = request_type
            response = requests.post(url, data=body, timeout=TIMEOUT, headers={
                "Content-Type": content_type, "Accept": answer})
            assert response.status_code == 200, f"{url} {request_type}: {response.text}"
            assert media_type(response.headers["Content-Type"])[0] == answer
        unlisted = requests.post(url, data=b"{}", timeout=TIMEOUT,
                                 headers={"Content-Type": "application/dicom+json"})
        assert unlisted.status_code == 415, f"{url}: {unlisted.status_code}"


@pytest.mark.dimse
def test_c_find_answers_in_each_listed_character_set(node: Node, statement: dict[str, Any],
                                                     instances: Instances,
                                                     tmp_path: Path) -> None:
    """A C-FIND whose identifier names each listed Specific Character Set is answered,
    and, the stored values being representable in it, in that character set.

    dcmtk's findscu asks (one association per term; ``-X`` writes each answer): a
    pynetdicom requestor that sends C-FINDs back to back on one association may take a
    fast pending response for an unrequested message and drop it (its reactor thread
    races the waiting request)."""
    terms = statement["character_sets"]["c_find"]
    assert "ISO_IR 192" in terms and "ISO 2022 IR 87" in terms
    for number, term in enumerate(terms):
        folder = tmp_path / f"term{number}"
        folder.mkdir()
        found = run_dcmtk(
            "findscu", "-S", "-X", "-od", str(folder), "-aec", AE_TITLE,
            "-k", f"SpecificCharacterSet={term}", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={instances.native.study}", "-k", "PatientName",
            "127.0.0.1", str(node.port), timeout=60)
        assert found.returncode == 0, f"{term}: {found.stdout}"
        answers = sorted(folder.glob("rsp*.dcm"))
        assert len(answers) == 1, f"{term}: {found.stdout}"
        identifier = pydicom.dcmread(answers[0], force=True)
        charset = identifier.SpecificCharacterSet
        assert (charset if isinstance(charset, str) else "\\".join(charset)) == term, term
        assert identifier.StudyInstanceUID == instances.native.study, term
