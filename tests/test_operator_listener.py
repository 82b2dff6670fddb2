"""The operator listener: admin API, explain and /metrics apart from the handler port.

By default (``server.admin_port: 9180`` on loopback) CarrierX's port serves screening and
the probes only; the operator routes answer 404 there and work on their own port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess, free_port
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape

TOKEN = "operator-test-token-0123456789"


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def service(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisProcess
) -> Iterator[ServiceProcess]:
    admin_port = free_port()
    process = ServiceProcess(
        tmp_path,
        redis_server.url,
        workers=request.param,
        overrides={"server": {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port}},
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    process.admin_url = f"http://127.0.0.1:{admin_port}"  # type: ignore[attr-defined]
    yield process
    process.stop()


async def test_operator_routes_live_on_their_own_port(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()
    admin: str = service.admin_url  # type: ignore[attr-defined]
    body = orjson.dumps(body_from("15162065613"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{service.url}/tg/main", data=body) as response:
            assert await response.json() == REJECT
        for method, path in (
            ("GET", "/metrics"),
            ("GET", "/v1/lists"),
            ("POST", "/v1/explain"),
            ("GET", "/v1/openapi.json"),
        ):
            async with session.request(
                method, f"{service.url}{path}", data=body, headers=headers
            ) as response:
                assert response.status == 404, path
        async with session.post(f"{admin}/v1/explain", data=body, headers=headers) as response:
            assert (await response.json())["decision"] == "reject"
        async with session.get(f"{admin}/v1/lists/blocklist", headers=headers) as response:
            assert (await response.json())["loaded"]["entries"] == 1
        async with session.get(f"{admin}/readyz") as response:
            assert response.status == 200
    rejected = 'callscreen_decisions_total{decision="reject",dry_run="false",rule="blocklist",trunk_group="main"}'

    async def counted() -> bool:  # other workers' counts arrive within a second
        return (await scrape(admin))[rejected] == 1

    await wait_for(counted, timeout_s=5.0)


async def test_handler_port_readyz_says_only_ready_or_not(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()
    admin: str = service.admin_url  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{service.url}/readyz") as response:
            assert (response.status, await response.read()) == (200, b'{"ready":true}')
        async with session.get(f"{admin}/readyz") as response:
            assert "blocklist" in (await response.json())["lists"]
        await redis.flushall()  # the list is lost: not ready

        reasons: list[str] = []
        brief: list[tuple[int, bytes]] = []

        async def not_ready() -> bool:  # each worker notices within a poll or two
            async with session.get(f"{admin}/readyz") as response:
                reasons[:] = (await response.json())["reasons"]
            async with session.get(f"{service.url}/readyz") as response:
                brief[:] = [(response.status, await response.read())]
            return bool(reasons) and brief[0][0] == 503

        await wait_for(not_ready, timeout_s=10.0, interval_s=0.1)
        assert any("blocklist" in reason for reason in reasons)
        assert brief == [(503, b'{"ready":false}')]
