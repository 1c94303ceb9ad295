"""Stores refused while the intake is full (``PACS_INTAKE_MAX_BYTES``): the answers stay
C-STORE A700 and STOW-RS 503 with ``Retry-After``, and a flood of them is one WARNING
line with its count, not one ERROR line per refused instance
(:class:`pacs.core.intake.Refusals`, a clock of the test's own).

C-STORE comes from pynetdicom as a real peer over loopback to the node's SCP in this
process; STOW-RS through falcon's test client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from falcon import testing
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from adapters.dicomweb.app import create_app
from adapters.dicomweb.multipart import encode
from pacs.core.errors import IntakeFull
from pacs.core.ingest import Received
from pacs.core.intake import REFUSALS_LOG_INTERVAL, RETRY_AFTER, Refusals
from pacs.core.services import Services, drain
from pacs.core.storage.memory import MemoryStore
from pacs.dimse import server
from tests.clock import Clock
from tests.conftest import free_port
from tests.factory import make_instance

pytestmark = pytest.mark.dimse

BOUNDARY = "intake-full"
#: Stores refused by each way in.
C_STORES, STOW_REQUESTS, STOW_PARTS = 20, 5, 3


@pytest.fixture
def full(make_services: Callable[..., Services]) -> Iterator[tuple[Services, Clock]]:
    """A node whose intake is full (its mover held): one object at a limit of one."""
    first = make_instance(SOPInstanceUID="1.2.826.0.1.3680043.8.498.90.1")
    services = make_services(store=MemoryStore(), intake_max_bytes=len(first))
    clock = Clock()
    services.ingest.refusals = Refusals(clock=clock)
    services.ingest.store_bytes(first)
    yield services, clock


def c_store_all(services: Services, count: int) -> list[int]:
    """The statuses of ``count`` C-STOREs sent on one association."""
    port = free_port()
    running = server.start(services, ("127.0.0.1", port))
    try:
        ae = AE(ae_title="FLOOD")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=services.settings.ae_title)
        assert assoc.is_established
        statuses = []
        try:
            for number in range(count):
                ds = dcmread(DicomBytesIO(make_instance(
                    SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.91.{number + 1}")))
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status))
        finally:
            assoc.release()
        return statuses
    finally:
        server.stop(running, drain=1.0)


def intake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "pacs.core.intake"]


def test_a_flood_of_refusals_is_one_warning_with_its_count(
        full: tuple[Services, Clock], caplog: pytest.LogCaptureFixture) -> None:
    services, clock = full
    client = testing.TestClient(create_app(services))
    payload = b"".join(encode([({"Content-Type": "application/dicom"}, make_instance())],
                              BOUNDARY))
    with caplog.at_level(logging.DEBUG):
        statuses = c_store_all(services, C_STORES)
        answers = [client.simulate_post(
            "/studies", body=payload, headers={
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary="{BOUNDARY}"',
                "Accept": "application/dicom+json"}) for _ in range(STOW_REQUESTS)]
        parts = services.ingest.store_batch([Received.of(make_instance())
                                             for _ in range(STOW_PARTS)])

    assert statuses == [0xA700] * C_STORES
    assert [(a.status_code, a.headers.get("Retry-After")) for a in answers] == [
        (503, str(RETRY_AFTER))] * STOW_REQUESTS
    assert all(isinstance(part, IntakeFull) for part in parts)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and r.name == "pacs.core.intake"]
    assert [r.getMessage() for r in warned] == [
        "the intake is full (PACS_INTAKE_MAX_BYTES): 1 store(s) refused since the last "
        "report; the object store has not caught up"]

    # Once the store caught up and the interval passed, the next object taken reports
    # the refusals since.
    caplog.clear()
    clock.now += REFUSALS_LOG_INTERVAL
    drain(services)
    services.ingest.store_bytes(make_instance())
    refused = C_STORES + STOW_REQUESTS + STOW_PARTS - 1
    assert intake_lines(caplog) == [
        f"the intake takes objects again; {refused} store(s) refused since the last "
        "report"]
