"""The builder of a ``subscribers`` list (:mod:`core.subscribers`): staged per bucket,
then settled, packed and diffed against the live generation a round of buckets at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from core import keys, subscriber_overlay
from core.build.base import BuildLock, BuildResult, ListBuilder
from core.store import RedisClient
from core.subscribers import MAX_ENTRIES as subscribers_max
from core.subscribers import entry_of as subscribers_entry_of
from core.subscribers import pack as subscribers_pack
from core.subscribers import settle as subscribers_settle
from core.subscribers import unpack_codes as subscribers_unpack

logger = logging.getLogger(__name__)

#: Buckets of a subscribers list handled per pipelined round trip while building.
SUBSCRIBER_BUCKETS_PER_ROUND = 512


class SubscriberListBuilder(ListBuilder):
    """A subscribers list (:mod:`core.subscribers`): staged per bucket, packed in ``finish``.

    Sizes count pairs (subscriber, entry). ``finish`` works
    :data:`SUBSCRIBER_BUCKETS_PER_ROUND` buckets at a time, so memory stays flat. The new
    buckets carry a TTL until just before the swap (one MULTI/EXEC on ``meta``); a build
    killed before it leaves ``meta.building`` (deleted by the next build), one killed
    after it ``meta.retiring`` (expired by the next build). Every new bucket gets the
    :data:`core.keys.SUBSCRIBER_MARKER` field; a live bucket found without it is diffed as
    empty and counted in :attr:`lost_buckets`.
    """

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
        super().__init__(redis, name, "subscribers", gen, old_gen, lock=lock)
        self.batch_size = batch_size
        self._pending: dict[int, list[str]] = {}
        self._count = 0
        self._expiring = np.zeros(keys.SUBSCRIBER_BUCKETS, dtype=bool)
        #: Subscribers in the new generation (set by ``finish``).
        self.subscribers = 0
        #: Buckets of the live generation that had lost their marker (set by ``finish``).
        self.lost_buckets = 0

    async def add(self, entries: Iterable[str]) -> None:
        raise TypeError("a subscribers list takes pairs: use add_pair()")

    async def add_pair(self, subscriber: str, code: str) -> None:
        """Stage one canonical subscriber with one packed code (core.subscribers.code_of)."""
        bucket = keys.subscriber_bucket_of(subscriber)
        self._pending.setdefault(bucket, []).append(f"{subscriber} {code}\n")
        self._count += 1
        if self._count >= self.batch_size:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        await self._refresh_lock()
        pending, self._pending, self._count = self._pending, {}, 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket, lines in pending.items():
                key = keys.subscribers_stage(self.name, bucket, self.gen)
                pipe.append(key, "".join(lines))
                if not self._expiring[bucket]:
                    pipe.expire(key, keys.STAGING_TTL_S)
                    self._expiring[bucket] = True
            await pipe.execute()

    async def _each_bucket(self, command: str, *args: Any, gen: int) -> None:
        """Run ``command`` on every bucket key of generation ``gen`` (pipelined)."""
        for first in range(0, keys.SUBSCRIBER_BUCKETS, 2048):
            await self._refresh_lock()
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket in range(first, min(first + 2048, keys.SUBSCRIBER_BUCKETS)):
                    getattr(pipe, command)(keys.subscribers(self.name, bucket, gen), *args)
                    if command == "delete":
                        pipe.delete(keys.subscribers_stage(self.name, bucket, gen))
                await pipe.execute()

    async def _retire_leftover(self) -> None:
        """Expire the buckets of a generation a killed loader swapped out (``retiring``).

        Also delete those of a generation the admin API began to allocate and never made
        live (``marking``, core/subscribers.py): once a generation is live, none can be
        adopted any more. With none live, an admin write may be marking it right now.
        """
        meta_key = keys.meta(self.name)
        fields = await self.redis.hmget(meta_key, ["retiring", "marking"])
        retiring, marking = (int(value or 0) for value in fields)
        if retiring and retiring not in (self.gen, self.old_gen):
            await self._each_bucket("expire", keys.OLD_GENERATION_GRACE_S, gen=retiring)
            await self.redis.hdel(meta_key, "retiring")
        if self.old_gen and marking and marking not in (self.gen, self.old_gen):
            await self.redis.hdel(meta_key, "marking")
            await self._each_bucket("delete", gen=marking)

    async def finish(self, *, sample: int = 0) -> BuildResult:
        await self._flush()
        await self._retire_leftover()
        tally = _Tally(sample)
        step = SUBSCRIBER_BUCKETS_PER_ROUND
        now_s = time.time()  # admin overlay fields expired by then are left out
        for first in range(0, keys.SUBSCRIBER_BUCKETS, step):
            await self._refresh_lock()
            ids = range(first, min(first + step, keys.SUBSCRIBER_BUCKETS))
            rows = await self._read_round(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket, (staged, old_raw, kept) in zip(ids, rows, strict=True):
                    packed = tally.settle(staged, subscriber_overlay.live(kept, now_s))
                    tally.diff(packed, self._old_entries(old_raw, tally))
                    self._write_bucket(pipe, bucket, packed, staged)
                await pipe.execute()
        self._report(tally)
        self.subscribers = tally.subscribers
        self.lost_buckets = tally.lost
        self.result = tally.result()
        return self.result

    async def _read_round(
        self, ids: range
    ) -> list[tuple[bytes | None, dict[bytes, bytes], dict[bytes, bytes]]]:
        """Each bucket's staged rows, its live hash (none without a live generation) and
        its admin overlay (:mod:`core.subscriber_overlay`)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in ids:
                pipe.get(keys.subscribers_stage(self.name, bucket, self.gen))
                if self.old_gen:
                    pipe.hgetall(keys.subscribers(self.name, bucket, self.old_gen))
                pipe.hgetall(keys.subscriber_overlay(self.name, bucket))
            replies = await pipe.execute()
        if not self.old_gen:
            return [(staged, {}, kept) for staged, kept in zip(*[iter(replies)] * 2, strict=True)]
        return list(zip(*[iter(replies)] * 3, strict=True))

    def _old_entries(self, old_raw: dict[bytes, bytes], tally: _Tally) -> dict[str, list[str]]:
        """The live bucket's subscribers and codes; none when Redis lost the bucket."""
        if self.old_gen and _MARKER not in old_raw:
            tally.lost += 1  # Redis lost this bucket: what it holds is no base
            return {}
        return {keys.decoded(k): subscribers_unpack(v) for k, v in old_raw.items() if k != _MARKER}

    def _write_bucket(
        self, pipe: Any, bucket: int, packed: dict[str, bytes], staged: bytes | None
    ) -> None:
        """Write one bucket of the new generation (with a TTL until the swap)."""
        # Every bucket, empty or not, gets the marker (core/keys.py).
        key = keys.subscribers(self.name, bucket, self.gen)
        pipe.hset(key, mapping={keys.SUBSCRIBER_MARKER: self.gen, **packed})
        pipe.expire(key, keys.STAGING_TTL_S)
        if staged:
            pipe.delete(keys.subscribers_stage(self.name, bucket, self.gen))

    def _report(self, tally: _Tally) -> None:
        if tally.dropped:
            logger.warning(
                "list %r: %d entries dropped: duplicates, or over %d a subscriber",
                self.name,
                tally.dropped,
                subscribers_max,
            )
        if tally.lost:
            logger.warning(
                "list %r: %d buckets of the live generation %d had lost their marker (Redis "
                "lost them); this sync writes them again",
                self.name,
                tally.lost,
                self.old_gen,
            )

    async def commit(
        self,
        fields: Mapping[str, str | int | float],
        *,
        expect_version: int | None = None,
        compaction: bool = False,
    ) -> int:
        if self.result is not None and self.result.size:
            await self._each_bucket("persist", gen=self.gen)
        extra = {"subscribers": self.subscribers, "retiring": self.old_gen}
        version = await super().commit(
            {**fields, **extra}, expect_version=expect_version, compaction=compaction
        )
        if self.old_gen:
            await self._each_bucket("expire", keys.OLD_GENERATION_GRACE_S, gen=self.old_gen)
        await self.redis.hdel(keys.meta(self.name), "retiring")
        return version

    async def _delete_built(self) -> None:
        await self._each_bucket("delete", gen=self.gen)


