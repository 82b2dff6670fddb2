"""``/metrics`` of one service process: what each call counts, and what never becomes a label."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from core.config import Config
from core.store import ListStore
from devtools.redis_server import free_port
from service.metrics import ERROR_KINDS, FALLBACK_REASONS
from tests.helpers import REJECT, body_from, load_list, wait_for

Client = Any

CONFIG: dict[str, Any] = {
    "cache": {"refresh_ms": 50, "max_stale_ms": 1000},
    "lists": {"block": {"kind": "numbers"}, "premium": {"kind": "prefixes"}},
    "policies": {
        "default": {
            "rules": [
                {"name": "premium", "match": "caller_prefix_in_list", "list": "premium",
                 "dry_run": True},
                {"name": "block", "match": "caller_in_list", "list": "block"},
            ]
        },
        "vip": {
            "default": "reject",
            "rules": [{"name": "known", "match": "caller_in_list", "list": "block",
                       "action": "allow"}],
        },
    },
    "trunk_groups": {"main": {"policy": "default"}, "vip-line": {"policy": "vip"}},
}  # fmt: skip


async def scrape(client: Client) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status == 200
    samples = {}
    for line in (await response.text()).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def decisions(group: str, decision: str, rule: str, dry_run: str = "false") -> str:
    return (
        f'callscreen_decisions_total{{decision="{decision}",dry_run="{dry_run}",'
        f'rule="{rule}",trunk_group="{group}"}}'
    )


async def test_every_series_exists_before_the_first_call(
    make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    client = await make_client(make_config(CONFIG))
    samples = await scrape(client)

    expected = [
        decisions("_root", "reject", "block"),
        decisions("_root", "reject", "premium", "true"),
        decisions("_root", "allow", "default"),
        decisions("main", "allow", "on_error"),  # handler.on_error is allow
        decisions("vip-line", "allow", "known"),
        decisions("vip-line", "reject", "default"),
        *(f'callscreen_errors_total{{kind="{kind}"}}' for kind in ERROR_KINDS),
        *(f'callscreen_on_error_total{{reason="{reason}"}}' for reason in FALLBACK_REASONS),
        'callscreen_list_entries{list="block"}',
        'callscreen_list_last_sync_timestamp_seconds{list="premium"}',
        'callscreen_redis_duration_seconds_count{operation="rate"}',
    ]
    for name in expected:
        assert samples.get(name) == 0, name
    # Series that no call can ever count are not exported.
    for never in (
        decisions("main", "reject", "on_error"),  # on_error is allow
        decisions("_root", "reject", "block", "true"),  # block is not a dry run
        decisions("_root", "reject", "premium"),  # premium only ever matches as a dry run
    ):
        assert never not in samples, never
    build = [name for name in samples if name.startswith("callscreen_build_info{")]
    assert len(build) == 1 and 'version="' in build[0]
    assert samples["process_cpu_seconds_total"] >= 0
    # Sub-millisecond buckets, where the answers are.
    for le in ("0.0001", "0.00025", "0.0005", "0.00075", "0.001"):
        assert f'callscreen_request_duration_seconds_bucket{{le="{le}"}}' in samples


async def test_each_call_is_counted_by_trunk_group_decision_and_rule(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    await load_list(redis, "block", "numbers", ["5162065613", "19005550100"])
    await load_list(redis, "premium", "prefixes", ["1900"])
    client = await make_client(make_config(CONFIG))

    async def call(path: str, body: Any) -> Any:
        response = await client.post(path, json=body)
        return response.status, await response.json()

    assert await call("/tg/main", body_from("5162065613")) == (200, REJECT)
    assert await call("/tg/main", body_from("5162065613")) == (200, REJECT)
    assert await call("/tg/main", body_from("19005550100")) == (200, REJECT)  # and dry run
    assert await call("/tg/main", body_from("19005550199")) == (200, [])  # dry run only
    assert await call("/", body_from("5162065600")) == (200, [])
    assert await call("/tg/vip-line", body_from("5162065613")) == (200, [])
    assert (await call("/tg/vip-line", body_from("5162065600")))[0] == 200
    assert (await call("/tg/nosuch", body_from("5162065613")))[0] == 404
    bad = await client.post("/tg/main", data=b"{not json")
    assert bad.status == 400
    too_large = await client.post("/", data=b"[" + b" " * 70_000 + b"]")
    assert too_large.status == 413
    assert (await client.get("/tg/main")).status == 405

    samples = await scrape(client)
    assert samples[decisions("main", "reject", "block")] == 3
    assert samples[decisions("main", "reject", "premium", "true")] == 2
    assert samples[decisions("main", "allow", "default")] == 1
    assert samples[decisions("_root", "allow", "default")] == 1
    assert samples[decisions("vip-line", "allow", "known")] == 1
    assert samples[decisions("vip-line", "reject", "default")] == 1
    assert samples['callscreen_errors_total{kind="unknown_trunk_group"}'] == 1
    assert samples['callscreen_errors_total{kind="bad_json"}'] == 1
    assert samples['callscreen_errors_total{kind="too_large"}'] == 1
    assert samples['callscreen_errors_total{kind="method_not_allowed"}'] == 1
    # The latency histogram holds every answered call, and each took under a second.
    assert samples["callscreen_request_duration_seconds_count"] == 7
    assert samples['callscreen_request_duration_seconds_bucket{le="1.0"}'] == 7
    assert samples['callscreen_redis_duration_seconds_count{operation="poll"}'] > 0


async def test_callers_and_unknown_trunk_groups_never_become_labels(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    await load_list(redis, "block", "numbers", ["5162065613"])
    client = await make_client(make_config(CONFIG))
    await client.post("/tg/main", json=body_from("5162065613"))
    before = await scrape(client)

    callers = [f"1212555{n:04d}" for n in range(40)]
    for n, caller in enumerate(callers):
        await client.post("/tg/main", json=body_from(caller))
        await client.post(f"/tg/probe-{n}", json=body_from(caller))
    text = await (await client.get("/metrics")).text()
    after = await scrape(client)

    assert after.keys() == before.keys()
    assert not [c for c in callers if c in text]
    assert "probe-" not in text
    assert after['callscreen_errors_total{kind="unknown_trunk_group"}'] == 40


async def test_list_sizes_and_sync_time_follow_the_store(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    await load_list(redis, "block", "numbers", ["5162065613", "5162065614", "5162065615"])
    client = await make_client(make_config(CONFIG))
    samples = await scrape(client)
    assert samples['callscreen_list_entries{list="block"}'] == 3
    synced = samples['callscreen_list_last_sync_timestamp_seconds{list="block"}']
    assert time.time() - 60 < synced <= time.time()
    assert samples['callscreen_list_last_sync_timestamp_seconds{list="premium"}'] == 0

    await ListStore(redis).change("block", "numbers", add=["15162065616"])

    async def grown() -> bool:
        return (await scrape(client))['callscreen_list_entries{list="block"}'] == 4

    await wait_for(grown)
    # A single-entry change is not a full sync: the sync time stays.
    assert (await scrape(client))[
        'callscreen_list_last_sync_timestamp_seconds{list="block"}'
    ] == synced


async def test_on_error_answers_are_counted_by_reason(
    make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    # Nothing listens on this port: the lists never load, answers follow on_error.
    config = make_config({**CONFIG, "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    client = await make_client(config)
    for _ in range(3):
        response = await client.post("/tg/main", json=body_from("5162065613"))
        assert await response.json() == []  # on_error: allow
    samples = await scrape(client)
    assert samples['callscreen_on_error_total{reason="stale_lists"}'] == 3
    assert samples[decisions("main", "allow", "on_error")] == 3
