"""Full syncs from local files: metadata, bad rows, dry run, guards, the lock, the handler."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core import keys
from core.build import start_build
from core.config import Config
from core.numbers import normalise
from core.store import ListState, ListStore
from loader.delta import compact_list
from loader.sync import SyncError, SyncOptions, SyncRefused, sync_list
from tests.helpers import REJECT, body_from, wait_for

QUIET = SyncOptions(progress="off")


def blocklist_config(make_config: Callable[..., Config], folder: Path, **spec: Any) -> Config:
    data = {
        "lists": {"blocklist": {"kind": "numbers", "source": "blocklist.csv", **spec}},
        "policies": {
            "default": {"rules": [{"name": "bl", "match": "caller_in_list", "list": "blocklist"}]}
        },
    }
    return make_config(data, base_dir=folder)


def write_numbers(folder: Path, *numbers: str, name: str = "blocklist.csv") -> None:
    (folder / name).write_text("number,reason\n" + "".join(f"{n},spam\n" for n in numbers))


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every key with its value (serialised; a hash's fields sorted, as DUMP's order
    moves when a field is added and deleted): equal snapshots mean nothing was changed."""
    found: dict[bytes, Any] = {}
    async for key in redis.scan_iter(count=1000):
        if await redis.type(key) == b"hash":
            found[key] = sorted((await redis.hgetall(key)).items())
        else:
            found[key] = await redis.dump(key)
    return found


SEED = ("5162065613", "5162065614", "5162065615", "5162065616")


