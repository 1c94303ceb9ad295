"""CPU of ingest's analysis of one small instance, by step (no server, no disk).

Reads the harness' small instances (``bench/data/ingest/small_single_r1``, made by
``gen_data.py``) into memory, then times, with the process' CPU clock, each step of
:func:`pacs.core.ingest.analyse` over them: the header read that proves the object whole
(``read_part10``), the index values of every level (``extract``, from the raw elements
as ingest reads them), the DICOM JSON metadata (``metadata.prepare``) and the whole
analysis, as a C-STORE through the intake makes it (no metadata: the mover's work) and
with the metadata (an object written to the store directly).  Prints the median over
``--rounds`` of the CPU microseconds per instance of each (the steps take turns within
each round).

Usage: ``.venv/bin/python bench/analysis.py [--count 200] [--rounds 30]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pacs.core import metadata
from pacs.core.attributes import Level
from pacs.core.dataset import Elements, extract, read_part10
from pacs.core.ingest import analyse

DATA = Path(__file__).parent / "data" / "ingest" / "small_single_r1"


def per_instance(steps: dict[str, Callable[[bytes], object]], objects: list[bytes],
                 rounds: int) -> dict[str, float]:
    """Median CPU microseconds per object of each step over ``rounds`` passes.

    Each round runs every step once, in turn, so that the machine's own drift (a shared
    VM's speed varies by the minute) weighs on all of them alike.
    """
    timings: dict[str, list[float]] = {name: [] for name in steps}
    gc.disable()  # a collection would land in whichever step runs at that moment
    try:
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.process_time()
                for data in objects:
                    step(data)
                timings[name].append((time.process_time() - start) / len(objects) * 1e6)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in timings.items()}


def index_values(elements: Elements) -> list[dict[str, str | None]]:
    """The index values of every level, as ingest extracts them."""
    return [extract(elements, level) for level in Level]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances read")
    parser.add_argument("--rounds", type=int, default=30, help="passes over them")
    args = parser.parse_args()
    paths = sorted(p for p in DATA.rglob("*.dcm"))[:args.count]
    if not paths:
        raise SystemExit(f"no instances under {DATA}: run scripts/bench.sh once")
    objects = [path.read_bytes() for path in paths]
    steps: dict[str, Callable[[bytes], object]] = {
        "read_part10": read_part10,
        "read_part10 + extract": lambda data: index_values(read_part10(data).elements),
        "read_part10 + metadata.prepare": lambda data: metadata.prepare(
            read_part10(data), data),
        "analyse, through the intake": lambda data: analyse(data, describe=False),
        "analyse, with the metadata": analyse,
    }
    print(f"{len(objects)} instances of {sum(map(len, objects)) // len(objects)} bytes")
    for name, micros in per_instance(steps, objects, args.rounds).items():
        print(f"{name:32s} {micros:7.0f} us CPU")


if __name__ == "__main__":
    main()
