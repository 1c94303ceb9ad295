"""No data-set values in the log at INFO and above: tracebacks, exceptions as messages or
arguments, pydicom's and Python's warnings; everything whole at DEBUG."""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from pacs.core import logs
from pacs.core.errors import InvalidQuery, UnreadableData

SECRET = "Secretname^Patient"


@pytest.fixture
def handler() -> Iterator[io.StringIO]:
    """The root's one handler, like the node's, with the filter installed as the node
    does (pytest's own handlers set aside: each would get a filter of its own, which
    takes its own share of a flood's records)."""
    out = io.StringIO()
    added = logging.StreamHandler(out)
    added.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, handlers = root.level, root.handlers
    root.handlers = [added]
    root.setLevel(logging.DEBUG)
    logs.install("INFO")
    yield out
    root.handlers = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _pydicom_error() -> None:
    """Raises what pydicom raises on a value it cannot convert: the value quoted."""
    DataElement(0x00101030, "DS", SECRET)


def test_a_traceback_becomes_types_and_places(handler: io.StringIO) -> None:
    log = logging.getLogger("pacs.dimse.find")
    try:
        try:
            _pydicom_error()
        except ValueError as exc:
            raise RuntimeError(f"wrapped {exc}") from exc
    except RuntimeError:
        log.exception("C-FIND from %s failed unexpectedly", "FINDSCU")
    text = handler.getvalue()
    assert SECRET not in text
    assert "ERROR pacs.dimse.find: C-FIND from FINDSCU failed unexpectedly" in text
    assert "RuntimeError at unit/test_logs.py:" in text
    assert "<- ValueError at pydicom/valuerep.py:" in text


def test_an_exception_as_message_or_argument_is_only_named(handler: io.StringIO) -> None:
    log = logging.getLogger("pynetdicom.dsutils")
    try:
        _pydicom_error()
    except ValueError as exc:
        log.exception(exc)  # what pynetdicom does
        log.warning("could not encode: %s", exc)
        log.error("could not encode: %(error)s", {"error": exc})
    text = handler.getvalue()
    assert SECRET not in text
    assert text.count("ValueError at pydicom/") == 4  # message and traceback, two arguments


def test_the_nodes_own_errors_and_errnos_are_kept(handler: io.StringIO) -> None:
    log = logging.getLogger("pacs.node.uploads")
    log.warning("refused: %s", InvalidQuery("PatientName: not a PN value"))
    log.warning("refused: %s", UnreadableData(f"does not parse: could not convert '{SECRET}'"))
    try:
        with open(f"/nonexistent/{SECRET}.dcm"):
            pass
    except OSError:
        log.exception("cannot read an upload")
    text = handler.getvalue()
    assert "refused: PatientName: not a PN value" in text
    assert "refused: does not parse: could not convert '…'" in text
    assert "FileNotFoundError [Errno 2] No such file or directory at unit/test_logs.py" in text
    assert SECRET not in text


def test_pydicom_and_python_warnings_lose_what_they_quote(handler: io.StringIO) -> None:
    ds = Dataset()
    mode = pydicom.config.settings.reading_validation_mode  # the node's is IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            ds.PatientBirthDate = SECRET  # pydicom warns (and logs) with the value quoted
            warnings.warn(f"Invalid value for VR PN: '{SECRET}'", UserWarning, stacklevel=1)
    finally:
        pydicom.config.settings.reading_validation_mode = mode
    text = handler.getvalue()
    assert "Invalid value for VR DA: …" in text
    assert "WARNING py.warnings:" in text and "Invalid value for VR PN: …" in text
    assert SECRET not in text


@pytest.mark.parametrize("value", [
    "ISO_IR 192\\MARKER\\DOE JOHN",  # listed unquoted after a colon
    "MARKER'DOE\"JOHN",  # quotes of the value's own break the pairs
])
def test_a_specific_character_set_a_peer_chose_stays_out(handler: io.StringIO,
                                                         value: str) -> None:
    """pydicom names the terms of a Specific Character Set it cannot use, in a warning
    and a log record: unquoted after a colon, or quoted with the value's own quotes
    inside.  Neither reaches the log; what happened does."""
    ds = Dataset()
    ds.SpecificCharacterSet = value.split("\\")
    ds.PatientName = b"DOE"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds.decode()
    text = handler.getvalue()
    assert "Specific Character Set" in text or "encoding" in text
    assert "MARKER" not in text and "JOHN" not in text


