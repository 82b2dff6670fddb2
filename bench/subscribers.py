"""The per-subscriber lists in ``make bench``: full sync, Redis bytes per pair, serving.

    python -m bench --subscribers 100000      # the default: 1 M pairs (10 a subscriber)
    python -m bench --subscribers 10000000    # the 100 M-pair target (a 3 GB CSV)

Steps, on the bench's private Redis (the block list and the others already loaded):

1. write the subscribers CSV (``subscriber,entry,side``; bench/workload.py);
2. full sync by the real loader (``python -m loader sync --list personal``), timed as
   the whole process an operator runs, with its peak memory and Redis's
   (``used_memory`` polled); then a second sync with one pair more, a third of a file
   with a duplicate row (the same pairs: timed, and how much Redis grew meanwhile) and
   a fourth taking one entry off 1 % of the subscribers (Redis's peaks: a sync writes
   only the buckets it changes) and a fifth taking one off every second subscriber,
   which changes most buckets and so is swapped in by steps
   (``loader.subscriber_step_share``; the bench steps at any size and waits 5 s between
   steps, not 120: no service reads the list meanwhile);
3. Redis bytes per pair: ``MEMORY USAGE ... SAMPLES 0`` of every bucket key of the live
   generation (all 16,384), divided by the pairs ``meta`` counts; and the share of that
   which the buckets' markers take (each bucket copied, its marker removed, measured);
   and the same for buckets as dense as the 100 M-pair target makes them, built aside
   (:func:`dense_bucket_memory`);
4. unless ``--skip-http``: a service whose config has the bench's local-only policy
   (trunk group ``bench``), one reading the called subscriber's entries and counting
   the caller's calls (trunk group ``subscribers``: both from Redis in one pipelined
   round trip a call), one with the entries rules alone (``subscriber-entries``: a
   subscriber the worker's entries cache holds costs no Redis command) and the local
   policy with the call-rate rule after its local rules (``call-rate``, on the local
   bodies); and bare aiohttp beside it. Bodies call the subscribers uniformly, or by a
   Zipf law (``--subscriber-zipf 1.1``: a few contact centres take most calls). A
   sample of answers is checked, then wrk drives bare aiohttp and the trunk groups in
   alternating rounds (``--subscriber-rounds``), each after an unmeasured warm-up (for
   the groups reading the entries cache, at least one pass over their bodies: the
   rounds between leave the cache past its max age, and without it each round would
   measure a cold start, not steady traffic),
   each reported as a ratio to the bare round beside it, then once more at the same
   moderate rate (``--pace`` times the subscriber group's full rate), where latency is
   the call's own cost rather than queueing. The cache's hit share under load is reported.

Default size: two to four minutes on the bench machines (2 cores): four syncs, then
wrk on five targets.
"""

from __future__ import annotations

import argparse
import functools
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench import load, servers, storage
from bench.workload import (
    ENTRIES_TRUNK_GROUP,
    RATE_TRUNK_GROUP,
    SUBSCRIBER_CLASS_SHARES,
    SUBSCRIBER_LIST,
    SUBSCRIBER_TRUNK_GROUP,
    TRUNK_GROUP,
    SubscriberSizes,
    SubscriberWorkload,
    check_sample,
    random_numbers,
    subscriber_config,
    subscriber_sample,
    write_config,
    write_subscribers,
)
from core import keys
from core.bucket_gens import BucketGens
from core.subscribers import code_of, pack, settle
from devtools.redis_server import RedisProcess, free_port

