"""The forwarding outbox over a real index: what routes queue, what each answer of a
destination does to the outbox, overwrites, removals (the senders of real peers are
tested in tests/interop/test_forwarding.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage

from pacs.core import audit
from pacs.core.audit import Participant
from pacs.core.config import Modality, Settings, derive
from pacs.core.deletion import Target, reference
from pacs.core.errors import ConfigError
from pacs.core.forwarding import (
    PASSED_OVER,
    Delivery,
    Forwarder,
    Outbox,
    Result,
    backoff,
    refs_of,
)
from pacs.core.index import reads
from pacs.core.query.model import InstanceRef
from pacs.core.routes import load_routes, parse_file, parse_inline, shown
from pacs.core.services import Services
from pacs.node.forwarder import check_destinations
from tests.factory import make_instance


class Recorder:
    """A sender that answers what the test says, and remembers what it was given."""

    receiver = Participant("PEER", False)

    def __init__(self, answer: Result = Result.SENT) -> None:
        self.answer = answer
        self.batches: list[list[str]] = []

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        self.batches.append([ref.sop_uid for ref in refs])
        return [Delivery(self.answer, "test")] * len(refs)

    def close(self) -> None:
        pass


def _store(services: Services, calling_ae: str = "CT1", **attributes: object) -> str:
    data = make_instance(**attributes)
    return services.ingest.store_bytes(data, calling_ae=calling_ae).sop_instance_uid


def _outbox(services: Services, text: str, **kwargs: object) -> Outbox:
    routes = load_routes(text, "")
    outbox = Outbox(services.index, routes, **kwargs)  # type: ignore[arg-type]
    outbox.feed()  # the cursor starts at the newest change
    return outbox


def _waiting(outbox: Outbox, destination: str = "PEER") -> list[str]:
    return [entry.sop_uid for entry in outbox.take(destination)]


def test_routes_match_calling_ae_modality_and_sop_class(services: Services) -> None:
    outbox = _outbox(services, "ct: calling_ae=CT1|CT2, modality=CT -> PEER; "
                               f"sc: sop_class={SecondaryCaptureImageStorage} -> OTHER")
    ct1 = _store(services, "CT1")
    ct2 = _store(services, "CT2")
    _store(services, "CT3")  # another sender
    _store(services, "CT1", Modality="MR", SOPClassUID=MRImageStorage)  # another modality
    sc = _store(services, "X", Modality="OT", SOPClassUID=SecondaryCaptureImageStorage)
    assert outbox.feed() == 5
    assert _waiting(outbox) == [ct1, ct2]
    assert _waiting(outbox, "OTHER") == [sc]


def test_instances_stored_before_the_first_feed_are_not_forwarded(services: Services) -> None:
    _store(services)
    outbox = _outbox(services, "all: -> PEER")
    assert _waiting(outbox) == []
    later = _store(services)
    outbox.feed()
    assert _waiting(outbox) == [later]


def test_instances_stored_while_there_were_no_routes_are_not_forwarded(
        services: Services) -> None:
    """Routes forward what arrives while they are set: runs without routes
    (``Outbox.unrouted``, at their start) pass what they store, and routes set again
    feed what the last run with routes had not fed yet, then what arrives; what the
    outbox held stays."""
    outbox = _outbox(services, "all: -> PEER")
    queued = _store(services)
    outbox.feed()
    unfed = _store(services)  # stored with routes; the node stopped before its feed
    for _ in range(2):  # two starts without routes
        Outbox(services.index, ()).unrouted()
        _store(services)
    again = Outbox(services.index, load_routes("all: -> PEER", ""))
    again.start()  # routes again
    later = _store(services)
    again.feed()
    assert _waiting(again) == [queued, unfed, later]
    again.start()  # a start with routes after one with routes changes nothing
    assert _waiting(again) == [queued, unfed, later]


def test_a_sent_instance_leaves_and_an_overwrite_is_sent_again(services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER")
    sop = _store(services)
    outbox.feed()
    recorder = Recorder()
    forwarder = Forwarder(outbox, {"PEER": recorder}, services.audit)
    assert forwarder.deliver_once("PEER") == 0
    assert recorder.batches == [[sop]] and _waiting(outbox) == []
    _store(services, SOPInstanceUID=sop, PatientName="DOE^JANE")  # overwritten
    outbox.feed()
    assert _waiting(outbox) == [sop]
    [backlog] = outbox.backlogs()
    assert backlog.waiting == 1 and backlog.last_success_at is not None


def test_an_overwrite_while_in_flight_stays_queued(services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER")
    sop = _store(services)
    outbox.feed()
    entries = outbox.take("PEER")
    _store(services, SOPInstanceUID=sop, PatientName="DOE^JANE")
    outbox.feed()
    assert _waiting(outbox) == [sop]  # one entry for the two versions
    outbox.settle("PEER", entries, [Delivery(Result.SENT)])  # the old version's ack
    assert _waiting(outbox) == [sop]  # the new version still waits


def test_unreachable_destination_backs_off_and_keeps_the_entries(
        services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER", retry_max=4.0)
    sops = [_store(services) for _ in range(3)]
    outbox.feed()
    forwarder = Forwarder(outbox, {"PEER": Recorder(Result.RETRY)}, services.audit)
    assert forwarder.deliver_once("PEER") == 1.0
    assert outbox.due_in("PEER") > 0
    assert forwarder.deliver_once("PEER") > 0  # not due: nothing sent
    assert _waiting(outbox) == sops
    [backlog] = outbox.backlogs()
    assert backlog.waiting == 3 and backlog.last_error == "test"
    assert [backoff(n, 4.0) for n in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_destination_s_retry_after_is_waited_for_within_the_longest_backoff(
        services: Services) -> None:
    """A destination that asks for a longer wait than the backoff (HTTP 429 or 503 with
    Retry-After, RFC 9110 10.2.3) gets it, up to PACS_FORWARD_RETRY_MAX; a shorter one
    changes nothing."""
    outbox = _outbox(services, "all: -> PEER", retry_max=60.0)
    _store(services)
    outbox.feed()
    entries = outbox.take("PEER")
    assert outbox.settle("PEER", entries, [Delivery(Result.RETRY, "HTTP 503", 30.0)]) == 30.0
    assert outbox.settle("PEER", entries, [Delivery(Result.RETRY, "HTTP 429", 1e9)]) == 60.0
    assert outbox.settle("PEER", entries, [Delivery(Result.RETRY, "HTTP 503", 0.5)]) == 4.0


def test_refused_instances_are_kept_as_failed_and_can_be_queued_again(
        services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER")
    sop = _store(services)
    outbox.feed()
    Forwarder(outbox, {"PEER": Recorder(Result.REFUSED)}, services.audit).deliver_once("PEER")
    assert _waiting(outbox) == []
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (0, 1)
    assert outbox.due_in("PEER") == 0  # a refusal is no reason to wait
    assert outbox.retry_failed("PEER") == 1
    assert _waiting(outbox) == [sop]


def test_removed_instances_leave_the_outbox_unsent(services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER")
    sop = _store(services)
    kept = _store(services)
    outbox.feed()
    study = next(e.study_uid for e in outbox.take("PEER") if e.sop_uid == sop)
    rows = services.deleter.plan([Target.parse(str(study))])
    services.deleter.remove([reference(row) for row in rows], Participant("test", True),
                            audit.APPLICATION_SERVER)
    assert _waiting(outbox) == [kept]


def test_refused_entries_of_removed_instances_leave_and_a_partial_batch_is_a_success(
        services: Services) -> None:
    """``pacs status`` counts what may still be sent: a refused instance removed since
    leaves the outbox at the next batch; a batch of which some instances arrived is
    the destination's last success, though others wait to be sent again."""
    outbox = _outbox(services, "all: -> PEER")
    refused = _store(services)
    outbox.feed()
    Forwarder(outbox, {"PEER": Recorder(Result.REFUSED)}, services.audit).deliver_once("PEER")
    rows = services.deleter.plan([Target.parse(str(next(
        row.study_uid for row in reads.located(services.index.connection(), [refused]))))])
    services.deleter.remove([reference(row) for row in rows], Participant("test", True),
                            audit.APPLICATION_SERVER)
    sent, again = _store(services), _store(services)
    outbox.feed()
    entries = outbox.take("PEER")
    assert [e.sop_uid for e in entries] == [sent, again]
    outbox.settle("PEER", entries, [Delivery(Result.SENT), Delivery(Result.RETRY, "busy")])
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (1, 0)
    assert backlog.last_success_at is not None and backlog.last_error == "busy"


