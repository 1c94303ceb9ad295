"""Opening a node's services: the object store's folder is made for a new node only."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from pacs.core import config
from pacs.core.errors import ConfigError
from pacs.core.index import reads
from pacs.core.services import Services, build
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
