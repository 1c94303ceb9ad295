"""The suite's own helpers that other tests rely on to be honest (``tests/conftest.py``)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import start_listening


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