async def test_sync_loads_the_list_with_its_metadata_and_reports_bad_rows(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    (tmp_path / "blocklist.csv").write_text(
        "number,reason\n5162065613,robocall\nnot-a-number,spam\n+1 (516) 206-5614,spam\n\n"
        "5162065613,duplicate\n"
    )
    config = blocklist_config(
        make_config, tmp_path, label_columns=["reason"], max_rejected_share=0.5
    )
    report = await sync_list(redis, config, "blocklist", QUIET)
    assert report.outcome == "success"
    assert (report.rows_read, report.rows_rejected) == (4, 1)
    assert report.bad_rows == [
        f"{tmp_path}/blocklist.csv:3: not a telephone number: 'not-a-number'"
    ]
    assert report.labels == {"reason": {"robocall": 1, "spam": 1, "duplicate": 1}}
    meta = await ListStore(redis).meta("blocklist")
    assert meta is not None
    assert (meta.kind, meta.size, meta.added, meta.removed) == ("numbers", 2, 2, 0)
    assert (meta.rows_read, meta.rows_rejected) == (4, 1)
    assert meta.source == str(tmp_path / "blocklist.csv")
    assert meta.checksum.startswith("sha256:") and meta.synced_at > 0
    store = ListStore(redis)
    assert await store.contains("blocklist", "numbers", "15162065614")
    assert not await store.contains("blocklist", "numbers", "15162065699")


async def test_loaded_numbers_equal_normalise_for_every_shape(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    # The loader's shortcut for plain digit strings must agree with core.numbers.normalise.
    rng = random.Random(7)
    shapes = [
        "".join(rng.choice("0123456789") for _ in range(rng.randint(8, 13))) for _ in range(3000)
    ]
    shapes += ["0" + s[:9] for s in shapes[:200]] + ["1" + s[:10] for s in shapes[:200]]
    shapes += ["00441234567890", "011441234567890", "15162065613", "5162065613", "٥١٦٢٠٦٥٦١٣"]
    (tmp_path / "numbers.txt").write_text("\n".join(shapes) + "\n")
    spec = {"source": "numbers.txt", "allow_short_codes": True, "max_rejected_share": 1}
    config = make_config({"lists": {"numbers": spec}}, base_dir=tmp_path)
    report = await sync_list(redis, config, "numbers", QUIET)
    expected = {n for n in map(normalise, shapes) if n is not None}
    buckets = await ListStore(redis).number_base(
        "numbers", (await ListStore(redis).states(["numbers"]))["numbers"].gen
    )
    loaded = {str(n) for bucket in buckets for n in bucket}
    assert loaded == expected
    assert report.rows_rejected == sum(normalise(s) is None for s in shapes)


async def test_dry_run_shows_the_diff_and_writes_nothing(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    first = await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert first.result is not None and first.result.added == 4
    assert await snapshot(redis) == {}  # not even a meta hash
    await sync_list(redis, config, "blocklist", QUIET)
    write_numbers(tmp_path, "5162065613", "5162065614", "5162065615", "5162065617", "5162065618")
    before = await snapshot(redis)
    report = await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert await snapshot(redis) == before
    assert report.outcome == "dry_run" and report.refusal is None
    assert report.result is not None
    assert (report.result.old_size, report.result.size) == (4, 5)
    assert sorted(report.result.added_sample) == ["15162065617", "15162065618"]
    assert report.result.removed_sample == ("15162065616",)
    text = "\n".join(report.diff_lines())
    assert "4 now -> 5 after the sync (+2 -1)" in text
    assert "removed:  15162065616" in text
    assert "a real sync would go ahead" in text


async def test_an_empty_source_is_refused_and_the_old_list_still_answers(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    (tmp_path / "blocklist.csv").write_text("number\n# nothing today\n")
    with pytest.raises(SyncRefused, match=r"has no valid entries .* old list of 4 entries is kept"):
        await sync_list(redis, config, "blocklist", QUIET)
    store = ListStore(redis)
    assert await store.contains("blocklist", "numbers", "15162065613")
    assert not [k async for k in redis.scan_iter("*stage*")]
    # --force loads the empty list
    report = await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert report.outcome == "success" and report.result is not None
    assert report.result.size == 0
    assert not await store.contains("blocklist", "numbers", "15162065613")


async def test_a_sync_removing_too_much_is_refused_unless_forced(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path, max_removal_share=0.5)
    await sync_list(redis, config, "blocklist", QUIET)
    write_numbers(tmp_path, "5162065613")  # would remove 3 of 4
    with pytest.raises(SyncRefused, match=r"would remove 3 of 4 entries \(75%, more than"):
        await sync_list(redis, config, "blocklist", QUIET)
    store = ListStore(redis)
    assert await store.contains("blocklist", "numbers", "15162065616")
    dry = await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert dry.refusal is not None and "would remove 3 of 4" in dry.refusal
    assert "a real sync would be REFUSED" in "\n".join(dry.diff_lines())
    await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert not await store.contains("blocklist", "numbers", "15162065616")


async def test_the_diff_counts_admin_changes_as_part_of_the_live_list(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    store = ListStore(redis)
    await store.change("blocklist", "numbers", add=["15162065699"], remove=["15162065613"])
    report = await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert report.result is not None
    # live: 14,15,16,99; source: 13,14,15,16 -> +13 -99
    assert (report.result.old_size, report.result.added, report.result.removed) == (4, 1, 1)


async def test_an_identical_source_leaves_the_list_alone(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    store = ListStore(redis)
    (state,) = (await store.states(["blocklist"])).values()
    gen, version = state.gen, state.version
    first = await store.meta("blocklist")
    report = await sync_list(redis, config, "blocklist", QUIET)
    assert report.outcome == "unchanged"
    after = await store.meta("blocklist")
    assert after is not None and first is not None
    assert (after.gen, after.version) == (gen, version + 1)  # no new base, new sync time
    assert after.synced_at >= first.synced_at


async def test_a_second_sync_of_the_same_list_waits_for_the_lock(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    running = await start_build(redis, "blocklist", "numbers")
    with pytest.raises(SyncError, match="being synced by another loader"):
        await sync_list(redis, config, "blocklist", QUIET)
    await running.abort()
    assert (await sync_list(redis, config, "blocklist", QUIET)).outcome == "success"


async def test_a_missing_file_fails_and_keeps_the_old_list(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    (tmp_path / "blocklist.csv").unlink()
    with pytest.raises(SyncError, match=r"cannot open .*blocklist\.csv"):
        await sync_list(redis, config, "blocklist", QUIET)
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065613")
    assert await redis.exists(keys.lock("blocklist")) == 0


async def test_the_handler_decides_by_the_new_list_after_a_sync(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    client = await make_client(config, redis_client=redis)

    async def answer(caller: str) -> Any:
        return await (await client.post("/", json=body_from(caller))).json()

    assert await answer("15162065613") == REJECT
    assert await answer("15162065699") == []
    write_numbers(tmp_path, *SEED[1:], "5162065699")
    await sync_list(redis, config, "blocklist", QUIET)

    async def swapped() -> bool:
        return bool(await answer("15162065699") == REJECT and await answer("15162065613") == [])

    await wait_for(swapped, timeout_s=2.0)


async def test_every_sync_moves_the_trust_stamp_and_single_changes_do_not(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The stamp the service trusts a list by (service/screening/cache.py) after Redis lost data."""
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    store = ListStore(redis)

    async def state() -> ListState:
        return (await store.states(["blocklist"]))["blocklist"]

    assert (await state()) == ListState(0, 0)  # never written: no stamp
    await sync_list(redis, config, "blocklist", QUIET)
    synced = await state()
    assert synced.stamped and synced.accepted_at == ""
    await store.change("blocklist", "numbers", add=["15162065699"])
    await compact_list(redis, config, "blocklist")
    folded = await state()
    assert folded.stamp == synced.stamp and folded.gen > synced.gen
    write_numbers(tmp_path, *SEED, "5162065699")  # the same entries as the live list
    assert (await sync_list(redis, config, "blocklist", QUIET)).outcome == "unchanged"
    touched = await state()
    assert touched.stamp != folded.stamp and touched.version == folded.version + 1

    assert await store.accept("blocklist", 1234.5) == touched.version + 1
    accepted = await state()
    assert (accepted.synced_at, accepted.accepted_at) == (touched.synced_at, "1234.500")
    before = await snapshot(redis)
    assert await store.accept("other", 1234.5) is None  # not in Redis: nothing written
    assert await snapshot(redis) == before
