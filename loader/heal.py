"""Self-healing for ``loader run``: notice a list Redis lost and load it again at once.

Every ``loader.health_check_s`` the healer reads every list's state and compares it with
the last healthy one; a list is lost by the service's rules (service/screening/cache.py),
or when the base its ``meta`` names is gone or a subscribers bucket lost its marker. A
lost list is synced from its ``source`` at once, or restored from its latest snapshot
(``loader.snapshot_dir``, :class:`Snapshots`), both through the guarded sync; a heal
that fails sets ``callscreen_loader_list_unhealed`` (alert ``CallscreenListNotHealed``)
and is retried every :data:`RETRY_AFTER_S`. Each check also drops expired overlay
entries and re-syncs their lists. Details: docs/loader.md, "Self-healing".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from core import bucket_gens, keys, overlay, subscriber_overlay
from core.config import Config, ListKind
from core.redact import redact_text
from core.store import ListState, ListStore, RedisClient, data_lost
from loader.export import export_list, snapshot_path
from loader.metrics import LoaderMetrics

logger = logging.getLogger(__name__)
#: A failed heal is tried again after this long, not at every check.
RETRY_AFTER_S = 10.0
#: Subscriber buckets checked per pipelined round.
MARKERS_PER_ROUND = 2048

#: Runs one sync of a list (``source``: a file to read instead of its own, or None);
#: returns the outcome (``success``, ``unchanged``, ``refused``, ``failed``, ...).
SyncFn = Callable[[str, str | None], Awaitable[str]]


async def missing_data(
    redis: RedisClient, kinds: Mapping[str, ListKind], states: Mapping[str, ListState]
) -> dict[str, str]:
    """Lists whose ``meta`` names data Redis no longer has (a base, bucket markers), and
    how: what a sync must rebuild even when its source did not change."""
    found: dict[str, str] = {}
    bases = [
        name for name, state in states.items() if state.gen > 0 and kinds[name] != "subscribers"
    ]
    if bases:
        async with redis.pipeline(transaction=False) as pipe:
            for name in bases:
                pipe.exists(keys.base(name, states[name].gen))
            replies = await pipe.execute()
        for name, exists in zip(bases, replies, strict=True):
            if not exists:
                found[name] = f"its base generation {states[name].gen} is gone"
    for name, state in states.items():
        if state.gen > 0 and kinds[name] == "subscribers":
            lost = await _lost_buckets(redis, name, state.gen)
            if lost:
                found[name] = f"{lost} of its {keys.SUBSCRIBER_BUCKETS} buckets lost their marker"
    return found


async def _lost_buckets(redis: RedisClient, name: str, gen: int) -> int:
    lost = 0
    gens = await bucket_gens.read(redis, name, gen)
    for first in range(0, keys.SUBSCRIBER_BUCKETS, MARKERS_PER_ROUND):
        last = min(first + MARKERS_PER_ROUND, keys.SUBSCRIBER_BUCKETS)
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in range(first, last):
                pipe.hexists(gens.key(name, bucket), keys.SUBSCRIBER_MARKER)
            replies = await pipe.execute()
        lost += sum(1 for exists in replies if not exists)  # False or 0, by the client
    return lost


@dataclass(slots=True)
class _Health:
    healthy: ListState | None = None
    retry_at: float = 0.0


class Healer:
    """The health checks and heals of ``loader run`` (see the module doc)."""

    def __init__(
        self, redis: RedisClient, config: Config, metrics: LoaderMetrics, sync: SyncFn
    ) -> None:
        self.redis = redis
        self.config = config
        self.store = ListStore(redis)
        self.metrics = metrics
        self.sync = sync
        self.health = {name: _Health() for name in config.lists}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except Exception as exc:  # Redis down: nothing to heal with either
                logger.warning("list health check failed: %s", redact_text(repr(exc)))
            await asyncio.sleep(self.config.loader.health_check_s)

    async def check(self) -> list[str]:
        """One round: find lost lists, heal them; return the names of those healed."""
        names = list(self.config.lists)
        await self._expire_overlays()
        states = await self.store.states(names)
        kinds = {name: spec.kind for name, spec in self.config.lists.items()}
        missing = await missing_data(self.redis, kinds, states)
        healed = []
        for name in names:
            state, health = states[name], self.health[name]
            why = missing.get(name)
            if why is None and health.healthy is not None:
                why = data_lost(health.healthy, state)
            if why is None and state.version == 0 and self._source_of(name) is not None:
                why = "it is not in Redis"
            if why is None:
                if state.version > 0:
                    health.healthy = state
                self.metrics.unhealed.labels(name).set(0)
                continue
            if time.monotonic() < health.retry_at:
                continue
            if await self._heal(name, why):
                healed.append(name)
        return healed

    async def _expire_overlays(self) -> None:
        """Drop expired admin overlay entries and re-sync their lists (core/overlay.py,
        core/subscriber_overlay.py)."""
        for name, spec in self.config.lists.items():
            if spec.source is None:
                continue
            kept = subscriber_overlay if spec.kind == "subscribers" else overlay
            dropped = await kept.drop_expired(self.redis, name)
            if dropped:
                logger.info("%s: %d admin overlay entries expired; re-syncing", name, dropped)
                await self.sync(name, None)

    def _source_of(self, name: str) -> str | None:
        """What a lost list is healed from: "" for its source, a snapshot path, or None."""
        if self.config.lists[name].source is not None:
            return ""
        path = snapshot_path(self.config, name)
        return str(path) if path is not None and path.exists() else None

    async def _heal(self, name: str, why: str) -> bool:
        health = self.health[name]
        source = self._source_of(name)
        if source is None:
            logger.error(
                "%s: lost from Redis (%s) and nothing to heal it from: no source and no "
                "snapshot; restore a backup (python -m loader sync --list %s --from FILE)",
                name,
                why,
                name,
            )
            self._failed(name)
            return False
        where = source or "its source"
        logger.warning("%s: lost from Redis (%s); re-syncing from %s now", name, why, where)
        outcome = await self.sync(name, source or None)
        if outcome not in ("success", "unchanged"):
            logger.error(
                "%s: not healed (sync %s); trying again in %.0f s", name, outcome, RETRY_AFTER_S
            )
            self._failed(name)
            return False
        health.healthy = (await self.store.states([name]))[name]
        health.retry_at = 0.0
        self.metrics.heals.labels(name, "healed").inc()
        self.metrics.unhealed.labels(name).set(0)
        logger.warning("%s: healed from %s", name, where)
        return True

    def _failed(self, name: str) -> None:
        self.health[name].retry_at = time.monotonic() + RETRY_AFTER_S
        self.metrics.heals.labels(name, "failed").inc()
        self.metrics.unhealed.labels(name).set(1)


class Snapshots:
    """Writes the export of every list without a source to ``loader.snapshot_dir``.

    Only healthy lists are written (never one the healer finds lost: that would replace
    the last good snapshot with an empty list), and only when their ``version`` moved
    since the last snapshot.
    """

    def __init__(self, redis: RedisClient, config: Config, healer: Healer) -> None:
        self.redis = redis
        self.config = config
        self.healer = healer
        self.written: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.config.loader.snapshot_interval_s)
            await self.write_all()

    async def write_all(self) -> None:
        for name, spec in self.config.lists.items():
            path = snapshot_path(self.config, name)
            healthy = self.healer.health[name].healthy
            if spec.source is not None or path is None or healthy is None:
                continue
            state = (await self.healer.store.states([name]))[name]
            if data_lost(healthy, state) is not None or self.written.get(name) == state.version:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                count = await export_list(self.redis, self.config, name, path)
            except Exception as exc:
                logger.warning("%s: snapshot failed: %s", name, redact_text(repr(exc)))
                continue
            self.written[name] = state.version
            logger.info("%s: snapshot of %d entries written to %s", name, count, path)
