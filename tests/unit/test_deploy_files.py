"""compose.yml, the Dockerfile and .dockerignore, checked statically (no Docker engine
runs here): services, ports, network, volumes, healthchecks, environment, and that
what the image runs exists in this package."""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml  # type: ignore[import-untyped]

from pacs.core import config

ROOT = Path(__file__).resolve().parents[2]
SETTING_NAMES = {s.env for s in config.SETTINGS}
#: ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}`` in compose files.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def plain(text: str) -> str:
    """A compose value with its variables reduced to ``${NAME}``."""
    return _VARIABLE.sub(lambda m: "${" + m.group(1) + "}", str(text))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


# --- a tiny Dockerfile parser ---------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its arguments (continuations joined)."""

    keyword: str
    args: str
    stage: int  # 0-based build stage it belongs to


def dockerfile() -> list[Instruction]:
    """The instructions of ./Dockerfile; comments dropped, ``\\`` lines joined."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    found = dockerfile()
    last = max(i.stage for i in found)
    return [i for i in found if i.stage == last]


def exec_form(args: str) -> list[str]:
    """``["a", "b"]`` (JSON exec form) as a list; shell form is refused."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> ``module:function``."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    entries = parser["options.entry_points"]["console_scripts"]
    pairs = (line.split("=", 1) for line in entries.strip().splitlines() if "=" in line)
    return {name.strip(): target.strip() for name, target in pairs}


def env_example_names() -> set[str]:
    return {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
            if "=" in line and not line.startswith("#")}


# --- compose.yml ------------------------------------------------------------------------

def networks(service: dict[str, Any]) -> set[str]:
    """The networks a service joins (compose's list form or map form)."""
    return set(service["networks"])


def test_services_are_pacs_and_minio_on_the_intelpixel_network(
        compose: dict[str, Any], services: dict[str, Any]) -> None:
    # OHIF is served by the pacs service (README, "Viewer"): no ohif container.  The
    # default (no profile) is the pair; the rest is the "distributed" profile.
    assert {name for name, s in services.items() if "profiles" not in s} == {"pacs", "minio"}
    assert compose["networks"]["intelpixel"]["name"] == "intelpixel"
    for name, service in services.items():
        assert networks(service) == {"intelpixel"}, name
        assert service["restart"] == "unless-stopped", name


def test_pacs_runs_under_an_init_that_reaps_orphaned_helpers(
        services: dict[str, Any]) -> None:
    # pacs serve is not an init: analyser helpers of a killed gunicorn worker would stay
    # zombies under it (pacs/core/analysers.py).
    assert services["pacs"]["init"] is True


def test_published_ports(services: dict[str, Any]) -> None:
    assert services["pacs"]["ports"] == ["32773:32773", "2762:2762", "5985:5985", "8080:8080"]
    assert services["minio"]["ports"] == ["9000:9000", "9001:9001"]
    assert '--console-address ":9001"' in services["minio"]["command"]


def test_volumes(services: dict[str, Any]) -> None:
    assert [plain(v) for v in services["pacs"]["volumes"]] == [
        "./dicom_data:/app/data", "./customer/${CUSTOMER}/uploads:/dcmfiles",
        "${PACS_TLS_DIR}:/run/pacs-tls:ro", "${PACS_ACCESS_DIR}:/run/pacs-access:ro"]
    assert [plain(v) for v in services["minio"]["volumes"]] == ["./customer/${CUSTOMER}:/data"]
    assert "server /data" in services["minio"]["command"]


def test_healthchecks(services: dict[str, Any]) -> None:
    minio = services["minio"]["healthcheck"]
    assert minio["interval"] == "30s" and minio["test"][0] == "CMD"
    pacs = services["pacs"]["healthcheck"]
    assert pacs["test"] == ["CMD", "python", "-m", "pacs.node.healthcheck"]
    assert importlib.util.find_spec("pacs.node.healthcheck") is not None
    assert services["pacs"]["depends_on"]["minio"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["pacs", "pacs-distributed"])
