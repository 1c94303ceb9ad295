"""The customers file (pacs.core.customers) and the choice of a request's customer
(adapters.http.customers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.http.auth import Access, Verdict
from adapters.http.customers import CustomerRouter
from pacs.core import config
from pacs.core.customers import chosen, customers, parse, single
from pacs.core.errors import ConfigError


def _node(tmp_path: Path, **env: str) -> config.Settings:
    return config.load(environ={"PACS_DATA_DIR": str(tmp_path / "data"), **env},
                       env_file=None)


def _file(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "customers.toml"
    path.write_text(text, encoding="utf-8")
    return _node(tmp_path, PACS_CUSTOMERS_FILE=str(path))


TWO = """
[[customer]]
name = "north"
ae_titles = ["NORTH", "NORTH2"]
hosts = ["North.Example"]
modalities = "WS=10.0.0.5:104"

[[customer]]
name = "south"
ae_titles = "SOUTH"
[customer.settings]
PACS_STORAGE = "s3"
PACS_S3_BUCKET = "south"
PACS_WEB_DELETE = true
PACS_DATA_DIR = "elsewhere"
[customer.access]
unknown_ae_rights = "echo"
[[customer.access.ae]]
title = "SOUTHCT"
rights = "echo,store"
"""


def test_each_customer_gets_the_node_settings_with_its_own(tmp_path: Path) -> None:
    node = _file(tmp_path, TWO)
    north, south = customers(node)
    assert (north.name, north.ae_titles, north.hosts) == ("north", ("NORTH", "NORTH2"),
                                                          ("north.example",))
    assert north.settings.customer == "north" and north.settings.ae_title == "NORTH"
    assert north.settings.data_dir == tmp_path / "data" / "north"
    assert north.settings.uploads_dir == tmp_path / "data" / "north" / "uploads"
    assert set(north.settings.destinations) == {"WS"}
    assert north.settings.web_hosts == ()
    assert north.settings.storage == "file" and not north.settings.web_delete
    assert south.settings.storage == "s3" and south.settings.s3_bucket == "south"
    assert south.settings.web_delete and south.settings.destinations == {}
    assert south.settings.data_dir == Path("elsewhere").absolute()
    tables = south.settings.access_tables
    assert tables is not None and [ae.title for ae in tables.aes] == ["SOUTHCT"]
    assert tables.unknown_ae_rights == {"echo"} and north.settings.access_tables is None
    # The node's own values are kept; no customer's settings name the file again.
    assert south.settings.dimse_port == node.dimse_port
    assert not north.settings.customers_file
    assert chosen(node, "south") == south
    with pytest.raises(ConfigError, match="no customer 'west'"):
        chosen(node, "west")


def test_without_a_file_the_one_customer_is_customer(tmp_path: Path) -> None:
    node = _node(tmp_path, CUSTOMER="solo", PACS_AE_TITLE="SOLO")
    assert customers(node) == (single(node),)
    assert chosen(node).settings is node
    assert chosen(node).ae_titles == ("SOLO",)
    assert node.data_dir == tmp_path / "data"


def test_upload_folders_are_never_shared(tmp_path: Path) -> None:
    node = _node(tmp_path, PACS_UPLOADS_DIR=str(tmp_path / "up"))
    north, south = parse({"customer": [{"name": "north", "ae_titles": "N"},
                                       {"name": "south", "ae_titles": "S"}]}, node)
    assert north.settings.uploads_dir == tmp_path / "up" / "north"
    assert south.settings.uploads_dir == tmp_path / "up" / "south"


@pytest.mark.parametrize("setting", ["PACS_ROUTES", "PACS_ROUTES_FILE"])
def test_routes_set_for_the_node_beside_customers_are_refused(tmp_path: Path,
                                                              setting: str) -> None:
    """Each customer inherited them: south's studies went to the archive north's route
    named.  A customer's own routes are still its own."""
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\nname = "all"\nto = "https://north.example/dicom-web"\n')
    value = "all: -> https://north.example/dicom-web" if setting == "PACS_ROUTES" \
        else str(routes)
    node = _node(tmp_path, **{setting: value})
    with pytest.raises(ConfigError, match=r"\[customer\.settings\]"):
        parse({"customer": [{"name": "north", "ae_titles": "N"},
                            {"name": "south", "ae_titles": "S"}]}, node)
    north, south = parse({"customer": [
        {"name": "north", "ae_titles": "N", "settings": {setting: value}},
        {"name": "south", "ae_titles": "S"}]}, _node(tmp_path))
    assert [r.name for r in north.settings.routes] == ["all"] and not south.settings.routes


