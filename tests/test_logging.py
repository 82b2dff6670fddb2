"""Logs: JSON lines, one structured line per rejected call, Call-ID request ids, rate limits."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from core.config import Config
from core.logs import REQUEST_ID, batch_logs, configure_logging, flush_logs, log_fields
from devtools.redis_server import free_port
from service.ratelimit import RateLimitedLog
from tests.conftest import SEED_CONFIG
from tests.helpers import REJECT, body_from, load_list

CALL_ID = "243b35b872d5bb005af22dd9339e8149@10.1.10.190"


@pytest.fixture
def logs() -> Iterator[Callable[[str], io.StringIO]]:
    """Configure logging as ``python -m service`` does, into a buffer; undo it after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads)

    def configure(log_format: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging("INFO", log_format, stream=stream)  # type: ignore[arg-type]
        return stream

    yield configure
    root.handlers[:], level, logging._srcfile, logging.logThreads = saved
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_and_fields(
    logs: Callable[[str], io.StringIO],
) -> None:
    stream = logs("json")
    log = logging.getLogger("service.test")
    log.info("plain %s", "line")
    token = REQUEST_ID.set("abc@host")
    try:
        log.warning("with %d fields", 2, extra={"rule": "block", "size": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        REQUEST_ID.reset(token)

    first, second, third = json_lines(stream)
    assert first["message"] == "plain line"
    assert first["level"] == "INFO"
    assert first["logger"] == "service.test"
    assert first["time"].endswith("+00:00")
    assert "request_id" not in first
    assert second["request_id"] == "abc@host"
    assert (second["rule"], second["size"], second["level"]) == ("block", 3, "WARNING")
    assert third["request_id"] == "abc@host"
    assert "ValueError: boom" in third["exception"]


def test_text_lines_show_the_request_id_and_cannot_be_split(
    logs: Callable[[str], io.StringIO],
) -> None:
    stream = logs("text")
    log = logging.getLogger("service.test")
    token = REQUEST_ID.set("evil\nINFO forged line")
    try:
        log.info("rejected call rule=%s", "block")
    finally:
        REQUEST_ID.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert " INFO service.test[" in lines[0]
    assert lines[0].endswith("]: [evil\\nINFO forged line] rejected call rule=block")


async def test_one_structured_line_per_rejected_call_with_masked_caller(
    logs: Callable[[str], io.StringIO],
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    redis: Redis,
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    client = await make_client(make_config())
    stream = logs("json")

    blocked = body_from("15162065613")
    blocked["Call-ID"] = [CALL_ID]
    assert await (await client.post("/tg/main", json=blocked)).json() == REJECT
    assert await (await client.post("/tg/main", json=body_from("15162065600"))).json() == []

    rejects = [r for r in json_lines(stream) if r["message"].startswith("rejected call")]
    assert len(rejects) == 1
    line = rejects[0]
    assert line["trunk_group"] == "main"
    assert (line["rule"], line["list"]) == ("blocklist", "blocklist")
    assert line["caller"] == "1516206****"
    assert line["request_id"] == CALL_ID
    assert "15162065613" not in stream.getvalue()


async def test_unmasked_callers_when_configured(
    logs: Callable[[str], io.StringIO],
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    redis: Redis,
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    config = make_config({"server": {"mask_callers": False}, **SEED_CONFIG})
    client = await make_client(config)
    stream = logs("text")
    await client.post("/", json=body_from("15162065613"))
    assert "caller=15162065613" in stream.getvalue()


async def test_redis_trouble_is_logged_at_a_limited_rate_with_the_request_id(
    logs: Callable[[str], io.StringIO],
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await make_client(make_config({"redis": {"url": dead}, **SEED_CONFIG}))
    stream = logs("json")
    for n in range(30):
        body = body_from("15162065613")
        body["Call-ID"] = [f"call-{n}"]
        assert await (await client.post("/", json=body)).json() == []

    warnings = [r for r in json_lines(stream) if "answering by on_error" in r["message"]]
    assert len(warnings) == 1
    assert warnings[0]["request_id"] == "call-0"
    assert warnings[0]["level"] == "WARNING"


def test_rate_limited_log_counts_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("service.test"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert limited.warning("Redis poll failed: %s", "refused")
        for _ in range(5):
            now[0] += 1
            assert not limited.warning("Redis poll failed: %s", "refused")
        assert limited.warning("other trouble")  # another message has its own limit
        now[0] += 5
        assert limited.warning("Redis poll failed: %s", "timeout")
    assert [r.getMessage() for r in caplog.records] == [
        "Redis poll failed: refused",
        "other trouble",
        "Redis poll failed: timeout (5 similar suppressed)",
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_call_line_reads_the_same_with_or_without_a_record(
    logs: Callable[[str], io.StringIO], log_format: str
) -> None:
    """log_fields writes rejected-call lines without a LogRecord where it can: the line
    must be the one the record would have given (time apart)."""
    stream = logs(log_format)
    log = logging.getLogger("service.screening.screen")
    fields = {"trunk_group": "main", "rule": "block", "list": "blocklist", "caller": "1516****"}
    args = ("rejected call", "main", "block", "blocklist", "1516****")
    token = REQUEST_ID.set(CALL_ID)
    try:
        log_fields(log, logging.INFO, "%s trunk_group=%s rule=%s list=%s caller=%s", args, fields)
        # A second handler (as a test's log capture adds): the record is made.
        extra = logging.NullHandler()
        logging.getLogger().addHandler(extra)
        try:
            log_fields(
                log, logging.INFO, "%s trunk_group=%s rule=%s list=%s caller=%s", args, fields
            )
        finally:
            logging.getLogger().removeHandler(extra)
    finally:
        REQUEST_ID.reset(token)
    fast, made = stream.getvalue().splitlines()
    if log_format == "json":
        fast_entry, made_entry = orjson.loads(fast), orjson.loads(made)
        times = fast_entry.pop("time"), made_entry.pop("time")
        assert all(len(t) == 29 and t.endswith("+00:00") for t in times)  # ms, UTC
        assert fast_entry == made_entry
        assert fast_entry["request_id"] == CALL_ID and fast_entry["rule"] == "block"
    else:
        assert fast.split(" ", 2)[2] == made.split(" ", 2)[2]  # past date and time
        assert f"[{CALL_ID}] rejected call trunk_group=main rule=block" in fast


def test_info_lines_wait_for_a_flush_while_batching(logs: Callable[[str], io.StringIO]) -> None:
    stream = logs("text")
    log = logging.getLogger("service.test")
    batch_logs(True)
    try:
        log.info("first")
        log_fields(log, logging.INFO, "second %s", ("call",), {"rule": "x"})
        assert stream.getvalue() == ""  # held
        log.warning("trouble")  # written at once, after what was held
        assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
            "first",
            "second call",
            "trouble",
        ]
        log.info("third")
        assert "third" not in stream.getvalue()
        flush_logs()
        assert stream.getvalue().endswith(": third\n")
    finally:
        batch_logs(False)


def test_rate_limited_log_limits_per_cause_and_says_when_a_cause_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/failure.md: "once per 10 s per cause": the details of a line differ per call,
    and a frequent cause must not silence another; each cause's end is logged once."""
    now = [100.0]
    limited = RateLimitedLog(
        logging.getLogger("service.test"),
        interval_s=10,
        clock=lambda: now[0],
        recovered="cause %s over after %d",
        quiet_s=1.0,
    )
    line = "answering by on_error (%s): %s"
    with caplog.at_level(logging.INFO):
        assert limited.warning(line, "deadline", "took 0.1s", cause="deadline")
        for n in range(20):
            now[0] += 0.01
            # The same format, another detail: still the deadline's limit.
            assert not limited.warning(line, "deadline", f"call {n}", cause="deadline")
        # Another cause through the very same format string has a limit of its own.
        assert limited.warning(line, "stale_lists", "list 'a'", cause="stale_lists")
        assert not limited.warning(line, "stale_lists", "list 'b'", cause="stale_lists")
        limited.settle()  # both seen within quiet_s: nothing ends
        now[0] += 0.5
        assert not limited.warning(line, "stale_lists", "list 'a'", cause="stale_lists")
        now[0] += 0.6
        limited.settle()  # deadline quiet for 1.1 s, stale_lists for 0.6 s
        now[0] += 0.5
        limited.settle()
        limited.settle()  # each end logged once
    assert [r.getMessage() for r in caplog.records] == [
        "answering by on_error (deadline): took 0.1s",
        "answering by on_error (stale_lists): list 'a'",
        "cause deadline over after 21",
        "cause stale_lists over after 3",
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "INFO", "INFO"]
