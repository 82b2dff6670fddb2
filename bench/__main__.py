"""``make bench`` / ``python -m bench``: the benchmark of BENCHMARKS.md, in one run on one machine.

    python -m bench [--numbers 10000000] [--duration 10] [--rounds 2] [--workers 1] ...

Steps: generate the workload; start a private redis-server on a free port; time
``redis-cli --pipe`` and the real loader on the block list, with Redis memory per number
and the loader's peak memory; measure decision cost against list size; then start the
service and the bare-aiohttp baseline with the same worker count and drive both with
wrk (same bodies, duration and connections), alternating rounds so both see the same
machine noise, after checking a sample of the service's answers. Last, the
per-subscriber list (bench/subscribers.py, ``--subscribers N``, 0 to skip): its full
sync, Redis bytes per pair, and a trunk group reading it served beside the local-only one.
Then the fraud policy (bench/fraud.py, ``--fraud-rounds N``, 0 to skip): local lists plus
Redis-counted rates and sequential dialing against bare aiohttp, and Redis bytes per key.
STIR/SHAKEN (bench/stir.py, ``--stir-bodies N``, 0 to skip), before the subscribers:
every call signed and verified with its certificate cached, against bare aiohttp.

Everything it starts (Redis, servers) is stopped at the end, and its temporary folder
removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import decision, fraud, load, machine, servers, stir, storage, subscribers
from bench.report import Report
from bench.workload import (
    CLASS_SHARES,
    TRUNK_GROUP,
    Sizes,
    Workload,
    bench_config,
    check_sample,
    generate,
    sample,
    write_config,
    write_files,
    write_numbers,
)
from core.config import load_config
from devtools.redis_server import RedisProcess, free_port

BLOCKED_CLASSES = ("block_list", "prefix", "cnam")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--numbers", type=int, default=1_000_000, help="block-list size")
    parser.add_argument("--bodies", type=int, default=50_000, help="distinct request bodies")
    parser.add_argument("--duration", type=int, default=5, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=6, help="load runs per server")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per server")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.5,
        help="also run both at this share of the baseline's full rate (0: skip)",
    )
    parser.add_argument(
        "--decision-sizes",
        default="1000,10000,100000,1000000,10000000",
        help="list sizes for the decision-cost micro-benchmark",
    )
    parser.add_argument(
        "--history",
        type=float,
        metavar="SHARE",
        help="turn call history on, recording this share of allowed calls (0 to 1) besides "
        "every reject; the service is then also run with history off in the same rounds",
    )
    parser.add_argument(
        "--public-mode",
        action="store_true",
        help="also serve with aiohttp's public API only (CALLSCREEN_AIOHTTP_INTERNALS=off)"
        " in the alternating rounds, and report its throughput against the usual service",
    )
    subscribers.add_arguments(parser)
    fraud.add_arguments(parser)
    stir.add_arguments(parser)
    parser.add_argument("--skip-http", action="store_true", help="only the Redis/loader parts")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def _step(message: str) -> Callable[[], None]:
    print(f"-- {message} ...", flush=True)
    started = time.perf_counter()
    return lambda: print(f"   done in {time.perf_counter() - started:.1f} s", flush=True)


def _child_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CALLSCREEN_REDIS_URL"] = redis_url
    # Masked call history names numbers' sets by an HMAC under this key (--history).
    env.setdefault("CALLSCREEN_HISTORY_KEY", os.urandom(16).hex())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return env


def run_storage(
    work: Path, workload: Workload, config: Path, server: RedisProcess
) -> dict[str, Any]:
    """redis-cli --pipe vs the loader, Redis bytes per number, loader peak memory."""
    client = redis.Redis(port=server.port)
    env = _child_env(server.url)
    log = work / "loader.log"
    numbers = workload.block
    count = numbers.size
    try:
        done = _step(f"redis-cli --pipe: SADD of the {count:,} block-list numbers")
        commands = storage.write_sadd_commands(numbers, storage.PLAIN_SET_KEY, work / "sadd.resp")
        before = storage.used_memory(client)
        cli = storage.redis_cli_pipe(server.port, commands)
        plain_bytes = (storage.used_memory(client) - before) / count
        client.flushall()
        commands.unlink()
        done()

        done = _step(f"loader on a tenth of the list ({count // 10:,} numbers), for its memory")
        tenth = work / "block-tenth.csv"
        write_numbers(tenth, numbers[: count // 10])
        small_config = work / "loader-tenth.yaml"
        write_config(
            small_config,
            {
                "redis": {"url": server.url},
                "lists": {"block": {"kind": "numbers", "source": str(tenth), "column": "number"}},
            },
        )
        small = storage.loader_sync(small_config, "block", env, log)
        client.flushall()
        done()

        done = _step(f"loader: full sync of the {count:,}-number block list")
        before = storage.used_memory(client)
        full = storage.loader_sync(config, "block", env, log)
        compact_bytes = (storage.used_memory(client) - before) / count
        done()

        done = _step("loader: allow list, prefixes and CNAM")
        for name in ("allow", "prefixes", "cnam"):
            storage.loader_sync(config, name, env, log)
        done()
    finally:
        client.close()
    return {
        "numbers": count,
        "redis_cli_pipe_s": cli.seconds,
        "loader_s": full.seconds,
        "loader_vs_redis_cli": full.seconds / cli.seconds,
        "loader_peak_rss_mib": full.peak_rss_bytes / 2**20,
        "loader_tenth_s": small.seconds,
        "loader_tenth_peak_rss_mib": small.peak_rss_bytes / 2**20,
        "loader_batch_size": load_config(config).loader.batch_size,
        "redis_bytes_per_number": compact_bytes,
        "plain_set_bytes_per_number": plain_bytes,
    }


def check_service_answers(url: str, workload: Workload, per_class: int) -> dict[str, Any]:
    """POST a sample of bodies of every class; compare each answer with the expected one."""
    indexes = sample(workload, per_class)
    return check_sample(f"{url}/tg/{TRUNK_GROUP}", workload.bodies, workload.classes, indexes)


def decision_totals(url: str) -> dict[str, float]:
    """Decisions the service counted so far (from /metrics) for the bench trunk group."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "callscreen_decisions":
            continue
        for metric in family.samples:
            labels = metric.labels
            if (
                metric.name.endswith("_total")
                and labels.get("trunk_group") == TRUNK_GROUP
                and labels.get("dry_run", "false") == "false"
            ):
                totals[labels["decision"]] = totals.get(labels["decision"], 0) + metric.value
    return totals


