"""Opening a node's services: the object store's folder is made for a new node only."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from dataclasses import replace

import pytest

from pacs.core import config
from pacs.core.errors import ConfigError
from pacs.core.index import reads
from pacs.core.services import Services, build
from pacs.core.storage.memory import MemoryStore
from tests.conftest import sample


def test_a_new_node_makes_its_objects_folder(settings: config.Settings) -> None:
    assert not settings.objects_dir.exists()
    build(settings).close()
    assert settings.objects_dir.is_dir()


def test_a_missing_objects_folder_under_an_index_with_instances_is_refused(
        settings: config.Settings, make_services: Callable[..., Services]) -> None:
    """As when its volume is not mounted: made anew, the folder would take new objects
    while every stored one read as lost."""
    services = make_services(intake_object_bytes=0)
    services.ingest.store_bytes(sample("CT_small.dcm").read_bytes())
    assert reads.counts(services.index.connection())["instance"] == 1
    shutil.rmtree(settings.objects_dir)
    with pytest.raises(ConfigError, match="not mounted"):
        build(settings)
    assert not settings.objects_dir.exists()
    # Without the check (a worker of a running node) it opens, and makes nothing.
    build(settings, check_store=False).close()
    assert not settings.objects_dir.exists()


def test_an_index_refuses_another_customers_name(settings: config.Settings) -> None:
    """A mistyped ``--customer`` beside the right ``PACS_DATA_DIR`` is refused, not run
    on that index under the other name (on S3: beside another key prefix)."""
    build(settings).close()  # a new index: its creator's customer owns it
    with pytest.raises(ConfigError, match="customer 'default'"):
        build(replace(settings, customer="typo"))
    with pytest.raises(ConfigError, match="customer 'default'"):
        build(replace(settings, customer="typo"), claim=True)
    build(settings, claim=True).close()


def test_an_unclaimed_index_is_claimed_by_the_node(settings: config.Settings) -> None:
    """An index made before owners were recorded opens under any name until the node
    (``claim``) records its own."""
    services = build(settings)
    with services.index.write() as conn:
        conn.execute("DELETE FROM owner")
    services.close()
    build(replace(settings, customer="other")).close()  # a command: no claim
    build(settings, claim=True).close()
    with pytest.raises(ConfigError, match="customer 'default'"):
        build(replace(settings, customer="other"))


def test_a_node_whose_store_is_down_starts_on_what_it_acknowledged(
        settings: config.Settings, make_services: Callable[..., Services],
        caplog: pytest.LogCaptureFixture) -> None:
    """An S3 store that does not answer: a new node refuses to start (a wrong address,
    most likely); one whose index holds what it acknowledged starts without it, warns,
    and serves those instances from its intake (its mover moves them once the store is
    back)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    down = settings.with_overrides(storage="s3", s3_endpoint=f"127.0.0.1:{closed}",
                                   s3_access_key="key", s3_secret_key="secret-key",
                                   s3_bucket="pacs", s3_secure=False)
    with pytest.raises(ConfigError, match="cannot reach"):
        build(down)
    acknowledged = sample("CT_small.dcm").read_bytes()
    make_services(MemoryStore(), intake_mover="off").ingest.store_bytes(acknowledged)
    services = build(down)
    try:
        assert "starting without it" in caplog.text
        [key] = reads.intake_keys(services.index.connection())
        with services.store.open(key) as stream:
            assert stream.read() == acknowledged
    finally:
        services.close()
