"""DICOM TLS: the TLS port's context, its handshake, the certificate's AE title, and
the client side for C-MOVE destinations.

The node speaks the BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile
(PS3.15 B.12) through the policy of :mod:`pacs.core.tls`, on its own port
(``PACS_DIMSE_TLS_PORT``; PS3.15 B.1 registers 2762), beside the plain one.

* **Identity.**  The certificate is ``PACS_DIMSE_TLS_CERT`` / ``_KEY``, else the HTTPS
  pair ``PACS_TLS_CERT`` / ``_KEY``: one certificate serves both when the node is known
  by one name; a separate one when DICOM peers identify it otherwise (its AE title).
* **Mutual TLS.**  With ``PACS_DIMSE_TLS_CA``, a client must present a certificate
  those authorities signed (otherwise the handshake fails), and the certificate names
  the one AE it may call as: its subject's common name (CN) must equal the calling AE
  title of the A-ASSOCIATE-RQ (:func:`identity_refusal`).  One rule, nothing else to
  configure: a certificate is issued for an AE.  Without the setting no certificate is
  asked for.
* **Handshake in time.**  The acceptor only wraps the accepted socket; the handshake
  runs in the connection's own thread, non-blocking, within ARTIM
  (``PACS_ARTIM_TIMEOUT``, :func:`handshake`), so a peer that connects and never
  completes it holds neither the acceptor nor a thread for longer; the A-ASSOCIATE-RQ
  then gets what the handshake left of ARTIM
  (:meth:`pacs.dimse.server.NodeServer.finish_request`).
* **Destinations.**  A C-MOVE destination marked ``:tls`` in ``PACS_MODALITIES`` is
  reached over TLS (:func:`client_args`): its certificate verified against
  ``PACS_DIMSE_TLS_CA`` (or the system's authorities) and its host name, the node's
  certificate offered as client certificate.
"""

from __future__ import annotations

import hashlib
import select
import ssl
import time
from typing import Any

from pacs.core import tls as policy
from pacs.core.access import AccessPolicy
from pacs.core.config import Modality, Settings, dimse_tls_identity
from pacs.core.errors import ConfigError


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS port's context, ``None`` when there is no TLS port.

    Raises
    ------
    ConfigError
        An unreadable or invalid file, a key that does not match its certificate.
    """
    identity = dimse_tls_identity(settings)
    if not settings.dimse_tls_port or identity is None:
        return None
    ca = settings.dimse_tls_ca
    context = policy.context(ssl.Purpose.CLIENT_AUTH, ("PACS_DIMSE_TLS_CA", ca) if ca else None)
    policy.load_identity(context, *identity)
    # No session tickets: nothing resumes DIMSE sessions, and a ticket is one more
    # record a client must read after its handshake.
    context.num_tickets = 0
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def unproven_titles(settings: Settings, policy: AccessPolicy) -> list[str]:
    """The known AEs that must associate over DICOM TLS (``tls = true``) whose title no
    certificate proves: without ``PACS_DIMSE_TLS_CA`` no client certificate is asked
    for, so TLS encrypts their associations but any TLS peer may call by their titles
    (``pacs serve`` warns).

    Raises
    ------
    ConfigError
        An AE pinned to client certificates (``certificates``) without
        ``PACS_DIMSE_TLS_CA``: none is ever asked for, so it could never associate.
    """
    if settings.dimse_tls_ca:
        return []
    pinned = sorted(title for title, ae in policy.aes.items() if ae.certificates)
    if pinned:
        raise ConfigError(f"the access rules pin {', '.join(pinned)} to client "
                          "certificates, which the node asks for only with "
                          "PACS_DIMSE_TLS_CA: set it to the authority that issued them")
    return sorted(title for title, ae in policy.aes.items() if ae.tls)


def client_context(settings: Settings, wanted: bool = False) -> ssl.SSLContext | None:
    """The context of associations to TLS destinations, ``None`` when no destination
    is marked TLS (``PACS_MODALITIES``) and none is ``wanted`` (an AE of the access
    rules, :mod:`pacs.core.access`).

    Raises
    ------
    ConfigError
        An unreadable or invalid file.
    """
    if not wanted and not any(destination.tls
                              for destination in settings.destinations.values()):
        return None
    return destination_context(settings)


def destination_context(settings: Settings) -> ssl.SSLContext:
    """The context of an association to a TLS destination (PS3.15 B.12): the CA
    that verifies its certificate (``PACS_DIMSE_TLS_CA``, else the system's), the
    node's own certificate when it has one.

    Raises
    ------
    ConfigError
        An unreadable or invalid file.
    """
    ca = settings.dimse_tls_ca
    context = policy.context(ssl.Purpose.SERVER_AUTH, ("PACS_DIMSE_TLS_CA", ca) if ca else None)
    identity = dimse_tls_identity(settings)
    if identity is not None:
        policy.load_identity(context, *identity)
    return context


def client_args(ae: Any, destination: Modality) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association from ``ae`` (the node's,
    :class:`pacs.dimse.server.NodeAE`) to ``destination``: the AE's context for TLS
    destinations and the host name the destination's certificate must name; ``None``
    for a plain destination.

    Raises
    ------
    ValueError
        A TLS destination and an AE without the context (not the node's).
    """
    if not destination.tls:
        return None
    context = getattr(ae, "destination_tls", None)
    if not isinstance(context, ssl.SSLContext):
        raise ValueError(f"no TLS context for the TLS destination {destination.ae_title}")
    return context, destination.host


def handshake(sock: ssl.SSLSocket, seconds: float) -> None:
    """Complete the server side of ``sock``'s handshake within ``seconds``.

    Non-blocking steps with waits on the socket between them, so the time bounds the
    whole handshake, however a peer trickles it; the socket is blocking again after.

    Raises
    ------
    TimeoutError
        Not complete in time.
    OSError
        The handshake failed (ssl.SSLError: a bad certificate, a protocol the policy
        refuses) or the connection closed.
    """
    deadline = time.monotonic() + seconds
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                wait: tuple[list[Any], list[Any]] = ([sock], [])
            except ssl.SSLWantWriteError:
                wait = ([], [sock])
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(select.select(*wait, [], remaining)[:2]):
                raise TimeoutError("no TLS handshake within the ARTIM timeout")
    finally:
        if sock.fileno() >= 0:
            sock.setblocking(True)


def is_secure(sock: Any) -> bool:
    """True when ``sock`` is a DICOM TLS connection."""
    return isinstance(sock, ssl.SSLSocket)


def peer_fingerprint(sock: Any) -> str | None:
    """The SHA-256 fingerprint (lower-case hex) of the client certificate of ``sock``;
    ``None`` for a plain socket or a client without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def certificate_ae(sock: Any) -> str | None:
    """The subject CN of the verified client certificate of ``sock``; ``None`` for a
    plain socket or a client without one (no ``PACS_DIMSE_TLS_CA``)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())  # ((("commonName", "MODALITY"),), ...)
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return str(names[-1]) if names else ""


def identity_refusal(sock: Any, calling_ae_title: str) -> str | None:
    """Why the association of ``sock`` may not call as ``calling_ae_title`` (its
    certificate names another AE), or ``None``."""
    named = certificate_ae(sock)
    if named is None or named.strip() == calling_ae_title.strip():
        return None
    return (f"the calling AE title {calling_ae_title.strip()!r} is not the one its client "
            f"certificate names (CN={named!r})")
