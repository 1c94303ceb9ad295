"""Calls handed to a thread with a handshake (pacs.core.offload)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from adapters.dicomweb.errors import outcome_for
from pacs.core.errors import Exhausted
from pacs.core.ingest import DIGEST_OFFLOAD_BYTES, Ingest, analyse
from pacs.core.offload import Offload
from pacs.core.services import Services
from pacs.dimse.status import STORE_STATUS, status_for
from tests.factory import make_instance


def test_start_returns_once_the_call_runs_and_gives_its_result() -> None:
    offload = Offload(2, "test-offload")
    running, release = threading.Event(), threading.Event()

    def call(value: int) -> int:
        running.set()
        release.wait(10)
        return value * 2

    try:
        future = offload.start(call, 21)
        assert running.is_set()  # begun before start returned
        assert not future.done()
        release.set()
        assert future.result(10) == 42
        with pytest.raises(ZeroDivisionError):
            offload.start(lambda: 1 // 0).result(10)
        assert offload.submit(call, 4).result(10) == 8  # begins when it can
    finally:
        offload.close()


def test_a_forked_process_starts_its_own_threads() -> None:
    offload = Offload(1, "test-offload")
    try:
        assert offload.start(os.getpid).result(10) == os.getpid()
        child = os.fork()
        if child == 0:  # the parent's threads are gone here
            os._exit(0 if offload.start(os.getpid).result(10) == os.getpid() else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        offload.close()


def test_large_objects_are_hashed_aside_to_the_same_checksum(services: Services) -> None:
    """An object from DIGEST_OFFLOAD_BYTES on is hashed in a thread; its analysis has
    the checksum computed in passing for a small one."""
    ingest: Ingest = services.ingest
    large = make_instance(Rows=256, Columns=512, PixelData=bytes(256 * 512 * 2))
    small = make_instance()
    assert len(large) >= DIGEST_OFFLOAD_BYTES > len(small)
    assert ingest.digest(small) is None
    digest = ingest.digest(large)
    assert digest is not None
    assert digest() == hashlib.sha256(large).hexdigest()
    assert analyse(large, checksum=digest).checksum == analyse(large).checksum


def test_a_call_no_thread_can_start_for_is_refused_and_never_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RLIMIT_NPROC reached: the call fails with Exhausted (RuntimeError escaped as a
    bug, and the call stayed queued, to run after its request had failed); answered
    as out of resources (C-STORE A700, DICOMweb 503); threads that start again run the
    next call."""
    offload = Offload(2, "test-exhausted")
    ran: list[int] = []
    starting = threading.Thread.start
    short = True

    def start(thread: threading.Thread) -> None:
        if short and thread.name.startswith("test-exhausted"):
            raise RuntimeError("can't start new thread")
        starting(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        with pytest.raises(Exhausted) as refused:
            offload.start(ran.append, 1)
        with pytest.raises(Exhausted):
            offload.submit(ran.append, 2)
        short = False
        offload.start(ran.append, 3).result(timeout=10)
    finally:
        offload.close()
    assert ran == [3]
    assert status_for(STORE_STATUS, refused.value).code == 0xA700
    assert outcome_for(refused.value).status.startswith("503")
