"""A sync of a source that did not change reads no row (loader/unchanged.py), unless the
list changed since, Redis lost part of it, or the sync is forced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.store import ListStore
from core.subscribers import SubscriberStore
from loader.sync import SyncOptions, SyncReport, sync_list
from tests.test_loader_sync import QUIET, blocklist_config, write_numbers
from tests.test_subscribers import CSV, SUB_A, subscribers_config

SEED = ("15162065613", "15162065614", "15162065615")


def skipped(report: SyncReport) -> bool:
    """The sync stamped the list without reading its source."""
    return report.outcome == "unchanged" and report.not_modified and report.rows_read == 0


async def test_an_unchanged_file_is_not_read_again(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    config = blocklist_config(make_config, tmp_path)
    first = await sync_list(redis, config, "blocklist", QUIET)
    assert first.outcome == "success" and first.rows_read == 3
    store = ListStore(redis)
    (before,) = (await store.states(["blocklist"])).values()
    again = await sync_list(redis, config, "blocklist", QUIET)
    assert skipped(again), again.summary()
    (after,) = (await store.states(["blocklist"])).values()
    # Checked and stamped, same base: services re-read only the stamp.
    assert (after.gen, after.version) == (before.gen, before.version + 1)
    assert after.synced_at >= before.synced_at
    assert "not modified since the last sync" in again.summary()
    dry = await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert dry.not_modified and dry.outcome == "dry_run"

    # An admin change since the sync: the sync builds and undoes it, as before.
    await store.change("blocklist", "numbers", add=["15162065699"])
    undo = await sync_list(redis, config, "blocklist", QUIET)
    assert undo.outcome == "success" and undo.rows_read == 3
    assert not await store.contains("blocklist", "numbers", "15162065699")
    assert skipped(await sync_list(redis, config, "blocklist", QUIET))
    # The file changed (same size even): built.
    write_numbers(tmp_path, "15162065613", "15162065614", "15162065616")
    changed = await sync_list(redis, config, "blocklist", QUIET)
    assert changed.outcome == "success" and changed.result is not None
    assert (changed.result.added, changed.result.removed) == (1, 1)
    # --force, and the self-healing's rebuild, always read the source.
    forced = await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert forced.rows_read == 3 and not forced.not_modified
    rebuilt = await sync_list(redis, config, "blocklist", SyncOptions(rebuild=True, progress="off"))
    assert rebuilt.rows_read == 3 and not rebuilt.not_modified
    # A base Redis lost is not in meta: the sync rebuilds it although the file is the same.
    (state,) = (await store.states(["blocklist"])).values()
    await redis.delete(keys.base("blocklist", state.gen))
    healed = await sync_list(redis, config, "blocklist", QUIET)
    assert healed.outcome == "success" and healed.rows_read == 3
    assert await store.contains("blocklist", "numbers", "15162065616")


async def test_a_config_change_rebuilds(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    write_numbers(tmp_path, *SEED)
    await sync_list(redis, blocklist_config(make_config, tmp_path), "blocklist", QUIET)
    # The same file read with other settings may give other entries: read it again.
    other = blocklist_config(make_config, tmp_path, max_removal_share=0.9)
    report = await sync_list(redis, other, "blocklist", QUIET)
    assert report.rows_read == 3 and not report.not_modified


async def test_a_subscribers_list_is_rebuilt_after_an_admin_write_or_a_lost_bucket(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    (tmp_path / "personal.csv").write_text(CSV)
    config = make_config(subscribers_config(), base_dir=tmp_path)
    assert (await sync_list(redis, config, "personal", QUIET)).outcome == "success"
    assert skipped(await sync_list(redis, config, "personal", QUIET))
    # An admin write counts in {cs:personal}:changes, not in version: still rebuilt.
    subscribers = SubscriberStore(redis)
    await subscribers.change("personal", SUB_A, "15165550177", "block")
    undo = await sync_list(redis, config, "personal", QUIET)
    assert undo.outcome == "success" and undo.rows_read == 7
    assert (await subscribers.read("personal", SUB_A))[1].match("block", "15165550177") is None
    assert skipped(await sync_list(redis, config, "personal", QUIET))
    # A bucket Redis lost (its marker gone): the sync writes it again.
    gen = await subscribers.gen("personal")
    await redis.delete(keys.subscribers("personal", keys.subscriber_bucket_of(SUB_A), gen))
    healed = await sync_list(redis, config, "personal", QUIET)
    assert healed.outcome == "success" and healed.rows_read == 7
    assert (await subscribers.read_marked("personal", SUB_A))[2] is False  # marker back
    assert skipped(await sync_list(redis, config, "personal", QUIET))
