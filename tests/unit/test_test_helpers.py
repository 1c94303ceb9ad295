"""The suite's own helpers that other tests rely on to be honest (``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import free_port, start_listening, wait_for_port

#: A server on the loopback port given as its argument that answers each connection with
#: "ours" and closes it: a connection tells it from another listener on the same port.
SERVER = ("import socket, sys\n"
          "server = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
          "while True:\n"
          "    connection, _ = server.accept()\n"
          "    connection.sendall(b'ours')\n"
          "    connection.close()\n")


#: Runs the rest of its arguments as another Python and waits for it.
RELAY = "import subprocess, sys\nsubprocess.run([sys.executable, *sys.argv[1:]])"


def answer(port: int) -> bytes:
    """What the listener on loopback ``port`` sends before it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.settimeout(10)
        return connection.makefile("rb").read()


def test_a_server_that_exits_before_it_listens_is_started_again_on_another_port() -> None:
    """As when its port was taken between :func:`free_port` and its bind."""
    ports: list[int] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        ports.append(port)
        if len(ports) == 1:  # the first one cannot bind
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        return subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                 str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    port, process = start_listening(start)
    try:
        assert len(ports) == 2 and port == ports[1] and process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_port_another_listener_took_first_is_not_taken_for_the_servers() -> None:
    """The other listener accepts connections while the server started on its port is
    still on its way to "Address already in use": the port returned is one the process
    returned listens on."""
    ports: list[int] = []
    thieves: list[socket.socket] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        ports.append(port)
        if not thieves:  # someone else binds and listens on the port first
            thieves.append(socket.create_server(("127.0.0.1", port)))
        return subprocess.Popen([sys.executable, "-c", SERVER, str(port)],
                                stderr=subprocess.DEVNULL)

    try:
        port, process = start_listening(start)
        try:
            assert port != ports[0] and port == ports[-1] and process.poll() is None
            assert answer(port) == b"ours"
        finally:
            process.kill()
            process.wait()
    finally:
        for thief in thieves:
            thief.close()


def test_a_server_alive_but_not_listening_is_not_served_by_another_listener() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with pytest.raises(TimeoutError, match="another process listens on it"):
                wait_for_port(port, timeout=0.5, process=process)
        finally:
            process.kill()
            process.wait()


def test_a_server_whose_listener_is_a_grandchild_is_waited_for() -> None:
    """As a multi-process server whose workers listen (the process started only waits)."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", RELAY, "-c", RELAY, "-c", SERVER, str(port)],
        start_new_session=True)  # its own group, killed as one
    try:
        wait_for_port(port, timeout=30, process=parent)
        assert answer(port) == b"ours"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
