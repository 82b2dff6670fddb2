"""Full replacement of a list: build a new base aside, then swap it in atomically.

A sync streams canonical entries into a builder that writes keys nobody reads (each
with a TTL set in the same MULTI/EXEC, so a killed sync leaves nothing for long);
``finish`` counts the diff against the live list, and ``commit`` points ``meta.gen`` at
the new base in one WATCHed MULTI/EXEC: readers see the old list whole until then (a
subscribers list changed wider than ``loader.subscriber_step_share`` goes in by steps,
each subscriber's entries still switching at once: core/build/subscribers.py).
One build per list at a time (:func:`start_build`, a refreshed lock key; a second
loader gets :class:`ListLocked`); a dead build's keys are deleted by the next one.
Memory stays flat: entries are staged ``batch_size`` at a time, per bucket.
"""

from __future__ import annotations

from core import keys
from core.build.base import (
    DEFAULT_LOCK_TTL_S,
    BuildLock,
    BuildResult,
    ListBuilder,
    ListLocked,
    SwapConflict,
)
from core.build.lists import NumberListBuilder, SetListBuilder
from core.build.subscribers import SUBSCRIBER_BUCKETS_PER_ROUND, SubscriberListBuilder
from core.config import ListKind
from core.store import RedisClient

__all__ = [
    "DEFAULT_LOCK_TTL_S",
    "SUBSCRIBER_BUCKETS_PER_ROUND",
    "BuildLock",
    "BuildResult",
    "ListBuilder",
    "ListLocked",
    "NumberListBuilder",
    "SetListBuilder",
    "SubscriberListBuilder",
    "SwapConflict",
    "start_build",
]


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
