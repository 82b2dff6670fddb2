"""``python -m bench.metrics_cost``: what counting one screening call costs, three ways.

Every call does one decision count and one latency observation. Measured here:

- ``callscreen``: the service's own lock-free types (service/metrics.py), which each
  worker snapshots to a folder for the sum (service/procs/snapshots.py);
- ``client``: prometheus_client's Counter and Histogram in one process;
- ``multiprocess``: the same in prometheus_client's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR`` set), where every update writes an mmap'ed file.

Each is timed in a fresh interpreter (multiprocess mode is chosen at import), best of
``--repeat`` runs of ``--number`` calls; prints microseconds per call and the
difference to ``callscreen``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_SETUP = {
    "callscreen": """
from service.metrics import DecisionCounts, LatencyHistogram, LATENCY_BUCKETS_S
decisions = DecisionCounts([("main", "reject", "blocklist", False)])
latency = LatencyHistogram("x_seconds", "x", LATENCY_BUCKETS_S)
key = ("main", "reject", "blocklist", False)
def call():
    decisions.counts[key] += 1
    latency.observe(0.0004)
""",
    "client": """
from prometheus_client import CollectorRegistry, Counter, Histogram
from service.metrics import LATENCY_BUCKETS_S
registry = CollectorRegistry()
decisions = Counter("x_total", "x", ["trunk_group", "decision", "rule"], registry=registry)
latency = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS_S, registry=registry)
child = decisions.labels("main", "reject", "blocklist")
def call():
    child.inc()
    latency.observe(0.0004)
""",
}
_SETUP["multiprocess"] = _SETUP["client"]
_TIMED = """
import timeit
best = min(timeit.repeat(call, number={number}, repeat={repeat}))
print(best / {number} * 1e6)
"""


def _measure(kind: str, number: int, repeat: int) -> float:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as folder:
        if kind == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        code = _SETUP[kind] + _TIMED.format(number=number, repeat=repeat)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    return float(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    costs = {kind: _measure(kind, args.number, args.repeat) for kind in _SETUP}
    base = costs["callscreen"]
    for kind, cost in costs.items():
        print(f"{kind:13s} {cost:6.2f} us per call  ({cost - base:+.2f} us vs callscreen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
