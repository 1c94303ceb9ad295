"""Frames of a multi-frame object on S3, read one by one as OHIF reads them.

Usage::

    python scripts/bench_s3_frames.py [--frames 100] [--size 256] [--runs 3]

Starts a SeaweedFS cluster (``weed``, as the tests do), stores a ``--frames``-frame
``--size`` x ``--size`` 16-bit object on it, native and RLE, and asks WADO-RS for every
frame by itself (falcon's test client over the node's services: the S3 store, the
index, the frames resource; no HTTP in front).  Two ways of reading an object:

- ``ranged``: the S3 store as it is (``RandomAccess``: ranged GETs);
- ``whole``: the same store without that capability, so each request reads the whole
  object into a spooled copy (``open_ranged``'s fallback: what a store that only
  streams whole objects costs).

Prints, per object and way, the seconds to fetch all frames (best of ``--runs``), and
the bytes and requests S3 served (counted on the wire by the tests' relay).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from falcon import testing
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.dicomweb.app import create_app
from pacs.core import config
from pacs.core.services import build
from pacs.core.storage.s3 import S3Store
from tests.storage.proxy import CountingRelay
from tests.storage.seaweed import SeaweedServer

OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"


class WholeObjects:
    """An S3 store without :class:`~pacs.core.storage.RandomAccess`."""

    def __init__(self, inner: S3Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "open_ranged":
            raise AttributeError(name)
        return getattr(self._inner, name)


def multiframe(frames: int, size: int, syntax: str,
               offset_table: bool = True) -> tuple[Dataset, bytes]:
    ds = Dataset()
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid() for _ in range(3))
    ds.Modality, ds.PatientID = "OT", "BENCH"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.NumberOfFrames = frames
    rows, columns = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(7).integers(0, 64, (frames, size, size))
    pixels = (((rows * 3 + columns * 7)[None] + np.arange(frames)[:, None, None] * 11)
              % 4096 + noise).astype(np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels, encoding_plugin="pylibjpeg")
        if not offset_table:
            ds.PixelData = encapsulate(list(generate_frames(ds.PixelData,
                                                            number_of_frames=frames)),
                                       has_bot=False)
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return ds, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = SeaweedServer(Path(folder) / "weed").start()
        try:
            with CountingRelay(server.s3.endpoint) as relay:
                store = S3Store(endpoint=relay.endpoint, access_key=server.s3.access_key,
                                secret_key=server.s3.secret_key, bucket="bench-frames",
                                customer="bench")
                store.check()
                settings = config.load(overrides={"PACS_DATA_DIR": f"{folder}/data",
                                                  "PACS_WEB_HOSTS": "falconframework.org"},
                                       environ={}, env_file=None)
                services = build(settings, store=store)
                for name, syntax, table in (("native", ExplicitVRLittleEndian, True),
                                            ("RLE", RLELossless, True),
                                            ("RLE, no BOT", RLELossless, False)):
                    ds, data = multiframe(args.frames, args.size, syntax, table)
                    services.ingest.store_bytes(data)
                    path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/")
                    for way, used in (("ranged", store), ("whole", WholeObjects(store))):
                        client = testing.TestClient(create_app(
                            dataclasses.replace(services, store=used)))
                        best = float("inf")
                        for _ in range(args.runs):
                            relay.reset()
                            start = time.perf_counter()
                            for number in range(1, args.frames + 1):
                                result = client.simulate_get(
                                    f"{path}{number}", headers={"Accept": OHIF_FRAMES})
                                assert result.status_code == 200, result.text
                            best = min(best, time.perf_counter() - start)
                        print(f"{name:11} {len(data) / 1e6:6.1f} MB  {way:6}  "
                              f"{best:6.2f} s  {relay.received / 1e6:8.1f} MB from S3 "
                              f"({relay.received / len(data):5.2f}x)  "
                              f"{relay.requests} requests")
                services.close()
        finally:
            server.kill()


if __name__ == "__main__":
    main()
