"""``X-Forwarded-Proto`` from another host never makes plain HTTP count as HTTPS.

The access rule (adapters/http/auth.py) evaluates credentials from other hosts only
over HTTPS, which it reads from ``wsgi.url_scheme``; gunicorn sets that scheme from
``X-Forwarded-Proto`` for the forwarders it trusts, by default loopback, unless the
environment says otherwise (``FORWARDED_ALLOW_IPS``, which container images often set
to ``*``).  The node pins the trusted forwarders to loopback, whatever the environment:
a client on another host that writes the header itself over plain HTTP still gets 403,
its password (sent in clear) never compared.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Callable

import pytest

from tests.interop.conftest import PATIENCE, Node
from tests.interop.test_ohif import host_address

pytestmark = [pytest.mark.interop, pytest.mark.hostile]

USER, PASSWORD = "alice", "sent-in-clear"


def get(address: str, port: int, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET /studies on ``address`` (read whole), from that address."""
    connection = http.client.HTTPConnection(address, port, timeout=30,
                                            source_address=(address, 0))
    try:
        connection.request("GET", "/studies", headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_forwarded_proto_header_from_another_host_is_not_https(
        node_factory: Callable[..., Node]) -> None:
    address = host_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    node = node_factory("forwarded", FORWARDED_ALLOW_IPS="*", PACS_BIND_ADDRESS="0.0.0.0",
                        PACS_WEB_WORKERS="1", PACS_VIEWER_PORT="0", PACS_UPLOADS_POLL="0",
                        PACS_WEB_USER=USER, PACS_WEB_PASSWORD=PASSWORD)
    port = int(node.env["PACS_WEB_PORT"])
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "X-Forwarded-Proto": "https",
               "X-Forwarded-Ssl": "on", "X-Forwarded-Protocol": "ssl"}
    deadline = time.monotonic() + PATIENCE
    status, body = get(address, port, headers)
    while status == 503 and time.monotonic() < deadline:  # the worker builds its app
        time.sleep(0.2)
        status, body = get(address, port, headers)
    assert status == 403, body
    assert json.loads(body)["title"] == "HTTPS required"
    # From loopback, a TLS proxy on this host, the same request is answered.
    assert get("127.0.0.1", port, headers)[0] == 200
