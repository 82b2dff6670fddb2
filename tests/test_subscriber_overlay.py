"""The admin overlay of a subscribers list with a source: admin writes survive its syncs,
optionally for a limited time, and show in the admin GET, explain and the export."""

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
from core.export import export_csv
from loader.heal import Healer
from loader.metrics import LoaderMetrics
from loader.schedule import Scheduler
from loader.sync import SyncOptions, sync_list
from tests.helpers import wait_for
from tests.test_subscribers import PERSONAL, SUB_A, SUB_B, call_body, subscribers_config

TOKEN = "subscriber-overlay-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]
QUIET = SyncOptions(progress="off")
SUBSCRIBER = f"/v1/lists/personal/subscribers/{SUB_A}"
MANUAL = "15165550199"
SOURCED = "15165550101"  # SUB_A's block entry in the source
SOURCE = f"{SUB_A},{SOURCED}\n{SUB_B},15165550102\n"
#: Long enough for a forced sync of a subscribers list (16 k buckets) on a busy machine.
TTL_S = 6


@pytest.fixture
def config(make_config: Callable[..., Config], tmp_path: Path) -> Config:
    (tmp_path / "personal.csv").write_text(SOURCE)
    return make_config(subscribers_config(cache={"refresh_ms": 50}), base_dir=tmp_path)


@pytest.fixture
async def admin(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, config: Config, make_client: Any
) -> Client:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    await sync_list(redis, config, "personal", QUIET)
    client: Client = await make_client(config, redis_client=redis)
    return client


async def answers(admin: Client, caller: str, called: str = SUB_A) -> Any:
    response = await admin.post("/tg/main", json=call_body(caller, called))
    return await response.json()


async def answer_becomes(admin: Client, caller: str, expected: Any, called: str = SUB_A) -> None:
    async def right() -> bool:
        return bool(await answers(admin, caller, called) == expected)

    await wait_for(right, timeout_s=5)


async def entries(admin: Client) -> dict[str, Any]:
    found: dict[str, Any] = await (await admin.get(SUBSCRIBER, headers=AUTH)).json()
    return found


async def test_an_admin_put_is_still_answered_after_three_syncs(
    redis: Redis, admin: Client, config: Config, tmp_path: Path
) -> None:
    put = await admin.put(f"{SUBSCRIBER}/entries/{MANUAL}", headers=AUTH)
    assert put.status == 200
    body = await put.json()
    assert MANUAL in body["block"]
    assert body["overlay"] == [
        {"entry": MANUAL, "side": "block", "change": "add", "expires_at": None}
    ]
    await answer_becomes(admin, MANUAL, PERSONAL)
    source = tmp_path / "personal.csv"
    outcomes = []
    for round_ in range(3):
        if round_ == 2:  # a changed source: SUB_A's rows are rewritten
            source.write_text(f"{SUB_A},15165550177\n{SUB_B},15165550102\n")
        report = await sync_list(redis, config, "personal", QUIET)
        outcomes.append(report.outcome)
        assert await answers(admin, MANUAL) == PERSONAL
    # With the overlay applied, a sync of the same source finds nothing to change (the
    # first builds, since the admin write moved the write count; the second skips).
    assert outcomes == ["unchanged", "unchanged", "success"]
    await answer_becomes(admin, "15165550177", PERSONAL)
    await answer_becomes(admin, SOURCED, [])  # gone from the source
    assert await answers(admin, MANUAL) == PERSONAL
    body = await entries(admin)
    assert body["block"] == ["15165550177", MANUAL]
    assert body["overlay"] == [
        {"entry": MANUAL, "side": "block", "change": "add", "expires_at": None}
    ]
    explained = await admin.post("/v1/explain/tg/main", json=call_body(MANUAL), headers=AUTH)
    assert (await explained.json())["overlay"] is True
    explained = await admin.post("/v1/explain/tg/main", json=call_body("15165550177"), headers=AUTH)
    assert (await explained.json())["overlay"] is False
    export = "".join([text async for text in export_csv(redis, "personal", "subscribers")])
    assert f"+{SUB_A},+{MANUAL},block\n" in export
    assert f"# admin overlay: add +{SUB_A},+{MANUAL},block\n" in export
    # The export restores the list as it was, the overlay's effect included.
    backup = tmp_path / "backup.csv"
    backup.write_text(export)
    await redis.flushall()
    restore = SyncOptions(progress="off", source=str(backup))
    assert (await sync_list(redis, config, "personal", restore)).outcome == "success"
    again = "".join([text async for text in export_csv(redis, "personal", "subscribers")])
    rows = [line for line in export.splitlines() if not line.startswith("#")]
    assert [line for line in again.splitlines() if not line.startswith("#")] == rows
    await answer_becomes(admin, MANUAL, PERSONAL)


