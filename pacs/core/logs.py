"""Logging set-up shared by the node's processes: no data-set values at INFO and above.

Exceptions raised by pydicom and pynetdicom often quote the value they choked on
(``Invalid value for VR PN: 'DOE^JOHN'``, an element's repr), and so do their
tracebacks; pynetdicom logs some exceptions as the message itself
(``LOGGER.exception(exc)``), and pydicom's warnings quote values too.  Unless the
node runs at ``PACS_LOG_LEVEL=DEBUG``, :class:`Redact`, installed on every handler (the
root logger's, gunicorn's error log's), rewrites each record of level INFO and above:

- a traceback becomes one line: each exception's type and the place it was raised
  (file, line, function; and the last frame of the node's own code), with the message
  of the node's own errors (:class:`~pacs.core.errors.PacsError`) and the errno of
  ``OSError`` (never its file name);
- an exception given as the message or as an argument becomes that same summary,
  without its text; one of the node's own errors keeps its message;
- whatever a message of the node's own errors quotes is replaced by ``'…'`` (some wrap
  a library's message, which may quote a value);
- records of pydicom's logger, gunicorn's error log and Python warnings (routed into
  logging here) have whatever they quote replaced by ``'…'``;
- a message is one line: control characters (a newline, a terminal's escape) are
  written escaped, so that what a peer sent (an AE title, an Implementation Version
  Name that pynetdicom logs) cannot forge a line of its own or drive a terminal, and
  it is cut after :data:`MAX_MESSAGE` characters;
- the loggers that write a record per item of what a peer sent (pynetdicom logs a line
  per item it finds wrong in a request, thousands for one A-ASSOCIATE-RQ; the node's
  C-FIND encoder one per value it cuts, in each answer) write at most
  :data:`ITEM_RECORDS` records a second per process, together; the next one written
  says how many were left out.

Records below INFO are left whole: DEBUG is where a developer looks at values.

A log on a full disk loses records, not the node: :func:`install` also gives each
handler that writes to a descriptor (stderr, a log file) a :class:`LineWriter`, which
writes each record straight to it in one ``write`` call (as many system calls as a
line-buffered stderr makes) and never raises.  A record that cannot be written (``ENOSPC``,
a quota, any ``OSError``) is counted and dropped whole, without the "--- Logging error
---" report that would fail the same way; the first record that can be written again is
preceded by one WARNING line saying how many were lost, since when and why.  Nothing is
held back in a buffer, so the count is exact: no record counted as lost turns up later.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

from pacs.core.errors import PacsError

#: Loggers whose messages quote data-set values: quoted text is left out.  gunicorn's
#: error log quotes a request line it refuses, whose query string may carry a patient's
#: name (QIDO-RS ``?PatientName=…``).
QUOTING_LOGGERS = ("pydicom", "py.warnings", "gunicorn.error")
#: Loggers that list values after a colon, unquoted (pydicom's ``… ignoring: A, B``
#: of a Specific Character Set's terms; Python's warnings, which pydicom's are):
#: whatever follows the first colon is left out too.
LISTING_LOGGERS = ("pydicom", "py.warnings")
#: Longest message written at INFO and above; the rest is counted, not written.
MAX_MESSAGE = 4096
#: Loggers that log what a peer sent (or a query found), item by item: the libraries',
#: and the C-FIND encoder's record of each value it cuts.
ITEM_LOGGERS = ("pynetdicom", "pydicom", "pacs.dimse.encoding")
#: Records of :data:`ITEM_LOGGERS` written per second and process at most.
ITEM_RECORDS = 50
#: Characters written escaped in a message: C0 and C1 controls but the tab, DEL.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: Folders of the node's own code, for the place of an exception in it.
_OWN_CODE = ("/pacs/", "/adapters/")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: From a quote to the last one of its kind (a value may hold quotes of its own).
_QUOTED_SPAN = re.compile(r"(['\"]).*\1", re.S)
#: An apostrophe within a word (``doesn't``, ``Can't``): no quote of a value.
_APOSTROPHE = re.compile(r"(?<=[A-Za-z])'(?=[A-Za-z])")
#: The head of a Python warning as logging captures it (``file:line: Category: ``).
_WARNING_HEAD = re.compile(r"[^\n]*?:\d+: \w+: ")


#: One log line format for every process of the node (CLI, DIMSE and HTTP workers,
#: analysers, the uploads watcher).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup(level: str, log_format: str = LOG_FORMAT, stream: TextIO | None = None) -> None:
    """``logging.basicConfig`` at ``level`` on stderr (a no-op where logging is already
    configured, e.g. by gunicorn), then :func:`install`."""
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=log_format,
                        stream=stream or sys.stderr)
    install(level)
    if threading.excepthook is threading.__excepthook__:  # not a test runner's own
        threading.excepthook = _thread_failed


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A thread that ended with an error, as a log record (through :class:`Redact`,
    one line at the default level), instead of Python's traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("pacs.threads").error(
        "thread %s ended with an error", name, exc_info=args.exc_value)


def install(level: str) -> None:
    """Add :class:`Redact` to every handler configured so far (once): the root
    logger's, and those of loggers that do not propagate (gunicorn's error log); route
    Python warnings into logging, so that they pass through it too.

    Parameters
    ----------
    level : str
        The node's log level (``PACS_LOG_LEVEL``): ``DEBUG`` keeps everything whole.
    """
    details = getattr(logging, level, logging.INFO) <= logging.DEBUG
    loggers = [logging.getLogger()] + [
        logger for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, Redact) for f in handler.filters):
                handler.addFilter(Redact(details))
            if isinstance(handler, logging.StreamHandler):
                count_lost_records(handler)
    logging.captureWarnings(True)


def count_lost_records(handler: logging.StreamHandler[Any]) -> None:
    """Give ``handler`` a :class:`LineWriter` over its stream's descriptor (once);
    a stream without one (a test's ``StringIO``) is left as it is."""
    stream = handler.stream
    if isinstance(stream, LineWriter):
        return
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation included
        return
    handler.setStream(LineWriter(fd, stream, handler))


class LineWriter:
    """A log handler's stream: each record straight to the descriptor, the records
    that cannot be written counted, and their number written once writing works again
    (see the module docstring).

    Used under the handler's lock (``Handler.handle`` holds it around ``emit``), so it
    needs none of its own.

    Parameters
    ----------
    fd : int
        The descriptor written to.
    wrapped : TextIO
        The stream it replaces: flushed first, closed with it (a log file's).
    handler : logging.Handler
        Whose formatter formats the line about the lost records.
    """

    def __init__(self, fd: int, wrapped: TextIO, handler: logging.Handler) -> None:
        self.fd = fd
        self.wrapped = wrapped
        self.handler = handler
        self.encoding = getattr(wrapped, "encoding", None) or "utf-8"
        self.lost = 0
        self._since = ""
        self._why = ""
        self._torn = False

    def write(self, text: str) -> int:
        """Write one record (never raises; a record not written is counted)."""
        if self.lost and not self._announce():
            self.lost += 1  # the line about the others failed: this one would too
            return 0
        if not self._written(text):
            self.lost += 1
        return len(text)

    def _announce(self) -> bool:
        """Write the line about the lost records; True when it was written."""
        record = logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "%d log record(s) could not be written since %s (%s) and are lost",
            "args": (self.lost, self._since, self._why)})
        if not self._written(self.handler.format(record) + "\n"):
            return False
        self.lost = 0
        return True

    def _written(self, text: str) -> bool:
        """Write ``text`` whole; False when it could not be (noted for the count)."""
        data = text.encode(self.encoding, "backslashreplace")
        if self._torn:  # a line cut short by a full disk: end it before this one
            data = b"\n" + data
        view, started = memoryview(data), False
        try:
            while view:
                written = os.write(self.fd, view)
                started = started or written > 0
                view = view[written:]
        except OSError as exc:
            self._torn = self._torn or started
            if not self.lost:
                self._since = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
                self._why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            return False
        self._torn = False
        return True

    def flush(self) -> None:
        """Nothing is buffered."""

    def fileno(self) -> int:
        """The descriptor written to."""
        return self.fd

    def close(self) -> None:
        """Close the stream it replaced (a log file's handler closes its stream)."""
        self.wrapped.close()


