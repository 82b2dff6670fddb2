"""SIGHUP re-reads config.yaml while calls keep coming (real supervisor, workers, Redis)."""

from __future__ import annotations

import copy
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess, free_port
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.load import Load
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape

#: The issue's load level: 2,000 calls a second in all over keep-alive connections.
RATE_PER_S = 2000.0
CONNECTIONS = 64
#: A run that achieved less did not test the issue's case (a load level, not a speed).
MIN_RATE_PER_S = 1800.0
#: After a SIGHUP that changes only the policy, every answer must be the new one by then.
SWITCH_S = 2.0
ALLOW: list[Any] = []
RELOADS = 'callscreen_config_reload_total{{outcome="{}"}}'
TOKEN = "reload-test-token-0123456789"
#: Calls from a blocked caller: REJECT under the old policy, ALLOW under WATCH_ONLY.
BLOCKED_CALL = orjson.dumps(body_from("15162065613"))


def paced(service: ServiceProcess) -> Load:
    """The issue's paced keep-alive load on ``service``, started."""
    load = Load(service.url, [BLOCKED_CALL], rate_per_s=RATE_PER_S, connections=CONNECTIONS)
    load.start()
    return load


async def under_load(service: ServiceProcess, redis: Redis) -> Load:
    """The blocked caller listed, ``service`` started and answering the paced load
    for a second."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()
    load = paced(service)
    await load.answered(int(RATE_PER_S))
    return load


async def stopped(load: Load) -> None:
    """Stop the load, print what it achieved and check it was the issue's level."""
    await load.stop()
    print(load.report())
    assert load.rate() >= MIN_RATE_PER_S, load.report()


def config_with(service: ServiceProcess, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = copy.deepcopy(BLOCKLIST_CONFIG)
    config["redis"] = {"url": service.redis_url}
    config.update(changes)
    return config


def write_config(service: ServiceProcess, config: dict[str, Any]) -> None:
    """Replace the file whole (as docs/operations.md advises): never read half-written."""
    staged = service.config_path.with_suffix(".new")
    staged.write_text(yaml.safe_dump(config))
    staged.replace(service.config_path)


#: The new policy: the blocklist rule only watches (dry run): the blocked caller goes through.
WATCH_ONLY = {
    "default": {
        "rules": [
            {"name": "blocklist", "match": "caller_in_list", "list": "blocklist", "dry_run": True}
        ]
    }
}


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, redis_server.url, workers=2)
    yield process
    process.stop()


async def test_sighup_with_a_new_policy_switches_every_answer_without_a_failed_call(
    service: ServiceProcess, redis: Redis
) -> None:
    load = await under_load(service, redis)
    write_config(service, config_with(service, policies=WATCH_ONLY))
    hup_at = time.monotonic()
    service.signal(signal.SIGHUP)
    await load.answered(int(RATE_PER_S), since_s=hup_at + SWITCH_S)
    await stopped(load)

    assert load.errors == []
    assert load.statuses() == {200}
    assert REJECT in load.after(0.0)  # the old policy answered before the reload
    late = load.after(hup_at + SWITCH_S)
    assert late and all(answer == ALLOW for answer in late)
    assert service.process is not None and service.process.poll() is None
    samples = await scrape(service.url)
    assert samples[RELOADS.format("applied")] == 1


async def test_sighup_that_changes_lists_replaces_the_workers_without_a_failed_call(
    service: ServiceProcess, redis: Redis
) -> None:
    load = await under_load(service, redis)
    # A new list and the cache's refresh: no process can swap those in place.
    config = config_with(service, policies=WATCH_ONLY)
    config["lists"] = {**config["lists"], "extra": {"kind": "numbers"}}
    config["cache"] = {**config["cache"], "refresh_ms": 150}
    write_config(service, config)
    service.signal(signal.SIGHUP)

    async def applied() -> bool:
        return "config reload applied" in service.log_text()

    await wait_for(applied, timeout_s=60.0, interval_s=0.1)
    # The last old worker was told to stop: its keep-alive clients get their last
    # old answers (with Connection: close) during its drain, well under a second.
    switched_at = time.monotonic() + 1.0
    await load.answered(int(RATE_PER_S), since_s=switched_at)
    await stopped(load)

    assert load.errors == []
    assert load.statuses() == {200}
    late = load.after(switched_at)
    assert late and all(answer == ALLOW for answer in late)
    assert service.log_text().count(" listening on http") == 4  # 2 old, 2 new workers


