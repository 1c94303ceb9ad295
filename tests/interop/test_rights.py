"""Rights per AE and per user (pacs/core/access.py) against ``pacs serve`` with real
clients: dcmtk's echoscu, storescu, findscu, movescu and getscu as known AEs with and
without each right, an unknown AE and a known AE from the wrong address under closed
defaults (A-ASSOCIATE-RJ); ``requests`` and dicomweb-client as users of each role over
HTTPS (401 / 403 / 200), and forged Host headers (421).

One node serves every case: its access file knows one AE per missing right, the
storescp destination (address and port), and three users (read, read + write, admin);
``PACS_UNKNOWN_AE_RIGHTS`` and ``PACS_LOOPBACK_ROLES`` are empty, as in compose.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from pacs.core import access
from tests.conftest import SEAM
from tests.factory import make_rejection_note
from tests.interop.conftest import (
    AE_TITLE,
    Node,
    dcmtk,
    fresh_ct,
    run_dcmtk,
    sha256,
    start_storescp,
)
from tests.interop.tlsnode import fake_dist, session, viewer, web
from tests.tlsfiles import Pki, make_pki

pytestmark = [pytest.mark.interop, pytest.mark.dimse]

ALL = ["echo", "store", "overwrite", "reject", "find", "retrieve"]
#: Known AEs: each lacks the right its name says.
AES = {
    "FULL": ALL,
    "NOECHO": [r for r in ALL if r != "echo"],
    "NOSTORE": [r for r in ALL if r != "store"],
    "NOOVERWRITE": [r for r in ALL if r != "overwrite"],
    "NOREJECT": [r for r in ALL if r != "reject"],
    "NOFIND": [r for r in ALL if r != "find"],
    "NORETRIEVE": [r for r in ALL if r != "retrieve"],
    "NORIGHTS": [],
}
#: Users: name -> (password, roles).
USERS = {"reader": ("read-secret", ["read"]), "writer": ("write-secret", ["read", "write"]),
         "boss": ("admin-secret", ["read", "write", "admin"])}
DESTINATION = "STORESCP"


@dataclass
class Rig:
    """The node, its storescp destination, the study it holds, its PKI."""

    node: Node
    pki: Pki
    scp_folder: Path
    study: str
    series: str
    sop: str


def access_file(folder: Path, scp_port: int) -> Path:
    """The access file of the rig: :data:`AES`, an AE known at another address, the
    destination, :data:`USERS` (hashes from pacs.core.access, as `pacs passwd` prints)."""
    lines = []
    for title, rights in AES.items():
        lines += ["[[ae]]", f'title = "{title}"', f"rights = {rights!r}".replace("'", '"'),
                  'host = "127.0.0.0/8"' if title == "FULL" else "", ""]
    lines += ["[[ae]]", 'title = "ELSEWHERE"', 'host = "192.0.2.7"',
              f"rights = {ALL!r}".replace("'", '"'), "",
              "[[ae]]", f'title = "{DESTINATION}"', 'host = "127.0.0.1"', f"port = {scp_port}",
              "rights = []", ""]
    for name, (password, roles) in USERS.items():
        lines += ["[[user]]", f'name = "{name}"',
                  f'password = "{access.hash_password(password)}"',
                  f"roles = {roles!r}".replace("'", '"'), ""]
    path = folder / "access.toml"
    path.write_text("\n".join(lines))
    return path


def basic(user: str) -> tuple[str, str]:
    return user, USERS[user][0]


@pytest.fixture(scope="module")
def rig(node_factory: Callable[..., Node], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Rig]:
    for tool in ("storescu", "findscu", "movescu", "getscu", "storescp", "echoscu"):
        dcmtk(tool)
    folder = tmp_path_factory.mktemp("rights")
    pki = make_pki(folder / "pki")
    scp_folder = folder / "received"
    scp_folder.mkdir()
    scp_port, scp = start_storescp(DESTINATION, scp_folder, "+B",
                                   log=folder / "storescp.log")
    try:
        node = node_factory(
            "rights", PACS_ACCESS_FILE=str(access_file(folder, scp_port)),
            PACS_UNKNOWN_AE_RIGHTS="", PACS_LOOPBACK_ROLES="",
            PACS_TLS_CERT=str(pki.server_cert), PACS_TLS_KEY=str(pki.server_key),
            PACS_WEB_WORKERS="1", PACS_VIEWER_WORKERS="1", PACS_UPLOADS_POLL="0",
            PACS_WEB_DELETE="true",
            PACS_VIEWER_DIST=str(fake_dist(folder / "dist")))
        ct = fresh_ct(PatientID="RIGHTS-1")
        ct.save_as(folder / "ct.dcm", enforce_file_format=True)
        stored = run_dcmtk("storescu", "-aet", "FULL", "-aec", AE_TITLE, "127.0.0.1",
                           str(node.port), str(folder / "ct.dcm"))
        assert stored.returncode == 0, f"{stored.stdout}\n{node.log()}"
        yield Rig(node, pki, scp_folder, ct.StudyInstanceUID, ct.SeriesInstanceUID,
                  ct.SOPInstanceUID)
    finally:
        scp.terminate()
        scp.wait(timeout=10)


#: How dcmtk reports 0124 (Refused: not authorized, PS3.7 C.5.21): it names only the
#: statuses of its own per-service tables, and prints the general ones by their code.
UNKNOWN_0124 = "Unknown Status: 0x124"


def dimse(rig: Rig, tool: str, calling: str, *args: str, files: tuple[str, ...] = ()) -> str:
    result = run_dcmtk(tool, "-v", "-aet", calling, "-aec", AE_TITLE, *args, "127.0.0.1",
                       str(rig.node.port), *files, timeout=60)
    return result.stdout


# --- associations --------------------------------------------------------------------

@pytest.mark.parametrize("calling", ["STRANGER", "NORIGHTS", "ELSEWHERE"])
def test_unknown_rightless_and_misplaced_aes_are_rejected(rig: Rig, calling: str) -> None:
    """A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not
    recognized (PS3.8 9.3.4); a Security Alert in the trail."""
    out = dimse(rig, "echoscu", calling)
    assert "Association Rejected" in out, out
    assert "Result: Rejected Permanent" in out and "Source: Service User" in out, out
    assert "Reason: Calling AE Title Not Recognized" in out, out
    trail = (rig.node.data_dir / "audit.jsonl").read_text()
    assert '"110126"' in trail and calling in trail


def test_a_known_ae_from_its_network_with_every_right(rig: Rig) -> None:
    out = dimse(rig, "echoscu", "FULL")
    assert "Received Echo Response (Success)" in out, out


# --- each right ------------------------------------------------------------------------

def test_echo_without_the_echo_right_is_refused(rig: Rig) -> None:
    out = dimse(rig, "echoscu", "NOECHO")
    assert f"Received Echo Response ({UNKNOWN_0124})" in out, out


def test_store_without_the_store_right_is_refused_and_nothing_stored(rig: Rig,
                                                                      tmp_path: Path) -> None:
    ct = fresh_ct(PatientID="RIGHTS-NOSTORE")
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    out = dimse(rig, "storescu", "NOSTORE", files=(str(tmp_path / "ct.dcm"),))
    assert f"Received Store Response ({UNKNOWN_0124})" in out, out
    assert ct.SOPInstanceUID not in rig.node.index()


def test_overwrite_needs_the_overwrite_right(rig: Rig, tmp_path: Path) -> None:
    ct = fresh_ct(PatientID="RIGHTS-OVERWRITE")
    ct.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    out = dimse(rig, "storescu", "NOOVERWRITE", files=(str(tmp_path / "first.dcm"),))
    assert "Received Store Response (Success)" in out, out
    path = rig.node.object_path(rig.node.index()[ct.SOPInstanceUID])
    before = sha256(path)
    # The same object again changes nothing: allowed.
    out = dimse(rig, "storescu", "NOOVERWRITE", files=(str(tmp_path / "first.dcm"),))
    assert "Received Store Response (Success)" in out, out
    ct.PatientName = "CHANGED^NAME"
    ct.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    out = dimse(rig, "storescu", "NOOVERWRITE", files=(str(tmp_path / "second.dcm"),))
    # 0111, Duplicate SOP Instance (PS3.7 C.5.7): nothing changed.
    assert "Received Store Response (Unknown Status: 0x111)" in out, out
    assert sha256(path) == before
    out = dimse(rig, "storescu", "FULL", files=(str(tmp_path / "second.dcm"),))
    assert "Received Store Response (Success)" in out, out
    assert sha256(rig.node.object_path(rig.node.index()[ct.SOPInstanceUID])) != before


def test_a_rejection_note_needs_the_reject_right(rig: Rig, tmp_path: Path) -> None:
    """An IOCM rejection note removes the instances it names: from an AE without the
    reject right it is refused, 0124 (Refused: Not authorized, PS3.7 C.5.21), and
    nothing of it stored; from one with it, the instance is gone."""
    ct = fresh_ct(PatientID="RIGHTS-REJECT")
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    out = dimse(rig, "storescu", "NOREJECT", files=(str(tmp_path / "ct.dcm"),))
    assert "Received Store Response (Success)" in out, out
    note = make_rejection_note([(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                 ct.SOPInstanceUID, ct.SOPClassUID)],
                               PatientID="RIGHTS-REJECT", PatientName=str(ct.PatientName))
    (tmp_path / "note.dcm").write_bytes(note)
    note_sop = str(pydicom.dcmread(tmp_path / "note.dcm").SOPInstanceUID)
    out = dimse(rig, "storescu", "NOREJECT", files=(str(tmp_path / "note.dcm"),))
    assert f"Received Store Response ({UNKNOWN_0124})" in out, out
    index = rig.node.index()
    assert ct.SOPInstanceUID in index and note_sop not in index
    out = dimse(rig, "storescu", "FULL", files=(str(tmp_path / "note.dcm"),))
    assert "Received Store Response (Success)" in out, out
    index = rig.node.index()
    assert ct.SOPInstanceUID not in index and note_sop in index


def test_find_without_the_find_right_is_refused(rig: Rig) -> None:
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={rig.study}"]
    out = dimse(rig, "findscu", "NOFIND", *keys)
    assert f"Received Final Find Response ({UNKNOWN_0124})" in out, out
    assert "Pending" not in out, out
    out = dimse(rig, "findscu", "FULL", *keys)
    assert "Received Final Find Response (Success)" in out and rig.study in out, out


def test_move_without_the_retrieve_right_is_refused(rig: Rig) -> None:
    keys = ["-S", "-aem", DESTINATION, "-k", "QueryRetrieveLevel=STUDY", "-k",
            f"StudyInstanceUID={rig.study}"]
    out = dimse(rig, "movescu", "NORETRIEVE", *keys)
    # pynetdicom's own C-MOVE loop takes no status before the destination (seam off):
    # C514, as for every refusal before the first sub-operation (docs/architecture.md).
    final = UNKNOWN_0124 if SEAM else "Failed: UnableToProcess"  # C514 without the seam
    assert f"Received Final Move Response ({final})" in out, out
    assert not any(rig.scp_folder.iterdir())
    out = dimse(rig, "movescu", "FULL", *keys)
    assert "Received Final Move Response (Success)" in out, out
    assert any(rig.scp_folder.iterdir())  # the destination of the access file


def test_move_to_an_ae_without_an_address_is_refused(rig: Rig) -> None:
    out = dimse(rig, "movescu", "FULL", "-S", "-aem", "NOFIND", "-k",
                "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={rig.study}")
    assert "Refused: MoveDestinationUnknown" in out, out  # A801: known, but no address


def test_get_without_the_retrieve_right_is_refused(rig: Rig, tmp_path: Path) -> None:
    keys = ["-S", "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY", "-k",
            f"StudyInstanceUID={rig.study}"]
    out = dimse(rig, "getscu", "NORETRIEVE", *keys)
    assert f"Received C-GET Response ({UNKNOWN_0124})" in out, out
    assert not any(tmp_path.iterdir())
    out = dimse(rig, "getscu", "FULL", *keys)
    assert "Received C-GET Response (Success)" in out, out
    assert any(tmp_path.iterdir())


def test_refused_operations_are_in_the_audit_trail(rig: Rig, tmp_path: Path) -> None:
    """A refused operation is its event with outcome 8, serious failure: the action
    was ended (PS3.15 A.5.3, RFC 3881 5.1.4)."""
    dimse(rig, "findscu", "NOFIND", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k",
          f"StudyInstanceUID={rig.study}")
    ct = fresh_ct(PatientID="RIGHTS-AUDIT")
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    dimse(rig, "storescu", "NOSTORE", files=(str(tmp_path / "ct.dcm"),))
    wanted = {("NOFIND", "C-FIND status 0124"), ("NOSTORE", "C-STORE: 0 stored, 1 failed")}
    deadline = time.monotonic() + 30
    found: set[tuple[str, str]] = set()
    while found != wanted and time.monotonic() < deadline:
        for line in (rig.node.data_dir / "audit.jsonl").read_text().splitlines():
            event = json.loads(line)
            identification = event["EventIdentification"]
            users = {p["UserID"] for p in event["ActiveParticipant"]}
            for calling, description in wanted:
                if (calling in users and identification["EventOutcomeIndicator"] == 8
                        and identification.get("EventOutcomeDescription") == description):
                    found.add((calling, description))
        time.sleep(0.2)
    assert found == wanted


# --- DICOMweb users ----------------------------------------------------------------------

def test_without_credentials_every_route_asks_for_them(rig: Rig) -> None:
    client = session(rig.pki)
    for url in (f"{web(rig.node)}/studies", f"{viewer(rig.node)}/",
                f"{viewer(rig.node)}/dicom-web/studies"):
        answer = client.get(url, timeout=30)
        assert answer.status_code == 401, url
        assert answer.headers["WWW-Authenticate"].startswith("Basic"), url


def test_a_wrong_password_is_401(rig: Rig) -> None:
    answer = session(rig.pki).get(f"{web(rig.node)}/studies", auth=("reader", "nope"),
                                  timeout=30)
    assert answer.status_code == 401


def test_forged_host_headers_still_get_421(rig: Rig) -> None:
    answer = session(rig.pki).get(f"{web(rig.node)}/studies", timeout=30,
                                  headers={"Host": "rebound.example"})
    assert answer.status_code == 421


def test_each_role_reads_writes_or_is_refused(rig: Rig) -> None:
    """read: QIDO-RS, WADO-RS, the viewer; write: STOW-RS; 403 without the role."""
    ct = fresh_ct(PatientID="RIGHTS-WEB")
    for user in USERS:
        reads = session(rig.pki)
        reads.auth = basic(user)
        client = DICOMwebClient(web(rig.node), session=reads)
        found = client.search_for_studies(search_filters={"StudyInstanceUID": rig.study})
        assert [s["0020000D"]["Value"][0] for s in found] == [rig.study], user
        back = client.retrieve_instance(rig.study, rig.series, rig.sop)
        assert back.SOPInstanceUID == rig.sop
        assert reads.get(f"{viewer(rig.node)}/", timeout=30).status_code == 200
    reader = DICOMwebClient(web(rig.node), session=_session(rig, "reader"))
    with pytest.raises(requests.HTTPError) as refused:
        reader.store_instances([ct])
    assert refused.value.response.status_code == 403
    assert ct.SOPInstanceUID not in rig.node.index()
    writer = DICOMwebClient(web(rig.node), session=_session(rig, "writer"))
    stored = writer.store_instances([ct])
    assert "FailedSOPSequence" not in stored
    assert ct.SOPInstanceUID in rig.node.index()


def test_delete_needs_the_admin_role(rig: Rig) -> None:
    """DELETE (PACS_WEB_DELETE on): the writer is refused (403) and the study stays; the
    admin removes it."""
    ct = fresh_ct(PatientID="RIGHTS-DELETE")
    DICOMwebClient(web(rig.node), session=_session(rig, "writer")).store_instances([ct])
    url = f"{web(rig.node)}/studies/{ct.StudyInstanceUID}"
    assert _session(rig, "writer").delete(url, timeout=30).status_code == 403
    assert ct.SOPInstanceUID in rig.node.index()
    assert _session(rig, "boss").delete(url, timeout=30).status_code in (200, 204)
    assert ct.SOPInstanceUID not in rig.node.index()


def test_the_audit_trail_names_the_user_and_the_refusals(rig: Rig) -> None:
    _session(rig, "reader").get(f"{web(rig.node)}/studies", timeout=30)
    _session(rig, "reader").post(f"{web(rig.node)}/studies", timeout=30, data=b"",
                                 headers={"Content-Type": "multipart/related; "
                                          "type=\"application/dicom\"; boundary=x"})
    trail = (rig.node.data_dir / "audit.jsonl").read_text().splitlines()
    assert any('"UserID":"reader"' in line and '"EventOutcomeIndicator":0' in line
               for line in trail)
    assert any('"UserID":"reader"' in line and '"EventOutcomeIndicator":8' in line
               and "HTTP 403" in line for line in trail)


def _session(rig: Rig, user: str) -> requests.Session:
    made = session(rig.pki)
    made.auth = basic(user)
    return made


def test_pacs_passwd_prints_a_hash_the_node_accepts(rig: Rig) -> None:
    result = rig.node.cli("passwd", "--token")
    token = result.stdout.split(": ", 1)[1].splitlines()[0]
    digest = result.stdout.split('"')[1]
    assert access.hash_token(token) == digest
    entered = subprocess.run(
        [sys.executable, "-m", "pacs", "passwd"], input="pw-123\npw-123\n", capture_output=True,
        text=True, timeout=60, cwd=rig.node.root, env=rig.node.env, check=False)
    assert "pw-123" not in entered.stdout
    hashed = entered.stdout.split('"')[1]
    assert access.verify_password("pw-123", hashed)
    assert not access.verify_password("pw-124", hashed)
    assert base64.b64decode(hashed.split("$")[4])  # a salt


