"""The loader's command line as an operator meets it: version, log format, bad options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import yaml
from redis.asyncio import Redis

from core.version import VERSION
from devtools.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parent.parent


def _loader(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(tmp_path: Path, redis_url: str, log_format: str) -> Path:
    (tmp_path / "block.txt").write_text("5162065613\n5162065614\n")
    config = {
        "redis": {"url": redis_url},
        "server": {"log_format": log_format},
        "lists": {"blocklist": {"kind": "numbers", "source": "block.txt"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_version() -> None:
    done = _loader("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"callscreen {VERSION}"


async def test_the_loader_logs_json_lines_when_the_config_says_so(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    config = _config(tmp_path, redis_server.url, "json")
    done = _loader("--config", str(config), "--progress", "off", "sync")
    assert done.returncode == 0, done.stderr
    records = [orjson.loads(line) for line in done.stderr.splitlines() if line]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("synced blocklist" in r["message"] for r in records)
    # --log-format overrides the config.
    text = _loader("--config", str(config), "--log-format", "text", "--progress", "off", "sync")
    assert text.returncode == 0
    assert not text.stderr.lstrip().startswith("{")
    assert " INFO " in text.stderr


def test_a_bad_log_level_exits_2_with_the_reason(tmp_path: Path) -> None:
    config = _config(tmp_path, "redis://127.0.0.1:1/0", "text")
    done = _loader("--config", str(config), "--log-level", "LOUD", "sync")
    assert done.returncode == 2
    assert "bad --log-level" in done.stderr and "LOUD" in done.stderr
    assert "Traceback" not in done.stderr
