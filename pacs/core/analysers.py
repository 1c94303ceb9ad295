"""Analysis of received objects in helper processes, off the receiving process's GIL.

:func:`pacs.core.ingest.analyse` (parse the header, prove the data set whole, index values,
WADO metadata, checksum) is most of the CPU an object costs to ingest, and it is pure
Python holding the GIL.  A STOW-RS request is one thread of one gunicorn worker: its
parts were read, analysed and stored on one core while the other stayed mostly idle
(measured: the worker at 100 % of a core, the machine at 55 %).  Here the bytes go to
helper processes over Unix sockets (one kernel copy each way, no pickling of the data)
and the :class:`~pacs.core.ingest.Analysis` comes back pickled, a few KB.

A helper is a fresh interpreter (``python -P -m pacs.core.analysers FD``) importing the same
``pacs`` as its parent, never a fork of the threaded worker, in a session of its own
(a Ctrl-C is for the server, which then closes its helpers).  Helpers start with the
pool and end when it closes or their parent dies (end of file on their socket).  One
that dies or hangs fails only the object it was analysing (:class:`AnalysisFault`; a
death gives the object a second try first) and is replaced for the next one.

Two objects are in flight per helper, so that it never waits for the next one; the
helper reads its socket in a thread of its own, so that a large reply and a large
next object never wait on each other.

With ``size`` 0 the analysis runs in the caller's thread: the same answers, for tests
and for single-core machines.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pacs
from pacs.core.errors import AnalysisFault, PacsError
from pacs.core.ingest import Analysis, try_analyse
from pacs.core.malloc import keep_large_buffers

log = logging.getLogger(__name__)

#: Frame header: the length of what follows.
_LENGTH = struct.Struct("<Q")
#: Seconds a helper may take to accept an object or answer one before it is given up
#: (and replaced): far above any real header, it only bounds a helper that hangs.
ANALYSIS_TIMEOUT = 60.0
#: Seconds a new helper may take to start (import pydicom) and say it is ready.
START_TIMEOUT = 60.0
#: Objects given to a helper before its first answer is read.
IN_FLIGHT = 2
#: Objects larger than this are analysed in the calling thread: their header costs no
#: more to parse than a small object's, their checksum runs without the GIL, and a
#: helper would hold a second copy of the whole object (parts may reach 2 GB).
INLINE_BYTES = 64 << 20
#: Socket buffer asked for on both ends: a CT instance in one or two sends.
_SOCKET_BUFFER = 1 << 20

#: What a caller gets for one object: its analysis, or why it cannot be stored.
Result = Analysis | Exception


@dataclass
class _Task:
    """One object to analyse and where its result goes."""

    data: bytes
    future: Future[Result]
    tries: int = 0


class AnalyserPool:
    """Analyse objects in ``size`` helper processes (``0``: in the calling thread).

    Every future it returns completes: with the analysis, the object's refusal, or an
    :class:`AnalysisFault` when no helper could analyse it.

    Parameters
    ----------
    size : int
        Helper processes; each is served by one thread of this process that is
        blocked in socket calls (GIL released) while its helper works.
    max_object_bytes : int, optional
        ``PACS_MAX_OBJECT_BYTES``, for :func:`pacs.core.ingest.analyse` (the inflated size
        of deflated data sets); ``None``: no limit.
    """

    def __init__(self, size: int, max_object_bytes: int | None = None) -> None:
        self.size = size
        self.max_object_bytes = max_object_bytes
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, data: bytes) -> Future[Result]:
        """The analysis of ``data``: an :class:`Analysis`, or the refusal (a
        :class:`PacsError`) or fault (any other exception) it ended in.

        Raises
        ------
        RuntimeError
            The pool is closed.
        """
        future: Future[Result] = Future()
        if self.size <= 0 or len(data) > INLINE_BYTES:
            future.set_result(try_analyse(data, self.max_object_bytes))
            return future
        with self._lock:  # no object slips in behind close()'s stop signals
            self._start_locked()
            self._tasks.put(_Task(data, future))
        return future

    def start(self) -> None:
        """Start the helpers now rather than with the first object (a server calls this
        as it boots, so that no request waits for a helper to import pydicom)."""
        if self.size > 0:
            with self._lock:
                self._start_locked()

    def _start_locked(self) -> None:
        """Bring the serving threads up to ``size`` (also after one ended abnormally)."""
        if self._closed:
            raise RuntimeError("the analyser pool is closed")
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        while len(self._threads) < self.size:
            thread = threading.Thread(target=self._serve, daemon=True,
                                      name=f"analyser-{len(self._threads)}")
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the helpers, after the objects already submitted."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            for _ in threads:
                self._tasks.put(None)
        for thread in threads:
            thread.join()
        while True:  # left by a thread that ended abnormally: answered, never lost
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.set_result(AnalysisFault("the analyser pool was closed"))

    def _serve(self) -> None:
        """One helper's thread: keep up to :data:`IN_FLIGHT` objects with its helper,
        replace the helper when it fails."""
        helper = _spawned(self.max_object_bytes)
        sent: deque[_Task] = deque()  # with the helper, in order, replies not read yet
        again: deque[_Task] = deque()  # to send to a new helper after one failed
        running = True
        try:
            while running or sent or again:
                while len(sent) < IN_FLIGHT and (again or running):
                    if again:
                        task = again.popleft()
                    else:
                        try:
                            queued = self._tasks.get(block=not sent)
                        except queue.Empty:
                            break
                        if queued is None:
                            running = False
                            break
                        if not queued.future.set_running_or_notify_cancel():
                            continue
                        task = queued
                    try:
                        helper = helper or _Helper(self.max_object_bytes)
                        helper.send(task.data)
                    except Exception as exc:  # noqa: BLE001 - any failure: a new helper
                        # Gone before this object reached it: because of an earlier
                        # one (see _replace), or on its own.  This one gets
                        # one more try, on a new helper.  (The order of analyses does
                        # not matter: each has its own future.)
                        _replace(helper, sent, again, exc)
                        helper = None
                        task.tries += 1
                        if task.tries < 2:
                            again.append(task)
                        else:
                            task.future.set_result(
                                AnalysisFault("no analysis helper could take the object"))
                        continue
                    sent.append(task)
                if sent:
                    assert helper is not None
                    try:
                        result = helper.receive()
                    except Exception as exc:  # noqa: BLE001 - died, hung, or unreadable
                        _replace(helper, sent, again, exc)
                        helper = None
                        continue
                    sent.popleft().future.set_result(result)
        finally:
            # Normally nothing is left; after an abnormal end (KeyboardInterrupt,
            # SystemExit in this thread) no caller may wait for ever.
            for task in (*sent, *again):
                if not task.future.done():
                    task.future.set_result(AnalysisFault("the analysis was interrupted"))
            if helper is not None:
                helper.close()


def _spawned(max_object_bytes: int | None) -> _Helper | None:
    """A new helper, or ``None`` if none can start now (tried again with an object)."""
    try:
        return _Helper(max_object_bytes)
    except OSError as exc:
        log.error("cannot start an analysis helper: %s", exc)
        return None


def _replace(helper: _Helper | None, sent: deque[_Task], again: deque[_Task],
             error: BaseException) -> None:
    """After a helper failed: end it; the objects sent to it go to the next helper.

    The oldest is the one it was on, unless it died before reading it (a helper killed
    while idle is only noticed with the next object): a death gives that object one
    more try, and a second death, or a hang (timeout), fails it.
    """
    log.error("an analysis helper failed (%s: %s); it is replaced",
              type(error).__name__, error)
    if helper is not None:
        helper.close(kill=True)
    if sent:
        oldest = sent[0]
        oldest.tries += 1
        if isinstance(error, TimeoutError) or oldest.tries >= 2:
            sent.popleft().future.set_result(
                AnalysisFault("the analysis of the object failed"))
    again.extendleft(reversed(sent))
    sent.clear()


class _Helper:
    """One helper process and our end of its socket."""

    def __init__(self, max_object_bytes: int | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        limit = [] if max_object_bytes is None else [str(max_object_bytes)]
        try:
            for end in (ours, theirs):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "pacs.core.analysers", str(theirs.fileno()),
                 *limit],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
                env=_helper_environment(), start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Until its ready frame has come, the helper is starting, not analysing.
        ours.settimeout(START_TIMEOUT)
        self.socket = ours
        self.ready = False

    def send(self, data: bytes) -> None:
        """Give the helper one object."""
        self.socket.sendall(_LENGTH.pack(len(data)))
        self.socket.sendall(data)

    def receive(self) -> Result:
        """The result of the oldest object given and not yet answered."""
        if not self.ready:
            if _receive(self.socket):
                raise EOFError("the helper did not start as expected")
            self.ready = True
            self.socket.settimeout(ANALYSIS_TIMEOUT)
        result: Result = pickle.loads(_receive(self.socket))
        return result

    def close(self, kill: bool = False) -> None:
        """End the helper: closing our end is its signal (``kill``: it failed, so it
        is not waited for)."""
        self.socket.close()
        if not kill:
            try:
                self.process.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait()


def _helper_environment() -> dict[str, str]:
    """This environment, with this process's ``pacs`` first on the helper's path: the
    helper runs the same code as its parent even when another version is installed or
    the working folder holds a ``pacs`` folder (``-P`` leaves the latter out)."""
    root = str(Path(pacs.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _receive(sock: socket.socket) -> bytearray:
    """One length-prefixed frame; EOFError when the peer has gone."""
    header = _exactly(sock, _LENGTH.size)
    return _exactly(sock, _LENGTH.unpack(header)[0])


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:], size - got)
        if count == 0:
            raise EOFError("the peer closed the connection")
        got += count
    return buffer


def _receive_bytes(sock: socket.socket) -> bytes:
    """One frame as ``bytes``, filled by the kernel in place (no copy here)."""
    size = _LENGTH.unpack(_exactly(sock, _LENGTH.size))[0]
    data = sock.recv(size, socket.MSG_WAITALL) if size else b""
    if len(data) < size:
        if not data:
            raise EOFError("the peer closed the connection")
        data += _exactly(sock, size - len(data))  # cut short by a signal: the rest
    return data


def _reply(result: Result) -> bytes:
    """The pickled result; an exception that does not pickle is sent as a fault."""
    if not isinstance(result, (Analysis, PacsError)):
        # A fault, not a refusal: its traceback stays here, in the helper's log.
        log.error("analysis failed unexpectedly", exc_info=result)
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an odd exception type from a library
        return pickle.dumps(AnalysisFault(f"analysis failed: {type(result).__name__}"),
                            protocol=pickle.HIGHEST_PROTOCOL)


def _read_objects(sock: socket.socket, inbox: queue.SimpleQueue[bytes | None]) -> None:
    """The helper's reading thread: objects into ``inbox`` as they arrive, ``None`` at
    the end.  Reading apart from analysing is what lets the parent send the next object
    while a long reply is on its way back (the parent sends at most IN_FLIGHT)."""
    try:
        while True:
            inbox.put(_receive_bytes(sock))
    except (EOFError, OSError):
        inbox.put(None)


def main(argv: list[str] | None = None) -> int:
    """A helper: analyse each object received on the inherited socket until EOF.

    Arguments: the socket's descriptor, then optionally ``PACS_MAX_OBJECT_BYTES``.
    """
    from pacs.core import logs
    from pacs.core.dataset import quiet_pydicom  # the same reading settings as the parent

    logs.setup("WARNING")  # no data-set values in what a helper logs
    quiet_pydicom()
    keep_large_buffers()
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    max_object_bytes = int(args[1]) if len(args) > 1 else None
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    threading.Thread(target=_read_objects, args=(sock, inbox), daemon=True).start()
    try:
        sock.sendall(_LENGTH.pack(0))  # ready: an empty frame
        while (data := inbox.get()) is not None:
            reply = _reply(try_analyse(data, max_object_bytes))
            sock.sendall(_LENGTH.pack(len(reply)) + reply)
    except OSError:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
