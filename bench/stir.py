"""STIR/SHAKEN in ``make bench``: every call signed, its certificate already cached.

    python -m bench --stir-bodies 5000      # the default; 0 skips this part

Steps, on the bench's private Redis (the lists already loaded):

1. a throw-away STI PKI (devtools/stir_pki.py); the SP certificate chain is put in Redis
   under its x5u's key, as a worker's fetch would leave it, so no call fetches;
2. ``--stir-bodies`` of the workload's bodies, each given an Identity header signed for
   its own caller and called number (``max_age_s`` raised so they stay fresh for the
   run), and a copy of each with ``verstat=TN-Validation-Passed`` on ``From``;
3. one service with three trunk groups: the bench policy (``bench``), the same rules
   behind a ``stir_result`` rule rejecting invalid PASSporTs (``stir``: every call's
   signature is checked, the per-value results cache is off so retries do not flatter
   it), and the same with ``trust_verstat`` (``stir_verstat``); a second service, the
   same but with ``stir.signature_helper: never`` (``stir_in_worker``: the worker checks
   each signature itself, where the first has a helper process when the host has a core
   to spare); and the bare-aiohttp baseline. A sample of answers is checked, then rounds
   alternate over all five, each with the CPU a call took in its server's processes
   (worker and helper);
4. certificate misses: ``--stir-miss-bodies`` bodies signed with x5u URLs of their own,
   every one on a local certificate server that accepts and never answers, driven at
   full speed on the ``stir`` trunk group: every call's certificate is missing, and its
   answer's latency is reported against ``handler.deadline_ms`` (a call waits at most
   half of it, then answers ``cert_unavailable``; docs/stir-shaken.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from statistics import mean, median
from typing import Any

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench import load, servers
from bench.workload import TRUNK_GROUP, Workload, check_sample, write_config
from core import keys
from core.numbers import normalise
from devtools.redis_server import RedisProcess, free_port
from devtools.stir_pki import make_pki, sign_passport

Step = Callable[[str], Callable[[], None]]
X5U = "https://cert.bench.invalid/sp-chain.pem"
NAMES = ("baseline", "local", "stir", "stir_in_worker", "stir_verstat")
WARMUP_S = 1
#: Connections the silent server holds open at most: the oldest are long past the
#: service's fetch time limit (at most 32 at once a worker: service/screening/stir/fetch.py).
HELD_MAX = 512
#: handler.deadline_ms when the bench config does not set it (core/config.py).
DEFAULT_DEADLINE_MS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stir-bodies", type=int, default=5000, help="signed bodies for the STIR part (0: skip)"
    )
    parser.add_argument("--stir-rounds", type=int, default=2, help="load runs per server")
    parser.add_argument(
        "--stir-miss-bodies",
        type=int,
        default=10_000,
        help="bodies with a certificate URL of their own that never answers (0: skip)",
    )


def stir_config(base: dict[str, Any], anchors: Path) -> dict[str, Any]:
    config = copy.deepcopy(base)
    config["stir"] = {"trust_anchors": str(anchors), "max_age_s": 3600, "results_cache_size": 0}
    # The misses' certificate server is on loopback, over plain http (step 4).
    config["stir"] |= {"allow_http": True, "allow_networks": ["127.0.0.0/8"]}
    rules = config["policies"]["bench"]["rules"]
    invalid = {"name": "stir-invalid", "match": "stir_result", "results": ["invalid"],
               "operands": ["forbidden", "stir"]}  # fmt: skip
    for name, trust in (("stir", False), ("stir_verstat", True)):
        config["policies"][name] = {"rules": [invalid, *rules], "trust_verstat": trust}
        config["trunk_groups"][name] = {"policy": name}
    return config


def signed_bodies(workload: Workload, count: int, key: Any) -> tuple[list[bytes], list[bytes]]:
    """The first ``count`` bodies with an Identity header; and those with a verstat too."""
    plain, upstream = [], []
    for raw in workload.bodies[:count]:
        body = orjson.loads(raw)
        caller = normalise(body["From"][0]["user"], "1")
        called = normalise(body["To"][0]["user"], "1")
        assert caller is not None and called is not None
        body["Identity"] = [sign_passport(key, X5U, caller, called, attest="A")]
        plain.append(orjson.dumps(body))
        for address in body["From"]:
            address["uri_parameters"] = {"verstat": "TN-Validation-Passed"}
        upstream.append(orjson.dumps(body))
    return plain, upstream


class SilentServer:
    """A TCP server on loopback that accepts every connection and never answers (a
    certificate server that hangs); a context manager, serving from a thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: done
            while True:
                conn, _ = self.listener.accept()
                self.held.append(conn)
                if len(self.held) > HELD_MAX:  # long given up by the service's fetch
                    self.held.pop(0).close()