class Passing(Recorder):
    """Takes every instance but ``bad``, answered with a status to send it again."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        self.batches.append([ref.sop_uid for ref in refs])
        return [Delivery(Result.RETRY, "status A700") if ref.sop_uid == self.bad
                else Delivery(Result.SENT) for ref in refs]


def test_an_instance_a_working_destination_keeps_passing_over_is_kept_as_failed(
        services: Services) -> None:
    """A destination that takes the rest of each batch works: the instance it does
    not take is tried again after a second, the destination's wait does not grow, and
    once passed over ``PASSED_OVER`` times the instance is kept as failed (queued
    again by ``pacs send --requeue``), so it no longer takes a batch's place."""
    outbox = _outbox(services, "all: -> PEER", batch=5, retry_max=600.0)
    bad = _store(services)
    others = [_store(services) for _ in range(4 * PASSED_OVER + 3)]
    outbox.feed()
    sender = Passing(bad)
    forwarder = Forwarder(outbox, {"PEER": sender}, services.audit)
    waits = []
    for _ in range(PASSED_OVER):
        waits.append(forwarder.deliver_once("PEER"))
        with services.index.write() as conn:  # the wait has passed
            conn.execute("UPDATE forward_destination SET next_attempt = 0")
    assert waits == [1.0] * (PASSED_OVER - 1) + [0.0]  # the last: nothing to send again
    assert all(batch[0] == bad for batch in sender.batches)
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (3, 1)
    assert backlog.last_error.startswith(f"passed over {PASSED_OVER} times: status A700")
    forwarder.deliver_once("PEER")
    assert sender.batches[-1] == others[-3:]
    assert outbox.retry_failed("PEER") == 1
    assert _waiting(outbox) == [bad]


