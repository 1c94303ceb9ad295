"""The conformance statement (``pacs conformance``, :mod:`pacs.node.conformance`).

``docs/conformance.md`` is the statement of the default settings: regenerated here, it
must be identical (``pacs conformance --defaults -o docs/conformance.md`` updates it).
The statement follows the settings, and its Markdown drops nothing of its JSON form.
What the running node really accepts and serves is checked against the statement in
``tests/interop/test_conformance.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pacs.cli import main
from pacs.core import config
from pacs.node import conformance

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
REGENERATE = "pacs conformance --defaults -o docs/conformance.md"


def defaults() -> config.Settings:
    """The default settings: no environment, no .env."""
    return config.load(environ={}, env_file=None)


@pytest.fixture(scope="module")
def default_statement() -> dict[str, Any]:
    return conformance.statement(defaults())


def test_docs_conformance_md_is_current(default_statement: dict[str, Any]) -> None:
    expected = conformance.markdown(default_statement)
    assert DOC.is_file(), f"docs/conformance.md is missing: run `{REGENERATE}`"
    assert DOC.read_text(encoding="utf-8") == expected, (
        f"docs/conformance.md is stale: run `{REGENERATE}`")


def test_the_command_prints_the_same_statement(tmp_path: Path) -> None:
    runner = CliRunner()
    markdown = runner.invoke(main, ["conformance", "--defaults"])
    assert markdown.exit_code == 0, markdown.output
    assert markdown.output == DOC.read_text(encoding="utf-8")
    written = tmp_path / "statement.json"
    result = runner.invoke(main, ["conformance", "--defaults", "--format", "json",
                                  "-o", str(written)])
    assert result.exit_code == 0, result.output
    assert json.loads(written.read_text()) == conformance.statement(defaults())


def test_the_markdown_names_every_context_syntax_and_route(
        default_statement: dict[str, Any]) -> None:
    text = conformance.markdown(default_statement)
    for cx in default_statement["presentation_contexts"]:
        assert f"| {cx['sop_class']} |" in text
        for syntax in cx["transfer_syntaxes"]:
            assert f"| {syntax} |" in text
    for resource in default_statement["dicomweb"]["resources"]:
        for route in resource["routes"]:
            if not route.startswith("/dicom-web"):
                shown = route.replace(":path}", "}")
                assert f"`{resource['method']} {shown}`" in text
        for offer in resource["media_types"]:
            assert f"`{offer['media_type']}`" in text


def test_the_statement_follows_the_settings() -> None:
    settings = config.load(overrides={
        "PACS_AE_TITLE": "ARCHIVE7", "PACS_DIMSE_PORT": "11112", "PACS_WEB_PORT": "8042",
        "PACS_MAX_PDU": "65536", "PACS_MAX_ASSOCIATIONS": "5",
        "PACS_ALLOWED_CALLING_AETS": "CT1,MR2", "PACS_MODALITIES": "WS1=127.0.0.9:104",
        "PACS_PN_CASE_SENSITIVE": "true", "PACS_WEB_OPEN": "true"},
        environ={}, env_file=None)
    data = conformance.statement(settings)
    assert data["network"]["ae_title"] == "ARCHIVE7"
    assert data["network"]["dimse_port"] == 11112
    assert data["dicomweb"]["port"] == 8042
    assert data["association"]["max_pdu_receive"] == 65536
    assert data["association"]["max_associations_per_worker"] == 5
    assert data["security"]["calling_ae_titles"] == ["CT1", "MR2"]
    assert data["initiation"]["destinations"] == [
        {"ae_title": "WS1", "host": "127.0.0.9", "port": 104, "tls": False}]
    text = conformance.markdown(data)
    for fact in ("`ARCHIVE7`", "| 11112 |", "port 8042", "65536 bytes", "`CT1`, `MR2`",
                 "| WS1 | 127.0.0.9 | 104 | No |", "case-sensitive", "PACS_WEB_OPEN=true",
                 "the Calling AE Title has no rights"):
        assert fact in text, fact
    assert "the Calling AE Title" not in conformance.markdown(
        conformance.statement(defaults()))


def test_the_security_section_says_whether_the_http_ports_serve_https() -> None:
    # Only the settings are read (the files are checked by `pacs serve`).
    settings = config.load(overrides={"PACS_TLS_CERT": "/etc/pacs/cert.pem",
                                      "PACS_TLS_KEY": "/etc/pacs/key.pem",
                                      "PACS_TLS_CA": "/etc/pacs/clients.pem"},
                           environ={}, env_file=None)
    tls = conformance.markdown(conformance.statement(settings))
    plain = conformance.markdown(conformance.statement(defaults()))
    assert "HTTPS only on the DICOMweb and viewer ports" in tls
    assert "client certificates of `PACS_TLS_CA`" in tls
    assert "plain HTTP on the DICOMweb and viewer ports" in plain
    assert "HTTPS only on the DICOMweb and viewer ports" not in plain
    assert "audit messages of PS3.15 A.5" in plain
    off = config.load(overrides={"PACS_AUDIT_LOG": "off"}, environ={}, env_file=None)
    assert "no audit trail" in conformance.markdown(conformance.statement(off))


def test_the_security_section_states_the_limit_of_failed_logins() -> None:
    plain = conformance.markdown(conformance.statement(defaults()))
    assert "after 10 failed logins within 60 s from one client address" in plain
    assert "429 with Retry-After" in plain
    assert "User Authentication for each failed DICOMweb login" in plain
    off = config.load(overrides={"PACS_AUTH_FAILURES": "0"}, environ={}, env_file=None)
    text = conformance.markdown(conformance.statement(off))
    assert "failed logins are not limited" in text and "429" not in text


def test_the_security_section_names_the_audit_events_of_files_and_of_the_trail() -> None:
    plain = conformance.markdown(conformance.statement(defaults()))
    assert "Import for each `pacs import` and each scan of the upload folder" in plain
    assert "Audit Log Used for each reading of the trail by `pacs audit`" in plain


def test_the_security_section_names_the_dicom_tls_profile_and_port() -> None:
    settings = config.load(overrides={
        "PACS_DIMSE_PORT": "0", "PACS_DIMSE_TLS_PORT": "2762",
        "PACS_DIMSE_TLS_CERT": "/etc/pacs/ae.pem", "PACS_DIMSE_TLS_KEY": "/etc/pacs/ae.key",
        "PACS_DIMSE_TLS_CA": "/etc/pacs/modalities.pem",
        "PACS_MODALITIES": "ARCHIVE=archive.example.org:2762:tls"},
        environ={}, env_file=None)
    data = conformance.statement(settings)
    assert data["security"]["profiles"] == [conformance.TLS_PROFILE]
    text = conformance.markdown(data)
    for fact in ("DICOM TLS on port 2762 (`PACS_DIMSE_TLS_PORT`)", "the plain port off",
                 "client certificates of `PACS_DIMSE_TLS_CA` required",
                 "| DIMSE SCP (TLS) | INTELPIXEL | 2762 |",
                 "| ARCHIVE | archive.example.org | 2762 | Yes |",
                 "BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile"):
        assert fact in text, fact
    assert "| DIMSE SCP | INTELPIXEL |" not in text
    plain = conformance.markdown(conformance.statement(defaults()))
    assert "DIMSE: plain TCP only" in plain
    assert "| DIMSE SCP | INTELPIXEL | 32773 |" in plain


def test_extended_negotiation_is_what_the_handler_answers(
        default_statement: dict[str, Any]) -> None:
    found = {e["sop_class"]: e for e in default_statement["extended_negotiation"]}
    study_find = found["1.2.840.10008.5.1.4.1.2.2.1"]["supported"]
    assert study_find == {"Relational-queries": True, "Date-time matching": False,
                          "Fuzzy semantic matching of person names": False,
                          "Timezone query adjustment": False,
                          "Enhanced Multi-Frame Image Conversion": False,
                          "Empty value matching": True, "Multiple value matching": True}
    assert not found["1.2.840.10008.5.1.4.1.2.2.2"]["answered"]  # Study Root MOVE


def test_a_resource_without_a_description_fails_the_generation() -> None:
    class Unknown:
        def on_get(self) -> None:  # pragma: no cover - never served
            pass

    with pytest.raises(ValueError, match="Unknown"):
        conformance._describe(Unknown())
