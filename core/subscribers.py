"""Per-subscriber block and allow entries: their format, encoding and single-entry writes.

A ``subscribers`` list maps a subscriber (a called number) to at most
:data:`MAX_ENTRIES` entries, numbers or ``1900*`` prefixes, each on the ``block`` or
``allow`` side; the sides are separate (an entry may be on both, a removal names its
side). A
subscriber's entries are one packed hash field (:func:`pack`, four bits a digit) in its
bucket, so a call reads them with one HGET. Writes are compare-and-set scripts per
bucket, re-applied if a full sync swapped meanwhile; a bulk change checks every
subscriber before writing any. Every bucket of a generation carries the marker field,
so a bucket Redis lost is noticed. Layout and figures: docs/subscribers.md.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core import bucket_gens, keys, subscriber_overlay
from core.bucket_gens import BucketGens
from core.numbers import normalise, normalise_prefix
from core.store import RedisClient

Side = Literal["block", "allow"]
#: A bulk change: subscriber -> {code (entry and side): True to add, False to remove}.
Changes = Mapping[str, Mapping[str, bool]]
SIDES: tuple[Side, ...] = ("block", "allow")
PREFIX_MARK = "*"
#: Entries one subscriber may hold (block and allow together).
MAX_ENTRIES = 100
#: Nibble closing an entry: (side, is a prefix) -> hex digit.
_END: dict[tuple[Side, bool], str] = {
    ("block", False): "a",
    ("block", True): "b",
    ("allow", False): "c",
    ("allow", True): "d",
}
_SIDE_OF: dict[str, Side] = {end: side for (side, _), end in _END.items()}
_PACKED = re.compile(r"([0-9]*)([a-d])")
#: Compare-and-set of one subscriber's field. KEYS: bucket; ARGV: subscriber, expected
#: value ("" = absent), new value ("" = delete). 1 when written, 0 when it had moved.
_CAS = """
local current = redis.call('hget', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('hdel', KEYS[1], ARGV[1])
else
  redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""
#: Compare-and-set of several subscribers of one bucket at once. KEYS: bucket; ARGV:
#: (subscriber, expected value, new value) triples, "" meaning absent / delete. 1 when
#: all were written, 0 (nothing written) when any had moved.
_CAS_MANY = """
for i = 1, #ARGV, 3 do
  local current = redis.call('hget', KEYS[1], ARGV[i])
  if (current or '') ~= ARGV[i + 1] then
    return 0
  end
end
for i = 1, #ARGV, 3 do
  if ARGV[i + 2] == '' then
    redis.call('hdel', KEYS[1], ARGV[i])
  else
    redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
return 1
"""
#: First step of allocating a generation for a list that has none (a list kept by the
#: admin API alone). KEYS: meta. Returns {live gen, 0} when one is live, else {0, the
#: generation to mark}: the one another writer is marking (``meta.marking``), or a new
#: one. Writers racing for a list's first generation thus mark and adopt the same one.
_RESERVE_GEN = """
local gen = tonumber(redis.call('hget', KEYS[1], 'gen') or '0')
if gen > 0 then
  return {gen, 0}
end
local marking = tonumber(redis.call('hget', KEYS[1], 'marking') or '0')
if marking == 0 then
  marking = redis.call('hincrby', KEYS[1], 'next_gen', 1)
  redis.call('hset', KEYS[1], 'marking', marking)
end
return {0, marking}
"""
#: Second step, once every bucket of ARGV[1] carries its marker: make it the live
#: generation unless one is live already. KEYS: meta; ARGV: the marked gen, kind.
#: Returns the live generation.
_ADOPT_GEN = """
local gen = tonumber(redis.call('hget', KEYS[1], 'gen') or '0')
if gen == 0 then
  gen = tonumber(ARGV[1])
  redis.call('hset', KEYS[1], 'gen', gen, 'kind', ARGV[2])
  redis.call('hincrby', KEYS[1], 'version', 1)
end
if redis.call('hget', KEYS[1], 'marking') == ARGV[1] then
  redis.call('hdel', KEYS[1], 'marking')
end
return gen
"""
#: Buckets per pipelined round trip when every bucket of a generation is written.
MARK_BUCKETS_PER_ROUND = 512
#: Buckets read (then written) per pipelined round trip by a bulk change.
BULK_BUCKETS_PER_ROUND = 256
#: Longest stretch of Python work in a bulk change between two yields to the event loop.
SLICE_S = 0.002
#: Compare-and-set attempts before a write gives up (only under a storm of writes).
MAX_ATTEMPTS = 20


class BadSubscriberEntry(ValueError):
    """A subscriber, entry or side that cannot go on a subscribers list."""


def canonical_subscriber(raw: str, default_country: str = "1") -> str:
    number = normalise(raw, default_country) if len(raw) <= 64 else None
    if number is None:
        raise BadSubscriberEntry(f"not a subscriber number: {raw[:40]!r}")
    return number


def canonical_entry(raw: str, default_country: str = "1") -> str:
    """A number (normalised) or a prefix with its trailing ``*`` (``1900*``)."""
    text = raw.strip()
    if text.endswith(PREFIX_MARK):
        prefix = normalise_prefix(text[:-1]) if len(text) <= 64 else None
        if prefix is None:
            raise BadSubscriberEntry(f"not a number prefix (1-15 digits, then *): {raw[:40]!r}")
        return prefix + PREFIX_MARK
    number = normalise(text, default_country) if len(text) <= 64 else None
    if number is None:
        raise BadSubscriberEntry(f"not a number (or a prefix ending in *): {raw[:40]!r}")
    return number


def canonical_side(raw: str) -> Side:
    side = raw.strip().lower() or "block"
    if side == "block":
        return "block"
    if side == "allow":
        return "allow"
    raise BadSubscriberEntry(f"side must be 'block' or 'allow', not {raw[:20]!r}")


def code_of(entry: str, side: Side) -> str:
    """The packed text (digits and end nibble) of one canonical entry."""
    if entry.endswith(PREFIX_MARK):
        return entry[:-1] + _END[side, True]
    return entry + _END[side, False]


def entry_of(code: str) -> tuple[str, Side]:
    """The canonical entry and side of one packed code."""
    digits, end = code[:-1], code[-1]
    return (digits + PREFIX_MARK if end in "bd" else digits), _SIDE_OF[end]


def settle(codes: Iterable[str]) -> list[str]:
    """Codes de-duplicated, sorted, capped. Block and allow are separate sides: an entry
    may be on both (a code names its side)."""
    return sorted(set(codes))[:MAX_ENTRIES]


def pack(codes: Iterable[str]) -> bytes:
    """Packed value of settled codes (see the module docstring); b"" for none."""
    text = "".join(codes)
    if len(text) % 2:
        text += "f"
    return bytes.fromhex(text)


def unpack_codes(blob: bytes) -> list[str]:
    return [digits + end for digits, end in _PACKED.findall(blob.hex())]


class Entries:
    """One subscriber's entries, as a call is matched against them; never changed once
    made.

    Numbers in dicts (each to None), prefixes in tuples, never sets: a dict of strings
    is never in the cyclic collector's view and a tuple of them drops out once the
    collector has seen it, where a set stays in it. Each worker's entries cache holds
    thousands of these for seconds (service/screening/subscriber_cache.py), which full
    collections would otherwise go through every time. A number is found by one hash
    look-up, not by comparing the caller with each entry in turn (numbers of one length
    compare byte by byte, and in a busy cache each entry is memory no call touched
    lately); prefixes are scanned, at most :data:`MAX_ENTRIES`. A plain class with
    slots: one is made per Redis read, and a frozen dataclass sets each field through
    ``object.__setattr__``.
    """

    __slots__ = ("allow_numbers", "allow_prefixes", "block_numbers", "block_prefixes")

    def __init__(
        self,
        block_numbers: Iterable[str] = (),
        block_prefixes: tuple[str, ...] = (),
        allow_numbers: Iterable[str] = (),
        allow_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.block_numbers: dict[str, None] = dict.fromkeys(block_numbers)
        self.block_prefixes = block_prefixes
        self.allow_numbers: dict[str, None] = dict.fromkeys(allow_numbers)
        self.allow_prefixes = allow_prefixes

    @classmethod
    def unpack(cls, blob: bytes | None) -> Entries:
        if not blob:
            return NO_ENTRIES
        found: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}
        for digits, end in _PACKED.findall(blob.hex()):
            found[end].append(digits)
        return cls(found["a"], tuple(found["b"]), found["c"], tuple(found["d"]))

    def match(self, side: Side, caller: str) -> str | None:
        """The entry on ``side`` that ``caller`` matches (an exact number first), or None."""
        numbers, prefixes = (
            (self.block_numbers, self.block_prefixes)
            if side == "block"
            else (self.allow_numbers, self.allow_prefixes)
        )
        if caller in numbers:
            return caller
        best = ""
        for prefix in prefixes:
            if caller.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return best + PREFIX_MARK if best else None

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "block": sorted(self.block_numbers) + sorted(p + "*" for p in self.block_prefixes),
            "allow": sorted(self.allow_numbers) + sorted(p + "*" for p in self.allow_prefixes),
        }


