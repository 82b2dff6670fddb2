"""The project's version, as installed (``pyproject.toml``), for ``--version`` and metrics."""

from __future__ import annotations

import platform
from importlib import metadata


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


VERSION = _installed("callscreen")


def build_labels() -> dict[str, str]:
    """What ``callscreen_build_info`` says: this version and the runtime under it."""
    return {
        "version": VERSION,
        "python": platform.python_version(),
        "aiohttp": _installed("aiohttp"),
        "redis_py": _installed("redis"),
    }
