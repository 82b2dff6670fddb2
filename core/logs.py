"""Logging set-up for ``python -m service`` and ``python -m loader``: text or JSON lines.

Only the entry point calls :func:`configure_logging`; modules just use
``logging.getLogger(__name__)``. Two things reach every line:

- the **request id**: the screening handler puts the call's ``Call-ID`` in
  :data:`REQUEST_ID` (a context variable, so each request task has its own), and a filter
  on the handler copies it onto every record logged while that request runs;
- **structured fields**: values passed with ``extra={...}`` (the rejected-call line gives
  ``trunk_group``, ``rule``, ``list``, ``caller``) become keys of the JSON object. The
  message keeps them too, so a text line reads the same without them.

JSON lines hold ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``message``, ``pid``, then ``request_id`` and the structured fields when present, and
``exception`` with the traceback when one was logged. One object per line, via orjson.

Secrets stay out of the log (:class:`core.redact.RedactingFilter`): aiohttp's own
records, which quote the raw request line and headers of a request it could not parse,
and every record carrying an exception are rewritten with handler secrets
(``?key=``, ``/k/<secret>``), ``Authorization`` values and URL passwords hidden.
Other records skip that work (one line is logged per rejected call); they are written
so as never to quote a secret.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from core.redact import RedactingFilter

#: The Call-ID of the request being handled (``None`` outside a screening request).
REQUEST_ID: ContextVar[str | None] = ContextVar("callscreen_request_id", default=None)

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
    once per second: one line is logged per rejected call, and this took a third off
    its cost (measured for BENCHMARKS.md). The output is :data:`TEXT_FORMAT`'s.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        tag = f"[{_printable(request_id)}] " if request_id else ""
        return (
            f"{record.asctime} {record.levelname} {record.name}[{record.process}]: "
            f"{tag}{record.message}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
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


def log_fields(
    logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    """``logger.log(level, msg, *args, extra=fields)``, at two thirds of the cost.

    For lines logged on the request path (one per rejected call). ``extra`` is copied
    in through the record's ``__dict__``, which turns the record's compact attribute
    storage into a full dictionary first; setting the fields as attributes does not.
    """
    if not logger.isEnabledFor(level):
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
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter(everything=redact_all))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
