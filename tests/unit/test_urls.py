"""The service root of the URLs DICOMweb answers hand out (adapters/dicomweb/urls.py):
forwarding headers believed from a proxy on this host only, hosts that are hosts."""

from __future__ import annotations

import falcon.testing
import pytest

from adapters.dicomweb.urls import service_root

PROXY, CLIENT = "127.0.0.1", "10.20.30.40"
FORWARDED = {"X-Forwarded-Host": "pacs.example.org", "X-Forwarded-Proto": "https"}


def _root(remote: str, headers: dict[str, str], host: str = "node.local:5985") -> str:
    req = falcon.testing.create_req(host=host.partition(":")[0], port=5985,
                                    remote_addr=remote, headers={"Host": host, **headers})
    return service_root(req, "/dicom-web")


def test_a_proxy_on_this_host_names_the_public_host_and_scheme() -> None:
    assert _root(PROXY, FORWARDED) == "https://pacs.example.org/dicom-web"
    assert _root(PROXY, {"Forwarded": "host=pacs.example.org;proto=https"}) == \
        "https://pacs.example.org/dicom-web"


def test_another_host_is_not_believed_about_host_or_scheme() -> None:
    """RFC 7239 8.1: any client may write the headers; from another host they are
    ignored (as gunicorn ignores its scheme headers)."""
    assert _root(CLIENT, FORWARDED) == "http://node.local:5985/dicom-web"
    assert _root(CLIENT, {"Forwarded": "host=evil.example;proto=https"}) == \
        "http://node.local:5985/dicom-web"


@pytest.mark.parametrize("remote, headers, host", [
    (PROXY, {"X-Forwarded-Host": "h" * 60_000}, "node.local:5985"),
    (PROXY, {"X-Forwarded-Host": "a.example, b.example"}, "node.local:5985"),
    (CLIENT, {}, "x" * 8000),
    (CLIENT, {}, "node.local:5985/../evil"),
], ids=["60 KB forwarded host", "two forwarded hosts", "8 KB Host", "a path in Host"])
def test_a_host_that_is_not_one_is_replaced(
        remote: str, headers: dict[str, str], host: str) -> None:
    """The host goes into every URL of an answer (a QIDO-RS row, a BulkDataURI): one
    of 60 KB made a 10,000-row answer 600 MB.  What is not a host name or address with
    an optional port is replaced by ``localhost`` and the port the request reached."""
    assert _root(remote, headers, host) == "http://localhost:5985/dicom-web"


@pytest.mark.parametrize(("script_name", "root"), [
    ("/pacs", "http://node.local:5985/pacs/dicom-web"),
    ("/customers/north/", "http://node.local:5985/customers/north/dicom-web"),
    ("/" + "a" * 8000, "http://node.local:5985/dicom-web"),
    ('/x"><script>', "http://node.local:5985/dicom-web"),
], ids=["a path", "a customer's", "8 KB", "not a path"])
def test_the_application_root_is_a_short_path_or_left_out(script_name: str, root: str) -> None:
    """``SCRIPT_NAME`` (a proxy's header, through gunicorn) goes into every URL of an
    answer: 8 KB of it made a QIDO-RS answer of 0.73 MB 3.5 MB."""
    req = falcon.testing.create_req(host="node.local", port=5985, remote_addr=PROXY,
                                    root_path=script_name, headers={"Host": "node.local:5985"})
    assert service_root(req, "/dicom-web") == root
