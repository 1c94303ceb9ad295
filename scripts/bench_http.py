"""STOW-RS and WADO-RS throughput of a ``pacs serve`` started here, over real HTTP.

Usage::

    python scripts/bench_http.py [--rounds 8] [--instances 50] [--pacs "python -m pacs"]

Starts ``pacs serve`` (``--pacs``: the command, e.g. a wrapper that sets PYTHONPATH to
another checkout) in a temporary folder with the default DICOMweb workers and threads,
then:

- ``STOW-RS``: ``--rounds`` POSTs of ``--instances`` fresh 512 x 512 CT instances
  (0.5 MB each, one multipart/related body) to ``/studies``;
- ``WADO-RS``: ``--rounds`` GETs of one such study (every instance, as stored,
  ``multipart/related; type="application/dicom"``), the body read to the end.

Prints the median and best MB/s of each (body bytes / wall time of the request), and
the CPU time the node's processes spent per MB (``/proc/<pid>/stat`` of every process
of its group): the machine's other load shows in the rates, much less in the CPU time.
Compare runs made back to back.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.data import get_testdata_file

#: Placeholders of the template's UIDs (64 characters, replaced byte for byte).
SOP_SLOT = "1.2." + "9" * 60
SERIES_SLOT = "1.3." + "9" * 60
STUDY_SLOT = "1.4." + "9" * 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uid64() -> str:
    return "2.25." + str(uuid.uuid4().int).ljust(59, "0")[:59]


def template() -> bytes:
    """A 512 x 512 CT (CT_small's header, 2 bytes per pixel) with placeholder UIDs."""
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    ds.Rows = ds.Columns = 512
    ds.PixelData = (np.arange(512 * 512, dtype=np.uint16) % 4096).tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_SLOT, SERIES_SLOT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP_SLOT
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def study_body(base: bytes, count: int, boundary: str) -> tuple[str, bytes]:
    """(study UID, multipart body) of ``count`` fresh instances of one new study."""
    study, series = uid64(), uid64()
    parts = []
    for _ in range(count):
        data = (base.replace(SOP_SLOT.encode(), uid64().encode())
                .replace(SERIES_SLOT.encode(), series.encode())
                .replace(STUDY_SLOT.encode(), study.encode()))
        parts.append(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                     + data + b"\r\n")
    return study, b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"


def start_node(command: list[str], root: Path) -> tuple[subprocess.Popen[bytes], str]:
    web = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env.update({"PACS_DATA_DIR": str(root / "data"), "PACS_DIMSE_PORT": str(free_port()),
                "PACS_WEB_PORT": str(web), "PACS_VIEWER_PORT": "0",
                "PACS_UPLOADS_POLL": "0", "PACS_BIND_ADDRESS": "127.0.0.1",
                "PACS_LOG_LEVEL": "WARNING"})
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - lives as long as the node
    process = subprocess.Popen([*command, "serve"], cwd=root, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{web}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    sys.exit(f"pacs serve did not start:\n{(root / 'serve.log').read_text()}")


def node_cpu(pgid: int) -> float:
    """CPU seconds (user and system) used so far by the live processes of a group."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def report(name: str, rates: list[float], cpu: float, megabytes: float) -> None:
    print(f"{name}: median {statistics.median(rates):.0f} MB/s, best {max(rates):.0f} MB/s "
          f"({', '.join(f'{r:.0f}' for r in rates)}); node CPU {cpu / megabytes * 1000:.1f} "
          f"ms/MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--pacs", default=f"{sys.executable} -m pacs")
    args = parser.parse_args()
    base = template()
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_node(shlex.split(args.pacs), Path(folder))
        try:
            session = requests.Session()
            boundary = "benchboundary" + uuid.uuid4().hex
            stow, studies = [], []
            cpu = 0.0
            for round_ in range(args.rounds + 1):
                if round_ == 1:
                    cpu = node_cpu(process.pid)
                study, body = study_body(base, args.instances, boundary)
                start = time.perf_counter()
                answer = session.post(f"{url}/studies", data=body, timeout=300, headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                                    f'boundary={boundary}',
                    "Accept": "application/dicom+json"})
                elapsed = time.perf_counter() - start
                assert answer.status_code == 200, (answer.status_code, answer.text[:300])
                stow.append(len(body) / elapsed / 1e6)
                studies.append((study, len(body)))
            cpu = node_cpu(process.pid) - cpu
            report(f"STOW-RS {args.instances} CT ({studies[0][1] / 1e6:.1f} MB)", stow[1:],
                   cpu, sum(size for _, size in studies[1:]) / 1e6)
            wado = []
            study = studies[0][0]
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
            for round_ in range(args.rounds + 1):
                if round_ == 1:
                    cpu = node_cpu(process.pid)
                start = time.perf_counter()
                size = 0
                with session.get(f"{url}/studies/{study}", headers={"Accept": accept},
                                 stream=True, timeout=300) as answer:
                    assert answer.status_code == 200, answer.status_code
                    for chunk in answer.iter_content(1 << 20):
                        size += len(chunk)
                wado.append(size / (time.perf_counter() - start) / 1e6)
            cpu = node_cpu(process.pid) - cpu
            report(f"WADO-RS study ({size / 1e6:.1f} MB)", wado[1:], cpu,
                   size * args.rounds / 1e6)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