def _reject_share(before: dict[str, float], after: dict[str, float]) -> float | None:
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(counted.values())
    return counted.get("reject", 0) / total if total else None


def run_http(
    args: argparse.Namespace,
    *,
    work: Path,
    workload: Workload,
    config: Path,
    service_port: int,
    env: dict[str, str],
) -> dict[str, Any]:
    wrk = load.wrk_binary()
    if wrk is None:
        print(
            "!! wrk is not installed: falling back to the Python load generator. Its figures\n"
            "!! are limited by the generator itself and are not comparable with wrk's.",
            flush=True,
        )
    path = f"/tg/{TRUNK_GROUP}"
    script = load.write_wrk_script(work, work / "data" / "bodies.jsonl", path)

    def drive(url: str, seconds: int) -> load.LoadResult:
        if wrk is not None:
            return load.run_wrk(url + path, script, seconds, args.connections, args.threads)
        return load.run_python(url + path, workload.bodies, seconds, args.connections)

    service = servers.service(config, service_port, args.workers, work / "service.log", env)
    baseline = servers.baseline(free_port(), args.workers, work / "baseline.log")
    runs: dict[str, list[load.LoadResult]] = {"baseline": [], "service": []}
    # CPU per request of each server and of Redis, each round: steadier than requests/s
    # on shared cores, where another process's load moves the rate, not the work.
    cpu_us: dict[str, list[float]] = collections.defaultdict(list)
    targets = {"baseline": baseline, "service": service}
    with contextlib.ExitStack() as stack:
        redis_client = stack.enter_context(
            contextlib.closing(redis.Redis.from_url(env["CALLSCREEN_REDIS_URL"]))
        )
        if args.public_mode:
            # The same service on aiohttp's public API (service/edge/aiohttp_adapter.py).
            public_port = free_port()
            targets["service_public"] = stack.enter_context(
                servers.service(
                    write_config(
                        work / "bench-public.yaml",
                        {**load_config_dict(config), "server": _server_on(config, public_port)},
                    ),
                    public_port,
                    args.workers,
                    work / "service-public.log",
                    {**env, "CALLSCREEN_AIOHTTP_INTERNALS": "off"},
                )
            )
            runs["service_public"] = []
        if args.history is not None:
            # The same service with history off, in the same rounds: history's cost is the
            # ratio of each pair, not a comparison across runs on a noisy machine.
            off_port = free_port()
            targets["service_no_history"] = stack.enter_context(
                servers.service(
                    write_config(
                        work / "bench-no-history.yaml",
                        {
                            **load_config_dict(config),
                            "server": _server_on(config, off_port),
                            "history": {"enabled": False},
                        },
                    ),
                    off_port,
                    args.workers,
                    work / "service-no-history.log",
                    env,
                )
            )
            runs["service_no_history"] = []
        stack.enter_context(baseline)
        stack.enter_context(service)
        done = _step("checking a sample of the service's answers")
        answers = check_service_answers(service.url, workload, per_class=200)
        if args.public_mode:
            public = check_service_answers(targets["service_public"].url, workload, 200)
            answers["wrong"] += public["wrong"]
            answers["checked"] += public["checked"]
        done()
        if answers["wrong"]:
            print("!! wrong answers:", *answers["examples"], sep="\n   ")
        if args.warmup:
            for server in targets.values():
                drive(server.url, args.warmup)
        counted_before = decision_totals(service.url)
        for round_ in range(1, args.rounds + 1):
            for name, server in targets.items():
                done = _step(f"round {round_}/{args.rounds}: {name}, {args.duration} s")
                server_before, redis_before = server.cpu_s(), _redis_cpu_s(redis_client)
                result = drive(server.url, args.duration)
                per_request_us = 1e6 / max(result.requests, 1)
                server_us = (server.cpu_s() - server_before) * per_request_us
                redis_us = (_redis_cpu_s(redis_client) - redis_before) * per_request_us
                cpu_us[name].append(server_us + redis_us)
                cpu_us[f"{name} (Redis)"].append(redis_us)
                runs[name].append(result)
                print(f"   {result.summary()}", flush=True)
                done()
        counted_after = decision_totals(service.url)
        paced = _paced_runs(args, work, runs["baseline"], targets)
    expected_reject = sum(CLASS_SHARES[c] for c in BLOCKED_CLASSES)
    return {
        "tool": "wrk" if wrk else "python",
        "answers": answers,
        "reject_share_counted": _reject_share(counted_before, counted_after),
        "reject_share_expected": expected_reject,
        "cpu_us_per_request": dict(cpu_us),
        **load.runs_json(runs, paced),
    }


