"""TLS of the node's HTTP ports (DICOMweb and viewer): the server context.

With ``PACS_TLS_CERT`` and ``PACS_TLS_KEY`` set, both ports serve HTTPS only; TLS is
done by the node's own worker (:mod:`pacs.node.httpworker`), inside its event loop,
never by gunicorn (no ``--certfile``: gunicorn's workers wrap and hand-shake a socket
blocking, and the worker would then not know which connections are encrypted).

The context follows the node's TLS policy (:mod:`pacs.core.tls`: BCP 195, PS3.15
B.12), with ALPN ``http/1.1`` only: the worker serves HTTP/1.x.

``PACS_TLS_CA`` names the certificate authorities of client certificates (PS3.15 B.12
asks for mutual authentication to be possible): a client may present a certificate,
one these authorities did not sign fails the handshake, and a valid one's subject is
handed to the application (``SSL_CLIENT_S_DN``, ``SSL_CLIENT_VERIFY`` in the WSGI
environment).  It grants no access by itself: the access rule (``adapters/http/auth.py``)
still decides with the credentials.

Every problem with the files (one of the pair missing, unreadable, not PEM, a key that
does not match the certificate or that is encrypted) is a :class:`ConfigError` naming
the setting: ``pacs serve`` checks once before it starts anything.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pacs.core import tls as policy
from pacs.core.config import Settings, check_tls

#: The only application protocol offered (ALPN, RFC 7301).
ALPN = ["http/1.1"]


#: RFC 4514 names of the attributes Python's ``getpeercert()`` spells out.
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
                "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}


def enabled(settings: Settings) -> bool:
    """True when the HTTP ports serve HTTPS (a certificate is configured)."""
    return bool(settings.tls_cert)


def scheme(settings: Settings) -> str:
    """``https`` or ``http``, for the log and for clients of the node's own ports."""
    return "https" if enabled(settings) else "http"


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The server context of the HTTP ports, or ``None`` for plain HTTP.

    Raises
    ------
    ConfigError
        Half a configuration, an unreadable or invalid file, a key that does not
        match the certificate.
    """
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_ca
    check_tls(cert, key, ca)  # settings made without load() too
    if not cert:
        return None
    context = policy.context(ssl.Purpose.CLIENT_AUTH, ("PACS_TLS_CA", ca) if ca else None)
    context.set_alpn_protocols(ALPN)
    policy.load_identity(context, ("PACS_TLS_CERT", cert), ("PACS_TLS_KEY", key))
    if ca:
        # Asked for, not required: a browser or a health check without one still
        # connects; one signed by another authority is refused in the handshake.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_environ(sock: ssl.SSLSocket) -> dict[str, str]:
    """The WSGI variables of a connection whose handshake is done (mod_ssl's names)."""
    environ = {"wsgi.url_scheme": "https", "HTTPS": "on",
               "SSL_PROTOCOL": sock.version() or ""}
    cert = sock.getpeercert()
    if cert:
        # RFC 4514 order (most specific first) and short names, as mod_ssl gives it.
        subject = ",".join(f"{_SHORT_NAMES.get(key, key)}={value}"
                           for rdn in reversed(cert.get("subject", ())) for key, value in rdn)
        environ.update(SSL_CLIENT_VERIFY="SUCCESS", SSL_CLIENT_S_DN=subject)
    else:
        environ["SSL_CLIENT_VERIFY"] = "NONE"
    return environ


def describe(settings: Settings) -> str:
    """One line for the log: what the HTTP ports speak."""
    if not enabled(settings):
        return "plain HTTP"
    clients = (f", client certificates of {Path(settings.tls_ca).name}"
               if settings.tls_ca else "")
    return f"HTTPS only (certificate {Path(settings.tls_cert).name}{clients})"