def test_pacs_environment_names_only_real_settings(services: dict[str, Any],
                                                   name: str) -> None:
    environment = services[name]["environment"]
    unknown = set(environment) - SETTING_NAMES
    assert not unknown, f"not pacs settings (typos?): {unknown}"


def test_pacs_is_configured_for_minio(services: dict[str, Any]) -> None:
    env = {k: plain(v) for k, v in services["pacs"]["environment"].items()}
    minio_env = {k: plain(v) for k, v in services["minio"]["environment"].items()}
    assert env["PACS_STORAGE"] == "s3"
    host, port = env["PACS_S3_ENDPOINT"].split(":")
    assert host == "minio" and f"{port}:{port}" in services["minio"]["ports"]
    assert env["PACS_S3_SECURE"] == "false"
    assert env["PACS_S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"] == "${MINIO_ROOT_USER}"
    assert env["PACS_S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"] == "${MINIO_ROOT_PASSWORD}"
    # Credentials are required, never defaulted in the file.
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert f"${{{name}:?" in services["minio"]["environment"][name]


def test_pacs_paths_and_ports_match_the_volumes_and_the_image(services: dict[str, Any]) -> None:
    env = services["pacs"]["environment"]
    targets = [v.split(":")[-1] for v in services["pacs"]["volumes"]]
    assert env["PACS_DATA_DIR"] in targets and env["PACS_UPLOADS_DIR"] in targets
    published = {p.split(":")[1] for p in services["pacs"]["ports"]}
    assert {env["PACS_DIMSE_PORT"], env["PACS_DIMSE_TLS_PORT"], env["PACS_WEB_PORT"],
            env["PACS_VIEWER_PORT"]} == published
    assert env["PACS_BIND_ADDRESS"] == "0.0.0.0"  # reachable through the published ports
    copied = [i.args.split()[-1] for i in final_stage() if i.keyword == "COPY"
              and i.args.startswith("--from=")]
    assert env["PACS_VIEWER_DIST"] in copied


def test_dicomweb_access_is_set_explicitly(services: dict[str, Any]) -> None:
    # Requests reach the container from the compose network, not loopback.
    env = services["pacs"]["environment"]
    assert env["PACS_WEB_OPEN"] == "false"
    assert env["PACS_WEB_USER"].startswith("${PACS_WEB_USER:?")
    assert env["PACS_WEB_PASSWORD"].startswith("${PACS_WEB_PASSWORD:?")


@pytest.mark.parametrize("name", ["pacs", "pacs-distributed"])
def test_compose_lets_known_aes_only_from_the_mounted_access_file(
        services: dict[str, Any], name: str) -> None:
    # Unknown AEs get no rights (A-ASSOCIATE-RJ); the file lists who may do what.
    env = services[name]["environment"]
    assert env["PACS_UNKNOWN_AE_RIGHTS"] == ""
    assert config.load(overrides={"PACS_UNKNOWN_AE_RIGHTS": env["PACS_UNKNOWN_AE_RIGHTS"]},
                       environ={}, env_file=None).unknown_ae_rights == frozenset()
    assert env["PACS_LOOPBACK_ROLES"] == "read"  # the healthcheck's GET /health
    mounts = {plain(v).split(":")[1]: v for v in services[name]["volumes"]}
    folder = str(Path(env["PACS_ACCESS_FILE"]).parent)
    assert mounts[folder].endswith(":ro")
    assert plain(mounts[folder]).startswith("${PACS_ACCESS_DIR}:")
    # The example the compose comment copies parses, and holds hashes only.
    from pacs.core import access

    example = ROOT / "access.example.toml"
    assert "cp access.example.toml access/" in (ROOT / "compose.yml").read_text()
    tables = access.load_file(example)
    assert tables.aes and all(ae.rights for ae in tables.aes)


