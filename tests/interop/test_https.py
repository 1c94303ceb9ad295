"""HTTPS on the real node: ``pacs serve`` with ``PACS_TLS_CERT``/``PACS_TLS_KEY``/``PACS_TLS_CA``
from a throwaway CA, against ``requests`` and ``dicomweb-client`` verifying that CA,
raw TLS sockets and plain-HTTP clients.

- DICOMweb (STOW-RS, QIDO-RS, WADO-RS with dicomweb-client) and the viewer's page and
  files are served over HTTPS; the URLs handed out say ``https``.
- Both ports speak HTTPS only: a plain HTTP request is answered 400 in clear, nothing
  else; TLS below 1.2 is refused by the node (its alert, not the client's refusal).
- Client certificates of the configured CA are taken, others refused in the handshake;
  none is required.
- Credentials are checked over HTTPS; from loopback they still work over plain HTTP (a
  node without TLS).  Requests from other hosts over plain HTTP (403) are checked in
  tests/service/test_access_https.py: no other host's address can be had here.
- Bytes OpenSSL decrypted ahead (a request pipelined behind a body) are answered.
- The container's health check speaks HTTPS; half a TLS configuration or an unreadable
  key stops ``pacs serve`` at once with a message naming the setting.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.interop.conftest import Node, fresh_ct
from tests.interop.tlsnode import (
    fake_dist,
    read_until_closed,
    session,
    start_tls_node,
    statuses,
    tls_connect,
    viewer,
    web,
)
from tests.tlsfiles import Pki, make_pki

pytestmark = pytest.mark.interop

USER, PASSWORD = "alice", "s3cret-password"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_dist(tmp_path_factory.mktemp("ohif") / "dist")


@pytest.fixture(scope="module")
def node(node_factory: Callable[..., Node], pki: Pki, dist: Path) -> Node:
    return start_tls_node(node_factory, "https", pki, dist, PACS_WEB_USER=USER,
                          PACS_WEB_PASSWORD=PASSWORD)


def ports(node: Node) -> list[int]:
    return [int(node.env["PACS_WEB_PORT"]), int(node.env["PACS_VIEWER_PORT"])]


def test_dicomweb_client_stores_searches_and_retrieves_over_https(node: Node,
                                                                  pki: Pki) -> None:
    client = DICOMwebClient(web(node), session=session(pki))
    small = fresh_ct(PatientID="HTTPS-1")
    large = fresh_ct(PatientID="HTTPS-1", Rows=1200, Columns=1200)
    # 2.9 MB of pixels: a body streamed to the application while it arrives.
    large.PixelData = np.random.default_rng(5).integers(
        0, 4000, (1200, 1200), dtype=np.uint16).tobytes()
    stored = client.store_instances([small, large])
    assert len(stored.ReferencedSOPSequence) == 2
    assert "FailedSOPSequence" not in stored
    for item in stored.ReferencedSOPSequence:
        assert item.RetrieveURL.startswith(f"{web(node)}/studies/")  # the scheme is https
    found = client.search_for_studies(search_filters={"PatientID": "HTTPS-1"})
    assert {s["0020000D"]["Value"][0] for s in found} == {small.StudyInstanceUID,
                                                         large.StudyInstanceUID}
    back = client.retrieve_instance(large.StudyInstanceUID, large.SeriesInstanceUID,
                                    large.SOPInstanceUID)
    assert back.SOPInstanceUID == large.SOPInstanceUID
    assert back.PixelData == large.PixelData
    metadata = client.retrieve_series_metadata(small.StudyInstanceUID,
                                               small.SeriesInstanceUID)
    assert metadata[0]["00080018"]["Value"] == [small.SOPInstanceUID]


def test_clients_verify_the_node_against_the_test_ca_only(node: Node, pki: Pki) -> None:
    health = session(pki).get(f"{web(node)}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    strangers = requests.Session()
    strangers.trust_env = False
    strangers.verify = str(pki.other_ca)
    with pytest.raises(requests.exceptions.SSLError):
        strangers.get(f"{web(node)}/health", timeout=30)


def test_the_viewer_page_and_files_over_https(node: Node, pki: Pki, dist: Path) -> None:
    client = session(pki)
    page = client.get(f"{viewer(node)}/", timeout=30)
    assert page.status_code == 200 and b"<title>viewer</title>" in page.content
    script = client.get(f"{viewer(node)}/app.0123456789abcdef.js", timeout=30)
    assert script.status_code == 200
    assert script.content == (dist / "app.0123456789abcdef.js").read_bytes()
    studies = client.get(f"{viewer(node)}/dicom-web/studies", timeout=30)
    assert studies.status_code == 200


@pytest.mark.parametrize("which", [0, 1], ids=["dicomweb", "viewer"])
def test_plain_http_to_an_https_port_is_answered_400_in_clear(node: Node, which: int) -> None:
    port = ports(node)[which]
    answer = requests.get(f"http://127.0.0.1:{port}/studies", timeout=30)
    assert answer.status_code == 400
    assert "HTTPS" in answer.text
    assert "0020000D" not in answer.text
    # With credentials too: nothing but the refusal, and the connection closes.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(f"GET /studies HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {basic(USER, PASSWORD)}\r\n\r\n".encode())
        everything = read_until_closed(raw)
    assert statuses(everything) == [400]


def test_tls_below_1_2_is_refused_by_the_node(node: Node, pki: Pki) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(pki.ca))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what it may
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    port = ports(node)[0]
    with (socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
          pytest.raises(ssl.SSLError) as raised):
        old.wrap_socket(raw, server_hostname="localhost")
    # The node's alert (the client did offer TLS 1.1).
    assert "ALERT_PROTOCOL_VERSION" in str(raised.value).upper()
    tls12 = ssl.create_default_context(cafile=str(pki.ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with (socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
          tls12.wrap_socket(raw, server_hostname="localhost") as sock):
        assert sock.version() == "TLSv1.2"
        cipher = sock.cipher()
        assert cipher is not None and cipher[0].startswith(("ECDHE-", "DHE-"))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert statuses(read_until_closed(sock)) == [200]


def test_client_certificates_of_the_ca_only(node: Node, pki: Pki) -> None:
    url = f"{web(node)}/studies"
    assert session(pki, (pki.client_cert, pki.client_key)).get(url, timeout=30).status_code \
        == 200
    assert session(pki).get(url, timeout=30).status_code == 200  # asked, not required
    with pytest.raises(requests.exceptions.RequestException):
        answer = session(pki, (pki.other_cert, pki.other_key)).get(url, timeout=30)
        pytest.fail(f"a certificate of another CA got {answer.status_code}")


def test_credentials_over_https_are_checked(node: Node, pki: Pki) -> None:
    # From loopback with a Host that does not name the node, only credentials pass.
    client = session(pki)
    host = {"Host": "pacs.hospital.example"}
    good = client.get(f"{web(node)}/studies", timeout=30,
                      headers={**host, "Authorization": basic(USER, PASSWORD)})
    assert good.status_code == 200
    wrong = client.get(f"{web(node)}/studies", timeout=30,
                       headers={**host, "Authorization": basic(USER, "guess")})
    assert wrong.status_code == 421


def test_a_request_decrypted_ahead_of_time_is_answered(node: Node, pki: Pki) -> None:
    # The head first; then, in one TLS record, the body and a second request: the loop
    # reads the body's 30 bytes and leaves the rest decrypted in OpenSSL's buffer, which
    # no poll reports.  Without the loop looking there, the second request would wait
    # until the keep-alive timeout closed the connection.
    body = b"x" * 30
    with tls_connect(ports(node)[0], pki) as sock:
        sock.sendall(b"POST /studies HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/dicom\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.5)
        sock.sendall(body + b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n")
        sock.settimeout(10)  # well below PACS_HTTP_KEEPALIVE (15 s)
        answers = statuses(read_until_closed(sock))
    assert len(answers) == 2 and answers[1] == 200, answers
    assert 400 <= answers[0] < 500  # 30 bytes are no DICOM object


def test_the_health_check_speaks_https(node: Node) -> None:
    checked = subprocess.run([sys.executable, "-m", "pacs.node.healthcheck"], cwd=node.root,
                             env=node.env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "ok"


@pytest.fixture(scope="module")
def plain(node_factory: Callable[..., Node]) -> Node:
    return node_factory("plain-credentials", PACS_WEB_WORKERS="1", PACS_VIEWER_PORT="0",
                        PACS_UPLOADS_POLL="0", PACS_WEB_USER=USER, PACS_WEB_PASSWORD=PASSWORD)


def test_loopback_credentials_still_work_over_plain_http(plain: Node) -> None:
    # A TLS proxy on the node's host forwards its clients' credentials over plain HTTP
    # with their Host (not one of the node's names): the node checks them.
    deadline = time.monotonic() + 60
    url = f"{plain.web_url()}/studies"
    while requests.get(url, timeout=10).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    host = {"Host": "pacs.hospital.example"}
    good = requests.get(url, timeout=30,
                        headers={**host, "Authorization": basic(USER, PASSWORD)})
    assert good.status_code == 200 and isinstance(good.json(), list)
    wrong = requests.get(url, timeout=30, headers={**host, "Authorization": basic(USER, "x")})
    assert wrong.status_code == 421


@pytest.mark.parametrize(("settings", "message"), [
    ({"PACS_TLS_CERT": "{cert}"}, "PACS_TLS_CERT and PACS_TLS_KEY go together"),
    ({"PACS_TLS_KEY": "{key}"}, "PACS_TLS_CERT and PACS_TLS_KEY go together"),
    ({"PACS_TLS_CERT": "{cert}", "PACS_TLS_KEY": "{missing}"}, "PACS_TLS_KEY: cannot read"),
    ({"PACS_TLS_CERT": "{cert}", "PACS_TLS_KEY": "{folder}"}, "PACS_TLS_KEY: cannot read"),
    ({"PACS_TLS_CERT": "{cert}", "PACS_TLS_KEY": "{wrong_key}"}, "PACS_TLS_KEY"),
])
def test_a_broken_tls_configuration_stops_pacs_serve_at_once(
        node_factory: Callable[..., Node], pki: Pki, tmp_path: Path,
        settings: dict[str, str], message: str) -> None:
    names = {"cert": pki.server_cert, "key": pki.server_key, "missing": tmp_path / "none.key",
             "folder": tmp_path, "wrong_key": pki.client_key}
    broken = node_factory("broken-tls", start=False,
                          **{k: v.format(**names) for k, v in settings.items()})
    result = broken.cli("serve", timeout=120)  # refused at start: it exits
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