class Ending(Recorder):
    """Takes two instances per association, which then ends: the rest never seen."""

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        self.batches.append([ref.sop_uid for ref in refs])
        return [Delivery(Result.SENT) if n < 2 else
                Delivery(Result.RETRY, "association ended", offered=False)
                for n in range(len(refs))]


def test_instances_a_destination_never_saw_are_not_passed_over(
        services: Services) -> None:
    """An association that ends after two instances (a peer's own limit, an abort):
    the rest of the batch was never offered, so never counted as passed over, and all
    arrive in turn, none kept as failed."""
    outbox = _outbox(services, "all: -> PEER", batch=12, retry_max=600.0)
    sops = [_store(services) for _ in range(12)]
    outbox.feed()
    sender = Ending()
    forwarder = Forwarder(outbox, {"PEER": sender}, services.audit)
    for _ in range(6):
        forwarder.deliver_once("PEER")
        with services.index.write() as conn:
            conn.execute("UPDATE forward_destination SET next_attempt = 0")
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (0, 0)
    assert [sop for batch in sender.batches for sop in batch[:2]] == sops


def test_nothing_taken_backs_the_destination_off_without_counting_the_instances(
        services: Services) -> None:
    """A batch the destination took none of says nothing about its instances (the
    destination may be down): the wait grows, no instance is kept as failed."""
    outbox = _outbox(services, "all: -> PEER", retry_max=600.0)
    sops = [_store(services) for _ in range(2)]
    outbox.feed()
    forwarder = Forwarder(outbox, {"PEER": Recorder(Result.RETRY)}, services.audit)
    waits = []
    for _ in range(PASSED_OVER + 1):
        waits.append(forwarder.deliver_once("PEER"))
        with services.index.write() as conn:
            conn.execute("UPDATE forward_destination SET next_attempt = 0")
    assert waits == [backoff(n, 600.0) for n in range(PASSED_OVER + 1)]
    assert _waiting(outbox) == sops


