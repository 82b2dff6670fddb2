"""Metrics summed across worker processes (service.procs.snapshots), on snapshot files in a folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from service.procs.snapshots import SharedRegistry, retire


def worker(folder: Path, name: str) -> tuple[SharedRegistry, Counter, Histogram, Gauge]:
    registry = SharedRegistry(folder, name)
    calls = Counter("calls_total", "Calls.", ["decision"], registry=registry)
    seconds = Histogram("answer_seconds", "Answer time.", buckets=(0.001, 0.01), registry=registry)
    entries = Gauge("entries", "List entries.", ["list"], registry=registry)
    calls.labels("allow")
    calls.labels("reject")
    return registry, calls, seconds, entries


def samples(registry: SharedRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_counters_and_histograms_add_up_gauges_take_the_max(tmp_path: Path) -> None:
    one, calls_1, seconds_1, entries_1 = worker(tmp_path, "worker-1")
    two, calls_2, seconds_2, entries_2 = worker(tmp_path, "worker-2")
    calls_1.labels("allow").inc(3)
    calls_2.labels("allow").inc(4)
    calls_2.labels("reject").inc()
    seconds_1.observe(0.0005)
    seconds_2.observe(0.005)
    seconds_2.observe(0.5)
    entries_1.labels("block").set(10)
    entries_2.labels("block").set(0)  # not loaded yet in that worker
    two.flush()

    seen = samples(one)  # a scrape of worker 1 sees worker 2's last snapshot
    assert seen['calls_total{decision="allow"}'] == 7
    assert seen['calls_total{decision="reject"}'] == 1
    assert seen['answer_seconds_bucket{le="0.001"}'] == 1
    assert seen['answer_seconds_bucket{le="0.01"}'] == 2
    assert seen['answer_seconds_bucket{le="+Inf"}'] == 3
    assert seen["answer_seconds_count"] == 3
    assert seen["answer_seconds_sum"] == pytest.approx(0.5055)
    assert seen['entries{list="block"}'] == 10
    assert not [name for name in seen if name.endswith("_created")]


def test_a_retired_worker_keeps_its_counts_but_not_its_gauges(tmp_path: Path) -> None:
    one, calls_1, _s, entries_1 = worker(tmp_path, "worker-1")
    two, calls_2, _s, entries_2 = worker(tmp_path, "worker-2")
    calls_1.labels("allow").inc(2)
    calls_2.labels("allow").inc(5)
    entries_1.labels("block").set(3)
    entries_2.labels("block").set(9)
    two.flush()
    retire(tmp_path, "worker-2")
    three, calls_3, _s, _e = worker(tmp_path, "worker-3")  # its replacement
    calls_3.labels("allow").inc()
    three.flush()
    retire(tmp_path, "worker-never-flushed")  # died before its first snapshot

    seen = samples(one)
    assert seen['calls_total{decision="allow"}'] == 8
    assert seen['entries{list="block"}'] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "retired.json",
        "worker-1.json",
        "worker-3.json",
    ]


def test_name_filter_applies_to_the_sum(tmp_path: Path) -> None:
    one, calls_1, _s, _e = worker(tmp_path, "worker-1")
    two, calls_2, _s, _e = worker(tmp_path, "worker-2")
    calls_1.labels("allow").inc()
    calls_2.labels("allow").inc()
    two.flush()
    # What /metrics?name[]=calls_total serves.
    text = generate_latest(one.restricted_registry(["calls_total"])).decode()
    assert 'calls_total{decision="allow"} 2.0' in text
    assert "answer_seconds" not in text
