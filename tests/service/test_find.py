"""C-FIND through the real pynetdicom stack: statuses, keys, charsets, cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PatientFind,
    StudyRootQueryRetrieveInformationModelFind as StudyFind,
)

import pacs.core.query.engine as engine_module
import pacs.dimse.find as find_module
from pacs.core.index.compiler import MAX_TERMS
from pacs.dimse.find import ECHOED_UNSUPPORTED
from pacs.dimse.limits import IDENTIFIER_CEILING
from tests.conftest import seam_only
from tests.factory import make_instance, uid_list_of_length
from tests.service.conftest import RunningNode

pytestmark = pytest.mark.dimse


@pytest.fixture
def loaded(node: RunningNode) -> RunningNode:
    for n in range(3):
        for i in range(4):
            node.services.ingest.store_bytes(make_instance(
                PatientID=f"P{n}", PatientName=["DOE^JOHN", "Müller^Jörg", "Ivanov^Ivan"][n],
                StudyInstanceUID=f"1.2.3.{n}", SeriesInstanceUID=f"1.2.3.{n}.1",
                SOPInstanceUID=f"1.2.3.{n}.1.{i}", StudyDate=f"2015010{n + 1}",
                AccessionNumber=f"ACC{n}"))
    return node


@pytest.fixture
def associate(node: RunningNode) -> Iterator[Callable[..., object]]:
    opened = []

    def open_association(relational: bool = False, syntaxes: list[str] | None = None
                         ) -> object:
        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = [build_context(StudyFind, syntaxes),
                                 build_context(PatientFind, syntaxes)]
        extended = []
        if relational:
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = StudyFind
            item.service_class_application_information = b"\x01"
            extended.append(item)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="INTELPIXEL",
                             ext_neg=extended or None)
        assert assoc.is_established
        opened.append(assoc)
        return assoc

    yield open_association
    for assoc in opened:
        if assoc.is_established:
            assoc.release()


def _find(assoc: object, identifier: Dataset, model: str = StudyFind
          ) -> list[tuple[int, Dataset | None]]:
    return [(status.Status, ds) for status, ds in assoc.send_c_find(identifier, model)]


def _identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_study_query_returns_every_requested_key(loaded: RunningNode, associate) -> None:
    responses = _find(associate(), _identifier(
        "STUDY", PatientID="P1", StudyInstanceUID="", PatientName="", StudyDate="",
        ModalitiesInStudy="", NumberOfStudyRelatedInstances="", StudyDescription=""))
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    match = responses[0][1]
    assert match.StudyInstanceUID == "1.2.3.1"
    assert match.PatientName == "Müller^Jörg"
    assert match.ModalitiesInStudy == "CT"
    assert match.NumberOfStudyRelatedInstances == 4
    assert "StudyDescription" in match and match.StudyDescription in ("", None)
    assert match.RetrieveAETitle == "INTELPIXEL"
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert match.QueryRetrieveLevel == "STUDY"
    assert "StudyTime" not in match  # only requested keys (and unique keys) come back


def test_timezone_and_availability_come_back_when_asked_for(loaded: RunningNode,
                                                             associate) -> None:
    """PS3.4 C.4.1.1.3.1: Timezone Offset From UTC is no matching key but is returned
    when asked for; Instance Availability too (every instance here is ONLINE)."""
    responses = _find(associate(), _identifier(
        "STUDY", PatientID="P1", StudyInstanceUID="", TimezoneOffsetFromUTC="+0900",
        InstanceAvailability=""))
    assert [s for s, _ in responses] == [0xFF00, 0x0000]  # not matched on the offset
    match = responses[0][1]
    assert "TimezoneOffsetFromUTC" in match
    assert match.InstanceAvailability == "ONLINE"


def test_a_count_sent_with_a_value_is_returned_unmatched_with_ff01(loaded: RunningNode,
                                                                     associate) -> None:
    """The counts of PS3.4 C.3.4 are returned, not matched: one sent with a value is an
    optional key not supported for matching (C.4.1.1.3.2: FF01), answered with the
    study's own count."""
    responses = _find(associate(), _identifier(
        "STUDY", StudyInstanceUID="1.2.3.0", NumberOfStudyRelatedInstances="99"))
    assert [s for s, _ in responses] == [0xFF01, 0x0000]
    assert int(responses[0][1].NumberOfStudyRelatedInstances) == 4  # the study's own


