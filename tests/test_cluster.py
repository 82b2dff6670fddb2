"""A real 3-master Redis Cluster: the handler, the loader and admin changes, by URL alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster

from core import keys
from core.config import REDIS_URL_ENV, Config
from core.store import ListStore
from devtools.redis_server import LocalCluster
from loader.sync import sync_list
from tests.helpers import REJECT, body_from, wait_for

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = "15162065613"
PREFIX_BLOCKED = "19005550123"
RATE_REJECT = [{"action": "reject", "operands": ["busy-here", "too-many-calls"]}]
PREFIX_REJECT = [{"action": "reject", "operands": ["decline", "premium"]}]
ADMIN_TOKEN = "cluster-test-admin-token-0123456789"
SEED_REST = "5162065614\n5162065615\n5162065616\n"


def cluster_config(cluster: LocalCluster, folder: Path) -> dict[str, Any]:
    (folder / "blocklist.csv").write_text(f"number\n{BLOCKED}\n{SEED_REST}")
    (folder / "premium.txt").write_text("1900\n")
    return {
        "redis": {"url": cluster.url},
        "cache": {"refresh_ms": 100, "max_stale_ms": 2000},
        "lists": {
            "blocklist": {"kind": "numbers", "source": "blocklist.csv", "column": "number"},
            "premium": {"kind": "prefixes", "source": "premium.txt"},
            "vip": {"kind": "numbers"},
        },
        "policies": {
            "default": {
                "rules": [
                    {"name": "vip", "match": "caller_in_list", "list": "vip", "action": "allow"},
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    {
                        "name": "premium",
                        "match": "caller_prefix_in_list",
                        "list": "premium",
                        "operands": ["decline", "premium"],
                    },
                    {
                        "name": "flood",
                        "match": "call_rate",
                        "limit": 2,
                        "window_s": 60,
                        "operands": ["busy-here", "too-many-calls"],
                    },
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
    }


def node_of(client: RedisCluster, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


async def test_each_list_lives_in_one_slot_and_lists_spread_over_nodes(
    cluster_redis: RedisCluster, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(cluster_config_for_names(tmp_path), base_dir=tmp_path)
    for name in config.lists:
        report = await sync_list(cluster_redis, config, name)
        assert report.result is not None and report.result.size == 1
    for name in config.lists:
        found = [
            k.decode() if isinstance(k, bytes) else k
            for k in await cluster_redis.keys(
                f"{{cs:{name}}}*", target_nodes=RedisCluster.ALL_NODES
            )
        ]
        assert keys.meta(name) in found
        assert {cluster_redis.keyslot(k) for k in found} == {cluster_redis.keyslot(keys.meta(name))}
    # Six lists over three masters: the one poll pipeline has to span several nodes.
    assert len({node_of(cluster_redis, keys.meta(name)) for name in config.lists}) >= 2
    states = await ListStore(cluster_redis).states(config.lists)
    assert all(state.gen > 0 for state in states.values())


def cluster_config_for_names(folder: Path) -> dict[str, Any]:
    lists = {}
    for i, name in enumerate(("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")):
        (folder / f"{name}.txt").write_text(f"1{i}\n")
        lists[name] = {"kind": "prefixes", "source": f"{name}.txt"}
    return {"lists": lists, "policies": {"default": {}}}


async def test_handler_loader_and_admin_changes_on_a_cluster(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", ADMIN_TOKEN)
    config = make_config(cluster_config(cluster, tmp_path), base_dir=tmp_path)
    for name in ("blocklist", "premium"):
        await sync_list(cluster_redis, config, name)
    # The service connects by itself, from the redis+cluster:// URL in the config.
    client: TestClient[Any, Any] = await make_client(config)

    async def answer(caller: str) -> list[dict[str, Any]]:
        response = await client.post("/tg/main", json=body_from(caller))
        assert response.status == 200
        body: list[dict[str, Any]] = await response.json()
        return body

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_for(ready)
    assert await answer(BLOCKED) == REJECT
    assert await answer(PREFIX_BLOCKED) == PREFIX_REJECT
    # Call-rate counters land on the caller's slot; the third call is over the limit.
    assert [await answer("15165550199") for _ in range(3)] == [[], [], RATE_REJECT]

    # Admin changes through the HTTP API (single-entry writes, MULTI/EXEC on the list's
    # slot) reach the service within a second.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for method, path in (
        ("PUT", "/v1/lists/blocklist/entries/15165550177"),
        ("PUT", f"/v1/lists/vip/entries/{BLOCKED}"),
    ):
        response = await client.request(method, path, headers=admin)
        assert response.status == 200, await response.text()
        assert (await response.json())["listed"] is True

    async def changed() -> bool:
        return await answer("15165550177") == REJECT and await answer(BLOCKED) == []

    await wait_for(changed, timeout_s=1.0)
    response = await client.get("/v1/lists/vip/entries/15162065613", headers=admin)
    assert (await response.json())["listed"] is True
    # The store API the admin routes use, directly.
    store = ListStore(cluster_redis)
    await store.change("vip", "numbers", remove=[BLOCKED])

    # A second full sync swaps the list (WATCH + MULTI/EXEC on one slot).
    (tmp_path / "blocklist.csv").write_text(f"number\n{SEED_REST}15165550188\n")
    report = await sync_list(cluster_redis, config, "blocklist")
    assert report.version is not None
    meta = await store.meta("blocklist")
    # 4 from the source and the admin PUT, kept by the admin overlay (same slot)
    assert meta is not None and (meta.size, meta.pending_adds) == (5, 0)

    async def swapped() -> bool:
        return (
            await answer("15165550188") == REJECT
            and await answer(BLOCKED) == []
            and await answer("15165550177") == REJECT
        )

    await wait_for(swapped, timeout_s=2.0)
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="redis_error"} 0.0' in metrics


async def test_loader_command_line_syncs_into_the_cluster(
    cluster: LocalCluster, cluster_redis: RedisCluster, tmp_path: Path
) -> None:
    data = cluster_config(cluster, tmp_path)
    data["redis"] = {"url": "redis://127.0.0.1:1/0"}  # replaced by the environment
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, REDIS_URL_ENV: cluster.url}
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "loader",
            "--config",
            str(config_file),
            "sync",
            "--list",
            "blocklist",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    store = ListStore(cluster_redis)
    assert await store.contains("blocklist", "numbers", BLOCKED)
    assert not await store.contains("blocklist", "numbers", PREFIX_BLOCKED)
