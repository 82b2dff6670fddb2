"""A subscribers sync rewrites only the buckets whose content changed (issue 19): the
new generation's bucket map names the others where an earlier sync wrote them, calls
still switch from one whole list to the next at once, and nothing a live generation
names is ever expired (core/bucket_gens.py, docs/subscribers.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from core import bucket_gens, keys
from core.config import Config
from core.export import export_csv
from core.store import ListStore
from core.subscribers import SubscriberStore
from loader.heal import missing_data
from loader.sync import sync_list
from tests.helpers import wait_for
from tests.test_subscribers import PERSONAL, answer, subscribers_config

SUBSCRIBERS = [f"1951262{i:04d}" for i in range(300)]
CHANGED, REMOVED, ADDED, KEPT = SUBSCRIBERS[7], SUBSCRIBERS[30], "19512629999", SUBSCRIBERS[100]


def blocked_by(subscriber: str) -> str:
    return "1516555" + subscriber[-4:]


def rows(pairs: dict[str, str]) -> str:
    return "subscriber,entry\n" + "".join(f"{s},{e}\n" for s, e in pairs.items())


async def bucket_keys(redis: Redis, gen: int) -> set[str]:
    return {keys.decoded(key) for key in await redis.keys(f"{{cs:personal:*}}:sub:{gen}")}


async def exported(redis: Redis) -> list[str]:
    text = "".join([chunk async for chunk in export_csv(redis, "personal", "subscribers")])
    return text.splitlines()


async def test_a_sync_writes_only_the_changed_buckets_and_calls_follow_it(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    pairs = {s: blocked_by(s) for s in SUBSCRIBERS}
    source = tmp_path / "personal.csv"
    source.write_text(rows(pairs))
    config = make_config(subscribers_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    gen = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    assert len(await bucket_keys(redis, gen)) == keys.SUBSCRIBER_BUCKETS  # a first sync
    client = await make_client(config)
    assert await answer(client, blocked_by(CHANGED), CHANGED) == PERSONAL

    # One subscriber's entry changes, one goes, one comes.
    pairs[CHANGED] = "15165551111"
    del pairs[REMOVED]
    pairs[ADDED] = "15165552222"
    source.write_text(rows(pairs))
    report = await sync_list(redis, config, "personal")
    assert report.result is not None and (report.result.added, report.result.removed) == (2, 2)
    new_gen = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    changed = {keys.subscriber_bucket_of(s) for s in (CHANGED, REMOVED, ADDED)}
    written = await bucket_keys(redis, new_gen)
    assert {int(k.split(":")[2].rstrip("}")) for k in written} == changed
    # Redis holds the live list plus the replaced buckets (expiring), not two lists.
    assert len(await redis.keys("{cs:personal:*}:sub:*")) == keys.SUBSCRIBER_BUCKETS + len(changed)
    gens = await bucket_gens.read(redis, "personal", new_gen)
    assert gens.of_subscriber(KEPT) == gen and gens.of_subscriber(CHANGED) == new_gen

    async def switched() -> bool:
        return bool(await answer(client, "15165551111", CHANGED) == PERSONAL)

    await wait_for(switched, timeout_s=3.0)
    assert await answer(client, blocked_by(CHANGED), CHANGED) == []
    assert await answer(client, blocked_by(REMOVED), REMOVED) == []
    assert await answer(client, "15165552222", ADDED) == PERSONAL
    assert await answer(client, blocked_by(KEPT), KEPT) == PERSONAL  # read at its old key
    # The admin API and the export read each bucket where the map puts it.
    store = SubscriberStore(redis)
    assert (await store.read("personal", KEPT))[1].as_dict()["block"] == [blocked_by(KEPT)]
    await store.change("personal", KEPT, "15165553333", "block")
    assert await redis.hget(
        keys.subscribers("personal", keys.subscriber_bucket_of(KEPT), gen), KEPT
    )
    lines = await exported(redis)
    assert f"+{KEPT},+15165553333,block" in lines and f"+{ADDED},+15165552222,block" in lines
    # Every pair once: one gone, one new, and KEPT's admin entry.
    assert lines[-1].startswith(f"# end of export: {len(SUBSCRIBERS) + 1} entries")
    assert not any(line.startswith(f"+{REMOVED}") for line in lines)


async def test_a_killed_swap_is_tidied_without_touching_what_is_live(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A loader killed after its swap leaves ``meta.retiring``; the next build expires
    what that generation named and the live one does not, never a live bucket."""
    pairs = {s: blocked_by(s) for s in SUBSCRIBERS}
    source = tmp_path / "personal.csv"
    config = make_config(subscribers_config(), base_dir=tmp_path)
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")
    pairs[CHANGED] = "15165551111"
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")  # CHANGED's bucket now at the second gen
    second = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    pairs[REMOVED] = "15165554444"
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")
    third = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    # As if the third sync had died right after its swap: the second generation's
    # replaced bucket and map not yet expired, and named as retiring.
    named = await bucket_gens.read(redis, "personal", second)
    assert named.of_subscriber(REMOVED) < second  # unchanged by the second sync
    replaced = keys.subscribers(
        "personal", keys.subscriber_bucket_of(REMOVED), named.of_subscriber(REMOVED)
    )
    still_live = keys.subscribers("personal", keys.subscriber_bucket_of(CHANGED), second)
    await redis.persist(replaced)
    await redis.persist(keys.subscriber_gens("personal", second))
    await redis.hset(keys.meta("personal"), "retiring", second)
    gens = await bucket_gens.read(redis, "personal", third)
    assert gens.of_subscriber(CHANGED) == second  # the live map names it there
    assert await redis.ttl(still_live) == -1

    pairs[ADDED] = "15165552222"
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")
    assert await redis.ttl(still_live) == -1
    assert not await redis.hexists(keys.meta("personal"), "retiring")
    assert await redis.ttl(keys.subscriber_gens("personal", second)) > 0
    assert await redis.ttl(replaced) > 0
    store = SubscriberStore(redis)
    for subscriber, entry in ((CHANGED, "15165551111"), (REMOVED, "15165554444"), (KEPT, None)):
        block = (await store.read("personal", subscriber))[1].as_dict()["block"]
        assert block == [entry or blocked_by(subscriber)]


