"""A hostile CNAM pattern cannot freeze a worker: a real service process, real Redis.

``re:(a+)+$`` against forty a's and a "!" takes a backtracking engine about 2^40 steps;
with RE2 the call is answered at once. Every request carries a client timeout, so a
frozen worker fails the test instead of hanging it. One worker: the admin API and the
calls then reach the same process, whose ``loaded.version`` says it has the entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import ServiceProcess

TOKEN = "redos-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = "re:(a+)+$"
NAMES_CONFIG: dict[str, Any] = {
    "lists": {"spam-names": {"kind": "names"}},
    "policies": {
        "default": {
            "rules": [
                {"name": "spam-names", "match": "caller_name_matches_list", "list": "spam-names"}
            ]
        }
    },
}
#: Far above a normal answer, far below "frozen": a hang becomes a failure.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=5)


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        tmp_path,
        redis_server.url,
        overrides=NAMES_CONFIG,
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    yield process
    process.stop()


def entry_url(service: ServiceProcess, entry: str) -> str:
    return f"{service.url}/v1/lists/spam-names/entries/{quote(entry, safe='')}"


async def screen(session: aiohttp.ClientSession, service: ServiceProcess, name: str) -> Any:
    async with session.post(f"{service.url}/tg/main", json=body_from(name=name)) as response:
        assert response.status == 200
        return await response.json()


async def test_a_catastrophic_pattern_added_live_does_not_stall_the_worker(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "spam-names", "names", ["Spam Likely"])
    service.start()
    await service.ready()

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        async with session.put(entry_url(service, HOSTILE), headers=AUTH) as response:
            assert response.status == 200, await response.text()
            added = await response.json()
        assert added["entry"] == HOSTILE

        async def sees_it() -> bool:
            url = f"{service.url}/v1/lists/spam-names"
            async with session.get(url, headers=AUTH) as response:
                loaded = (await response.json())["loaded"]
            return loaded is not None and loaded["version"] >= added["version"]

        await wait_for(sees_it, timeout_s=10.0, interval_s=0.05)

        assert await screen(session, service, "a" * 40 + "!") == []
        async with session.get(f"{service.url}/healthz") as response:
            assert response.status == 200
        assert await screen(session, service, "aaaa") == REJECT
        assert await screen(session, service, "SPAM LIKELY") == REJECT
        assert await screen(session, service, "John Smith") == []


async def test_the_admin_api_refuses_a_pattern_re2_cannot_run(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "spam-names", "names", ["Spam Likely"])
    service.start()
    await service.ready()

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        async with session.put(entry_url(service, r"re:(a)\1"), headers=AUTH) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert "RE2 does not support backreferences or lookaround" in error
        assert r"'(a)\\1'" in error  # the pattern, as repr() shows it

        async with session.get(entry_url(service, r"re:(a)\1"), headers=AUTH) as response:
            assert response.status == 400  # checking it is refused the same way
