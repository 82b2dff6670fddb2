"""One full sync of one list: fetch, read, normalise, build aside, check, swap.

Bad rows are skipped and reported; the swap is atomic (:mod:`core.build`), so a failed,
refused or killed sync changes nothing. Outcomes: ``success``, ``unchanged``,
``dry_run``, or :class:`SyncRefused` (no valid entry, more than ``max_rejected_share``
of the rows rejected, or removing more than ``max_removal_share``; ``--force``
overrides) or :class:`SyncError` (unreadable source). A ``subscribers`` list is read
as ``subscriber,entry[,side]`` rows and counts pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

import aiohttp
import numpy as np

from core import keys
from core.audit import AuditLog, loader_record
from core.build import (
    BuildResult,
    ListBuilder,
    ListLocked,
    NumberListBuilder,
    SubscriberListBuilder,
    start_build,
)
from core.config import Config, ListSpec
from core.connect import redact
from core.entries import BadEntry, canonical
from core.numbers import normalise, undialable_reason
from core.redact import redact_text
from core.store import ListStore, RedisClient
from core.subscribers import (
    BadSubscriberEntry,
    canonical_entry,
    canonical_side,
    canonical_subscriber,
    code_of,
)
from loader.fetch import Fetched, FetchError, Validators, fetch
from loader.heal import missing_data
from loader.progress import Progress, make_progress
from loader.sources import Rows, SourceError, choose_format, open_local
from loader.unchanged import record, source_digest, unchanged

#: Bad rows reported one by one; the rest are only counted.
MAX_REPORTED_BAD_ROWS = 20
#: Rows between progress updates and event-loop yields (a power of two: a mask test).
_CHECK_MASK = (1 << 16) - 1
#: Entries per batch for prefixes and names lists.
SET_BATCH = 50_000
#: Distinct values counted per label column; the rest are "(other)".
MAX_LABEL_VALUES = 20


class SyncError(Exception):
    """A sync that could not run; the old list is untouched."""


class SyncRefused(SyncError):
    """A guard stopped the sync (empty source, too many removals); ``--force`` overrides."""


@dataclass(frozen=True, slots=True)
class SyncOptions:
    dry_run: bool = False
    force: bool = False
    #: ``auto`` (a bar on a terminal, log lines otherwise), ``log`` or ``off``.
    progress: str = "auto"
    #: Added/removed entries kept for the dry-run diff.
    sample: int = 5
    #: Read this file instead of the configured source: an export (CSV, the entry in
    #: column 0), for a restore or a heal from a snapshot. Lists without a source too.
    source: str | None = None
    #: Read and build even when the source looks unchanged (its validators or digest,
    #: loader/unchanged.py): the self-healing, which repairs what ``meta`` cannot show.
    rebuild: bool = False


@dataclass(slots=True)
class SyncReport:
    name: str
    source: str
    outcome: str = "failed"
    rows_read: int = 0
    rows_rejected: int = 0
    bad_rows: list[str] = field(default_factory=list)
    result: BuildResult | None = None
    version: int | None = None
    not_modified: bool = False
    #: Dry run: the message a real sync would be refused with, if any.
    refusal: str | None = None
    #: Per label column: how many accepted rows carried each value.
    labels: dict[str, Counter[str]] = field(default_factory=dict)
    duration_s: float = 0.0

    def reject(self, line: int, reason: str) -> None:
        self.rows_rejected += 1
        if len(self.bad_rows) < MAX_REPORTED_BAD_ROWS:
            self.bad_rows.append(f"{self.source}:{line}: {reason}")

    def summary(self) -> str:
        if self.not_modified:
            return f"{self.name}: unchanged, {self.source} not modified since the last sync"
        if self.result is None:
            return f"{self.name}: nothing loaded"
        r = self.result
        state = {"unchanged": "unchanged", "dry_run": "dry run, nothing written"}.get(
            self.outcome, f"version {self.version}"
        )
        return (
            f"{self.name}: {r.size} entries from {self.source} "
            f"({self.rows_read} rows read, {self.rows_rejected} rejected; "
            f"+{r.added} -{r.removed}); {state} in {self.duration_s:.1f} s"
        )

    def diff_lines(self) -> list[str]:
        """The dry-run report: counts, a few added and removed entries, the verdict."""
        lines = [f"{self.name}: dry run, nothing written"]
        if self.not_modified:
            lines.append(f"  {self.source} not modified since the last sync: nothing would change")
            return lines
        r = self.result
        if r is None:
            return lines
        lines += [
            f"  source:   {self.source} ({self.rows_read} rows read, "
            f"{self.rows_rejected} rejected)",
            f"  entries:  {r.old_size} now -> {r.size} after the sync (+{r.added} -{r.removed})",
        ]
        if r.added_sample:
            lines.append(f"  added:    {_sample(r.added_sample, r.added)}")
        if r.removed_sample:
            lines.append(f"  removed:  {_sample(r.removed_sample, r.removed)}")
        for column, counts in self.labels.items():
            shown = ", ".join(f"{value or '(empty)'}: {n}" for value, n in counts.most_common(5))
            lines.append(f"  label {column}: {shown}")
        lines += [f"  bad row   {bad}" for bad in self.bad_rows]
        if self.refusal:
            lines.append(f"  a real sync would be REFUSED: {self.refusal}")
        else:
            lines.append("  a real sync would go ahead")
        return lines


def _sample(entries: tuple[str, ...], total: int) -> str:
    more = total - len(entries)
    return ", ".join(entries) + (f" (and {more} more)" if more > 0 else "")


def refusal(name: str, spec: ListSpec, report: SyncReport, result: BuildResult) -> str | None:
    """Why the guards stop this sync, or None if it may go ahead."""
    if result.size == 0:
        return (
            f"{name}: refused: {report.source} has no valid entries ({report.rows_read} rows "
            f"read, {report.rows_rejected} rejected); the old list of {result.old_size} entries "
            "is kept. Use --force to load an empty list."
        )
    read, rejected = report.rows_read, report.rows_rejected
    if read and rejected / read > spec.max_rejected_share:
        first = f" (first: {report.bad_rows[0]})" if report.bad_rows else ""
        return (
            f"{name}: refused: {rejected} of {read} rows of {report.source} were rejected "
            f"({rejected / read:.0%}, more than max_rejected_share "
            f"{spec.max_rejected_share:.0%}){first}; the old list is kept. Fix the source, "
            "or use --force to sync the rows that are good."
        )
    if result.old_size and result.removed / result.old_size > spec.max_removal_share:
        return (
            f"{name}: refused: the sync would remove {result.removed} of {result.old_size} "
            f"entries ({result.removed / result.old_size:.0%}, more than max_removal_share "
            f"{spec.max_removal_share:.0%}); the old list is kept. Use --force to sync anyway."
        )
    return None


async def sync_list(
    redis: RedisClient,
    config: Config,
    name: str,
    options: SyncOptions = SyncOptions(),
    *,
    session: aiohttp.ClientSession | None = None,
) -> SyncReport:
    """Replace list ``name`` with the contents of its configured source.

    A real sync (not a dry run) is recorded in the audit trail (core/audit.py) with its
    outcome (``ok``, ``refused`` or ``failed``) and the version before and after.
    """
    sync = _ListSync(redis, config, name, options)
    if options.dry_run:
        return await sync.run(session)
    audit = AuditLog(redis, config.audit)
    before = await audit.version_of(name)
    try:
        report = await sync.run(session)
    except Exception as exc:
        outcome = "refused" if isinstance(exc, SyncRefused) else "failed"
        detail = redact_text(str(exc) or repr(exc))[:500]
        await audit.append(loader_record("sync", name, before, None, outcome, detail))
        raise
    record = loader_record("sync", name, before, report.version, "ok", report.summary())
    await audit.append(record)
    return report


class _ListSync:
    """The steps of one sync, sharing what they need."""

    def __init__(self, redis: RedisClient, config: Config, name: str, options: SyncOptions):
        self.redis = redis
        self.store = ListStore(redis)
        self.config = config
        self.name = name
        self.spec: ListSpec = config.lists[name]
        self.options = options
        if options.source is not None:
            self.source = options.source
        elif self.spec.source is None:
            raise SyncError(f"{name}: no source configured (the list is kept by the admin API)")
        else:
            self.source = config.resolve_source(self.spec.source)
        self.report = SyncReport(name, redact(self.source))
        self.validators = Validators()
        #: The source's digest and the list's admin-write count before the build
        #: (loader/unchanged.py); "" for an export read instead of the source.
        self.digest = ""
        self.changes = 0

    async def run(self, session: aiohttp.ClientSession | None) -> SyncReport:
        started = time.monotonic()
        report, spec = self.report, self.spec
        with contextlib.ExitStack() as files:
            if "://" in self.source:
                download = files.enter_context(tempfile.TemporaryFile(prefix="callscreen-"))
                fetched = await self._fetch(download, session)
                if fetched.not_modified:
                    await self._not_modified()
                    report.duration_s = time.monotonic() - started
                    return report
                self.validators = fetched.validators
                raw: IO[bytes] = download
                content_type = fetched.content_type
            else:
                try:
                    raw = files.enter_context(open_local(self.source))
                except SourceError as exc:
                    raise SyncError(f"{self.name}: {exc}") from None
                content_type = ""
            if await self._same_source(raw):
                await self._not_modified()
                report.duration_s = time.monotonic() - started
                return report
            fmt = choose_format(
                spec.format, self.source, spec.column, spec.label_columns, content_type
            )
            column, labels = spec.column, spec.label_columns
            if spec.delimiter != ",":
                fmt = "csv"
            if self.options.source is not None:  # an export: see core/export.py
                fmt, column, labels = "csv", 0, ()
            if spec.kind == "subscribers":  # always CSV: subscriber,entry[,side]
                fmt, column, labels = "csv", 0, (1, 2)
            try:
                rows = files.enter_context(
                    Rows(
                        raw,
                        fmt,
                        column=column,
                        label_columns=labels,
                        where=report.source,
                        detect_header=spec.kind != "names",
                        # an export is comma-separated whatever the source is
                        delimiter="," if self.options.source is not None else spec.delimiter,
                    )
                )
            except SourceError as exc:
                raise SyncError(f"{self.name}: {exc}") from None
            progress = make_progress(self.name, rows.total_bytes, self.options.progress)
            files.callback(progress.close)
            await self._build(rows, progress)
        report.duration_s = time.monotonic() - started
        return report

    async def _fetch(self, download: IO[bytes], session: aiohttp.ClientSession | None) -> Fetched:
        if not self.source.startswith(("http://", "https://")):
            raise SyncError(f"{self.name}: unsupported source {self.report.source}")
        validators = Validators()
        known = await self.store.meta_fields(self.name, "source", "etag", "last_modified")
        if known["source"] == self.report.source and not (
            self.options.force or self.options.rebuild
        ):
            validators = Validators(known["etag"], known["last_modified"])
        try:
            return await fetch(
                self.source,
                download,
                validators=validators,
                timeout_s=self.spec.timeout_s,
                retries=self.spec.retries,
                backoff_s=self.config.loader.retry_backoff_s,
                session=session,
            )
        except FetchError as exc:
            raise SyncError(
                f"{self.name}: source unreachable, the old list is kept: {exc}"
            ) from None

    async def _same_source(self, raw: IO[bytes]) -> bool:
        """Hash the source; whether the list is what it made last time (no build needed)."""
        if self.options.source is not None:
            return False
        self.digest = await source_digest(raw, self.config, self.name, self.report.source)
        same, self.changes = await unchanged(self.redis, self.name, self.digest)
        if not same or self.options.force or self.options.rebuild:
            return False
        # A build that died left staging keys behind (meta's ``building``): a build
        # deletes them, so run one.
        if await self.redis.hexists(keys.meta(self.name), "building"):
            return False
        # Data Redis lost (a base, a bucket's marker) is not in meta: a sync repairs it.
        states = await self.store.states([self.name])
        lost = await missing_data(self.redis, {self.name: self.spec.kind}, states)
        return not lost

    async def _stamped(self, version: int) -> int:
        """Record the digest with the version a commit or touch returned; that version."""
        if self.digest:
            await record(self.redis, self.name, self.digest, version, self.changes)
        return version

    async def _not_modified(self) -> None:
        report = self.report
        report.not_modified = True
        if self.options.dry_run:
            report.outcome = "dry_run"
            return
        report.outcome = "unchanged"
        version = await self.store.touch(self.name, {"synced_at": f"{time.time():.3f}"})
        report.version = await self._stamped(version)

    async def _build(self, rows: Rows, progress: Progress) -> None:
        report, options = self.report, self.options
        try:
            builder = await start_build(
                self.redis,
                self.name,
                self.spec.kind,
                batch_size=self.config.loader.batch_size,
                lock_ttl_s=self.config.loader.lock_ttl_s,
            )
        except ListLocked as exc:
            raise SyncError(str(exc)) from None
        if isinstance(builder, SubscriberListBuilder):
            builder.step_share = self.config.loader.subscriber_step_share
            builder.step_wait_s = self.config.loader.subscriber_step_wait_s
            builder.step_min_bytes = int(self.config.loader.subscriber_step_min_mb * 1e6)
        try:
            if isinstance(builder, NumberListBuilder):
                await self._read_numbers(builder, rows, progress)
            elif isinstance(builder, SubscriberListBuilder):
                await self._read_subscribers(builder, rows, progress)
            else:
                await self._read_entries(builder, rows, progress)
            result = report.result = await builder.finish(sample=options.sample)
            refused = None if options.force else refusal(self.name, self.spec, report, result)
            if options.dry_run:
                report.refusal = refused
                report.outcome = "dry_run"
                await builder.abort()
                return
            if refused:
                raise SyncRefused(refused)
            fields: dict[str, str | int | float] = {
                "source": report.source,
                "rows_read": report.rows_read,
                "rows_rejected": report.rows_rejected,
                "etag": self.validators.etag,
                "last_modified": self.validators.last_modified,
            }
            lost = isinstance(builder, SubscriberListBuilder) and builder.lost_buckets > 0
            if result.added == 0 and result.removed == 0 and not lost:
                # Same entries as the live list: keep it, spare every service a reload.
                # (Not when buckets lost their marker: only a commit writes them again,
                # even ones that held no pairs.)
                await builder.abort()
                report.outcome = "unchanged"
                fields["synced_at"] = f"{time.time():.3f}"
                report.version = await self._stamped(await self.store.touch(self.name, fields))
                return
            report.version = await self._stamped(await builder.commit(fields))
            report.outcome = "success"
        except SourceError as exc:
            await builder.abort()
            raise SyncError(f"{self.name}: {exc}") from None
        except BaseException:
            await builder.abort()
            raise

    async def _read_numbers(
        self, builder: NumberListBuilder, rows: Rows, progress: Progress
    ) -> None:
        """The hot loop: per row, one normalise (or its shortcut), one int, one append."""
        report = self.report
        country = self.config.caller.default_country
        nanp = country == "1"
        short_codes = self.spec.allow_short_codes
        batch_size = self.config.loader.batch_size
        labelled = bool(rows.label_columns)
        tallies = _label_tally(report, rows) if labelled else []
        pending = array("Q")
        append = pending.append
        for values in rows.chunks():
            report.rows_read += len(values) - values.count(None)
            for i, value in enumerate(values):
                if value is None:
                    continue
                # Shortcut for the two commonest shapes, equal to normalise() for them
                # (tests/test_loader_sync.py checks): 10 NANP digits, 1 + 10 digits.
                if nanp and value.isdigit() and value.isascii():
                    size = len(value)
                    if size == 10 and value[0] != "0":
                        append(int(value) + 10_000_000_000)
                        if labelled:
                            _count_labels(tallies, rows.labels_of(i))
                        continue
                    if size == 11 and value[0] == "1":
                        append(int(value))
                        if labelled:
                            _count_labels(tallies, rows.labels_of(i))
                        continue
                number = normalise(value, country)
                if number is None:
                    report.reject(rows.line_of(i), f"not a telephone number: {value[:40]!r}")
                    continue
                if not short_codes and (why := undialable_reason(number)) is not None:
                    report.reject(rows.line_of(i), f"not a dialable number: {value[:40]!r} ({why})")
                    continue
                append(int(number))
                if labelled:
                    _count_labels(tallies, rows.labels_of(i))
            progress.update(rows.position(), report.rows_read)
            if len(pending) >= batch_size:
                await builder.add_ints(np.frombuffer(pending, dtype=np.uint64))
                pending = array("Q")
                append = pending.append
            else:
                await builder.keep_alive()
                await asyncio.sleep(0)  # let the scheduler and /metrics breathe
        if pending:
            await builder.add_ints(np.frombuffer(pending, dtype=np.uint64))

    async def _read_subscribers(
        self, builder: SubscriberListBuilder, rows: Rows, progress: Progress
    ) -> None:
        """``subscriber,entry[,side]`` rows (core/subscribers.py); labels are not reported."""
        report = self.report
        country = self.config.caller.default_country
        for values in rows.chunks():
            report.rows_read += len(values) - values.count(None)
            for i, value in enumerate(values):
                if value is None:
                    continue
                raw_entry, raw_side = rows.labels_of(i)
                try:
                    subscriber = canonical_subscriber(value, country)
                    entry = canonical_entry(raw_entry, country)
                    side = canonical_side(raw_side)
                except BadSubscriberEntry as exc:
                    report.reject(rows.line_of(i), str(exc))
                    continue
                await builder.add_pair(subscriber, code_of(entry, side))
            progress.update(rows.position(), report.rows_read)
            await builder.keep_alive()
            await asyncio.sleep(0)

    async def _read_entries(self, builder: ListBuilder, rows: Rows, progress: Progress) -> None:
        """Prefixes and names: through :func:`core.entries.canonical`."""
        report = self.report
        country = self.config.caller.default_country
        kind = self.spec.kind
        # An export holds the entries as stored: the prefix is in them already.
        before = "" if self.options.source is not None else self.spec.entry_prefix
        labelled = bool(rows.label_columns)
        tallies = _label_tally(report, rows) if labelled else []
        batch: list[str] = []
        for values in rows.chunks():
            report.rows_read += len(values) - values.count(None)
            for i, value in enumerate(values):
                if value is None:
                    continue
                try:
                    batch.append(canonical(kind, before + value if before else value, country))
                except BadEntry as exc:
                    report.reject(rows.line_of(i), str(exc))
                    continue
                if labelled:
                    _count_labels(tallies, rows.labels_of(i))
            progress.update(rows.position(), report.rows_read)
            if len(batch) >= SET_BATCH:
                await builder.add(batch)
                batch = []
            else:
                await builder.keep_alive()
                await asyncio.sleep(0)
        await builder.add(batch)


def _label_tally(report: SyncReport, rows: Rows) -> list[Counter[str]]:
    """One counter per label column, named by the column as configured."""
    titles = [c if isinstance(c, str) else f"column {c}" for c in rows.label_columns]
    return [report.labels.setdefault(title, Counter()) for title in titles]


def _count_labels(tallies: list[Counter[str]], labels: tuple[str, ...]) -> None:
    for tally, value in zip(tallies, labels, strict=False):
        if value in tally or len(tally) < MAX_LABEL_VALUES:
            tally[value] += 1
        else:
            tally["(other)"] += 1
