"""Per-UID locks shared by every process of a node, threads included.

Ingest decides and writes an instance under the lock of its SOP Instance UID; deletion,
repair and the intake's mover take the locks of the UIDs they touch.  Each UID has its
own byte of one lock file, locked with an open file description lock
(``F_OFD_SETLKW``, Linux): owned by the descriptor, not the process, so two threads of
one process exclude each other as two processes do, and released when the descriptor
closes (or its process dies).

One byte per UID (its CRC-32: four billion ranges) rather than a few lock files: the
mover holds the locks of a whole batch while it writes it, and an ingest of another UID
must not wait for that batch because the two hashed to the same stripe.

A caller that answers a peer waits a bounded time (``wait``): a holder may be stuck
behind a stalled object store (the mover's batch, a removal deleting objects), and the
peer must get a failure status before its own timeout rather than no answer at all.
The kernel has no timed wait for these locks, so a bounded wait tries
(``F_OFD_SETLK``) with short sleeps, growing from 1 ms to :data:`MAX_POLL`, until the
deadline.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pacs.core.errors import InstanceLocked

#: ``struct flock`` (``fcntl(2)``): type, whence, start, length, pid (0 for OFD locks),
#: in the platform's layout.
_FLOCK = struct.Struct("@hhqqi4x")

#: Longest sleep between two tries of a bounded wait (seconds): short beside any
#: peer's timeout, and a holder's release is seen within it.
MAX_POLL = 0.05

#: The errors of ``F_OFD_SETLK`` when another description holds the range.
_HELD = (errno.EAGAIN, errno.EACCES)


@contextmanager
def held(path: Path, uids: Sequence[str], wait: float | None = None) -> Iterator[None]:
    """Hold the locks of ``uids`` in the lock file ``path`` (created when missing).

    Taken in ascending order of their byte, so that no two holders of several locks
    can wait for each other.

    Parameters
    ----------
    path : Path
        The lock file.
    uids : sequence of str
        The UIDs whose locks to hold.
    wait : float, optional
        Seconds to wait for all of them together; ``None``: as long as it takes.

    Raises
    ------
    InstanceLocked
        ``wait`` passed with a lock still held by another holder (none is kept).
    """
    ranges = sorted({zlib.crc32(uid.encode()) for uid in uids})
    deadline = None if wait is None else time.monotonic() + wait
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for start in ranges:
            _lock(fd, start, deadline, wait)
        yield
    finally:
        os.close(fd)  # releases every lock of this descriptor


def _lock(fd: int, start: int, deadline: float | None, wait: float | None) -> None:
    """Lock the byte ``start`` of ``fd``: blocking without a deadline, else tried until
    ``deadline`` (``time.monotonic()``)."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0)
    if deadline is None:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
        return
    pause = 0.001
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return
        except OSError as exc:
            if exc.errno not in _HELD:
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            # Within the 64 characters of a DIMSE Error Comment.
            raise InstanceLocked(
                f"instance locked by another operation for over {wait:g} s; try later")
        time.sleep(min(pause, left))
        pause = min(pause * 2, MAX_POLL)