@pytest.mark.parametrize("name", ["pacs", "pacs-distributed"])
def test_compose_serves_https_from_the_mounted_certificate(services: dict[str, Any],
                                                           name: str) -> None:
    # Other hosts may send credentials over HTTPS only (adapters/http/auth.py).
    env = services[name]["environment"]
    mounts = {plain(v).split(":")[1]: v for v in services[name]["volumes"]}
    folder = str(Path(env["PACS_TLS_CERT"]).parent)
    assert str(Path(env["PACS_TLS_KEY"]).parent) == folder
    assert mounts[folder].endswith(":ro")
    assert plain(mounts[folder]).startswith("${PACS_TLS_DIR}:")
    made = (ROOT / "scripts" / "make-cert.sh").read_text()
    for file in (Path(env["PACS_TLS_CERT"]).name, Path(env["PACS_TLS_KEY"]).name):
        assert file in made  # what the script writes is what compose reads


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(_VARIABLE.findall((ROOT / "compose.yml").read_text()))
    missing = used - env_example_names()
    assert not missing, f"compose variables missing from .env.example: {missing}"


def test_pacs_runs_the_images_command(services: dict[str, Any]) -> None:
    # `pacs serve` (the image's CMD), so compose gets the same HTTP server and worker
    # class as the embedded default.
    assert "command" not in services["pacs"] and "entrypoint" not in services["pacs"]


def test_http_limits_are_passed_with_the_settings_defaults(services: dict[str, Any]) -> None:
    env = services["pacs"]["environment"]
    defaults = {s.env: s.default for s in config.SETTINGS}
    for name in ("PACS_HTTP_TIMEOUT", "PACS_HTTP_KEEPALIVE", "PACS_MAX_REQUEST_BYTES"):
        assert env[name] == f"${{{name}:-{defaults[name]}}}", name


def test_pacs_may_hold_many_connections(services: dict[str, Any]) -> None:
    # An HTTP worker keeps up to 1000 connections, some with a spooled body's file.
    nofile = services["pacs"]["ulimits"]["nofile"]
    assert nofile["soft"] >= 4096 and nofile["hard"] >= nofile["soft"]


def test_both_http_ports_run_the_event_loop_worker(tmp_path: Path) -> None:
    from gunicorn.workers.base import Worker

    from pacs.node import viewer, webserver

    settings = config.load(overrides={"PACS_DATA_DIR": str(tmp_path)}, environ={},
                           env_file=None)
    for line in (webserver.command(settings, 3), viewer.command(settings, 3)):
        assert "gthread" not in line
        module, _, name = line[line.index("--worker-class") + 1].rpartition(".")
        worker = getattr(importlib.import_module(module), name)
        assert issubclass(worker, Worker) and worker.__module__ == "pacs.node.httpworker"


# --- compose.yml, profile "distributed" ------------------------------------------------

#: ``{1...4}``: MinIO's ellipsis notation for a sequence of hosts or drives.
_ELLIPSIS = re.compile(r"\{(\d+)\.\.\.(\d+)\}")
DISTRIBUTED = "distributed"


def expand(pattern: str) -> list[str]:
    """Every name a MinIO endpoint pattern stands for (``http://minio{1...2}/d{1...2}``
    gives four), as MinIO expands it."""
    match = _ELLIPSIS.search(pattern)
    if match is None:
        return [pattern]
    first, last = int(match.group(1)), int(match.group(2))
    assert first <= last, pattern
    return [name for number in range(first, last + 1)
            for name in expand(pattern[:match.start()] + str(number) + pattern[match.end():])]


def profiled(services: dict[str, Any]) -> dict[str, Any]:
    """The services of the "distributed" profile."""
    return {name: s for name, s in services.items() if DISTRIBUTED in s.get("profiles", [])}


