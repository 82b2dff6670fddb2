"""Which generation holds each bucket of one generation of a subscribers list.

A sync writes only the buckets whose content changed, under the new generation's
number, and names every bucket's generation in a map it writes before the swap
(``keys.subscriber_gens``: one little-endian 4-byte generation per bucket). Unchanged
buckets stay where an earlier sync wrote them. Invariants:

- a generation's map is written before the generation is live and never changes;
- a generation without a map holds every bucket under its own number (a first sync,
  a list the admin API made, every generation written before maps existed);
- a bucket key named by the live generation's map is never expired or deleted: a
  sync expires only the keys its new map no longer names (docs/subscribers.md).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from core import keys

if TYPE_CHECKING:
    from core.store import RedisClient


class BucketGens:
    """The bucket -> generation map of generation ``gen`` (uniform without a map)."""

    __slots__ = ("_table", "gen")

    def __init__(self, gen: int, table: array[int] | None = None) -> None:
        self.gen = gen
        self._table = table

    @classmethod
    def from_bytes(cls, gen: int, packed: bytes | None) -> BucketGens:
        """The map as stored (None or empty: uniform); ValueError when malformed."""
        if not packed:
            return cls(gen)
        if len(packed) != 4 * keys.SUBSCRIBER_BUCKETS:
            raise ValueError(f"generation {gen}: a bucket map of {len(packed)} bytes")
        table = array("I")
        table.frombytes(packed)
        if sys.byteorder == "big":
            table.byteswap()
        return cls(gen, table)

    @property
    def uniform(self) -> bool:
        """Every bucket under ``gen`` (no map)."""
        return self._table is None

    def of(self, bucket: int) -> int:
        """The generation whose key holds ``bucket``."""
        table = self._table
        return self.gen if table is None else table[bucket]

    def of_subscriber(self, subscriber: str) -> int:
        """The generation whose key holds ``subscriber``'s bucket."""
        if self._table is None:
            return self.gen
        return self._table[keys.subscriber_bucket_of(subscriber)]

    def key(self, name: str, bucket: int) -> str:
        """The key of ``bucket`` of list ``name`` in this generation."""
        return keys.subscribers(name, bucket, self.of(bucket))

    def to_bytes(self) -> bytes:
        table = self._table if self._table is not None else self._filled()
        if sys.byteorder == "big":
            table = array("I", table)
            table.byteswap()
        return table.tobytes()

    def _filled(self) -> array[int]:
        return array("I", [self.gen]) * keys.SUBSCRIBER_BUCKETS

    def rewritten(self, gen: int, changed: Iterable[int]) -> BucketGens:
        """The map of a new generation ``gen`` that rewrote the buckets ``changed``."""
        table = array("I", self._table) if self._table is not None else self._filled()
        for bucket in changed:
            table[bucket] = gen
        return BucketGens(gen, table)

    def replaced_by(self, newer: BucketGens) -> list[tuple[int, int]]:
        """``(bucket, generation)`` of this map's keys that ``newer`` no longer names."""
        return [
            (bucket, self.of(bucket))
            for bucket in range(keys.SUBSCRIBER_BUCKETS)
            if self.of(bucket) != newer.of(bucket)
        ]


async def bucket_key(redis: RedisClient, name: str, gen: int, bucket: int) -> str:
    """The key of one bucket of generation ``gen`` (four bytes of its map read)."""
    if not gen:
        return keys.subscribers(name, bucket, gen)
    found = await redis.getrange(keys.subscriber_gens(name, gen), 4 * bucket, 4 * bucket + 3)
    if isinstance(found, str):
        found = found.encode()
    held = int.from_bytes(found, "little") if len(found) == 4 else gen
    return keys.subscribers(name, bucket, held)


async def read(redis: RedisClient, name: str, gen: int) -> BucketGens:
    """Generation ``gen``'s map of list ``name`` (uniform for ``gen`` 0 or no map)."""
    if not gen:
        return BucketGens(gen)
    packed = await redis.get(keys.subscriber_gens(name, gen))
    if isinstance(packed, str):  # a client decoding replies: not how this project's are made
        raise TypeError("the Redis client must return bytes to read a bucket map")
    return BucketGens.from_bytes(gen, packed)
