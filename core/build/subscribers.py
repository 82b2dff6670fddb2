"""The builder of a ``subscribers`` list (:mod:`core.subscribers`): staged per bucket,
then settled, packed and diffed against the live generation a round of buckets at a time
(``finish``, which writes nothing to Redis), then written as a new generation and
swapped in (``commit``). A dry run, a refused sync and one that changes nothing so
never write a bucket.

The rows are staged on the loader's own disk (a folder under ``TMPDIR``, one file per
round of buckets), not in Redis: text rows cost Redis several times the packed list.
Only the buckets whose content changed are written; the new generation's bucket map
(:mod:`core.bucket_gens`) names the others where they are. Redis then holds the live
list and the changed buckets, no more; a change wider than ``step_share`` of what the
list costs Redis is swapped in by steps, each its own generation, the buckets a step replaced
deleted before the next step writes, so Redis holds at most about (1 + share) lists.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import marshal
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from core import bucket_gens, keys, subscriber_overlay
from core.bucket_gens import BucketGens
from core.build.base import BuildLock, BuildResult, ListBuilder
from core.store import RedisClient
from core.subscribers import MAX_ENTRIES as subscribers_max
from core.subscribers import entry_of as subscribers_entry_of
from core.subscribers import pack as subscribers_pack
from core.subscribers import settle as subscribers_settle
from core.subscribers import unpack_codes as subscribers_unpack

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Buckets of a subscribers list handled per pipelined round trip while building, and
#: per staging file: a round's pairs are what ``finish`` holds in memory at once.
SUBSCRIBER_BUCKETS_PER_ROUND = 128
#: What a bucket key costs Redis beyond its subscribers' fields (its name, the hash, the
#: marker: 129 bytes measured with INFO's used_memory over 2,000 such keys), and what a
#: TTL on it adds (an entry in the expires table: 52 bytes). Steps are weighed with
#: these, so that the (1 + share) bound holds for small buckets too: while a step waits,
#: one of each of its buckets' two keys has a TTL.
BUCKET_KEY_BYTES = 128
TTL_ENTRY_BYTES = 52
#: Staging folders are named ``<prefix><list>.<pid>.<random>``: a list name has no dot.
STAGE_PREFIX = "callscreen-stage."


class StagingError(OSError):
    """The rows could not be staged on (or read back from) the loader's disk."""


