"""The fraud rules as deployed: their config checks, a Redis Cluster, and a flood split
over two service processes of two workers each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from core import keys
from core.config import Config, ConfigError, parse_config
from devtools.redis_server import LocalCluster, RedisProcess
from tests.helpers import load_list, wait_for
from tests.procs import ServiceProcess, scrape
from tests.test_fraud import FLOOD, WAR_DIAL, call, flood, policy, war_dial


def rules_config(*rules: dict[str, Any]) -> dict[str, Any]:
    return policy(*rules)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"name": "r", "match": "call_rate", "limit": 1, "window_s": 1, "key": "callee"},
         "Input should be 'caller', 'called'"),
        ({"name": "r", "match": "call_rate", "limit": 1, "window_s": 1, "key": "caller_prefix"},
         "'prefix_digits' goes with key 'caller_prefix'"),
        ({"name": "r", "match": "call_rate", "limit": 1, "window_s": 1, "prefix_digits": 4},
         "'prefix_digits' goes with key 'caller_prefix'"),
        ({"name": "r", "match": "sequential_dialing"}, "needs 'window_s'"),
        ({"name": "r", "match": "sequential_dialing", "window_s": 60, "limit": 3},
         "'limit' belongs to match 'call_rate' only"),
        ({"name": "r", "match": "sequential_dialing", "window_s": 60, "run_length": 9,
          "track": 8}, "'track' must be at least 'run_length'"),
        ({"name": "r", "match": "sequential_dialing", "window_s": 60, "track": 500},
         "less than or equal to 128"),
        ({"name": "r", "match": "anonymous", "digits": 4}, "match 'anonymous' takes no 'digits'"),
        ({"name": "r", "match": "neighbour_spoofing", "window_s": 5},
         "match 'neighbour_spoofing' takes no 'window_s'"),
        ({"name": "r", "match": "call_rate", "limit": 1, "window_s": 1, "unless_list": "x"},
         "match 'call_rate' takes no 'unless_list'"),
    ],
)  # fmt: skip
def test_bad_fraud_rules_are_refused_with_their_key_path(
    rule: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(rules_config(rule), source="c.yaml")
    assert "c.yaml: policies.default.rules[0]" in str(raised.value)
    assert problem in str(raised.value)


@pytest.mark.parametrize(
    ("unless", "problem"),
    [("nope", "unknown list 'nope'"), ("prefixes", "list 'prefixes' is 'prefixes'")],
)
def test_neighbour_allow_list_must_be_a_numbers_list(unless: str, problem: str) -> None:
    data = rules_config({"name": "n", "match": "neighbour_spoofing", "unless_list": unless})
    data["lists"]["prefixes"] = {"kind": "prefixes"}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, source="c.yaml")
    assert f"c.yaml: policies.default.rules[0].unless_list: {problem}" in str(raised.value)


async def test_fraud_rules_on_a_cluster(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    for name in ("blocklist", "neighbours-ok"):
        await load_list(cluster_redis, name, "numbers", [])
    data = policy(war_dial(run_length=3), flood("caller", limit=3), flood("called", limit=2))
    data["redis"] = {"url": cluster.url}
    client: TestClient[Any, Any] = await make_client(make_config(data))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready)

    async def answer(body: dict[str, Any]) -> Any:
        response = await client.post("/tg/main", json=body)
        assert response.status == 200
        return await response.json()

    # Two callers walk numbers; the called-number and caller counters and the dialled
    # sets of each call live on different slots, read in one pipelined call.
    assert await answer(call("12125550100", "15162060100")) == []
    assert await answer(call("13125550100", "15162060100")) == []
    assert await answer(call("14155550100", "15162060100")) == FLOOD  # third to the DID
    assert await answer(call("12125550100", "15162060101")) == []
    assert await answer(call("13125550100", "15162060102")) == []
    assert await answer(call("12125550100", "15162060099")) == WAR_DIAL  # 099, 100, 101
    assert await answer(call("12125550100", "15162069000")) == FLOOD  # its 4th call
    written = [
        k.decode() if isinstance(k, bytes) else k
        for pattern in ("{cs:rate:*", "{cs:seq:*")
        for k in await cluster_redis.keys(pattern, target_nodes=RedisCluster.ALL_NODES)
    ]
    assert keys.dialed("12125550100", "default:war-dial") in written
    assert len({cluster_redis.keyslot(k) for k in written}) >= 3
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="redis_error"} 0.0' in metrics


@pytest.fixture
def services(tmp_path: Path, redis_server: RedisProcess) -> Iterator[list[ServiceProcess]]:
    overrides = policy(flood("called", limit=10))
    started = [
        ServiceProcess(tmp_path / f"host-{i}", redis_server.url, workers=2, overrides=overrides)
        for i in range(2)
    ]
    yield started
    for service in started:
        service.stop()


async def test_a_flood_split_over_two_hosts_of_two_workers_is_capped_once(
    services: list[ServiceProcess], redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", [])
    await load_list(redis, "neighbours-ok", "numbers", [])
    for service in services:
        service.start()
    await asyncio.gather(*(service.ready() for service in services))

    async def send(connection: int) -> list[bool]:
        url = services[connection % 2].url
        rejected = []
        # A connection of its own per sender: the kernel spreads them over the workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for i in range(5):
                body = call(f"1212555{connection:02d}{i:02d}", "15162061000")
                async with session.post(f"{url}/tg/main", json=body) as response:
                    answer = await response.json()
                assert answer in ([], FLOOD)
                rejected.append(answer == FLOOD)
        return rejected

    results = await asyncio.gather(*(send(c) for c in range(12)))
    rejected = sum(sum(r) for r in results)
    # 60 calls from 60 callers to one DID, over 4 processes: exactly 10 got through.
    assert rejected == 60 - 10
    key = 'callscreen_decisions_total{decision="reject",dry_run="false",rule="flood-called",trunk_group="main"}'
    per_host: list[float] = []

    async def counted() -> bool:
        # A host's /metrics adds its other worker's counts from a snapshot at most
        # service.procs.snapshots.FLUSH_S old: wait for both hosts' to be in.
        per_host[:] = [(await scrape(s.url)).get(key, 0.0) for s in services]
        return sum(per_host) == rejected

    await wait_for(counted, timeout_s=5.0, interval_s=0.2, what="every worker's rejects counted")
    assert all(count > 0 for count in per_host), per_host  # both hosts turned calls away
