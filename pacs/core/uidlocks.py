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
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: ``struct flock`` (``fcntl(2)``): type, whence, start, length, pid (0 for OFD locks),
#: in the platform's layout.
_FLOCK = struct.Struct("@hhqqi4x")


@contextmanager
def held(path: Path, uids: Sequence[str]) -> Iterator[None]:
    """Hold the locks of ``uids`` in the lock file ``path`` (created when missing).

    Taken in ascending order of their byte, so that no two holders of several locks
    can wait for each other.
    """
    ranges = sorted({zlib.crc32(uid.encode()) for uid in uids})
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for start in ranges:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW,
                        _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
        yield
    finally:
        os.close(fd)  # releases every lock of this descriptor
