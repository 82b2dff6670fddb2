"""Each worker's local copy of the lists, kept in step with Redis.

Answering from memory is what keeps the request path free of Redis round trips. The
copy stays honest this way:

- every ``cache.refresh_ms`` one pipelined poll reads ``(gen, version)`` of every list;
  a list whose pair moved is reloaded in the background (deltas only, unless ``gen``
  moved too), so a change reaches every worker within about one refresh interval;
- each successful poll confirms the copy; when no poll has succeeded for
  ``cache.max_stale_ms`` (Redis down, slow or unreachable), :meth:`ListCache.usable`
  turns false and answers follow ``handler.on_error`` until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from core.config import CacheSettings, ListKind
from core.store import ListStore
from service.lists import ListObject, NameList, NumberList, PrefixList
from service.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)


class ListCache:
    """Local, read-only copies of the configured lists."""

    def __init__(
        self,
        store: ListStore,
        kinds: Mapping[str, ListKind],
        settings: CacheSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.kinds = dict(kinds)
        self.refresh_s = settings.refresh_ms / 1000
        self.max_stale_s = settings.max_stale_ms / 1000
        self.clock = clock
        self.lists: dict[str, ListObject] = {}
        #: (gen, version) of each loaded list.
        self.loaded: dict[str, tuple[int, int]] = {}
        self.confirmed_at = float("-inf")
        self.last_error: str | None = None
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._closing = asyncio.Event()
        self._warn = RateLimitedLog(logger, interval_s=10.0)
        #: Called after each successful poll with the time it took (seconds).
        self.on_poll: Callable[[float], None] | None = None
        #: Called after a list is (re)loaded: name, new copy, last full sync (epoch s).
        self.on_load: Callable[[str, ListObject, float], None] | None = None

    def usable(self) -> bool:
        """Whether the copy was confirmed against Redis recently enough to decide on."""
        return self.clock() - self.confirmed_at <= self.max_stale_s

    def missing(self, names: set[str] | frozenset[str]) -> list[str]:
        """Names among ``names`` not loaded yet."""
        return sorted(n for n in names if n not in self.lists)

    async def poll_once(self) -> None:
        """One poll; start a reload of each list that changed. Raises on Redis errors."""
        started = time.perf_counter()
        versions = await self.store.poll(self.kinds)
        self.confirmed_at = self.clock()
        self.last_error = None
        if self.on_poll is not None:
            self.on_poll(time.perf_counter() - started)
        for name, seen in versions.items():
            if self.loaded.get(name) != seen and name not in self._loads:
                task = asyncio.create_task(self._load(name), name=f"load-list-{name}")
                self._loads[name] = task
                task.add_done_callback(self._forget_load)

    def _forget_load(self, task: asyncio.Task[None]) -> None:
        for name, running in list(self._loads.items()):
            if running is task:
                del self._loads[name]

    async def load_all(self) -> None:
        """Poll and wait for every reload to finish (start-up and tests)."""
        await self.poll_once()
        if self._loads:
            await asyncio.gather(*self._loads.values(), return_exceptions=True)

    async def _load(self, name: str) -> None:
        kind = self.kinds[name]
        try:
            deltas = await self.store.deltas(name)
            current = self.lists.get(name)
            loaded_gen = self.loaded.get(name, (None, None))[0]
            fresh: ListObject
            if kind == "numbers":
                if isinstance(current, NumberList) and loaded_gen == deltas.gen:
                    fresh = current.with_deltas(deltas.adds, deltas.dels)
                else:
                    buckets = await self.store.number_base(name, deltas.gen)
                    # Indexing 10 M numbers takes a moment: off the event loop (numpy
                    # releases the GIL), so answers keep flowing meanwhile.
                    fresh = await asyncio.to_thread(NumberList, buckets, deltas.adds, deltas.dels)
            else:
                base = await self.store.set_base(name, deltas.gen)
                entries = (base - deltas.dels) | deltas.adds
                fresh = PrefixList(entries) if kind == "prefixes" else NameList(entries)
        except Exception as exc:  # the next poll retries; the old copy stays in use
            self._warn.warning("list %r: reload failed (%s); keeping the copy in use", name, exc)
            return
        self.lists[name] = fresh
        self.loaded[name] = (deltas.gen, deltas.version)
        if self.on_load is not None:
            self.on_load(name, fresh, deltas.synced_at)
        logger.debug("list %r: loaded gen %d version %d", name, deltas.gen, deltas.version)

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
                self._warn.warning("Redis poll failed: %s", self.last_error)
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