NO_ENTRIES = Entries()


class Slices:
    """Cuts long Python work into slices of about :data:`SLICE_S`, yielding in between.

    Checking, unpacking and packing 100 k subscribers' changes is most of a second of
    Python code holding the GIL: done in one go inside the service it would stall every
    call the worker is answering. ``await slices.tick()`` after each item yields to the
    event loop once a slice is used up (see service/operator/admin.py, ``_canonical_all``, for why
    not a thread).
    """

    def __init__(self, slice_s: float = SLICE_S) -> None:
        self.slice_s = slice_s
        self.since = time.perf_counter()

    async def tick(self) -> None:
        if time.perf_counter() - self.since >= self.slice_s:
            await asyncio.sleep(0)
            self.since = time.perf_counter()


async def mark_buckets(redis: RedisClient, name: str, gen: int) -> int:
    """Put the marker in every bucket of generation ``gen`` that lacks it; how many did.

    HSETNX: a marker already there is left alone, so this is safe to run twice (two
    writers allocating the same generation) and never touches a subscriber's field.
    """
    replies = await _each_bucket(
        redis, name, gen, lambda pipe, key: pipe.hsetnx(key, keys.SUBSCRIBER_MARKER, gen)
    )
    return sum(int(reply) for reply in replies)


async def delete_buckets(redis: RedisClient, name: str, gen: int) -> None:
    """Delete every bucket of generation ``gen`` (one nobody reads)."""
    await _each_bucket(redis, name, gen, lambda pipe, key: pipe.delete(key))