async def test_a_removed_source_entry_stays_removed_and_sides_are_separate(
    redis: Redis, admin: Client, config: Config, tmp_path: Path
) -> None:
    gone = await admin.delete(f"{SUBSCRIBER}/entries/{SOURCED}", headers=AUTH)
    assert (await gone.json())["overlay"] == [
        {"entry": SOURCED, "side": "block", "change": "remove", "expires_at": None}
    ]
    # Allowing it is a write of the other side: it does not end the block side's removal.
    await admin.put(f"{SUBSCRIBER}/entries/1900*?side=allow", headers=AUTH)
    await answer_becomes(admin, SOURCED, [])
    (tmp_path / "personal.csv").write_text(SOURCE + f"{SUB_B},15165550103\n")
    await sync_list(redis, config, "personal", QUIET)  # a changed source
    assert await answers(admin, SOURCED) == []
    body = await entries(admin)
    assert (body["block"], body["allow"]) == ([], ["1900*"])
    # The new generation is in use within a poll: SUB_B's new entry is its own.
    await answer_becomes(admin, "15165550103", PERSONAL, SUB_B)
    assert await answers(admin, "15165550103") == []
    # Put back through the API: the last write of (subscriber, entry, side) wins.
    back = await admin.put(f"{SUBSCRIBER}/entries/{SOURCED}", headers=AUTH)
    assert {"entry": SOURCED, "side": "block", "change": "add", "expires_at": None} in (
        await back.json()
    )["overlay"]
    await sync_list(redis, config, "personal", SyncOptions(progress="off", force=True))
    await answer_becomes(admin, SOURCED, PERSONAL)
    export = "".join([text async for text in export_csv(redis, "personal", "subscribers")])
    assert f"# admin overlay: add +{SUB_A},1900*,allow\n" in export


async def test_a_bulk_change_is_kept_and_its_ttl_expires(
    redis: Redis, admin: Client, config: Config
) -> None:
    bulk = await admin.post(
        "/v1/lists/personal/subscribers",
        headers=AUTH,
        json={
            "add": [{"subscriber": SUB_B, "entry": "1976*"}],
            "remove": [{"subscriber": SUB_B, "entry": "15165550102"}],
        },
    )
    assert bulk.status == 200, await bulk.text()
    timed = await admin.post(
        "/v1/lists/personal/subscribers",
        headers=AUTH,
        json={"add": [{"subscriber": SUB_B, "entry": "1977*"}], "ttl_s": TTL_S},
    )
    assert timed.status == 200, await timed.text()
    # After the bulk changes: the first starts the helper process, which takes seconds.
    put = await admin.put(f"{SUBSCRIBER}/entries/{MANUAL}?ttl_s={TTL_S}", headers=AUTH)
    (kept,) = (await put.json())["overlay"]
    assert kept["change"] == "add" and kept["expires_at"] > time.time()
    await sync_list(redis, config, "personal", SyncOptions(progress="off", force=True))
    assert await answers(admin, MANUAL) == PERSONAL  # not yet expired
    assert await answers(admin, "19775550000", SUB_B) == PERSONAL
    scheduler = Scheduler(redis, config, LoaderMetrics(CollectorRegistry(), []), progress="off")
    healer = Healer(redis, config, scheduler.metrics, scheduler.heal_sync)

    async def expired() -> bool:
        await healer.check()
        return bool(
            await answers(admin, MANUAL) == [] and await answers(admin, "19775550000", SUB_B) == []
        )

    await wait_for(expired, timeout_s=TTL_S + 15, interval_s=0.2)
    # The bulk change without a ttl_s lasts: its add and its removal.
    assert await answers(admin, "19765550000", SUB_B) == PERSONAL
    assert await answers(admin, "15165550102", SUB_B) == []
    assert (await entries(admin))["overlay"] == []


async def test_ttl_is_checked_and_only_for_lists_with_a_source(
    admin: Client, make_config: Callable[..., Config], make_client: Any, redis: Redis
) -> None:
    for bad in ("0", "-1", "nan", "x", "99999999999"):
        response = await admin.put(f"{SUBSCRIBER}/entries/{MANUAL}?ttl_s={bad}", headers=AUTH)
        assert response.status == 400, bad
    data = subscribers_config()
    data["lists"]["personal"] = {"kind": "subscribers"}  # no source: nothing to outlive
    manual: Client = await make_client(make_config(data), redis_client=redis)
    refused = await manual.put(f"{SUBSCRIBER}/entries/{MANUAL}?ttl_s=5", headers=AUTH)
    assert refused.status == 400 and "source" in (await refused.json())["error"]
    bulk = {"add": [{"subscriber": SUB_A, "entry": MANUAL}], "ttl_s": 5}
    refused = await manual.post("/v1/lists/personal/subscribers", json=bulk, headers=AUTH)
    assert refused.status == 400 and "source" in (await refused.json())["error"]
    plain = await manual.put(f"{SUBSCRIBER}/entries/{MANUAL}", headers=AUTH)
    assert "overlay" not in await plain.json()
