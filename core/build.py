"""Full replacement of a list: build a new base aside, then swap it in atomically.

A sync streams canonical entries into a :class:`ListBuilder`, which writes them to keys
nobody reads (with a TTL, so a killed sync leaves nothing behind for long). ``finish``
turns them into the new base and counts the diff against the live one; ``commit`` then
points ``meta.gen`` at it in one MULTI/EXEC, guarded by WATCH so two syncs of one list
cannot both win. Until that EXEC, readers see the old list whole; after it, the new one.

Memory stays flat whatever the list's size: numbers are buffered ``batch_size`` at a
time and appended to per-bucket staging strings; ``finish`` then works one group of
buckets at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import WatchError

from core import keys
from core.config import ListKind
from core.store import BUCKETS_PER_READ, RedisClient

_LE_U64 = np.dtype("<u8")


class SwapConflict(RuntimeError):
    """Another writer swapped the list while this sync was building; nothing was changed."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    """The new base and how it differs from the live one."""

    size: int
    added: int
    removed: int
    checksum: str
    old_size: int


class ListBuilder:
    """Builds one new base for a list; use :func:`start_build` to get one."""

    def __init__(self, redis: RedisClient, name: str, kind: ListKind, gen: int, old_gen: int):
        self.redis = redis
        self.name = name
        self.kind = kind
        self.gen = gen
        self.old_gen = old_gen
        self.result: BuildResult | None = None

    async def add(self, entries: Iterable[str]) -> None:
        raise NotImplementedError

    async def finish(self) -> BuildResult:
        raise NotImplementedError

    async def _delete_built(self) -> None:
        await self.redis.delete(keys.base(self.name, self.gen))

    async def abort(self) -> None:
        """Drop everything this build wrote; the live list is untouched."""
        await self._delete_built()

    async def commit(self, fields: Mapping[str, str | int | float]) -> int:
        """Swap the new base in; ``fields`` go to ``meta`` (source, rows, ...). Returns version.

        Raises :class:`SwapConflict` if the live generation changed since the build began.
        """
        if self.result is None:
            raise RuntimeError("finish() the build before commit()")
        meta_key = keys.meta(self.name)
        live_gen = self.gen if self.result.size else 0
        new_meta: dict[str, str | int | float] = {
            **fields,
            "kind": self.kind,
            "gen": live_gen,
            "size": self.result.size,
            "checksum": self.result.checksum,
            "added": self.result.added,
            "removed": self.result.removed,
            "synced_at": f"{time.time():.3f}",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(meta_key)
                current = int(await pipe.hget(meta_key, "gen") or 0)
                if current != self.old_gen:
                    raise SwapConflict(
                        f"list {self.name!r} was replaced by another sync while this one ran"
                    )
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(meta_key, mapping=new_meta)  # type: ignore[arg-type]
                pipe.hincrby(meta_key, "version", 1)
                pipe.delete(keys.adds(self.name), keys.dels(self.name))
                if live_gen:
                    pipe.persist(keys.base(self.name, live_gen))
                if self.old_gen:
                    pipe.expire(keys.base(self.name, self.old_gen), keys.OLD_GENERATION_GRACE_S)
                replies = await pipe.execute()
            except WatchError:
                raise SwapConflict(
                    f"list {self.name!r} changed generation while this sync swapped"
                ) from None
        if not live_gen:
            await self._delete_built()
        return int(replies[1])


class NumberListBuilder(ListBuilder):
    """Numbers: staged per bucket, then sorted, de-duplicated and packed in ``finish``."""

    def __init__(
        self,
        redis: RedisClient,
        name: str,
        gen: int,
        old_gen: int,
        batch_size: int,
    ) -> None:
        super().__init__(redis, name, "numbers", gen, old_gen)
        self.batch_size = batch_size
        self._pending: list[int] = []

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
        buckets = numbers % keys.NUMBER_BUCKETS
        order = np.argsort(buckets, kind="stable")
        numbers, buckets = numbers[order], buckets[order]
        present, starts = np.unique(buckets, return_index=True)
        ends = [*starts[1:].tolist(), numbers.size]
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket, start, end in zip(present.tolist(), starts.tolist(), ends, strict=True):
                key = keys.stage(self.name, self.gen, bucket)
                pipe.append(key, numbers[start:end].tobytes())
                pipe.expire(key, keys.STAGING_TTL_S)
            await pipe.execute()

    async def finish(self) -> BuildResult:
        await self._flush()
        new_key = keys.base(self.name, self.gen)
        old_key = keys.base(self.name, self.old_gen) if self.old_gen else None
        digest = hashlib.sha256()
        size = added = removed = old_size = 0
        for first in range(0, keys.NUMBER_BUCKETS, BUCKETS_PER_READ):
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
                old = np.frombuffer(old_blob or b"", dtype=_LE_U64)
                size += new.size
                old_size += old.size
                if new.size or old.size:
                    added += np.setdiff1d(new, old, assume_unique=True).size
                    removed += np.setdiff1d(old, new, assume_unique=True).size
                if new.size:
                    blob = new.astype(_LE_U64, copy=False).tobytes()
                    packed[bucket] = blob
                    digest.update(bucket.to_bytes(2, "little") + blob)
            async with self.redis.pipeline(transaction=False) as pipe:
                if packed:
                    pipe.hset(new_key, mapping=packed)  # type: ignore[arg-type]
                    pipe.expire(new_key, keys.STAGING_TTL_S)
                pipe.delete(*stage_keys)
                await pipe.execute()
        self.result = BuildResult(size, added, removed, "sha256:" + digest.hexdigest(), old_size)
        return self.result

    async def _delete_built(self) -> None:
        stage_keys = [keys.stage(self.name, self.gen, b) for b in range(keys.NUMBER_BUCKETS)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for first in range(0, len(stage_keys), BUCKETS_PER_READ):
                pipe.delete(*stage_keys[first : first + BUCKETS_PER_READ])
            pipe.delete(keys.base(self.name, self.gen))
            await pipe.execute()


class SetListBuilder(ListBuilder):
    """Prefixes and names: a plain Redis set, small enough to diff with SDIFF."""

    def __init__(
        self, redis: RedisClient, name: str, kind: ListKind, gen: int, old_gen: int
    ) -> None:
        super().__init__(redis, name, kind, gen, old_gen)

    async def add(self, entries: Iterable[str]) -> None:
        batch = list(entries)
        if batch:
            key = keys.base(self.name, self.gen)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(key, *batch)
                pipe.expire(key, keys.STAGING_TTL_S)
                await pipe.execute()

    async def finish(self) -> BuildResult:
        new_key = keys.base(self.name, self.gen)
        members = sorted(
            m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(new_key)
        )
        old: set[str] = set()
        if self.old_gen:
            old = {
                m.decode() if isinstance(m, bytes) else m
                for m in await self.redis.smembers(keys.base(self.name, self.old_gen))
            }
        new = set(members)
        digest = hashlib.sha256("\n".join(members).encode())
        self.result = BuildResult(
            size=len(new),
            added=len(new - old),
            removed=len(old - new),
            checksum="sha256:" + digest.hexdigest(),
            old_size=len(old),
        )
        return self.result


async def start_build(
    redis: RedisClient, name: str, kind: ListKind, *, batch_size: int = 100_000
) -> ListBuilder:
    """Reserve a new generation for ``name`` and return a builder for it."""
    meta_key = keys.meta(name)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hincrby(meta_key, "next_gen", 1)
        pipe.hget(meta_key, "gen")
        gen, old_gen = await pipe.execute()
    old = int(old_gen or 0)
    if kind == "numbers":
        return NumberListBuilder(redis, name, int(gen), old, batch_size)
    return SetListBuilder(redis, name, kind, int(gen), old)