def test_unsupported_optional_key_gives_ff01_and_empty_value(loaded: RunningNode,
                                                             associate) -> None:
    identifier = _identifier("STUDY", StudyInstanceUID="1.2.3.0")
    identifier.OtherStudyNumbers = None  # retired, not in our index
    responses = _find(associate(), identifier)
    assert [s for s, _ in responses] == [0xFF01, 0x0000]
    assert "OtherStudyNumbers" in responses[0][1]


def test_at_most_so_many_unsupported_keys_come_back(loaded: RunningNode,
                                                    associate) -> None:
    """An identifier naming thousands of unknown (here private) elements: still FF01,
    but only the first ECHOED_UNSUPPORTED come back empty in each answer, so that an
    answer's size and encoding time do not grow with them."""
    identifier = _identifier("STUDY", StudyInstanceUID="1.2.3.0")
    for number in range(ECHOED_UNSUPPORTED * 4):
        identifier.add_new((0x0009, 0x1000 + number), "LO", None)
    identifier.OtherStudyNumbers = None  # a standard key we do not hold: sent first
    responses = _find(associate(), identifier)
    assert [s for s, _ in responses] == [0xFF01, 0x0000]
    match = responses[0][1]
    assert match is not None and "OtherStudyNumbers" in match
    private = sorted(int(e.tag) for e in match if e.tag.group == 0x0009)
    assert private == [0x00091000 + n for n in range(ECHOED_UNSUPPORTED - 1)]


