"""The list store: reading lists from Redis and changing single entries.

A list (layout in :mod:`core.keys`) is an immutable *base* written by a full sync
(:mod:`core.build`) plus the delta sets ``adds`` and ``dels``: an entry is listed if
it is in ``adds``, or in the base and not in ``dels``. Each change is one atomic step,
last write wins, acknowledged only after Redis accepted it. ``meta.gen`` names the live
base and ``meta.version`` moves with every change, so readers poll two fields;
``synced_at``/``accepted_at`` stamp when the list was known whole (never touched by
single-entry writes), which lets a reader tell a change from a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import sys
from array import array
from bisect import bisect_left
from collections.abc import Container, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from core import keys, wire
from core.coalesce import Coalescer
from core.config import ListKind
from core.fraud import Upkeep
from core.overlay import queue_write as queue_overlay
from core.shards import dispatcher_for

RedisClient = Redis | RedisCluster
#: Buckets fetched per HMGET when loading a numbers base; small replies keep the
#: event loop responsive while a large list loads.
BUCKETS_PER_READ = 256

_META_INT_FIELDS = (
    "gen",
    "version",
    "size",
    "rows_read",
    "rows_rejected",
    "added",
    "removed",
)


def unpack_bucket(blob: bytes) -> array[int]:
    """Decode one stored bucket (little-endian uint64s) into an array of ints."""
    numbers = array("Q")
    numbers.frombytes(blob)
    if sys.byteorder != "little":
        numbers.byteswap()
    return numbers


def pack_bucket(numbers: array[int]) -> bytes:
    """Encode a sorted array of ints as a stored bucket."""
    if sys.byteorder != "little":
        numbers = array("Q", numbers)
        numbers.byteswap()
    return numbers.tobytes()


def bucket_contains(bucket: Sequence[int], number: int) -> bool:
    i = bisect_left(bucket, number)
    return i < len(bucket) and bucket[i] == number


#: SRANDMEMBER with a count at least the set's size answers every member, once each.
ALL_MEMBERS = 2**31 - 1
#: Members decoded per slice of :func:`_texts`: well under a millisecond each.
DECODE_SLICE = 5_000


async def _texts(members: Iterable[bytes | str]) -> frozenset[str]:
    """Set members as text, decoded in slices with a yield to the event loop between.

    An admin bulk change leaves 100 k entries in a delta set; decoding them in one go
    held the service's event loop, and every call it was answering, for tens of ms.
    """
    items = list(members)
    if len(items) <= DECODE_SLICE:
        return frozenset(map(keys.decoded, items))
    decoded: set[str] = set()
    for start in range(0, len(items), DECODE_SLICE):
        decoded.update(map(keys.decoded, items[start : start + DECODE_SLICE]))
        await asyncio.sleep(0)
    return frozenset(decoded)


@dataclass(frozen=True, slots=True)
class ListMeta:
    """A list's metadata as stored in its ``meta`` hash.

    The admin API's model of it (service/operator/models.py) is made from these fields
    and their docstrings.
    """

    name: str
    kind: str
    gen: int
    version: int
    size: int
    """Entries in the base (last sync)."""
    source: str
    checksum: str
    synced_at: float
    """Unix time of the last full sync; 0: never synced."""
    accepted_at: float
    """Unix time of the last `loader accept`; 0: never."""
    rows_read: int
    rows_rejected: int
    added: int
    removed: int
    pending_adds: int
    pending_dels: int

    @classmethod
    def from_hash(cls, name: str, raw: Mapping[Any, Any], adds: int, dels: int) -> ListMeta:
        fields = {keys.decoded(k): keys.decoded(v) for k, v in raw.items()}
        ints = {f: int(fields.get(f) or 0) for f in _META_INT_FIELDS}
        return cls(
            name=name,
            kind=fields.get("kind", ""),
            source=fields.get("source", ""),
            checksum=fields.get("checksum", ""),
            synced_at=float(fields.get("synced_at") or 0),
            accepted_at=float(fields.get("accepted_at") or 0),
            pending_adds=adds,
            pending_dels=dels,
            **ints,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class ListState:
    """What a poll learns of one list: enough to tell a change from a loss."""

    gen: int
    #: 0 when the list was never written (or its ``meta`` hash is gone).
    version: int
    #: Raw ``synced_at`` and ``accepted_at`` ("" when not set): compared, never parsed,
    #: so two loader hosts with different clocks cannot confuse a reader.
    synced_at: str = ""
    accepted_at: str = ""
    #: Of the live base, written by every commit: with ``gen``, tells whether a copy's
    #: base is still the live one even where ``gen`` numbers started over (a flush).
    checksum: str = ""
    #: A subscribers list's admin writes so far (:func:`core.keys.subscriber_changes`);
    #: 0 for the other kinds, which move ``version`` instead.
    changes: int = 0

    @property
    def stamp(self) -> str:
        """The trust stamp: changes with every full sync and every ``loader accept``."""
        return f"{self.synced_at}|{self.accepted_at}" if self.stamped else ""

    @property
    def base(self) -> tuple[int, str]:
        """Which base is live: equal for two states means the same base entries."""
        return self.gen, self.checksum

    @property
    def stamped(self) -> bool:
        """Whether a full sync or an operator ever vouched for the list."""
        return bool(self.synced_at or self.accepted_at)

    @classmethod
    def from_fields(cls, fields: Sequence[bytes | str | None]) -> ListState:
        """From the replies to ``HMGET meta`` + :data:`STATE_FIELDS`, in that order."""
        gen, version, synced_at, accepted_at, checksum = fields
        return cls(
            int(gen or 0),
            int(version or 0),
            keys.decoded(synced_at),
            keys.decoded(accepted_at),
            keys.decoded(checksum),
        )


def data_lost(before: ListState, now: ListState) -> str | None:
    """How ``now`` shows Redis lost data a healthy ``before`` had, or None.

    The one rule the service (which stops answering from the list) and ``loader run``
    (which heals it) both apply.
    """
    if before.version == 0:  # a list never written: nothing to lose
        return None
    if now.version == 0:
        return "its meta hash is gone (Redis flushed, restarted empty or failed over)"
    if now.version < before.version:
        return (
            f"its version went back from {before.version} to {now.version} (Redis restored "
            "from an older copy or failed over to a lagging replica)"
        )
    # Neither stamp is ever deleted, and a live base is only ever replaced by a newer
    # one (or none): either going back means the meta hash was rewritten from scratch.
    if before.stamped and not now.stamped:
        return "its sync stamp is gone (Redis lost the list and it was rewritten since)"
    if 0 < now.gen < before.gen:
        return f"its base went back from generation {before.gen} to {now.gen}"
    return None


#: The ``meta`` fields a :class:`ListState` is read from.
STATE_FIELDS = ("gen", "version", "synced_at", "accepted_at", "checksum")

_ACCEPT = """
if redis.call('hexists', KEYS[1], 'version') == 0 then
  return false
