#!/usr/bin/env python3
"""How fast can the benchmark's C-FIND client go at all?  Measure its floor.

The harness (``bench/bench.py``, phase ``find``) times C-FIND with a pynetdicom SCU in
Python.  For a query with many matches (``find_study_all``: 1,002 studies) the client's
own cost per response - reading the PDU, decoding the command and the identifier,
pynetdicom's logging of every identifier - can be most of the figure.  This script
separates the two:

1. it runs the harness' query against a live node, timed, and once more through a
   recording proxy, keeping every byte the node sent;
2. it replays those bytes from a server that does no work at all (each answer is sent
   as soon as the request has arrived, all of it at once) and runs the same client
   against it.

The replay's time is the floor: what any server answering with the same responses
would measure with this client on this machine.  Run it against a node that holds the
benchmark's data, e.g. the node ``scripts/bench.sh`` leaves in ``bench/runs/pacs`` or
one loaded with ``pacs import bench/data/query20k``::

    python scripts/find_floor.py --port 11112 --aet PACS --reps 5

It prints the node's and the floor's median (ms) and the floor as a share of the node's
time.  Nothing here is a test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

#: The return keys of the harness' STUDY queries (bench/bench.py, ``_queries``).
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")

#: Bytes read per recv.
_CHUNK = 1 << 16

Record = list[tuple[str, bytes]]  # ("c2s" | "s2c", bytes) in the order they flowed


def study_query() -> Dataset:
    """The harness' ``find_study_all`` identifier: every study, fourteen return keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_KEYS:
        setattr(ds, keyword, "")
    return ds


def run_client(port: int, aet: str, reps: int, calling: str = "BENCH") -> list[float]:
    """Time ``reps`` C-FINDs (after one warm-up) on one association, as the harness does
    (calling AE title BENCH, the harness' own, which its Orthanc configuration knows).

    Returns
    -------
    list of float
        Milliseconds per query.
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise SystemExit(f"no association with {aet} on port {port}")
    query, times, count = study_query(), [], 0
    try:
        for rep in range(reps + 1):
            start, count = time.perf_counter(), 0
            for status, _ in assoc.send_c_find(query, FIND):
                if status is None or "Status" not in status:
                    raise SystemExit("C-FIND: no response (timeout, abort or refusal)")
                if status.Status in (0xFF00, 0xFF01):
                    count += 1
            if rep:
                times.append((time.perf_counter() - start) * 1000)
    finally:
        assoc.release()
    print(f"  {count} matches per query")
    return times


def _listener() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server, server.getsockname()[1]


def _in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def record(port: int, aet: str, reps: int) -> tuple[list[float], Record]:
    """Run the client against the node through a proxy that records both directions."""
    server, proxy_port = _listener()
    flows: Record = []
    lock = threading.Lock()

    def pump(source: socket.socket, sink: socket.socket, direction: str) -> None:
        while data := source.recv(_CHUNK):
            with lock:
                flows.append((direction, data))
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [_in_thread(lambda: pump(client, upstream, "c2s")),
                 _in_thread(lambda: pump(upstream, client, "s2c"))]
        for thread in pumps:
            thread.join()
        client.close()
        upstream.close()

    proxy = _in_thread(accept)
    times = run_client(proxy_port, aet, reps)
    proxy.join(30)
    server.close()
    return times, flows


def replay(flows: Record, aet: str, reps: int) -> list[float]:
    """Run the client against a server that only sends back the recorded bytes."""
    # Turns: (bytes the client sends, bytes the server answers with, all at once).
    turns: list[list] = []
    for direction, data in flows:
        if direction == "c2s":
            if not turns or turns[-1][1]:
                turns.append([0, b""])
            turns[-1][0] += len(data)
        elif turns:
            turns[-1][1] += data
    server, port = _listener()

    def serve() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for expected, answer in turns:
            received = 0
            while received < expected and (data := conn.recv(_CHUNK)):
                received += len(data)
            if answer:
                conn.sendall(answer)
        conn.close()

    thread = _in_thread(serve)
    times = run_client(port, aet, reps)
    thread.join(30)
    server.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=11112, help="the node's DIMSE port")
    parser.add_argument("--aet", default="INTELPIXEL", help="the node's AE title")
    parser.add_argument("--reps", type=int, default=5, help="timed queries (plus a warm-up)")
    args = parser.parse_args()
    print("node:")
    live = run_client(args.port, args.aet, args.reps)
    print("node again, through a proxy that records its answers:")
    _, flows = record(args.port, args.aet, args.reps)
    print("replay (a server that does nothing but send the recorded answers):")
    floor = replay(flows, args.aet, args.reps)
    node_ms, floor_ms = statistics.median(live), statistics.median(floor)
    print(f"node  median {node_ms:.0f} ms  ({', '.join(f'{t:.0f}' for t in live)})")
    print(f"floor median {floor_ms:.0f} ms  ({', '.join(f'{t:.0f}' for t in floor)})")
    print(f"the client alone accounts for {floor_ms / node_ms:.0%} of the node's figure")


if __name__ == "__main__":
    main()