def miss_bodies(workload: Workload, count: int, key: Any, port: int) -> list[bytes]:
    """``count`` bodies each signed with an x5u of its own on ``port`` (never cached)."""
    made = []
    for n in range(count):
        body = orjson.loads(workload.bodies[n % len(workload.bodies)])
        caller = normalise(body["From"][0]["user"], "1")
        called = normalise(body["To"][0]["user"], "1")
        assert caller is not None and called is not None
        x5u = f"http://127.0.0.1:{port}/miss/{n}.pem"
        body["Identity"] = [sign_passport(key, x5u, caller, called, attest="A")]
        made.append(orjson.dumps(body))
    return made


def _sample(classes: list[str], per_class: int) -> list[int]:
    taken: dict[str, int] = {}
    indexes = []
    for i, cls in enumerate(classes):
        if taken.get(cls, 0) < per_class:
            taken[cls] = taken.get(cls, 0) + 1
            indexes.append(i)
    return indexes


def _late_answers(url: str) -> float:
    """Answers the service itself sent past handler.deadline_ms (from its arrival stamp)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "callscreen_late_answers":
            return sum(m.value for m in family.samples if m.name.endswith("_total"))
    return 0.0


def _stir_results(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "callscreen_stir_verifications":
            for metric in family.samples:
                if metric.name.endswith("_total") and metric.value:
                    labels = metric.labels
                    found[f"{labels['result']} {labels['reason'] or labels['attest']}"] = (
                        metric.value
                    )
        elif family.name == "callscreen_stir_signatures":
            for metric in family.samples:
                if metric.name.endswith("_total") and metric.value:
                    found[f"signatures checked by the {metric.labels['checked_by']}"] = metric.value
    return found


def run(
    args: argparse.Namespace,
    *,
    work: Path,
    server: RedisProcess,
    base_config: dict[str, Any],
    workload: Workload,
    local_bodies: Path,
    env: dict[str, str],
    step: Step,
) -> dict[str, Any]:
    """Serve signed calls beside unsigned ones and the baseline; the figures as a dict."""
    folder = work / "stir"
    done = step(f"stir: a test PKI and {args.stir_bodies:,} signed bodies")
    pki = make_pki()
    files = pki.write(folder / "pki")
    plain, upstream = signed_bodies(workload, args.stir_bodies, pki.sp_key)
    classes = workload.classes[: args.stir_bodies]
    paths = {"baseline": f"/tg/{TRUNK_GROUP}", "local": f"/tg/{TRUNK_GROUP}"}
    paths |= {"stir": "/tg/stir", "stir_in_worker": "/tg/stir", "stir_verstat": "/tg/stir_verstat"}
    bodies = {"baseline": local_bodies, "local": local_bodies}
    for name, made in (("stir", plain), ("stir_verstat", upstream)):
        bodies[name] = folder / f"{name}.jsonl"
        bodies[name].write_bytes(b"\n".join(made) + b"\n")
    bodies["stir_in_worker"] = bodies["stir"]
    made_config = stir_config(base_config, files["trust_anchors"])
    config = write_config(folder / "bench.yaml", made_config)
    made_config["stir"] = {**made_config["stir"], "signature_helper": "never"}
    in_worker_config = write_config(folder / "bench-in-worker.yaml", made_config)
    client = redis.Redis(port=server.port)
    client.set(keys.stir_cert(X5U), pki.chain_pem, ex=86_400)
    client.close()
    done()
    wrk = load.wrk_binary()
    scripts = {}
    for name in NAMES:
        script_folder = folder / f"wrk-{name}"
        script_folder.mkdir(exist_ok=True)
        scripts[name] = load.write_wrk_script(script_folder, bodies[name], paths[name])

    def drive(url: str, name: str, seconds: int) -> load.LoadResult:
        if wrk is not None:
            return load.run_wrk(
                url + paths[name], scripts[name], seconds, args.connections, args.threads
            )
        lines = bodies[name].read_bytes().splitlines()
        return load.run_python(url + paths[name], lines, seconds, args.connections)

    runs: dict[str, list[load.LoadResult]] = {name: [] for name in NAMES}
    cpu_us: dict[str, list[float]] = {name: [] for name in NAMES}
    service = servers.service(config, free_port(), args.workers, folder / "service.log", env)
    in_worker = servers.service(
        in_worker_config, free_port(), args.workers, folder / "service-in-worker.log", env
    )
    baseline = servers.baseline(free_port(), args.workers, folder / "baseline.log")
    with baseline, service, in_worker:
        done = step("stir: checking a sample of the answers")
        indexes = _sample(classes, per_class=100)
        answers = {
            name: check_sample(f"{service.url}{paths[name]}", made, classes, indexes)
            for name, made in (("stir", plain), ("stir_verstat", upstream))
        }
        done()
        served = {name: service for name in NAMES}
        served |= {"baseline": baseline, "stir_in_worker": in_worker}
        for name in NAMES:
            drive(served[name].url, name, WARMUP_S)
        for round_ in range(1, args.stir_rounds + 1):
            for name in NAMES:
                done = step(f"stir round {round_}/{args.stir_rounds}: {name}, {args.duration} s")
                cpu_before = served[name].cpu_s()
                result = drive(served[name].url, name, args.duration)
                if result.requests:
                    used_s = served[name].cpu_s() - cpu_before
                    cpu_us[name].append(used_s / result.requests * 1e6)
                runs[name].append(result)
                print(f"   {result.summary()}", flush=True)
                done()
        results = _stir_results(service.url)
        misses = None
        if args.stir_miss_bodies > 0:
            late_before = _late_answers(service.url)
            with SilentServer() as silent:
                misses = _misses(args, folder, workload, pki.sp_key, silent.port, service.url)
            misses["late_answers"] = _late_answers(service.url) - late_before
            after = _stir_results(service.url)
            misses["results"] = {k: v - results.get(k, 0) for k, v in after.items()
                                 if v - results.get(k, 0)}  # fmt: skip
    deadline_ms = base_config.get("handler", {}).get("deadline_ms", DEFAULT_DEADLINE_MS)
    return {
        "tool": "wrk" if wrk else "python",
        "bodies": args.stir_bodies,
        "answers": answers,
        "results": results,
        "misses": misses,
        "deadline_ms": deadline_ms,
        "cpu_us_per_call": cpu_us,
        **load.runs_json(runs, {}),
    }


def _misses(
    args: argparse.Namespace, folder: Path, workload: Workload, key: Any, port: int, url: str
) -> dict[str, Any]:
    """Drive the ``stir`` trunk group with certificates that never come (step 4)."""
    bodies = folder / "misses.jsonl"
    bodies.write_bytes(b"\n".join(miss_bodies(workload, args.stir_miss_bodies, key, port)) + b"\n")
    target = url + "/tg/stir"
    wrk = load.wrk_binary()
    if wrk is not None:
        script_folder = folder / "wrk-misses"
        script_folder.mkdir(exist_ok=True)
        script = load.write_wrk_script(script_folder, bodies, "/tg/stir")
        result = load.run_wrk(target, script, args.duration, args.connections, args.threads)
    else:
        lines = bodies.read_bytes().splitlines()
        result = load.run_python(target, lines, args.duration, args.connections)
    print(f"   certificate misses: {result.summary()}, max {result.max_ms:.1f} ms", flush=True)
    return {"bodies": args.stir_miss_bodies, **result.as_json()}


def summary(s: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Report lines, and the paired ratios to the baseline by trunk group."""
    runs = s["runs"]
    lines = [
        "",
        f"STIR/SHAKEN ({s['tool']}, {s['bodies']:,} signed bodies, certificate cached, "
        f"{args.connections} connections, {args.workers} worker(s), {args.stir_rounds} x "
        f"{args.duration} s per server, rounds alternating)",
        f"  {'':14} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'x baseline':>11}"
        f" {'CPU us/call':>12}",
    ]
    cpu = s.get("cpu_us_per_call", {})
    ratios: dict[str, Any] = {}
    for name in NAMES:
        results = runs[name]
        pairs = [r["rps"] / b["rps"] for r, b in zip(results, runs["baseline"], strict=True)]
        ratios[name] = median(pairs) if pairs else None
        lines.append(
            f"  {name:14} {mean(r['rps'] for r in results):>10,.0f}"
            f" {mean(r['p50_ms'] for r in results):>8.2f}"
            f" {mean(r['p99_ms'] for r in results):>8.2f}"
            f" {sum(r['errors'] for r in results):>7}"
            f" {ratios[name]:>11.3f} {median(cpu[name]) if cpu.get(name) else 0:>12.1f}"
            f"   (paired: {', '.join(f'{p:.2f}' for p in pairs)})"
        )
    lines.append(
        "  CPU us/call: median over rounds of the server's processes' CPU (worker and "
        "signature helper) per call answered"
    )
    counted = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(s["results"].items()))
    lines.append(f"  results counted: {counted or 'none'}")
    for name, checked in s["answers"].items():
        lines.append(f"  {name}: answers checked {checked['checked']}, wrong {checked['wrong']}")
    misses = s.get("misses")
    if misses:
        counted = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(misses["results"].items()))
        lines.append(
            f"  certificate misses ({misses['bodies']:,} x5u URLs of their own, a server that "
            f"never answers): {misses['rps']:,.0f} req/s, p50 {misses['p50_ms']:.1f} ms, p99 "
            f"{misses['p99_ms']:.1f} ms, max {misses['max_ms']:.1f} ms (wrk) against "
            f"handler.deadline_ms {s['deadline_ms']}; answers the service sent late: "
            f"{misses['late_answers']:,.0f}; errors {misses['errors']}; {counted}"
        )
    return lines, ratios