class Aborting(Recorder):
    """A destination that aborts the association on one instance: the instances before
    it are taken, it and those after it are not (never seen)."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        self.batches.append([ref.sop_uid for ref in refs])
        found: list[Delivery] = []
        for ref in refs:
            if found and (found[-1].suspect or not found[-1].offered):
                found.append(Delivery(Result.RETRY, "association ended", offered=False))
            elif ref.sop_uid == self.bad:
                found.append(Delivery(Result.RETRY, "no C-STORE response", suspect=True))
            else:
                found.append(Delivery(Result.SENT))
        return found


def test_an_instance_a_destination_aborts_on_cannot_hold_the_queue_for_good(
        services: Services) -> None:
    """The destination aborts on one instance, which then headed every batch: nothing
    was delivered, the queue stood still for good.  It goes last in the batches after:
    the others are delivered, and once the destination has taken others beside it
    ``PASSED_OVER`` times it is kept as failed."""
    outbox = _outbox(services, "all: -> PEER", batch=3, retry_max=600.0)
    before = _store(services)
    bad = _store(services)
    after = [_store(services) for _ in range(3 + 2 * PASSED_OVER)]
    outbox.feed()
    sender = Aborting(bad)
    forwarder = Forwarder(outbox, {"PEER": sender}, services.audit)
    for _ in range(3 + PASSED_OVER):
        forwarder.deliver_once("PEER")
        with services.index.write() as conn:
            conn.execute("UPDATE forward_destination SET next_attempt = 0")
    assert sender.batches[0] == [before, bad, after[0]]
    # Taken beside others in the first batch, then at the end of each, until failed.
    assert all(batch[-1] == bad for batch in sender.batches[1:PASSED_OVER])
    assert bad not in sender.batches[PASSED_OVER]
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (0, 1)
    assert backlog.last_error.startswith(f"passed over {PASSED_OVER} times")
    assert {sop for batch in sender.batches for sop in batch} == {before, bad, *after}


class Hanging(Recorder):
    """A destination that accepts associations and answers no C-STORE."""

    def send(self, refs: Sequence[InstanceRef]) -> list[Delivery]:
        self.batches.append([ref.sop_uid for ref in refs])
        return [Delivery(Result.RETRY, "no C-STORE response", suspect=True),
                *[Delivery(Result.RETRY, "association ended", offered=False)] * (len(refs) - 1)]


def test_a_destination_that_hangs_on_every_instance_loses_none(services: Services) -> None:
    """A destination that stalls (its disk full, overloaded) takes nothing: each batch's
    first instance is a suspect, but none is kept as failed; all wait for it."""
    outbox = _outbox(services, "all: -> PEER", batch=2, retry_max=600.0)
    sops = [_store(services) for _ in range(3)]
    outbox.feed()
    forwarder = Forwarder(outbox, {"PEER": Hanging()}, services.audit)
    for _ in range(5 * PASSED_OVER):
        forwarder.deliver_once("PEER")
        with services.index.write() as conn:
            conn.execute("UPDATE forward_destination SET next_attempt = 0")
    [backlog] = outbox.backlogs()
    assert (backlog.waiting, backlog.failed) == (len(sops), 0)


def test_numbers_are_not_given_again_after_the_newest_rows_are_removed(
        services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER")
    sop = _store(services)
    outbox.feed()  # the cursor passes it
    study = next(e.study_uid for e in outbox.take("PEER"))
    rows = services.deleter.plan([Target.parse(str(study))])
    services.deleter.remove([reference(row) for row in rows], Participant("test", True),
                            audit.APPLICATION_SERVER)  # the index is empty again
    later = _store(services)
    outbox.feed()
    assert _waiting(outbox) == [later] and later != sop


def test_batches_are_bounded(services: Services) -> None:
    outbox = _outbox(services, "all: -> PEER", batch=2)
    for _ in range(5):
        _store(services)
    outbox.feed()
    recorder = Recorder()
    forwarder = Forwarder(outbox, {"PEER": recorder}, services.audit)
    while forwarder.deliver_once("PEER") == 0:
        pass
    assert [len(batch) for batch in recorder.batches] == [2, 2, 1]
    assert refs_of([]) == []


def test_a_backlog_over_the_limit_is_kept_and_warned_about(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    outbox = _outbox(services, "all: -> PEER", max_outbox=2)
    sops = [_store(services) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="pacs.core.forwarding"):
        outbox.feed()
    assert "3 instances wait for PEER, more than PACS_FORWARD_MAX_OUTBOX (2)" in caplog.text
    assert _waiting(outbox) == sops


def test_inline_and_file_routes(tmp_path: Path) -> None:
    [route] = parse_inline("a: modality=ct|MR, calling_ae=CT1 -> PEER")
    assert route.modality == {"CT", "MR"} and route.calling_ae == {"CT1"}
    assert route.matches("CT1", "mr", "1.2") and not route.matches("CT2", "CT", "1.2")
    file = tmp_path / "routes.toml"
    file.write_text('[[route]]\nname = "web"\nto = "https://u:p@host:8443/dicom-web"\n'
                    'sop_class = ["1.2", "1.3"]\n')
    [web] = parse_file(file)
    assert web.web and web.sop_class == {"1.2", "1.3"}
    assert shown(web.destination) == "https://host:8443/dicom-web"


def test_a_customer_has_routes_of_its_own(settings: Settings) -> None:
    own = derive(settings, {"PACS_ROUTES": "a: modality=CT -> https://host/dicom-web"})
    assert [route.name for route in own.routes] == ["a"] and settings.routes == ()


@pytest.mark.parametrize("text", ["no arrow", "a: modality=CT", "a: colour=red -> PEER",
                                  "a: -> PEER; a: -> OTHER", "a b: -> PEER",
                                  "a: -> https:///x", "a: -> https://user:pw@[::1/x",
                                  # one destination, two sets of credentials
                                  "a: -> https://u:a@h/dw; b: -> https://u:b@h/dw"])
def test_bad_routes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        load_routes(text, "")


def test_a_route_that_cannot_be_read_is_not_quoted() -> None:
    """A ';' not percent-encoded in a URL's password splits the routes there: the rest
    of the password was quoted in the error, on the terminal and in the logs."""
    with pytest.raises(ConfigError) as refused:
        load_routes("a: -> https://user:pw;secret-rest@host/x", "")
    assert "secret-rest" not in str(refused.value) and "%3B" in str(refused.value)


def test_a_password_changed_in_the_settings_finds_what_waits_and_none_is_indexed(
        services: Services) -> None:
    """The outbox named a STOW-RS destination by its URL with its credentials: once
    its password was changed in PACS_ROUTES, what was queued under the old one had no
    sender and waited for good, and the password was kept in the index."""
    old = _outbox(services, "a: -> https://user:old@archive.example/dicom-web")
    sop = _store(services)
    old.feed()
    new = _outbox(services, "a: -> https://user:new@archive.example/dicom-web")
    assert new.destinations == ["https://archive.example/dicom-web"]
    assert _waiting(new, "https://archive.example/dicom-web") == [sop]
    assert new.endpoints == {"https://archive.example/dicom-web":
                             "https://user:new@archive.example/dicom-web"}
    stored = services.index.connection().execute(
        "SELECT destination FROM outbox").fetchall()
    assert stored == [("https://archive.example/dicom-web",)]


def test_routes_must_name_a_known_destination(
        make_services: Callable[..., Services]) -> None:
    known = make_services(destinations={"PEER": Modality("PEER", "127.0.0.1", 104)},
                          routes=parse_inline("a: -> PEER; b: -> https://host/dicom-web"))
    check_destinations(known)
    unknown = make_services(routes=parse_inline("a: -> NOBODY"))
    with pytest.raises(ConfigError, match="NOBODY"):
        check_destinations(unknown)
