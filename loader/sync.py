"""One full sync of one list: read the source, normalise, build aside, swap.

Rows that do not normalise are skipped and reported with their line numbers; the rest
of the list still loads. The swap is atomic (see :mod:`core.build`): readers see the
old list until the new one is complete, and a failed sync changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from core.build import BuildResult, start_build
from core.config import Config, ListSpec
from core.entries import BadEntry, canonical
from core.store import RedisClient
from loader.sources import SourceError, read_rows

logger = logging.getLogger(__name__)
#: Bad rows reported one by one; the rest are only counted.
MAX_REPORTED_BAD_ROWS = 20


class SyncError(Exception):
    """A sync that could not run; the old list is untouched."""


@dataclass(slots=True)
class SyncReport:
    name: str
    source: str
    rows_read: int = 0
    rows_rejected: int = 0
    bad_rows: list[str] = field(default_factory=list)
    result: BuildResult | None = None
    version: int | None = None

    def summary(self) -> str:
        if self.result is None:
            return f"{self.name}: nothing loaded"
        r = self.result
        return (
            f"{self.name}: {r.size} entries from {self.source} "
            f"({self.rows_read} rows read, {self.rows_rejected} rejected; "
            f"+{r.added} -{r.removed}); version {self.version}"
        )


async def sync_list(redis: RedisClient, config: Config, name: str) -> SyncReport:
    """Replace list ``name`` with the contents of its configured source."""
    spec: ListSpec = config.lists[name]
    if spec.source is None:
        raise SyncError(f"{name}: no source configured (the list is kept by the admin API)")
    source = config.resolve_source(spec.source)
    if "://" in source:
        raise SyncError(f"{name}: only local files are supported as sources: {source}")
    report = SyncReport(name, source)
    default_country = config.caller.default_country
    builder = await start_build(redis, name, spec.kind, batch_size=config.loader.batch_size)
    batch: list[str] = []
    try:
        rows = read_rows(
            source, spec.column, spec.label_columns, detect_header=spec.kind != "names"
        )
        for row in rows:
            report.rows_read += 1
            try:
                batch.append(canonical(spec.kind, row.value, default_country))
            except BadEntry as exc:
                report.rows_rejected += 1
                if len(report.bad_rows) < MAX_REPORTED_BAD_ROWS:
                    report.bad_rows.append(f"{source}:{row.line}: {exc}")
            if len(batch) >= config.loader.batch_size:
                await builder.add(batch)
                batch = []
        await builder.add(batch)
        report.result = await builder.finish()
        report.version = await builder.commit(
            {
                "source": source,
                "rows_read": report.rows_read,
                "rows_rejected": report.rows_rejected,
            }
        )
    except SourceError as exc:
        await builder.abort()
        raise SyncError(f"{name}: {exc}") from None
    except BaseException:
        await builder.abort()
        raise
    return report
