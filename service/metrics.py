"""The service's Prometheus metrics, on a registry the caller passes in.

Label values come from the config only (trunk groups, rule names, list names) and are
all created up front, so series exist from the first scrape and a caller number can
never become a label. The request path uses pre-resolved children: one dict look-up and
one ``inc``/``observe`` per metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.config import Config
from service.policy import DEFAULT_RULE, ON_ERROR_RULE

#: Sub-millisecond resolution where the answers live, up to the longest trunk timeouts.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0
)  # fmt: skip
ERROR_KINDS = (
    "bad_json",
    "not_object",
    "too_large",
    "unknown_trunk_group",
    "method_not_allowed",
    "not_found",
    "unauthorized",
    "forbidden",
    "internal",
)
FALLBACK_REASONS = ("stale_lists", "list_not_loaded", "redis_error", "deadline", "internal")
ROOT_TRUNK_GROUP = "_root"


class Metrics:
    """Every metric the service exports."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "callscreen_request_duration_seconds",
            "Time to answer one screening request, from body read to answer.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.decisions = Counter(
            "callscreen_decisions_total",
            "Screening decisions by trunk group, decision and rule; dry_run=true counts "
            "dry-run rules that matched (the call went on).",
            ["trunk_group", "decision", "rule", "dry_run"],
            registry=registry,
        )
        self.errors = Counter(
            "callscreen_errors_total",
            "Requests refused or failed, by kind.",
            ["kind"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "callscreen_on_error_total",
            "Answers given by handler.on_error instead of the lists, by reason.",
            ["reason"],
            registry=registry,
        )
        self.redis_seconds = Histogram(
            "callscreen_redis_duration_seconds",
            "Redis round-trip time, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.list_entries = Gauge(
            "callscreen_list_entries",
            "Entries on each list, as loaded by this service.",
            ["list"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.list_synced = Gauge(
            "callscreen_list_last_sync_timestamp_seconds",
            "Unix time of each list's last successful full sync (0: never).",
            ["list"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self._decision_children: dict[tuple[str, str, str, bool], Counter] = {}
        policy_of = {ROOT_TRUNK_GROUP: config.default_policy}
        policy_of.update({name: group.policy for name, group in config.trunk_groups.items()})
        for group, policy_name in policy_of.items():
            policy = config.policies[policy_name]
            rules: list[tuple[str, str]] = [(r.name, r.action) for r in policy.rules]
            outcomes = [
                *rules,
                (DEFAULT_RULE, policy.default),
                (ON_ERROR_RULE, "allow"),
                (ON_ERROR_RULE, "reject"),
            ]
            for rule, action in outcomes:
                for dry in ("false", "true"):
                    child = self.decisions.labels(group, action, rule, dry)
                    self._decision_children[(group, action, rule, dry == "true")] = child
        self._error_children = {kind: self.errors.labels(kind) for kind in ERROR_KINDS}
        self._fallback_children = {r: self.fallbacks.labels(r) for r in FALLBACK_REASONS}
        self.redis_poll = self.redis_seconds.labels("poll")
        self.redis_rate = self.redis_seconds.labels("rate")
        for name in config.lists:
            self.list_entries.labels(name)
            self.list_synced.labels(name)

    def decided(self, trunk_group: str, action: str, rule: str, dry_run: bool = False) -> None:
        self._decision_children[(trunk_group, action, rule, dry_run)].inc()

    def error(self, kind: str) -> None:
        """Count a refused request; ``kind`` is a constant, normally one of :data:`ERROR_KINDS`."""
        child = self._error_children.get(kind)
        if child is None:  # a kind added in code but not above: count it all the same
            child = self._error_children[kind] = self.errors.labels(kind)
        child.inc()

    def fallback(self, reason: str) -> None:
        """Count an ``on_error`` answer; ``reason`` is one of :data:`FALLBACK_REASONS`."""
        self._fallback_children[reason].inc()
