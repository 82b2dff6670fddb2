"""``python -m loader run``: sync each list on its interval, serve ``/metrics``.

Each list with ``source`` and ``interval_s`` has its own loop, never two syncs of one
list at once, at most ``loader.max_concurrent_syncs`` together. A failed sync keeps the
old list and does not affect the others. Every minute, lists over
``loader.compact_over`` are compacted. SIGTERM cancels the loops; a sync in flight
drops its half-built list.
Every ``loader.health_check_s`` lists Redis lost are re-synced at once (:mod:`loader.heal`);
with ``loader.snapshot_dir`` set, lists without a source are written there as CSV every
``loader.snapshot_interval_s``, to heal them from.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from core.config import Config
from core.redact import redact_text
from core.store import ListStore, RedisClient
from loader.delta import compact_if_needed
from loader.heal import Healer, Snapshots
from loader.metrics import LoaderMetrics
from loader.sync import SyncError, SyncOptions, SyncRefused, sync_list

logger = logging.getLogger(__name__)
MAINTENANCE_EVERY_S = 60.0


def scheduled_lists(config: Config) -> dict[str, int]:
    """Lists ``run`` syncs, with their intervals."""
    return {
        name: spec.interval_s
        for name, spec in config.lists.items()
        if spec.source is not None and spec.interval_s is not None
    }


class Scheduler:
    """Runs the sync loops; :meth:`sync_once` is one sync with its metrics and logs."""

    def __init__(
        self,
        redis: RedisClient,
        config: Config,
        metrics: LoaderMetrics,
        *,
        session: aiohttp.ClientSession | None = None,
        progress: str = "log",
    ) -> None:
        self.redis = redis
        self.config = config
        self.metrics = metrics
        self.session = session
        self.progress = progress
        self.slots = asyncio.Semaphore(config.loader.max_concurrent_syncs)
        #: One sync of a list at a time in this process: a heal waits for a scheduled
        #: sync of the same list instead of failing on its lock.
        self.busy: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def sync_once(
        self, name: str, source: str | None = None, *, rebuild: bool = False
    ) -> str:
        """Sync one list (from ``source`` instead of its own, if given; ``rebuild``: even
        if its source looks unchanged); return the outcome. Never raises except on
        cancellation."""
        options = SyncOptions(progress=self.progress, source=source, rebuild=rebuild)
        async with self.busy[name]:
            started = time.monotonic()
            return await self._sync_once(name, options, started)

    async def _sync_once(self, name: str, options: SyncOptions, started: float) -> str:
        try:
            report = await sync_list(self.redis, self.config, name, options, session=self.session)
        except SyncRefused as exc:
            logger.error("%s", exc)
            self.metrics.record(name, "refused", time.monotonic() - started)
            return "refused"
        except SyncError as exc:
            logger.error("sync failed, the old list is kept: %s", exc)
            self.metrics.record(name, "failed", time.monotonic() - started)
            return "failed"
        except Exception as exc:  # Redis down and the like: next interval tries again
            shown = redact_text(repr(exc))
            logger.error("%s: sync failed, the old list is kept: %s", name, shown)
            self.metrics.record(name, "failed", time.monotonic() - started)
            return "failed"
        for bad in report.bad_rows:
            logger.warning("skipped bad row %s", bad)
        entries: int | None = None
        if report.result is not None:
            entries = report.result.size
        else:  # not modified: the size as of the last sync
            meta = await ListStore(self.redis).meta(name)
            entries = meta.size if meta else None
        self.metrics.record(
            name,
            report.outcome,
            report.duration_s,
            rows_read=report.rows_read,
            rows_rejected=report.rows_rejected,
            entries=entries,
            finished_at=time.time(),
        )
        logger.info("synced %s", report.summary())
        return report.outcome

    async def heal_sync(self, name: str, source: str | None) -> str:
        """The healer's sync: one slot of the scheduler's, and always a build."""
        async with self.slots:
            # What the healer repairs (a lost bucket or base) is not in the source's
            # digest: always build.
            return await self.sync_once(name, source, rebuild=True)

    # Both loops also end on ``stop``: a cancel that lands inside the Redis client can
    # come out as a connection error, which sync_once logs and carries on from.
    async def _loop(self, name: str, interval_s: float, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
            next_at = time.monotonic() + interval_s
            async with self.slots:
                await self.sync_once(name)

    async def _maintenance(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(MAINTENANCE_EVERY_S)
            for name in self.config.lists:
                try:
                    await compact_if_needed(self.redis, self.config, name)
                except Exception as exc:
                    logger.warning("%s: compaction failed: %s", name, redact_text(repr(exc)))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then cancel everything in flight."""
        intervals = scheduled_lists(self.config)
        if not intervals:
            logger.warning("no list has both a source and an interval_s: nothing to schedule")
        tasks = [
            asyncio.create_task(self._loop(name, interval, stop), name=f"sync-{name}")
            for name, interval in intervals.items()
        ]
        tasks.append(asyncio.create_task(self._maintenance(stop), name="compaction"))
        healer = Healer(self.redis, self.config, self.metrics, self.heal_sync)
        tasks.append(asyncio.create_task(healer.run(stop), name="healer"))
        if self.config.loader.snapshot_dir is not None:
            snapshots = Snapshots(self.redis, self.config, healer)
            tasks.append(asyncio.create_task(snapshots.run(stop), name="snapshots"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """Serve ``/metrics`` (and ``/healthz``) from ``registry``; clean up the runner after."""
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def bound_port(runner: web.AppRunner) -> int:
    """The port the metrics server listens on (useful with port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("metrics server is not listening")
