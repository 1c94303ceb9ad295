"""Analysis in helper processes (pacs.core.analysers): the same answers as in-process
analysis, refusals passed back, a failing helper costing only the object it was on."""

from __future__ import annotations

import io
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs.core import analysers
from pacs.core.analysers import AnalyserPool
from pacs.core.errors import AnalysisFault, UnreadableData
from pacs.core.ingest import Analysis, try_analyse
from pacs.core.malloc import keep_large_buffers


def _bundled() -> list[bytes]:
    """pydicom's test files (a mix of syntaxes, sequences, character sets, compressed
    and broken objects, some without a Part 10 header)."""
    root = Path(pydicom.data.__file__).parent
    files = sorted(p for folder in ("test_files", "charset_files")
                   for p in (root / folder).rglob("*.dcm"))
    return [data for data in (p.read_bytes() for p in files) if len(data) < 4 << 20]


def _helpers() -> set[int]:
    """Process ids of this process's analysis helpers."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "pacs.core.analysers"],
                         capture_output=True, text=True, check=False).stdout
    return {int(pid) for pid in out.split()}


def _gone(pids: set[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pids & _helpers():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def pool() -> Iterator[AnalyserPool]:
    made = AnalyserPool(1)
    yield made
    made.close()


def _same(left: Analysis | Exception, right: Analysis | Exception) -> bool:
    if isinstance(left, Exception) or isinstance(right, Exception):
        return type(left) is type(right) and str(left) == str(right)
    return left == right


def test_helpers_answer_what_in_process_analysis_answers(pool: AnalyserPool) -> None:
    objects = _bundled()
    assert len(objects) > 90
    futures = [pool.submit(data) for data in objects]
    results = [future.result(timeout=60) for future in futures]
    expected = [try_analyse(data) for data in objects]
    assert sum(isinstance(r, Analysis) for r in results) > 60
    assert sum(isinstance(r, Exception) for r in results) > 10  # refusals too
    assert all(_same(got, want) for got, want in zip(results, expected, strict=True))


def test_a_refusal_comes_back_as_its_exception(pool: AnalyserPool) -> None:
    result = pool.submit(b"\0" * 128 + b"DICM" + os.urandom(64)).result(timeout=60)
    assert isinstance(result, UnreadableData)


def test_without_helpers_the_caller_analyses(pool: AnalyserPool) -> None:
    inline = AnalyserPool(0)
    data = _bundled()[0]
    future = inline.submit(data)
    assert future.done() and _same(future.result(), try_analyse(data))
    assert _helpers() == set()
    inline.close()


def test_a_very_large_object_is_analysed_in_the_calling_thread(
        pool: AnalyserPool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _ct(pixel_bytes=1 << 20)
    monkeypatch.setattr(analysers, "INLINE_BYTES", len(data) - 1)
    future = pool.submit(data)
    assert future.done() and _same(future.result(), try_analyse(data))


def test_start_spawns_the_helpers_and_close_ends_them() -> None:
    pool = AnalyserPool(2)
    pool.start()
    deadline = time.monotonic() + 10
    while len(_helpers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = _helpers()
    assert len(started) == 2
    pool.close()
    assert _gone(started)
    with pytest.raises(RuntimeError):
        pool.submit(b"")


def test_a_helper_killed_between_objects_is_replaced(pool: AnalyserPool) -> None:
    data = _bundled()[0]
    assert isinstance(pool.submit(data).result(timeout=60), Analysis)
    (first,) = _helpers()
    os.kill(first, signal.SIGKILL)
    assert _gone({first})
    # Nothing was being analysed when it died: the next object is not failed for it.
    assert isinstance(pool.submit(data).result(timeout=60), Analysis)
    assert _helpers() - {first}


def test_a_hung_helper_fails_its_object_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysers, "ANALYSIS_TIMEOUT", 1.0)
    pool = AnalyserPool(1)
    try:
        objects = _bundled()[:3]
        assert isinstance(pool.submit(objects[0]).result(timeout=60), Analysis)
        (hung,) = _helpers()
        os.kill(hung, signal.SIGSTOP)
        first, second = pool.submit(objects[1]), pool.submit(objects[2])
        assert isinstance(first.result(timeout=60), AnalysisFault)
        # The one sent after it goes to a new helper.
        assert _same(second.result(timeout=60), try_analyse(objects[2]))
        assert _gone({hung})
    finally:
        pool.close()


def _ct(contour_values: int = 0, pixel_bytes: int = 0) -> bytes:
    """CT_small with new UIDs, optionally with many DS values (a long metadata reply) or
    larger pixel data."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if contour_values:
        ds.ROIContourSequence = [Dataset() for _ in range(contour_values // 5000)]
        for item in ds.ROIContourSequence:
            item.ContourData = ["123.456789"] * 5000
    if pixel_bytes:
        ds.Rows, ds.Columns = 1024, pixel_bytes // 2048
        ds.PixelData = bytes(pixel_bytes)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_long_reply_and_a_large_next_object_do_not_wait_on_each_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both larger than the socket buffers: the helper reads the next object while its
    reply to the first is still being sent (no deadlock until the timeout)."""
    monkeypatch.setattr(analysers, "ANALYSIS_TIMEOUT", 30.0)
    long_reply, large = _ct(contour_values=200_000), _ct(pixel_bytes=4 << 20)
    pool = AnalyserPool(1)
    try:
        first, second = pool.submit(long_reply), pool.submit(large)
        results = first.result(timeout=60), second.result(timeout=60)
    finally:
        pool.close()
    assert all(isinstance(result, Analysis) for result in results)
    assert len(results[0].metadata.json) > 2 << 20  # type: ignore[union-attr]


def test_objects_left_when_the_pool_closes_are_answered() -> None:
    pool = AnalyserPool(1)
    futures = [pool.submit(_ct()) for _ in range(3)]
    pool.close()
    assert all(future.done() for future in futures)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_setting_applies_on_glibc() -> None:
    assert keep_large_buffers() is True
