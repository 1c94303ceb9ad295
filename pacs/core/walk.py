"""Walking a folder tree that someone else filled (the upload folder, ``pacs import``).

Python 3.11's ``os.walk`` calls itself once per folder level: a tree a thousand levels
deep (a path of a few kilobytes, well within ``PATH_MAX``) raised ``RecursionError``
out of it, which stopped the upload watcher's every scan for good and ``pacs import``
before its first file.  :func:`walk` keeps its own stack, and goes no deeper than
:data:`MAX_DEPTH` levels: what lies below is reported like a folder that cannot be
listed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

#: Folder levels below the top that are walked; deeper ones are reported, not entered.
MAX_DEPTH = 64


def walk(top: Path, onerror: Callable[[OSError], None] | None = None,
         max_depth: int = MAX_DEPTH) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, onerror=onerror)``, top-down, links to folders listed with the
    folders and not entered: ``(folder, dirs, files)``, whose ``dirs`` the caller may
    prune (and order) before the walk goes on.  A folder that cannot be listed, or
    lies more than ``max_depth`` levels below ``top``, goes to ``onerror`` (an
    ``OSError`` naming it) and is not entered."""
    stack: list[tuple[str, int]] = [(os.fspath(top), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as entries:
                dirs: list[str] = []
                files: list[str] = []
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            continue
        yield folder, dirs, files
        below = [os.path.join(folder, name) for name in dirs]
        below = [path for path in below if not os.path.islink(path)]
        if below and depth >= max_depth:
            for path in below:  # each one not entered is said
                if onerror is not None:
                    onerror(OSError(errno.ELOOP,
                                    f"more than {max_depth} folder levels deep", path))
            continue
        stack.extend((path, depth + 1) for path in reversed(below))