@pytest.mark.parametrize(("first", "second"), [
    ({"PACS_DATA_DIR": "one"}, {"PACS_DATA_DIR": "two/../one"}),
    ({"PACS_DATA_DIR": "one"}, {"PACS_DATA_DIR": "one/inner"}),
    ({"PACS_UPLOADS_DIR": "up"}, {"PACS_UPLOADS_DIR": "elsewhere/../up"}),
    ({"PACS_UPLOADS_DIR": "up"}, {"PACS_UPLOADS_DIR": "up/two"}),
    ({"PACS_DATA_DIR": "one"}, {"PACS_UPLOADS_DIR": "one/uploads-of-two"}),
    ({"PACS_DATA_DIR": "one"}, {"PACS_DATA_DIR": "link"}),
], ids=["dot-dot", "data-inside", "uploads-dot-dot", "uploads-inside",
        "uploads-in-data", "link"])
def test_folders_of_two_customers_never_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                first: dict[str, str],
                                                second: dict[str, str]) -> None:
    """Written differently (``..``, a link) or one inside the other, the same folder
    would hold both customers' data: one's C-FIND answered with the other's patients,
    one's upload watcher storing files dropped for the other."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "one")
    document = {"customer": [{"name": "a", "ae_titles": "A", "settings": first},
                             {"name": "b", "ae_titles": "B", "settings": second}]}
    with pytest.raises(ConfigError, match="overlap"):
        parse(document, _node(tmp_path))


def test_a_customer_s_upload_folder_never_holds_its_own_data_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One customer alone: its upload folder over its data folder would have the
    watcher delete its stored objects (:func:`pacs.core.config.check_folders`)."""
    monkeypatch.chdir(tmp_path)
    document = {"customer": [{"name": "a", "ae_titles": "A", "settings": {
        "PACS_DATA_DIR": "one", "PACS_UPLOADS_DIR": "one"}}]}
    with pytest.raises(ConfigError, match=r"customer 1 \(a\): PACS_UPLOADS_DIR .* holds the data"):
        parse(document, _node(tmp_path))


