"""The admin overlay: admin adds and removes on a list with a source survive its syncs,
optionally for a limited time, and show in admin GETs, explain and the export."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from core.store import ListStore
from loader.heal import Healer
from loader.metrics import LoaderMetrics
from loader.schedule import Scheduler
from loader.sync import SyncOptions, sync_list
from tests.helpers import REJECT, body_from, wait_for

TOKEN = "tok-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]
QUIET = SyncOptions(progress="off")
MANUAL = "15162065699"
SOURCED = ["15162065613", "15162065614", "15162065615"]


@pytest.fixture
def config(make_config: Callable[..., Config], tmp_path: Path) -> Config:
    (tmp_path / "blocklist.txt").write_text("\n".join(SOURCED) + "\n")
    (tmp_path / "premium.txt").write_text("1900\n")
    data = {
        "cache": {"refresh_ms": 50},
        "lists": {
            "blocklist": {"kind": "numbers", "source": "blocklist.txt"},
            "premium": {"kind": "prefixes", "source": "premium.txt"},
        },
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    {"name": "premium", "match": "caller_prefix_in_list", "list": "premium"},
                ]
            }
        },
    }
    return make_config(data, base_dir=tmp_path)


@pytest.fixture
async def admin(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, config: Config, make_client: Any
) -> Client:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    for name in ("blocklist", "premium"):
        await sync_list(redis, config, name, QUIET)
    client: Client = await make_client(config, redis_client=redis)
    return client


async def answers(admin: Client, caller: str) -> Any:
    response = await admin.post("/", json=body_from(caller))
    return await response.json()


async def answer_becomes(admin: Client, caller: str, expected: Any) -> None:
    async def right() -> bool:
        return bool(await answers(admin, caller) == expected)

    await wait_for(right, timeout_s=5)


async def test_an_admin_add_is_still_answered_after_three_syncs(
    redis: Redis, admin: Client, config: Config, tmp_path: Path
) -> None:
    put = await admin.put(f"/v1/lists/blocklist/entries/{MANUAL}", headers=AUTH)
    assert put.status == 200
    body = await put.json()
    assert (body["listed"], body["overlay"], body["expires_at"]) == (True, "add", None)
    await answer_becomes(admin, MANUAL, REJECT)
    for round_ in range(3):  # each sync changes something, so each swaps a new base
        extra = f"151620656{20 + round_}"
        source = tmp_path / "blocklist.txt"
        source.write_text(source.read_text() + extra + "\n")
        report = await sync_list(redis, config, "blocklist", QUIET)
        assert (report.outcome, report.result and report.result.removed) == ("success", 0)
        await answer_becomes(admin, extra, REJECT)
        assert await answers(admin, MANUAL) == REJECT
    got = await admin.get(f"/v1/lists/blocklist/entries/{MANUAL}", headers=AUTH)
    assert (await got.json())["overlay"] == "add"
    info = await (await admin.get("/v1/lists/blocklist", headers=AUTH)).json()
    assert info["overlay"] == {"adds": 1, "dels": 0}
    explained = await (await admin.post("/v1/explain", json=body_from(MANUAL), headers=AUTH)).json()
    assert (explained["matched"], explained["overlay"]) == (MANUAL, True)
    from_source = await admin.post("/v1/explain", json=body_from(SOURCED[0]), headers=AUTH)
    assert (await from_source.json())["overlay"] is False
    export = await (await admin.get("/v1/lists/blocklist/entries", headers=AUTH)).text()
    assert f"+{MANUAL}\n" in export and f"# admin overlay: add {MANUAL}\n" in export


async def test_an_admin_delete_of_a_source_entry_stays_deleted_after_a_sync(
    redis: Redis, admin: Client, config: Config
) -> None:
    gone = await admin.delete(f"/v1/lists/blocklist/entries/{SOURCED[0]}", headers=AUTH)
    assert (await gone.json())["overlay"] == "remove"
    await admin.delete("/v1/lists/premium/entries/1900", headers=AUTH)
    await answer_becomes(admin, SOURCED[0], [])
    await answer_becomes(admin, "19005550000", [])
    for name in ("blocklist", "premium"):
        await sync_list(redis, config, name, SyncOptions(progress="off", force=True))
    assert not await ListStore(redis).contains("blocklist", "numbers", SOURCED[0])
    assert not await ListStore(redis).contains("premium", "prefixes", "1900")
    assert await answers(admin, SOURCED[0]) == []
    assert await answers(admin, SOURCED[1]) == REJECT
    # adding it back through the API ends the removal: last write wins
    back = await admin.put(f"/v1/lists/blocklist/entries/{SOURCED[0]}", headers=AUTH)
    assert (await back.json())["overlay"] == "add"
    await sync_list(redis, config, "blocklist", QUIET)
    assert await ListStore(redis).contains("blocklist", "numbers", SOURCED[0])


async def test_an_overlay_entry_with_a_ttl_expires_and_the_source_decides_again(
    redis: Redis, admin: Client, config: Config
) -> None:
    bulk = await admin.post(
        "/v1/lists/premium/entries", headers=AUTH, json={"add": ["1976"], "ttl_s": 1.5}
    )
    assert bulk.status == 200
    # After the bulk change: the first one starts the helper process, which may take
    # longer than the ttl on a busy machine.
    put = await admin.put(f"/v1/lists/blocklist/entries/{MANUAL}?ttl_s=1.5", headers=AUTH)
    body = await put.json()
    assert body["overlay"] == "add" and body["expires_at"] > time.time()
    await sync_list(redis, config, "blocklist", QUIET)
    assert await ListStore(redis).contains("blocklist", "numbers", MANUAL)  # not yet expired
    scheduler = Scheduler(redis, config, LoaderMetrics(CollectorRegistry(), []), progress="off")
    healer = Healer(redis, config, scheduler.metrics, scheduler.heal_sync)

    async def expired() -> bool:
        await healer.check()
        store = ListStore(redis)
        return not await store.contains("blocklist", "numbers", MANUAL) and not (
            await store.contains("premium", "prefixes", "1976")
        )

    await wait_for(expired, timeout_s=10, interval_s=0.2)
    await answer_becomes(admin, MANUAL, [])
    info = await (await admin.get("/v1/lists/blocklist", headers=AUTH)).json()
    assert info["overlay"] == {"adds": 0, "dels": 0}


async def test_ttl_is_checked_and_only_for_lists_with_a_source(
    admin: Client, make_config: Callable[..., Config], make_client: Any, redis: Redis
) -> None:
    for bad in ("0", "-1", "nan", "x", "99999999999"):
        response = await admin.put(
            f"/v1/lists/blocklist/entries/{MANUAL}?ttl_s={bad}", headers=AUTH
        )
        assert response.status == 400, bad
    manual: Client = await make_client(
        make_config({"lists": {"manual": {"kind": "numbers"}}}), redis_client=redis
    )
    refused = await manual.put(f"/v1/lists/manual/entries/{MANUAL}?ttl_s=5", headers=AUTH)
    assert refused.status == 400 and "source" in (await refused.json())["error"]
    plain = await manual.put(f"/v1/lists/manual/entries/{MANUAL}", headers=AUTH)
    assert "overlay" not in await plain.json()  # nothing to outlive: no sync replaces it
