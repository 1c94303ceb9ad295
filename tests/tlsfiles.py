"""Throwaway certificates for the HTTPS tests, made with the ``openssl`` command (Debian's
``openssl`` package; no Python dependency).

:func:`make_pki` writes a test CA, a server certificate for ``localhost``/``127.0.0.1``/``::1``
signed by it, a client certificate signed by it, and a second CA with a client
certificate of its own (one the node must refuse).  EC P-256 keys: quick to make.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Days the certificates are valid (the test needs minutes).
DAYS = "2"


@dataclass(frozen=True)
class Pki:
    """The files of :func:`make_pki` (PEM)."""

    ca: Path             # the test CA's certificate: clients verify the node with it
    server_cert: Path    # PACS_TLS_CERT
    server_key: Path     # PACS_TLS_KEY
    client_cert: Path    # a client certificate signed by the test CA
    client_key: Path
    other_ca: Path       # another CA
    other_cert: Path     # a client certificate signed by the other CA
    other_key: Path


def openssl(*args: str, cwd: Path) -> None:
    """Run ``openssl ARGS`` in ``cwd``; fail the test with its output when it fails."""
    tool = shutil.which("openssl")
    if tool is None:
        pytest.fail("the openssl command is not installed (apt-get install openssl)")
    done = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def _ca(folder: Path, name: str, subject: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", DAYS,
            "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _leaf(folder: Path, name: str, subject: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", DAYS,
            "-extfile", f"{name}.ext", cwd=folder)


def make_pki(folder: Path) -> Pki:
    """Write the certificates and keys into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca", "/CN=pacs test CA")
    _leaf(folder, "server", "/CN=localhost", "ca",
          "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n")
    _leaf(folder, "client", "/O=pacs tests/CN=modality", "ca",
          "extendedKeyUsage=clientAuth\n")
    _ca(folder, "other-ca", "/CN=another CA")
    _leaf(folder, "other", "/CN=stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Pki(ca=folder / "ca.pem", server_cert=folder / "server.pem",
               server_key=folder / "server.key", client_cert=folder / "client.pem",
               client_key=folder / "client.key", other_ca=folder / "other-ca.pem",
               other_cert=folder / "other.pem", other_key=folder / "other.key")


def ae_certificate(pki: Pki, ae_title: str, *, server: bool = False,
                   ca: str = "ca", twin: str = "") -> tuple[Path, Path]:
    """(certificate, key) of a DICOM AE, subject CN = ``ae_title``, signed by the test
    CA (``ca="other-ca"``: by the other one) in the folder of ``pki``; ``server``: also
    a TLS server's (for ``localhost`` and ``127.0.0.1``); ``twin``: another certificate
    of the same title (another device calling with it)."""
    folder = pki.ca.parent
    name = f"ae-{ae_title.lower()}-{ca}{'-' + twin if twin else ''}"
    if not (folder / f"{name}.pem").exists():
        usage = "serverAuth,clientAuth" if server else "clientAuth"
        names = "subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server else ""
        _leaf(folder, name, f"/CN={ae_title}", ca, f"extendedKeyUsage={usage}\n{names}")
        (folder / f"{name}.key").chmod(0o600)
    return folder / f"{name}.pem", folder / f"{name}.key"


def encrypted_copy(key: Path, target: Path, passphrase: str = "secret") -> Path:
    """``key`` encrypted with a passphrase (a key the node must refuse to load)."""
    openssl("pkey", "-in", str(key), "-aes256", "-passout", f"pass:{passphrase}",
            "-out", str(target), cwd=target.parent)
    return target