def minio_set(services: dict[str, Any]) -> dict[str, Any]:
    """The MinIO servers of the distributed set."""
    return {name: s for name, s in profiled(services).items() if name.startswith("minio")}


def set_endpoints(services: dict[str, Any]) -> list[str]:
    """The drives of the erasure set, as ``http://host/path``, from the servers' common
    command (MinIO requires every server to be started with the same one)."""
    commands = {s["command"] for s in minio_set(services).values()}
    assert len(commands) == 1, commands
    words = next(iter(commands)).split()
    assert words[0] == "server"
    return [drive for word in words[1:] if word.startswith("http://")
            for drive in expand(word)]


def test_the_profile_is_four_minio_servers_and_a_node(services: dict[str, Any]) -> None:
    assert set(profiled(services)) == {"pacs-distributed", "minio1", "minio2", "minio3",
                                       "minio4"}
    # The default pair is not part of it (naming pacs-distributed starts the set only).
    assert "minio" not in services["pacs-distributed"]["depends_on"]


def test_the_set_is_distributed_and_erasure_coded(services: dict[str, Any]) -> None:
    servers = minio_set(services)
    drives = set_endpoints(services)
    assert len(drives) == len(set(drives)) == 8
    hosts = {d.removeprefix("http://").split("/")[0] for d in drives}
    # Every host of the command is a server of the set, reachable by its name, and
    # knows itself by it.
    assert hosts == set(servers)
    for name, server in servers.items():
        assert server["hostname"] == name
        assert "server" in server["command"] and '--console-address ":9001"' in server["command"]
    # Erasure coding needs at least 4 drives; the same count on each server.
    per_host = {h: [d for d in drives if d.startswith(f"http://{h}/")] for h in hosts}
    assert len({len(paths) for paths in per_host.values()}) == 1
    assert len(drives) >= 4 and len(hosts) >= 4


