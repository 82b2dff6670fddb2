"""The admin overlay: admin adds and removes on a list with a source survive its syncs.

An admin write on a list with a ``source`` is also kept in the list's overlay
(``overlay:add``/``overlay:del``, same hash tag) in the same MULTI/EXEC as the change;
every build (:mod:`core.build`) puts the overlay's adds into the new base and leaves its
removals out, so the entry answers the same across syncs. The last admin write of an
entry wins. An entry may expire (``overlay:expiry``): builds ignore it at once and
``loader run`` drops it at its next health check. Delta files do not write the overlay.
See docs/loader.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from core import keys

if TYPE_CHECKING:  # core.store queues overlay writes: no import cycle at run time
    from core.store import RedisClient

Side = Literal["add", "remove"]
_MARK: dict[Side, str] = {"add": "a:", "remove": "d:"}


def queue_write(
    pipe: Any,
    name: str,
    add: Sequence[str],
    remove: Sequence[str],
    ttl_s: float | None,
    now_s: float | None = None,
) -> None:
    """Queue the overlay side of an admin change on ``pipe`` (a MULTI/EXEC pipeline)."""
    expires = None if ttl_s is None else (time.time() if now_s is None else now_s) + ttl_s
    sides: tuple[tuple[Side, Side, Sequence[str], str, str], ...] = (
        ("add", "remove", add, keys.overlay_adds(name), keys.overlay_dels(name)),
        ("remove", "add", remove, keys.overlay_dels(name), keys.overlay_adds(name)),
    )
    for side, opposite, entries, key, other in sides:
        if not entries:
            continue
        pipe.sadd(key, *entries)
        pipe.srem(other, *entries)
        # A write without a TTL makes the entry permanent; the other side's expiry
        # belongs to a write this one replaces.
        pipe.zrem(keys.overlay_expiry(name), *[_MARK[opposite] + e for e in entries])
        marked = [_MARK[side] + e for e in entries]
        if expires is None:
            pipe.zrem(keys.overlay_expiry(name), *marked)
        else:
            pipe.zadd(keys.overlay_expiry(name), dict.fromkeys(marked, expires))


@dataclass(frozen=True, slots=True)
class Overlay:
    """The live (unexpired) overlay of one list."""

    adds: frozenset[str]
    dels: frozenset[str]


async def read(redis: RedisClient, name: str, now_s: float | None = None) -> Overlay:
    """The overlay without its expired entries."""
    now_s = time.time() if now_s is None else now_s
    async with redis.pipeline(transaction=True) as pipe:
        pipe.smembers(keys.overlay_adds(name))
        pipe.smembers(keys.overlay_dels(name))
        pipe.zrangebyscore(keys.overlay_expiry(name), "-inf", now_s)
        adds, dels, expired = await pipe.execute()
    gone = {_text(e) for e in expired}
    return Overlay(
        frozenset(e for e in map(_text, adds) if "a:" + e not in gone),
        frozenset(e for e in map(_text, dels) if "d:" + e not in gone),
    )


async def state_of(redis: RedisClient, name: str, entry: str) -> tuple[Side | None, float | None]:
    """Whether ``entry`` is an overlay add or removal of ``name``, and when it expires."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sismember(keys.overlay_adds(name), entry)
        pipe.sismember(keys.overlay_dels(name), entry)
        pipe.zmscore(keys.overlay_expiry(name), ["a:" + entry, "d:" + entry])
        added, removed, (add_at, del_at) = await pipe.execute()
    now_s = time.time()
    if added and (add_at is None or add_at > now_s):
        return "add", add_at
    if removed and (del_at is None or del_at > now_s):
        return "remove", del_at
    return None, None


async def counts(redis: RedisClient, name: str) -> tuple[int, int]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.scard(keys.overlay_adds(name))
        pipe.scard(keys.overlay_dels(name))
        adds, dels = await pipe.execute()
    return int(adds), int(dels)


async def drop_expired(redis: RedisClient, name: str, now_s: float | None = None) -> int:
    """Remove expired entries from the overlay; how many. The caller re-syncs the list."""
    now_s = time.time() if now_s is None else now_s
    expiry = keys.overlay_expiry(name)
    found: list[Any] = await redis.zrangebyscore(expiry, "-inf", now_s)
    expired = [_text(e) for e in found]
    if not expired:
        return 0
    adds = [e[2:] for e in expired if e.startswith("a:")]
    dels = [e[2:] for e in expired if e.startswith("d:")]
    async with redis.pipeline(transaction=True) as pipe:
        if adds:
            pipe.srem(keys.overlay_adds(name), *adds)
        if dels:
            pipe.srem(keys.overlay_dels(name), *dels)
        pipe.zrem(expiry, *expired)
        await pipe.execute()
    return len(expired)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
