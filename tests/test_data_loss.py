"""Redis loses a list's data (FLUSHALL, restart without persistence, failover to a lagging
replica): the service stops answering from it until a sync or ``loader accept`` restores it.

Each test runs a real ``python -m service``; ``on_error`` rejects with its own operands,
so an answer by ``on_error`` is told apart from one by the blocklist.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from core import keys
from core.config import CacheSettings
from core.store import ListStore
from devtools.redis_server import RedisProcess
from service.screening.cache import ListCache
from service.screening.lists import NumberList, PrefixList
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import START_TIMEOUT_S, ServiceProcess, scrape

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "data-loss-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LISTED = "15162065613"
UNLISTED = "15162065600"
#: A caller put on ``vip`` to learn that the service polled after an earlier write.
CANARY = "15162065677"
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-lost"]}]
LIST_LOST = 'callscreen_on_error_total{reason="list_lost"}'
NOT_LOADED = 'callscreen_on_error_total{reason="list_not_loaded"}'


def overrides(blocklist: dict[str, Any] | None = None) -> dict[str, Any]:
    """``vip`` (allow) is asked first, so its callers are answered even while the
    blocklist is distrusted: a canary showing the service polled."""
    return {
        "handler": {"on_error": "reject", "on_error_operands": ["unavailable", "redis-lost"]},
        "lists": {"blocklist": blocklist or {"kind": "numbers"}, "vip": {"kind": "numbers"}},
        "policies": {
            "default": {
                "rules": [
                    {"name": "vip", "match": "caller_in_list", "list": "vip", "action": "allow"},
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                ]
            }
        },
    }


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        tmp_path / "service",
        redis_server.url,
        overrides=overrides(),
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    yield process
    process.stop()


async def answer(service: ServiceProcess, caller: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.url}/tg/main", json=body_from(caller)) as response,
    ):
        assert response.status == 200
        return await response.json()


async def readyz(service: ServiceProcess) -> tuple[int, list[str]]:
    async with aiohttp.ClientSession() as session, session.get(f"{service.url}/readyz") as got:
        return got.status, (await got.json())["reasons"]


async def admin_put(service: ServiceProcess, name: str, entry: str) -> None:
    url = f"{service.url}/v1/lists/{name}/entries/{entry}"
    async with aiohttp.ClientSession() as session, session.put(url, headers=AUTH) as response:
        assert response.status == 200, await response.text()


async def answers_become(service: ServiceProcess, expected: dict[str, Any]) -> None:
    """Wait until each caller in ``expected`` gets its answer."""

    async def all_match() -> bool:
        return all([await answer(service, c) == a for c, a in expected.items()])

    await wait_for(all_match, timeout_s=10)


async def polled_after_a_write(service: ServiceProcess, redis: Redis) -> None:
    """Return once the service has polled Redis after earlier writes (the canary shows it)."""
    await ListStore(redis).change("vip", "numbers", add=[CANARY])
    await answers_become(service, {CANARY: []})


async def counted(service: ServiceProcess, sample: str) -> float:
    return (await scrape(service.url)).get(sample, 0.0)


async def counter_grows(service: ServiceProcess, sample: str, above: float) -> float:
    """Wait until ``sample`` exceeds ``above`` (a call is made between looks); its value."""

    async def grown() -> bool:
        await answer(service, UNLISTED)
        return await counted(service, sample) > above

    await wait_for(grown, timeout_s=10)
    return await counted(service, sample)


async def normal_answers(service: ServiceProcess) -> None:
    await answers_become(service, {LISTED: REJECT, UNLISTED: []})


async def test_flushall_answers_by_on_error_until_a_full_sync(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED])
    service.start()
    await service.ready()
    assert await answer(service, LISTED) == REJECT
    assert await answer(service, UNLISTED) == []

    await redis.flushall()
    await answers_become(service, {LISTED: ON_ERROR, UNLISTED: ON_ERROR})
    status, reasons = await readyz(service)
    assert status == 503
    assert any("'blocklist' lost from Redis" in r and "meta hash is gone" in r for r in reasons)
    lost = await counter_grows(service, LIST_LOST, 0)
    await counter_grows(service, LIST_LOST, lost)

    # A single entry written after the loss would make a one-entry list look whole.
    await admin_put(service, "blocklist", LISTED)
    await polled_after_a_write(service, redis)
    assert await answer(service, UNLISTED) == ON_ERROR
    assert (await readyz(service))[0] == 503

    await load_list(redis, "blocklist", "numbers", [LISTED])  # a real build and commit
    await normal_answers(service)
    assert (await readyz(service))[0] == 200


async def test_a_version_going_back_is_a_loss(service: ServiceProcess, redis: Redis) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED])
    await ListStore(redis).change("blocklist", "numbers", add=[UNLISTED])
    service.start()
    await service.ready()
    await answers_become(service, {LISTED: REJECT, UNLISTED: REJECT})  # version 2 in use

    # What a failover to a replica that missed the last write looks like.
    await redis.hset(keys.meta("blocklist"), "version", 1)
    await answers_become(service, {LISTED: ON_ERROR, "15162065601": ON_ERROR})
    status, reasons = await readyz(service)
    assert status == 503
    assert any("version went back from 2 to 1" in r for r in reasons), reasons
    await counter_grows(service, LIST_LOST, 0)

    await load_list(redis, "blocklist", "numbers", [LISTED])
    await normal_answers(service)
    assert (await readyz(service))[0] == 200


def run_loader(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", "--config", str(service.config_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_loader_accept_restores_a_list_without_source(
    service: ServiceProcess, redis: Redis
) -> None:
    store = ListStore(redis)
    await store.change("blocklist", "numbers", add=[LISTED])  # kept by the admin API only
    service.start()
    await service.ready()
    await normal_answers(service)

    await redis.flushall()
    await answers_become(service, {LISTED: ON_ERROR, UNLISTED: ON_ERROR})
    absent = await asyncio.to_thread(run_loader, service, "accept", "--list", "blocklist")
    assert absent.returncode == 1, absent.stderr
    assert "blocklist: not in Redis" in absent.stderr
    assert await redis.hgetall(keys.meta("blocklist")) == {}  # nothing written
    unknown = await asyncio.to_thread(run_loader, service, "accept", "--list", "nope")
    assert unknown.returncode == 2 and "unknown list 'nope'" in unknown.stderr
    usage = await asyncio.to_thread(run_loader, service, "accept")
    assert usage.returncode == 2

    await store.change("blocklist", "numbers", add=[LISTED])  # the operator puts it back
    await polled_after_a_write(service, redis)
    assert await answer(service, LISTED) == ON_ERROR
    assert (await readyz(service))[0] == 503
    accepted = await asyncio.to_thread(run_loader, service, "accept", "--list", "blocklist")
    assert accepted.returncode == 0, accepted.stderr
    assert "blocklist: accepted" in accepted.stderr

    await normal_answers(service)
    assert (await readyz(service))[0] == 200


async def test_a_worker_starting_before_its_sourced_list_was_synced_answers_by_on_error(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    folder = tmp_path / "service"
    folder.mkdir()
    (folder / "blocklist.csv").write_text(f"number\n{LISTED}\n")
    sourced = {"kind": "numbers", "source": "blocklist.csv", "column": "number"}
    service = ServiceProcess(folder, redis_server.url, overrides=overrides(sourced))
    service.start()
    try:

        async def answering() -> bool:
            if service.process is not None and service.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{service.log_text()}")
            try:
                return (await readyz(service))[0] == 503
            except aiohttp.ClientError:
                return False

        await wait_for(answering, timeout_s=START_TIMEOUT_S, interval_s=0.1)
        assert await answer(service, UNLISTED) == ON_ERROR
        assert await answer(service, LISTED) == ON_ERROR
        status, reasons = await readyz(service)
        assert status == 503
        assert reasons == ["lists never synced from their source: blocklist"]
        await counter_grows(service, NOT_LOADED, 0)
        assert await counted(service, LIST_LOST) == 0

        # Admin writes alone do not make a sourced list whole either.
        await ListStore(redis).change("blocklist", "numbers", add=[LISTED])
        await load_list(redis, "vip", "numbers", [CANARY])
        await answers_become(service, {CANARY: []})
        assert await answer(service, UNLISTED) == ON_ERROR

        await load_list(redis, "blocklist", "numbers", [LISTED])
        await normal_answers(service)
        assert (await readyz(service))[0] == 200
    finally:
        service.stop()


async def test_a_list_flushed_and_synced_again_between_two_polls_is_read_whole(
    redis: Redis,
) -> None:
    """Back at the very gen and version of the copy in use: only the stamp tells."""
    store = ListStore(redis)
    cache = ListCache(store, {"premium": "prefixes", "blocklist": "numbers"}, CacheSettings())
    await load_list(redis, "premium", "prefixes", ["1900"])
    await load_list(redis, "blocklist", "numbers", [LISTED])
    await cache.load_all()
    before = dict(cache.loaded)
    # Sync stamps have millisecond resolution: the next sync must get a later one.
    synced_ms = int(time.time() * 1000)

    async def later() -> bool:
        return int(time.time() * 1000) > synced_ms

    await wait_for(later, timeout_s=1.0)
    await redis.flushall()
    await load_list(redis, "premium", "prefixes", ["1976"])
    await load_list(redis, "blocklist", "numbers", [UNLISTED])
    after = await store.states(["premium", "blocklist"])
    for name, state in after.items():
        assert (state.gen, state.version) == (before[name].gen, before[name].version)

    await cache.load_all()
    assert cache.distrusted == {}
    premium, blocklist = cache.lists["premium"], cache.lists["blocklist"]
    assert isinstance(premium, PrefixList) and isinstance(blocklist, NumberList)
    assert premium.match("19765550123") == "1976" and premium.match("19005550123") is None
    assert int(UNLISTED) in blocklist and int(LISTED) not in blocklist
