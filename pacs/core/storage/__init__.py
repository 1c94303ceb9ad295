"""Object storage behind one small interface.

A store knows keys and bytes, nothing of DICOM.  Keys are derived only from validated
UIDs (docs/architecture.md, "Data layout"):
``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
inside the customer's own area (its folder, or its prefix in the bucket).

Contract, checked by ``tests/storage/test_storage_contract.py`` against every backend:

- ``put`` returns only once the object is durable (fsync and atomic rename, or a
  completed S3 PUT); a failed ``put`` leaves no object and no partial object.
- ``open`` streams the stored bytes; a missing key raises :class:`NotFound`.
- ``delete`` of a missing key is not an error.
- Backend failures surface as :class:`StorageError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pacs.core.storage.base import (ObjectStore, is_object_key, object_key, put_each,
                                    quarantine_folder)

if TYPE_CHECKING:
    from pacs.core.config import Settings

__all__ = ["ObjectStore", "is_object_key", "object_key", "open_store", "put_each",
           "quarantine_folder"]


def open_store(settings: Settings, check: bool = True) -> ObjectStore:
    """The store the settings name, checked for reachability unless ``check`` is false."""
    store: ObjectStore
    if settings.storage == "s3":
        from pacs.core.storage.s3 import S3Store

        store = S3Store.from_settings(settings)
    else:
        from pacs.core.storage.filesystem import FileStore

        store = FileStore(settings.objects_dir)
    if check:
        store.check()
    return store