class Redact(logging.Filter):
    """Rewrites records of level INFO and above so that they carry no data-set values
    and hold one line each (see the module docstring); drops only the libraries'
    records past their rate, counted.

    Parameters
    ----------
    details : bool
        Leave every record whole (the node runs at DEBUG).
    """

    def __init__(self, details: bool = False) -> None:
        super().__init__()
        self.details = details
        self._second = 0
        self._written = 0
        self._left_out = 0
        # ``Handler.handle`` runs the filters before it takes the handler's lock.
        self._rate_lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.details or record.levelno < logging.INFO or getattr(record, "_redacted",
                                                                    False):
            return True
        if record.name.startswith(ITEM_LOGGERS) and not self._within_rate():
            return False
        record._redacted = True
        self._redact(record)
        message = one_line(record.getMessage())
        if record.name.startswith(ITEM_LOGGERS):
            with self._rate_lock:
                left_out, self._left_out = self._left_out, 0
            if left_out:
                message = (f"{message} ({left_out} more record(s) item by item left "
                           "out before this one)")
        record.msg, record.args = message, None
        if record.exc_text:  # the summary may hold a message of the node's own errors
            record.exc_text = one_line(record.exc_text)
        return True

    def _within_rate(self) -> bool:
        """Whether one more item-by-item record may be written this second (counted
        when not)."""
        with self._rate_lock:
            second = int(time.monotonic())
            if second != self._second:
                self._second, self._written = second, 0
            self._written += 1
            if self._written > ITEM_RECORDS:
                self._left_out += 1
                return False
            return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        """The record's exception, arguments and quotes without values."""
        if record.exc_info or record.exc_text:
            exc = record.exc_info[1] if record.exc_info else None
            record.exc_text = "  " + (summary(exc) if exc is not None else "traceback left out")
            record.exc_info = None
        if isinstance(record.msg, BaseException):
            record.msg = summary(record.msg).replace("%", "%%")
        if isinstance(record.args, tuple):
            record.args = tuple(_argument(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _argument(v) for k, v in record.args.items()}
        if record.name.startswith(QUOTING_LOGGERS):
            text = _APOSTROPHE.sub("\x02", record.getMessage())
            text = _without_values(_unquoted(text),
                                   listing=record.name.startswith(LISTING_LOGGERS))
            record.msg, record.args = text.replace("\x02", "'").replace("%", "%%"), None


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with its control characters escaped, cut after ``limit`` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def summary(exc: BaseException) -> str:
    """An exception and its causes as types and places, without their values."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{described(current)}{_places(current.__traceback__)}")
        current = current.__cause__ or (None if current.__suppress_context__
                                         else current.__context__)
    return " <- ".join(parts)


def _argument(value: Any) -> Any:
    if isinstance(value, PacsError):
        return _unquoted(str(value))
    if isinstance(value, BaseException):
        return summary(value)
    return value


def _unquoted(text: str) -> str:
    """``text`` with whatever it quotes left out (a value wrapped into a message)."""
    return _QUOTED.sub("'…'", text)


def _without_values(text: str, listing: bool) -> str:
    """A library's message (:data:`QUOTING_LOGGERS`) without what it quotes, when a
    value holds quotes of its own too (``Unknown encoding 'A'B'``): from a quote to the
    last of its kind, from a quote without its pair to the end; with ``listing``
    (:data:`LISTING_LOGGERS`) whatever follows the first colon too, a Python warning's
    head (its file, line and category) kept."""
    head = _WARNING_HEAD.match(text) if listing else None
    start = head.end() if head is not None else 0
    body = _QUOTED_SPAN.sub("\0", text[start:])
    lone = [at for at in (body.find("'"), body.find('"')) if at >= 0]
    if lone:
        body = body[:min(lone)] + "\0"
    colon = body.find(": ") if listing else -1
    if colon >= 0:
        body = body[:colon] + ": …"
    return text[:start] + body.replace("\0", "'…'")


def failure_text(exc: BaseException) -> str:
    """Why something failed, in words that hold no peer's text nor data-set value
    (:func:`described`), with the errno of the first OSError among the exception's
    causes when it is none itself (urllib3's ``NewConnectionError`` wraps the refused
    connection): for a failure kept where the log's filter does not pass (a forwarding
    destination's last error, shown by ``pacs status``), where another library's
    message may be a peer's own bytes (http.client's ``BadStatusLine`` is the line it
    got)."""
    text = described(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return text
    seen: set[int] = set()
    current = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return f"{text} ([Errno {current.errno}] {current.strerror})"
        current = current.__cause__ or current.__context__
    return text


def described(exc: BaseException) -> str:
    """An exception in a few words that hold no peer's text nor data-set value: its
    type; the message of the node's own errors, without what they quote; an OSError's
    errno and its meaning (not its file name, which may be made of UIDs)."""
    name = type(exc).__name__
    if isinstance(exc, PacsError):
        return f"{name}: {_unquoted(str(exc))}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name} [Errno {exc.errno}] {exc.strerror}"
    return name


def _places(tb: TracebackType | None) -> str:
    """Where the exception was raised and, when elsewhere, the node's last frame."""
    frames: list[tuple[str, int, str]] = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno,
                       tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    if not frames:
        return ""
    where = f" at {_place(*frames[-1])}"
    own = [f for f in frames if any(part in f[0] for part in _OWN_CODE)]
    if own and own[-1] is not frames[-1]:
        where += f" (from {_place(*own[-1])})"
    return where


def _place(filename: str, line: int, function: str) -> str:
    short = "/".join(filename.split("/")[-2:])
    return f"{short}:{line} in {function}"


def shown(name: str) -> str:
    """A file name as one line of UTF-8 text: bytes that are not UTF-8 as ``\\xNN``,
    control characters (a newline) escaped, so that a name cannot break the lines or
    the encoding of a report, a reason file or a log line."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
