"""The service's Prometheus metrics, on a registry the caller passes in.

Label values come from the config only and are created up front, so series exist from
the first scrape and a caller number never becomes a label. Decisions and request
latency, touched by every call, are plain numbers read at scrape time
(:class:`DecisionCounts`, :class:`LatencyHistogram`): lock-free because only the event
loop's thread counts. Why: docs/design.md, "Where a call's time goes".
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from core.config import Config
from core.version import build_labels
from service.screening.policy import DEFAULT_RULE, ON_ERROR_RULE
from service.screening.subscriber_cache import SubscriberCache

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
    "client_disconnected",
    "read_timeout",
    "overloaded",
    "internal",
)
FALLBACK_REASONS = (
    "stale_lists",
    "list_not_loaded",
    "list_lost",
    "redis_error",
    "deadline",
    "internal",
)
ROOT_TRUNK_GROUP = "_root"
#: STIR/SHAKEN (service/screening/stir/): results as (result, reason, attest).
STIR_RESULTS = (
    *(("valid", "", attest) for attest in ("A", "B", "C", "")),
    *(
        ("invalid", reason, "")
        for reason in (
            "bad_signature",
            "stale",
            "tn_mismatch",
            "untrusted_chain",
            "cert_unavailable",
            "malformed",
            "verstat_failed",
        )
    ),
    ("absent", "", ""),
)
STIR_FETCH_OUTCOMES = ("ok", "refused", "http_error", "timeout", "too_large", "error")
STIR_CACHE_LAYERS = ("result", "local", "redis", "miss")
STIR_FETCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DecisionKey = tuple[str, str, str, bool]


def decision_keys(config: Config) -> list[DecisionKey]:
    """The decision series ``config`` can count.

    Only those: a rule decides with its own action and dry-run setting, the default
    with the policy's, on_error with the handler's.
    """
    keys: list[DecisionKey] = []
    policy_of = {ROOT_TRUNK_GROUP: config.default_policy}
    policy_of.update({name: group.policy for name, group in config.trunk_groups.items()})
    for group, policy_name in policy_of.items():
        policy = config.policies[policy_name]
        keys += [(group, r.action, r.name, r.dry_run) for r in policy.rules]
        keys.append((group, policy.default, DEFAULT_RULE, False))
        keys.append((group, config.handler.on_error, ON_ERROR_RULE, False))
    return keys


def watched_rules(config: Config) -> dict[str, tuple[str, str, int, int]]:
    """Rate rules whose peaks are shown: ``policy:rule`` -> (policy, rule, limit, window)."""
    watched: dict[str, tuple[str, str, int, int]] = {}
    for pname, policy in config.policies.items():
        for r in policy.rules:
            if r.match == "call_rate" and r.limit and r.window_s:
                watched[f"{pname}:{r.name}"] = (pname, r.name, r.limit, r.window_s)
            elif r.match == "sequential_dialing" and r.window_s:
                watched[f"{pname}:{r.name}"] = (pname, r.name, r.run_length, r.window_s)
    return watched


class DecisionCounts(Collector):
    """``callscreen_decisions_total`` by (trunk group, decision, rule, dry run)."""

    def __init__(self, keys: Iterable[DecisionKey]) -> None:
        self.counts: dict[DecisionKey, int] = dict.fromkeys(keys, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "callscreen_decisions",
            "Screening decisions by trunk group, decision and rule; dry_run=true counts "
            "dry-run rules that matched (the call went on).",
            labels=("trunk_group", "decision", "rule", "dry_run"),
        )
        for (group, action, rule, dry_run), count in self.counts.items():
            family.add_metric((group, action, rule, "true" if dry_run else "false"), count)
        yield family


class RatePeaks(Collector):
    """``callscreen_rate_peak`` and ``callscreen_rate_limit`` by (policy, rule).

    The peak is the highest count (``call_rate``) or run (``sequential_dialing``) any
    one key reached in this worker's calls since the rule's current window began (the
    counts are read from Redis, so they include every worker's calls); 0 once a whole
    window passed without a call. Workers' snapshots take the maximum. One series per
    rule whatever the traffic: the keys themselves (numbers) are never labels.
    """

    def __init__(self, rules: dict[str, tuple[str, str, int, int]]) -> None:
        #: rule key -> (policy, rule, limit, window_s)
        self.rules = rules
        #: rule key -> [window index, peak]
        self.peaks: dict[str, list[int]] = {key: [0, 0] for key in rules}

    def seen(self, counts: dict[str, int], now_s: float) -> None:
        for key, count in counts.items():
            peak = self.peaks.get(key)
            if peak is None:
                continue
            index = int(now_s // self.rules[key][3])
            if index != peak[0]:  # a new window: start over from this call's count
                peak[0], peak[1] = index, count
            elif count > peak[1]:
                peak[1] = count

    def collect(self) -> Iterator[Metric]:
        labels = ("policy", "rule")
        peaks = GaugeMetricFamily(
            "callscreen_rate_peak",
            "Highest count (call_rate) or run of numbers (sequential_dialing) one key "
            "reached in the rule's recent windows, as read by this service's calls.",
            labels=labels,
        )
        limits = GaugeMetricFamily(
            "callscreen_rate_limit",
            "The rule's limit (call_rate matches above it) or run_length "
            "(sequential_dialing matches at it).",
            labels=labels,
        )
        now_s = time.time()
        for key, (policy, rule, limit, window_s) in self.rules.items():
            index, peak = self.peaks[key]
            recent = int(now_s // window_s) <= index + 1
            peaks.add_metric((policy, rule), peak if recent else 0)
            limits.add_metric((policy, rule), limit)
        yield peaks
        yield limits


class LatencyHistogram(Collector):
    """A histogram: one bisect and two additions per observation.

    With ``label``, one series per value of ``values`` (fixed at creation), each
    observed through :meth:`labels`; without, observed directly.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets_s: tuple[float, ...],
        label: str | None = None,
        values: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets_s
        #: Observations per bucket (not cumulative); the last one is +Inf.
        self.counts = [0] * (len(buckets_s) + 1)
        self.sum_s = 0.0
        self.label = label
        self._series = {value: LatencyHistogram(name, documentation, buckets_s) for value in values}

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def labels(self, value: str) -> LatencyHistogram:
        """The series of one label value (one of ``values``)."""
        return self._series[value]

    def _buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        return buckets

    def collect(self) -> Iterator[Metric]:
        if self.label is None:
            yield HistogramMetricFamily(
                self.name, self.documentation, buckets=self._buckets(), sum_value=self.sum_s
            )
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in self._series.items():
            family.add_metric([value], series._buckets(), series.sum_s)
        yield family


class RedisHealth(Collector):
    """Partial outages, read when scraped: which lists are stale, which Cluster nodes fail.

    Both are 1 for trouble and 0 otherwise, so the maximum over workers (how gauges add
    up, service/procs/snapshots.py) says "some worker sees it". Nodes are the Cluster's
    slot-serving masters (none for one server or Sentinel), and a failing node until
    its replica took over: bounded by the cluster's size.
    """

    def __init__(self, lists: Iterable[str]) -> None:
        self.lists = sorted(lists)
        #: The stale lists, set once the list cache exists.
        self.stale: Callable[[], Iterable[str]] | None = None
        #: ``{node: failing}``, set once the Redis client exists.
        self.nodes: Callable[[], Mapping[str, bool]] | None = None

    def collect(self) -> Iterator[Metric]:
        stale = GaugeMetricFamily(
            "callscreen_list_stale",
            "1 while a list is not confirmed by Redis within cache.max_stale_ms: calls that "
            "need it are answered by on_error (stale_lists).",
            labels=("list",),
        )
        found = set(self.stale()) if self.stale is not None else set()
        for name in self.lists:
            stale.add_metric((name,), 1.0 if name in found else 0.0)
        yield stale
        failing = GaugeMetricFamily(
            "callscreen_redis_node_failing",
            "1 while a Redis Cluster master fails this service's commands: calls whose keys "
            "it holds are answered by on_error until its replica takes over.",
            labels=("node",),
        )
        if self.nodes is not None:
            for node, bad in sorted(self.nodes().items()):
                failing.add_metric((node,), 1.0 if bad else 0.0)
        yield failing


def _by_result(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family labelled ``result``, one sample per entry of ``counts``."""
    family = CounterMetricFamily(name, documentation, labels=("result",))
    for result, count in counts.items():
        family.add_metric((result,), count)
    return family


class SubscriberCacheCounts(Collector):
    """The subscriber entries cache's look-ups and size, read when scraped: plain
    numbers counted on the event loop (every call that reaches a subscriber rule)."""

    def __init__(self) -> None:
        #: Set once the screener exists.
        self.cache: SubscriberCache | None = None

    def collect(self) -> Iterator[Metric]:
        cache = self.cache
        yield _by_result(
            "callscreen_subscriber_cache_lookups",
            "Subscribers looked up by calls, by result: hit (answered from this worker's "
            "cache, no Redis) or miss (read from Redis).",
            {"hit": cache.hits, "miss": cache.misses} if cache else {"hit": 0, "miss": 0},
        )
        yield _by_result(
            "callscreen_subscriber_cache_renewals",
            "Cached subscribers read again off the calls' path because calls used them in "
            "the last fifth of cache.subscriber_max_age_ms, by result: ok, or failed "
            "(Redis trouble; they age out and calls read them).",
            {"ok": cache.renewed, "failed": cache.renewals_failed}
            if cache
            else {"ok": 0, "failed": 0},
        )
        size = GaugeMetricFamily(
            "callscreen_subscriber_cache_entries",
            "Subscribers whose entries this worker keeps (at most cache.subscriber_entries).",
        )
        size.add_metric((), len(cache) if cache else 0)
        yield size


class Metrics:
    """Every metric the service exports."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = LatencyHistogram(
            "callscreen_request_duration_seconds",
            "Time to answer one screening request, from its arrival to its answer.",
            LATENCY_BUCKETS_S,
        )
        registry.register(self.request_seconds)
        self.errors = Counter(
            "callscreen_errors_total",
            "Requests refused or failed, by kind.",
            ["kind"],
            registry=registry,
        )
        self.late_answers = Counter(
            "callscreen_late_answers_total",
            "Answers sent later than handler.deadline_ms after the request arrived.",
            registry=registry,
        )
        self.fallbacks = Counter(
            "callscreen_on_error_total",
            "Answers given by handler.on_error instead of the lists, by reason.",
            ["reason"],
            registry=registry,
        )
        self.redis_seconds = LatencyHistogram(
            "callscreen_redis_duration_seconds",
            "Redis round-trip time, by operation.",
            LATENCY_BUCKETS_S,
            "operation",
            ("poll", "rate"),
        )
        registry.register(self.redis_seconds)
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
        self.list_private_copies = Counter(
            "callscreen_list_private_copies_total",
            "Numbers lists this worker indexed into memory of its own because the shared "
            "folder (cache.share_dir) could not be used.",
            ["list"],
            registry=registry,
        )
        self.history_records = Counter(
            "callscreen_history_records_total",
            "Calls for the call history, by outcome: written to Redis, or dropped because "
            "the queue was full or the write failed or was too slow.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("written", "dropped_queue_full", "dropped_redis"):
            self.history_records.labels(outcome)
        self.stir_results = Counter(
            "callscreen_stir_verifications_total",
            "STIR/SHAKEN results of screened calls that a policy verified, by result, "
            "reason (invalid) and attestation (valid).",
            ["result", "reason", "attest"],
            registry=registry,
        )
        self.stir_fetches = Counter(
            "callscreen_stir_cert_fetches_total",
            "Certificate (x5u) fetches by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.stir_cache_lookups = Counter(
            "callscreen_stir_cache_total",
            "STIR/SHAKEN cache look-ups by the layer that answered: result (per Identity "
            "value), local (this worker's certificates), redis (the fleet's), miss (fetched).",
            ["layer"],
            registry=registry,
        )
        self.stir_signatures = Counter(
            "callscreen_stir_signatures_total",
            "PASSporT signatures checked, by who checked them: the worker's signature "
            "helper process or the worker itself (no helper, or it did not answer).",
            ["checked_by"],
            registry=registry,
        )
        self.stir_fetch_seconds = Histogram(
            "callscreen_stir_cert_fetch_duration_seconds",
            "Time to fetch one certificate (x5u), whatever the outcome.",
            buckets=STIR_FETCH_BUCKETS_S,
            registry=registry,
        )
        self._stir_children = {key: self.stir_results.labels(*key) for key in STIR_RESULTS}
        self._stir_fetch_children = {o: self.stir_fetches.labels(o) for o in STIR_FETCH_OUTCOMES}
        self._stir_cache_children = {
            layer: self.stir_cache_lookups.labels(layer) for layer in STIR_CACHE_LAYERS
        }
        self._stir_signature_children = {
            by: self.stir_signatures.labels(by) for by in ("helper", "worker")
        }
        self.redis_health = RedisHealth(config.lists)
        registry.register(self.redis_health)
        self.subscriber_cache = SubscriberCacheCounts()
        registry.register(self.subscriber_cache)
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        ProcessCollector(registry=registry)
        Info(
            "callscreen_build",
            "The running version of callscreen, its Python and main libraries.",
            registry=registry,
        ).info(build_labels())
        self.decisions = DecisionCounts(decision_keys(config))
        registry.register(self.decisions)
        self.rate_peaks = RatePeaks(watched_rules(config))
        registry.register(self.rate_peaks)
        self._error_children = {kind: self.errors.labels(kind) for kind in ERROR_KINDS}
        self._fallback_children = {r: self.fallbacks.labels(r) for r in FALLBACK_REASONS}
        self.redis_poll = self.redis_seconds.labels("poll")
        self.redis_rate = self.redis_seconds.labels("rate")
        for name in config.lists:
            self.list_entries.labels(name)
            self.list_synced.labels(name)
            if config.lists[name].kind == "numbers":
                self.list_private_copies.labels(name)

    def add_decisions(self, config: Config) -> None:
        """Make the series a reloaded ``config`` can count (old ones stay)."""
        for key in decision_keys(config):
            self.decisions.counts.setdefault(key, 0)
        for rule_key, rule in watched_rules(config).items():
            self.rate_peaks.rules[rule_key] = rule
            self.rate_peaks.peaks.setdefault(rule_key, [0, 0])

    def decided(self, trunk_group: str, action: str, rule: str, dry_run: bool = False) -> None:
        self.decisions.counts[(trunk_group, action, rule, dry_run)] += 1

    def rates_seen(self, counts: dict[str, int], now_s: float) -> None:
        """Note the counts and runs one call read, by rule key (``policy:rule``)."""
        self.rate_peaks.seen(counts, now_s)

    def error(self, kind: str) -> None:
        """Count a refused request; ``kind`` is a constant, normally one of :data:`ERROR_KINDS`."""
        child = self._error_children.get(kind)
        if child is None:  # a kind added in code but not above: count it all the same
            child = self._error_children[kind] = self.errors.labels(kind)
        child.inc()

    def fallback(self, reason: str) -> None:
        """Count an ``on_error`` answer; ``reason`` is one of :data:`FALLBACK_REASONS`."""
        self._fallback_children[reason].inc()

    def stir_result(self, result: str, reason: str | None, attest: str | None) -> None:
        """Count a call's STIR/SHAKEN result (bounded labels: see :data:`STIR_RESULTS`)."""
        key = (result, reason or "", (attest or "") if result == "valid" else "")
        child = self._stir_children.get(key)
        if child is not None:
            child.inc()

    def stir_fetched(self, outcome: str, seconds: float) -> None:
        self._stir_fetch_children[outcome].inc()
        self.stir_fetch_seconds.observe(seconds)

    def stir_cache(self, layer: str) -> None:
        self._stir_cache_children[layer].inc()

    def stir_signature(self, checked_by: str) -> None:
        self._stir_signature_children[checked_by].inc()
