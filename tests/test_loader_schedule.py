"""``loader run``: lists synced on their intervals, a failing source not stopping the others,
the loader's own /metrics, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from loader.metrics import LoaderMetrics
from loader.schedule import Scheduler, bound_port, scheduled_lists, serve_metrics
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def broken_source() -> AsyncIterator[str]:
    """A URL that always answers 500."""

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/list.csv", fail)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/list.csv"))
    await server.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{wanted}}} not exported"
    return float(match.group(1))


async def test_a_failing_source_is_counted_and_retried_without_stopping_the_others(
    redis: Redis,
    make_config: Callable[..., Config],
    broken_source: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "good.txt").write_text("5162065613\n5162065614\nbad\n")
    config = make_config(
        {
            "loader": {"retry_backoff_s": 0.01},
            "lists": {
                "good": {"source": "good.txt", "interval_s": 1, "max_rejected_share": 0.5},
                "broken": {"source": broken_source, "interval_s": 1, "retries": 0},
                # No interval: not scheduled (the healer may still load it once, as absent).
                "manual": {"source": "good.txt"},
                "admin-only": {},
            },
        },
        base_dir=tmp_path,
    )
    assert scheduled_lists(config) == {"good": 1, "broken": 1}
    registry = CollectorRegistry()
    metrics = LoaderMetrics(registry, scheduled_lists(config))
    runner = await serve_metrics(registry, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/metrics"
    stop = asyncio.Event()
    scheduler = Scheduler(redis, config, metrics, progress="off")
    running = asyncio.create_task(scheduler.run(stop))
    try:
        async with aiohttp.ClientSession() as http:

            async def scrape() -> str:
                async with http.get(url) as response:
                    assert response.status == 200
                    return await response.text()

            before = await scrape()
            # Every series exists from the first scrape, at zero.
            for name in ("good", "broken"):
                for outcome in ("success", "unchanged", "failed", "refused"):
                    assert (
                        sample(before, "callscreen_loader_syncs_total", list=name, outcome=outcome)
                        >= 0
                    )
            assert (
                sample(before, "callscreen_loader_syncs_total", list="broken", outcome="refused")
                == 0
            )

            async def two_rounds() -> bool:
                text = await scrape()
                good = sample(text, "callscreen_loader_syncs_total", list="good", outcome="success")
                good += sample(
                    text, "callscreen_loader_syncs_total", list="good", outcome="unchanged"
                )
                bad = sample(text, "callscreen_loader_syncs_total", list="broken", outcome="failed")
                return good >= 2 and bad >= 2

            await wait_for(two_rounds, timeout_s=10)
            text = await scrape()
    finally:
        stop.set()
        await running
        await runner.cleanup()

    assert sample(text, "callscreen_loader_rows_read_total", list="good") >= 6
    assert sample(text, "callscreen_loader_rows_rejected_total", list="good") >= 2
    assert sample(text, "callscreen_loader_list_entries", list="good") == 2
    assert sample(text, "callscreen_loader_last_success_timestamp_seconds", list="good") > 0
    assert sample(text, "callscreen_loader_last_success_timestamp_seconds", list="broken") == 0
    assert sample(text, "callscreen_loader_sync_duration_seconds_count", list="good") >= 2
    assert "callscreen_loader_sync_duration_seconds_bucket" in text
    assert 'list="manual"' not in text
    store = ListStore(redis)
    assert await store.contains("good", "numbers", "15162065613")


async def test_loader_run_serves_metrics_and_stops_cleanly_on_sigterm(
    redis: Redis, redis_server: RedisProcess, tmp_path: Path
) -> None:
    (tmp_path / "good.txt").write_text("5162065613\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "redis": {"url": redis_server.url},
                "loader": {"metrics_port": 0},
                "lists": {"good": {"source": "good.txt", "interval_s": 3600}},
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loader", "--config", str(config_file), "run",
        cwd=ROOT, env=os.environ.copy(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    log = ""
    try:
        async with asyncio.timeout(60):
            while "synced good" not in log:
                line = await process.stderr.readline()
                assert line, f"loader exited early:\n{log}"
                log += line.decode()
        port = re.search(r"serving loader metrics on http://127.0.0.1:(\d+)/metrics", log)
        assert port, log
        metrics_url = f"http://127.0.0.1:{port.group(1)}/metrics"
        async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
            text = await response.text()
        assert sample(text, "callscreen_loader_syncs_total", list="good", outcome="success") == 1
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            rest = await process.stderr.read()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "stopping" in rest.decode()
    assert await ListStore(redis).contains("good", "numbers", "15162065613")
