"""The node's TLS policy, shared by every port that speaks TLS (HTTPS, DICOM TLS).

It follows BCP 195 (RFC 8996, RFC 9325), as PS3.15 B.12 ("BCP 195 RFC 8996, 9325
TLS Secure Transport Connection Profile") asks:

- TLS 1.2 at least (RFC 8996 retired 1.0 and 1.1); TLS 1.3 preferred by OpenSSL;
- TLS 1.2 only with forward secrecy and authenticated encryption: ECDHE or DHE with
  AES-GCM or ChaCha20-Poly1305 (RFC 9325 4.2), the server's order of preference
  (Python loads no DH parameters, so a DHE suite is never chosen: PS3.15 B.13 forbids
  DHE where the key length cannot be set);
- no compression (RFC 9325 3.3, CRIME), no renegotiation (RFC 9325 3.5).

The files are checked here too: every problem (unreadable, not PEM, a key that does
not match its certificate or that is encrypted) is a :class:`ConfigError` naming the
setting, so that ``pacs serve`` stops before it starts anything.
"""

from __future__ import annotations

import ssl

from pacs.core.errors import ConfigError

#: TLS 1.2 cipher suites (TLS 1.3's are all AEAD with forward secrecy).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def context(purpose: ssl.Purpose, authorities: tuple[str, str] | None = None
            ) -> ssl.SSLContext:
    """A context of the policy above.

    Parameters
    ----------
    purpose : ssl.Purpose
        ``CLIENT_AUTH`` for a server's side, ``SERVER_AUTH`` for a client's (the peer's
        certificate and host name verified).
    authorities : (setting name, path), optional
        The only CA certificates trusted for peers' certificates.  Without them a
        client trusts the system's authorities and a server none: a server never takes
        the system's store for client certificates (any public CA's customer would pass).
    """
    server = purpose is ssl.Purpose.CLIENT_AUTH
    made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    made.minimum_version = ssl.TLSVersion.TLSv1_2
    made.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server:
        made.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    made.set_ciphers(TLS12_CIPHERS)
    if authorities is not None:
        load_authorities(made, *authorities)
    elif not server:
        made.load_default_certs(purpose)
    return made


def readable(name: str, path: str) -> None:
    """Refuse a file that cannot be read, with the setting's name and the reason."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def load_identity(made: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str]) -> None:
    """Load a certificate (chain) and its private key into ``made``.

    Parameters
    ----------
    cert, key : (setting name, path)
        The files and the settings that named them (for the messages).
    """
    (cert_name, cert_path), (key_name, key_path) = cert, key
    readable(cert_name, cert_path)
    readable(key_name, key_path)

    def no_password() -> bytes:
        raise ConfigError(f"{key_name}: the key is encrypted; give the node an unencrypted "
                          "key readable by its user only")

    try:
        made.load_cert_chain(cert_path, key_path, password=no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_name} {cert_path} / {key_name} {key_path}: not a PEM "
                          f"certificate and its private key ({exc.reason or exc})") from None


def load_authorities(made: ssl.SSLContext, name: str, path: str) -> None:
    """Trust the PEM CA certificates of ``path`` (setting ``name``) in ``made``."""
    readable(name, path)
    try:
        made.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{name} {path}: not PEM CA certificates "
                          f"({exc.reason or exc})") from None
