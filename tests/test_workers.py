"""``python -m service --workers 2``: a real supervisor and two workers on one port."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import ServiceProcess, scrape

CONNECTIONS = 16
PER_CONNECTION = 10
BLOCKED_EVERY = 4  # every 4th call is from a blocked caller
DECISION = (
    'callscreen_decisions_total{{decision="{}",dry_run="false",rule="{}",trunk_group="main"}}'
)
REJECTED = DECISION.format("reject", "blocklist")
ALLOWED = DECISION.format("allow", "default")
COUNT = "callscreen_request_duration_seconds_count"


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, redis_server.url, workers=2)
    yield process
    process.stop()


async def send_calls(url: str, connection: int) -> list[bool]:
    """PER_CONNECTION calls on one keep-alive connection; True for each rejected call."""
    rejected = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(PER_CONNECTION):
            n = connection * PER_CONNECTION + i
            blocked = n % BLOCKED_EVERY == 0
            body = body_from("15162065613" if blocked else f"1516206{n:04d}")
            body["Call-ID"] = [f"call-{n}@test"]
            async with session.post(f"{url}/tg/main", json=body) as response:
                answer = await response.json()
            assert answer == (REJECT if blocked else [])
            rejected.append(blocked)
    return rejected


async def totals_reach(url: str, expected: dict[str, float]) -> None:
    async def reached() -> bool:
        try:
            samples = await scrape(url)
        except aiohttp.ClientConnectionError:
            # A connection the kernel queued on a worker's socket just as that worker
            # stopped is reset (SO_REUSEPORT); a scraper retries, and so do we.
            return False
        return all(samples.get(name) == value for name, value in expected.items())

    # Other workers' counts reach /metrics within service.procs.snapshots.FLUSH_S.
    await wait_for(reached, timeout_s=10.0, interval_s=0.2)


async def test_two_workers_metrics_add_up_to_the_calls_sent(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()

    results = await asyncio.gather(*(send_calls(service.url, c) for c in range(CONNECTIONS)))
    sent = CONNECTIONS * PER_CONNECTION
    rejected = sum(sum(r) for r in results)
    await totals_reach(service.url, {COUNT: sent, REJECTED: rejected, ALLOWED: sent - rejected})
    # Every scrape sees the sum, whichever worker answers it.
    for _ in range(4):
        samples = await scrape(service.url)
        assert samples[COUNT] == sent
        assert samples["callscreen_workers"] == 2

    # Both workers answered calls (one reject line each, tagged with its pid and Call-ID;
    # INFO lines are written every 0.1 s).
    async def all_logged() -> bool:
        lines = [r for r in service.log_records() if r["message"].startswith("rejected call")]
        return len(lines) >= rejected

    await wait_for(all_logged, timeout_s=5)
    reject_lines = [r for r in service.log_records() if r["message"].startswith("rejected call")]
    assert len(reject_lines) == rejected
    assert len({r["pid"] for r in reject_lines}) == 2
    assert all(re.fullmatch(r"call-\d+@test", r["request_id"]) for r in reject_lines)
    assert {r["caller"] for r in reject_lines} == {"1516206****"}


async def test_a_worker_that_dies_is_replaced_and_its_counts_kept(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()
    results = await asyncio.gather(*(send_calls(service.url, c) for c in range(4)))
    sent = 4 * PER_CONNECTION
    await totals_reach(service.url, {COUNT: sent})

    started = [r for r in service.log_records() if r["message"].startswith("worker ")]
    victim = int(re.search(r"pid (\d+)", started[0]["message"]).group(1))  # type: ignore[union-attr]
    # A graceful exit writes its last counts; the supervisor folds them into the total.
    os.kill(victim, signal.SIGTERM)
    await totals_reach(service.url, {"callscreen_worker_restarts_total": 1, COUNT: sent})

    async def replaced() -> bool:
        lines: list[str] = [r["message"] for r in service.log_records()]
        return sum(m.startswith("worker 0 started") for m in lines) == 2

    await wait_for(replaced, timeout_s=10.0)
    await service.ready(listeners=3)
    results += await asyncio.gather(*(send_calls(service.url, c) for c in range(4, 8)))
    sent += 4 * PER_CONNECTION
    rejected = sum(sum(r) for r in results)
    await totals_reach(service.url, {COUNT: sent, REJECTED: rejected})

    service.signal(signal.SIGTERM)
    assert await service.exited() == 0


async def test_port_in_use_fails_fast(service: ServiceProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", service.port))
        taken.listen()
        service.start()
        assert await service.exited() == 1
    assert any("cannot listen on" in r["message"] for r in service.log_records())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_stop_when_the_supervisor_is_killed(
    service: ServiceProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    service.start()
    await service.ready()
    # A second service on the same port would share it silently: it refuses to start.
    second = ServiceProcess(tmp_path / "second", redis_server.url, workers=2, port=service.port)
    second.start()
    assert await second.exited() == 1
    assert "cannot listen on" in second.log_text()
    started = [r["message"] for r in service.log_records() if r["message"].startswith("worker ")]
    workers = [int(m.rsplit("pid ", 1)[1].rstrip(")")) for m in started]
    assert len(workers) == 2

    service.signal(signal.SIGKILL)  # no chance to stop its workers

    async def all_gone() -> bool:
        return not any(alive(pid) for pid in workers)

    await wait_for(all_gone, timeout_s=15.0)
    stopped = [r for r in service.log_records() if r["message"].startswith("supervisor")]
    assert len(stopped) == 2  # each noticed and stopped gracefully
