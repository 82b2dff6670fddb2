"""Starting and stopping the processes under test: the service and the baseline.

Each runs in its own session (process group), so stopping it reaches every worker it
forked; its output goes to a log file in the bench folder, never to a pipe that could
fill up and stall it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


class Server:
    """A child process serving HTTP on 127.0.0.1:``port``; use as a context manager."""

    def __init__(
        self,
        name: str,
        *,
        command: list[str],
        port: int,
        log: Path,
        ready_path: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.log = log
        self.ready_path = ready_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> Server:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited on start (see {self.log}):\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.1)
        return self

    def cpu_s(self) -> float:
        """CPU seconds (user and system) used so far by the processes of its session:
        the supervisor and every worker it forked (Linux /proc; 0 elsewhere)."""
        if self.process is None:
            return 0.0
        return session_cpu_s(self.process.pid)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        else:
            # The leader is gone; make sure no worker of its group lingers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def session_cpu_s(session: int) -> float:
    """User and system CPU seconds of the live processes whose session id is ``session``."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces: split after its ")".
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session:  # fields[0] is field 3 of proc(5): state
            total += int(fields[11]) + int(fields[12])
    return total / tick


def service_supports_workers() -> bool:
    """Whether ``python -m service`` takes ``--workers`` (multi-worker serving)."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--workers" in done.stdout


def service(config: Path, port: int, workers: int, log: Path, env: dict[str, str]) -> Server:
    command = [sys.executable, "-m", "service", "--config", str(config), "--port", str(port)]
    if service_supports_workers():
        command += ["--workers", str(workers)]
    elif workers > 1:
        raise RuntimeError("python -m service has no --workers option yet: use --workers 1")
    return Server("service", command=command, port=port, log=log, ready_path="/readyz", env=env)


def baseline(port: int, workers: int, log: Path) -> Server:
    command = [
        sys.executable, "-m", "bench.baseline", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    return Server("baseline", command=command, port=port, log=log, ready_path="/healthz")