def test_what_the_libraries_say_in_words_is_kept(handler: io.StringIO) -> None:
    """An apostrophe within a word quotes nothing (pydicom's ``doesn't``, gunicorn's
    ``Can't``); pynetdicom's records keep what they quote: the names of SOP classes,
    transfer syntaxes and handlers of a command, never a data set's values."""
    logging.getLogger("pydicom").warning(
        "The value length (10 bytes) doesn't match the expected length for '%s'", SECRET)
    logging.getLogger("gunicorn.error").error("Can't connect to ('0.0.0.0', 5985)")
    logging.getLogger("pynetdicom.assoc").error(
        "No presentation context for 'CT Image Storage' has been accepted")
    text = handler.getvalue()
    assert "doesn't match the expected length for '…'" in text and SECRET not in text
    assert "Can't connect to ('…', 5985)" in text
    assert "No presentation context for 'CT Image Storage' has been accepted" in text


def test_debug_keeps_everything(handler: io.StringIO) -> None:
    for existing in logging.getLogger().handlers:
        for found in existing.filters:
            if isinstance(found, logs.Redact):
                found.details = True
    try:
        _pydicom_error()
    except ValueError:
        logging.getLogger("pacs").exception("failed")
    assert SECRET in handler.getvalue() and "Traceback (most recent call last)" in (
        handler.getvalue())


def test_records_below_info_are_left_whole(handler: io.StringIO) -> None:
    try:
        _pydicom_error()
    except ValueError as exc:
        logging.getLogger("pacs").debug("details: %s", exc, exc_info=True)
    assert SECRET in handler.getvalue()


def test_handlers_of_loggers_that_do_not_propagate_are_covered(handler: io.StringIO) -> None:
    """gunicorn's error log has its own handler and does not propagate to the root."""
    own = io.StringIO()
    error_log = logging.getLogger("gunicorn.error.test")
    error_log.propagate = False
    error_log.addHandler(logging.StreamHandler(own))
    try:
        logs.install("INFO")
        try:
            _pydicom_error()
        except ValueError:
            error_log.exception("Error handling request")
    finally:
        error_log.handlers.clear()
    assert "Error handling request" in own.getvalue() and SECRET not in own.getvalue()


def test_gunicorn_loses_the_request_line_it_quotes(handler: io.StringIO) -> None:
    # gunicorn formats the refused request line into its message with repr().
    line = f"GET /studies?PatientName={SECRET} HTTP/1.1 extra"
    logging.getLogger("gunicorn.error").warning(
        "Invalid request from ip=%s: %s", "10.0.0.9", f"Invalid HTTP request line: {line!r}")
    text = handler.getvalue()
    assert "Invalid request from ip=10.0.0.9: Invalid HTTP request line: '…'" in text
    assert SECRET not in text


# --- a log that cannot be written ---------------------------------------------------------

@pytest.fixture
def full_disk_log(tmp_path: Any
                  ) -> Iterator[tuple[logging.Logger, logging.StreamHandler[Any], Any]]:
    """A logger whose handler writes to /dev/full (every write: ENOSPC), installed as
    the node does, and the file its descriptor is pointed at when space is back."""
    with open("/dev/full", "w", buffering=1) as stream:  # line-buffered, as stderr is
        added = logging.StreamHandler(stream)
        added.setFormatter(logging.Formatter(logs.LOG_FORMAT))
        logger = logging.getLogger("tests.full_disk")
        logger.propagate, logger.handlers = False, [added]
        logs.install("INFO")
        yield logger, added, tmp_path / "after.log"
        logger.handlers = []
        added.close()


