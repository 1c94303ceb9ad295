"""Listening sockets and worker counts shared by the node's servers (DIMSE, DICOMweb,
viewer): the parent binds, so a taken port is a clear start-up error, and the workers
inherit the socket."""

from __future__ import annotations

import os
import socket


def listening_socket(address: str, port: int, backlog: int) -> socket.socket:
    """Bind ``address:port`` (IPv6 when the address has a colon) and listen."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(backlog)
    return sock


def worker_count(configured: int) -> int:
    """``configured``, or one per CPU this process may run on when it is 0."""
    return configured or max(1, len(os.sched_getaffinity(0)))