def _readable(pair: str) -> str:
    """``subscriber:code`` as ``subscriber:entry (side)`` for the dry-run report."""
    subscriber, _, code = pair.partition(":")
    entry, side = subscribers_entry_of(code)
    return f"{subscriber}:{entry} ({side})"


_MARKER = keys.SUBSCRIBER_MARKER.encode()


class _Tally:
    """What ``finish`` counts over the buckets: sizes, the diff, the checksum."""

    def __init__(self, sample: int) -> None:
        self.sample = sample
        self.digest = hashlib.sha256()
        self.size = self.added = self.removed = self.old_size = 0
        self.subscribers = self.dropped = self.lost = 0
        self.added_sample: list[str] = []
        self.removed_sample: list[str] = []

    def settle(
        self, staged: bytes | None, kept: Mapping[str, Mapping[str, bool]]
    ) -> dict[str, bytes]:
        """A bucket's staged rows with its admin overlay ``kept`` applied, as packed values
        by subscriber, sorted, counted."""
        new: dict[str, list[str]] = {}
        for line in keys.decoded(staged or b"").splitlines():
            subscriber, _, code = line.partition(" ")
            new.setdefault(subscriber, []).append(code)
        for subscriber, changes in kept.items():
            new[subscriber] = subscriber_overlay.apply(new.get(subscriber, []), changes)
        packed: dict[str, bytes] = {}
        for subscriber in sorted(new):
            if not new[subscriber]:
                continue  # every entry taken off by the overlay
            codes = subscribers_settle(new[subscriber])
            self.dropped += max(0, len(set(new[subscriber])) - len(codes))
            blob = subscribers_pack(codes)
            packed[subscriber] = blob
            self.digest.update(f"{subscriber}:".encode() + blob)
            self.size += len(codes)
        self.subscribers += len(packed)
        return packed

    def diff(self, packed: dict[str, bytes], old: dict[str, list[str]]) -> None:
        """Count (and sample) the pairs one bucket adds and removes."""
        for subscriber in set(packed) | set(old):
            now = set(subscribers_unpack(packed.get(subscriber, b"")))
            was = set(old.get(subscriber, ()))
            self.old_size += len(was)
            more, fewer = sorted(now - was), sorted(was - now)
            self.added += len(more)
            self.removed += len(fewer)
            room = self.sample - len(self.added_sample)
            self.added_sample += [f"{subscriber}:{c}" for c in more[:room]]
            room = self.sample - len(self.removed_sample)
            self.removed_sample += [f"{subscriber}:{c}" for c in fewer[:room]]

    def result(self) -> BuildResult:
        return BuildResult(
            self.size,
            self.added,
            self.removed,
            "sha256:" + self.digest.hexdigest(),
            self.old_size,
            tuple(_readable(s) for s in self.added_sample),
            tuple(_readable(s) for s in self.removed_sample),
        )
