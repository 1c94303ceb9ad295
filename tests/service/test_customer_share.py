"""Several customers in one worker: one customer's associations take at most its share
of the worker's places (``PACS_CUSTOMER_ASSOCIATION_SHARE``), so that a customer whose
modalities flood the node leaves the others places to associate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from pacs.core.services import Services
from pacs.core.storage.memory import MemoryStore
from pacs.dimse.customers import Customers
from pacs.dimse.server import connection_limits_of, start, stop
from tests.conftest import free_port, rejection_of

pytestmark = pytest.mark.dimse

#: A-ASSOCIATE-RJ, rejected-transient, service provider (presentation), local limit
#: exceeded (PS3.8 9.3.4).
REJECT_LOCAL_LIMIT = (2, 3, 2)


@pytest.fixture
def port(make_services: Callable[..., Services], tmp_path: Path) -> Iterator[int]:
    """A server of customers ``alpha`` (called ALPHA) and ``beta`` (BETA), four
    associations per worker, half of them per customer."""
    alpha = make_services(store=MemoryStore(), customer="alpha",
                          data_dir=tmp_path / "alpha", ae_title="ALPHA")
    beta = make_services(store=MemoryStore(), customer="beta",
                         data_dir=tmp_path / "beta", ae_title="BETA")
    settings = alpha.settings.with_overrides(max_associations=4,
                                             customer_association_share=0.5)
    number = free_port()
    server = start(Customers([(("ALPHA",), alpha), (("BETA",), beta)], settings),
                   ("127.0.0.1", number))
    yield number
    stop(server, drain=1.0)


def _associate(port: int, called: str) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _admitted_within(port: int, called: str, seconds: float) -> Association:
    """An association to ``called`` once one is admitted (a place freed by an ended
    association is seen when its thread has ended)."""
    deadline = time.monotonic() + seconds
    while True:
        assoc = _associate(port, called)
        if assoc.is_established or time.monotonic() > deadline:
            return assoc
        time.sleep(0.1)


def test_a_customer_holds_at_most_its_share_of_a_workers_associations(port: int) -> None:
    """Alpha's two associations are its share of the four: a third is rejected as the
    node's local limit (transient: to retry), while beta associates; once one of
    alpha's is released, alpha associates again."""
    held = [_associate(port, "ALPHA") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        refused = _associate(port, "ALPHA")
        assert not refused.is_established
        assert rejection_of(refused) == REJECT_LOCAL_LIMIT
        beta = _associate(port, "BETA")
        held.append(beta)
        assert beta.is_established and beta.send_c_echo().Status == 0
        held.pop(0).release()
        again = _admitted_within(port, "ALPHA", 10)
        held.append(again)
        assert again.is_established
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def test_the_share_applies_to_several_customers_only(
        make_services: Callable[..., Services]) -> None:
    """One customer has every place of the worker; with several, each has the share
    of them (at least one), and a share of 1 leaves the worker's limit alone."""
    settings = make_services(store=MemoryStore()).settings.with_overrides(
        max_associations=32, customer_association_share=0.75)
    assert connection_limits_of(settings, 1).max_per_customer == 0
    assert connection_limits_of(settings, 2).max_per_customer == 24
    assert connection_limits_of(settings.with_overrides(customer_association_share=1.0),
                                3).max_per_customer == 0
    assert connection_limits_of(settings.with_overrides(max_associations=1),
                                2).max_per_customer == 1
    assert connection_limits_of(settings.with_overrides(max_associations=0),
                                2).max_per_customer == 0
    # 100 * 0.29 is 28.999... in binary: the share is still 29 places.
    assert connection_limits_of(settings.with_overrides(
        max_associations=100, customer_association_share=0.29), 2).max_per_customer == 29
