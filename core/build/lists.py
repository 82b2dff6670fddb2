"""Builders for ``numbers`` lists (packed per bucket) and ``prefixes``/``names`` sets."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from core import keys, overlay
from core.build.base import BuildLock, BuildResult, ListBuilder
from core.store import BUCKETS_PER_READ, RedisClient

_LE_U64 = np.dtype("<u8")


def _by_bucket(entries: Iterable[str]) -> dict[int, np.ndarray[Any, Any]]:
    """Canonical number strings grouped by bucket, each group sorted."""
    numbers = np.array(sorted(int(e) for e in entries if e.isdigit()), dtype=_LE_U64)
    groups: dict[int, np.ndarray[Any, Any]] = {}
    buckets = numbers % keys.NUMBER_BUCKETS
    for bucket in np.unique(buckets).tolist():
        groups[bucket] = numbers[buckets == bucket]
    return groups


class NumberListBuilder(ListBuilder):
    """Numbers: staged per bucket, then sorted, de-duplicated and packed in ``finish``."""

    def __init__(
        self,
        redis: RedisClient,
        name: str,
        gen: int,
        old_gen: int,
        *,
        batch_size: int,
        lock: BuildLock | None = None,
    ) -> None:
        super().__init__(redis, name, "numbers", gen, old_gen, lock=lock)
        self.batch_size = batch_size
        self._pending: list[int] = []
        #: Buckets whose staging key already carries its TTL.
        self._expiring = np.zeros(keys.NUMBER_BUCKETS, dtype=bool)

    async def add(self, entries: Iterable[str]) -> None:
        pending = self._pending
        for entry in entries:
            pending.append(int(entry))
            if len(pending) >= self.batch_size:
                await self._flush()
                pending = self._pending

    async def add_ints(self, numbers: np.ndarray[Any, Any]) -> None:
        """Add already-normalised numbers (a uint64 array) in one go."""
        await self._flush()
        await self._stage(numbers.astype(_LE_U64, copy=False))

    async def _flush(self) -> None:
        if self._pending:
            numbers = np.array(self._pending, dtype=_LE_U64)
            self._pending = []
            await self._stage(numbers)

    async def _stage(self, numbers: np.ndarray[Any, Any]) -> None:
        if not numbers.size:
            return
        await self._refresh_lock()
        buckets = numbers % keys.NUMBER_BUCKETS
        order = np.argsort(buckets, kind="stable")
        numbers, buckets = numbers[order], buckets[order]
        present, starts = np.unique(buckets, return_index=True)
        ends = [*starts[1:].tolist(), numbers.size]
        expiring = self._expiring
        async with self.redis.pipeline(transaction=True) as pipe:
            for bucket, start, end in zip(present.tolist(), starts.tolist(), ends, strict=True):
                key = keys.stage(self.name, self.gen, bucket)
                pipe.append(key, numbers[start:end].tobytes())
                # One EXPIRE per key is enough: APPEND keeps the TTL.
                if not expiring[bucket]:
                    pipe.expire(key, keys.STAGING_TTL_S)
                    expiring[bucket] = True
            await pipe.execute()

    async def finish(self, *, sample: int = 0) -> BuildResult:
        await self._flush()
        live_adds, live_dels = await self._live_deltas()
        adds_by_bucket, dels_by_bucket = _by_bucket(live_adds), _by_bucket(live_dels)
        kept = await overlay.read(self.redis, self.name)  # admin entries outlive syncs
        kept_adds, kept_dels = _by_bucket(kept.adds), _by_bucket(kept.dels)
        new_key = keys.base(self.name, self.gen)
        old_key = keys.base(self.name, self.old_gen) if self.old_gen else None
        digest = hashlib.sha256()
        size = added = removed = old_size = 0
        added_sample: list[int] = []
        removed_sample: list[int] = []
        for first in range(0, keys.NUMBER_BUCKETS, BUCKETS_PER_READ):
            await self._refresh_lock()
            ids = list(range(first, min(first + BUCKETS_PER_READ, keys.NUMBER_BUCKETS)))
            stage_keys = [keys.stage(self.name, self.gen, b) for b in ids]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in stage_keys:
                    pipe.get(key)
                if old_key:
                    pipe.hmget(old_key, ids)
                replies = await pipe.execute()
            olds = replies[-1] if old_key else [None] * len(ids)
            packed: dict[int, bytes] = {}
            for bucket, staged, old_blob in zip(ids, replies[: len(ids)], olds, strict=True):
                new = np.unique(np.frombuffer(staged or b"", dtype=_LE_U64))
                if bucket in kept_adds:
                    new = np.union1d(new, kept_adds[bucket])
                if bucket in kept_dels:
                    new = np.setdiff1d(new, kept_dels[bucket], assume_unique=True)
                old = np.frombuffer(old_blob or b"", dtype=_LE_U64)
                if bucket in adds_by_bucket:
                    old = np.union1d(old, adds_by_bucket[bucket])
                if bucket in dels_by_bucket:
                    old = np.setdiff1d(old, dels_by_bucket[bucket], assume_unique=True)
                size += new.size
                old_size += old.size
                if new.size or old.size:
                    more = np.setdiff1d(new, old, assume_unique=True)
                    fewer = np.setdiff1d(old, new, assume_unique=True)
                    added += more.size
                    removed += fewer.size
                    if len(added_sample) < sample:
                        added_sample.extend(more[: sample - len(added_sample)].tolist())
                    if len(removed_sample) < sample:
                        removed_sample.extend(fewer[: sample - len(removed_sample)].tolist())
                if new.size:
                    blob = new.astype(_LE_U64, copy=False).tobytes()
                    packed[bucket] = blob
                    digest.update(bucket.to_bytes(2, "little") + blob)
            async with self.redis.pipeline(transaction=True) as pipe:
                if packed:
                    pipe.hset(new_key, mapping=packed)  # type: ignore[arg-type]
                    pipe.expire(new_key, keys.STAGING_TTL_S)
                pipe.delete(*stage_keys)
                await pipe.execute()
        self.result = BuildResult(
            size,
            added,
            removed,
            "sha256:" + digest.hexdigest(),
            old_size,
            tuple(str(n) for n in added_sample),
            tuple(str(n) for n in removed_sample),
        )
        return self.result

    async def _delete_built(self) -> None:
        stage_keys = [keys.stage(self.name, self.gen, b) for b in range(keys.NUMBER_BUCKETS)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for first in range(0, len(stage_keys), BUCKETS_PER_READ):
                pipe.delete(*stage_keys[first : first + BUCKETS_PER_READ])
            pipe.delete(keys.base(self.name, self.gen))
            await pipe.execute()


class SetListBuilder(ListBuilder):
    """Prefixes and names: a plain Redis set, small enough to diff in memory."""

    async def add(self, entries: Iterable[str]) -> None:
        batch = list(entries)
        if batch:
            await self._refresh_lock()
            key = keys.base(self.name, self.gen)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(key, *batch)
                pipe.expire(key, keys.STAGING_TTL_S)
                await pipe.execute()

    async def finish(self, *, sample: int = 0) -> BuildResult:
        new_key = keys.base(self.name, self.gen)
        kept = await overlay.read(self.redis, self.name)  # admin entries outlive syncs
        if kept.adds or kept.dels:
            async with self.redis.pipeline(transaction=True) as pipe:
                if kept.adds:
                    pipe.sadd(new_key, *kept.adds)
                if kept.dels:
                    pipe.srem(new_key, *kept.dels)
                pipe.expire(new_key, keys.STAGING_TTL_S)
                await pipe.execute()
        members = sorted(keys.decoded(m) for m in await self.redis.smembers(new_key))
        old: set[str] = set()
        if self.old_gen:
            old = {
                keys.decoded(m)
                for m in await self.redis.smembers(keys.base(self.name, self.old_gen))
            }
        live_adds, live_dels = await self._live_deltas()
        old = (old - live_dels) | live_adds
        new = set(members)
        digest = hashlib.sha256("\n".join(members).encode())
        self.result = BuildResult(
            size=len(new),
            added=len(new - old),
            removed=len(old - new),
            checksum="sha256:" + digest.hexdigest(),
            old_size=len(old),
            added_sample=tuple(sorted(new - old)[:sample]),
            removed_sample=tuple(sorted(old - new)[:sample]),
        )
        return self.result
