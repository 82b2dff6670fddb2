"""The admin overlay of a ``subscribers`` list: admin writes on a list with a source
survive its syncs, as :mod:`core.overlay` does for the other kinds.

Kept per bucket, beside the subscribers it changes: the hash
:func:`core.keys.subscriber_overlay` (the bucket's hash tag, so one Cluster slot with
the bucket), field ``"<subscriber> <code>"`` (the code names entry and side,
:func:`core.subscribers.code_of`), value ``+`` (put on that side) or ``-`` (taken off
it), followed by the expiry in Unix seconds when the write had a ``ttl_s``. The last
admin write of a (subscriber, entry, side) wins. Every build reads a bucket's overlay
with its staged rows and applies the unexpired fields (core/build/subscribers.py).
Expiring fields are also indexed in :func:`core.keys.subscriber_overlay_expiry` (one
sorted set under the list's tag), so ``loader run`` finds them without reading 16 k
buckets; the index may name a field rewritten since, so removal re-checks the field.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core import keys
from core.store import RedisClient

#: Delete a field whose expiry has passed. KEYS: overlay hash; ARGV: field, now.
_DROP_IF_EXPIRED = """
local value = redis.call('hget', KEYS[1], ARGV[1])
if not value then return 0 end
local expires = tonumber(string.sub(value, 2))
if expires and expires <= tonumber(ARGV[2]) then
  redis.call('hdel', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Kept:
    """One overlay field of a subscriber: ``code`` added (or removed) until ``expires_at``."""

    code: str
    add: bool
    expires_at: float | None


def field_of(subscriber: str, code: str) -> str:
    return f"{subscriber} {code}"


def _value(add: bool, expires_at: float | None) -> str:
    return ("+" if add else "-") + ("" if expires_at is None else f"{expires_at:.3f}")


def _parsed(value: bytes | str) -> tuple[bool, float | None]:
    text = keys.decoded(value)
    return text[:1] == "+", float(text[1:]) if len(text) > 1 else None


#: Buckets written per pipelined round by :func:`write`.
BUCKETS_PER_ROUND = 256


async def write(
    redis: RedisClient,
    name: str,
    changes: Mapping[str, Mapping[str, bool]],
    ttl_s: float | None,
    tick: Callable[[], Awaitable[None]],
) -> None:
    """Keep admin changes (``{subscriber: {code: add?}}``) in the overlay. A write without
    ``ttl_s`` lasts until replaced. ``tick`` is awaited after each subscriber, so a large
    change yields to the event loop (:class:`core.subscribers.Slices`)."""
    expires_at = None if ttl_s is None else time.time() + ttl_s
    by_bucket: dict[int, dict[str, str]] = {}
    for subscriber, codes in changes.items():
        fields = by_bucket.setdefault(keys.subscriber_bucket_of(subscriber), {})
        for code, add in codes.items():
            fields[field_of(subscriber, code)] = _value(add, expires_at)
        await tick()
    index = keys.subscriber_overlay_expiry(name)
    buckets = sorted(by_bucket)
    for first in range(0, len(buckets), BUCKETS_PER_ROUND):
        # Not transactional: the buckets live on many slots. Each field is idempotent.
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in buckets[first : first + BUCKETS_PER_ROUND]:
                fields = by_bucket[bucket]
                pipe.hset(keys.subscriber_overlay(name, bucket), mapping=fields)  # type: ignore[arg-type]
                members = [f"{bucket} {field}" for field in fields]
                if expires_at is None:
                    pipe.zrem(index, *members)
                else:
                    pipe.zadd(index, dict.fromkeys(members, expires_at))
                await tick()
            await pipe.execute()


def live(fields: Mapping[bytes, bytes], now_s: float) -> dict[str, dict[str, bool]]:
    """A bucket's overlay hash (as read) as ``{subscriber: {code: add?}}``, unexpired only."""
    found: dict[str, dict[str, bool]] = {}
    for field, value in fields.items():
        add, expires_at = _parsed(value)
        if expires_at is not None and expires_at <= now_s:
            continue
        subscriber, _, code = keys.decoded(field).partition(" ")
        found.setdefault(subscriber, {})[code] = add
    return found


def apply(codes: list[str], kept: Mapping[str, bool]) -> list[str]:
    """A subscriber's staged codes with its overlay applied."""
    removed = {code for code, add in kept.items() if not add}
    return [c for c in codes if c not in removed] + [code for code, add in kept.items() if add]


async def of_subscriber(redis: RedisClient, name: str, subscriber: str) -> list[Kept]:
    """The unexpired overlay fields of one subscriber, by code."""
    key = keys.subscriber_overlay(name, keys.subscriber_bucket_of(subscriber))
    fields: dict[Any, Any] = await redis.hgetall(key)
    now_s = time.time()
    kept = []
    for field, value in sorted(fields.items()):
        who, _, code = keys.decoded(field).partition(" ")
        add, expires_at = _parsed(value)
        if who == subscriber and (expires_at is None or expires_at > now_s):
            kept.append(Kept(code, add, expires_at))
    return kept


async def drop_expired(redis: RedisClient, name: str, now_s: float | None = None) -> int:
    """Delete expired overlay fields; how many. The caller re-syncs the list."""
    now_s = time.time() if now_s is None else now_s
    index = keys.subscriber_overlay_expiry(name)
    found: list[Any] = await redis.zrangebyscore(index, "-inf", now_s)
    members = [keys.decoded(m) for m in found]
    if not members:
        return 0
    dropped = 0
    async with redis.pipeline(transaction=False) as pipe:
        for member in members:
            bucket, _, field = member.partition(" ")
            key = keys.subscriber_overlay(name, int(bucket))
            pipe.eval(_DROP_IF_EXPIRED, 1, key, field, now_s)
        dropped = sum(int(done) for done in await pipe.execute())
    await redis.zrem(index, *members)
    return dropped
