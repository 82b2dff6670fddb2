"""The fraud policy in ``make bench``: throughput against bare aiohttp, Redis bytes per key.

    python -m bench --fraud-rounds 4      # the default is 2; 0 skips it

The policy (trunk group ``fraud``) is the bench's local lists plus neighbour spoofing,
call rates by caller and by called number and sequential dialing (limits no caller
reaches, so answers stay those of the local lists): every call that passes the lists
costs one pipelined Redis round trip. The bare-aiohttp baseline and the service are
driven in alternating rounds, so both see the same machine noise; the figure is the
median of the paired ratios. Then the keys those calls left in Redis are sampled:
``MEMORY USAGE`` per key of each kind, and how many have no TTL (should be none).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import redis

from bench import load, servers, storage
from bench.workload import write_config
from devtools.redis_server import RedisProcess, free_port

Step = Callable[[str], Callable[[], None]]
FRAUD_TRUNK_GROUP = "fraud"
#: Keys measured per kind.
SAMPLE_KEYS = 2000
#: Each kind's keys, by pattern (core/keys.py).
KINDS = {
    "call rate by caller": "{cs:rate:[0-9]*",
    "call rate by called": "{cs:rate:called:*",
    "sequential dialing": "{cs:seq:*",
}
NEVER = 1_000_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fraud-rounds", type=int, default=2, help="load runs of the fraud policy (0: skip)"
    )


def fraud_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (bench/workload.py ``bench_config``) plus the fraud policy and trunk group."""
    local_rules = config["policies"]["bench"]["rules"]
    rate = {
        "match": "call_rate",
        "window_s": 60,
        "limit": NEVER,
        "operands": ["busy-here", "flood"],
    }
    return {
        **config,
        "policies": {
            **config["policies"],
            FRAUD_TRUNK_GROUP: {
                "default": "allow",
                "rules": [
                    *local_rules,
                    {"name": "neighbour", "match": "neighbour_spoofing", "digits": 7,
                     "operands": ["unwanted", "neighbour"]},
                    {"name": "flood", **rate},
                    {"name": "tdos", **rate, "key": "called"},
                    {"name": "war-dial", "match": "sequential_dialing", "window_s": 60,
                     "run_length": 16, "track": 16, "operands": ["unwanted", "war-dialer"]},
                ],
            },
        },
        "trunk_groups": {
            **config["trunk_groups"], FRAUD_TRUNK_GROUP: {"policy": FRAUD_TRUNK_GROUP}
        },
    }  # fmt: skip


def run(
    args: argparse.Namespace,
    *,
    work: Path,
    server: RedisProcess,
    base_config: dict[str, Any],
    bodies: Path,
    env: dict[str, str],
    step: Step,
) -> dict[str, Any]:
    """Serve the fraud policy beside bare aiohttp, then measure its Redis keys."""
    folder = work / "fraud"
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "bench.yaml", fraud_config(base_config))
    path = f"/tg/{FRAUD_TRUNK_GROUP}"
    wrk = load.wrk_binary()
    script = load.write_wrk_script(folder, bodies, path)
    python_bodies = bodies.read_bytes().splitlines()

    def drive(url: str, seconds: int) -> load.LoadResult:
        if wrk is not None:
            return load.run_wrk(url + path, script, seconds, args.connections, args.threads)
        return load.run_python(url + path, python_bodies, seconds, args.connections)

    runs: dict[str, list[load.LoadResult]] = {"baseline": [], "fraud": []}
    commands = {"baseline": 0, "fraud": 0}
    client = redis.Redis(port=server.port)
    service = servers.service(config, free_port(), args.workers, folder / "service.log", env)
    baseline = servers.baseline(free_port(), args.workers, folder / "baseline.log")
    with baseline, service:
        for target in (baseline, service):
            drive(target.url, 1)
        for round_ in range(1, args.fraud_rounds + 1):
            for name, target in (("baseline", baseline), ("fraud", service)):
                done = step(f"fraud round {round_}/{args.fraud_rounds}: {name}, {args.duration} s")
                result, ran = storage.commands_per_call(
                    client, functools.partial(drive, target.url, args.duration)
                )
                commands[name] += ran
                runs[name].append(result)
                print(f"   {result.summary()}", flush=True)
                done()
    try:
        done = step("fraud: MEMORY USAGE and TTL of the keys the calls left")
        memory = {kind: key_memory(client, pattern) for kind, pattern in KINDS.items()}
        done()
    finally:
        client.close()
    ratios = [f.rps / b.rps for b, f in zip(runs["baseline"], runs["fraud"], strict=True)]
    return {
        "tool": "wrk" if wrk else "python",
        "ratio": median(ratios) if ratios else None,
        "ratios": ratios,
        "memory": memory,
        "commands_per_call": commands["fraud"] / max(1, sum(r.requests for r in runs["fraud"])),
        **load.runs_json(runs, {}),
    }


def key_memory(client: redis.Redis, pattern: str) -> dict[str, Any]:
    """Count of keys matching ``pattern``; mean ``MEMORY USAGE`` and keys without a TTL
    among the first :data:`SAMPLE_KEYS`."""
    count = 0
    sampled: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        count += 1
        if len(sampled) < SAMPLE_KEYS:
            sampled.append(key)
    pipe = client.pipeline(transaction=False)
    for key in sampled:
        pipe.memory_usage(key, samples=0)
        pipe.ttl(key)
    replies = pipe.execute()
    used = [int(u or 0) for u in replies[0::2]]
    return {
        "keys": count,
        "bytes_per_key": sum(used) / len(used) if used else None,
        "without_ttl": sum(1 for ttl in replies[1::2] if ttl == -1),
    }


def lines(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The report's section for :func:`run`'s figures."""
    out = [
        "",
        f"Fraud policy (local lists + neighbour spoofing + call rates by caller and by called "
        f"number + sequential dialing; {results['tool']}, {args.connections} connections, "
        f"{args.workers} worker(s), {args.fraud_rounds} x {args.duration} s, rounds alternating)",
    ]
    for name in ("baseline", "fraud"):
        rps = [r["rps"] for r in results["runs"][name]]
        p99 = [r["p99_ms"] for r in results["runs"][name]]
        out.append(
            f"  {name:10} {sum(rps) / len(rps):>10,.0f} req/s   p99 {max(p99):.2f} ms (worst round)"
        )
    ratios = ", ".join(f"{r:.2f}" for r in results["ratios"])
    out.append(f"  ratio fraud/bare aiohttp: {results['ratio']:.3f} (paired rounds: {ratios})")
    if "commands_per_call" in results:
        out.append(f"  Redis commands per call: {results['commands_per_call']:.2f}")
    for kind, m in results["memory"].items():
        per_key = "n/a" if m["bytes_per_key"] is None else f"{m['bytes_per_key']:.0f} B/key"
        out.append(
            f"  Redis, {kind:22} {m['keys']:>8,} keys, {per_key}, {m['without_ttl']} without TTL"
        )
    return out
