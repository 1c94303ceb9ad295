"""Long calls that release the GIL, run in a thread while the caller goes on.

Ingest overlaps the slow parts of a large object with its analysis: the durable write
of its bytes (:meth:`pacs.core.storage.filesystem.FileStore.stage`) and their SHA-256
(:mod:`pacs.core.ingest`).  Each is one C call that releases the GIL for its whole
length (``os.write`` of an ``O_DSYNC`` file, ``hashlib.sha256`` of more than 2 KiB).

A thread handed such work needs the GIL to reach the call, and a caller busy with
Python code keeps it until the interpreter's switch interval (5 ms) forces it off -
about as long as an analysis, so nothing would overlap.  :meth:`Offload.start`
therefore returns only once the thread has begun: the caller waits (without the GIL)
for the thread to signal that it is about to make its call, and the thread gives the
GIL back as that call begins.  Each hand-over costs two thread wake-ups (about a
tenth of a millisecond each here); :meth:`Offload.submit` leaves a call to begin during
the next one, so that ingest, which stages an object and then starts its hash, waits
once for both.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, ParamSpec, TypeVar

from pacs.core.errors import Exhausted

_P = ParamSpec("_P")
_T = TypeVar("_T")


def cannot_start_thread(exc: BaseException | None) -> bool:
    """``threading.Thread.start`` refused (RLIMIT_NPROC, a cgroup's pids limit, memory)."""
    return isinstance(exc, RuntimeError) and "start new thread" in str(exc)


class Job(Generic[_T]):
    """A call handed to a thread pool, with a future of its own, that can be withdrawn
    while no thread has taken it.

    ``ThreadPoolExecutor.submit`` queues the call before it starts a thread for it; when
    the thread cannot start it raises with the call left in the queue, where a thread
    freed later would run it for a request long answered.  The pool's own future is
    lost with the exception; this one is not.
    """

    def __init__(self, call: Callable[..., _T], *args: Any) -> None:
        self.call = call
        self.args = args
        self.future: Future[_T] = Future()

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # withdrawn
        try:
            result = self.call(*self.args)
        except BaseException as exc:  # noqa: BLE001 - the future's, as the pool does
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def withdraw(self) -> bool:
        """True when no thread has taken the call, which now never runs."""
        return self.future.cancel()


def submit_job(pool: ThreadPoolExecutor, job: Job[_T]) -> bool:
    """Hand ``job`` to ``pool``; False when no thread could be started for it and it
    was withdrawn (it never runs).  A job a running thread took meanwhile runs."""
    try:
        pool.submit(job)
    except RuntimeError as exc:
        if not cannot_start_thread(exc):
            raise
        return not job.withdraw()
    return True


class Offload:
    """A few threads for calls that release the GIL, started with a handshake.

    Parameters
    ----------
    threads : int
        Calls run at once (more wait their turn).
    name : str
        Prefix of the threads' names.

    Notes
    -----
    The threads start with the first call, in the process making it: threads do not
    survive a ``fork``, so a process that inherits an ``Offload`` starts its own.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._size = threads
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def start(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
              ) -> Future[_T]:
        """Run ``call(*args, **kwargs)`` in a thread; return once it has begun."""
        started = threading.Event()

        def run() -> _T:
            started.set()
            return call(*args, **kwargs)

        job = Job(run)
        self._submit(job)
        started.wait()
        return job.future

    def submit(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
               ) -> Future[_T]:
        """Run ``call(*args, **kwargs)`` in a thread, which begins once the caller
        next lets go of the GIL: when a :meth:`start` (or any blocking call) follows
        at once, one hand-over serves both."""
        job: Job[_T] = Job(lambda: call(*args, **kwargs))
        self._submit(job)
        return job.future

    def _submit(self, job: Job[_T]) -> None:
        """Raises
        ------
        Exhausted
            No thread could be started for ``job`` (withdrawn: it never runs).
        """
        if not submit_job(self._threads(), job):
            raise Exhausted(f"cannot start a thread ({self._name})")

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=self._size,
                                                thread_name_prefix=self._name)
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        """Stop the threads once their calls are done."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown()