def _slow_encoding(node: RunningNode, monkeypatch: pytest.MonkeyPatch,
                   studies: int = 40) -> list[int]:
    """``studies`` studies of Patient ID SLOW, each answer 0.1 s to encode; the list
    grows by one per answer encoded."""
    for n in range(studies):
        node.services.ingest.store_bytes(make_instance(
            PatientID="SLOW", StudyInstanceUID=f"1.2.4.{n}",
            SeriesInstanceUID=f"1.2.4.{n}.1", SOPInstanceUID=f"1.2.4.{n}.1.1"))
    encoded: list[int] = []
    encode_identifier = find_module.encode_identifier

    def slow(*args: object) -> bytes:
        time.sleep(0.1)
        encoded.append(1)
        return encode_identifier(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(find_module, "encode_identifier", slow)
    return encoded


def test_the_time_limit_holds_within_a_page(node: RunningNode, associate,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The query time limit is checked after each answer is encoded, not once a page
    (256 answers) has been: encoding that slows down (here 0.1 s an answer, limit
    0.25 s) is stopped after the few answers within the limit (A700)."""
    encoded = _slow_encoding(node, monkeypatch, studies=10)
    monkeypatch.setattr(node.services.engine, "time_limit", 0.25)
    responses = _find(associate(), _identifier("STUDY", PatientID="SLOW",
                                               StudyInstanceUID=""))
    assert [s for s, _ in responses] == [0xA700]
    assert 2 <= len(encoded) <= 4


def _settled(counted: list[int]) -> int:
    """The length of ``counted`` once it stops growing (for 0.5 s; 10 s at most)."""
    until = time.monotonic() + 10
    seen = -1
    while len(counted) != seen and time.monotonic() < until:
        seen = len(counted)
        time.sleep(0.5)
    return len(counted)


@seam_only("pynetdicom's own service loop learns of an abort only between responses")
def test_an_abort_while_a_page_is_built_stops_the_query(
        node: RunningNode, associate, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requestor gone (an A-ABORT) before the first page is sent: encoding stops,
    not at the end of the page or the time limit (40 answers, 4 s)."""
    encoded = _slow_encoding(node, monkeypatch)
    assoc = associate()
    assoc.dimse_timeout = 1  # the requestor's own wait for a response, once it aborted
    threading.Timer(0.3, assoc.abort).start()
    list(assoc.send_c_find(_identifier("STUDY", PatientID="SLOW", StudyInstanceUID=""),
                           StudyFind))
    assert _settled(encoded) <= 10


def test_a_cancel_while_a_page_is_built_gives_fe00_at_once(
        node: RunningNode, associate, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-CANCEL (PS3.4 C.4.1.2.3) that arrives while the first page is encoded ends
    the answer with FE00, nothing of the page sent."""
    encoded = _slow_encoding(node, monkeypatch)
    assoc = associate()
    threading.Timer(0.3, assoc.send_c_cancel, (9,), {"query_model": StudyFind}).start()
    statuses = [status.Status for status, _ in assoc.send_c_find(
        _identifier("STUDY", PatientID="SLOW", StudyInstanceUID=""), StudyFind, msg_id=9)]
    assert statuses == [0xFE00]
    assert _settled(encoded) <= 10


@pytest.mark.parametrize(("requested", "answered"), [
    (["ISO_IR 100"] * 1000, "ISO_IR 100"),          # repeated: once
    (["ISO_IR 100", "NOT A TERM"], "ISO_IR 192"),   # not a defined term
    (["", *(f"ISO 2022 IR {n}" for n in (6, 100, 101, 109, 110, 126, 127, 138, 144))],
     "ISO_IR 192"),                                 # more terms than the answers repeat
])
def test_the_request_charset_is_repeated_only_when_it_is_one(
        loaded: RunningNode, associate, requested: list[str], answered: str) -> None:
    """An identifier's Specific Character Set of 1,000 (or 80,000) terms was copied into
    every answer, as UN in Explicit VR (too long for CS)."""
    answers = _find(associate(syntaxes=[ExplicitVRLittleEndian]), _identifier(
        "STUDY", SpecificCharacterSet=requested, PatientID="P1", PatientName=""))
    assert [status for status, _ in answers] == [0xFF00, 0x0000]
    identifier = answers[0][1]
    assert identifier is not None and identifier.SpecificCharacterSet == answered
    assert identifier["SpecificCharacterSet"].VR == "CS"
    assert identifier.PatientName == "Müller^Jörg"


def test_response_uses_the_request_charset_when_it_can(loaded: RunningNode,
                                                       associate) -> None:
    latin1 = _find(associate(), _identifier("STUDY", SpecificCharacterSet="ISO_IR 100",
                                            PatientID="P1", PatientName=""))
    assert latin1[0][1].SpecificCharacterSet == "ISO_IR 100"
    assert latin1[0][1].PatientName == "Müller^Jörg"
    cyrillic_in_latin1 = _find(associate(), _identifier(
        "STUDY", SpecificCharacterSet="ISO_IR 100", PatientID="P2", PatientName=""))
    assert cyrillic_in_latin1[0][1].SpecificCharacterSet == "ISO_IR 100"  # ASCII name


@pytest.mark.parametrize("identifier", [
    _identifier("STUDY", SeriesInstanceUID=""),           # key below the level
    _identifier("NOTALEVEL", StudyInstanceUID=""),
    _identifier("SERIES", StudyInstanceUID="1.2.3.0\\1.2.3.1", SeriesInstanceUID=""),
    _identifier("", PatientID="P1"),                      # empty QueryRetrieveLevel
])
def test_level_rules_give_a900(loaded: RunningNode, associate, identifier: Dataset) -> None:
    assert [s for s, _ in _find(associate(), identifier)] == [0xA900]


def test_patient_level_only_in_patient_root(loaded: RunningNode, associate) -> None:
    assert [s for s, _ in _find(associate(), _identifier("PATIENT", PatientID=""))] == [0xA900]
    statuses = [s for s, _ in _find(associate(), _identifier("PATIENT", PatientID=""),
                                    PatientFind)]
    assert statuses == [0xFF00] * 3 + [0x0000]


def test_relational_query_when_negotiated(loaded: RunningNode, associate) -> None:
    identifier = _identifier("STUDY", SOPInstanceUID="1.2.3.2.1.0", StudyInstanceUID="")
    assert [s for s, _ in _find(associate(), identifier)] == [0xA900]
    responses = _find(associate(relational=True), identifier)
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    assert responses[0][1].StudyInstanceUID == "1.2.3.2"


def test_a_relational_query_answers_the_keys_of_lower_levels_zero_length(
        loaded: RunningNode, associate) -> None:
    """PS3.4 C.4.1.1.3.2: every requested key is in the response, zero-length when the
    SCP has no value; a study has no single value of a series' attribute (C.4.1.3.2.2
    builds the identifier from the query level and above).  Still FF00: the keys are
    supported, and matched (``Modality=CT`` selects the study)."""
    responses = _find(associate(relational=True), _identifier(
        "STUDY", StudyInstanceUID="1.2.3.1", Modality="", SeriesDescription="",
        NumberOfSeriesRelatedInstances=""))
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    match = responses[0][1]
    assert match is not None and match.StudyInstanceUID == "1.2.3.1"
    for keyword in ("Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"):
        assert keyword in match and match[keyword].value in ("", None), keyword
    matched = _find(associate(relational=True), _identifier(
        "STUDY", StudyInstanceUID="", Modality="CT", SOPInstanceUID="1.2.3.2.1.0"))
    assert [s for s, _ in matched] == [0xFF00, 0x0000]
    assert matched[0][1].StudyInstanceUID == "1.2.3.2"
    assert "Modality" in matched[0][1] and "SOPInstanceUID" in matched[0][1]


@pytest.mark.parametrize(("last", "studies"), [("Z", []), ("N", ["1.2.3.0", "1.2.3.2"])])
def test_a_name_pattern_of_many_stars_is_answered(loaded: RunningNode, associate,
                                                  last: str, studies: list[str]) -> None:
    """A pattern naming component groups is matched in Python, row by row, inside one
    SQLite call that neither the time limit nor a C-CANCEL interrupts: as a regular
    expression, ``'*' * 21 + 'Z=*'`` took 46 s a name (twice as long per star).  With
    2,000 stars the answer is the same as with one."""
    responses = _find(associate(), _identifier(
        "STUDY", StudyInstanceUID="", PatientName="*" * 2000 + last + "=*"))
    assert [s for s, _ in responses] == [0xFF00] * len(studies) + [0x0000]
    assert sorted(ds.StudyInstanceUID for s, ds in responses if s == 0xFF00) == studies


def test_query_with_more_values_than_it_may_hold_gives_c000(loaded: RunningNode,
                                                            associate) -> None:
    """Unable to process (PS3.4 Table C.4-1), with the reason: the identifier matches
    the SOP Class (not A900), and the same query would fail again (not A700)."""
    accessions = [f"ACC{n}" for n in range(MAX_TERMS + 1)]
    assoc = associate()
    [(status, answer)] = list(assoc.send_c_find(
        _identifier("STUDY", AccessionNumber=accessions, StudyInstanceUID=""), StudyFind))
    assert (status.Status, answer) == (0xC000, None)
    assert f"a query may hold {MAX_TERMS}" in status.ErrorComment
    at_the_bound = _find(assoc, _identifier("STUDY", AccessionNumber=accessions[:MAX_TERMS],
                                            StudyInstanceUID=""))
    assert [s for s, _ in at_the_bound] == [0xFF00] * 3 + [0x0000]


@pytest.mark.parametrize("after_a_find", [False, True], ids=["first", "after-a-find"])
@seam_only("pynetdicom gathers the identifier whole")
def test_an_identifier_over_its_ceiling_is_not_kept_and_gives_c000(
        loaded: RunningNode, associate, after_a_find: bool) -> None:
    """A C-FIND identifier over IDENTIFIER_CEILING (2 MiB of a private OB element, which
    the object limit would let through) is counted, not kept, and answered Unable to
    process; the association goes on.  First on the association (pynetdicom's DUL reads
    it) and after a C-FIND (the association thread reads it, then hands it back)."""
    assoc = associate()
    good = _identifier("STUDY", PatientID="P1", StudyInstanceUID="")
    if after_a_find:
        assert [s for s, _ in _find(assoc, good)] == [0xFF00, 0x0000]
    huge = _identifier("STUDY", PatientID="P1", StudyInstanceUID="")
    huge.add_new(0x00091010, "OB", bytes(IDENTIFIER_CEILING + (1 << 20)))
    [(status, answer)] = list(assoc.send_c_find(huge, StudyFind))
    assert (status.Status, answer) == (0xC000, None)
    assert f"an identifier over {IDENTIFIER_CEILING} bytes" in status.ErrorComment
    assert [s for s, _ in _find(assoc, good)] == [0xFF00, 0x0000]


@pytest.mark.parametrize(("syntax", "length", "spelled"), [
    # A UI element's 16-bit length cannot hold over 64 KB: pydicom (like other
    # writers) sends the list as UN, its value as in Implicit VR (PS3.5 6.2.2).
    pytest.param(ExplicitVRLittleEndian, 70_000, b"UN", id="explicit-over-64KB"),
    # The first element's length (0x5344) has the bytes of an explicit VR, "DS".
    pytest.param(ImplicitVRLittleEndian, 0x5344, b"DS", id="implicit-length-spells-DS"),
])
def test_identifier_is_read_in_its_syntax(loaded: RunningNode, associate, syntax: str,
                                          length: int, spelled: bytes) -> None:
    """An IMAGE-level query by a list of SOP Instance UIDs (its first element) finds
    exactly the listed instances, the first and the last of the list included."""
    wanted = ["1.2.3.0.1.0", "1.2.3.2.1.3"]
    uids = [*uid_list_of_length(wanted[:1], length - len(wanted[1]) - 1), wanted[1]]
    identifier = _identifier("IMAGE", SOPInstanceUID=uids)
    uid = UID(syntax)
    assert encode(identifier, uid.is_implicit_VR, uid.is_little_endian)[:6] == \
        b"\x08\x00\x18\x00" + spelled

    responses = _find(associate(syntaxes=[syntax]), identifier)

    assert [s for s, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    assert sorted(str(ds.SOPInstanceUID) for _, ds in responses[:2]) == wanted


def test_row_cap_refuses_with_a700(settings, memory_store) -> None:
    from pacs.core.services import build
    from pacs.dimse.server import start, stop
    from tests.conftest import free_port

    services = build(settings.with_overrides(query_max_rows=2), store=memory_store)
    for n in range(3):
        services.ingest.store_bytes(make_instance(StudyInstanceUID=f"1.2.4.{n}"))
    port = free_port()
    server = start(services, ("127.0.0.1", port))
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="INTELPIXEL")
        assert [s for s, _ in _find(assoc, _identifier("STUDY", StudyInstanceUID=""))] == [
            0xA700]
        assert [s for s, _ in _find(assoc, _identifier("STUDY", StudyInstanceUID="1.2.4.1"))
                ] == [0xFF00, 0x0000]
        assoc.release()
    finally:
        stop(server, drain=1.0)
        services.close()


def test_cancel_gives_fe00(loaded: RunningNode, associate) -> None:
    assoc = associate()
    responses = assoc.send_c_find(_identifier("IMAGE", StudyInstanceUID="1.2.3.0",
                                              SeriesInstanceUID="1.2.3.0.1",
                                              SOPInstanceUID=""), StudyFind, msg_id=7)
    first_status, _ = next(responses)
    assert first_status.Status == 0xFF00
    assoc.send_c_cancel(7, query_model=StudyFind)
    statuses = [s.Status for s, _ in responses]
    assert statuses[-1] in (0xFE00, 0x0000)  # the last match may already be on its way
    assert len(statuses) <= 4


@seam_only("pynetdicom keeps cancels by Message ID; the seam drops a late one")
def test_a_cancel_sent_after_the_final_response_does_not_cancel_the_next_request(
        loaded: RunningNode, associate) -> None:
    """PS3.7 9.3.2.3: a C-CANCEL names an operation in progress; a requestor may use a
    Message ID again once its operation ended (9.3.1.1; pynetdicom uses 1 for every
    request).  One that arrives after the final response is dropped when the next
    request of that ID arrives: that request is answered, not cancelled."""
    assoc = associate()
    query = _identifier("STUDY", StudyInstanceUID="")
    for _ in range(3):
        first = [status for status, _ in _find(assoc, query)]
        assert first[-1] == 0x0000 and len(first) > 1
        assoc.send_c_cancel(1, query_model=StudyFind)
        time.sleep(0.3)  # read by the node before the next request
        again = [status for status, _ in _find(assoc, query)]
        assert again == first


@pytest.fixture
def pages_wait_for_cancel(node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 2 rows; after a full first page the query waits (10 s at most) until
    the request is cancelled, so that the cancel is seen before the rest is read."""
    monkeypatch.setattr(engine_module, "PAGE_ROWS", 2)
    original = node.services.engine.find_pages

    def find_pages(query: object, cancelled: Callable[[], bool] = lambda: False,
                   deadline: object = None) -> Iterator[object]:
        pages = original(query, cancelled=cancelled, deadline=deadline)
        first = next(pages)
        yield first
        if len(first) == engine_module.PAGE_ROWS:  # more may follow: wait for the cancel
            until = time.monotonic() + 10
            while not cancelled() and time.monotonic() < until:
                time.sleep(0.01)
        yield from pages

    monkeypatch.setattr(node.services.engine, "find_pages", find_pages)


@pytest.mark.usefixtures("pages_wait_for_cancel")
def test_cancel_after_the_first_page_ends_the_answer(loaded: RunningNode, associate) -> None:
    """A C-CANCEL-RQ (PS3.7 9.3.2.3) sent after the first response stops the answer
    with FE00, on the first request of an association and on a later one (read from
    the socket by the association's own thread on a seam node)."""
    assoc = associate()
    for message_id in (7, 8):
        responses = assoc.send_c_find(_identifier("IMAGE", StudyInstanceUID="", SOPInstanceUID=""),
                                      StudyFind, msg_id=message_id)
        first, _ = next(responses)
        assert first.Status == 0xFF00
        assoc.send_c_cancel(message_id, query_model=StudyFind)
        assert [s.Status for s, _ in responses] == [0xFF00, 0xFE00]
    # the association goes on: a query after the cancels is answered whole
    assert [s for s, _ in _find(assoc, _identifier("STUDY", StudyInstanceUID="1.2.3.1"))
            ] == [0xFF00, 0x0000]


def _with_requests(node: RunningNode) -> None:
    from pydicom.dataset import Dataset as Item

    for n, (sps, rp) in enumerate([("SPS1", "RP1"), ("SPS2", "RP1"), ("SPS3", "RP9")]):
        first, second = Item(), Item()
        first.ScheduledProcedureStepID, first.RequestedProcedureID = sps, rp
        second.ScheduledProcedureStepID, second.RequestedProcedureID = f"X{n}", "RPX"
        node.services.ingest.store_bytes(make_instance(
            StudyInstanceUID="1.2.5", SeriesInstanceUID=f"1.2.5.{n}",
            SOPInstanceUID=f"1.2.5.{n}.1", RequestAttributesSequence=[first, second]))


@pytest.mark.parametrize("item_keys, expected", [
    ({"ScheduledProcedureStepID": "SPS2"}, ["1.2.5.1"]),
    ({"RequestedProcedureID": "RP1"}, ["1.2.5.0", "1.2.5.1"]),
    ({"ScheduledProcedureStepID": "SPS*", "RequestedProcedureID": "RP9"}, ["1.2.5.2"]),
    # every item key must match within one item (C.2.2.2.6), not across items
    ({"ScheduledProcedureStepID": "SPS1", "RequestedProcedureID": "RPX"}, []),
    ({}, ["1.2.5.0", "1.2.5.1", "1.2.5.2"]),  # an empty item is universal matching
])
def test_sequence_matching(node: RunningNode, associate, item_keys: dict[str, str],
                           expected: list[str]) -> None:
    """PS3.4 C.2.2.2.6 on RequestAttributesSequence: the matching items come back
    ("a sequence of matching Items"), each with only the requested item keys; all
    of them for universal matching."""
    _with_requests(node)
    item = Dataset()
    for keyword, value in item_keys.items():
        setattr(item, keyword, value)
    if not item_keys:
        item.ScheduledProcedureStepID = ""
    responses = _find(associate(), _identifier(
        "SERIES", StudyInstanceUID="1.2.5", SeriesInstanceUID="",
        RequestAttributesSequence=[item]))
    matches = [ds for status, ds in responses if status in (0xFF00, 0xFF01)]
    assert [m.SeriesInstanceUID for m in matches] == expected
    for match in matches:
        returned = match.RequestAttributesSequence
        assert len(returned) == (1 if item_keys else 2)
        assert all(set(i.dir()) == set(item.dir()) for i in returned)
        if item_keys:  # the matching item, not the other (SPS X<n>, RP RPX)
            (only,) = returned
            assert all(not str(getattr(only, keyword)).startswith(("X", "RPX"))
                       for keyword in item_keys)


def test_time_limit_counts_building_the_answers(loaded: RunningNode, associate,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """PACS_QUERY_TIME_LIMIT bounds the whole query, building the answers included
    (each SQL statement alone is quick here)."""
    from pacs.dimse.identifier import ResponseBuilder

    build = ResponseBuilder.build

    def slow_build(self: ResponseBuilder, result: object) -> object:
        time.sleep(0.05)
        return build(self, result)

    monkeypatch.setattr(ResponseBuilder, "build", slow_build)
    loaded.services.engine.time_limit = 0.3
    statuses = [s for s, _ in _find(associate(), _identifier("IMAGE", StudyInstanceUID="",
                                                             SOPInstanceUID=""))]
    assert statuses[-1] == 0xA700  # 12 matches: 0.6 s of building
    monkeypatch.setattr(ResponseBuilder, "build", build)
    statuses = [s for s, _ in _find(associate(), _identifier("IMAGE", StudyInstanceUID="",
                                                             SOPInstanceUID=""))]
    assert statuses == [0xFF00] * 12 + [0x0000]


def test_answers_come_in_pages_without_gaps(loaded: RunningNode, associate,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs.core.query.engine.PAGE_ROWS", 5)
    responses = _find(associate(), _identifier("IMAGE", StudyInstanceUID="",
                                               SOPInstanceUID=""))
    assert [s for s, _ in responses] == [0xFF00] * 12 + [0x0000]
    assert [ds.SOPInstanceUID for _, ds in responses[:-1]] == [
        f"1.2.3.{n}.1.{i}" for n in range(3) for i in range(4)]


def _two_names(node: RunningNode) -> None:
    """Two studies of Patient ID P9, each sent with its own name, birth date and sex."""
    for n, (name, birth, sex) in enumerate((("OLD^NAME", "19700101", "F"),
                                            ("NEW^NAME", "19710202", "M"))):
        for i in range(2):
            node.services.ingest.store_bytes(make_instance(
                PatientID="P9", PatientName=name, PatientBirthDate=birth, PatientSex=sex,
                StudyInstanceUID=f"1.2.9.{n}", SeriesInstanceUID=f"1.2.9.{n}.1",
                SOPInstanceUID=f"1.2.9.{n}.1.{i}", AccessionNumber=f"B{n}"))


@pytest.mark.parametrize("level, per_study", [("STUDY", 1), ("SERIES", 1), ("IMAGE", 2)])
@pytest.mark.parametrize("model", [StudyFind, PatientFind])
def test_each_study_answers_with_its_own_patient_attributes(
        node: RunningNode, associate, level: str, per_study: int, model: str) -> None:
    """PS3.4 C.3.2 / C.6.2.1: a study's patient keys are those sent in that study."""
    _two_names(node)
    keys = {"PatientID": "P9", "AccessionNumber": "", "PatientName": "",
            "PatientBirthDate": "", "PatientSex": "",
            {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
             "IMAGE": "SOPInstanceUID"}[level]: ""}
    responses = _find(associate(), _identifier(level, **keys), model)
    assert [s for s, _ in responses] == [0xFF00] * (2 * per_study) + [0x0000]
    found = [(ds.AccessionNumber, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex)
             for _, ds in responses[:-1]]
    assert sorted(found) == sorted(
        [("B0", "OLD^NAME", "19700101", "F")] * per_study
        + [("B1", "NEW^NAME", "19710202", "M")] * per_study)


@pytest.mark.parametrize("keys, accession", [
    ({"PatientName": "OLD^NAME"}, "B0"),
    ({"PatientName": "new*"}, "B1"),
    ({"PatientBirthDate": "19700101-19701231"}, "B0"),
    ({"PatientSex": "M"}, "B1"),
])
def test_patient_keys_match_each_study_on_its_own_values(
        node: RunningNode, associate, keys: dict[str, str], accession: str) -> None:
    _two_names(node)
    responses = _find(associate(), _identifier(
        "STUDY", **{"StudyInstanceUID": "", "AccessionNumber": "", "PatientName": "",
                    **keys}))
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    assert responses[0][1].AccessionNumber == accession


def test_patient_level_answers_one_row_with_the_latest_values(node: RunningNode,
                                                              associate) -> None:
    """PS3.4 C.6.1.1: one patient, answered with the values received last."""
    _two_names(node)
    responses = _find(associate(), _identifier(
        "PATIENT", PatientID="", PatientName="", PatientSex="",
        NumberOfPatientRelatedStudies=""), PatientFind)
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    match = responses[0][1]
    assert (match.PatientID, str(match.PatientName), match.PatientSex) == ("P9", "NEW^NAME", "M")
    assert match.NumberOfPatientRelatedStudies == 2
