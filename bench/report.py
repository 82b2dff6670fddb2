"""The printed report: the figures, then each target of BENCHMARKS.md with ``ok`` or ``MISSED``."""

from __future__ import annotations

import argparse
from statistics import mean, median
from typing import Any

#: The targets (BENCHMARKS.md).
MIN_THROUGHPUT_RATIO = 0.8
MAX_P99_MS = 5.0
MAX_REDIS_BYTES_PER_NUMBER = 16.0
MAX_LOADER_VS_REDIS_CLI = 3.0
#: "Flat": the largest list may cost at most this much more than the smallest.
MAX_DECISION_GROWTH = 1.5
#: "Does not grow with the file": peak RSS at the full list vs a tenth of it.
MAX_LOADER_MEMORY_GROWTH = 1.25
#: The fraud policy (one Redis round trip a call) against bare aiohttp, one worker.
MIN_FRAUD_RATIO = 0.5
#: Every call signed and verified (certificate cached), one worker (issue 18).
MIN_STIR_RATIO = 0.4
#: The Redis-backed subscriber and call-rate policies against bare aiohttp, one worker:
#: subscribers called uniformly, or by a Zipf law (a few hot ones).
MIN_SUBSCRIBER_RATIO = 0.6
MIN_SUBSCRIBER_ZIPF_RATIO = 0.85
MIN_CALL_RATE_RATIO = 0.6


