"""Object storage behind one small interface.

A store knows keys and bytes, nothing of DICOM.  Keys are derived only from validated
UIDs (docs/architecture.md, "Data layout"):
``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
inside the customer's own area (its folder, or its prefix in the bucket).

Contract (:class:`ObjectStore`: ``put``, ``open``, ``size``, ``delete``, ``keys``,
``check``, ``close``), checked by ``tests/storage/test_storage_contract.py`` against
every backend:

- ``put`` returns only once the object is durable (fsync and atomic rename, or a
  completed S3 PUT); a failed ``put`` leaves no object and no partial object.
- ``open`` streams the stored bytes; ``open`` and ``size`` of a missing key raise
  :class:`NotFound`.
- ``delete`` of a missing key is not an error.
- Backend failures surface as :class:`StorageError`.

Optional capabilities, each a small protocol a caller asks for explicitly
(``isinstance(store, LocalFiles)``) and each with a plain fallback, so that a backend
implements only what it does better than the fallback:

- :class:`LocalFiles`, ``local_file(key)``: the object's file, which C-MOVE / C-GET
  send by path; fallback :func:`local_path` gives ``None`` (read it with ``open``);
- :class:`BatchPut`, ``put_many(items)``: one durability point for a STOW-RS batch;
  fallback :func:`put_many` puts each;
- :class:`Usage`, ``usage()``: bytes stored, from one listing; fallback :func:`usage`
  sums ``size`` per key;
- :class:`Quarantine`, ``quarantine(key, folder)``: out of service, never deleted;
  without it ``pacs fsck`` reports the object and leaves it where it is;
- :class:`ModifiedTimes`, ``modified_times()``: when each object was written, from one
  listing, for ``pacs reindex``; fallback: the local files' times, else undated;
- :class:`Staging`, ``stage(data)``: an object's bytes made durable while ingest
  analyses them, placed at their key once it is known; fallback :func:`staged` puts
  them when placed;
- :class:`RandomAccess`, ``open_ranged(key)``: a seekable stream whose reads fetch
  their ranges (:mod:`pacs.core.storage.ranged`), for frames, headers and bulk data;
  fallback :func:`open_ranged` gives ``open`` when its stream seeks (files, memory),
  else a spooled copy of the whole object.

The folder store has :class:`LocalFiles`, :class:`BatchPut`, :class:`Staging` and
:class:`Quarantine`;
the S3 store :class:`Usage`, :class:`Quarantine`, :class:`ModifiedTimes` and
:class:`RandomAccess`; the memory store (tests) :class:`Quarantine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pacs.core.storage.base import (
    BatchPut,
    LateWrites,
    LocalFiles,
    ModifiedTimes,
    ObjectStore,
    Quarantine,
    RandomAccess,
    Staged,
    Staging,
    Usage,
    digest,
    exists,
    folder_below,
    is_object_key,
    local_path,
    object_key,
    open_ranged,
    open_seekable,
    put_each,
    put_many,
    quarantine_folder,
    read_bounded,
    read_object,
    spooled_copy,
    staged,
    usage,
)

if TYPE_CHECKING:
    from pacs.core.config import Settings

__all__ = ["BatchPut", "LateWrites", "LocalFiles", "ModifiedTimes", "ObjectStore", "Quarantine",
           "RandomAccess", "Staged", "Staging", "Usage", "digest", "exists", "folder_below",
           "is_object_key",
           "local_path", "object_key", "open_ranged", "open_seekable", "open_store",
           "put_each", "put_many", "quarantine_folder", "read_bounded", "read_object",
           "spooled_copy", "staged", "usage"]


def open_store(settings: Settings, check: bool = True, create: bool = True) -> ObjectStore:
    """The store the settings name, checked for reachability unless ``check`` is false;
    its folder or bucket created when missing with ``create``
    (:meth:`~pacs.core.storage.base.ObjectStore.check`)."""
    store: ObjectStore
    if settings.storage == "s3":
        from pacs.core.storage.s3 import S3Store

        store = S3Store.from_settings(settings)
    else:
        from pacs.core.storage.filesystem import FileStore

        store = FileStore(settings.objects_dir)
    if check:
        store.check(create)
    return store
