#!/usr/bin/env python3
"""C-FIND latency at 20,000 instances and at 1,000,000 instances (docs/scale-find.md).

Writes index rows directly through the index writer (no objects: C-FIND never reads
them), in two data folders:

- ``base``: a query set shaped like the benchmark's (1,000 studies x 2 series x 10
  instances, ~400 patients, ~5 % ``DOE^...`` names, StudyDate 2010-2024);
- ``scaled``: the same query set plus filler up to ``--total`` instances, whose values
  never match the benchmark's queries (other names, IDs and years), so both folders give
  the same answers and only the index size differs.

Then starts ``pacs serve`` on each folder and times the benchmark's six C-FIND queries
with a pynetdicom SCU (one association per query type, one warm-up, then ``--reps``).

    python scripts/scale_find.py --total 1000000 --out /tmp/scale-find-table.md
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from pacs.core import config
from pacs.core.attributes import Level
from pacs.core.dataset import fold
from pacs.core.index import writer
from pacs.core.index.connection import Index
from pacs.core.index.migrations import migrate

SURNAMES = ["SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "MOORE", "CLARK", "HALL", "KING",
            "WRIGHT", "GREEN", "BAKER", "ADAMS", "NELSON", "CARTER", "MITCHELL", "ROBERTS"]
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")


def _row(pid: str, name: str, date: str, study: str, series: str, sop: str, n: int,
         s: int) -> writer.InstanceRow:
    values = {
        Level.PATIENT: {"patient_id": pid, "patient_name": name, "patient_name_folded": fold(name),
                        "patient_birth_date": "19700101", "patient_sex": "O"},
        Level.STUDY: {"study_uid": study, "study_date": date, "study_time": "101010",
                      "accession_number": f"A{study[-8:]}", "study_id": "1",
                      "study_description": "SCALE", "referring_physician_name": "REF^DOC",
                      "referring_physician_name_folded": "REF^DOC"},
        Level.SERIES: {"series_uid": series, "modality": "CT", "series_number": str(s),
                       "series_description": "AXIAL"},
        Level.IMAGE: {"sop_uid": sop, "instance_number": str(n),
                      "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "rows": "64",
                      "columns": "64"},
    }
    return writer.InstanceRow(patient_key=pid + "\x1f", values=values,
                              object_key=f"{study}/{series}/{sop}.dcm", size=9_500,
                              checksum="0" * 64, transfer_syntax="1.2.840.10008.1.2.1",
                              received_at="2026-01-01T00:00:00Z", calling_ae="SCALE")


def fill(index: Index, studies: int, patients: int, prefix: str, filler: bool,
         seed: int) -> dict[str, object]:
    """Write ``studies`` x 2 series x 10 instances; return facts about the set."""
    rng = random.Random(seed)
    facts: dict[str, object] = {"by_pid": {}, "doe": 0, "y2015": 0, "middle": None}
    batch = []
    for st in range(studies):
        p = rng.randrange(patients)
        pid = f"{prefix}P{p:07d}"
        doe = not filler and p % 20 == 0
        surname = "DOE" if doe else SURNAMES[p % len(SURNAMES)]
        name = f"{surname}^PAT{p}^X"
        year = rng.randrange(1990, 2010) if filler else rng.randrange(2010, 2025)
        date = f"{year}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
        study = f"2.25.{seed}{st:09d}"
        facts["by_pid"].setdefault(pid, []).append(study)  # type: ignore[union-attr]
        facts["doe"] = int(facts["doe"]) + doe  # type: ignore[call-overload]
        facts["y2015"] = int(facts["y2015"]) + (year == 2015)  # type: ignore[call-overload]
        if st == studies // 2:
            facts["middle"] = study
        for s in range(1, 3):
            series = f"{study}.{s}"
            for n in range(1, 11):
                batch.append(_row(pid, name, date, study, series, f"{series}.{n}", n, s))
        if len(batch) >= 20_000:
            _flush(index, batch)
    _flush(index, batch)
    return facts


def _flush(index: Index, batch: list[writer.InstanceRow]) -> None:
    with index.write() as conn:
        for row in batch:
            writer.upsert(conn, row)
    batch.clear()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(data_dir: Path, facts: dict[str, object], reps: int) -> dict[str, tuple]:
    """Start ``pacs serve`` on ``data_dir`` and time the six queries."""
    port = _free_port()
    env = {**os.environ, "PACS_DATA_DIR": str(data_dir), "PACS_DIMSE_PORT": str(port),
           "PACS_BIND_ADDRESS": "127.0.0.1", "PACS_QUERY_MAX_ROWS": "100000",
           "PACS_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "pacs", "serve"], env=env,
                            cwd=data_dir.parent, start_new_session=True)
    try:
        _wait(port)
        by_pid: dict[str, list[str]] = facts["by_pid"]  # type: ignore[assignment]
        pid = max(sorted(by_pid), key=lambda k: len(by_pid[k]))
        middle = str(facts["middle"])
        study_keys = dict.fromkeys(STUDY_KEYS, "")
        queries = [
            ("find_study_by_patientid", "STUDY", {**study_keys, "PatientID": pid}),
            ("find_study_by_name_wildcard", "STUDY", {**study_keys, "PatientName": "DOE*"}),
            ("find_study_by_date_range", "STUDY",
             {**study_keys, "StudyDate": "20150101-20151231"}),
            ("find_study_all_target_set", "STUDY",
             {**study_keys, "StudyDate": "20100101-20241231"}),
            ("find_series_of_study", "SERIES",
             {"StudyInstanceUID": middle, "SeriesInstanceUID": "", "Modality": "",
              "SeriesNumber": "", "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""}),
            ("find_image_of_series", "IMAGE",
             {"StudyInstanceUID": middle, "SeriesInstanceUID": f"{middle}.1",
              "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": ""}),
        ]
        return {name: _time_query(port, level, keys, reps) for name, level, keys in queries}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("pacs serve did not start")


def _time_query(port: int, level: str, keys: dict[str, str], reps: int) -> tuple:
    ae = AE(ae_title="SCALE")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="INTELPIXEL")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    times, count = [], 0
    for i in range(reps + 1):
        start = time.perf_counter()
        count = 0
        for status, _ in assoc.send_c_find(identifier, FIND):
            if status.Status in (0xFF00, 0xFF01):
                count += 1
            elif status.Status != 0:
                raise RuntimeError(f"C-FIND status {status.Status:#06x}")
        if i:
            times.append((time.perf_counter() - start) * 1000)
    assoc.release()
    return statistics.median(times), min(times), max(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pacs-scale-"))
    results = {}
    for label, filler in (("20k", 0), ("scaled", max(0, args.total - 20_000))):
        data_dir = work / label / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        settings = config.load(overrides={"PACS_DATA_DIR": str(data_dir)}, env_file=None)
        index = Index(settings.index_path)
        migrate(index.connection())
        started = time.perf_counter()
        facts = fill(index, 1_000, 400, "Q", filler=False, seed=1)
        if filler:
            fill(index, filler // 20, max(1, filler // 50), "F", filler=True, seed=2)
        index.connection().execute("ANALYZE")
        index.close()
        print(f"{label}: filled in {time.perf_counter() - started:.0f} s", flush=True)
        results[label] = measure(data_dir, facts, args.reps)
    lines = [f"| query | 20,000 instances (ms) | {args.total:,} instances (ms) | ratio |",
             "|---|---|---|---|"]
    for name, (median, low, high, count) in results["20k"].items():
        s_median, s_low, s_high, s_count = results["scaled"][name]
        lines.append(f"| {name} [{count}/{s_count}] | {median:.1f} ({low:.1f}-{high:.1f}) | "
                     f"{s_median:.1f} ({s_low:.1f}-{s_high:.1f}) | {s_median / median:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
