"""An association aborted twice: the second abort finds the first under way.

Two threads may abort one association at once (a sub-operation that got no response and
the DUL refusing the peer's PDU; a release that timed out and the idle timer).  The
DUL's state machine has no action for a local A-ABORT once one was sent (PS3.8 Table
9-10, Sta13) or the connection is closed (Sta1): the second is dropped, and the DUL
thread ends as it would have, not with an error.
"""

from __future__ import annotations

import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import seam_only
from tests.service.conftest import RunningNode

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
