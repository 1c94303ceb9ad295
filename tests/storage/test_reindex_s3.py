"""``pacs reindex`` against a real S3 server (the SeaweedFS cluster of
:mod:`tests.storage.seaweed`): the index rebuilt from the bucket equals the one ingest
built, row by row in every table, and answers the same C-FIND and QIDO-RS queries.
The data set and the comparisons are those of ``tests/service/test_reindex.py``.

The data set holds the IOCM rejection notes of ``ingest_rejections``: the instances
they removed whose objects are still in the bucket stay hidden after the rebuild.

The order of writes comes from the bucket listing's ``LastModified`` (whole seconds on
SeaweedFS, hence the pauses before the writes whose order decides a row), through the
S3 store's :class:`pacs.core.storage.ModifiedTimes` capability.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pacs.core import config
from pacs.core.analysers import AnalyserPool
from pacs.core.reindex import rebuild
from pacs.core.services import Services, build
from pacs.core.storage import ModifiedTimes
from pacs.core.storage.memory import MemoryStore
from tests.service.test_reindex import (
    EARLIER_STUDY,
    SHARED_ID,
    Node,
    assert_rejections_applied,
    assert_same_answers,
    assert_same_rows,
    dump,
    ingest_varied,
    previous_index,
    serve,  # noqa: F401 - the fixture
)
from tests.storage.seaweed import SeaweedS3, seaweed_s3  # noqa: F401 - the fixture
from tests.storage.test_storage_contract import make_s3_store


def test_an_index_rebuilt_from_the_bucket_equals_the_original(
        seaweed_s3: SeaweedS3, settings: config.Settings, tmp_path: Path,  # noqa: F811
        serve: Callable[[Services], Node]) -> None:  # noqa: F811
    store = make_s3_store(seaweed_s3)
    assert isinstance(store, ModifiedTimes)
    services = build(settings, store=store)
    varied = ingest_varied(services, pause=1.1)  # LastModified: whole seconds
    services.close()  # closes the store too: the rebuild gets a fresh client
    store = make_s3_store(seaweed_s3, customer=store.customer)
    listed = set(store.keys())

    pool = AnalyserPool(2, settings.max_object_bytes)
    try:
        report = rebuild(settings.index_path, store, pool)
    finally:
        pool.close()
        store.close()

    assert report.objects == len(listed) == len(varied.objects) + len(varied.damaged)
    assert report.indexed == len(varied.objects) - len(varied.rejected)
    assert report.undated == 0
    assert {s.key for s in report.skipped} == set(varied.damaged)
    store = make_s3_store(seaweed_s3, customer=store.customer)
    try:
        assert set(store.keys()) == listed  # nothing deleted or moved
    finally:
        store.close()

    original = previous_index(report, tmp_path / "original")
    rebuilt = dump(settings.index_path)
    assert_same_rows(dump(original), rebuilt)
    assert_rejections_applied(report, varied, dump(original), rebuilt)
    shared = next(row for row in rebuilt["patient"].values() if row["patient_id"] == SHARED_ID)
    assert shared["patient_name"] == "LATE^NAME"
    assert rebuilt["study"][EARLIER_STUDY]["patient_name"] == "EARLY^NAME"

    served_original = build(settings.with_overrides(data_dir=original.parent),
                            store=MemoryStore())
    served_rebuilt = build(settings, store=MemoryStore())
    try:
        assert_same_answers(serve(served_original), serve(served_rebuilt), varied)
    finally:
        served_original.close()
        served_rebuilt.close()
