"""glibc malloc settings for processes that move large buffers (request bodies, parts).

Python allocates every bytes object above 512 bytes with ``malloc``.  glibc serves a
large one (above a threshold that adapts up to 32 MB) with a fresh ``mmap``, and gives
freed memory above 128 KB at the top of the heap back to the kernel.  A STOW-RS body
read in 1 MB pieces and split into parts then pays a page fault for every 4 KB of
every copy: 7,000 to 14,000 faults per 26 MB request in the gunicorn worker, measured
with ``/proc/<pid>/stat``; with these settings, about 1,300.  Memory stays bounded:
what is kept is what the largest request in flight needed, up to :data:`TRIM_BYTES`
at the top of each arena, and the arenas are limited to :data:`ARENAS` so that a
worker's threads do not each keep their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Allocations below this come from the heap, so their pages are reused.
MMAP_BYTES = 64 << 20
#: Free memory kept at the top of the heap before any is given back.
TRIM_BYTES = 128 << 20
#: malloc arenas at most (glibc's default is 8 per CPU): Python's threads allocate
#: under the GIL anyway, so more arenas only keep more memory.
ARENAS = 2


def keep_large_buffers() -> bool:
    """Apply the settings to this process; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None:
            return False
        return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)
                    and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)
                    and mallopt(_M_ARENA_MAX, ARENAS))
    except OSError:
        return False