class Report:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[str] = []
        self.machine_info: dict[str, str] = {}
        #: target -> met (None: not measured in this run).
        self.targets: dict[str, bool | None] = {}
        self._target_lines: list[str] = []

    def _target(self, name: str, ok: bool, detail: str) -> None:
        self.targets[name] = ok
        self._target_lines.append(f"  {'ok    ' if ok else 'MISSED'}  {name}: {detail}")

    def _untested(self, name: str, why: str) -> None:
        self.targets[name] = None
        self._target_lines.append(f"  n/a     {name}: not judged at this size; {why}")

    def machine(self, info: dict[str, str]) -> None:
        self.machine_info = info
        self.lines.append("Machine")
        self.lines += [f"  {k:<22} {v}" for k, v in info.items()]

    def storage(self, s: dict[str, Any]) -> None:
        n = s["numbers"]
        self.lines += [
            "",
            f"Redis and the loader ({n:,}-number block list)",
            f"  redis-cli --pipe, one SADD per number   {s['redis_cli_pipe_s']:8.2f} s"
            f"   ({n / s['redis_cli_pipe_s']:,.0f} numbers/s)",
            f"  loader full sync (whole process)        {s['loader_s']:8.2f} s"
            f"   ({n / s['loader_s']:,.0f} numbers/s)",
            f"  Redis memory, compact layout"
            f"            {s['redis_bytes_per_number']:8.1f} B/number",
            f"  Redis memory, plain set (redis-cli)"
            f"     {s['plain_set_bytes_per_number']:8.1f} B/number",
            f"  loader peak RSS: {n // 10:,} numbers {s['loader_tenth_peak_rss_mib']:.0f} MiB,"
            f" {n:,} numbers {s['loader_peak_rss_mib']:.0f} MiB",
        ]
        ratio = s["loader_vs_redis_cli"]
        self._target(
            "loader <= 3x redis-cli --pipe",
            ratio <= MAX_LOADER_VS_REDIS_CLI,
            f"{ratio:.2f}x ({s['loader_s']:.2f} s vs {s['redis_cli_pipe_s']:.2f} s)",
        )
        per_number = s["redis_bytes_per_number"]
        at = "" if n >= 10_000_000 else f" (measured at {n:,}; the target is at 10,000,000)"
        self._target(
            "Redis <= 16 B per listed number",
            per_number <= MAX_REDIS_BYTES_PER_NUMBER,
            f"{per_number:.1f} B{at}",
        )
        growth = s["loader_peak_rss_mib"] / s["loader_tenth_peak_rss_mib"]
        batch = s["loader_batch_size"]
        if n // 10 >= batch:
            self._target(
                "loader memory flat in the file size",
                growth <= MAX_LOADER_MEMORY_GROWTH,
                f"peak RSS x{growth:.2f} for 10x the numbers",
            )
        else:
            self._untested(
                "loader memory flat in the file size",
                f"the loader buffers up to loader.batch_size = {batch:,} numbers, so its memory "
                f"grows up to that size and is flat beyond: compare two files of at least "
                f"{batch:,} numbers with --numbers {10 * batch}",
            )

    def decision(self, rows: list[dict[str, Any]]) -> None:
        self.lines += ["", "Decision cost (bench policy, in-process, best of 15 rounds)"]
        self.lines.append(f"  {'listed numbers':>15} {'policy us':>10} {'lookup us':>10}")
        for row in rows:
            self.lines.append(
                f"  {row['listed']:>15,} {row['policy_us']:>10.2f} {row['lookup_us']:>10.3f}"
            )
        if len(rows) >= 2:
            first, last = rows[0], rows[-1]
            growth = last["policy_us"] / first["policy_us"]
            self._target(
                "decision cost flat",
                growth <= MAX_DECISION_GROWTH,
                f"x{growth:.2f} from {first['listed']:,} to {last['listed']:,} numbers "
                f"({first['policy_us']:.2f} -> {last['policy_us']:.2f} us)",
            )

    def http(self, h: dict[str, Any]) -> None:
        args = self.args
        runs = h["runs"]
        self.lines += [
            "",
            f"HTTP ({h['tool']}, {args.connections} connections, {args.workers} worker(s) each, "
            f"{args.rounds} x {args.duration} s per server, rounds alternating)",
            f"  {'':10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}",
        ]
        summary = {}
        for name in ("baseline", "service"):
            results = runs[name]
            summary[name] = {
                "rps": mean(r["rps"] for r in results),
                "p50": mean(r["p50_ms"] for r in results),
                "p99": mean(r["p99_ms"] for r in results),
                "errors": sum(r["errors"] for r in results),
            }
            s = summary[name]
            self.lines.append(
                f"  {name:10} {s['rps']:>10,.0f} {s['p50']:>8.2f} {s['p99']:>8.2f}"
                f" {s['errors']:>7}   (means over the rounds)"
            )
        # Each service round ran right after a baseline round: the ratio of each pair
        # cancels slow changes in machine load, and the median drops the odd bad pair.
        pairs = _rps_pairs(runs["service"], runs["baseline"])
        ratio = median(pairs)
        self.lines.append(
            f"  ratio service/baseline: {ratio:.3f} (median of the paired rounds: {_listed(pairs)})"
        )
        if runs.get("service_public"):
            public_pairs = _rps_pairs(runs["service_public"], runs["service"])
            public_rps = mean(r["rps"] for r in runs["service_public"])
            self.lines.append(
                f"  public API mode (no aiohttp internals): {public_rps:,.0f} req/s; ratio"
                f" public/internals: {median(public_pairs):.3f} (median of the paired rounds: "
                f"{_listed(public_pairs)})"
            )
        if runs.get("service_no_history"):
            off_pairs = _rps_pairs(runs["service"], runs["service_no_history"])
            off_rps = mean(r["rps"] for r in runs["service_no_history"])
            self.lines.append(
                f"  history off: {off_rps:,.0f} req/s; ratio history on/off:"
                f" {median(off_pairs):.3f} (median of the paired rounds: {_listed(off_pairs)})"
            )
        cpu = h.get("cpu_us_per_request") or {}
        if cpu:
            self.lines.append(
                "  CPU per request (the server's processes and Redis), median of the rounds: "
                + ", ".join(f"{name} {median(values):.1f} us" for name, values in cpu.items())
            )
        if cpu.get("service_no_history"):
            cpu_pairs = [
                on / off for on, off in zip(cpu["service"], cpu["service_no_history"], strict=True)
            ]
            self.lines.append(
                f"  CPU per request, history on/off: {median(cpu_pairs):.3f} (paired rounds: "
                f"{_listed(cpu_pairs)})"
            )
        self.lines += _commands_per_call(h)
        answers = h["answers"]
        self.lines.append(
            f"  answers checked: {answers['checked']}, wrong: {answers['wrong']}; "
            f"rejects counted under load: {_share(h['reject_share_counted'])} "
            f"(bodies blocked: {_share(h['reject_share_expected'])})"
        )
        self._target(
            "throughput >= 0.8x baseline",
            ratio >= MIN_THROUGHPUT_RATIO,
            f"{ratio:.3f}x ({summary['service']['rps']:,.0f} vs "
            f"{summary['baseline']['rps']:,.0f} req/s)",
        )
        paced = h.get("paced") or {}
        if paced:
            self.lines.append(
                f"  paced, {args.connections} connections at ~{args.pace:.0%} of the baseline's "
                "full rate (latency without queueing):"
            )
            for name in ("baseline", "service", "service_no_history"):
                if name not in paced:
                    continue
                r = paced[name]
                self.lines.append(
                    f"  {name:10} {r['rps']:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                    f" {r['errors']:>7}"
                )
        saturated_p99 = summary["service"]["p99"]
        if paced:
            p99 = paced["service"]["p99_ms"]
            self._target(
                "p99 <= 5 ms",
                p99 <= MAX_P99_MS,
                f"{p99:.2f} ms paced; {saturated_p99:.2f} ms at full speed, where 32 waiting "
                f"connections queue ({args.connections} / {summary['service']['rps']:,.0f} req/s"
                f" = {args.connections / summary['service']['rps'] * 1000:.1f} ms mean wait)",
            )
        else:
            self._target("p99 <= 5 ms", saturated_p99 <= MAX_P99_MS, f"{saturated_p99:.2f} ms")
        self._target(
            "sampled answers right", answers["wrong"] == 0, f"{answers['checked']} checked"
        )

    def subscribers(self, s: dict[str, Any]) -> None:
        """The per-subscriber list (bench/subscribers.py): sync, memory, serving."""
        args = self.args
        encodings = ", ".join(f"{n:,} {name}" for name, n in sorted(s["encodings"].items()))
        self.lines += [
            "",
            f"Per-subscriber list ({s['subscribers']:,} subscribers, {s['pairs']:,} pairs; "
            f"{s['subscribers_per_bucket']:.1f} subscribers a bucket)",
            f"  loader full sync (whole process)        {s['loader_s']:8.2f} s"
            f"   ({s['loader_pairs_per_s']:,.0f} pairs/s; peak RSS "
            f"{s['loader_peak_rss_mib']:.0f} MiB)",
            f"  Redis memory, MEMORY USAGE of buckets   {s['bytes_per_pair']:8.1f} B/pair"
            f"   (markers {s['marker_bytes_per_pair']:.2f} B/pair of it; "
            f"used_memory grew {s['used_memory_per_pair']:.1f} B/pair)",
            f"  bucket encodings: {encodings}",
        ]
        if "sync_peak_x" in s:
            self.lines.append(
                f"  Redis peak during the sync: {s['sync_peak_x']:.2f}x the list; during a "
                f"second sync adding one pair: {s['resync_peak_x']:.2f}x"
            )
        if "one_percent_peak_x" in s:
            self.lines.append(
                f"  a sync taking one entry off 1 % of the subscribers: {s['one_percent_s']:.2f} "
                f"s, Redis growing {s['one_percent_peak_x']:.2f}x the list meanwhile"
            )
        if "half_peak_x" in s:
            self.lines.append(
                f"  a sync taking one entry off every second subscriber: {s['half_s']:.2f} s "
                f"in {s['half_steps']} step(s), Redis growing {s['half_peak_x']:.2f}x the list"
            )
            self._target(
                "subscriber sync, Redis <= 1.5x the list",
                1 + s["half_peak_x"] <= 1.5,
                f"{1 + s['half_peak_x']:.2f}x during a change of most buckets",
            )
        if "same_pairs_s" in s:
            self.lines.append(
                f"  sync adding one pair {s['resync_s']:.2f} s; a rewritten file with the same "
                f"pairs {s['same_pairs_s']:.2f} s, Redis growing {s['same_pairs_peak_x']:.2f}x "
                "the list meanwhile"
            )
        dense = s.get("dense")
        if dense:
            self.lines.append(
                f"  at the 10 M-subscriber density ({dense['subscribers_per_bucket']} a bucket, "
                f"{dense['encoding']}, built aside): {dense['bytes_per_pair']:.1f} B/pair "
                f"(markers {dense['marker_bytes_per_pair']:.3f}), "
                f"{dense['gb_for_100m_pairs']:.2f} GB for 100 M pairs"
            )
        h = s.get("http")
        if not h:
            return
        runs = h["runs"]
        self.lines += [
            f"  HTTP ({h['tool']}, {args.connections} connections, {args.workers} worker(s), "
            f"{args.subscriber_rounds} x {args.duration} s per trunk group, rounds alternating,"
            " one service)",
            f"  {'policy':30} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}",
        ]
        labels = {
            "baseline": "bare aiohttp",
            "local": "local lists only",
            "subscribers": "subscriber + call rate",
            "entries": "subscriber entries only",
            "rate": "local lists + call rate",
        }
        for name, label in labels.items():
            results = runs.get(name)
            if not results:
                continue
            self.lines.append(
                f"  {label:30} {mean(r['rps'] for r in results):>10,.0f}"
                f" {mean(r['p50_ms'] for r in results):>8.2f}"
                f" {mean(r['p99_ms'] for r in results):>8.2f}"
                f" {sum(r['errors'] for r in results):>7}"
            )
        paced = h.get("paced") or {}
        for name, r in paced.items():
            self.lines.append(
                f"  {labels[name] + ', paced':30} {r['rps']:>10,.0f} {r['p50_ms']:>8.2f}"
                f" {r['p99_ms']:>8.2f} {r['errors']:>7}"
            )
        cache = h.get("cache") or {}
        looked = sum(cache.values())
        hits = f"{cache.get('hit', 0) / looked:.1%}" if looked else "-"
        zipf = h.get("zipf", 0)
        self.lines.append(
            f"  called subscribers {'Zipf ' + format(zipf, 'g') if zipf else 'uniform'}; "
            f"entries cache hits {hits}"
        )
        # Runs saved before the bare rounds were added compare with the local lists.
        bottom = "baseline" if runs.get("baseline") else "local"
        ratios: dict[str, float] = {}
        for name in ("local", "subscribers", "entries", "rate"):
            if name == bottom or not runs.get(name):
                continue
            pairs = _rps_pairs(runs[name], runs[bottom])
            ratios[name] = median(pairs)
            self.lines.append(
                f"  ratio {labels[name]} / {labels[bottom]}: {ratios[name]:.3f} "
                f"(paired rounds: {_listed(pairs)})"
            )
        if bottom == "baseline":
            self._subscriber_targets(ratios, runs, zipf)
        redis_ms = h["redis_mean_ms"]
        on_error = h["on_error"]
        self.lines.append(
            f"  Redis round trips: {h['redis_round_trips']:,.0f} for {h['calls']:,.0f} calls "
            "to the subscriber trunk group"
            + (
                f" (mean {redis_ms:.2f} ms, waiting for the event loop included)"
                if redis_ms is not None
                else ""
            )
        )
        self.lines += _commands_per_call(h)
        answers = h["answers"]
        self.lines.append(
            f"  answers checked: {answers['checked']}, wrong: {answers['wrong']}; "
            f"rejects counted under load: {_share(h['reject_share_counted'])} "
            f"(bodies blocked: {_share(h['reject_share_expected'])}); on_error answers: "
            + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(on_error.items())) or "none")
        )
        self._target(
            "subscriber answers right", answers["wrong"] == 0, f"{answers['checked']} checked"
        )
        self._target(
            "subscriber calls decided within the deadline",
            not on_error,
            "no on_error answer under load"
            if not on_error
            else ", ".join(f"{k} {v:,.0f}" for k, v in sorted(on_error.items())),
        )

    def _subscriber_targets(
        self, ratios: dict[str, float], runs: dict[str, Any], zipf: float
    ) -> None:
        """Issue 19's goals: each Redis-backed policy against bare aiohttp in the same
        rounds, and the p99 of the subscriber policy with a rate at full speed."""
        if "entries" in ratios:
            goal = MIN_SUBSCRIBER_ZIPF_RATIO if zipf else MIN_SUBSCRIBER_RATIO
            how = f"Zipf {zipf:g}" if zipf else "uniform"
            self._target(
                f"subscriber policy ({how}) >= {goal}x bare aiohttp",
                ratios["entries"] >= goal,
                f"{ratios['entries']:.3f}",
            )
        if "rate" in ratios:
            self._target(
                f"call-rate policy >= {MIN_CALL_RATE_RATIO}x bare aiohttp",
                ratios["rate"] >= MIN_CALL_RATE_RATIO,
                f"{ratios['rate']:.3f}",
            )
        if runs.get("subscribers"):
            p99 = max(r["p99_ms"] for r in runs["subscribers"])
            self._target(
                f"subscriber + call rate p99 <= {MAX_P99_MS:g} ms at full speed",
                p99 <= MAX_P99_MS,
                f"{p99:.2f} ms (worst round)",
            )

    def fraud(self, f: dict[str, Any], lines: list[str]) -> None:
        """The fraud policy (bench/fraud.py): its ratio to bare aiohttp, its Redis keys."""
        self.lines += lines
        ratio = f["ratio"]
        if ratio is not None:
            self._target(
                f"fraud policy >= {MIN_FRAUD_RATIO}x bare aiohttp",
                ratio >= MIN_FRAUD_RATIO,
                f"{ratio:.3f}",
            )
        untimed = sum(m["without_ttl"] for m in f["memory"].values())
        self._target("fraud keys expire", untimed == 0, f"{untimed} sampled keys without a TTL")

    def stir(self, s: dict[str, Any]) -> None:
        """Signed calls (bench/stir.py): rates against the baseline."""
        from bench.stir import summary

        lines, ratios = summary(s, self.args)
        self.lines += lines
        ratio = ratios.get("stir")
        if ratio is not None:
            self._target(
                f"every call verified >= {MIN_STIR_RATIO}x baseline",
                ratio >= MIN_STIR_RATIO,
                f"{ratio:.3f}x",
            )
        wrong = sum(a["wrong"] for a in s["answers"].values())
        self._target("signed calls answered right", wrong == 0, f"{wrong} wrong")
        misses = s.get("misses")
        if misses:
            # A call waits for a missing certificate half its deadline at most. Judged by
            # the service's own count of late answers (from each request's arrival);
            # wrk's latency also holds the time a request waited to be read.
            late = misses["late_answers"]
            self._target(
                "certificate misses answered within handler.deadline_ms",
                late == 0 and not misses["errors"],
                f"{late:,.0f} late of {misses['requests']:,} (wrk: p99 {misses['p99_ms']:.1f} "
                f"ms, max {misses['max_ms']:.1f} ms against {s['deadline_ms']} ms), "
                f"{misses['errors']} errors",
            )

    def print(self) -> None:
        print("\n".join(["", *self.lines, "", "Targets", *self._target_lines]))


def _rps_pairs(tops: list[dict[str, Any]], bottoms: list[dict[str, Any]]) -> list[float]:
    """Each round's throughput of ``tops`` over the round of ``bottoms`` run beside it."""
    return [top["rps"] / bottom["rps"] for top, bottom in zip(tops, bottoms, strict=True)]


def _commands_per_call(h: dict[str, Any]) -> list[str]:
    """The line of Redis commands per call by policy, if the part counted them."""
    per_call = h.get("commands_per_call")
    if not per_call:
        return []
    counts = ", ".join(f"{name} {count:.2f}" for name, count in per_call.items())
    return [f"  Redis commands per call (all of Redis's, list polls included): {counts}"]


def _listed(pairs: list[float]) -> str:
    return ", ".join(f"{p:.2f}" for p in pairs)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
