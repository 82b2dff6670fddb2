"""A short soak run: load through Redis pauses, restarts and list swaps, judged by its report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def test_short_soak_has_no_5xx_no_wrong_answers_and_sees_every_fault() -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "devtools.soak", "--json",
            "--duration", "4", "--connections", "4",
            "--fault-every", "1.2", "--fault-length", "0.6", "--swap-every", "0.5",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["sent"] > 100
    assert report["answered"] == report["sent"]
    assert report["status_5xx"] == 0
    assert report["wrong"] == 0
    assert report["unanswered"] == 0
    # The faults happened and were answered by on_error, and the loader swapped lists.
    assert report["redis_pauses"] >= 1
    assert report["redis_restarts"] >= 1
    assert report["on_error"] > 0
    assert report["swaps_ok"] >= 1
    # Answers beat the trunk group's timeout (loose: a shared CI core may stall).
    assert report["within_trunk_timeout"] >= 0.9 * report["answered"]
