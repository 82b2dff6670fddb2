"""The loader's Prometheus metrics, on its own registry (served by ``loader run``).

Every series is created up front for every list the loader syncs, so dashboards and
alerts see zeros rather than gaps before the first sync.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("success", "unchanged", "failed", "refused")
#: From a small file on a fast link to a 10 M-number list over a slow one.
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class LoaderMetrics:
    """Sync duration, outcomes, rows, last success and size per list."""

    def __init__(
        self, registry: CollectorRegistry, lists: Iterable[str], watched: Iterable[str] = ()
    ) -> None:
        """Sync series for ``lists`` (the scheduled ones), heal series for ``watched``."""
        self.registry = registry
        self.duration = Histogram(
            "callscreen_loader_sync_duration_seconds",
            "Time one sync of a list took, whatever its outcome.",
            ["list"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.syncs = Counter(
            "callscreen_loader_syncs_total",
            "Syncs by list and outcome: success (swapped in), unchanged (304 or same "
            "entries), failed (source or Redis error), refused (a guard kept the old list).",
            ["list", "outcome"],
            registry=registry,
        )
        self.rows_read = Counter(
            "callscreen_loader_rows_read_total",
            "Source rows read by syncs (blank and comment lines excluded).",
            ["list"],
            registry=registry,
        )
        self.rows_rejected = Counter(
            "callscreen_loader_rows_rejected_total",
            "Source rows skipped because their entry did not normalise.",
            ["list"],
            registry=registry,
        )
        self.last_success = Gauge(
            "callscreen_loader_last_success_timestamp_seconds",
            "Unix time of the last sync that ended success or unchanged (0: none yet).",
            ["list"],
            registry=registry,
        )
        self.entries = Gauge(
            "callscreen_loader_list_entries",
            "Entries on the list after its last successful sync.",
            ["list"],
            registry=registry,
        )
        self.heals = Counter(
            "callscreen_loader_heals_total",
            "Heals of a list Redis lost, by outcome: healed (synced again from its source "
            "or snapshot), failed (the sync failed or was refused, or nothing to heal from).",
            ["list", "outcome"],
            registry=registry,
        )
        self.unhealed = Gauge(
            "callscreen_loader_list_unhealed",
            "1 while a list Redis lost could not be healed (retried every 10 s), else 0.",
            ["list"],
            registry=registry,
        )
        for name in watched:
            for outcome in ("healed", "failed"):
                self.heals.labels(name, outcome)
            self.unhealed.labels(name).set(0)
        for name in lists:
            self.duration.labels(name)
            for outcome in OUTCOMES:
                self.syncs.labels(name, outcome)
            self.rows_read.labels(name)
            self.rows_rejected.labels(name)
            self.last_success.labels(name)
            self.entries.labels(name)

    def record(
        self,
        name: str,
        outcome: str,
        duration_s: float,
        *,
        rows_read: int = 0,
        rows_rejected: int = 0,
        entries: int | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Count one sync; ``entries`` and ``finished_at`` only for success/unchanged."""
        self.duration.labels(name).observe(duration_s)
        self.syncs.labels(name, outcome).inc()
        self.rows_read.labels(name).inc(rows_read)
        self.rows_rejected.labels(name).inc(rows_rejected)
        if finished_at is not None:
            self.last_success.labels(name).set(finished_at)
        if entries is not None:
            self.entries.labels(name).set(entries)
