"""Full replacement of a list: build a new base aside, then swap it in atomically.

A sync streams canonical entries into a builder that writes keys nobody reads (each
with a TTL set in the same MULTI/EXEC, so a killed sync leaves nothing for long);
``finish`` counts the diff against the live list, and ``commit`` points ``meta.gen`` at
the new base in one WATCHed MULTI/EXEC: readers see the old list whole until then.
One build per list at a time (:func:`start_build`, a refreshed lock key; a second
loader gets :class:`ListLocked`); a dead build's keys are deleted by the next one.
Memory stays flat: entries are staged ``batch_size`` at a time, per bucket.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import WatchError

from core import keys, overlay
from core.config import ListKind
from core.store import BUCKETS_PER_READ, RedisClient
from core.subscribers import MAX_ENTRIES as subscribers_max
from core.subscribers import entry_of as subscribers_entry_of
from core.subscribers import pack as subscribers_pack
from core.subscribers import settle as subscribers_settle
from core.subscribers import unpack_codes as subscribers_unpack

_LE_U64 = np.dtype("<u8")
DEFAULT_LOCK_TTL_S = 30.0

_REFRESH_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


logger = logging.getLogger(__name__)


class SwapConflict(RuntimeError):
    """Another writer swapped the list while this sync was building; nothing was changed."""


class ListLocked(RuntimeError):
    """Another sync or compaction of the list is running (or died less than a TTL ago)."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    """The new base and how it differs from the live list."""

    size: int
    added: int
    removed: int
    checksum: str
    #: Entries on the live list before this build (base plus pending changes).
    old_size: int
    #: A few of the added and removed entries, for ``--dry-run`` (``finish(sample=N)``).
    added_sample: tuple[str, ...] = ()
    removed_sample: tuple[str, ...] = ()


class BuildLock:
    """The list's build lock: a random token in ``keys.lock``, refreshed while building."""

    def __init__(self, redis: RedisClient, name: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = keys.lock(name)
        self.name = name
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = secrets.token_hex(16)
        self.held = False
        self._refreshed = 0.0

    async def acquire(self) -> None:
        if not await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            left_ms = int(await self.redis.pttl(self.key))
            raise ListLocked(
                f"list {self.name!r} is being synced by another loader "
                f"(its lock expires in {max(left_ms, 0) / 1000:.1f} s unless refreshed)"
            )
        self.held = True
        self._refreshed = time.monotonic()

    async def refresh(self) -> None:
        """Extend the lock; cheap to call often (it talks to Redis every ttl/4 at most)."""
        now = time.monotonic()
        if now - self._refreshed < self.ttl_ms / 4000:
            return
        kept = await self.redis.eval(_REFRESH_LOCK, 1, self.key, self.token, self.ttl_ms)
        if not kept:
            self.held = False
            raise ListLocked(f"list {self.name!r}: lost the build lock (expired); build dropped")
        self._refreshed = now

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self.redis.eval(_RELEASE_LOCK, 1, self.key, self.token)


class ListBuilder:
    """Builds one new base for a list; use :func:`start_build` to get one."""

    def __init__(
        self,
        redis: RedisClient,
        name: str,
        kind: ListKind,
        gen: int,
        old_gen: int,
        *,
        lock: BuildLock | None = None,
    ) -> None:
        self.redis = redis
        self.name = name
        self.kind = kind
        self.gen = gen
        self.old_gen = old_gen
        self.lock = lock
        self.result: BuildResult | None = None
        #: Set once the swap happened; ``abort`` then leaves the (live) base alone.
        self.committed = False

    async def add(self, entries: Iterable[str]) -> None:
        raise NotImplementedError

    async def finish(self, *, sample: int = 0) -> BuildResult:
        """Complete the new base and diff it against the live list.

        ``sample`` keeps up to that many added and removed entries in the result.
        """
        raise NotImplementedError

    async def keep_alive(self) -> None:
        """Extend the build lock; call it while reading (it talks to Redis rarely)."""
        await self._refresh_lock()

    async def _refresh_lock(self) -> None:
        if self.lock is not None:
            await self.lock.refresh()

    async def _live_deltas(self) -> tuple[set[str], set[str]]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.smembers(keys.adds(self.name))
            pipe.smembers(keys.dels(self.name))
            adds, dels = await pipe.execute()
        return {_text(a) for a in adds}, {_text(d) for d in dels}

    async def _delete_built(self) -> None:
        await self.redis.delete(keys.base(self.name, self.gen))

    async def abort(self) -> None:
        """Drop everything this build wrote; the live list is untouched.

        Best effort: Redis may be failing (often why the build is aborted). Then the
        staging keys and the lock expire by themselves, and the caller's own error or
        cancellation propagates instead of being replaced by a clean-up error.
        """
        try:
            await self._abort()
        except Exception as exc:
            logger.warning(
                "list %r: clean-up of an aborted build failed (%s); its keys expire on their own",
                self.name,
                exc,
            )

    async def _abort(self) -> None:
        try:
            if self.committed:
                return
            await self._delete_built()
            meta_key = keys.meta(self.name)
            building, next_gen = await self.redis.hmget(meta_key, ["building", "next_gen"])
            if int(building or 0) == self.gen:
                await self.redis.hdel(meta_key, "building")
            # Give the generation number back (only lock holders take one), so that a
            # dry run or a refused sync leaves Redis exactly as it found it.
            if int(next_gen or 0) == self.gen:
                if self.gen > 1:
                    await self.redis.hset(meta_key, "next_gen", self.gen - 1)
                else:
                    await self.redis.hdel(meta_key, "next_gen")
        finally:
            if self.lock is not None:
                await self.lock.release()

    async def commit(
        self,
        fields: Mapping[str, str | int | float],
        *,
        expect_version: int | None = None,
        compaction: bool = False,
    ) -> int:
        """Swap the new base in; ``fields`` go to ``meta`` (source, rows, ...). Returns version.

        Raises :class:`SwapConflict` if the live generation changed since the build began,
        or, with ``expect_version``, if any change reached the list since that version.
        A ``compaction`` (same entries, new base) keeps the last sync's time and diff.
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
        if compaction:
            for kept in ("added", "removed", "synced_at"):
                del new_meta[kept]
            new_meta["compacted_at"] = f"{time.time():.3f}"
        await self._refresh_lock()
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(meta_key)
                current, version = await pipe.hmget(meta_key, "gen", "version")
                if int(current or 0) != self.old_gen:
                    raise SwapConflict(
                        f"list {self.name!r} was replaced by another sync while this one ran"
                    )
                if expect_version is not None and int(version or 0) != expect_version:
                    raise SwapConflict(f"list {self.name!r} changed while it was being rebuilt")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(meta_key, mapping=new_meta)  # type: ignore[arg-type]
                pipe.hincrby(meta_key, "version", 1)
                pipe.hdel(meta_key, "building")
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
        self.committed = True
        if not live_gen:
            await self._delete_built()
        if self.lock is not None:
            await self.lock.release()
        return int(replies[1])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        members = sorted(_text(m) for m in await self.redis.smembers(new_key))
        old: set[str] = set()
        if self.old_gen:
            old = {_text(m) for m in await self.redis.smembers(keys.base(self.name, self.old_gen))}
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
        digest = hashlib.sha256()
        size = added = removed = old_size = subscribers = dropped = lost = 0
        added_sample: list[str] = []
        removed_sample: list[str] = []
        marker = keys.SUBSCRIBER_MARKER.encode()
        step = SUBSCRIBER_BUCKETS_PER_ROUND
        for first in range(0, keys.SUBSCRIBER_BUCKETS, step):
            await self._refresh_lock()
            ids = range(first, min(first + step, keys.SUBSCRIBER_BUCKETS))
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket in ids:
                    pipe.get(keys.subscribers_stage(self.name, bucket, self.gen))
                    if self.old_gen:
                        pipe.hgetall(keys.subscribers(self.name, bucket, self.old_gen))
                replies = await pipe.execute()
            per = 2 if self.old_gen else 1
            async with self.redis.pipeline(transaction=False) as pipe:
                for i, bucket in enumerate(ids):
                    staged = replies[per * i]
                    old_raw = replies[per * i + 1] if self.old_gen else {}
                    new: dict[str, list[str]] = {}
                    for line in _text(staged or b"").splitlines():
                        subscriber, _, code = line.partition(" ")
                        new.setdefault(subscriber, []).append(code)
                    packed: dict[str, bytes] = {}
                    for subscriber in sorted(new):
                        codes = subscribers_settle(new[subscriber])
                        dropped += max(0, len(set(new[subscriber])) - len(codes))
                        blob = subscribers_pack(codes)
                        packed[subscriber] = blob
                        digest.update(f"{subscriber}:".encode() + blob)
                        size += len(codes)
                    subscribers += len(packed)
                    if self.old_gen and marker not in old_raw:
                        lost += 1  # Redis lost this bucket: what it holds is no base
                        old_raw = {}
                    old = {
                        _text(k): subscribers_unpack(v) for k, v in old_raw.items() if k != marker
                    }
                    for subscriber in set(packed) | set(old):
                        now = set(subscribers_unpack(packed.get(subscriber, b"")))
                        was = set(old.get(subscriber, ()))
                        old_size += len(was)
                        more, fewer = sorted(now - was), sorted(was - now)
                        added += len(more)
                        removed += len(fewer)
                        room = sample - len(added_sample)
                        added_sample += [f"{subscriber}:{c}" for c in more[:room]]
                        room = sample - len(removed_sample)
                        removed_sample += [f"{subscriber}:{c}" for c in fewer[:room]]
                    stage_key = keys.subscribers_stage(self.name, bucket, self.gen)
                    # Every bucket, empty or not, gets the marker (core/keys.py).
                    key = keys.subscribers(self.name, bucket, self.gen)
                    mapping = {keys.SUBSCRIBER_MARKER: self.gen, **packed}
                    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                    pipe.expire(key, keys.STAGING_TTL_S)
                    if staged:
                        pipe.delete(stage_key)
                await pipe.execute()
        if dropped:
            logger.warning(
                "list %r: %d entries dropped: duplicates, or over %d a subscriber",
                self.name,
                dropped,
                subscribers_max,
            )
        if lost:
            logger.warning(
                "list %r: %d buckets of the live generation %d had lost their marker (Redis "
                "lost them); this sync writes them again",
                self.name,
                lost,
                self.old_gen,
            )
        self.subscribers = subscribers
        self.lost_buckets = lost
        self.result = BuildResult(
            size,
            added,
            removed,
            "sha256:" + digest.hexdigest(),
            old_size,
            tuple(_readable(s) for s in added_sample),
            tuple(_readable(s) for s in removed_sample),
        )
        return self.result

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


def _builder(
    redis: RedisClient,
    name: str,
    kind: ListKind,
    gens: tuple[int, int],
    *,
    batch_size: int,
    lock: BuildLock | None,
) -> ListBuilder:
    gen, old_gen = gens
    if kind == "numbers":
        return NumberListBuilder(redis, name, gen, old_gen, batch_size=batch_size, lock=lock)
    if kind == "subscribers":
        return SubscriberListBuilder(redis, name, gen, old_gen, batch_size=batch_size, lock=lock)
    return SetListBuilder(redis, name, kind, gen, old_gen, lock=lock)


async def start_build(
    redis: RedisClient,
    name: str,
    kind: ListKind,
    *,
    batch_size: int = 1_000_000,
    lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
) -> ListBuilder:
    """Lock ``name``, reserve a new generation for it and return a builder for it.

    Raises :class:`ListLocked` when another build of the list holds the lock. Keys left
    by a build that died are deleted here.
    """
    lock = BuildLock(redis, name, lock_ttl_s)
    await lock.acquire()
    try:
        meta_key = keys.meta(name)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(meta_key, "next_gen", 1)
            pipe.hmget(meta_key, "gen", "building")
            gen, (old_gen, dead_gen) = await pipe.execute()
        old = int(old_gen or 0)
        if dead_gen and int(dead_gen) not in (old, int(gen)):
            # We hold the lock, so the build that wrote ``building`` is gone.
            dead = _builder(redis, name, kind, (int(dead_gen), old), batch_size=1, lock=None)
            await dead._delete_built()
        await redis.hset(meta_key, "building", int(gen))
    except BaseException:
        await lock.release()
        raise
    return _builder(redis, name, kind, (int(gen), old), batch_size=batch_size, lock=lock)