def test_records_lost_on_a_full_disk_are_counted_in_one_line_once_it_has_room(
        full_disk_log: tuple[logging.Logger, logging.StreamHandler[Any], Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    logger, handler, after = full_disk_log
    writer = handler.stream
    assert isinstance(writer, logs.LineWriter)
    for number in range(3):
        logger.warning("record %d", number)  # lost: never raised, never reported
    assert writer.lost == 3 and capsys.readouterr().err == ""
    with open(after, "w") as room:  # space again: the same descriptor, a writable file
        os.dup2(room.fileno(), writer.fd)
    logger.warning("record 3")
    lines = after.read_text().splitlines()
    assert len(lines) == 2 and writer.lost == 0
    assert "WARNING pacs.core.logs" in lines[0]
    assert "3 log record(s) could not be written since " in lines[0]
    assert "(No space left on device) and are lost" in lines[0]
    assert lines[1].endswith("record 3")


def test_a_stream_without_a_descriptor_is_left_as_it_is(handler: io.StringIO) -> None:
    (added,) = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream is handler]
    assert added.stream is handler


def test_a_message_is_one_line_without_a_terminal_s_escapes(handler: io.StringIO) -> None:
    """What a peer sent (an AE title, pynetdicom's Implementation Version Name) cannot
    forge a line of its own, nor drive a terminal."""
    forged = "X\n2026-12-05 11:59:59,000 INFO pacs.dimse.server[1]: FORGED\x1b[31m"
    logging.getLogger("pacs.dimse.server").warning("association from %s", forged)
    logging.getLogger("pynetdicom.acse").warning("Implementation Version Name: %s", forged)
    lines = handler.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all("\x1b" not in line for line in lines)
    assert "X\\n2026-12-05" in lines[0] and "\\x1b[31m" in lines[0]


def test_a_long_message_is_cut(handler: io.StringIO) -> None:
    logging.getLogger("pynetdicom.acse").error("Version: %s", "v" * 60_000)
    text = handler.getvalue()
    assert len(text) < logs.MAX_MESSAGE + 200
    assert "more characters)" in text


def test_a_flood_of_item_by_item_records_is_cut_and_counted(
        handler: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom logs a line per item it finds wrong (9,000 for one request), the C-FIND
    encoder one per value it cuts in each answer: together ITEM_RECORDS a second, and
    the next line written says how many were left out; the node's other records are
    never left out."""
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    library = logging.getLogger("pynetdicom.utils")
    for _ in range(9000):
        library.warning("Invalid UID: '.'")
    for _ in range(1000):
        logging.getLogger("pacs.dimse.encoding").warning("a value cut")
    logging.getLogger("pacs.dimse.server").warning("the node's own")
    now[0] += 1
    library.warning("next second")
    lines = handler.getvalue().splitlines()
    assert len(lines) == logs.ITEM_RECORDS + 2
    assert lines[-2] == "WARNING pacs.dimse.server: the node's own"
    assert lines[-1].endswith(f"({10000 - logs.ITEM_RECORDS} more record(s) item by item "
                              "left out before this one)")


def test_a_thread_that_ends_with_an_error_is_one_record(
        handler: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's own hook prints the traceback, values and all, on stderr, around the
    filter: a node's process logs it as a record instead."""
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    logs.setup("INFO", stream=io.StringIO())

    def failing() -> None:
        _pydicom_error()

    worker = threading.Thread(target=failing, name="doomed")
    worker.start()
    worker.join()
    text = handler.getvalue()
    assert "ERROR pacs.threads: thread doomed ended with an error" in text
    assert SECRET not in text and "ValueError at pydicom/valuerep.py:" in text


def test_the_summary_of_an_exception_is_one_line_too(handler: io.StringIO) -> None:
    """The node's own errors keep their message in the summary of a record's
    exception: a newline there cannot forge a line either."""
    try:
        raise InvalidQuery("bad key\nERROR pacs.dimse.server: FORGED")
    except InvalidQuery:
        logging.getLogger("pacs.dimse.find").error("C-FIND failed", exc_info=True)
    lines = handler.getvalue().splitlines()
    assert not any(line.startswith("ERROR pacs.dimse.server") for line in lines), lines
    assert "bad key\\nERROR" in handler.getvalue()
