"""Settings: precedence, parsing, documentation kept honest."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs.core import config
from pacs.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_design_contract() -> None:
    settings = config.load(environ={}, env_file=None)
    assert settings.ae_title == "INTELPIXEL"
    assert settings.dimse_port == 32773
    assert settings.web_port == 5985
    assert settings.viewer_port == 8080
    assert settings.storage == "file"
    assert settings.customer == "default"
    assert settings.data_dir == Path("customer/default").absolute()


def test_precedence_default_dotenv_environment_override(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PACS_AE_TITLE=FROMFILE\nPACS_DIMSE_PORT=1111\nCUSTOMER=acme\n")
    settings = config.load(environ={"PACS_DIMSE_PORT": "2222"}, env_file=env_file,
                           overrides={"CUSTOMER": "zeta"})
    assert settings.ae_title == "FROMFILE"
    assert settings.dimse_port == 2222
    assert settings.customer == "zeta"
    assert settings.data_dir == Path("customer/zeta").absolute()


@pytest.mark.parametrize("name, value", [
    ("PACS_DIMSE_PORT", "abc"),
    ("PACS_STORAGE", "ftp"),
    ("PACS_DUPLICATE_POLICY", "sometimes"),
    ("PACS_S3_SECURE", "maybe"),
    ("CUSTOMER", "../etc"),
    ("PACS_MODALITIES", "STORESCP=localhost"),
    ("PACS_RETENTION_DAYS", "CT=0"),
    ("PACS_RETENTION_DAYS", "CT=10,ct=20"),
    ("PACS_RETENTION_DAYS", "10,20"),
    ("PACS_RETENTION_DAYS", "CT=ten"),
    ("PACS_RETENTION_DAYS", "=10"),
    # No worker at all while the port listens: peers connect and are never answered.
    ("PACS_DIMSE_WORKERS", "-2"),
    # No limit at all, where the limit was meant: 0 and below are refused.
    ("PACS_MAX_ASSOCIATIONS", "0"),
    ("PACS_MAX_ASSOCIATIONS", "-3"),
    ("PACS_MAX_ASSOCIATIONS_PER_HOST", "0"),
    ("PACS_MAX_PENDING_CONNECTIONS", "0"),
    ("PACS_WEB_THREADS", "0"),
    ("PACS_QIDO_DEFAULT_LIMIT", "-1"),
    ("PACS_MAX_PDU", "-1"),
    # The watcher silently off (nan, -1), dead after its first scan (inf), spinning.
    ("PACS_UPLOADS_POLL", "nan"),
    ("PACS_UPLOADS_POLL", "-1"),
    ("PACS_UPLOADS_POLL", "inf"),
    ("PACS_UPLOADS_POLL", "1e-300"),
    ("PACS_WEB_PORT", "70000"),
    ("PACS_VIEWER_PORT", "-1"),
    ("PACS_HTTP_KEEPALIVE", "nan"),
    ("PACS_LOG_LEVEL", "bogus"),
    ("PACS_LOG_LEVEL", "BASIC_FORMAT"),  # a name of the logging module, not a level
])
def test_bad_values_are_refused_with_the_setting_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        config.load(environ={name: value}, env_file=None)


@pytest.mark.parametrize("value, level", [("warn", "WARNING"), ("Fatal", "CRITICAL"),
                                          (" debug ", "DEBUG")])
def test_log_levels_by_any_name_logging_gives_them(value: str, level: str) -> None:
    assert config.load(environ={"PACS_LOG_LEVEL": value}, env_file=None).log_level == level


def test_retention_parse() -> None:
    rules = config.load(environ={"PACS_RETENTION_DAYS": " 3650, mr=1825 ,CT=7300"},
                        env_file=None).retention
    assert rules == config.RetentionRules((("CT", 7300.0), ("MR", 1825.0)), 3650.0)
    assert rules.enabled
    assert config.parse_retention("CT=1").default is None
    assert not config.load(environ={}, env_file=None).retention.enabled
    for wrong in ("CT=1=2", "inf", "CT=nan", "=5", "C*T=3"):
        with pytest.raises(ValueError):
            config.parse_retention(wrong)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_a_positive_setting_is_a_finite_number(value: str) -> None:
    """``PACS_RETENTION_INTERVAL=nan`` made the retention loop spin (a wait of none),
    ``inf`` end it with an OverflowError."""
    with pytest.raises(ConfigError):
        config.load(environ={"PACS_RETENTION_INTERVAL": value}, env_file=None)


def test_modalities_parse() -> None:
    settings = config.load(environ={"PACS_MODALITIES": "A=127.0.0.1:104, B=host:11113"},
                           env_file=None)
    assert settings.destinations["A"] == config.Modality("A", "127.0.0.1", 104)
    assert settings.destinations["B"].port == 11113


def test_describe_masks_secrets() -> None:
    settings = config.load(environ={"PACS_S3_SECRET_KEY": "hunter2"}, env_file=None)
    described = dict(settings.describe())
    assert described["PACS_S3_SECRET_KEY"] == "****"
    assert "hunter2" not in repr(described)
    assert described["PACS_AE_TITLE"] == "INTELPIXEL"


def test_describe_masks_the_password_of_a_route_s_url() -> None:
    """A STOW-RS route may carry ``user:password@`` (README, Forwarding): ``pacs
    config`` shows the route with its password masked, as ``pacs status`` strips it."""
    routes = ("ai: modality=MR -> https://aiuser:R0utePassw0rd@ai.example/dicom-web; "
              "pacs: -> http://b:c%40d@h.example:8080/dicom-web")
    settings = config.load(environ={"PACS_ROUTES": routes}, env_file=None)
    shown = dict(settings.describe())["PACS_ROUTES"]
    assert "R0utePassw0rd" not in shown and "c%40d" not in shown
    assert "https://aiuser:****@ai.example/dicom-web" in shown
    assert "http://b:****@h.example:8080/dicom-web" in shown


def test_every_setting_is_documented_in_env_example_and_readme() -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for setting in config.SETTINGS:
        assert f"\n{setting.env}={setting.default}\n" in example, setting.env
        assert f"`{setting.env}`" in readme, setting.env
        assert setting.help


def test_every_setting_has_a_field() -> None:
    fields = set(config.Settings.__dataclass_fields__)
    assert {s.attr for s in config.SETTINGS} <= fields


def test_field_defaults_are_the_table_defaults() -> None:
    """Each default is written once, in SETTINGS: Settings() and load() without any
    source agree with it, value and type."""
    built, loaded = config.Settings(), config.load(environ={}, env_file=None)
    for setting in config.SETTINGS:
        expected = setting.parse(setting.default)
        for settings in (built, loaded):
            value = getattr(settings, setting.attr)
            if setting.attr == "data_dir":  # empty: the customer's folder
                assert value.absolute() == Path("customer/default").absolute()
                continue
            assert value == expected and type(value) is type(expected), setting.env


@pytest.mark.parametrize("name", ["PACS_ARTIM_TIMEOUT", "PACS_DIMSE_TIMEOUT", "PACS_HTTP_TIMEOUT",
                                  "PACS_MAX_OBJECT_BYTES", "PACS_QUERY_TIME_LIMIT"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_limits_and_timeouts_must_be_positive(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        config.load(environ={name: value}, env_file=None)


@pytest.mark.parametrize("token", ["None", "null", "undefined"])
def test_a_web_token_a_client_sends_for_none_is_refused(token: str) -> None:
    """``Authorization: Bearer None`` is taken as no credentials (what dicomweb_client
    sends without a token): a node token of that text could never log in."""
    with pytest.raises(ConfigError, match="PACS_WEB_TOKEN"):
        config.load(environ={"PACS_WEB_TOKEN": token}, env_file=None)


@pytest.mark.parametrize("uploads", ["data", "data/../data", ".", "link"])
def test_an_upload_folder_holding_the_data_folder_is_refused(
        tmp_path: Path, uploads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher takes every file of its folder for an upload and removes what it
    finds stored already: over the data folder it would delete the store's objects
    (each the same as the object it names) and move the index's lock files away."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(ConfigError, match="holds the data folder"):
        config.load(overrides={"PACS_DATA_DIR": "data", "PACS_UPLOADS_DIR": uploads},
                    environ={}, env_file=None)
    (tmp_path / "trail").mkdir()
    with pytest.raises(ConfigError, match=r"PACS_AUDIT_LOG .* is in the upload folder"):
        config.load(overrides={"PACS_DATA_DIR": "data", "PACS_UPLOADS_DIR": "trail",
                               "PACS_AUDIT_LOG": "trail/audit.jsonl"},
                    environ={}, env_file=None)
    for inside in ("data/objects", "data/objects/1.2.3", "data/intake", "data/locks"):
        with pytest.raises(ConfigError, match="inside the data folder"):
            config.load(overrides={"PACS_DATA_DIR": "data", "PACS_UPLOADS_DIR": inside},
                        environ={}, env_file=None)
    # Its default place (and below it), and any folder outside the data folder.
    for fine in ("", "data/uploads", "data/uploads/ct", "elsewhere"):
        assert config.load(overrides={"PACS_DATA_DIR": "data", "PACS_UPLOADS_DIR": fine},
                           environ={}, env_file=None).uploads_dir