def test_each_drive_is_a_volume_of_its_own(compose: dict[str, Any],
                                           services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    sources: list[str] = []
    for name, server in minio_set(services).items():
        mounts = dict(v.split(":")[::-1] for v in server["volumes"])  # target -> source
        paths = sorted(d.split("/", 3)[3] for d in set_endpoints(services)
                       if d.startswith(f"http://{name}/"))
        assert sorted(t.lstrip("/") for t in mounts) == paths, name
        for source in mounts.values():
            assert source in declared, source  # a named volume, not a shared folder
        sources += mounts.values()
    assert len(sources) == len(set(sources)), "two drives share a volume"


def test_the_set_runs_minio_like_the_single_server(services: dict[str, Any]) -> None:
    single = services["minio"]
    for name, server in minio_set(services).items():
        assert server["image"] == single["image"], name
        assert server["environment"] == single["environment"], name
        assert server["healthcheck"] == single["healthcheck"], name
    # The S3 API and console of the set are published once, on its first server.
    published = [p for s in minio_set(services).values() for p in s.get("ports") or []]
    assert sorted(published) == sorted(single["ports"])


def test_pacs_distributed_points_at_every_server_of_the_set(
        services: dict[str, Any]) -> None:
    node = services["pacs-distributed"]
    env = {k: plain(v) for k, v in node["environment"].items()}
    host, port = env["PACS_S3_ENDPOINT"].split(":")
    # The endpoint is an alias that every server of the set answers to, and no other
    # service (the single minio must not receive the node's requests).
    holders = {name for name, s in services.items()
               if isinstance(s["networks"], dict)
               and host in (s["networks"]["intelpixel"] or {}).get("aliases", [])}
    assert holders == set(minio_set(services))
    assert port == "9000"
    assert env["PACS_STORAGE"] == "s3" and env["PACS_S3_SECURE"] == "false"
    minio_env = {k: plain(v) for k, v in services["minio1"]["environment"].items()}
    assert env["PACS_S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"]
    assert env["PACS_S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert {name: d["condition"] for name, d in node["depends_on"].items()} == dict.fromkeys(
        minio_set(services), "service_healthy")


def test_pacs_distributed_is_the_node_with_its_own_index(services: dict[str, Any]) -> None:
    node, single = services["pacs-distributed"], services["pacs"]
    for key in ("image", "init", "user", "ports", "healthcheck", "ulimits", "restart"):
        assert node[key] == single[key], key
    changed = {k for k in set(node["environment"]) | set(single["environment"])
               if node["environment"].get(k) != single["environment"].get(k)}
    assert changed == {"PACS_S3_ENDPOINT"}
    data = [v for v in node["volumes"] if v.endswith(":/app/data")]
    assert data and data != [v for v in single["volumes"] if v.endswith(":/app/data")]
    assert node["environment"]["PACS_DATA_DIR"] == "/app/data"


# --- Dockerfile -------------------------------------------------------------------------

def test_final_image_is_slim_python_as_a_non_root_user() -> None:
    stage = final_stage()
    base = stage[0]
    assert base.keyword == "FROM" and re.match(r"python:3\.1[1-9][-.\w]*-slim", base.args)
    users = [i.args for i in stage if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    keywords = [i.keyword for i in stage]
    assert keywords.index("USER") < keywords.index("CMD")


def test_the_package_is_installed() -> None:
    runs = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    assert "pip install ." in runs
    copied = [i.args.split()[0] for i in final_stage()
              if i.keyword == "COPY" and not i.args.startswith("--from")]
    for source in copied:
        assert (ROOT / source).exists(), source


def test_cmd_is_a_console_script_of_the_package() -> None:
    cmd = exec_form(next(i.args for i in final_stage() if i.keyword == "CMD"))
    assert cmd == ["pacs", "serve"]
    scripts = console_scripts()
    assert cmd[0] in scripts
    module, _, function = scripts[cmd[0]].partition(":")
    entry = getattr(importlib.import_module(module), function)
    assert isinstance(entry, click.Group) and cmd[1] in entry.commands


def test_healthcheck_hits_the_health_endpoint() -> None:
    check = next(i.args for i in final_stage() if i.keyword == "HEALTHCHECK")
    options, _, command = check.partition("CMD")
    assert "--interval=30s" in options
    assert exec_form(command.strip()) == ["python", "-m", "pacs.node.healthcheck"]
    source = (ROOT / "pacs" / "node" / "healthcheck.py").read_text()
    assert "/health" in source


def test_image_exposes_the_node_ports_and_sets_container_paths() -> None:
    stage = final_stage()
    exposed = " ".join(i.args for i in stage if i.keyword == "EXPOSE").split()
    assert exposed == ["32773", "5985", "8080"]
    env = " ".join(i.args for i in stage if i.keyword == "ENV")
    names = set(re.findall(r"\b(PACS_[A-Z0-9_]+)=", env))
    assert names <= SETTING_NAMES and "PACS_VIEWER_DIST" in names


def test_the_viewer_is_fetched_without_building_it() -> None:
    first = [i for i in dockerfile() if i.stage == 0]
    assert first[0].keyword == "FROM" and first[0].args.startswith("node:")
    assert any("fetch-ohif.sh --viewer-only" in i.args for i in first if i.keyword == "RUN")
    assert "npm pack" in (ROOT / "scripts" / "fetch-ohif.sh").read_text()


def test_dockerignore_keeps_data_and_secrets_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".env", ".git", "customer", "dicom_data", "dicom_data_distributed", "tls",
            "vendor", "node_modules"} <= ignored
    for needed in ("pacs", "adapters", "setup.cfg", "pyproject.toml", "README.md", "scripts"):
        assert needed not in ignored


def test_app_config_is_package_data() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    assert "app-config.js" in parser["options.package_data"]["adapters.viewer"]
    assert (ROOT / "adapters" / "viewer" / "app-config.js").is_file()