async def _each_bucket(
    redis: RedisClient, name: str, gen: int, command: Callable[[Any, str], object]
) -> list[Any]:
    """``command(pipe, key)`` for every bucket key of ``gen``, pipelined in rounds of
    :data:`MARK_BUCKETS_PER_ROUND`; the replies in bucket order."""
    replies: list[Any] = []
    for first in range(0, keys.SUBSCRIBER_BUCKETS, MARK_BUCKETS_PER_ROUND):
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in range(
                first, min(first + MARK_BUCKETS_PER_ROUND, keys.SUBSCRIBER_BUCKETS)
            ):
                command(pipe, keys.subscribers(name, bucket, gen))
            replies += await pipe.execute()
    return replies


@dataclass(frozen=True, slots=True)
class _Write:
    """One subscriber's field in a bulk change: the value read and the value to write."""

    subscriber: str
    expected: bytes
    new: bytes


class SubscriberStore:
    """Reads and admin writes of subscribers lists (asks Redis, no cache)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def gen(self, name: str) -> int:
        return int(await self.redis.hget(keys.meta(name), "gen") or 0)

    async def changed(self, name: str) -> int:
        """Count a write Redis acknowledged (:func:`core.keys.subscriber_changes`) and
        return the live generation, in one round trip (one tag).

        After the write, never before: a worker that reads the entries between the two
        caches them under the old count and drops them when its poll sees the new one.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(keys.subscriber_changes(name))
            pipe.hget(keys.meta(name), "gen")
            _, gen = await pipe.execute()
        return int(gen or 0)

    async def live_gen(self, name: str) -> int:
        """The live generation, allocating one for a list that has none.

        A list kept by the admin API alone has no generation until its first write.
        Allocating one marks all its buckets first (:func:`mark_buckets`, about 16 k
        small keys) and only then names it in ``meta.gen``, so a call never reads a
        bucket of a live generation that lacks its marker unless Redis lost it. A writer
        killed while marking leaves ``meta.marking``: the next writer finishes that
        generation; a later full sync deletes it if it was never adopted.
        """
        meta = keys.meta(name)
        live, marking = (int(n) for n in await self.redis.eval(_RESERVE_GEN, 1, meta))
        if live:
            return live
        await mark_buckets(self.redis, name, marking)
        gen = int(await self.redis.eval(_ADOPT_GEN, 1, meta, marking, "subscribers"))
        if gen != marking:
            # A full sync made its generation live meanwhile: the marked one is nobody's.
            await delete_buckets(self.redis, name, marking)
        return gen

    async def read(self, name: str, subscriber: str) -> tuple[int, Entries]:
        """The live generation and ``subscriber``'s entries in it."""
        gen = await self.gen(name)
        if not gen:
            return 0, NO_ENTRIES
        bucket = keys.subscriber_bucket_of(subscriber)
        key = await bucket_gens.bucket_key(self.redis, name, gen, bucket)
        blob = await self.redis.hget(key, subscriber)
        return gen, Entries.unpack(blob if isinstance(blob, bytes) else None)

    async def read_marked(self, name: str, subscriber: str) -> tuple[int, Entries, bool]:
        """:meth:`read`, and whether the subscriber's bucket lost its marker (Redis lost
        it: the entries shown are only those written since)."""
        gen = await self.gen(name)
        if not gen:
            return 0, NO_ENTRIES, False
        bucket = keys.subscriber_bucket_of(subscriber)
        key = await bucket_gens.bucket_key(self.redis, name, gen, bucket)
        blob, marker = await self.redis.hmget(key, [subscriber, keys.SUBSCRIBER_MARKER])
        entries = Entries.unpack(blob if isinstance(blob, bytes) else None)
        return gen, entries, marker is None

    async def change(
        self,
        name: str,
        subscriber: str,
        entry: str,
        side: Side,
        *,
        remove: bool = False,
        overlay: bool = False,
        ttl_s: float | None = None,
    ) -> int:
        """Put ``entry`` on ``side`` of ``subscriber`` (``remove``: take it off that side;
        the other side is never touched). ``overlay`` (a list with a source) also keeps
        the write in the admin overlay, which syncs apply (:mod:`core.subscriber_overlay`),
        until ``ttl_s`` if given.

        Returns the generation written. Raises :class:`BadSubscriberEntry` when the
        subscriber already holds :data:`MAX_ENTRIES` entries.
        """
        bucket = keys.subscriber_bucket_of(subscriber)
        gen = await self.gen(name)
        code = code_of(entry, side)
        kept = {subscriber: {code: not remove}}
        if not gen and remove:
            if overlay:  # nothing to remove now; the next sync must not bring it
                await subscriber_overlay.write(self.redis, name, kept, ttl_s, _no_tick)
            return 0
        for _ in range(MAX_ATTEMPTS):
            if not gen:
                gen = await self.live_gen(name)
            key = await bucket_gens.bucket_key(self.redis, name, gen, bucket)
            wrote = await self._change_in(key, subscriber, code, remove)
            if overlay:  # after the entry cap's check: a refused write keeps nothing
                await subscriber_overlay.write(self.redis, name, kept, ttl_s, _no_tick)
            now = await (self.changed(name) if wrote else self.gen(name))
            if now == gen:
                return gen
            gen = now  # a full sync swapped meanwhile: apply it to the new generation too
        raise RuntimeError(f"list {name!r}: generation kept moving; change not confirmed")

    async def _change_in(self, key: str, subscriber: str, code: str, remove: bool) -> bool:
        """Whether anything was written (not when the entry already was as asked)."""
        for _ in range(MAX_ATTEMPTS):
            current = await self.redis.hget(key, subscriber)
            blob = current if isinstance(current, bytes) else keys.decoded(current).encode()
            codes = [c for c in unpack_codes(blob) if c != code]
            if not remove:
                if len(codes) >= MAX_ENTRIES:
                    raise BadSubscriberEntry(
                        f"subscriber {subscriber} already holds {MAX_ENTRIES} entries"
                    )
                codes.append(code)
            new = pack(settle(codes))
            if new == blob:
                return False
            if await self.redis.eval(_CAS, 1, key, subscriber, blob, new):
                return True
        raise RuntimeError(f"subscriber {subscriber}: too many concurrent changes; retry")

    async def bulk_change(
        self, name: str, changes: Changes, *, overlay: bool = False, ttl_s: float | None = None
    ) -> int:
        """Apply many subscribers' changes: ``{subscriber: {code: True (add) or False}}``,
        a code naming the entry and its side (:func:`code_of`): sides are independent.

        Returns the generation written (0: only removals from an empty list). Every
        subscriber is planned first (:meth:`_plan`), so one taken past
        :data:`MAX_ENTRIES` raises :class:`BadSubscriberEntry` with nothing written; then
        one pipelined compare-and-set per bucket. Atomic per bucket, not as a whole; each
        change is idempotent, so resending finishes a half-applied one. ``overlay`` and
        ``ttl_s``: as for :meth:`change`, kept once the plan passed.
        """
        if not changes:
            return await self.gen(name)
        by_bucket: dict[int, dict[str, Mapping[str, bool]]] = {}
        slices = Slices()
        adds = False
        for subscriber, entries in changes.items():
            by_bucket.setdefault(keys.subscriber_bucket_of(subscriber), {})[subscriber] = entries
            adds = adds or any(entries.values())
            await slices.tick()
        gen = await self.gen(name)
        if not gen and not adds:
            if overlay:  # nothing to remove now; the next sync must not bring them
                await subscriber_overlay.write(self.redis, name, changes, ttl_s, slices.tick)
            return 0
        for _ in range(MAX_ATTEMPTS):
            if not gen:
                gen = await self.live_gen(name)
            gens = await bucket_gens.read(self.redis, name, gen)  # read once per attempt
            plan = await self._plan(name, gens, by_bucket, "nothing was changed")
            if overlay:
                await subscriber_overlay.write(self.redis, name, changes, ttl_s, slices.tick)
            await self._write(name, gens, plan, by_bucket)
            now = await (self.changed(name) if plan else self.gen(name))
            if now == gen:
                return gen
            gen = now  # a full sync swapped meanwhile: apply it to the new generation too
        raise RuntimeError(f"list {name!r}: generation kept moving; change not confirmed")

    async def _plan(
        self,
        name: str,
        gens: BucketGens,
        by_bucket: Mapping[int, Changes],
        refused: str,
    ) -> dict[int, list[_Write]]:
        """Read every subscriber named and compute its new value; refuse over-full ones
        (``refused`` tells the caller what that left written)."""
        slices = Slices()
        plan: dict[int, list[_Write]] = {}
        over: list[str] = []
        buckets = sorted(by_bucket)
        for first in range(0, len(buckets), BULK_BUCKETS_PER_ROUND):
            ids = buckets[first : first + BULK_BUCKETS_PER_ROUND]
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket in ids:
                    pipe.hmget(gens.key(name, bucket), list(by_bucket[bucket]))
                replies = await pipe.execute()
            for bucket, values in zip(ids, replies, strict=True):
                writes, full = await _bucket_writes(by_bucket[bucket], values, slices)
                over += full
                if writes:
                    plan[bucket] = writes
        if over:
            shown = ", ".join(sorted(over)[:10]) + (", ..." if len(over) > 10 else "")
            raise BadSubscriberEntry(
                f"{len(over)} subscribers would hold more than {MAX_ENTRIES} entries "
                f"({shown}); {refused}"
            )
        return plan

    async def _write(
        self,
        name: str,
        gens: BucketGens,
        plan: dict[int, list[_Write]],
        by_bucket: Mapping[int, Changes],
    ) -> None:
        """One compare-and-set script per bucket; the buckets that moved are planned again."""
        slices = Slices()
        for _ in range(MAX_ATTEMPTS):
            buckets = sorted(plan)
            moved: list[int] = []
            for first in range(0, len(buckets), BULK_BUCKETS_PER_ROUND):
                ids = buckets[first : first + BULK_BUCKETS_PER_ROUND]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for bucket in ids:
                        args = [a for w in plan[bucket] for a in (w.subscriber, w.expected, w.new)]
                        pipe.eval(_CAS_MANY, 1, gens.key(name, bucket), *args)
                        await slices.tick()
                    replies = await pipe.execute()
                moved += [bucket for bucket, done in zip(ids, replies, strict=True) if not done]
            if not moved:
                return
            # Another writer changed some of these subscribers meanwhile: read them again.
            # A subscriber it filled up refuses the rest of the change, with the buckets
            # already written kept: the message says so.
            refused = "filled by another change meanwhile; the other buckets were written"
            plan = await self._plan(name, gens, {b: by_bucket[b] for b in moved}, refused)
        raise RuntimeError(f"list {name!r}: too many concurrent changes; send it again")


async def _no_tick() -> None:
    """A single write's overlay is one field: nothing to slice."""


async def _bucket_writes(
    changes: Changes,
    values: list[bytes | str | None],
    slices: Slices,
) -> tuple[list[_Write], list[str]]:
    """The writes of one bucket's subscribers (read as ``values``) and the over-full ones."""
    writes: list[_Write] = []
    over: list[str] = []
    for (subscriber, entries), value in zip(changes.items(), values, strict=True):
        blob = value if isinstance(value, bytes) else keys.decoded(value).encode()
        codes = [c for c in unpack_codes(blob) if c not in entries]
        codes += [code for code, add in entries.items() if add]
        if len(codes) > MAX_ENTRIES:
            over.append(subscriber)
        else:
            new = pack(settle(codes))
            if new != blob:
                writes.append(_Write(subscriber, blob, new))
        await slices.tick()
    return writes, over
