"""The call history's cost per recorded call: ``python -m bench.history_cost``.

Two parts, against a real ``redis-server`` started in a temp folder:

- on the request path, :meth:`CallHistory.add` for a rejected call (what the handler
  pays per call; an allowed, unsampled call returns before any work);
- off it, :meth:`CallHistory.flush` of a full batch: the writer task's CPU time per
  record (encoding, the pipeline to Redis and its replies), which the event loop spends
  between answers every ``history.flush_ms``.

Each figure is the median of several runs, printed with its spread.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import parse_config
from devtools.redis_server import RedisProcess
from service.metrics import Metrics
from service.screening.history import CallHistory
from service.screening.policy import Evaluation, outcome_for
from service.screening.request import CallParser

RUNS = 7
ADDS = 200_000
BATCH = 2_000


def _body(n: int) -> dict[str, object]:
    caller = f"1516{2_000_000 + n:07d}"
    return {
        "Call-ID": [f"bench-{n}@10.1.10.190"],
        "From": [{"user": caller, "host": "10.1.10.190", "name": "", "raw": ""}],
        "To": [{"user": "19512623062", "host": "10.1.10.190", "name": "", "raw": ""}],
    }


async def measure(url: str) -> dict[str, tuple[float, float, float]]:
    config = parse_config(
        {"redis": {"url": url}, "history": {"enabled": True, "queue_max": ADDS + 1}}
    )
    redis = Redis.from_url(url)
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, redis, metrics, {"CALLSCREEN_HISTORY_KEY": "bench-key"})
    parser = CallParser(config.caller.sources, config.caller.default_country)
    calls = [parser.parse(_body(n)) for n in range(BATCH)]
    rejected = Evaluation(
        outcome_for("reject", ("unavailable", "aniblock"), "blocklist", "blocklist"),
        matched=calls[0].caller,
    )
    add_ns: list[float] = []
    for _ in range(RUNS):
        history.queue = []
        # The loop alone, measured the same way, is taken off: what remains is add().
        # The queue is emptied every BATCH calls, as the writer does every flush_ms.
        started = time.perf_counter_ns()
        for n in range(ADDS):
            _ = calls[n % BATCH], rejected
            if n % BATCH == 0:
                _ = []
        loop_ns = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        for n in range(ADDS):
            history.add("main", calls[n % BATCH], rejected)
            if n % BATCH == 0:
                history.queue = []
        add_ns.append((time.perf_counter_ns() - started - loop_ns) / ADDS)
    flush_us: list[float] = []
    for _ in range(RUNS):
        history.queue = []
        for call in calls:
            history.add("main", call, rejected)
        # This process's CPU time: what the writer takes from the event loop (Redis's own
        # work and the wait for it are not the loop's).
        started = time.process_time_ns()
        written = await history.flush()
        assert written == BATCH, written
        flush_us.append((time.process_time_ns() - started) / BATCH / 1000)
    await redis.aclose()
    return {
        "add_ns": (statistics.median(add_ns), min(add_ns), max(add_ns)),
        "flush_us_per_record": (statistics.median(flush_us), min(flush_us), max(flush_us)),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="callscreen-history-") as folder:
        server = RedisProcess(Path(folder)).start()
        try:
            figures = asyncio.run(measure(server.url))
        finally:
            server.stop()
    add = figures["add_ns"]
    flush = figures["flush_us_per_record"]
    print(f"add() on the request path: {add[0]:.0f} ns per rejected call "
          f"(min {add[1]:.0f}, max {add[2]:.0f}; {RUNS} runs of {ADDS:,})")  # fmt: skip
    print(f"flush() off the path: {flush[0]:.1f} us of CPU per record "
          f"(min {flush[1]:.1f}, max {flush[2]:.1f}; {RUNS} batches of {BATCH:,})")  # fmt: skip


if __name__ == "__main__":
    main()