async def test_a_lost_bucket_kept_from_an_earlier_generation_is_found_and_rewritten(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The healer checks each bucket at the key the live map names, so a bucket an earlier
    generation wrote and Redis then lost is found, and the next sync writes it again."""
    pairs = {s: blocked_by(s) for s in SUBSCRIBERS}
    source = tmp_path / "personal.csv"
    config = make_config(subscribers_config(), base_dir=tmp_path)
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")
    first = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    pairs[CHANGED] = "15165551111"
    source.write_text(rows(pairs))
    await sync_list(redis, config, "personal")
    states = await ListStore(redis).states(["personal"])
    assert await missing_data(redis, {"personal": "subscribers"}, states) == {}
    kept = keys.subscribers("personal", keys.subscriber_bucket_of(KEPT), first)
    await redis.delete(kept)  # as a failover to an empty replica would
    found = await missing_data(redis, {"personal": "subscribers"}, states)
    assert found == {"personal": f"1 of its {keys.SUBSCRIBER_BUCKETS} buckets lost their marker"}
    report = await sync_list(redis, config, "personal")
    assert report.result is not None and (report.result.added, report.result.removed) == (1, 0)
    store = SubscriberStore(redis)
    assert (await store.read("personal", KEPT))[1].as_dict()["block"] == [blocked_by(KEPT)]
    states = await ListStore(redis).states(["personal"])
    assert await missing_data(redis, {"personal": "subscribers"}, states) == {}
