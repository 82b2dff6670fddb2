"""Logging set-up for ``python -m service`` and ``python -m loader``: text or JSON lines.

Only the entry point calls :func:`configure_logging`; modules use
``logging.getLogger(__name__)``. Every line carries the call's request id
(:data:`REQUEST_ID`, a context variable) and the ``extra={...}`` fields; JSON lines are
one orjson object each. While a worker serves, lines below WARNING are written in
batches (:func:`batch_logs`), and a rejected-call line (:func:`log_fields`) skips the
``LogRecord`` when only this handler would see it. Secrets never reach the log
(:class:`core.redact.RedactingFilter`); see docs/operations.md, "Logs".
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from core.redact import RedactingFilter

#: The Call-ID of the request being handled (``None`` outside a screening request).
REQUEST_ID: ContextVar[str | None] = ContextVar("callscreen_request_id", default=None)

#: The audit trail's logger (core/audit.py): kept at INFO whatever the level asked for,
#: so ``--log-level WARNING`` (to drop the rejected-call lines) keeps the audit lines.
AUDIT_LOGGER = "callscreen.audit"

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Copies :data:`REQUEST_ID` onto each record as ``record.request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def _printable(value: str) -> str:
    # A Call-ID comes from the request body: keep it from forging extra text lines.
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """``time LEVEL logger[pid]: message``, with ``[request id]`` before the message.

    The line is put together directly, and the date and time to the second are made
    once per second: one line is logged per rejected call (cost: docs/operations.md,
    "Logs"). The output is :data:`TEXT_FORMAT`'s.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._asctime(record.created)

    def _asctime(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{_millis(created):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _text_line(
            record.asctime,
            record.levelname,
            record.name,
            record.process,
            getattr(record, "request_id", None),
            record.message,
        )

    def fields_line(
        self, created: float, level: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """The line :meth:`format` makes of such a record (the fields are in the message)."""
        return _text_line(self._asctime(created), level, name, _PID[0], REQUEST_ID.get(), message)


def _text_line(
    asctime: str, level: str, name: str, pid: int | None, request_id: str | None, message: str
) -> str:
    tag = f"[{_printable(request_id)}] " if request_id else ""
    return f"{asctime} {level} {name}[{pid}]: {tag}{message}"


def _millis(created: float) -> int:
    """The milliseconds of a timestamp, as ``LogRecord.msecs`` has them."""
    return int((created - int(created)) * 1000)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._stamp}.{_millis(created):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            record.process,
            getattr(record, "request_id", None),
        )
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        # exc_text first: RedactingFilter leaves the redacted traceback there.
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()

    def _entry(
        self,
        created: float,
        level: str,
        name: str,
        message: str,
        pid: int | None,
        request_id: str | None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": self._time(created),
            "level": level,
            "logger": name,
            "message": message,
            "pid": pid,
        }
        if request_id:
            entry["request_id"] = request_id
        return entry

    def fields_line(
        self, created: float, level: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """The line :meth:`format` makes of a record with ``fields`` as its extras."""
        entry = self._entry(created, level, name, message, _PID[0], REQUEST_ID.get())
        for key, value in fields.items():
            if key not in entry:
                entry[key] = value
        return orjson.dumps(entry, default=str).decode()


#: This process's id for :meth:`LineHandler.fields_line` (``os.getpid()`` is a system
#: call; a forked child updates it).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))

#: Lines a batching :class:`LineHandler` holds before it writes them anyway.
BATCH_CHARS = 64 * 1024


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs: text or JSON lines to a stream.

    While :attr:`batch` is on (the service turns it on while it serves, and flushes
    every :data:`service.procs.serve.LOG_FLUSH_S`), lines below WARNING are kept and written
    together: when 64 KiB have gathered, at the next WARNING or worse line (written
    after them, so the order holds) and at every :meth:`flush`. One write per batch
    instead of one per rejected call; an INFO line reaches the stream at most one flush
    interval late, and a process killed with SIGKILL loses at most that much.
    """

    def __init__(self, stream: TextIO, formatter: TextFormatter | JsonFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line_formatter = formatter
        self.batch = False
        #: Every record is redacted (the loader): no line is written without its record.
        self.redact_all = False
        self._lines: list[str] = []
        self._chars = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def _add(self, line: str, levelno: int) -> None:
        """Queue one line (with :attr:`lock` held), writing the queue when it is due."""
        self._lines.append(line)
        self._chars += len(line)
        if not self.batch or levelno >= logging.WARNING or self._chars >= BATCH_CHARS:
            self._write()

    def _write(self) -> None:
        if not self._lines:
            return
        text = self.terminator.join(self._lines) + self.terminator
        self._lines.clear()
        self._chars = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as logging does for a failed write: say so, go on
            if logging.raiseExceptions:
                print("--- logging error: lines could not be written", file=sys.stderr)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def fields_line(self, name: str, levelno: int, message: str, fields: dict[str, Any]) -> bool:
        """Write what a record of ``name`` with ``fields`` as extras would give, without
        making the record; False when this handler's set-up is not its own (a filter or
        level added), and the record must go through logging.
        """
        if self.redact_all or levelno < self.level or len(self.filters) != _OWN_FILTERS:
            return False
        line = self.line_formatter.fields_line(
            time.time(), logging.getLevelName(levelno), name, message, fields
        )
        self.acquire()
        try:
            self._add(line, levelno)
        finally:
            self.release()
        return True


#: The filters :func:`configure_logging` gives its handler (request id, redaction).
_OWN_FILTERS = 2


def _own_handler(logger: logging.Logger) -> LineHandler | None:
    """The one :class:`LineHandler` a record of ``logger`` would reach, if it reaches
    no other handler or logger filter; else None."""
    found = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return None
        for handler in node.handlers:
            if found is not None or not isinstance(handler, LineHandler):
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    return found


def flush_logs() -> None:
    """Write the lines the root logger's :class:`LineHandler` holds."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            handler.flush()


def batch_logs(on: bool) -> None:
    """Turn batching of lines below WARNING on or off (off writes what is held)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            handler.batch = on
            if not on:
                handler.flush()


def log_fields(
    logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    """``logger.log(level, msg, *args, extra=fields)``, at a fraction of the cost.

    For lines logged on the request path (one per rejected call). Where the record would
    reach only the handler :func:`configure_logging` installed, and that handler's own
    filters (the request id; redaction, which leaves such records alone), the handler
    writes the line the record would have given without making the record
    (:meth:`LineHandler.fields_line`; tests compare both ways). Anywhere else (a test's
    capture handler, another filter) the record is made: ``extra`` is then set as
    attributes, which spares the full ``__dict__`` that ``extra=`` builds.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _own_handler(logger)
    if handler is not None and handler.fields_line(logger.name, level, msg % args, fields):
        return
    record = logger.makeRecord(
        logger.name, level, "(unknown file)", 0, msg, args, None, "(unknown function)"
    )
    for key, value in fields.items():
        setattr(record, key, value)
    logger.handle(record)


def configure_logging(
    level: str | int = "INFO",
    log_format: LogFormat = "text",
    stream: TextIO | None = None,
    *,
    redact_all: bool = False,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as text or JSON lines; returns the handler.

    Replaces the root logger's handlers, so calling it again switches format cleanly.
    ``redact_all`` passes every record through the redaction, not only aiohttp's and
    those with an exception (the loader: its few lines quote list sources and errors).
    Raises ValueError for an unknown level.
    Records skip the caller's file/line and thread look-ups (the logging HOWTO's
    "Optimization"): neither is printed, and the look-up more than doubled the cost of
    the line logged for every rejected call.
    """
    if isinstance(level, str):
        level = level.upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = LineHandler(stream if stream is not None else sys.stderr, formatter)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter(everything=redact_all))
    handler.redact_all = redact_all
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    numeric: int = logging.getLevelName(level) if isinstance(level, str) else level
    logging.getLogger(AUDIT_LOGGER).setLevel(min(numeric, logging.INFO))
    return handler