async def test_sighup_with_an_invalid_config_keeps_the_last_good_one(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()
    bad = config_with(service, policies=WATCH_ONLY)
    bad["trunk_groups"] = {"main": {"policy": "nonexistent"}}
    write_config(service, bad)
    service.signal(signal.SIGHUP)

    async def refused() -> bool:
        return "config reload refused" in service.log_text()

    await wait_for(refused, timeout_s=10.0, interval_s=0.1)
    assert "trunk_groups.main.policy: unknown policy 'nonexistent'" in service.log_text()
    load = paced(service)
    await load.answered(int(RATE_PER_S))
    await stopped(load)
    assert load.errors == []
    assert load.after(0.0) and all(answer == REJECT for answer in load.after(0.0))

    async def counted() -> bool:
        samples = await scrape(service.url)
        return (
            samples.get(RELOADS.format("invalid")) == 1
            and samples.get("callscreen_config_reload_failed") == 1
        )

    await wait_for(counted, timeout_s=10.0, interval_s=0.2)


async def test_sighup_in_a_single_process_swaps_the_policy_in_place(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = ServiceProcess(tmp_path, redis_server.url, workers=1)
    try:
        service.start()
        await service.ready()
        bad = config_with(service, default_policy="nonexistent")
        write_config(service, bad)
        service.signal(signal.SIGHUP)

        async def refused() -> bool:
            return "config reload refused" in service.log_text()

        await wait_for(refused, timeout_s=10.0, interval_s=0.1)
        load = paced(service)
        await load.answered(int(RATE_PER_S / 2))
        write_config(service, config_with(service, policies=WATCH_ONLY))
        service.signal(signal.SIGHUP)
        hup_at = time.monotonic()
        await load.answered(int(RATE_PER_S / 2), since_s=hup_at + SWITCH_S)
        await stopped(load)
        assert load.errors == []
        assert REJECT in load.after(0.0)
        late = load.after(hup_at + SWITCH_S)
        assert late and all(answer == ALLOW for answer in late)
        samples = await scrape(service.url)
        assert samples[RELOADS.format("invalid")] == 1
        assert samples[RELOADS.format("applied")] == 1
        assert samples["callscreen_config_reload_failed"] == 0
    finally:
        service.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigusr2_moves_to_a_new_supervisor_without_a_failed_call(
    service: ServiceProcess, redis: Redis
) -> None:
    load = await under_load(service, redis)
    service.signal(signal.SIGUSR2)
    successor = 0
    try:
        status = await service.exited(timeout_s=60.0)
        exited_at = time.monotonic()
        found = re.search(r"started the new supervisor, pid (\d+)", service.log_text())
        assert found is not None
        successor = int(found.group(1))
        # Calls go on, to the new workers only.
        await load.answered(int(RATE_PER_S), since_s=exited_at)
        await stopped(load)
        assert status == 0  # the old supervisor drained its workers and stopped
        assert alive(successor)
        assert load.errors == []
        assert load.statuses() == {200}
        assert all(answer == REJECT for answer in load.after(0.0))
    finally:
        if not load.stopped_s:
            await load.stop()
        if successor and alive(successor):
            os.kill(successor, signal.SIGTERM)

            async def gone() -> bool:
                return not alive(successor)

            await wait_for(gone, timeout_s=30.0, interval_s=0.1)


async def test_post_v1_reload_needs_an_admin_token_and_says_what_it_refuses(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    admin_port = free_port()
    service = ServiceProcess(
        tmp_path,
        redis_server.url,
        workers=2,
        overrides={"server": {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port}},
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    reload_url = f"http://127.0.0.1:{admin_port}/v1/reload"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    server = {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port}
    try:
        service.start()
        await service.ready()
        async with aiohttp.ClientSession() as session:
            async with session.post(reload_url) as response:
                assert response.status == 401
            write_config(service, config_with(service, server=server, default_policy="nope"))
            async with session.post(reload_url, headers=admin) as response:
                assert response.status == 422
                refused = await response.json()
            assert any("default_policy: unknown policy 'nope'" in p for p in refused["problems"])

            async def counted() -> bool:  # the supervisor re-read the file too, and refused
                return "config reload refused" in service.log_text()

            # Before the file changes again: the supervisor reads the file when it gets to
            # the signal, and would count the next file instead.
            await wait_for(counted, timeout_s=10.0, interval_s=0.1)
            write_config(service, config_with(service, server=server, policies=WATCH_ONLY))
            async with session.post(reload_url, headers=admin) as response:
                assert response.status == 202

            async def switched() -> bool:
                answers = []
                for _ in range(6):  # both workers
                    body = body_from("15162065613")
                    async with session.post(f"{service.url}/tg/main", json=body) as response:
                        answers.append(await response.json())
                return all(answer == ALLOW for answer in answers)

            await wait_for(switched, timeout_s=5.0, interval_s=0.1)
        samples = await scrape(f"http://127.0.0.1:{admin_port}")
        assert samples[RELOADS.format("invalid")] == 1
        assert samples[RELOADS.format("applied")] == 1
    finally:
        service.stop()


async def test_sighup_rereads_the_admin_tokens_file(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """A token withdrawn from ``admin.tokens_file`` stops working at the next SIGHUP,
    and a new one starts, although config.yaml did not change."""
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"noc:admin:{old}\n")
    service = ServiceProcess(
        tmp_path / "svc",
        redis_server.url,
        workers=1,
        overrides={"admin": {"tokens_file": str(tokens)}},
    )
    lists_url = f"{service.url}/v1/lists"
    try:
        service.start()
        await service.ready()
        async with aiohttp.ClientSession() as session:

            async def status(token: str) -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(lists_url, headers=headers) as response:
                    return response.status

            assert (await status(old), await status(new)) == (200, 403)
            staged = tokens.with_suffix(".new")
            staged.write_text(f"noc:admin:{new}\n")
            staged.replace(tokens)
            service.signal(signal.SIGHUP)

            async def swapped() -> bool:
                return (await status(old), await status(new)) == (403, 200)

            await wait_for(swapped, timeout_s=10.0, interval_s=0.1)
    finally:
        service.stop()
