"""Redis-side figures: the loader against ``redis-cli --pipe``, its memory, bytes per number.

``redis-cli --pipe`` is Redis's own mass-insertion path, so it is the yardstick for the
loader: the same numbers, each as one ``SADD`` into a plain set (the layout the compact
one replaces), against a full sync by the real loader (``python -m loader ... sync``),
timed as the whole process an operator runs, start-up included.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from devtools.redis_server import find_binary

PLAIN_SET_KEY = "bench:plain-set"


@dataclass(frozen=True, slots=True)
class Timed:
    seconds: float
    #: Peak resident memory of the child process (bytes); 0 when not measured.
    peak_rss_bytes: int = 0


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


class PeakMemory:
    """Redis's highest ``used_memory`` while the ``with`` block runs, polled every
    ``every_s`` from a thread of its own (``used_memory_peak`` cannot be reset)."""

    def __init__(self, port: int, every_s: float = 0.05) -> None:
        self.client = redis.Redis(port=port)
        self.every_s = every_s
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="redis-peak", daemon=True)

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = used_memory(self.client)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_memory(self.client))
        self.client.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, used_memory(self.client))


def commands_run(client: redis.Redis) -> int:
    """Commands Redis ran since its statistics were last reset (``CONFIG RESETSTAT``),
    but for the bench's own ``INFO`` and ``CONFIG``."""
    stats = client.info("commandstats")
    own = ("cmdstat_info", "cmdstat_config")
    return sum(int(s["calls"]) for name, s in stats.items() if not name.startswith(own))


def commands_per_call(client: redis.Redis, drive: Callable[[], Any]) -> tuple[Any, int]:
    """``drive()``'s result, and the commands Redis ran meanwhile (statistics reset)."""
    client.config_resetstat()
    result = drive()
    return result, commands_run(client)


def write_sadd_commands(numbers: np.ndarray[Any, Any], key: str, path: Path) -> Path:
    """The RESP protocol for one ``SADD key number`` per number (redis-cli --pipe input)."""
    head = f"*3\r\n$4\r\nSADD\r\n${len(key)}\r\n{key}\r\n"
    with path.open("w", encoding="ascii", newline="") as out:
        for start in range(0, numbers.size, 1_000_000):
            part = map(str, numbers[start : start + 1_000_000].tolist())
            out.write("".join(f"{head}${len(n)}\r\n{n}\r\n" for n in part))
    return path


def redis_cli_pipe(port: int, commands: Path) -> Timed:
    """Time ``redis-cli --pipe < commands``; raises if any command failed."""
    cli = find_binary("redis-cli")
    with commands.open("rb") as feed:
        started = time.perf_counter()
        done = subprocess.run(
            [cli, "-p", str(port), "--pipe"],
            stdin=feed,
            check=False,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
    if done.returncode != 0 or "errors: 0" not in done.stdout:
        raise RuntimeError(f"redis-cli --pipe failed:\n{done.stdout}{done.stderr}")
    return Timed(elapsed)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(command: list[str], env: dict[str, str], log: Path) -> Timed:
    """Run a child to completion; its wall time and peak RSS.

    The peak is polled from /proc rather than taken from the child's rusage: a child
    forked from this (large) process starts out sharing its memory, and rusage would
    report that.
    """
    peak = 0
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            peak = max(peak, _peak_rss(process.pid))
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[2:]} failed with status {process.returncode}:\n{tail}")
    return Timed(elapsed, peak)


def loader_sync(config: Path, list_name: str, env: dict[str, str], log: Path) -> Timed:
    command = [sys.executable, "-m", "loader", "--config", str(config), "sync", "--list", list_name]
    return run_child(command, env, log)
