"""A local A-ABORT where the DUL's state machine has no action for it (PS3.8 Table 9-10).

Two threads may abort one association at once (a sub-operation that got no response and
the DUL refusing the peer's PDU; a release that timed out and the idle timer): once one
A-ABORT was sent (Sta13) or the connection is closed (Sta1), the second is dropped, and
the DUL thread ends as it would have, not with an error.  Before any A-ASSOCIATE-RQ
(Sta2) there is no association to abort: the connection is closed at once, not left
to the ARTIM timer.
"""

from __future__ import annotations

import socket
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import seam_only
from tests.service.conftest import RunningNode
from tests.service.test_exhaustion import closed_by_peer, wait_for

pytestmark = pytest.mark.dimse


@seam_only("pynetdicom's own DUL thread ends with InvalidEventError")
def test_a_second_abort_is_dropped(node: RunningNode) -> None:
    ae = AE(ae_title="ABORTS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.services.settings.ae_title)
    assert assoc.is_established
    assoc.acse.send_abort(0x00)  # as a sub-operation without a response does
    assoc.acse.send_abort(0x00)  # as the DUL does once it refused a PDU
    deadline = time.monotonic() + 5
    while assoc.dul.state_machine.current_state != "Sta1" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.dul.state_machine.current_state == "Sta1"  # the node closed it
    assoc.kill()
    assert not assoc.dul.is_alive()


@seam_only("pynetdicom's own DUL thread ends with InvalidEventError")
def test_an_abort_before_the_request_closes_the_connection(node: RunningNode) -> None:
    peer = socket.create_connection(("127.0.0.1", node.port))
    try:
        wait_for(lambda: any(a.dul.state_machine.current_state == "Sta2"
                             for a in node.server.active_associations))
        (assoc,) = node.server.active_associations
        began = time.monotonic()
        assoc.abort()
        assert time.monotonic() - began < 5  # not the ARTIM timeout
        assert assoc.dul.state_machine.current_state == "Sta1"
        assert closed_by_peer(peer)
    finally:
        peer.close()
