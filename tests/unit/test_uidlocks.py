"""The per-UID locks: exclusive per UID across threads and processes, and nothing more."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from pacs.core import uidlocks
from pacs.core.errors import IndexFailure, InstanceLocked


def _try_in_thread(path: Path, uids: list[str], acquired: threading.Event) -> threading.Thread:
    def take() -> None:
        with uidlocks.held(path, uids):
            acquired.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread


def test_a_uid_held_by_one_thread_waits_in_another(tmp_path: Path) -> None:
    path = tmp_path / "uids.lock"
    acquired = threading.Event()
    with uidlocks.held(path, ["1.2.3", "1.2.4"]):
        thread = _try_in_thread(path, ["1.2.4"], acquired)
        assert not acquired.wait(0.3)
    assert acquired.wait(5)
    thread.join(5)


def test_other_uids_do_not_wait_for_a_held_batch(tmp_path: Path) -> None:
    path = tmp_path / "uids.lock"
    batch = [f"1.2.840.99.{n}" for n in range(500)]
    others = [f"1.2.840.98.{n}" for n in range(200)]
    with uidlocks.held(path, batch):
        for uid in others:
            acquired = threading.Event()
            _try_in_thread(path, [uid], acquired).join(5)
            assert acquired.is_set(), uid


def _hold_until(path: Path, uid: str, ready: multiprocessing.synchronize.Event,
                release: multiprocessing.synchronize.Event) -> None:
    with uidlocks.held(path, [uid]):
        ready.set()
        release.wait(10)


def _holder(path: Path, uid: str
            ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
    """Another process holding ``uid``'s lock until the event it returns is set."""
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_until, args=(path, uid, ready, release))
    holder.start()
    assert ready.wait(30)
    return holder, release


def test_a_uid_held_by_another_process_waits(tmp_path: Path) -> None:
    path = tmp_path / "uids.lock"
    holder, release = _holder(path, "1.2.3")
    try:
        acquired = threading.Event()
        thread = _try_in_thread(path, ["1.2.3"], acquired)
        assert not acquired.wait(0.3)
        release.set()
        assert acquired.wait(10)
        thread.join(5)
    finally:
        release.set()
        holder.join(10)


def test_a_dead_holder_releases_its_locks(tmp_path: Path) -> None:
    path = tmp_path / "uids.lock"
    holder, _release = _holder(path, "1.2.3")
    holder.kill()
    holder.join(10)
    acquired = threading.Event()
    _try_in_thread(path, ["1.2.3"], acquired).join(5)
    assert acquired.is_set()


def test_a_bounded_wait_fails_with_instance_locked_and_keeps_nothing(tmp_path: Path) -> None:
    """A caller answering a peer waits a bounded time: past it, InstanceLocked (an
    IndexFailure: A700 for C-STORE, 503 over HTTP), and none of the locks it took
    before the held one is kept."""
    path = tmp_path / "uids.lock"
    others = [f"1.2.840.97.{n}" for n in range(50)]
    with uidlocks.held(path, ["1.2.3"]):
        with (pytest.raises(InstanceLocked) as caught,
              uidlocks.held(path, [*others, "1.2.3"], wait=0.2)):
            pytest.fail("took a lock another holder holds")
        assert isinstance(caught.value, IndexFailure)
        assert len(str(caught.value)) <= 64  # a DIMSE Error Comment
        with uidlocks.held(path, others, wait=0):  # at once: none of them was kept
            pass
    with uidlocks.held(path, ["1.2.3"], wait=0):  # released: taken at once
        pass


def test_a_bounded_wait_takes_the_lock_once_released(tmp_path: Path) -> None:
    path = tmp_path / "uids.lock"
    holder, release = _holder(path, "1.2.3")
    try:
        taken = threading.Event()

        def take() -> None:
            with uidlocks.held(path, ["1.2.3"], wait=60):
                taken.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        assert not taken.wait(0.3)
        release.set()
        assert taken.wait(30)
        thread.join(5)
    finally:
        release.set()
        holder.join(10)
