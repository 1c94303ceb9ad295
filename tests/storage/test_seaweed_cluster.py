"""The S3 tests run against a SeaweedFS cluster, not a single server: more than one
volume server is registered with the master, and a bucket's objects land on each."""

from __future__ import annotations

import io

from pacs.core.storage import object_key
from tests.storage.seaweed import VOLUME_SERVERS, SeaweedS3, seaweed_s3  # noqa: F401 - the fixture
from tests.storage.test_storage_contract import make_s3_store

#: Objects written to see them spread: a few dozen put each server's share far from 0.
OBJECTS = 40


def test_the_cluster_has_more_than_one_volume_server(seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    servers = seaweed_s3.volume_servers()
    assert len(servers) == VOLUME_SERVERS > 1, servers
    assert len(set(servers)) == len(servers)


def test_objects_of_one_bucket_land_on_every_volume_server(
        seaweed_s3: SeaweedS3) -> None:  # noqa: F811
    # The master places the volumes it grows for a new bucket at random, all on one
    # server about once in 60 clusters: one volume on each first, so that what is
    # tested is where the gateway puts objects, not the placement of volumes.
    for server in seaweed_s3.volume_servers():
        seaweed_s3.grow_volume("spread", server)
    store = make_s3_store(seaweed_s3, bucket="spread")
    store.check()
    try:
        for number in range(1, OBJECTS + 1):
            data = f"object {number}".encode() * 100
            key = object_key("1.2.3", "1.2.3.4", f"1.2.3.4.{number}")
            store.put(key, io.BytesIO(data), len(data))
        held = seaweed_s3.files_per_volume_server("spread")
        assert sum(held.values()) == OBJECTS, held
        assert len(held) == VOLUME_SERVERS and all(held.values()), held
        # And every object reads back whichever server holds it.
        for number in range(1, OBJECTS + 1):
            with store.open(object_key("1.2.3", "1.2.3.4", f"1.2.3.4.{number}")) as stream:
                assert stream.read() == f"object {number}".encode() * 100
    finally:
        for key in list(store.keys()):
            store.delete(key)
        store.close()
