"""In-process DIMSE server fixtures: the real pynetdicom stack on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pacs.core.services import Services
from pacs.dimse.server import NodeServer, start, stop
from tests.conftest import SEAM, free_port


@dataclass
class RunningNode:
    """An SCP serving ``services`` on ``port``."""

    services: Services
    port: int
    server: NodeServer


@pytest.fixture
def node(services: Services) -> Iterator[RunningNode]:
    """A running SCP over the in-memory ``services`` fixture."""
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    assert server.uses_seam is SEAM  # PACS_DIMSE_SEAM reached the node
    yield RunningNode(services, port, server)
    stop(server, drain=1.0)
