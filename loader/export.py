"""``python -m loader export`` and snapshots: a list written to a CSV file.

The text comes from :func:`core.export.export_csv` (the admin route's too), so a file
written here restores through the normal guarded sync:
``python -m loader sync --list NAME --from FILE``. A file is written aside and renamed
into place only once complete, so a reader (a restore, a self-healing loader) never
sees half an export.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from core.config import Config
from core.export import END_MARK, export_csv
from core.store import RedisClient


async def export_list(redis: RedisClient, config: Config, name: str, out: Path | None) -> int:
    """Write list ``name`` as CSV to ``out`` (stdout when None); return its entry count."""
    kind = config.lists[name].kind
    last = ""
    if out is None:
        async for text in export_csv(redis, name, kind):
            sys.stdout.write(text)
            last = text
        sys.stdout.flush()
        return _count(last)
    folder = out.parent if str(out.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            async for text in export_csv(redis, name, kind):
                handle.write(text)
                last = text
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return _count(last)


def _count(last: str) -> int:
    """The entry count the export's end line states."""
    return int(last[len(END_MARK) :].split(" ", 1)[0])


def snapshot_path(config: Config, name: str) -> Path | None:
    """Where ``loader run`` keeps the latest snapshot of ``name`` (None: snapshots off)."""
    folder = config.loader.snapshot_dir
    if folder is None:
        return None
    return Path(config.resolve_source(folder)) / f"{name}.csv"
