"""WADO-RS micro-benchmarks: metadata cost at ingest, and series metadata server time.

Usage::

    python scripts/bench_wado.py [--runs 300]

Prints, for a 512 x 512 CT (CT_small's header, 2 bytes per pixel) and a 64 x 64 MR
(MR_small):

- ``prepare``: encoding the instance's DICOM JSON at ingest (``pacs.core.metadata.prepare``);
- ``save``: writing it in the ingest transaction (one INSERT);

and the in-process server time of ``GET /studies/{s}/series/{se}/metadata`` for a
series of 50 such CT instances (falcon's test client: routing, the index query, the
JSON join, no network).  Medians and minimums over ``--runs`` runs; the machine's
other load shows up in the medians, so both are printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from falcon import testing
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.dicomweb.app import create_app
from pacs.core import config, metadata
from pacs.core.dataset import read_part10
from pacs.core.services import Services, build
from pacs.core.storage.memory import MemoryStore


def bundled(name: str) -> str:
    """A pydicom test file, never downloaded."""
    return str(get_testdata_file(name, download=False))


def ct_512(study: str, series: str) -> bytes:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows = ds.Columns = 512
    ds.PixelData = (np.arange(512 * 512, dtype=np.uint16) % 4096).tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def mr_64() -> bytes:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def timed(runs: int, work: Callable[[], object]) -> tuple[float, float]:
    """(median, minimum) in microseconds."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6, min(samples) * 1e6


def _costs(services: Services, data: bytes,
           runs: int) -> tuple[tuple[float, float], tuple[float, float], int]:
    """Timings of prepare() and save() for one object, and its JSON size."""
    instances = iter([read_part10(data) for _ in range(runs)])
    prepare = timed(runs, lambda: metadata.prepare(next(instances), data))
    instance = read_part10(data)
    prepared = metadata.prepare(instance, data)
    assert prepared is not None
    conn = services.index.connection()
    conn.execute("BEGIN")
    try:
        save = timed(runs, lambda: metadata.save(conn, instance.sop_instance_uid, prepared))
    finally:
        conn.execute("ROLLBACK")
    return prepare, save, len(prepared.json)


def ingest_cost(runs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = config.load(overrides={"PACS_DATA_DIR": folder}, environ={},
                               env_file=None)
        services = build(settings, store=MemoryStore())
        for name, data in (("CT 512x512", ct_512(generate_uid(), generate_uid())),
                           ("MR 64x64", mr_64())):
            services.ingest.store_bytes(data)
            prepare, save, size = _costs(services, data, runs)
            print(f"{name:11} {len(data):>7} B  prepare {prepare[0]:6.0f} us (min "
                  f"{prepare[1]:4.0f})  save {save[0]:4.0f} us (min {save[1]:3.0f})  "
                  f"json {size} B")
        services.close()


def series_metadata(runs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = config.load(overrides={"PACS_DATA_DIR": folder}, environ={},
                               env_file=None)
        services = build(settings, store=MemoryStore())
        study, series = generate_uid(), generate_uid()
        for _ in range(50):
            services.ingest.store_bytes(ct_512(study, series))
        client = testing.TestClient(create_app(services))
        path = f"/dicom-web/studies/{study}/series/{series}/metadata"
        result = client.simulate_get(path)
        assert result.status_code == 200 and len(result.json) == 50
        median, low = timed(runs, lambda: client.simulate_get(path))
        print(f"series metadata, 50 CT: {median / 1000:.2f} ms (min {low / 1000:.2f}), "
              f"{len(result.content)} B")
        services.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    ingest_cost(args.runs)
    series_metadata(args.runs)


if __name__ == "__main__":
    main()
