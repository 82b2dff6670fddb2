"""A real ``python -m loader sync`` killed with SIGKILL mid-sync leaves the old list whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from loader.sync import SyncOptions, sync_list
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
OLD = [f"1516206{n:04d}" for n in range(1000)]
BIG_ROWS = 1_500_000


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old numbers plus 1.5 M random NANP numbers, as a plain-text list."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    rng = np.random.default_rng(3)
    numbers = rng.integers(2_002_000_000, 9_899_999_999, size=BIG_ROWS, dtype=np.int64)
    path.write_text("\n".join(OLD) + "\n" + "\n".join(map(str, numbers.tolist())) + "\n")
    return path


def checksum_of(buckets: dict[bytes, bytes]) -> str:
    """The checksum core.build computes, recomputed from the stored base."""
    digest = hashlib.sha256()
    for bucket in sorted(int(b) for b in buckets):
        digest.update(bucket.to_bytes(2, "little") + buckets[str(bucket).encode()])
    return "sha256:" + digest.hexdigest()


@pytest.mark.parametrize("moment", ["staging", "finishing"])
async def test_a_loader_killed_mid_sync_leaves_the_old_list_whole(
    moment: str,
    redis: Redis,
    redis_server: RedisProcess,
    make_config: Callable[..., Config],
    big_file: Path,
    tmp_path: Path,
) -> None:
    (tmp_path / "old.txt").write_text("\n".join(OLD) + "\n")
    data = {
        "redis": {"url": redis_server.url},
        "loader": {"batch_size": 100_000, "lock_ttl_s": 1},
        "lists": {"blocklist": {"source": "old.txt"}},
    }
    old_config = make_config(data, base_dir=tmp_path)
    await sync_list(redis, old_config, "blocklist", SyncOptions(progress="off"))
    store = ListStore(redis)
    before = await store.meta("blocklist")
    assert before is not None and before.size == len(OLD)

    data["lists"] = {"blocklist": {"source": str(big_file)}}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    loader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loader",
        "--config",
        str(config_file),
        "--progress",
        "off",
        "sync",
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    new_gen = before.gen + 1
    staged = keys.stage("blocklist", new_gen, 0).rsplit(":", 1)[0] + ":*"

    async def at_moment() -> bool:
        if loader.returncode is not None:  # ended early: show why
            assert loader.stderr is not None
            raise AssertionError((await loader.stderr.read()).decode())
        if moment == "staging":
            return bool([k async for k in redis.scan_iter(staged, count=10_000)])
        return bool(await redis.exists(keys.base("blocklist", new_gen)))

    try:
        await wait_for(at_moment, timeout_s=60, interval_s=0.01)
        loader.send_signal(signal.SIGKILL)
    finally:
        if loader.returncode is None:
            loader.kill()
        await loader.wait()
    assert loader.returncode == -signal.SIGKILL

    # The old list is whole: same generation, size, checksum and members.
    after = await store.meta("blocklist")
    assert after == before
    base: dict[bytes, bytes] = await redis.hgetall(keys.base("blocklist", before.gen))  # type: ignore[assignment]
    assert checksum_of(base) == before.checksum
    assert sum(len(blob) // 8 for blob in base.values()) == len(OLD)
    assert all([await store.contains("blocklist", "numbers", n) for n in OLD[::97]])
    assert not await store.contains("blocklist", "numbers", "19899999998")

    # What the dead sync wrote expires on its own...
    leftovers = [
        k
        async for k in redis.scan_iter("{cs:blocklist}:*", count=10_000)
        if k not in (keys.meta("blocklist").encode(), keys.base("blocklist", before.gen).encode())
    ]
    assert leftovers
    ttls = {k: await redis.pttl(k) for k in leftovers}
    # -2: already gone (the lock's TTL is 1 s here); -1 (no TTL) would leak forever
    assert all(ttl == -2 or 0 < ttl <= keys.STAGING_TTL_S * 1000 for ttl in ttls.values()), ttls

    # ...and the next sync, once the dead one's lock lapsed, deletes it straight away.
    async def lock_lapsed() -> bool:
        return not await redis.exists(keys.lock("blocklist"))

    await wait_for(lock_lapsed, timeout_s=5)
    report = await sync_list(redis, old_config, "blocklist", SyncOptions(progress="off"))
    assert report.outcome == "unchanged"
    remaining = {k async for k in redis.scan_iter("{cs:blocklist}:*", count=10_000)}
    assert remaining == {
        keys.meta("blocklist").encode(),
        keys.base("blocklist", before.gen).encode(),
    }
