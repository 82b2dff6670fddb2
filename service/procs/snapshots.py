"""Metrics that add up across worker processes (``python -m service --workers N``).

Each worker counts in its own in-process registry and writes a snapshot to a folder the
supervisor made (``<worker id>.json``, ``retired.json``; replaced atomically);
``/metrics`` serves the sum, its own taken fresh. Others' counts are at most
:data:`FLUSH_S` old; a stopped worker's counters move into ``retired.json`` so totals
never go down. Counters, histograms and summaries sum (``_created`` dropped); gauges
take the maximum over live processes. Why not prometheus_client's multiprocess mode:
BENCHMARKS.md, "Metrics: per-worker snapshots or prometheus_client's multiprocess mode".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import RestrictedRegistry

logger = logging.getLogger(__name__)

#: How often a worker writes its snapshot between scrapes.
FLUSH_S = 1.0
RETIRED = "retired"
_SUMMED = frozenset({"counter", "histogram", "gaugehistogram", "summary"})
#: Scans retried when a file vanished mid-scan (a worker was being retired).
_SCAN_ATTEMPTS = 5

# A snapshot: [[family name, type, help, [[sample name, {labels}, value], ...]], ...]
Snapshot = list[list[Any]]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The registry's current samples, ``_created`` left out."""
    return _families_to_snapshot(CollectorRegistry.collect(registry))


def _families_to_snapshot(families: Iterable[Metric]) -> Snapshot:
    return [
        [
            family.name,
            family.type,
            family.documentation,
            [
                [s.name, s.labels, s.value]
                for s in family.samples
                if not s.name.endswith("_created")
            ],
        ]
        for family in families
    ]


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(data))
    os.replace(temporary, path)


def _read(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


class _Sum:
    """Adds snapshots together (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, dict[tuple[str, str], list[Any]]]] = {}

    def add(self, snap: Snapshot, *, live: bool) -> None:
        for name, typ, help_text, samples in snap:
            summed = typ in _SUMMED
            if not summed and not live:
                continue
            family = self.families.setdefault(name, (typ, help_text, {}))[2]
            for sample_name, labels, raw in samples:
                value = math.nan if raw is None else raw  # JSON has no NaN: orjson wrote null
                key = (sample_name, orjson.dumps(labels).decode())
                seen = family.get(key)
                if seen is None:
                    family[key] = [sample_name, labels, value]
                elif summed:
                    seen[2] += value
                elif value > seen[2] or math.isnan(seen[2]):
                    seen[2] = value

    def metrics(self) -> Iterator[Metric]:
        for name, (typ, help_text, samples) in self.families.items():
            metric = Metric(name, help_text, typ)
            for sample_name, labels, value in samples.values():
                metric.add_sample(sample_name, labels, value)
            yield metric

    def to_snapshot(self) -> Snapshot:
        return _families_to_snapshot(self.metrics())


def aggregate(folder: Path) -> Iterator[Metric]:
    """The sum over every snapshot in ``folder``."""
    for _attempt in range(_SCAN_ATTEMPTS):
        # List first, then read retired.json: a worker is retired by rewriting
        # retired.json and only then deleting its file, so every count is seen once.
        names = sorted(p.stem for p in folder.glob("*.json") if p.stem != RETIRED)
        total = _Sum()
        try:
            retired = _read(folder / f"{RETIRED}.json")
        except FileNotFoundError:
            retired = {"ids": [], "metrics": []}
        total.add(retired["metrics"], live=False)
        done = set(retired["ids"])
        try:
            for name in names:
                if name not in done:
                    total.add(_read(folder / f"{name}.json"), live=True)
        except FileNotFoundError:
            continue  # retired while we read: scan again
        return total.metrics()
    logger.warning("metrics folder %s kept changing while read; serving what was read", folder)
    return total.metrics()


def retire(folder: Path, process_id: str) -> None:
    """Fold a stopped process's counters into ``retired.json`` and drop its file.

    Only the supervisor calls this, one process at a time, after the process exited.
    """
    path = folder / f"{process_id}.json"
    try:
        last = _read(path)
    except FileNotFoundError:  # it died before its first snapshot
        last = []
    try:
        retired = _read(folder / f"{RETIRED}.json")
    except FileNotFoundError:
        retired = {"ids": [], "metrics": []}
    total = _Sum()
    total.add(retired["metrics"], live=False)
    total.add(last, live=False)
    write_json(
        folder / f"{RETIRED}.json",
        {"ids": [*retired["ids"], process_id], "metrics": total.to_snapshot()},
    )
    path.unlink(missing_ok=True)


class SharedRegistry(CollectorRegistry):
    """A worker's registry: counts in-process, collects the sum over every worker.

    Pass it to ``create_app(registry=...)``: the metrics register on it as usual, and
    the ``/metrics`` handler, which collects it, serves the aggregate.
    """

    def __init__(self, folder: Path, process_id: str) -> None:
        super().__init__()
        self.folder = folder
        self.path = folder / f"{process_id}.json"

    def flush(self) -> None:
        """Write this process's snapshot."""
        write_json(self.path, snapshot(self))

    def collect(self) -> Iterator[Metric]:
        self.flush()
        return aggregate(self.folder)

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        return _Restricted(names, self)


class _Restricted(RestrictedRegistry):
    """``/metrics?name[]=...`` on the aggregate, not on this worker's own counts."""

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            restricted = metric._restricted_metric(self._name_set)  # type: ignore[no-untyped-call]
            if restricted:
                yield restricted