class SubscriberListBuilder(ListBuilder):
    """A subscribers list (:mod:`core.subscribers`): staged per bucket, packed and diffed
    in ``finish`` (onto the loader's disk), written to Redis in ``commit``.

    Sizes count pairs (subscriber, entry). ``finish`` works
    :data:`SUBSCRIBER_BUCKETS_PER_ROUND` buckets at a time, so memory stays flat. The new
    buckets carry a TTL until just before the swap (one MULTI/EXEC on ``meta``); a build
    killed before it leaves ``meta.building`` (deleted by the next build), one killed
    after it ``meta.retiring`` (expired by the next build). Every new bucket gets the
    :data:`core.keys.SUBSCRIBER_MARKER` field; a live bucket found without it is diffed as
    empty and counted in :attr:`lost_buckets`. The staged rows and packed buckets live
    in a folder of the loader's own, removed by ``commit`` and ``abort`` (a killed
    loader's by the next build of the same list on the host).

    Steps (:attr:`step_share` below 1): when the changed buckets cost Redis more than
    that share of what the new list costs (and their entries take at least
    :attr:`step_min_bytes`), ``commit`` swaps them in by steps of whole rounds, each
    at most that share, each a generation of its own (written, mapped, swapped,
    its replaced buckets expiring), and waits :attr:`step_wait_s` after each but the
    last before deleting what it replaced. A subscriber's entries still switch at one
    instant (a bucket is in one step); the list as a whole switches step by step. A
    build stopped between steps leaves the list at the last step swapped in; the next
    sync completes it. Every bucket written is settled again when its admin overlay
    moved since ``finish`` read it, so an admin write made meanwhile is not undone.
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
        #: Rows not yet written to the staging files, by round: ``bucket subscriber code``.
        self._pending: dict[int, list[str]] = {}
        self._count = 0
        self._stage: Path | None = None
        #: Whether generation ``gen`` may have keys in Redis to delete on abort: once
        #: ``commit`` writes, and for a builder without the lock (start_build's clean-up
        #: of a dead build's generation).
        self._keys_written = lock is None
        #: Subscribers in the new generation (set by ``finish``).
        self.subscribers = 0
        #: Buckets of the live generation that had lost their marker (set by ``finish``).
        self.lost_buckets = 0
        #: The live generation's bucket map (set by ``finish``).
        self._old_gens = BucketGens(old_gen)
        #: Buckets whose content differs from the live generation's (set by ``finish``):
        #: only these are written.
        self._changed: list[int] = []
        #: Packed bytes of each changed bucket, and of the whole new list (``finish``).
        self._sizes: dict[int, int] = {}
        self._list_bytes = 0
        #: Each changed bucket's admin overlay as ``finish`` read it (a fingerprint).
        self._overlays: dict[int, int] = {}
        #: Largest share of what the new list costs Redis one step swaps in (1: one
        #: swap), and the changed entries' bytes below which a change goes in one swap
        #: whatever its share.
        self.step_share = 1.0
        self.step_min_bytes = 0
        #: Pause after each step but the last before its replaced buckets are deleted.
        self.step_wait_s: float = keys.OLD_GENERATION_GRACE_S

    async def add(self, entries: Iterable[str]) -> None:
        raise TypeError("a subscribers list takes pairs: use add_pair()")

    async def add_pair(self, subscriber: str, code: str) -> None:
        """Stage one canonical subscriber with one packed code (core.subscribers.code_of)."""
        bucket = keys.subscriber_bucket_of(subscriber)
        round_ = bucket // SUBSCRIBER_BUCKETS_PER_ROUND
        self._pending.setdefault(round_, []).append(f"{bucket} {subscriber} {code}\n")
        self._count += 1
        if self._count >= self.batch_size:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        await self._refresh_lock()
        pending, self._pending, self._count = self._pending, {}, 0
        await self._stage_io(_append_rounds, await self._stage_folder(), pending)

    async def _stage_folder(self) -> Path:
        if self._stage is None:
            self._stage = await self._stage_io(_stage_folder, self.name)
        return self._stage

    async def _stage_io(self, work: Callable[..., _T], *args: Any) -> _T:
        """``work(*args)`` in a thread; a failure of the disk as :class:`StagingError`."""
        try:
            return await asyncio.to_thread(work, *args)
        except OSError as exc:
            raise self._staging_error(exc) from exc

    def _staging_error(self, exc: OSError) -> StagingError:
        return StagingError(
            f"list {self.name!r}: staging its rows on the loader's disk failed ({exc}); "
            "TMPDIR must name a folder with room for the staged rows (docs/subscribers.md)"
        )

    def _staged_round(self, round_: int) -> dict[int, list[str]]:
        """The staged ``subscriber code`` rows of one round, by bucket (the file stays
        until the stage folder goes: a bucket may be settled again before it is written)."""
        found: dict[int, list[str]] = {}
        if self._stage is None:
            return found
        path = self._stage / f"{round_}.txt"
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:  # no pair fell in this round's buckets
            return found
        for line in text.splitlines():
            bucket, _, row = line.partition(" ")
            found.setdefault(int(bucket), []).append(row)
        return found

    def _remove_stage(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    async def _on_keys(self, command: str, where: list[tuple[int, int]], *args: Any) -> None:
        """Run ``command`` on the bucket keys ``(bucket, generation)`` (pipelined)."""
        for first in range(0, len(where), 2048):
            await self._refresh_lock()
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket, gen in where[first : first + 2048]:
                    getattr(pipe, command)(keys.subscribers(self.name, bucket, gen), *args)
                await pipe.execute()

    async def _each_bucket(self, command: str, *args: Any, gen: int) -> None:
        """Run ``command`` on every bucket key of generation ``gen`` (pipelined)."""
        await self._on_keys(command, [(b, gen) for b in range(keys.SUBSCRIBER_BUCKETS)], *args)

    async def _retire(self, old: BucketGens, live: BucketGens) -> list[tuple[int, int]]:
        """Expire what generation ``old`` named and ``live`` does not, and ``old``'s map;
        those ``(bucket, generation)`` keys."""
        replaced = old.replaced_by(live)
        await self._on_keys("expire", replaced, keys.OLD_GENERATION_GRACE_S)
        await self.redis.expire(
            keys.subscriber_gens(self.name, old.gen), keys.OLD_GENERATION_GRACE_S
        )
        return replaced

    async def _retire_leftover(self) -> None:
        """Expire the buckets of a generation a killed loader swapped out (``retiring``)
        that the live generation no longer names.

        Also delete those of a generation the admin API began to allocate and never made
        live (``marking``, core/subscribers.py): once a generation is live, none can be
        adopted any more. With none live, an admin write may be marking it right now.
        """
        meta_key = keys.meta(self.name)
        fields = await self.redis.hmget(meta_key, ["retiring", "marking"])
        retiring, marking = (int(value or 0) for value in fields)
        if retiring and retiring not in (self.gen, self.old_gen):
            old = await bucket_gens.read(self.redis, self.name, retiring)
            await self._retire(old, self._old_gens)
            await self.redis.hdel(meta_key, "retiring")
        if self.old_gen and marking and marking not in (self.gen, self.old_gen):
            await self.redis.hdel(meta_key, "marking")
            await self._each_bucket("delete", gen=marking)

    async def finish(self, *, sample: int = 0) -> BuildResult:
        await self._flush()
        self._old_gens = await bucket_gens.read(self.redis, self.name, self.old_gen)
        await self._retire_leftover()
        self._changed, self._sizes, self._overlays, self._list_bytes = [], {}, {}, 0
        tally = _Tally(sample)
        step = SUBSCRIBER_BUCKETS_PER_ROUND
        now_s = time.time()  # admin overlay fields expired by then are left out
        for first in range(0, keys.SUBSCRIBER_BUCKETS, step):
            await self._refresh_lock()
            ids = range(first, min(first + step, keys.SUBSCRIBER_BUCKETS))
            staged = await self._stage_io(self._staged_round, first // step)
            rows = await self._read_round(ids)
            packed_round = []
            for bucket, (old_raw, kept) in zip(ids, rows, strict=True):
                live = subscriber_overlay.live(kept, now_s)
                packed = tally.settle(staged.get(bucket, ()), live)
                tally.diff(packed, self._old_entries(old_raw, tally))
                size = _packed_bytes(packed)
                self._list_bytes += size
                if not self.old_gen or _differs(packed, old_raw):
                    self._changed.append(bucket)
                    self._sizes[bucket] = size
                    self._overlays[bucket] = _fingerprint(kept)
                packed_round.append(packed)
            folder = await self._stage_folder()
            await self._stage_io(_save_packed, folder / f"{first // step}.packed", packed_round)
        self._report(tally)
        self.subscribers = tally.subscribers
        self.lost_buckets = tally.lost
        self.result = tally.result()
        return self.result

    async def _read_round(self, ids: range) -> list[tuple[dict[bytes, bytes], dict[bytes, bytes]]]:
        """Each bucket's live hash (none without a live generation) and its admin
        overlay (:mod:`core.subscriber_overlay`)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in ids:
                if self.old_gen:
                    pipe.hgetall(self._old_gens.key(self.name, bucket))
                pipe.hgetall(keys.subscriber_overlay(self.name, bucket))
            replies = await pipe.execute()
        if not self.old_gen:
            return [({}, kept) for kept in replies]
        return list(zip(*[iter(replies)] * 2, strict=True))

    def _old_entries(self, old_raw: dict[bytes, bytes], tally: _Tally) -> dict[str, list[str]]:
        """The live bucket's subscribers and codes; none when Redis lost the bucket."""
        if self.old_gen and _MARKER not in old_raw:
            tally.lost += 1  # Redis lost this bucket: what it holds is no base
            return {}
        return {keys.decoded(k): subscribers_unpack(v) for k, v in old_raw.items() if k != _MARKER}

    def _write_bucket(self, pipe: Any, bucket: int, packed: dict[str, bytes]) -> None:
        """Write one bucket of the new generation (with a TTL until the swap)."""
        # Every bucket, empty or not, gets the marker (core/keys.py).
        key = keys.subscribers(self.name, bucket, self.gen)
        pipe.hset(key, mapping={keys.SUBSCRIBER_MARKER: self.gen, **packed})
        pipe.expire(key, keys.STAGING_TTL_S)

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
        new_gens = BucketGens(self.gen)
        if self.result is not None and self.result.size:
            steps = self._steps()
            for number, step in enumerate(steps[:-1], start=1):
                await self._commit_step(step, number, len(steps))
            self._changed = steps[-1]
            new_gens = await self._write_generation()
        extra = {"subscribers": self.subscribers, "retiring": self.old_gen}
        version = await super().commit(
            {**fields, **extra}, expect_version=expect_version, compaction=compaction
        )
        self._remove_stage()
        if self.old_gen:
            await self._retire(self._old_gens, new_gens)
        await self.redis.hdel(keys.meta(self.name), "retiring")
        return version

    async def _write_generation(self) -> BucketGens:
        """Write the buckets ``_changed`` names as generation ``gen`` and its map, both
        kept from now on (the swap comes next); that map."""
        await self._write_built()
        new_gens = self._new_gens()
        map_key = keys.subscriber_gens(self.name, self.gen)
        if not new_gens.uniform:  # named before the swap, kept while it is live
            await self.redis.set(map_key, new_gens.to_bytes(), ex=keys.STAGING_TTL_S)
        await self._on_keys("persist", [(b, self.gen) for b in self._changed])
        await self.redis.persist(map_key)
        return new_gens

    def _new_gens(self) -> BucketGens:
        """The new generation's map: the changed buckets at ``gen``, the rest where the
        live generation has them (uniform when every bucket was written)."""
        if not self.old_gen or len(self._changed) == keys.SUBSCRIBER_BUCKETS:
            return BucketGens(self.gen)
        return self._old_gens.rewritten(self.gen, self._changed)

    def _steps(self) -> list[list[int]]:
        """The changed buckets, by step: whole rounds, as few steps as keep each at most
        ``step_share`` of what the new list costs Redis (each bucket weighed with
        :data:`BUCKET_KEY_BYTES`, a step's also with :data:`TTL_ENTRY_BYTES`), evenly
        split, give or take a round. One step when they all fit, when their entries
        take less than ``step_min_bytes``, and for a first sync, which has no live list
        to keep beside them."""
        limit = self.step_share * (self._list_bytes + keys.SUBSCRIBER_BUCKETS * BUCKET_KEY_BYTES)
        extra = BUCKET_KEY_BYTES + TTL_ENTRY_BYTES
        rounds = _by_round(self._changed)
        weights = [sum(self._sizes[b] + extra for b in r) for r in rounds.values()]
        changed = sum(self._sizes.values())
        if not self.old_gen or sum(weights) <= limit or changed < self.step_min_bytes:
            return [self._changed]
        count = math.ceil(sum(weights) / limit)
        each = sum(weights) / count
        steps: list[list[int]] = [[] for _ in range(count)]
        held = 0
        for buckets, weight in zip(rounds.values(), weights, strict=True):
            # A round goes to the step its middle falls in.
            steps[min(count - 1, int((held + weight / 2) / each))] += buckets
            held += weight
        return [step for step in steps if step]

    async def _commit_step(self, buckets: list[int], number: int, steps: int) -> None:
        """Swap in one step of a wide change as generation ``gen``, wait out the grace of
        the buckets it replaced, delete them and go on under a new generation."""
        self._changed = buckets
        step_gens = await self._write_generation()
        await self._swap_step()
        replaced = await self._retire(self._old_gens, step_gens)
        meta_key = keys.meta(self.name)
        await self.redis.hdel(meta_key, "retiring")
        # The step is live: from here on an abort must leave it alone, so the builder
        # moves to a new generation before it waits.
        old_map = keys.subscriber_gens(self.name, self.old_gen)
        self.old_gen, self._old_gens = self.gen, step_gens
        self.gen = int(await self.redis.hincrby(meta_key, "next_gen", 1))
        self._keys_written = False
        await self.redis.hset(meta_key, "building", self.gen)
        logger.info(
            "list %r: step %d of %d swapped in (%d buckets, generation %d); deleting the "
            "buckets it replaced in %.0f s",
            self.name,
            number,
            steps,
            len(buckets),
            self.old_gen,
            self.step_wait_s,
        )
        await self._wait(self.step_wait_s)
        await self._on_keys("delete", replaced)
        await self.redis.delete(old_map)

    async def _swap_step(self) -> None:
        """Make generation ``gen`` (one step) live, the previous one ``retiring``."""
        await self._swap_meta(
            {"gen": self.gen, "retiring": self.old_gen},
            replaced="by another writer between two steps",
            raced="while a step swapped",
        )

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, keeping the build lock."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 1.0))
            await self._refresh_lock()

    async def _write_built(self) -> None:
        """Write the buckets ``_changed`` names, a round at a time, as generation ``gen``;
        a bucket whose admin overlay moved since ``finish`` is settled again first."""
        self._keys_written = True
        folder = await self._stage_folder()
        step = SUBSCRIBER_BUCKETS_PER_ROUND
        for round_, buckets in _by_round(self._changed).items():
            await self._refresh_lock()
            packed_round = await self._stage_io(_load_packed, folder / f"{round_}.packed")
            again = await self._settled_again(round_, buckets)
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket in buckets:
                    packed = again.get(bucket, packed_round[bucket - round_ * step])
                    self._write_bucket(pipe, bucket, packed)
                await pipe.execute()

    async def _settled_again(self, round_: int, buckets: list[int]) -> dict[int, dict[str, bytes]]:
        """The buckets of one round whose admin overlay changed since ``finish`` read it,
        settled again from their staged rows and the overlay as it is now."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hgetall(keys.subscriber_overlay(self.name, bucket))
            overlays = await pipe.execute()
        moved = {
            bucket: kept
            for bucket, kept in zip(buckets, overlays, strict=True)
            if _fingerprint(kept) != self._overlays.get(bucket)
        }
        if not moved:
            return {}
        staged = await self._stage_io(self._staged_round, round_)
        now_s = time.time()
        tally = _Tally(0)  # the counts stay finish's: an admin write is not the source's
        return {
            bucket: tally.settle(staged.get(bucket, ()), subscriber_overlay.live(kept, now_s))
            for bucket, kept in moved.items()
        }

    async def _delete_built(self) -> None:
        self._remove_stage()
        if self._keys_written:
            await self._each_bucket("delete", gen=self.gen)
            await self.redis.delete(keys.subscriber_gens(self.name, self.gen))


def _stage_folder(name: str) -> Path:
    """A new staging folder for list ``name``; first removes the list's folders whose
    loader is gone: its process no longer runs, or it had this process's pid (an
    earlier life of this container, or an earlier build here: a process builds a list
    once at a time). A running loader's is kept: another loader on the host may sync a
    list of the same name into another Redis.
    """
    parent = Path(tempfile.gettempdir())
    own = os.getpid()
    for old in parent.glob(f"{STAGE_PREFIX}{name}.*"):
        pid = old.name[len(STAGE_PREFIX) + len(name) + 1 :].partition(".")[0]
        if pid.isdigit() and (int(pid) == own or not _running(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{name}.{own}.", dir=parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _save_packed(path: Path, packed_round: list[dict[str, bytes]]) -> None:
    with path.open("wb") as out:
        marshal.dump(packed_round, out)


def _load_packed(path: Path) -> list[dict[str, bytes]]:
    with path.open("rb") as source:
        found: list[dict[str, bytes]] = marshal.load(source)
    path.unlink()
    return found


def _append_rounds(folder: Path, pending: Mapping[int, list[str]]) -> None:
    for round_, lines in pending.items():
        with (folder / f"{round_}.txt").open("a", encoding="ascii") as out:
            out.write("".join(lines))


def _readable(pair: str) -> str:
    """``subscriber:code`` as ``subscriber:entry (side)`` for the dry-run report."""
    subscriber, _, code = pair.partition(":")
    entry, side = subscribers_entry_of(code)
    return f"{subscriber}:{entry} ({side})"


_MARKER = keys.SUBSCRIBER_MARKER.encode()


def _by_round(buckets: Iterable[int]) -> dict[int, list[int]]:
    """``buckets`` by round of :data:`SUBSCRIBER_BUCKETS_PER_ROUND`, in order."""
    rounds: dict[int, list[int]] = {}
    for bucket in buckets:
        rounds.setdefault(bucket // SUBSCRIBER_BUCKETS_PER_ROUND, []).append(bucket)
    return rounds


def _packed_bytes(packed: Mapping[str, bytes]) -> int:
    """About what a bucket's fields take in Redis (its marker and the hash itself left out)."""
    return sum(len(subscriber) + len(blob) for subscriber, blob in packed.items())


def _fingerprint(overlay: Mapping[bytes, bytes]) -> int:
    """A bucket's raw admin overlay hash, as a number that changes when it does."""
    return hash(frozenset(overlay.items()))


def _differs(packed: Mapping[str, bytes], old_raw: Mapping[bytes, bytes]) -> bool:
    """Whether a bucket's new packed content differs from the live bucket's hash (one
    without its marker always does: Redis lost it)."""
    if _MARKER not in old_raw or len(old_raw) != len(packed) + 1:
        return True
    return any(old_raw.get(subscriber.encode()) != blob for subscriber, blob in packed.items())


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
        self, staged: Iterable[str], kept: Mapping[str, Mapping[str, bool]]
    ) -> dict[str, bytes]:
        """A bucket's staged ``subscriber code`` rows with its admin overlay ``kept``
        applied, as packed values by subscriber, sorted, counted."""
        new: dict[str, list[str]] = {}
        for line in staged:
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
