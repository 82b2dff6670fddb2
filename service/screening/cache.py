"""Each worker's local copy of the lists, kept in step with Redis.

Every ``cache.refresh_ms`` one pipelined poll reads each list's ``gen``, ``version`` and
trust stamps; a moved list is reloaded off the event loop (deltas only unless ``gen``
moved). Invariants: a list whose ``meta`` no poll read for ``cache.max_stale_ms`` is
stale (:meth:`ListCache.stale_among`; calls needing it follow ``on_error``, the others
do not); a list Redis lost (``meta`` gone, ``version`` or ``gen`` back, stamp vanished)
is dropped and never answered from until a sync or ``loader accept`` moves its stamp;
a list with a ``source`` is trusted only once synced. A ``subscribers`` list's copy is
only its live ``gen``, replaced when that or its admin-write count moves. Numbers bases
are shared between workers when given :class:`service.screening.shared_lists.SharedBases`.
The trust rules: docs/failure.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from core import bucket_gens
from core.config import CacheSettings, ListKind
from core.store import Deltas, ListState, ListStore, data_lost
from service.ratelimit import RateLimitedLog
from service.screening.lists import ListObject, NameList, NumberList, PrefixList, SubscriberList
from service.screening.shared_lists import SharedBases, SharingFailed, release_free_memory

logger = logging.getLogger(__name__)

#: ``on_error`` reasons for lists that may not be answered from (service/metrics.py).
LIST_LOST = "list_lost"
LIST_NOT_LOADED = "list_not_loaded"


@dataclass(frozen=True, slots=True)
class Distrust:
    """Why calls may not be answered from a list right now."""

    #: The ``on_error`` reason: :data:`LIST_LOST` or :data:`LIST_NOT_LOADED`.
    reason: str
    #: For ``/readyz`` and the logs, naming the list.
    detail: str
    #: For a lost list: the stamp Redis showed when the loss was noticed.
    stamp: str = ""


def _set_list(
    kind: ListKind, base: frozenset[str], adds: frozenset[str], dels: frozenset[str]
) -> ListObject:
    """A prefixes or names copy; run in a thread (sets, sorting, RE2 compilation)."""
    # Each set operation copies the whole list while holding the GIL: skip the no-ops.
    entries = base - dels if dels else base
    entries = entries | adds if adds else entries
    return PrefixList(entries) if kind == "prefixes" else NameList(entries)


def _private_numbers(held: list[list[array[int]]], deltas: Deltas) -> NumberList:
    """A numbers copy of this process's own; run in a thread. Empties ``held``: a finished
    ``to_thread`` call may keep its arguments until the next garbage collection, and
    the buckets are as large as the list (see service/screening/shared_lists.py)."""
    return NumberList(held.pop(), deltas.adds, deltas.dels)


class ListCache:
    """Local, read-only copies of the configured lists."""

    def __init__(
        self,
        store: ListStore,
        kinds: Mapping[str, ListKind],
        settings: CacheSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        sourced: Iterable[str] = (),
        shared: SharedBases | None = None,
    ) -> None:
        self.store = store
        #: Where numbers bases are shared with the host's other workers (None: private).
        self.shared = shared
        self.kinds = dict(kinds)
        #: Subscribers lists: their admin-write count is polled too (a new count gives
        #: a new SubscriberList, dropping the entries cached under the old one).
        self._counted = frozenset(n for n, kind in self.kinds.items() if kind == "subscribers")
        self.refresh_s = settings.refresh_ms / 1000
        self.max_stale_s = settings.max_stale_ms / 1000
        self.clock = clock
        #: Lists with a configured ``source``: trusted only once synced.
        self.sourced = frozenset(sourced)
        #: The copies calls are answered from: trusted ones only.
        self.lists: dict[str, ListObject] = {}
        #: The state each copy in :attr:`lists` was loaded at.
        self.loaded: dict[str, ListState] = {}
        #: Lists that may not be answered from, and why (see the module docstring).
        self.distrusted: dict[str, Distrust] = {}
        #: When each list's ``meta`` was last read (clock seconds).
        self.confirmed: dict[str, float] = {}
        #: Why the last poll could not read a list (only lists it failed on).
        self.errors: dict[str, str] = {}
        self.confirmed_at = float("-inf")
        self.last_error: str | None = None
        self._loads: dict[str, asyncio.Task[None]] = {}
        #: The last base read of each prefixes/names list, by :attr:`ListState.base`: a
        #: base never changes once live, so a delta-only change need not read it again.
        self._bases: dict[str, tuple[tuple[int, str], frozenset[str]]] = {}
        self._closing = asyncio.Event()
        self._warn = RateLimitedLog(
            logger, interval_s=10.0, recovered="Redis poll (%s) answers again after %d failures"
        )
        #: Called after each successful poll with the time it took (seconds).
        self.on_poll: Callable[[float], None] | None = None
        #: Called after a list is (re)loaded: name, new copy, last full sync (epoch s).
        self.on_load: Callable[[str, ListObject, float], None] | None = None
        #: ``cache.share_lists``: with :attr:`shared` None too (the folder could not be
        #: made), each new numbers base is a private copy that :attr:`on_private` counts.
        self.share_wanted = settings.share_lists
        #: Called with the list's name when a numbers base is indexed privately although
        #: sharing was wanted (memory per worker grows by the list's size).
        self.on_private: Callable[[str], None] | None = None

    def usable(self) -> bool:
        """Whether every list was confirmed against Redis recently enough to decide on."""
        return self.stale_among(self.kinds) is None

    def stale_among(self, names: Iterable[str]) -> str | None:
        """One of ``names`` not confirmed within ``cache.max_stale_ms``, or None."""
        oldest = self.clock() - self.max_stale_s
        confirmed = self.confirmed
        for name in names:
            if confirmed.get(name, -1e300) < oldest:
                return name
        return None

    def stale(self) -> list[str]:
        """Every list not confirmed within ``cache.max_stale_ms``, by name."""
        oldest = self.clock() - self.max_stale_s
        return sorted(n for n in self.kinds if self.confirmed.get(n, -1e300) < oldest)

    def staleness(self, name: str) -> str:
        """Why ``name`` is stale, for logs and ``/readyz``."""
        error = self.errors.get(name) or self.last_error
        if name not in self.confirmed:
            return f"list {name!r} not confirmed yet" + (f": {error}" if error else "")
        return f"list {name!r} not confirmed for over {self.max_stale_s:g}s: {error or 'no poll'}"

    def missing(self, names: set[str] | frozenset[str]) -> list[str]:
        """Names among ``names`` not loaded yet (distrusted ones included)."""
        return sorted(n for n in names if n not in self.lists)

    def distrust_of(self, names: Iterable[str]) -> Distrust | None:
        """Why one of ``names`` may not be answered from (a lost list first), or None."""
        found = [d for n in names if (d := self.distrusted.get(n)) is not None]
        lost = [d for d in found if d.reason == LIST_LOST]
        return (lost or found)[0] if found else None

    async def poll_once(self) -> None:
        """One poll; judge each list, start a reload of each that changed.

        Raises on Redis errors.
        """
        started = time.perf_counter()
        found = await self.store.states_each(self.kinds, self._counted)
        failed = {name: e for name, e in found.items() if isinstance(e, Exception)}
        if failed and len(failed) == len(found):
            raise next(iter(failed.values()))
        polled_at = self.clock()
        self.confirmed_at = polled_at
        self.last_error = None
        self.errors = {name: f"{type(e).__name__}: {e}" for name, e in failed.items()}
        if failed:
            self._warn.warning(
                "Redis poll failed for lists %s (%s); the others are confirmed",
                ", ".join(sorted(failed)), next(iter(self.errors.values())), cause="some lists",
            )  # fmt: skip
        self._warn.settle()
        if self.on_poll is not None:
            self.on_poll(time.perf_counter() - started)
        for name, seen in found.items():
            if isinstance(seen, Exception):
                continue
            self.confirmed[name] = polled_at
            verdict = self._judge(name, seen)
            if verdict is not None:
                self._distrust(name, verdict)
                continue
            copy = self.loaded.get(name)
            # The stamp too: a list flushed and synced again between two polls can come
            # back at the very gen and version of the copy in use.
            now = (seen.gen, seen.version, seen.stamp, seen.changes)
            changed = copy is None or (copy.gen, copy.version, copy.stamp, copy.changes) != now
            if changed and name not in self._loads:
                task = asyncio.create_task(self._load(name), name=f"load-list-{name}")
                self._loads[name] = task
                task.add_done_callback(self._forget_load)

    def _judge(self, name: str, seen: ListState) -> Distrust | None:
        """Why the list, as Redis shows it now, may not be answered from; None if it may."""
        held = self.distrusted.get(name)
        if held is not None and held.reason == LIST_LOST:
            return None if seen.stamped and seen.stamp != held.stamp else held
        copy = self.loaded.get(name)
        if copy is not None and (how := data_lost(copy, seen)) is not None:
            return Distrust(
                LIST_LOST,
                f"list {name!r} lost from Redis: {how}; answering by on_error until a full "
                f"sync, or `python -m loader accept --list {name}`",
                seen.stamp,
            )
        if name in self.sourced and not seen.stamped:
            return Distrust(LIST_NOT_LOADED, f"list {name!r} was never synced from its source")
        return None

    def _distrust(self, name: str, verdict: Distrust) -> None:
        """Stop answering from ``name``; drop its copy, its kept base and any reload."""
        held = self.distrusted.get(name)
        self.distrusted[name] = verdict
        dropped = self.lists.pop(name, None) is not None
        self.loaded.pop(name, None)
        # Generation numbers start over once the meta hash is gone: a kept base (or a
        # reload begun before the loss) might be taken for the new list's.
        self._bases.pop(name, None)
        running = self._loads.get(name)
        if running is not None and running is not asyncio.current_task():
            running.cancel()
        if verdict != held:
            if verdict.reason == LIST_LOST or dropped:
                logger.error("%s", verdict.detail)
            else:
                logger.warning("%s; calls that need it are answered by on_error", verdict.detail)

    def _forget_load(self, task: asyncio.Task[None]) -> None:
        for name, running in list(self._loads.items()):
            if running is task:
                del self._loads[name]

    async def load_all(self) -> None:
        """Poll and wait for every reload to finish (start-up and tests)."""
        await self.poll_once()
        if self._loads:
            await asyncio.gather(*self._loads.values(), return_exceptions=True)

    async def _set_base(self, name: str, state: ListState) -> frozenset[str]:
        kept = self._bases.get(name)
        if kept is not None and kept[0] == state.base:
            return kept[1]
        base = await self.store.set_base(name, state.gen)
        self._bases[name] = (state.base, base)
        return base

    async def _load(self, name: str) -> None:
        kind = self.kinds[name]
        try:
            if kind == "subscribers":
                state, size = await self.store.subscriber_state(name)
                deltas = Deltas(state.gen, state.version, float(state.synced_at or 0),
                                frozenset(), frozenset(), state)  # fmt: skip
            else:
                deltas = await self.store.deltas(name)
                state = deltas.state
            # Judged again on what was read: Redis may have lost the list since the poll.
            verdict = self._judge(name, state)
            if verdict is not None:
                self._distrust(name, verdict)
                return
            current = self.lists.get(name)
            copy = self.loaded.get(name)
            same_base = copy is not None and copy.base == state.base
            started = time.perf_counter()
            how = ""  # set when a new numbers base is put in use
            fresh: ListObject
            # Every copy is built in a thread: indexing 10 M numbers, or sets, sorts and
            # RE2 compilation over tens of thousands of names, would stall the answers
            # (numpy and RE2 release the GIL; Python code shares it in 5 ms slices).
            if kind == "subscribers":
                # Never loaded into memory: calls read their subscriber from Redis at
                # the key the live gen's bucket map gives (core/bucket_gens.py,
                # service/screening/screen.py), or from the entries cached under this
                # very object (subscriber_cache.py).
                if isinstance(current, SubscriberList) and current.gen == state.gen:
                    gens = current.gens  # a generation's map never changes
                else:
                    gens = await bucket_gens.read(self.store.redis, name, state.gen)
                fresh = SubscriberList(state.gen, size, gens)
            elif kind == "numbers":
                if isinstance(current, NumberList) and same_base:
                    fresh = await asyncio.to_thread(current.with_deltas, deltas.adds, deltas.dels)
                else:
                    fresh, how = await self._number_list(name, deltas)
            else:
                base = await self._set_base(name, state)
                fresh = await asyncio.to_thread(_set_list, kind, base, deltas.adds, deltas.dels)
        except Exception as exc:  # the next poll retries; the old copy stays in use
            self._warn.warning("list %r: reload failed (%s); keeping the copy in use", name, exc)
            return
        # No await since the judgement above: nothing can have been noticed in between
        # (a loss noticed during the awaits cancelled this task).
        self.lists[name] = fresh
        self.loaded[name] = state
        if self.distrusted.pop(name, None) is not None:
            logger.warning(
                "list %r: trusted again at version %d (synced_at %s, accepted_at %s)",
                name,
                state.version,
                state.synced_at or "-",
                state.accepted_at or "-",
            )
        if self.on_load is not None:
            self.on_load(name, fresh, deltas.synced_at)
        if how:
            logger.info(
                "list %r: gen %d in use, %d numbers (%s, %.3f s)",
                name, state.gen, fresh.size, how, time.perf_counter() - started,
            )  # fmt: skip
            # ``current`` holds the last reference to the old base: let it go in a thread
            # (unmapping a shared file takes ms) and hand the memory freed since the
            # indexing began back to the system (see service/screening/shared_lists.py).
            dropped: list[object] = [current]
            del current, fresh
            await asyncio.to_thread(release_free_memory, dropped)
        else:
            logger.debug("list %r: loaded gen %d version %d", name, state.gen, state.version)

    async def _number_list(self, name: str, deltas: Deltas) -> tuple[NumberList, str]:
        """A numbers list on a new base, and how it was obtained (for the log).

        From the shared file when there is a folder to share through (and a base to
        share: ``gen`` 0 has none), else indexed here from Redis.
        """
        state = deltas.state
        if self.shared is not None and state.gen:
            try:
                got = await self.shared.numbers(
                    name, state, lambda: self.store.number_base(name, state.gen)
                )
            except SharingFailed as exc:
                self._warn.warning(
                    "list %r: cannot share gen %d (%s); this worker builds a private copy",
                    name, state.gen, exc,
                )  # fmt: skip
                if self.on_private is not None:
                    self.on_private(name)
            else:
                fresh = await asyncio.to_thread(
                    NumberList.from_base, got.mapped.base, deltas.adds, deltas.dels
                )
                waited = f", waited {got.waited_s:.3f} s for the lock" if got.waited_s else ""
                return fresh, f"shared file {got.how}{waited}: {got.mapped.path}"
        elif self.share_wanted and state.gen and self.on_private is not None:
            self.on_private(name)
        held = [await self.store.number_base(name, state.gen)]
        fresh = await asyncio.to_thread(_private_numbers, held, deltas)
        return fresh, "private copy"

    async def run(self) -> None:
        """Poll until :meth:`close`; errors are logged at a limited rate and retried.

        Stopping does not rely on cancellation alone: a cancel that lands inside the
        Redis client can come out as a connection error, which the loop would log and
        carry on from, so the loop also ends on the ``_closing`` event.
        """
        while not self._closing.is_set():
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._warn.warning("Redis poll failed: %s", self.last_error, cause="all lists")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.refresh_s)

    async def close(self, refresher: asyncio.Task[None] | None = None) -> None:
        """Stop polling (ending ``refresher``, the task running :meth:`run`) and reloads."""
        self._closing.set()
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        for task in list(self._loads.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
