"""What the figures were measured on: cores, CPU model, memory, Python, Redis."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from devtools.redis_server import find_binary


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _redis_version() -> str:
    done = subprocess.run([find_binary(), "--version"], check=False, capture_output=True, text=True)
    for word in done.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return done.stdout.strip() or "unknown"


def describe() -> dict[str, str]:
    load = os.getloadavg()
    return {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{_memory_gib():.1f} GiB",
        "python": platform.python_version(),
        "redis": _redis_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }
