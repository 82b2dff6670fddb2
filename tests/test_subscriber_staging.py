"""A subscribers sync stages its rows on the loader's disk, not in Redis (core/build/
subscribers.py): Redis holds the live generation and the new one, no text rows, and
nothing of the new one before the commit; the staging folder goes when the build is
committed or aborted, or with the next build after its loader was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core import keys
from core.build import SubscriberListBuilder, start_build
from core.build.subscribers import STAGE_PREFIX, StagingError
from core.config import Config
from core.subscribers import SubscriberStore, code_of
from loader.sync import SyncOptions, SyncRefused, sync_list
from tests.test_subscribers import subscribers_config

SUBSCRIBERS = [f"1951262{n:04d}" for n in range(300)]


@pytest.fixture
def tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder ``tempfile`` hands out (as TMPDIR would), the test's own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


async def _staged_build(redis: Redis) -> SubscriberListBuilder:
    """A build of list ``personal`` with 600 pairs staged, written out in batches of 50."""
    builder = await start_build(redis, "personal", "subscribers", batch_size=50)
    assert isinstance(builder, SubscriberListBuilder)
    for subscriber in SUBSCRIBERS:
        await builder.add_pair(subscriber, code_of("15165550101", "block"))
        await builder.add_pair(subscriber, code_of("1900*", "block"))
    return builder


async def _key_names(redis: Redis) -> list[str]:
    return sorted(keys.decoded(key) for key in await redis.keys("*"))


def _names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def _stages(tmp_dir: Path) -> list[Path]:
    return sorted(tmp_dir.glob(f"{STAGE_PREFIX}personal.*"))


async def test_rows_are_staged_on_disk_and_removed_once_the_list_is_built(
    redis: Redis, tmp_dir: Path
) -> None:
    builder = await _staged_build(redis)
    # Staged so far: files in one folder of this process; in Redis only the list's meta
    # and its build lock, no row.
    (stage,) = _stages(tmp_dir)
    assert list(stage.glob("*.txt"))
    assert not [name for name in await _key_names(redis) if ":stage" in name]
    result = await builder.finish()
    assert result.size == 600 and result.added == 600
    # Counted and packed, still nothing in Redis: a dry run or a refused sync that
    # stops here has written no bucket.
    assert not [name for name in await _key_names(redis) if ":sub:" in name]
    await builder.commit({"source": "test"})
    assert not _stages(tmp_dir)
    _, entries = await SubscriberStore(redis).read("personal", SUBSCRIBERS[123])
    assert entries.as_dict()["block"] == ["15165550101", "1900*"]


async def test_an_aborted_build_leaves_no_folder_and_no_keys(redis: Redis, tmp_dir: Path) -> None:
    builder = await _staged_build(redis)
    assert _stages(tmp_dir)
    await builder.abort()  # as a dry run or a refused sync does
    assert not _stages(tmp_dir)
    assert not [name for name in await _key_names(redis) if "personal" in name]


def _leftover_folders(tmp_dir: Path) -> dict[str, Path]:
    """Staging folders of list ``personal`` left by a loader whose process is gone, by
    this process's pid (a restarted container's earlier life), and by a loader still
    running (pid 1: it may sync a list of that name into another Redis); and one of a
    gone loader of list ``personal-2`` (a name that starts the same)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(gone.stdout)
    made = {
        "dead": tmp_dir / f"{STAGE_PREFIX}personal.{dead}.abc123",
        "own pid": tmp_dir / f"{STAGE_PREFIX}personal.{os.getpid()}.def456",
        "running": tmp_dir / f"{STAGE_PREFIX}personal.1.ghi789",
        "other list": tmp_dir / f"{STAGE_PREFIX}personal-2.{dead}.jkl012",
    }
    for folder in made.values():
        folder.mkdir()
        (folder / "0.txt").write_text("5 19512620001 x\n")
    return made


async def test_a_killed_loaders_folder_goes_with_the_next_build_of_the_list(
    redis: Redis, tmp_dir: Path
) -> None:
    made = _leftover_folders(tmp_dir)
    builder = await _staged_build(redis)
    left = _names(tmp_dir)
    assert made["dead"].name not in left
    assert made["own pid"].name not in left
    assert {made["running"].name, made["other list"].name} <= left
    await builder.abort()
    assert _names(tmp_dir) == {made["running"].name, made["other list"].name}


async def test_a_stage_that_cannot_be_written_fails_the_sync_with_a_clear_error(
    redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TMPDIR naming something that is not a folder (as a full or read-only disk
    would): the build stops with an error naming the list and TMPDIR, nothing is left."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    builder = await start_build(redis, "personal", "subscribers", batch_size=10)
    assert isinstance(builder, SubscriberListBuilder)
    with pytest.raises(StagingError, match=r"'personal'.*TMPDIR must name a folder"):
        for subscriber in SUBSCRIBERS[:20]:
            await builder.add_pair(subscriber, code_of("15165550101", "block"))
    await builder.abort()
    assert not [name for name in await _key_names(redis) if "personal" in name]


async def _hsets(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hset", {}).get("calls", 0))


async def test_syncs_that_change_nothing_or_are_refused_write_no_bucket(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path, tmp_dir: Path
) -> None:
    """The source rewritten with the same pairs in another order, then with most of them
    gone (refused by max_removal_share), then as a dry run: each is read and compared,
    and not one of the 16,384 buckets of a new generation is written to Redis."""
    config = make_config(subscribers_config(), base_dir=tmp_path)
    source = tmp_path / "personal.csv"
    rows = [f"1951262{i:04d},1516555{i:04d}\n" for i in range(40)]
    source.write_text("".join(rows))
    assert (await sync_list(redis, config, "personal")).outcome == "success"
    await redis.config_resetstat()
    source.write_text("".join(reversed(rows)))
    assert (await sync_list(redis, config, "personal")).outcome == "unchanged"
    source.write_text("".join(rows[:10]))
    with pytest.raises(SyncRefused, match="max_removal_share"):
        await sync_list(redis, config, "personal")
    dry = await sync_list(redis, config, "personal", SyncOptions(dry_run=True))
    assert dry.outcome == "dry_run"
    assert await _hsets(redis) < 10  # the list's meta, never a bucket
    assert not _stages(tmp_dir)
