"""The call history's cost per recorded call: ``python -m bench.history_cost``.

Two parts, against a real ``redis-server`` started in a temp folder:

- on the request path, :meth:`CallHistory.add` for a rejected call (what the handler
  pays per call; an allowed, unsampled call returns before any work);
- off it, :meth:`CallHistory.flush` of a full batch: the writer task's CPU time per
  record (encoding, the commands to Redis and their replies), which the event loop
  spends between answers; Redis's own CPU time per record (it shares the machine's
  cores with the workers); and the longest the flush held the loop at one go (the
  delay it can add to an answer).

Each figure is the median of several runs, printed with its spread.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from core.config import parse_config
from core.connect import connect
from core.store import RedisClient
from devtools.redis_server import RedisProcess
from service.metrics import Metrics
from service.screening.history import CallHistory
from service.screening.policy import Evaluation, outcome_for
from service.screening.request import CallParser

RUNS = 7
ADDS = 20_000
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
    redis = connect(url)  # the service's own client: its lean link on a single server
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, redis, metrics, {"CALLSCREEN_HISTORY_KEY": "bench-key"})
    parser = CallParser(config.caller.sources, config.caller.default_country)
    calls = [parser.parse(_body(n)) for n in range(BATCH)]
    rejected = Evaluation(
        outcome_for("reject", ("unavailable", "aniblock"), "blocklist", "blocklist"),
        matched=calls[0].caller,
    )
    add_ns: list[float] = []
    for run in range(RUNS):
        history.queue = []
        # Freshly parsed calls, as on the request path: add() reads the called number,
        # which the policy may not have needed. The loop alone, measured the same way,
        # is taken off; the queue is emptied every BATCH calls, as the writer does.
        calls = [parser.parse(_body(ADDS * (run + 1) + n)) for n in range(ADDS)]
        started = time.perf_counter_ns()
        for n in range(ADDS):
            _ = calls[n], rejected
            if n % BATCH == 0:
                _ = []
        loop_ns = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        for n in range(ADDS):
            history.add("main", calls[n], rejected)
            if n % BATCH == 0:
                history.queue = []
        add_ns.append((time.perf_counter_ns() - started - loop_ns) / ADDS)
    flush_us: list[float] = []
    redis_us: list[float] = []
    hold_ms: list[float] = []
    history.queue = []
    for run in range(RUNS):
        # New callers each batch: every caller's set key is computed, none remembered.
        batch = [parser.parse(_body(BATCH * (run + 1) + n)) for n in range(BATCH)]
        for call in batch:
            history.add("main", call, rejected)
        # This process's CPU time: what the writer takes from the event loop (Redis's own
        # work and the wait for it are not the loop's), and Redis's, from its INFO.
        redis_before = await _redis_cpu_s(redis)
        started = time.process_time_ns()
        written = await history.flush()
        assert written == BATCH, written
        flush_us.append((time.process_time_ns() - started) / BATCH / 1000)
        redis_us.append((await _redis_cpu_s(redis) - redis_before) / BATCH * 1e6)
        # The longest the writer held the loop: the thread's CPU time between two turns
        # of a task that yields at every turn (CPU, not wall time: a busy machine's
        # preemption is not the writer's).
        batch = [parser.parse(_body(BATCH * (run + RUNS + 1) + n)) for n in range(BATCH)]
        for call in batch:
            history.add("main", call, rejected)
        hold_ms.append(await _longest_hold_s(history.flush()) * 1000)
    await redis.aclose()
    return {
        "add_ns": _spread(add_ns),
        "flush_us_per_record": _spread(flush_us),
        "redis_us_per_record": _spread(redis_us),
        "longest_hold_ms": _spread(hold_ms),
    }


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


async def _redis_cpu_s(redis: RedisClient) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _longest_hold_s(work: Coroutine[Any, Any, int]) -> float:
    """Run ``work`` beside a task that yields at every turn; the longest turn it saw."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        while not done:
            before = time.thread_time()
            await asyncio.sleep(0)
            longest = max(longest, time.thread_time() - before)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await work
    done = True
    await task
    return longest


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="callscreen-history-") as folder:
        server = RedisProcess(Path(folder)).start()
        try:
            figures = asyncio.run(measure(server.url))
        finally:
            server.stop()
    add = figures["add_ns"]
    flush = figures["flush_us_per_record"]
    server_us = figures["redis_us_per_record"]
    hold = figures["longest_hold_ms"]
    print(f"add() on the request path: {add[0]:.0f} ns per rejected call "
          f"(min {add[1]:.0f}, max {add[2]:.0f}; {RUNS} runs of {ADDS:,})")  # fmt: skip
    print(f"flush() off the path: {flush[0]:.1f} us of CPU per record "
          f"(min {flush[1]:.1f}, max {flush[2]:.1f}; {RUNS} batches of {BATCH:,})")  # fmt: skip
    print(f"Redis's CPU per record: {server_us[0]:.1f} us "
          f"(min {server_us[1]:.1f}, max {server_us[2]:.1f})")  # fmt: skip
    print(f"longest hold of the event loop during a flush: {hold[0]:.2f} ms "
          f"(min {hold[1]:.2f}, max {hold[2]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
