"""What every list build shares: the build lock, the result, the base builder.

A builder writes its new base to keys nobody reads, each with a TTL set in the same
MULTI/EXEC as the write, and ``commit`` points ``meta.gen`` at it in one WATCHed
MULTI/EXEC (:class:`SwapConflict` when another writer got there first).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import WatchError

from core import keys
from core.config import ListKind
from core.store import RedisClient

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
        """Extend the lock; cheap to call often (it talks to Redis every ttl/4 at most).

        A no-op once released: a subscribers build's clean-up after its swap (expiring
        the old generation) still walks the buckets, and must not fail for a lock the
        swap gave back.
        """
        if not self.held:
            return
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
        return {keys.decoded(a) for a in adds}, {keys.decoded(d) for d in dels}

    async def _swap_meta(
        self,
        fields: Mapping[str, str | int | float],
        *,
        replaced: str,
        raced: str,
        also: Callable[[Any], None] | None = None,
        expect_version: int | None = None,
    ) -> list[Any]:
        """Write ``fields`` to ``meta`` in one transaction WATCHing it, with its version
        bumped and ``building`` dropped, and what ``also`` adds to the transaction; the
        replies. Raises :class:`SwapConflict` when the live generation is no longer
        ``old_gen`` (``replaced`` says when), when ``expect_version`` is given and the
        version moved, or when ``meta`` changed meanwhile (``raced``)."""
        meta_key = keys.meta(self.name)
        await self._refresh_lock()
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(meta_key)
                current, version = await pipe.hmget(meta_key, "gen", "version")
                if int(current or 0) != self.old_gen:
                    raise SwapConflict(f"list {self.name!r} was replaced {replaced}")
                if expect_version is not None and int(version or 0) != expect_version:
                    raise SwapConflict(f"list {self.name!r} changed while it was being rebuilt")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(meta_key, mapping=fields)  # type: ignore[arg-type]
                pipe.hincrby(meta_key, "version", 1)
                pipe.hdel(meta_key, "building")
                if also is not None:
                    also(pipe)
                return list(await pipe.execute())
            except WatchError:
                raise SwapConflict(f"list {self.name!r} changed generation {raced}") from None

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

        def retire(pipe: Any) -> None:
            pipe.delete(keys.adds(self.name), keys.dels(self.name))
            if live_gen:
                pipe.persist(keys.base(self.name, live_gen))
            if self.old_gen:
                pipe.expire(keys.base(self.name, self.old_gen), keys.OLD_GENERATION_GRACE_S)

        replies = await self._swap_meta(
            new_meta,
            also=retire,
            expect_version=expect_version,
            replaced="by another sync while this one ran",
            raced="while this sync swapped",
        )
        self.committed = True
        if not live_gen:
            await self._delete_built()
        if self.lock is not None:
            await self.lock.release()
        return int(replies[1])
