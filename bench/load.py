"""Driving HTTP load: wrk with a Lua script that rotates the bodies, else a Python client.

wrk is the load generator of record (it costs little CPU per request, which matters
when it shares the machine with the servers). Each wrk thread pre-formats every request
once, starts at a different offset and then takes the bodies in turn, so each run sends
every body about equally often. Without wrk the fallback is an aiohttp client; it is
much slower than wrk and its figures are not comparable with wrk's, which the report says.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

_RESULT_MARK = "BENCH_RESULT "

_LUA = """\
-- Written by bench/load.py: rotate through the request bodies, one per line.
local bodies_path = %(bodies)s
local path = %(path)s
local threads = 0
local requests = {}
local count = 0
local next_index = 0

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

function init(args)
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(bodies_path) do
    if #line > 0 then
      count = count + 1
      requests[count] = wrk.format("POST", path, headers, line)
    end
  end
  next_index = (thread_id * 7919) %% count
end

function request()
  next_index = next_index %% count + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d,'
    .. '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

#: Added for a paced run: each connection waits after an answer, on average
#: ``delay_ms``, so the load is a moderate rate rather than as fast as the server goes.
#: The wait is random (0 to twice the mean): with a fixed one the connections fall into
#: step and arrive in bursts of 32, and the last of each burst waits for the other 31.
_LUA_DELAY = """
function delay()
  return math.random(0, %(twice_delay_ms)d)
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    tool: str
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Requests that failed: connection errors, timeouts, non-2xx answers.
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def summary(self, errors: bool = True) -> str:
        """The line printed after a run: rate, p50, p99 (and errors)."""
        line = f"{self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"
        return f"{line}, errors {self.errors}" if errors else line

    def as_json(self) -> dict[str, Any]:
        """The fields and the rate, for ``--json``."""
        return asdict(self) | {"rps": self.rps}


def pace_delay_ms(connections: int, rate: float) -> int:
    """The pause each of ``connections`` makes between requests for ``rate`` in all."""
    return max(1, round(connections * 1000 / rate))


def runs_json(runs: dict[str, list[LoadResult]], paced: dict[str, LoadResult]) -> dict[str, Any]:
    """The ``runs`` and ``paced`` entries of a ``--json`` report."""
    return {
        "runs": {name: [r.as_json() for r in results] for name, results in runs.items()},
        "paced": {name: r.as_json() for name, r in paced.items()},
    }


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_wrk_script(folder: Path, bodies: Path, path: str, delay_ms: int = 0) -> Path:
    """The Lua script; ``delay_ms`` > 0 paces each connection (see :data:`_LUA_DELAY`)."""
    script = folder / (f"rotate_bodies_{delay_ms}ms.lua" if delay_ms else "rotate_bodies.lua")
    text = _LUA % {
        "bodies": _lua_string(str(bodies)),
        "path": _lua_string(path),
        "mark": _RESULT_MARK,
    }
    if delay_ms:
        text += _LUA_DELAY % {"twice_delay_ms": 2 * delay_ms}
    script.write_text(text)
    return script


def run_wrk(url: str, script: Path, duration_s: int, connections: int, threads: int) -> LoadResult:
    wrk = wrk_binary()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    command = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
        "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=duration_s + 120
    )
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            data = orjson.loads(line[len(_RESULT_MARK) :])
            errors = sum(data["errors"].values())
            return LoadResult(
                tool="wrk",
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                errors=int(errors),
            )
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}{done.stderr}")


async def _python_load(
    url: str, bodies: list[bytes], duration_s: float, connections: int
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status >= 300:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k * 7919) for k in range(connections)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return LoadResult(
        tool="python",
        requests=len(latencies),
        duration_s=elapsed,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
        errors=errors,
    )


def run_python(url: str, bodies: list[bytes], duration_s: float, connections: int) -> LoadResult:
    """The fallback load generator (no wrk): aiohttp, one task per connection."""
    return asyncio.run(_python_load(url, bodies, duration_s, connections))
