"""The object store's interface and key layout (see :mod:`pacs.core.storage`)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from pacs.core.dataset import valid_uid
from pacs.core.errors import StorageError

_KEY_RE = re.compile(r"^[0-9.]{1,64}/[0-9.]{1,64}/[0-9.]{1,64}\.dcm$")
#: Names of quarantine folders (one per repair run).
_QUARANTINE_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def object_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The object key of an instance; every part must be a valid UID (PS3.5 9.1)."""
    for uid in (study_uid, series_uid, sop_uid):
        if not valid_uid(uid):
            raise ValueError("object keys are built from valid UIDs only")
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def is_object_key(key: str) -> bool:
    """True for keys of the form :func:`object_key` builds."""
    return bool(_KEY_RE.match(key))


def quarantine_folder(folder: str) -> str:
    """``folder`` when it is a safe name for a quarantine folder, else StorageError."""
    if not _QUARANTINE_FOLDER_RE.match(folder):
        raise StorageError("refusing a quarantine folder name with unsafe characters")
    return folder


class ObjectStore(Protocol):
    """What the core needs of an object store."""

    def put(self, key: str, source: BinaryIO, length: int) -> None:
        """Store ``length`` bytes read from ``source`` under ``key``, durably."""

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[StorageError | None]:
        """Store several objects, each as :meth:`put` would, all durable on return.

        One durability point for the lot (a folder store fsyncs them together); a
        failure concerns its own item only.  Returns each item's failure or ``None``.
        """

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object's bytes; the caller closes it."""

    def size(self, key: str) -> int:
        """The object's size in bytes."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    def exists(self, key: str) -> bool:
        """True when the object exists."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when the store keeps local files, else ``None``.

        Lets a sender stream the stored bytes by path (C-MOVE / C-GET) instead of
        copying them; the path may name a missing file when the object is gone.
        """

    def keys(self) -> Iterator[str]:
        """Every object key of this customer's area."""

    def quarantine(self, key: str, folder: str) -> str:
        """Move the object out of the keys into the quarantine area, under ``folder``.

        For objects that repair (``pacs fsck --repair``) takes out of service without
        deleting them: the object no longer exists at ``key`` (nor in :meth:`keys`), its
        bytes are kept under ``quarantine/<folder>/<key>``.  Returns that place (a path
        or an object name) for the report.  A missing key raises :class:`NotFound`.
        """

    def check(self) -> None:
        """Raise :class:`pacs.core.errors.ConfigError` when the store cannot be used."""

    def usage(self) -> int:
        """Bytes stored in this customer's area."""

    def close(self) -> None:
        """Release connections."""


def put_each(store: ObjectStore, items: Sequence[tuple[str, bytes]]) -> list[StorageError | None]:
    """:meth:`ObjectStore.put_many` for stores whose every put is durable by itself."""
    failures: list[StorageError | None] = []
    for key, data in items:
        try:
            store.put(key, io.BytesIO(data), len(data))
        except StorageError as exc:
            failures.append(exc)
        else:
            failures.append(None)
    return failures
