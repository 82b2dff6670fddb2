"""Sentinel and Cluster URLs: what each part means, and clear errors for bad ones."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from core.connect import BadRedisUrl, SentinelRedis, connect, redact
from core.shards import LeanRedis


async def test_sentinel_url_names_sentinels_service_and_database() -> None:
    client = connect(
        "redis+sentinel://app:pw%40x@10.0.0.1:26380,10.0.0.2/cs-main/3"
        "?sentinel_password=sentinel-pw",
        socket_timeout_s=0.5,
    )
    assert isinstance(client, SentinelRedis)
    pool = client.connection_pool
    assert pool.service_name == "cs-main"  # type: ignore[attr-defined]
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "pw@x")
    assert kwargs["socket_timeout"] == 0.5
    assert client.owned_sentinel is not None
    sentinels = [s.connection_pool.connection_kwargs for s in client.owned_sentinel.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26380), ("10.0.0.2", 26379)]
    assert {s["password"] for s in sentinels} == {"sentinel-pw"}
    await client.aclose()


async def test_cluster_url_names_startup_nodes() -> None:
    client = connect("redis+cluster://:secret@10.0.0.1:7000,[::1]:7001,node3")
    assert isinstance(client, RedisCluster)
    assert sorted(client.nodes_manager.startup_nodes) == [
        "10.0.0.1:7000",
        "::1:7001",
        "node3:6379",
    ]
    await client.aclose()


async def test_single_server_urls_give_a_client_with_its_own_call_link() -> None:
    client = connect("redis://127.0.0.1:1/0")
    assert type(client) is LeanRedis and client.dispatcher.lean  # core/wire.py
    await client.aclose()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel:///mymaster", "give one or more host[:port]"),
        ("redis+sentinel://h1,,h2/mymaster", "give one or more host[:port]"),
        ("redis+sentinel://h1:notaport/mymaster", "bad port in 'h1:notaport'"),
        ("redis+sentinel://h1:70000/mymaster", "bad port in 'h1:70000'"),
        ("redis+sentinel://h1", "the path must be /<service name>[/<db>]"),
        ("redis+sentinel://h1/mymaster/zero", "database must be a number, not 'zero'"),
        ("redis+sentinel://h1:\u00b3/mymaster", "bad port in 'h1:\u00b3'"),
        ("redis+sentinel://h1/mymaster?timeout=1", "unknown option(s) timeout"),
        ("redis+cluster://h1:7000/1", "a Redis Cluster has only database 0"),
        ("redis+cluster://h1:7000?readonly=1", "unknown option(s) readonly"),
        ("http://h1:6379", "unsupported scheme 'http'"),
        ("h1:6379", "unsupported scheme ''"),
    ],
)
def test_bad_urls_are_refused_with_the_problem_named(url: str, problem: str) -> None:
    with pytest.raises(BadRedisUrl) as caught:
        connect(url)
    assert problem in str(caught.value)


def test_errors_never_show_a_password() -> None:
    with pytest.raises(BadRedisUrl) as caught:
        connect("redis+cluster://admin:hunter2@h1:7000/5")
    assert "hunter2" not in str(caught.value)
    assert "redis+cluster://admin:***@h1:7000/5" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://user:p/w@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        (
            "redis+sentinel://u:pw@s1,s2/m/0?sentinel_password=spw",
            "redis+sentinel://u:***@s1,s2/m/0?sentinel_password=***",
        ),
    ],
)
def test_redact_hides_every_password(url: str, shown: str) -> None:
    assert redact(url) == shown