def _redis_cpu_s(client: redis.Redis) -> float:
    """Redis's CPU seconds so far (user and system, from INFO)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def load_config_dict(config: Path) -> dict[str, Any]:
    """The bench config file as a dict (it is written by :func:`write_config`)."""
    loaded: dict[str, Any] = yaml.safe_load(config.read_text())
    return loaded


def _server_on(config: Path, port: int) -> dict[str, Any]:
    server: dict[str, Any] = dict(load_config_dict(config).get("server", {}))
    server["port"] = port
    return server


def _paced_runs(
    args: argparse.Namespace,
    work: Path,
    saturated: list[load.LoadResult],
    targets: dict[str, servers.Server],
) -> dict[str, load.LoadResult]:
    """Both servers at the same moderate, fixed rate: latency as callers see it in service.

    At full speed a closed-loop generator measures queueing, not the server: 32
    connections at N answers/s wait 32/N s on average. Here each connection pauses
    between requests, for a total of ``--pace`` times the baseline's full speed.
    """
    if not args.pace or load.wrk_binary() is None or not saturated:
        return {}
    full_rps = sum(r.rps for r in saturated) / len(saturated)
    delay_ms = load.pace_delay_ms(args.connections, args.pace * full_rps)
    script = load.write_wrk_script(
        work, work / "data" / "bodies.jsonl", f"/tg/{TRUNK_GROUP}", delay_ms=delay_ms
    )
    results = {}
    for name, server in targets.items():
        done = _step(f"paced: {name} at about {args.pace:.0%} of the baseline's rate")
        result = load.run_wrk(
            f"{server.url}/tg/{TRUNK_GROUP}", script, args.duration, args.connections, args.threads
        )
        print(f"   {result.summary(errors=False)}", flush=True)
        results[name] = result
        done()
    return results


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    work = args.folder or Path(tempfile.mkdtemp(prefix="callscreen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(args)
    report.machine(machine.describe())
    results: dict[str, Any] = {
        "machine": report.machine_info,
        "args": vars(args) | {"folder": str(work)},
    }
    server = None
    try:
        done = _step(f"generating the workload ({args.numbers:,} numbers, {args.bodies:,} bodies)")
        workload = generate(Sizes(numbers=args.numbers, bodies=args.bodies))
        files = write_files(workload, work / "data")
        done()
        server = RedisProcess(work / "redis").start()
        service_port = free_port()
        base_config = bench_config(files, server.url, service_port, args.workers)
        if args.history is not None:
            base_config["history"] = {"enabled": True, "sample_allowed": args.history}
        config = write_config(work / "bench.yaml", base_config)
        results["storage"] = run_storage(work, workload, config, server)
        report.storage(results["storage"])

        sizes = tuple(int(s) for s in args.decision_sizes.split(",") if s)
        done = _step(f"decision cost against list size ({', '.join(f'{s:,}' for s in sizes)})")
        results["decision"] = [asdict(d) for d in decision.measure(sizes)]
        done()
        report.decision(results["decision"])

        if not args.skip_http:
            env = _child_env(server.url)
            results["http"] = run_http(
                args,
                work=work,
                workload=workload,
                config=config,
                service_port=service_port,
                env=env,
            )
            report.http(results["http"])

        if args.stir_bodies > 0 and not args.skip_http:
            results["stir"] = stir.run(
                args,
                work=work,
                server=server,
                base_config=base_config,
                workload=workload,
                local_bodies=files.bodies,
                env=_child_env(server.url),
                step=_step,
            )
            report.stir(results["stir"])

        if args.subscribers > 0:
            results["subscribers"] = subscribers.run(
                args,
                work=work,
                server=server,
                base_config=base_config,
                local_bodies=files.bodies,
                env=_child_env(server.url),
                step=_step,
            )
            report.subscribers(results["subscribers"])

        if args.fraud_rounds > 0 and not args.skip_http:
            results["fraud"] = fraud.run(
                args,
                work=work,
                server=server,
                base_config=base_config,
                bodies=files.bodies,
                env=_child_env(server.url),
                step=_step,
            )
            report.fraud(results["fraud"], fraud.lines(results["fraud"], args))
    finally:
        if server is not None:
            server.stop()
        if not args.keep and args.folder is None:
            shutil.rmtree(work, ignore_errors=True)
    report.print()
    results["targets"] = report.targets
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2, default=str))
    # Missed targets are reported, not failures; wrong answers are.
    wrong = results.get("http", {}).get("answers", {}).get("wrong")
    wrong = wrong or any(a["wrong"] for a in results.get("stir", {}).get("answers", {}).values())
    wrong_subscribers = (
        results.get("subscribers", {}).get("http", {}).get("answers", {}).get("wrong")
    )
    return 1 if wrong or wrong_subscribers else 0


if __name__ == "__main__":
    sys.exit(main())
