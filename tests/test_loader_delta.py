"""Delta files (+entry / -entry) and compaction of single-entry changes into a new base."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from core.build import SwapConflict, start_build
from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from loader.delta import apply_delta, compact_list
from loader.sync import SyncOptions, sync_list

ROOT = Path(__file__).resolve().parent.parent


def config_for(make_config: Callable[..., Config], folder: Path, compact_over: int = 0) -> Config:
    (folder / "blocklist.txt").write_text("5162065613\n5162065614\n")
    return make_config(
        {
            "loader": {"compact_over": compact_over},
            "lists": {
                "blocklist": {"source": "blocklist.txt"},
                "cnam": {"kind": "names"},
            },
        },
        base_dir=folder,
    )


async def test_a_delta_file_adds_and_removes_in_order_and_reports_bad_lines(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = config_for(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", SyncOptions(progress="off"))
    delta = tmp_path / "today.delta"
    delta.write_text(
        "# complaints\n"
        "+15162065617\n"
        "+ +1 (516) 206-5618\n"
        "-5162065613\n"
        "\n"
        "5162065619\n"  # no sign
        "+not-a-number\n"
        "+15162065620\n"
        "-15162065620\n"  # the last line for an entry wins, in a batch or across batches
        "-15162065617\n"
        "+15162065617\n"
    )
    report = await apply_delta(redis, config, "blocklist", delta, batch_size=3, progress="off")
    assert report.bad_lines == [
        f"{delta}:6: a change starts with '+' (add) or '-' (remove)",
        f"{delta}:7: not a telephone number: 'not-a-number'",
    ]
    assert (report.lines, report.rejected) == (9, 2)
    store = ListStore(redis)
    listed = {
        n: await store.contains("blocklist", "numbers", n)
        for n in ("15162065613", "15162065614", "15162065617", "15162065618", "15162065620")
    }
    assert listed == {
        "15162065613": False,
        "15162065614": True,
        "15162065617": True,
        "15162065618": True,
        "15162065620": False,
    }


async def test_names_deltas_are_canonicalised_like_every_other_entry(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = config_for(make_config, tmp_path)
    delta = tmp_path / "names.txt"
    delta.write_text("+Contains:Warranty\n+re:^V[0-9]{6}$\n")
    await apply_delta(redis, config, "cnam", delta, progress="off")
    store = ListStore(redis)
    assert await store.contains("cnam", "names", "contains:warranty")
    assert await store.contains("cnam", "names", "re:^V[0-9]{6}$")


async def test_compaction_folds_changes_into_a_new_base_with_the_same_entries(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = config_for(make_config, tmp_path, compact_over=2)
    await sync_list(redis, config, "blocklist", SyncOptions(progress="off"))
    store = ListStore(redis)
    synced = await store.meta("blocklist")
    delta = tmp_path / "d.txt"
    delta.write_text("+15162065617\n+15162065618\n-15162065613\n")
    report = await apply_delta(redis, config, "blocklist", delta, progress="off")
    assert report.compacted
    meta = await store.meta("blocklist")
    assert meta is not None and synced is not None
    assert (meta.pending_adds, meta.pending_dels, meta.size) == (0, 0, 3)
    assert meta.gen > synced.gen
    # the last sync's time, source and diff are kept: compaction is not a sync
    assert (meta.synced_at, meta.source, meta.added) == (synced.synced_at, synced.source, 2)
    assert not await store.contains("blocklist", "numbers", "15162065613")
    assert await store.contains("blocklist", "numbers", "15162065618")
    assert await compact_list(redis, config, "blocklist") is None  # nothing pending


async def test_compaction_of_an_admin_only_list_and_a_change_during_it(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = config_for(make_config, tmp_path)
    store = ListStore(redis)
    await store.change("cnam", "names", add=["spam caller", "contains:warranty"])
    assert await compact_list(redis, config, "cnam") is not None
    meta = await store.meta("cnam")
    assert meta is not None and (meta.size, meta.pending_adds) == (2, 0)
    assert await store.contains("cnam", "names", "spam caller")

    # A change that lands while a rebuild runs wins: the rebuild is dropped.
    version = (await store.states(["cnam"]))["cnam"].version
    builder = await start_build(redis, "cnam", "names")
    await builder.add(["spam caller", "contains:warranty"])
    await builder.finish()
    await store.change("cnam", "names", add=["late entry"])
    with pytest.raises(SwapConflict, match="changed while it was being rebuilt"):
        await builder.commit({}, expect_version=version, compaction=True)
    await builder.abort()
    assert await store.contains("cnam", "names", "late entry")


async def test_the_apply_command(redis: Redis, redis_server: RedisProcess, tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump({"redis": {"url": redis_server.url}, "lists": {"blocklist": {}}})
    )
    (tmp_path / "d.txt").write_text("+15162065617\nbad\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loader", "--config", str(config_file), "--progress", "off",
        "apply", "--list", "blocklist", str(tmp_path / "d.txt"),
        cwd=ROOT, env=os.environ.copy(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1  # a line was skipped
    assert "d.txt:2: a change starts with '+'" in err.decode()
    assert "applied" in err.decode() and "+1 -0" in err.decode()
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065617")