@pytest.mark.parametrize(("document", "message"), [
    ({}, "one \\[\\[customer\\]\\] table"),
    ({"customer": [{"name": "a", "ae_titles": "A"}], "other": 1}, "nothing else"),
    ({"customer": [{"name": "a/b", "ae_titles": "A"}]}, "letters, digits"),
    ({"customer": [{"name": "a"}]}, "at least one called AE title"),
    ({"customer": [{"name": "a", "ae_titles": "A" * 17}]}, "not an AE title"),
    ({"customer": [{"name": "a", "ae_titles": "A\\B"}]}, "not an AE title"),
    ({"customer": [{"name": "a", "ae_titles": "A", "colour": "red"}]}, "unknown key"),
    ({"customer": [{"name": "a", "ae_titles": "A",
                    "settings": {"PACS_DIMSE_PORT": "1"}}]}, "are the node's"),
    ({"customer": [{"name": "a", "ae_titles": "A",
                    "settings": {"PACS_STORAGE": "tape"}}]}, "PACS_STORAGE"),
    ({"customer": [{"name": "a", "ae_titles": "A", "modalities": "nonsense"}]},
     "PACS_MODALITIES"),
    ({"customer": [{"name": "a", "ae_titles": "A", "access": {"colour": "red"}}]},
     "access: unknown key"),
    ({"customer": [{"name": "a", "ae_titles": "A", "access": {},
                    "settings": {"PACS_ACCESS_FILE": "x.toml"}}]}, "not both"),
    ({"customer": [{"name": "a", "ae_titles": "A"}, {"name": "a", "ae_titles": "B"}]},
     "name 'a' belongs to two"),
    ({"customer": [{"name": "a", "ae_titles": "A"}, {"name": "b", "ae_titles": ["A"]}]},
     "AE title 'A' belongs to two"),
    # Without case: a modality upper-casing its called AE title, a file system
    # ignoring case in the folder names.
    ({"customer": [{"name": "a", "ae_titles": "NORTH"},
                   {"name": "b", "ae_titles": ["north"]}]},
     "AE title 'north' belongs to two customers \\(compared without case"),
    ({"customer": [{"name": "a", "ae_titles": "A"}, {"name": "A", "ae_titles": "B"}]},
     "name 'A' belongs to two"),
    ({"customer": [{"name": "a", "ae_titles": "A", "settings": {"PACS_UPLOADS_DIR": "up"}},
                   {"name": "b", "ae_titles": "B",
                    "settings": {"PACS_AUDIT_LOG": "up/trail.jsonl"}}]},
     "audit trail of customer 'b' .* is in the upload folder of customer 'a'"),
    ({"customer": [{"name": "a", "ae_titles": "A"},
                   {"name": "b", "ae_titles": "B",
                    "settings": {"PACS_AUDIT_LOG": "data/a/index.sqlite"}}]},
     "audit trail of customer 'b' .* is in the data folder of customer 'a'"),
    ({"customer": [{"name": "a", "ae_titles": "A", "hosts": "h"},
                   {"name": "b", "ae_titles": "B", "hosts": ["H"]}]},
     "host 'h' belongs to two"),
    ({"customer": [{"name": "a", "ae_titles": "A", "settings": {"PACS_DATA_DIR": "x"}},
                   {"name": "b", "ae_titles": "B", "settings": {"PACS_DATA_DIR": "x"}}]},
     "data folder"),
])
def test_mistakes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              document: dict[str, Any], message: str) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths are the working folder's
    with pytest.raises(ConfigError, match=message):
        parse(document, _node(tmp_path))


def test_customers_may_share_one_audit_trail_outside_their_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shared = {"PACS_AUDIT_LOG": str(tmp_path / "audit" / "all.jsonl")}
    north, south = parse({"customer": [{"name": "north", "ae_titles": "N", "settings": shared},
                                       {"name": "south", "ae_titles": "S", "settings": shared}]},
                         _node(tmp_path))
    assert north.settings.audit_log == south.settings.audit_log


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PACS_CUSTOMERS_FILE"):
        customers(_file(tmp_path, "[[customer]\nname ="))
    missing = _node(tmp_path, PACS_CUSTOMERS_FILE=str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match=r"none\.toml"):
        customers(missing)