end
redis.call('hset', KEYS[1], 'accepted_at', ARGV[1])
return redis.call('hincrby', KEYS[1], 'version', 1)
"""


#: A change of more entries than this is staged (see :meth:`ListStore._change_staged`).
STAGE_OVER = 2_000
#: Entries per command while staging.
STAGE_CHUNK = 1_000
#: A staging set left by a process that died mid-change vanishes after this long.
STAGED_TTL_S = 600
#: KEYS: meta, adds, dels, staged adds, staged removals; ARGV: kind. Adds first, then
#: removals, as :meth:`ListStore.change` does; ``unpack`` in slices stays far below
#: Lua's limit on arguments.
_APPLY_STAGED = """
local function move(from, into, out_of)
  local entries = redis.call('smembers', from)
  for i = 1, #entries, 1000 do
    local slice = {unpack(entries, i, math.min(i + 999, #entries))}
    redis.call('sadd', into, unpack(slice))
    redis.call('srem', out_of, unpack(slice))
  end
end
redis.call('hsetnx', KEYS[1], 'kind', ARGV[1])
redis.call('hsetnx', KEYS[1], 'gen', 0)
move(KEYS[4], KEYS[2], KEYS[3])
move(KEYS[5], KEYS[3], KEYS[2])
redis.call('del', KEYS[4], KEYS[5])
return redis.call('hincrby', KEYS[1], 'version', 1)
"""


@dataclass(frozen=True, slots=True)
class Deltas:
    gen: int
    version: int
    synced_at: float
    adds: frozenset[str]
    dels: frozenset[str]
    #: The list's state as read with the deltas (same MULTI/EXEC).
    state: ListState = ListState(0, 0)


class ListStore:
    """Reads and single-entry writes for the lists in one Redis (server, Sentinel or Cluster)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        #: Runs the call path's and the polls' batches, node by node on a Cluster.
        self.dispatcher = dispatcher_for(redis)
        #: The calls' reads of one event-loop turn, sent as one batch (auto-pipelining).
        self.coalescer = Coalescer(self.dispatcher)
        #: Expiries and trims the calls' writes already got (core/fraud.py).
        self.upkeep = Upkeep()
        self._later: set[asyncio.Task[list[Any]]] = set()
        #: Commands :meth:`send_later` was given this event-loop turn, not yet sent.
        self._pending: list[tuple[Any, ...]] = []

    # --- reading -------------------------------------------------------------------
    async def states(self, names: Iterable[str]) -> dict[str, ListState]:
        """The :class:`ListState` of each list, in one pipelined round trip.

        Raises the first failure (see :meth:`states_each`).
        """
        found = await self.states_each(names)
        for state in found.values():
            if isinstance(state, Exception):
                raise state
        return {name: state for name, state in found.items() if isinstance(state, ListState)}

    async def states_each(
        self, names: Iterable[str], counted: Container[str] = ()
    ) -> dict[str, ListState | RedisError]:
        """Each list's :class:`ListState`, or why it could not be read: one round trip,
        each Cluster node on its own, so a failing node fails only the lists it holds.
        The lists in ``counted`` (subscribers lists) also get their ``changes``."""
        names = list(names)
        commands: list[tuple[Any, ...]] = []
        for name in names:
            commands.append(("HMGET", keys.meta(name), *STATE_FIELDS))
            if name in counted:
                commands.append(("GET", keys.subscriber_changes(name)))
        replies = iter(await self.dispatcher.run(commands))
        found: dict[str, ListState | RedisError] = {}
        for name in names:
            reply = next(replies)
            changes = next(replies) if name in counted else 0
            failed = next((r for r in (reply, changes) if isinstance(r, Exception)), None)
            if isinstance(failed, RedisError):
                found[name] = failed
            elif failed is not None:
                found[name] = RedisError(f"{type(failed).__name__}: {failed}")
            else:
                state = ListState.from_fields(reply)
                found[name] = replace(state, changes=int(changes or 0)) if changes else state
        return found

    async def subscriber_state(self, name: str) -> tuple[ListState, int]:
        """A subscribers list's state (``changes`` included) and ``meta.size``, read
        atomically (one tag)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.meta(name), [*STATE_FIELDS, "size"])
            pipe.get(keys.subscriber_changes(name))
            fields, changes = await pipe.execute()
        state = replace(ListState.from_fields(fields[:-1]), changes=int(changes or 0))
        return state, int(fields[-1] or 0)

    async def deltas(self, name: str) -> Deltas:
        """The live ``gen`` and ``version`` with the delta sets they belong to, read atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.meta(name), STATE_FIELDS)
            # Every member, as SMEMBERS would give, but as a list: redis-py turns an
            # SMEMBERS reply into a set on the event loop, ~10 ms for 100 k members.
            pipe.srandmember(keys.adds(name), ALL_MEMBERS)
            pipe.srandmember(keys.dels(name), ALL_MEMBERS)
            fields, adds, dels = await pipe.execute()
        state = ListState.from_fields(fields)
        return Deltas(
            gen=state.gen,
            version=state.version,
            synced_at=float(state.synced_at or 0),
            adds=await _texts(adds),
            dels=await _texts(dels),
            state=state,
        )

    async def number_base(self, name: str, gen: int) -> list[array[int]]:
        """All buckets of a numbers base, indexed by bucket id (empty for gen 0)."""
        buckets = [array("Q") for _ in range(keys.NUMBER_BUCKETS)]
        if gen == 0:
            return buckets
        key = keys.base(name, gen)
        if not await self.redis.exists(key):
            raise MissingGeneration(name, gen)
        for start in range(0, keys.NUMBER_BUCKETS, BUCKETS_PER_READ):
            ids = range(start, min(start + BUCKETS_PER_READ, keys.NUMBER_BUCKETS))
            blobs = await self.redis.hmget(key, list(ids))
            for bucket, blob in zip(ids, blobs, strict=True):
                if isinstance(blob, bytes) and blob:
                    buckets[bucket] = unpack_bucket(blob)
        return buckets

    async def set_base(self, name: str, gen: int) -> frozenset[str]:
        """All entries of a prefixes or names base (empty for gen 0)."""
        if gen == 0:
            return frozenset()
        key = keys.base(name, gen)
        members = await self.redis.smembers(key)
        if not members and not await self.redis.exists(key):
            raise MissingGeneration(name, gen)
        return frozenset(keys.decoded(m) for m in members)

    async def meta(self, name: str) -> ListMeta | None:
        """Metadata of one list, or None if it was never written."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.meta(name))
            pipe.scard(keys.adds(name))
            pipe.scard(keys.dels(name))
            raw, adds, dels = await pipe.execute()
        if not raw:
            return None
        return ListMeta.from_hash(name, raw, int(adds), int(dels))

    async def contains(self, name: str, kind: ListKind, entry: str) -> bool:
        """Whether a canonical entry is on the list right now (asks Redis, not a cache)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sismember(keys.adds(name), entry)
            pipe.sismember(keys.dels(name), entry)
            pipe.hget(keys.meta(name), "gen")
            in_adds, in_dels, gen = await pipe.execute()
        if in_adds:
            return True
        if in_dels or not gen or int(gen) == 0:
            return False
        base = keys.base(name, int(gen))
        if kind != "numbers":
            return bool(await self.redis.sismember(base, entry))
        number = int(entry)
        blob = await self.redis.hget(base, str(keys.bucket_of(number)))
        return isinstance(blob, bytes) and bucket_contains(unpack_bucket(blob), number)

    async def meta_fields(self, name: str, *fields: str) -> dict[str, str]:
        """Raw ``meta`` fields of a list (``""`` for a field not set)."""
        values = await self.redis.hmget(keys.meta(name), list(fields))
        return {f: keys.decoded(v) for f, v in zip(fields, values, strict=True)}

    async def touch(self, name: str, fields: Mapping[str, str | int | float]) -> int:
        """Record a sync that changed no entry: set ``fields`` in ``meta``, bump ``version``.

        The version bump makes every service instance re-read the (unchanged) deltas and
        with them the new ``synced_at``; the base is not reloaded. Returns the version.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.meta(name), mapping=dict(fields))  # type: ignore[arg-type]
            pipe.hincrby(keys.meta(name), "version", 1)
            replies = await pipe.execute()
        return int(replies[-1])

    async def accept(self, name: str, accepted_at: float) -> int | None:
        """Vouch for the list as it is in Redis now (``python -m loader accept``).

        Sets ``meta.accepted_at`` and bumps ``version`` in one step, so every service
        instance trusts the list again (see :mod:`service.screening.cache`). Returns the new
        version, or None when the list does not exist in Redis (nothing is written).
        """
        reply = await self.redis.eval(_ACCEPT, 1, keys.meta(name), f"{accepted_at:.3f}")
        return None if reply is None else int(reply)

    # --- single-entry writes -------------------------------------------------------
    async def change(
        self,
        name: str,
        kind: ListKind,
        *,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        overlay: bool = False,
        ttl_s: float | None = None,
    ) -> int:
        """Add and remove canonical entries in one atomic step; return the new version.

        Returns only after Redis accepted the write (MULTI/EXEC reply received). Over
        :data:`STAGE_OVER` entries, see :meth:`_change_staged`. ``overlay`` (admin
        writes to a list with a source) also keeps the change in the list's overlay,
        which syncs apply (:mod:`core.overlay`), expiring after ``ttl_s`` if given.
        """
        add, remove = list(add), list(remove)
        if len(add) + len(remove) > STAGE_OVER:
            version = await self._change_staged(name, kind, add, remove)
            if overlay:  # after the change: chunked, so not in its MULTI/EXEC
                for start in range(0, len(add) + len(remove), STAGE_CHUNK):
                    async with self.redis.pipeline(transaction=True) as pipe:
                        end = start + STAGE_CHUNK
                        queue_overlay(
                            pipe,
                            name,
                            add[start:end],
                            remove[max(start - len(add), 0) : max(end - len(add), 0)],
                            ttl_s,
                        )
                        await pipe.execute()
            return version
        meta_key = keys.meta(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta_key, "kind", kind)
            pipe.hsetnx(meta_key, "gen", 0)
            if add:
                pipe.sadd(keys.adds(name), *add)
                pipe.srem(keys.dels(name), *add)
            if remove:
                pipe.srem(keys.adds(name), *remove)
                pipe.sadd(keys.dels(name), *remove)
            if overlay:
                queue_overlay(pipe, name, add, remove, ttl_s)
            pipe.hincrby(meta_key, "version", 1)
            replies = await pipe.execute()
        return int(replies[-1])

    async def _change_staged(
        self, name: str, kind: ListKind, add: list[str], remove: list[str]
    ) -> int:
        """A large change: staged in chunks aside, then applied by one atomic script.

        redis-py encodes a whole command on the event loop, so one SADD of 100 k entries
        would stall every call the process answers for a long time (figures in
        docs/design.md, "Large admin changes"). Chunks with awaits between them do not. Nobody
        reads the staging sets (they expire if this process dies); the script moves
        them into ``adds``/``dels`` and bumps ``version`` in one step, so readers still
        see all of the change or none of it. Its Redis time grows with the change, not
        with the list.
        """
        token = secrets.token_hex(8)
        staged = (keys.staged_change(name, "add", token), keys.staged_change(name, "remove", token))
        try:
            for key, entries in zip(staged, (add, remove), strict=True):
                for start in range(0, len(entries), STAGE_CHUNK):
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.sadd(key, *entries[start : start + STAGE_CHUNK])
                        pipe.expire(key, STAGED_TTL_S)
                        await pipe.execute()
            lists = (keys.meta(name), keys.adds(name), keys.dels(name))
            version = await self.redis.eval(_APPLY_STAGED, 5, *lists, *staged, kind)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: they expire anyway
                await self.redis.delete(*staged)
            raise
        return int(version)

    # --- call-rate counters --------------------------------------------------------
    async def count_call(
        self,
        caller: str,
        windows: Sequence[tuple[str, int]],
        now_s: float,
        *,
        increment: bool = True,
    ) -> dict[str, int]:
        """Count one call per ``(rule_key, window_s)``; return calls per rule in the window.

        A sliding window approximated from two fixed ones: this window's count plus the
        previous window's, weighted by how much of it still overlaps the sliding window,
        rounded up (so ``count > limit`` is the estimate exceeding the limit, and a burst
        that straddles a window boundary is not under-counted). One pipelined round trip
        whatever the number of rules; right across every service instance because the
        counters live in Redis. ``increment=False`` (explain) stores nothing but still
        counts this call, so it reports what the call would be judged on.
        """
        counts, _, _, _ = await self.fetch_for_call(caller, windows, now_s, increment=increment)
        return counts

    @property
    def sends_text(self) -> bool:
        """Whether :meth:`fetch_for_call` sends RESP text composed by its callers
        (``extra_text``): on one server's lean link, not through a Cluster's."""
        return self.dispatcher.plain_link is not None

    async def fetch_for_call(
        self,
        caller: str | None,
        windows: Sequence[tuple[str, int]],
        now_s: float,
        *,
        increment: bool = True,
        subscribers: Sequence[tuple[str, int, str]] = (),
        extra: Sequence[tuple[Any, ...]] = (),
        extra_text: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, int], dict[str, bytes | None], tuple[str, ...], list[Any]]:
        """Everything one call needs from Redis, in one pipelined round trip.

        The call-rate counts of :meth:`count_call` (when ``caller`` and ``windows``) and,
        for each ``(list, gen, subscriber)`` of ``subscribers``, that subscriber's packed
        entries in the key of generation ``gen`` of its bucket (the generation the live
        one's bucket map names: ``core.bucket_gens``) with its bucket's marker
        (:data:`core.keys.SUBSCRIBER_MARKER`): one HMGET each. Returns (counts per rule,
        packed entries per list (None: no entries), the lists whose
        bucket has no marker: Redis lost that bucket, so "no entries" cannot be trusted,
        the replies to the ``extra`` commands, in order: core/fraud.py's; each command
        single-key, key first; ``extra_text``: the same as RESP text, one string each,
        used when :attr:`sends_text`). Sent with the other calls of the same event-loop turn
        (on one server by its lean link, :mod:`core.wire`; else :mod:`core.coalesce`);
        on a Cluster each node's commands go on that node's own connections, all at
        once (:mod:`core.shards`). Raises a ``RedisError`` when any
        of this call's commands failed, ``TimeoutError`` when ``timeout_s`` passes
        before the replies come.
        """
        counted = windows if caller else ()
        link = self.dispatcher.plain_link
        commands: list[tuple[Any, ...]] = []
        # For the plain link, the same commands as RESP text (core.wire), in order.
        text: list[str] | None = [] if link is not None else None
        unexpired: list[tuple[int, tuple[Any, ...]]] = []
        starts = [0]  # where each counted rule's commands start (and, last, end)
        for rule_key, window_s in counted:
            assert caller is not None
            index = int(now_s // window_s)
            current = keys.rate(caller, rule_key, index)
            previous = keys.rate(caller, rule_key, index - 1)
            if not increment:
                commands += [("GET", current), ("GET", previous)]
                if text is not None:
                    text += [wire.get(current), wire.get(previous)]
                continue
            commands += [("INCRBY", current, 1), ("GET", previous)]
            if text is not None:
                text += [wire.incrby_one(current), wire.get(previous)]
            expire = ("EXPIRE", current, 2 * window_s)
            if self.upkeep.counter_expiry_due(current):
                commands.append(expire)
                if text is not None:
                    text.append(wire.expire(current, 2 * window_s))
            else:  # sent by this process before; again only if the reply shows it new
                unexpired.append((len(commands) - 2, expire))
            starts.append(len(commands))
        for name, gen, subscriber in subscribers:
            bucket = keys.subscribers(name, keys.subscriber_bucket_of(subscriber), gen)
            commands.append(("HMGET", bucket, subscriber, keys.SUBSCRIBER_MARKER))
            if text is not None:
                text.append(wire.hmget_two(bucket, subscriber, keys.SUBSCRIBER_MARKER))
        commands += extra
        try:
            if link is not None:  # one server: its link joins the turn's callers itself
                assert text is not None
                if extra_text is not None:
                    text += extra_text
                data = wire.ascii_bytes("".join(text))
                if data is not None and extra and extra_text is None:
                    data += wire.encode(extra)
                replies = await link.run(commands, timeout_s, data)
            else:
                replies = await self.coalescer.run(commands, timeout_s)
        except BaseException:  # the call gave up (its deadline): its writes may not land
            self._forget(commands)
            raise
        for reply in replies:
            if isinstance(reply, Exception):
                self._forget(commands)
                raise reply if isinstance(reply, RedisError) else RedisError(str(reply))
        if unexpired:
            self.send_later([expire for at, expire in unexpired if replies[at] == 1])
        if not increment:
            starts = [2 * i for i in range(len(counted) + 1)]
        counts = {}
        for i, (rule_key, window_s) in enumerate(counted):
            current, previous = replies[starts[i]], replies[starts[i] + 1]
            overlap = 1 - (now_s % window_s) / window_s
            weighted = math.ceil(int(previous or 0) * overlap - 1e-9)
            counts[rule_key] = int(current or 0) + weighted + (0 if increment else 1)
        first = starts[len(counted)]
        entries: dict[str, bytes | None] = {}
        lost: tuple[str, ...] = ()
        extra_at = len(replies) - len(extra)
        for (name, _, _), (blob, marker) in zip(subscribers, replies[first:extra_at], strict=True):
            entries[name] = blob if isinstance(blob, bytes) else None
            if marker is None:
                lost += (name,)
        return counts, entries, lost, replies[extra_at:]

    def _forget(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """The next call on these keys sends their upkeep again (this call's may be lost)."""
        for command in commands:
            self.upkeep.forget(command[1])

    async def drain(self) -> None:
        """Wait for the writes :meth:`send_later` started (before the client closes)."""
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    def send_later(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Send ``commands`` after the call that found them needed, off its round trip
        (never raises: the dispatcher turns failures into replies). Those given in one
        event-loop turn go together, by one task: not a task per call."""
        if not commands:
            return
        if not self._pending:
            self.run_later(self._send_pending())
        self._pending += commands

    def run_later(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` off the calls' path, as a task :meth:`drain` waits for."""
        task = asyncio.create_task(work)
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return task

    async def read_subscribers(
        self, reads: Sequence[tuple[str, int, str]], timeout_s: float | None = None
    ) -> list[tuple[bytes | None, bool] | None]:
        """For each ``(list, gen, subscriber)``, as :meth:`fetch_for_call` reads it: the
        packed entries (None: none) and whether its bucket has its marker, or None where
        that read failed (on a Cluster, its node's trouble fails its reads only); in one
        round trip. Raises ``TimeoutError`` when ``timeout_s`` passes first."""
        marker = keys.SUBSCRIBER_MARKER
        buckets = [
            (keys.subscribers(name, keys.subscriber_bucket_of(subscriber), gen), subscriber)
            for name, gen, subscriber in reads
        ]
        commands = [("HMGET", bucket, subscriber, marker) for bucket, subscriber in buckets]
        link = self.dispatcher.plain_link
        if link is not None:  # composed as text, as fetch_for_call's (core.wire)
            text = "".join([wire.hmget_two(bucket, sub, marker) for bucket, sub in buckets])
            replies = await link.run(commands, timeout_s, wire.ascii_bytes(text))
        else:
            replies = await self.coalescer.run(commands, timeout_s)
        found: list[tuple[bytes | None, bool] | None] = []
        for reply in replies:
            if isinstance(reply, Exception):
                found.append(None)
                continue
            blob, mark = reply
            found.append((blob if isinstance(blob, bytes) else None, mark is not None))
        return found

    async def _send_pending(self) -> list[Any]:
        commands, self._pending = self._pending, []
        return await self.coalescer.run(commands)


class MissingGeneration(LookupError):
    """A base named by ``meta.gen`` is gone (swapped out long ago); read ``meta`` again."""

    def __init__(self, name: str, gen: int) -> None:
        super().__init__(f"list {name!r}: base generation {gen} is missing")
