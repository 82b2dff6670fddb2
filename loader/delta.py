"""Incremental changes from delta files, and compaction of accumulated changes.

A delta file (docs/loader.md, "Delta files") holds ``+entry``/``-entry`` lines; entries
are canonicalised (:func:`core.entries.canonical`), bad lines skipped and reported by
line number, and changes applied ``batch_size`` per MULTI/EXEC in file order (the last
line for an entry wins). When ``adds``/``dels`` grow past ``loader.compact_over``,
:func:`compact_list` folds them into a new base swapped in like a full sync.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import keys
from core.build import ListLocked, NumberListBuilder, SwapConflict, start_build
from core.config import Config
from core.entries import BadEntry, canonical
from core.store import BUCKETS_PER_READ, ListStore, RedisClient
from loader.progress import make_progress
from loader.sources import Rows, SourceError, open_local
from loader.sync import MAX_REPORTED_BAD_ROWS, SyncError

logger = logging.getLogger(__name__)
#: Entries per MULTI/EXEC when applying a delta file.
DELTA_BATCH = 10_000


@dataclass(slots=True)
class DeltaReport:
    name: str
    path: str
    lines: int = 0
    added: int = 0
    removed: int = 0
    rejected: int = 0
    bad_lines: list[str] = field(default_factory=list)
    version: int | None = None
    compacted: bool = False

    def summary(self) -> str:
        version = f"version {self.version}" if self.version is not None else "nothing changed"
        folded = "; changes compacted into a new base" if self.compacted else ""
        return (
            f"{self.name}: applied {self.path}: +{self.added} -{self.removed} "
            f"({self.lines} changes read, {self.rejected} rejected); {version}{folded}"
        )


async def apply_delta(
    redis: RedisClient,
    config: Config,
    name: str,
    path: str | Path,
    *,
    batch_size: int = DELTA_BATCH,
    progress: str = "auto",
) -> DeltaReport:
    """Apply a delta file to list ``name``; see the module doc for the format."""
    spec = config.lists[name]
    if spec.kind == "subscribers":
        raise SyncError(f"{name}: delta files do not apply to a subscribers list; sync it")
    store = ListStore(redis)
    country = config.caller.default_country
    report = DeltaReport(name, str(path))
    pending: dict[str, bool] = {}  # entry -> add (True) or remove (False)

    async def flush() -> None:
        if pending:
            adds = [e for e, add in pending.items() if add]
            removes = [e for e, add in pending.items() if not add]
            report.version = await store.change(name, spec.kind, add=adds, remove=removes)
            report.added += len(adds)
            report.removed += len(removes)
            pending.clear()

    try:
        with open_local(path) as raw, Rows(raw, "text", where=str(path)) as rows:
            shown = make_progress(name, rows.total_bytes, progress)
            try:
                for line, value in rows:
                    report.lines += 1
                    sign, entry = value[0], value[1:]
                    try:
                        if sign not in "+-":
                            raise BadEntry("a change starts with '+' (add) or '-' (remove)")
                        pending[canonical(spec.kind, entry.strip(), country)] = sign == "+"
                    except BadEntry as exc:
                        report.rejected += 1
                        if len(report.bad_lines) < MAX_REPORTED_BAD_ROWS:
                            report.bad_lines.append(f"{path}:{line}: {exc}")
                    if len(pending) >= batch_size:
                        await flush()
                        shown.update(rows.position(), report.lines)
                await flush()
            finally:
                shown.close()
    except SourceError as exc:
        raise SyncError(f"{name}: {exc}") from None
    if config.loader.compact_over and report.version is not None:
        report.compacted = await compact_if_needed(redis, config, name)
    return report


async def compact_if_needed(redis: RedisClient, config: Config, name: str) -> bool:
    """Compact ``name`` if its pending changes exceed ``loader.compact_over``."""
    meta = await ListStore(redis).meta(name)
    threshold = config.loader.compact_over
    if not threshold or meta is None or meta.pending_adds + meta.pending_dels <= threshold:
        return False
    try:
        await compact_list(redis, config, name)
    except (ListLocked, SwapConflict) as exc:
        logger.info("%s: compaction put off (%s)", name, exc)
        return False
    return True


async def compact_list(redis: RedisClient, config: Config, name: str) -> int | None:
    """Fold the list's pending changes into a new base; return the version (None: nothing).

    Raises :class:`core.build.SwapConflict` when a change arrived meanwhile (nothing is
    lost: the compaction is dropped and can simply run again) and
    :class:`core.build.ListLocked` while a sync of the list runs.
    """
    spec = config.lists[name]
    store = ListStore(redis)
    deltas = await store.deltas(name)
    if not deltas.adds and not deltas.dels:
        return None
    builder = await start_build(
        redis,
        name,
        spec.kind,
        batch_size=config.loader.batch_size,
        lock_ttl_s=config.loader.lock_ttl_s,
    )
    try:
        if builder.old_gen != deltas.gen:
            raise SwapConflict(f"list {name!r} was replaced while compaction started")
        if isinstance(builder, NumberListBuilder):
            await _copy_numbers(redis, builder, deltas.gen, deltas.adds, deltas.dels)
        else:
            base = await store.set_base(name, deltas.gen)
            await builder.add(sorted((base - deltas.dels) | deltas.adds))
        result = await builder.finish()
        version = await builder.commit({}, expect_version=deltas.version, compaction=True)
    except BaseException:
        await builder.abort()
        raise
    logger.info(
        "%s: compacted %d pending changes into a base of %d entries; version %d",
        name,
        len(deltas.adds) + len(deltas.dels),
        result.size,
        version,
    )
    return version


def _numbers(entries: frozenset[str]) -> np.ndarray[Any, Any]:
    return np.array(sorted(int(e) for e in entries if e.isdigit()), dtype=np.uint64)


async def _copy_numbers(
    redis: RedisClient,
    builder: NumberListBuilder,
    gen: int,
    adds: frozenset[str],
    dels: frozenset[str],
) -> None:
    """Stream the live base into the builder, a group of buckets at a time, minus dels."""
    removed = _numbers(dels)
    if gen:
        base = keys.base(builder.name, gen)
        for first in range(0, keys.NUMBER_BUCKETS, BUCKETS_PER_READ):
            ids = list(range(first, min(first + BUCKETS_PER_READ, keys.NUMBER_BUCKETS)))
            blobs = await redis.hmget(base, ids)
            parts = [np.frombuffer(b, dtype="<u8") for b in blobs if isinstance(b, bytes) and b]
            if parts:
                numbers = np.concatenate(parts)
                if removed.size:
                    numbers = numbers[~np.isin(numbers, removed)]
                await builder.add_ints(numbers)
    await builder.add_ints(_numbers(adds))
