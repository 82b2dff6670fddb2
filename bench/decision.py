"""Decision cost against the size of the block list: a micro-benchmark, no HTTP.

For each size the block list is built the way a worker holds it (4,096 buckets of
sorted numbers, unpacked from the stored bytes by the service's own code), and the bench
policy (allow list, block list, prefixes, CNAM) decides a fixed mix of calls: 20 % on
the block list, the rest on no list, which run through all four rules. The figure is
the best of a few rounds (CPU time), in microseconds per decision.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.workload import (
    Files,
    Sizes,
    bench_config,
    generate,
    ordinary_name,
    random_numbers,
    request_body,
)
from core import keys
from core.config import parse_config
from core.entries import canonical
from core.store import unpack_bucket
from service.screening.lists import ListObject, NameList, NumberList, PrefixList
from service.screening.policy import CompiledPolicy
from service.screening.request import Call, CallParser

SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)


@dataclass(frozen=True, slots=True)
class DecisionCost:
    listed: int
    #: Whole-policy evaluation per call (4 rules for most calls).
    policy_us: float
    #: Just the block-list membership test.
    lookup_us: float


def number_list(numbers: np.ndarray[Any, Any]) -> NumberList:
    """A NumberList as the cache builds it from a stored base."""
    numbers = np.unique(numbers.astype("<u8"))
    buckets = numbers % keys.NUMBER_BUCKETS
    order = np.argsort(buckets, kind="stable")
    numbers, buckets = numbers[order], buckets[order]
    bounds = np.searchsorted(buckets, np.arange(keys.NUMBER_BUCKETS + 1))
    return NumberList(
        [
            unpack_bucket(numbers[bounds[b] : bounds[b + 1]].tobytes())
            for b in range(keys.NUMBER_BUCKETS)
        ]
    )


def _seconds(fn: Callable[[Any], object], items: list[Any]) -> float:
    started = time.process_time()
    for item in items:
        fn(item)
    return time.process_time() - started


def measure(
    sizes: tuple[int, ...] = SIZES, calls: int = 20_000, repeats: int = 15
) -> list[DecisionCost]:
    """Cost per decision at each list size.

    All sizes are built first and then timed in turn, round after round, keeping each
    one's best round (CPU time of this process): noise from other processes then hits
    every size alike instead of whichever ran during a busy spell.
    """
    small = generate(Sizes(numbers=1_000, allow=10_000, bodies=10))
    config = parse_config(bench_config_for_lists(), source="bench-decision")
    policy = CompiledPolicy("bench", config.policies["bench"])
    parser = CallParser(config.caller.sources, config.caller.default_country)
    fixed: dict[str, ListObject] = {
        "allow": number_list(small.allow),
        "prefixes": PrefixList(frozenset(canonical("prefixes", p) for p in small.prefixes)),
        "cnam": NameList(frozenset(canonical("names", n) for n in small.names)),
    }
    rng = np.random.default_rng(7)
    prng = random.Random(7)
    cases = []
    for size in sizes:
        pool = random_numbers(rng, size + calls)
        listed, unlisted = pool[:size], pool[size:]
        block = number_list(listed)
        lists = {**fixed, "block": block}
        hits = rng.choice(listed, calls // 5).tolist()
        callers = [*map(str, hits), *map(str, unlisted[: calls - len(hits)].tolist())]
        prng.shuffle(callers)
        parsed: list[Call] = [
            parser.parse(request_body(prng, caller, ordinary_name(prng))) for caller in callers
        ]
        decisions = {policy.conclude(c, lists).outcome.rule for c in parsed}
        assert "block-list" in decisions, "the hits should be decided by the block list"
        ints = [c.caller_int for c in parsed]
        cases.append((size, partial(policy.evaluate, lists=lists), parsed, block, ints))
    best = {size: [float("inf"), float("inf")] for size in sizes}
    for _ in range(repeats):
        for size, evaluate, parsed, block, ints in cases:
            best[size][0] = min(best[size][0], _seconds(evaluate, parsed))
            best[size][1] = min(best[size][1], _seconds(block.__contains__, ints))
    return [
        DecisionCost(size, policy_us=b[0] / calls * 1e6, lookup_us=b[1] / calls * 1e6)
        for size, b in best.items()
    ]


def bench_config_for_lists() -> dict[str, Any]:
    """The bench policy, its lists without sources (they are built in memory here)."""
    data = bench_config(Files(*[Path("-")] * 5), "redis://127.0.0.1:1/0", 0, 1)
    for spec in data["lists"].values():
        del spec["source"]
        spec.pop("column", None)
    return data
