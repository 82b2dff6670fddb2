"""Moving to new code without a gap: SIGUSR2 starts a successor supervisor.

The pattern of nginx and gunicorn: on SIGUSR2 the running supervisor starts
``python -m service`` again, with its own arguments plus ``--upgrade-from <its pid>``,
in a session of its own (so it outlives the old one). The successor imports the code
installed now, binds the same ports beside the old supervisor (``SO_REUSEPORT``; the
exclusive check is skipped on purpose), and starts its workers. Once every one of them
listens it sends the old supervisor SIGTERM, which drains and stops the old workers as
on any stop. Until then both sets of workers answer; if the successor fails, it exits
and the old supervisor goes on serving, with the failure in its log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def start_successor(
    running: subprocess.Popen[bytes] | None,
    own_argv: Sequence[str],
    host: str,
    port: int,
    operator: tuple[str, int] | None,
) -> subprocess.Popen[bytes] | None:
    """Start the successor supervisor, unless one started earlier still runs."""
    if running is not None and running.poll() is None:
        logger.warning("SIGUSR2: an upgrade is under way already (pid %d)", running.pid)
        return running
    # The actual ports, which matter when the config asked for any free one (0).
    argv = [
        sys.executable, "-m", "service", *own_argv, "--host", host, "--port", str(port),
        "--upgrade-from", str(os.getpid()),
    ]  # fmt: skip
    if operator is not None:
        argv += ["--admin-host", operator[0], "--admin-port", str(operator[1])]
    successor = subprocess.Popen(argv, start_new_session=True)
    logger.info("SIGUSR2: started the new supervisor, pid %d", successor.pid)
    return successor


def watch_successor(successor: subprocess.Popen[bytes] | None) -> subprocess.Popen[bytes] | None:
    """The successor while it runs; None (and the failure logged) once it exited."""
    if successor is None or successor.poll() is None:
        return successor
    logger.error(
        "upgrade failed: the new supervisor (pid %d) exited with status %s; still serving",
        successor.pid, successor.returncode,
    )  # fmt: skip
    return None
