"""Self-healing: ``loader run`` notices a list Redis lost and loads it again within
seconds, from its source or (a list without one) from its latest snapshot; it alerts
(``callscreen_loader_list_unhealed``) only when it cannot heal."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess, free_port
from loader.heal import Healer, Snapshots, _lost_buckets
from loader.metrics import LoaderMetrics
from loader.schedule import Scheduler
from tests.helpers import REJECT, body_from, wait_for
from tests.procs import START_TIMEOUT_S, ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "self-heal-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LISTED = "15162065613"
MANUAL = "15162065688"
UNLISTED = "15162065600"
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-lost"]}]


def overrides(port: int) -> dict[str, Any]:
    return {
        "handler": {"on_error": "reject", "on_error_operands": ["unavailable", "redis-lost"]},
        "loader": {
            "metrics_port": port,
            "health_check_s": 0.5,
            "snapshot_dir": "snapshots",
            "snapshot_interval_s": 1,
        },
        "lists": {
            # an hour between syncs, as in compose: only the healer can be this quick
            "blocklist": {"kind": "numbers", "source": "blocklist.txt", "interval_s": 3600},
            "manual": {"kind": "numbers"},
        },
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    {"name": "manual", "match": "caller_in_list", "list": "manual"},
                ]
            }
        },
    }


@pytest.fixture
def processes(tmp_path: Path, redis_server: RedisProcess) -> Iterator[tuple[ServiceProcess, Any]]:
    folder = tmp_path / "service"
    folder.mkdir()
    (folder / "blocklist.txt").write_text(f"{LISTED}\n5162065614\n")
    service = ServiceProcess(
        folder,
        redis_server.url,
        overrides=overrides(free_port()),
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    loader: dict[str, subprocess.Popen[bytes]] = {}

    def start_loader() -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "loader", "--config", str(service.config_path)]
        with (folder / "loader.log").open("wb") as log:
            loader["run"] = subprocess.Popen(
                [*argv, "--progress", "off", "run"], cwd=ROOT, stdout=log, stderr=log
            )
        return loader["run"]

    yield service, start_loader
    service.stop()
    if "run" in loader and loader["run"].poll() is None:
        loader["run"].terminate()
        try:
            loader["run"].wait(timeout=20)
        except subprocess.TimeoutExpired:
            loader["run"].kill()
            loader["run"].wait()


async def answer(service: ServiceProcess, caller: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.url}/tg/main", json=body_from(caller)) as response,
    ):
        assert response.status == 200
        return await response.json()


async def answers_become(
    service: ServiceProcess, expected: dict[str, Any], timeout_s: float = 10
) -> None:
    async def all_match() -> bool:
        return all([await answer(service, c) == a for c, a in expected.items()])

    await wait_for(all_match, timeout_s=timeout_s, interval_s=0.05)


async def test_flushall_under_loader_run_heals_within_10_s(
    processes: tuple[ServiceProcess, Any], redis: Redis
) -> None:
    service, start_loader = processes
    service.start()
    start_loader()
    await service.ready()
    folder = service.folder
    # the loader's first sync (at start) and an admin entry on the list without a source
    await answers_become(service, {LISTED: REJECT, UNLISTED: []}, timeout_s=START_TIMEOUT_S)
    url = f"{service.url}/v1/lists/manual/entries/{MANUAL}"
    async with aiohttp.ClientSession() as session, session.put(url, headers=AUTH) as response:
        assert response.status == 200
    await answers_become(service, {MANUAL: REJECT})
    snapshot = folder / "snapshots" / "manual.csv"

    async def snapshotted() -> bool:
        return snapshot.exists() and f"+{MANUAL}" in snapshot.read_text()

    await wait_for(snapshotted, timeout_s=15)

    await redis.flushall()
    lost_at = time.monotonic()

    async def healed() -> bool:
        log = (folder / "loader.log").read_text()
        return "blocklist: healed from its source" in log and "manual: healed from" in log

    # The loader heals both lists (the one without a source from its snapshot) and the
    # service answers from them again: all within 10 s.
    await wait_for(healed, timeout_s=10)
    await answers_become(service, {LISTED: REJECT, MANUAL: REJECT, UNLISTED: []}, timeout_s=10)
    healed_s = time.monotonic() - lost_at
    print(f"answered from the lists again {healed_s:.2f} s after FLUSHALL")
    assert healed_s < 10
    log = (folder / "loader.log").read_text()
    assert "blocklist: lost from Redis (its meta hash is gone" in log


async def test_what_the_healer_notices_and_what_it_cannot_heal(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    (tmp_path / "personal.csv").write_text("19512623062,1900*\n19512623063,15162065613\n")
    (tmp_path / "blocklist.txt").write_text(f"{LISTED}\n")
    data = {
        # a roomy lock: two shared cores under load can starve a sync past 30 s
        "loader": {"snapshot_dir": "snaps", "lock_ttl_s": 300},
        "lists": {
            "blocklist": {"source": "blocklist.txt"},
            "personal": {"kind": "subscribers", "source": "personal.csv"},
            "manual": {"kind": "numbers"},
            "orphan": {"kind": "numbers"},
        },
    }
    config = make_config(data, base_dir=tmp_path)
    registry = CollectorRegistry()
    metrics = LoaderMetrics(registry, [], config.lists)
    scheduler = Scheduler(redis, config, metrics, progress="off")
    healer = Healer(redis, config, metrics, scheduler.heal_sync)
    store = ListStore(redis)

    # never loaded: the lists with a source are synced at once
    assert sorted(await healer.check()) == ["blocklist", "personal"]
    await store.change("manual", "numbers", add=[MANUAL])
    await store.change("orphan", "numbers", add=[MANUAL])
    assert await healer.check() == []
    await Snapshots(redis, config, healer).write_all()
    assert (tmp_path / "snaps" / "manual.csv").exists()
    (tmp_path / "snaps" / "orphan.csv").unlink()  # as if never written

    # a lost bucket marker, a lost base, a version gone back
    gen = (await store.states(["personal"]))["personal"].gen
    await redis.delete(keys.subscribers("personal", keys.subscriber_bucket_of("19512623062"), gen))
    blocklist_gen = (await store.states(["blocklist"]))["blocklist"].gen
    await redis.delete(keys.base("blocklist", blocklist_gen))
    await redis.hincrby(keys.meta("manual"), "version", -1)
    assert sorted(await healer.check()) == ["blocklist", "manual", "personal"]
    assert await store.contains("blocklist", "numbers", LISTED)
    assert await store.contains("manual", "numbers", MANUAL)
    new_gen = (await store.states(["personal"]))["personal"].gen
    assert new_gen != gen
    assert await _lost_buckets(redis, "personal", new_gen) == 0
    assert await healer.check() == []

    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    assert sample("callscreen_loader_list_unhealed", list="orphan") == 0
    # nothing to heal a list without a source from: alert, and say how to restore
    await redis.delete(keys.meta("orphan"))
    assert await healer.check() == []
    assert sample("callscreen_loader_list_unhealed", list="orphan") == 1
    assert sample("callscreen_loader_heals_total", list="orphan", outcome="failed") == 1
    assert sample("callscreen_loader_heals_total", list="manual", outcome="healed") == 1
    # a heal the guards refuse is not forced: it alerts too
    await redis.delete(keys.meta("orphan"))
    (tmp_path / "blocklist.txt").write_text("junk\nmore junk\n")
    await redis.flushall()
    healer.health["blocklist"].retry_at = 0
    await healer.check()
    assert sample("callscreen_loader_list_unhealed", list="blocklist") == 1