def _app(name: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [f"{name} {environ['SCRIPT_NAME']} {environ['PATH_INFO']}".encode()]
    return app


@pytest.mark.parametrize(("host", "path", "answer"), [
    ("127.0.0.1:5985", "/studies", "north  /studies"),
    ("127.0.0.1", "/customers/south/dicom-web/studies",
     "south /customers/south /dicom-web/studies"),
    ("127.0.0.1", "/customers/south", "south /customers/south /"),
    ("South.Example:8080", "/", "south  /"),
    ("south.example", "/customers/south/studies", "south /customers/south /studies"),
    ("south.example", "/customers/north/studies", None),
    ("127.0.0.1", "/customers/west/studies", None),
])
def test_the_router_picks_by_prefix_then_host_then_default(
        host: str, path: str, answer: str | None) -> None:
    router = CustomerRouter({"north": _app("north"), "south": _app("south")},
                            {"south.example": "south"}, "north")
    statuses = []
    body = b"".join(router({"HTTP_HOST": host, "PATH_INFO": path, "SCRIPT_NAME": ""},
                           lambda status, headers: statuses.append(status)))
    if answer is None:
        assert statuses == ["404 Not Found"]
    else:
        assert body.decode() == answer


@pytest.mark.parametrize(("web_hosts", "verdict"), [
    ("", Verdict.MISDIRECTED), ("north.example", Verdict.ALLOW)])
def test_a_customer_s_host_name_grants_loopback_only_when_the_node_lists_it(
        tmp_path: Path, web_hosts: str, verdict: Verdict) -> None:
    """A reverse proxy on the node's host forwards a customer's clients from loopback
    with the customer's host name: they must show credentials (421 without), unless
    PACS_WEB_HOSTS names that host as this node's."""
    path = tmp_path / "customers.toml"
    path.write_text(TWO, encoding="utf-8")
    north = customers(_node(tmp_path, PACS_CUSTOMERS_FILE=str(path),
                            PACS_WEB_HOSTS=web_hosts))[0]
    rule = Access(north.settings)
    assert rule.decide("127.0.0.1", None, host="North.Example:443") is verdict
    assert rule.decide("127.0.0.1", None, host="localhost:5985") is Verdict.ALLOW


def test_without_a_default_the_root_is_not_found() -> None:
    router = CustomerRouter({"north": _app("north")}, {}, None)
    statuses: list[str] = []
    list(router({"HTTP_HOST": "localhost", "PATH_INFO": "/studies"},
                lambda status, headers: statuses.append(status)))
    assert statuses == ["404 Not Found"]



@pytest.mark.parametrize(("host", "script", "path", "answer"), [
    # A fully qualified name's root dot: the same host, the same customer.
    ("south.example.", "", "/studies", "south  /studies"),
    ("South.Example.:8080", "", "/customers/north/studies", None),
    # An application root (a proxy's SCRIPT_NAME header) naming a customer.
    ("127.0.0.1", "/customers/south", "/studies", None),
    ("127.0.0.1", "/pacs/customers/south", "/studies", None),
    ("127.0.0.1", "/pacs", "/customers/south/studies", "south /pacs/customers/south /studies"),
    # A root that names no customer of the node is any proxy's.
    ("127.0.0.1", "/customers", "/studies", "north /customers /studies"),
    ("127.0.0.1", "/imaging/customers/west", "/studies", "north /imaging/customers/west /studies"),
])
def test_no_spelling_of_a_host_or_root_reaches_another_customer(
        host: str, script: str, path: str, answer: str | None) -> None:
    """``south.example.`` went to the default customer (and a path under it to any
    customer), whose access rules, stripping the dot, then took it for a name of the
    node's; a ``SCRIPT_NAME`` of ``/customers/south`` left a path that named no
    customer, served by the default one with URLs naming south."""
    router = CustomerRouter({"north": _app("north"), "south": _app("south")},
                            {"south.example": "south"}, "north")
    statuses: list[str] = []
    body = b"".join(router({"HTTP_HOST": host, "PATH_INFO": path, "SCRIPT_NAME": script},
                           lambda status, headers: statuses.append(status)))
    if answer is None:
        assert statuses == ["404 Not Found"]
    else:
        assert body.decode() == answer


def test_a_customer_s_host_names_lose_their_root_dot(tmp_path: Path) -> None:
    path = tmp_path / "customers.toml"
    path.write_text(TWO.replace('"North.Example"', '"North.Example."'), encoding="utf-8")
    north = customers(_node(tmp_path, PACS_CUSTOMERS_FILE=str(path)))[0]
    assert north.hosts == ("north.example",)


def test_destinations_set_for_the_node_beside_customers_are_refused(
        tmp_path: Path) -> None:
    """A node-wide PACS_MODALITIES became every customer's C-MOVE destinations: north's
    studies could be moved to south's workstation."""
    with pytest.raises(ConfigError, match="PACS_MODALITIES"):
        parse({"customer": [{"name": "north", "ae_titles": "N"},
                            {"name": "south", "ae_titles": "S"}]},
              _node(tmp_path, PACS_MODALITIES="SOUTHWS=10.0.0.7:104"))
    # Blanks are no value.
    assert len(parse({"customer": [{"name": "north", "ae_titles": "N"}]},
                     _node(tmp_path, PACS_ROUTES=" "))) == 1
    north, south = parse({"customer": [
        {"name": "north", "ae_titles": "N", "modalities": "NORTHWS=10.0.0.5:104"},
        {"name": "south", "ae_titles": "S"}]}, _node(tmp_path))
    assert set(north.settings.destinations) == {"NORTHWS"} and not south.settings.destinations