Step = Callable[[str], Callable[[], None]]
#: The row the second sync adds (bench/workload.py's subscribers are random NANP numbers).
EXTRA_PAIR = "19512620000,15165550000,block"
#: Bucket keys per pipelined round trip while measuring memory.
BUCKETS_PER_ROUND = 1024
#: Seconds each trunk group is driven before the measured rounds.
WARMUP_S = 1
#: Seconds each trunk group is driven, unmeasured, right before each of its rounds; for
#: those reading the entries cache (CACHED) at least one pass over its rotating bodies at
#: its last rate: the other groups' rounds in between leave a worker's entries cache
#: older than its max age, and a round should measure steady traffic, not a cold start.
ROUND_WARMUP_S = 2
CACHED = frozenset({"subscribers", "entries"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subscribers",
        type=int,
        default=100_000,
        help="subscribers on the per-subscriber list (10,000,000 for 100 M pairs; 0: skip)",
    )
    parser.add_argument("--subscriber-entries", type=int, default=10, help="entries each")
    parser.add_argument(
        "--subscriber-rounds", type=int, default=2, help="load runs per trunk group"
    )
    parser.add_argument(
        "--subscriber-bodies", type=int, default=20_000, help="distinct subscriber bodies"
    )
    parser.add_argument(
        "--subscriber-zipf",
        type=float,
        default=0.0,
        help="called subscribers drawn by a Zipf law of this exponent (0: uniformly)",
    )


def _steps_logged(log: Path, start: int) -> int:
    """Steps a sync logged from byte ``start`` of the loader's log on, its final swap
    included (1: one swap)."""
    with log.open("rb") as text:
        text.seek(start)
        return 1 + text.read().count(b" swapped in (")


def drop_one_entry(path: Path, every: int) -> None:
    """Rewrite the CSV at ``path`` without the first row of every ``every``-th subscriber
    (in order of first appearance). Values only shrink, so no bucket changes encoding."""
    seen = 0
    current = ""
    kept = path.with_suffix(".next")
    with path.open(encoding="ascii") as source, kept.open("w", encoding="ascii") as out:
        out.write(next(source))  # the header
        for line in source:
            subscriber = line.partition(",")[0]
            if subscriber != current:
                current = subscriber
                seen += 1
                if seen % every == 0:
                    continue
            out.write(line)
    kept.replace(path)


def run(
    args: argparse.Namespace,
    *,
    work: Path,
    server: RedisProcess,
    base_config: dict[str, Any],
    local_bodies: Path,
    env: dict[str, str],
    step: Step,
) -> dict[str, Any]:
    """Sync, measure and serve the per-subscriber list; the figures as a dict."""
    folder = work / "subscribers"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = SubscriberSizes(
        subscribers=args.subscribers,
        entries=args.subscriber_entries,
        bodies=args.subscriber_bodies,
        zipf=args.subscriber_zipf,
    )
    done = step(f"subscribers: writing {sizes.subscribers:,} subscribers x {sizes.entries} entries")
    workload = write_subscribers(folder / "personal.csv", sizes)
    bodies = folder / "bodies.jsonl"
    bodies.write_bytes(b"\n".join(workload.bodies) + b"\n")
    config_path = write_config(folder / "bench.yaml", subscriber_config(base_config, workload.path))
    done()

    def sync(what: str, add_row: bool) -> tuple[storage.Timed, storage.PeakMemory]:
        """A timed sync of the list, Redis's memory polled; ``add_row``: EXTRA_PAIR first."""
        done = step(f"subscribers: {what}")
        if add_row:
            with workload.path.open("a", encoding="ascii") as source:
                source.write(f"{EXTRA_PAIR}\n")
        with storage.PeakMemory(server.port) as memory:
            timed = storage.loader_sync(config_path, SUBSCRIBER_LIST, env, folder / "loader.log")
        done()
        return timed, memory

    client = redis.Redis(port=server.port)
    try:
        synced, first = sync(f"loader full sync of {workload.rows:,} rows", add_row=False)
        used = storage.used_memory(client) - first.before
        # Again with one pair more: only its bucket is written anew. Then with that row
        # twice: a new file with the same pairs, read, compared, not written. Then one
        # entry off 1 % of the subscribers: the buckets holding them written.
        changed, second = sync("a second sync adding one pair", add_row=True)
        same, third = sync("a third sync, a rewritten file with the same pairs", add_row=True)
        drop_one_entry(workload.path, every=100)
        wide, fourth = sync("a fourth sync, one entry off 1 % of the subscribers", False)
        drop_one_entry(workload.path, every=2)
        logged = (folder / "loader.log").stat().st_size
        widest, fifth = sync("a fifth sync, one entry off every second subscriber", False)
        meta = client.hgetall(keys.meta(SUBSCRIBER_LIST))
        pairs, subscribers = int(meta[b"size"]), int(meta[b"subscribers"])
        done = step("subscribers: MEMORY USAGE of every bucket, with and without its marker")
        memory = bucket_memory(client, int(meta[b"gen"]))
        dense = dense_bucket_memory(client, sizes.entries)
        done()
    finally:
        client.close()
    results: dict[str, Any] = {
        "subscribers": subscribers,
        "pairs": pairs,
        "rows": workload.rows,
        "subscribers_per_bucket": subscribers / keys.SUBSCRIBER_BUCKETS,
        "loader_s": synced.seconds,
        "loader_pairs_per_s": pairs / synced.seconds,
        "loader_peak_rss_mib": synced.peak_rss_bytes / 2**20,
        "bucket_bytes": memory["bytes"],
        "bytes_per_pair": memory["bytes"] / pairs,
        "marker_bytes_per_pair": memory["marker_bytes"] / pairs,
        "used_memory_per_pair": used / pairs,
        # Redis's peak while syncing, as a multiple of what the list holds once synced.
        "sync_peak_x": (first.peak - first.before) / used,
        "resync_peak_x": (second.peak - first.before) / used,
        "resync_s": changed.seconds,
        # Above what Redis held before it (the list, and its old generation expiring).
        "same_pairs_peak_x": (third.peak - third.before) / used,
        "same_pairs_s": same.seconds,
        # Above what Redis held before it, as the second sync's.
        "one_percent_peak_x": (fourth.peak - fourth.before) / used,
        "one_percent_s": wide.seconds,
        # Above what Redis held before it: the largest step's new buckets.
        "half_peak_x": (fifth.peak - fifth.before) / used,
        "half_s": widest.seconds,
        "half_steps": _steps_logged(folder / "loader.log", logged),
        "encodings": memory["encodings"],
        "dense": dense,
    }
    if not args.skip_http:
        results["http"] = serve(
            args,
            folder=folder,
            workload=workload,
            config=config_path,
            local_bodies=local_bodies,
            env=env,
            step=step,
            redis_port=server.port,
        )
    return results


def bucket_memory(client: redis.Redis, gen: int) -> dict[str, Any]:
    """``MEMORY USAGE`` of every bucket of ``gen``, and of each without its marker.

    The second figure copies each bucket to a scratch key of the same hash tag, removes
    the marker from the copy and measures it (a bucket holding the marker alone vanishes:
    its whole key is the marker's cost). Encodings: how many buckets Redis keeps as a
    compact listpack, how many as a hash table.
    """
    total = without = 0
    encodings: dict[str, int] = {}
    packed = client.get(keys.subscriber_gens(SUBSCRIBER_LIST, gen))
    gens = BucketGens.from_bytes(gen, packed if isinstance(packed, bytes) else None)
    for first in range(0, keys.SUBSCRIBER_BUCKETS, BUCKETS_PER_ROUND):
        ids = range(first, min(first + BUCKETS_PER_ROUND, keys.SUBSCRIBER_BUCKETS))
        pipe = client.pipeline(transaction=False)
        for bucket in ids:
            key = gens.key(SUBSCRIBER_LIST, bucket)
            scratch = key + ":bench-copy"
            pipe.memory_usage(key, samples=0)
            pipe.object("encoding", key)
            pipe.copy(key, scratch, replace=True)
            pipe.hdel(scratch, keys.SUBSCRIBER_MARKER)
            pipe.memory_usage(scratch, samples=0)
            pipe.delete(scratch)
        replies = pipe.execute()
        for i in range(len(ids)):
            used, encoding, _, _, bare, _ = replies[6 * i : 6 * i + 6]
            total += int(used or 0)
            without += int(bare or 0)
            name = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            encodings[name] = encodings.get(name, 0) + 1
    return {"bytes": total, "marker_bytes": total - without, "encodings": encodings}


#: Subscribers a bucket holds at the 100 M-pair target (10 M subscribers).
TARGET_PER_BUCKET = 10_000_000 // keys.SUBSCRIBER_BUCKETS
#: Buckets built aside at that density for :func:`dense_bucket_memory`.
DENSE_BUCKETS = 32


def dense_bucket_memory(client: redis.Redis, entries: int, seed: int = 7) -> dict[str, Any]:
    """Bytes per pair of buckets as dense as 10 M subscribers make them, built aside.

    The default bench syncs 100 k subscribers (6 a bucket: compact listpacks). At the
    target's 10 M, a bucket holds ~610 subscribers, a hash table with per-field
    overhead. Rather than a 3 GB sync, :data:`DENSE_BUCKETS` scratch hashes get
    :data:`TARGET_PER_BUCKET` subscribers each, ``entries`` packed 11-digit entries a
    subscriber (the loader's own packing) and the marker, like real buckets, and are
    measured, then deleted.
    """
    rng = np.random.default_rng(seed)
    per = TARGET_PER_BUCKET
    total = marker = 0
    for bucket in range(DENSE_BUCKETS):
        subscribers = random_numbers(rng, per).tolist()
        numbers = random_numbers(rng, per * entries).reshape(per, entries).tolist()
        fields: dict[str, bytes | int] = {keys.SUBSCRIBER_MARKER: 1}
        for subscriber, row in zip(subscribers, numbers, strict=True):
            fields[str(subscriber)] = pack(settle(code_of(str(n), "block") for n in row))
        key = "{bench:dense:" + str(bucket) + "}"
        pipe = client.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.memory_usage(key, samples=0)
        pipe.object("encoding", key)
        pipe.hdel(key, keys.SUBSCRIBER_MARKER)
        pipe.memory_usage(key, samples=0)
        pipe.delete(key)
        _, used, encoding, _, bare, _ = pipe.execute()
        total += int(used)
        marker += int(used) - int(bare)
    pairs = DENSE_BUCKETS * per * entries
    name = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    return {
        "subscribers_per_bucket": per,
        "encoding": name,
        "bytes_per_pair": total / pairs,
        "marker_bytes_per_pair": marker / pairs,
        "gb_for_100m_pairs": total / pairs * 100_000_000 / 1e9,
    }


def serve(
    args: argparse.Namespace,
    *,
    folder: Path,
    workload: SubscriberWorkload,
    config: Path,
    local_bodies: Path,
    env: dict[str, str],
    step: Step,
    redis_port: int,
) -> dict[str, Any]:
    """Check a sample of answers, then wrk on both trunk groups, rounds alternating; the
    commands Redis ran in each round are counted, per call of that round's trunk group."""
    wrk = load.wrk_binary()
    targets = {
        "baseline": (f"/tg/{TRUNK_GROUP}", local_bodies),
        "local": (f"/tg/{TRUNK_GROUP}", local_bodies),
        "subscribers": (f"/tg/{SUBSCRIBER_TRUNK_GROUP}", folder / "bodies.jsonl"),
        "entries": (f"/tg/{ENTRIES_TRUNK_GROUP}", folder / "bodies.jsonl"),
        "rate": (f"/tg/{RATE_TRUNK_GROUP}", local_bodies),
    }
    scripts = {}
    for name, (path, bodies) in targets.items():
        script_folder = folder / f"wrk-{name}"
        script_folder.mkdir(exist_ok=True)
        scripts[name] = load.write_wrk_script(script_folder, bodies, path)
    local_lines = local_bodies.read_bytes().splitlines()
    python_bodies = {
        "baseline": local_lines,
        "local": local_lines,
        "subscribers": workload.bodies,
        "entries": workload.bodies,
        "rate": local_lines,
    }

    def drive(url: str, name: str, seconds: int) -> load.LoadResult:
        path = targets[name][0]
        if wrk is not None:
            return load.run_wrk(url + path, scripts[name], seconds, args.connections, args.threads)
        return load.run_python(url + path, python_bodies[name], seconds, args.connections)

    runs: dict[str, list[load.LoadResult]] = {name: [] for name in targets}
    service = servers.service(config, free_port(), args.workers, folder / "service.log", env)
    baseline = servers.baseline(free_port(), args.workers, folder / "baseline.log")
    with baseline, service:
        urls = dict.fromkeys(targets, service.url) | {"baseline": baseline.url}
        done = step("subscribers: checking a sample of the answers")
        answers = check_answers(service.url, workload, per_class=200)
        done()
        if answers["wrong"]:
            print("!! wrong subscriber answers:", *answers["examples"], sep="\n   ")
        rates = {name: drive(urls[name], name, WARMUP_S).rps for name in runs}
        client = redis.Redis(port=redis_port)
        commands = dict.fromkeys(runs, 0)
        # What the service counted during the measured rounds only (not their warm-ups).
        counted: dict[str, Any] = {}
        for round_ in range(1, args.subscriber_rounds + 1):
            for name, results in runs.items():
                warm_s = ROUND_WARMUP_S
                if name in CACHED:
                    passing = math.ceil(len(python_bodies[name]) / max(rates[name], 1.0))
                    warm_s = max(warm_s, passing)
                done = step(
                    f"subscribers round {round_}/{args.subscriber_rounds}: {name} trunk group, "
                    f"{warm_s} s unmeasured, then {args.duration} s"
                )
                drive(urls[name], name, warm_s)
                before = _metrics(service.url)
                result, ran = storage.commands_per_call(
                    client, functools.partial(drive, urls[name], name, args.duration)
                )
                counted = _add_metrics(counted, before, _metrics(service.url))
                results.append(result)
                rates[name] = result.rps
                commands[name] += ran
                print(f"   {result.summary()}", flush=True)
                done()
        client.close()
        paced = _paced(args, folder, targets, runs["subscribers"], urls, step)
    decided = counted.get("decisions", {})
    total = sum(decided.values())
    reads = counted.get("redis_count", 0)
    return {
        "tool": "wrk" if wrk else "python",
        "answers": answers,
        "reject_share_counted": decided.get("reject", 0) / total if total else None,
        "reject_share_expected": SUBSCRIBER_CLASS_SHARES["sub_block"],
        "on_error": {
            reason: count for reason, count in counted.get("on_error", {}).items() if count
        },
        "calls": total,
        "redis_round_trips": reads,
        "commands_per_call": {
            name: commands[name] / max(1, sum(r.requests for r in runs[name])) for name in runs
        },
        "redis_mean_ms": counted.get("redis_sum", 0.0) / reads * 1000 if reads else None,
        "zipf": args.subscriber_zipf,
        "cache": counted.get("cache", {}),
        **load.runs_json(runs, paced),
    }


def _paced(
    args: argparse.Namespace,
    folder: Path,
    targets: dict[str, tuple[str, Path]],
    saturated: list[load.LoadResult],
    urls: dict[str, str],
    step: Step,
) -> dict[str, load.LoadResult]:
    """Every target at one moderate rate: ``--pace`` times the subscriber group's full
    rate, so none queues and the latencies compare the work a call costs."""
    if not args.pace or load.wrk_binary() is None or not saturated:
        return {}
    rate = args.pace * sum(r.rps for r in saturated) / len(saturated)
    delay_ms = load.pace_delay_ms(args.connections, rate)
    results = {}
    for name, (path, bodies) in targets.items():
        script = load.write_wrk_script(folder / f"wrk-{name}", bodies, path, delay_ms=delay_ms)
        done = step(f"subscribers paced: {name} at about {rate:,.0f} req/s")
        result = load.run_wrk(
            urls[name] + path, script, args.duration, args.connections, args.threads
        )
        print(f"   {result.summary(errors=False)}", flush=True)
        results[name] = result
        done()
    return results


def check_answers(url: str, workload: SubscriberWorkload, per_class: int) -> dict[str, Any]:
    """POST a sample of each class's bodies; compare each answer with the expected one."""
    indexes = subscriber_sample(workload, per_class)
    path = f"{url}/tg/{SUBSCRIBER_TRUNK_GROUP}"
    return check_sample(path, workload.bodies, workload.classes, indexes)


def _add_metrics(
    total: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    """``total`` plus what :func:`_metrics` counted between ``before`` and ``after``."""
    added: dict[str, Any] = {}
    for name, value in after.items():
        if isinstance(value, dict):
            kept = dict(total.get(name, {}))
            for key, count in value.items():
                kept[key] = kept.get(key, 0) + count - before[name].get(key, 0)
            added[name] = kept
        else:
            added[name] = total.get(name, 0) + value - before[name]
    return added


def _metrics(url: str) -> dict[str, Any]:
    """From /metrics: the subscribers trunk group's decisions, on_error answers by reason,
    and the count and sum of the per-call Redis round trips."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, Any] = {
        "decisions": {}, "on_error": {}, "redis_count": 0, "redis_sum": 0.0, "cache": {}
    }  # fmt: skip
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if family.name == "callscreen_decisions" and sample.name.endswith("_total"):
                if labels.get("trunk_group") == SUBSCRIBER_TRUNK_GROUP and (
                    labels.get("dry_run", "false") == "false"
                ):
                    decision = labels["decision"]
                    found["decisions"][decision] = (
                        found["decisions"].get(decision, 0) + sample.value
                    )
            elif family.name == "callscreen_subscriber_cache_lookups":
                if sample.name.endswith("_total"):
                    found["cache"][labels["result"]] = sample.value
            elif family.name == "callscreen_on_error" and sample.name.endswith("_total"):
                found["on_error"][labels["reason"]] = sample.value
            elif family.name == "callscreen_redis_duration_seconds" and (
                labels.get("operation") == "rate"
            ):
                if sample.name.endswith("_count"):
                    found["redis_count"] += sample.value
                elif sample.name.endswith("_sum"):
                    found["redis_sum"] += sample.value
    return found
