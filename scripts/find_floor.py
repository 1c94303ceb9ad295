#!/usr/bin/env python3
"""How much of a C-FIND benchmark figure is the benchmark's own client?

The harness (``bench/bench.py``, phase ``find``) times C-FIND with a pynetdicom SCU in
Python.  For every response that client reads the PDU, decodes the command and the
identifier and formats the identifier for its log (pynetdicom does so even when the
log is off): well over half a millisecond of CPU per match on this machine, in one
process whose threads share the GIL.  This script runs the harness' STUDY query against
a node and reports, per query, the wall time and the CPU time the client itself used.
The client's CPU time is a floor: no server, however fast, can make this client take
less time than it spends computing.

Run it against a node that holds the benchmark's data (``pacs import bench/data/query20k``
into an empty node, or Orthanc after ``scripts/bench.sh``)::

    python scripts/find_floor.py --port 11112 --aet PACS --reps 5
    python scripts/find_floor.py --port 11112 --aet PACS --match "PatientName=DOE*"
    python scripts/find_floor.py --port 14242 --aet ORTHANC

Nothing here is a test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

#: The return keys of the harness' STUDY queries (bench/bench.py, ``_queries``).
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")


def study_query(matches: dict[str, str] | None = None) -> Dataset:
    """The harness' STUDY identifier: fourteen return keys, and the matching keys given
    (none: ``find_study_all``; ``PatientName=DOE*``: ``find_study_by_name_wildcard``)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_KEYS:
        setattr(ds, keyword, "")
    for keyword, value in (matches or {}).items():
        setattr(ds, keyword, value)
    return ds


def run_client(port: int, aet: str, reps: int, query: Dataset,
               calling: str = "BENCH") -> tuple[list[float], list[float], int]:
    """Time ``reps`` C-FINDs (after one warm-up) on one association, as the harness does
    (calling AE title BENCH, the harness' own, which its Orthanc configuration knows).

    Returns
    -------
    wall, cpu : list of float
        Milliseconds per query: elapsed, and CPU time of this process (all threads).
    matches : int
        Matches per query.
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise SystemExit(f"no association with {aet} on port {port}")
    wall, cpu, count = [], [], 0
    try:
        for rep in range(reps + 1):
            start, start_cpu, count = time.perf_counter(), time.process_time(), 0
            for status, _ in assoc.send_c_find(query, FIND):
                if status is None or "Status" not in status:
                    raise SystemExit("C-FIND: no response (timeout, abort or refusal)")
                if status.Status in (0xFF00, 0xFF01):
                    count += 1
            if rep:
                wall.append((time.perf_counter() - start) * 1000)
                cpu.append((time.process_time() - start_cpu) * 1000)
    finally:
        assoc.release()
    return wall, cpu, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=11112, help="the node's DIMSE port")
    parser.add_argument("--aet", default="INTELPIXEL", help="the node's AE title")
    parser.add_argument("--reps", type=int, default=5, help="timed queries (plus a warm-up)")
    parser.add_argument("--match", action="append", default=[], metavar="KEYWORD=VALUE",
                        help="a matching key, e.g. PatientName=DOE* or "
                             "StudyDate=20150101-20151231 (repeatable; none: all studies)")
    args = parser.parse_args()
    query = study_query(dict(item.split("=", 1) for item in args.match))
    wall, cpu, count = run_client(args.port, args.aet, args.reps, query)
    wall_ms, cpu_ms = statistics.median(wall), statistics.median(cpu)
    print(f"{count} matches; median of {args.reps}: {wall_ms:.0f} ms elapsed, of which the "
          f"client's own CPU {cpu_ms:.0f} ms ({cpu_ms / wall_ms:.0%}; "
          f"{cpu_ms / max(count, 1):.2f} ms per match)")


if __name__ == "__main__":
    main()
