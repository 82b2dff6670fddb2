"""Per-subscriber block and allow entries: their format, encoding and single-entry writes.

A ``subscribers`` list maps a subscriber (a called number, a DID) to its own entries,
each on the ``block`` or the ``allow`` side. An entry is a number (normalised like every
number, :func:`core.numbers.normalise`) or a prefix written with a trailing ``*``
(``1900*``: E.164 leading digits, country code first, as in a ``prefixes`` list). One
entry is on one side of a subscriber at a time: putting it on the other side moves it,
and a source that lists it on both sides keeps it on ``allow``. A subscriber holds at
most :data:`MAX_ENTRIES` entries.

Storage (:mod:`core.keys`): the subscriber's entries are one hash field in its bucket,
``{cs:<list>:<bucket>}:sub:<gen>``, so a call reads them with one HGET. The value is
packed four bits a digit (:func:`pack`): each entry is its digits followed by one
nibble naming its side and whether it is a prefix (``a`` block number, ``b`` block
prefix, ``c`` allow number, ``d`` allow prefix), padded with ``f`` to whole bytes. An
11-digit number takes 6 bytes, against 12 as text plus a separator, so ten such entries
fit in 60 bytes: under Redis's default ``hash-max-listpack-value`` (64), which keeps a
sparse bucket in the compact listpack encoding, and half the memory of text in a dense
one. Decoding is ``bytes.hex()`` and one regular expression, a few microseconds.

Writes of one subscriber (the admin API) are a compare-and-set (:data:`_CAS`, one small
Lua script on the bucket's key): read the field, compute the new value in Python, write
it only if the field still holds what was read, else read again. The live generation
comes from the list's ``meta`` (another slot on a Cluster); a write that finds ``gen``
moved meanwhile (a full sync swapped) is applied again to the new generation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from core import keys
from core.numbers import normalise, normalise_prefix
from core.store import RedisClient

Side = Literal["block", "allow"]
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
#: The live generation, allocating one for a list that has none (a list kept by the
#: admin API alone). KEYS: meta; ARGV: kind.
_LIVE_GEN = """
local gen = tonumber(redis.call('hget', KEYS[1], 'gen') or '0')
if gen > 0 then
  return gen
end
gen = redis.call('hincrby', KEYS[1], 'next_gen', 1)
redis.call('hset', KEYS[1], 'gen', gen, 'kind', ARGV[1])
redis.call('hincrby', KEYS[1], 'version', 1)
return gen
"""
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
    """Codes de-duplicated, one side per entry (allow wins), sorted, capped."""
    by_entry: dict[str, str] = {}
    for code in codes:
        entry, side = entry_of(code)
        if side == "allow" or entry not in by_entry:
            by_entry[entry] = code
    return sorted(by_entry.values())[:MAX_ENTRIES]


def pack(codes: Iterable[str]) -> bytes:
    """Packed value of settled codes (see the module docstring); b"" for none."""
    text = "".join(codes)
    if len(text) % 2:
        text += "f"
    return bytes.fromhex(text)


def unpack_codes(blob: bytes) -> list[str]:
    return [digits + end for digits, end in _PACKED.findall(blob.hex())]


@dataclass(frozen=True, slots=True)
class Entries:
    """One subscriber's entries, as a call is matched against them."""

    block_numbers: frozenset[str] = frozenset()
    block_prefixes: tuple[str, ...] = ()
    allow_numbers: frozenset[str] = frozenset()
    allow_prefixes: tuple[str, ...] = ()

    @classmethod
    def unpack(cls, blob: bytes | None) -> Entries:
        if not blob:
            return NO_ENTRIES
        found: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}
        for digits, end in _PACKED.findall(blob.hex()):
            found[end].append(digits)
        return cls(
            frozenset(found["a"]), tuple(found["b"]), frozenset(found["c"]), tuple(found["d"])
        )

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


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class SubscriberStore:
    """Reads and single-subscriber writes of subscribers lists (asks Redis, no cache)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def gen(self, name: str) -> int:
        return int(await self.redis.hget(keys.meta(name), "gen") or 0)

    async def read(self, name: str, subscriber: str) -> tuple[int, Entries]:
        """The live generation and ``subscriber``'s entries in it."""
        gen = await self.gen(name)
        if not gen:
            return 0, NO_ENTRIES
        key = keys.subscribers(name, keys.subscriber_bucket_of(subscriber), gen)
        blob = await self.redis.hget(key, subscriber)
        return gen, Entries.unpack(blob if isinstance(blob, bytes) else None)

    async def change(self, name: str, subscriber: str, entry: str, side: Side | None) -> int:
        """Put ``entry`` on ``side`` of ``subscriber`` (``side=None``: remove it).

        Returns the generation written. Raises :class:`BadSubscriberEntry` when the
        subscriber already holds :data:`MAX_ENTRIES` entries.
        """
        bucket = keys.subscriber_bucket_of(subscriber)
        gen = await self.gen(name)
        if not gen and side is None:
            return 0  # nothing to remove from a list that holds nothing
        for _ in range(MAX_ATTEMPTS):
            if not gen:
                gen = int(await self.redis.eval(_LIVE_GEN, 1, keys.meta(name), "subscribers"))
            await self._change_in(keys.subscribers(name, bucket, gen), subscriber, entry, side)
            now = await self.gen(name)
            if now == gen:
                return gen
            gen = now  # a full sync swapped meanwhile: apply it to the new generation too
        raise RuntimeError(f"list {name!r}: generation kept moving; change not confirmed")

    async def _change_in(self, key: str, subscriber: str, entry: str, side: Side | None) -> None:
        for _ in range(MAX_ATTEMPTS):
            current = await self.redis.hget(key, subscriber)
            blob = current if isinstance(current, bytes) else _text(current).encode()
            codes = [c for c in unpack_codes(blob) if entry_of(c)[0] != entry]
            if side is not None:
                if len(codes) >= MAX_ENTRIES:
                    raise BadSubscriberEntry(
                        f"subscriber {subscriber} already holds {MAX_ENTRIES} entries"
                    )
                codes.append(code_of(entry, side))
            new = pack(settle(codes))
            if await self.redis.eval(_CAS, 1, key, subscriber, blob, new):
                return
        raise RuntimeError(f"subscriber {subscriber}: too many concurrent changes; retry")
