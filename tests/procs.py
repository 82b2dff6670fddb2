"""``python -m service`` as a real process, for the multi-worker and shutdown tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from devtools.redis_server import free_port
from tests.helpers import wait_for

#: Start-up imports take a few seconds on a busy 2-core machine.
START_TIMEOUT_S = 40.0

BLOCKLIST_CONFIG: dict[str, Any] = {
    # One port for everything, so tests reach /metrics and the admin API beside the
    # handler (the operator listener has tests of its own).
    "server": {"host": "127.0.0.1", "log_format": "json", "admin_port": None},
    "cache": {"refresh_ms": 100, "max_stale_ms": 2000},
    "lists": {"blocklist": {"kind": "numbers"}},
    "policies": {
        "default": {
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
}


class ServiceProcess:
    """One ``python -m service`` with its config and its stderr in ``folder``."""

    def __init__(
        self,
        folder: Path,
        redis_url: str,
        *,
        workers: int = 1,
        port: int | None = None,
        args: tuple[str, ...] = (),
        overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "service.log"
        self.redis_url = redis_url
        config = {**BLOCKLIST_CONFIG, "redis": {"url": redis_url}, **(overrides or {})}
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.args = ["--workers", str(workers), *args]
        #: Set on top of this process's environment (e.g. CALLSCREEN_ADMIN_TOKENS).
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        argv = [
            sys.executable, "-m", "service", "--config", str(self.config_path),
            "--port", str(self.port), *self.args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            environ = None if self.env is None else {**os.environ, **self.env}
            self.process = subprocess.Popen(argv, stderr=log, stdout=log, env=environ)
        return self

    async def ready(self, listeners: int | None = None) -> None:
        """Wait until ``listeners`` (default: all workers) listen and ``/readyz`` answers 200."""
        wanted = self.workers if listeners is None else listeners

        async def listening() -> bool:
            return self.log_text().count(" listening on http") >= wanted

        await wait_for(listening, timeout_s=START_TIMEOUT_S, interval_s=0.1)

        async def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.log_text()}")
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{self.url}/readyz") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(answers, timeout_s=START_TIMEOUT_S, interval_s=0.1)

    async def exited(self, timeout_s: float = 20.0) -> int:
        """Wait for the process to exit; its status."""
        assert self.process is not None
        process = self.process

        async def done() -> bool:
            return process.poll() is not None

        await wait_for(done, timeout_s=timeout_s, interval_s=0.05)
        assert process.returncode is not None
        return process.returncode

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        """Stop it if a test left it running: gracefully (so it cleans up), else kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """stderr as JSON lines; fails on any line that is not a JSON object."""
        records = []
        for line in self.log_text().splitlines():
            record = orjson.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
        return records


async def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}, e.g. ``'x_total{a="b"}': 3.0``."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
