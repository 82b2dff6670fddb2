"""``python -m loader``: keep the lists in Redis in step with their sources.

Commands ``sync`` (``--from FILE``: restore an export), ``apply``, ``compact``,
``accept``, ``run`` and ``export`` (docs/loader.md, "Commands"). Exit status: 0 when
everything went through, 1 when a list failed or was refused (for ``--dry-run``: when a
real sync would be; for ``accept``: no such list in Redis, or Redis failed), 2 on a bad
config or command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from core.audit import AuditLog, loader_record
from core.config import Config, ConfigError, load_config
from core.connect import connect, redact
from core.logs import configure_logging
from core.redact import redact_text
from core.store import ListStore, RedisClient
from core.version import VERSION
from loader.delta import apply_delta, compact_list
from loader.export import export_list
from loader.metrics import LoaderMetrics
from loader.schedule import Scheduler, bound_port, scheduled_lists, serve_metrics
from loader.sync import SyncError, SyncOptions, SyncRefused, sync_list

logger = logging.getLogger("loader")
LOADER_SOCKET_TIMEOUT_S = 30.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loader", description="List loader")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="config file")
    parser.add_argument("--version", action="version", version=f"callscreen {VERSION}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="overrides server.log_format"
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "log", "off"),
        default="auto",
        help="auto: a bar on a terminal, log lines otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="load lists from their sources once")
    sync.add_argument("--list", dest="names", action="append", help="only this list (repeatable)")
    sync.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    sync.add_argument("--force", action="store_true", help="override the guards")
    sync.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="restore: read this export (python -m loader export) instead of the source",
    )
    apply = commands.add_parser("apply", help="apply a delta file of +entry / -entry lines")
    apply.add_argument("--list", dest="name", required=True)
    apply.add_argument("file", type=Path)
    compact = commands.add_parser("compact", help="fold single-entry changes into the base")
    compact.add_argument("--list", dest="names", action="append", help="only this list")
    commands.add_parser("run", help="sync on schedule and serve /metrics until SIGTERM")
    accept = commands.add_parser(
        "accept",
        help="trust a list as Redis holds it now, after Redis lost data",
        description=(
            "Mark the list as whole as Redis holds it now. After Redis lost data (flush, "
            "restart without persistence, failover, restore from a backup) the service "
            "answers calls that need the list by on_error until a full sync or this "
            "command; use it for lists without a source, or a restore to keep as it is. "
            "Exit status 0: accepted; 1: the list is not in Redis; 2: unknown list."
        ),
    )
    accept.add_argument("--list", dest="name", required=True, help="the list to accept")
    export = commands.add_parser("export", help="write a list as CSV (a backup)")
    export.add_argument("--list", dest="name", required=True, help="the list to export")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")
    return parser.parse_args(argv)


def _connect(config: Config) -> RedisClient:
    # Batches are large (a million numbers in one MULTI/EXEC): allow a slow reply.
    timeout_s = max(config.redis.socket_timeout_ms / 1000, LOADER_SOCKET_TIMEOUT_S)
    return connect(config.redis.url, socket_timeout_s=timeout_s, client_name="callscreen-loader")


def _check_names(config: Config, names: list[str]) -> str | None:
    unknown = [n for n in names if n not in config.lists]
    if unknown:
        return f"unknown list {unknown[0]!r}; configured: {', '.join(config.lists) or 'none'}"
    return None


async def _sync(config: Config, names: list[str], options: SyncOptions) -> int:
    redis = _connect(config)
    status = 0
    try:
        for name in names:
            try:
                report = await sync_list(redis, config, name, options)
            except SyncRefused as exc:
                status = 1
                logger.error("%s", exc)
                continue
            except SyncError as exc:
                status = 1
                logger.error("sync failed, the old list is kept: %s", exc)
                continue
            except Exception as exc:  # Redis errors and the like: report, go on
                status = 1
                shown = redact_text(repr(exc))
                logger.error("%s: sync failed, the old list is kept: %s", name, shown)
                continue
            if options.dry_run:
                print("\n".join(report.diff_lines()), flush=True)
                if report.refusal:
                    status = 1
                continue
            for line in report.bad_rows:
                logger.warning("skipped bad row %s", line)
            if report.rows_rejected > len(report.bad_rows):
                more = report.rows_rejected - len(report.bad_rows)
                logger.warning("%s: %d more bad rows skipped", name, more)
            logger.info("synced %s", report.summary())
    finally:
        await redis.aclose()
    return status


async def _apply(config: Config, name: str, path: Path, progress: str) -> int:
    redis = _connect(config)
    try:
        report = await apply_delta(redis, config, name, path, progress=progress)
    except SyncError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        await redis.aclose()
    for line in report.bad_lines:
        logger.warning("skipped bad line %s", line)
    logger.info("%s", report.summary())
    return 1 if report.rejected else 0


async def _compact(config: Config, names: list[str]) -> int:
    redis = _connect(config)
    status = 0
    try:
        for name in names:
            try:
                version = await compact_list(redis, config, name)
            except Exception as exc:
                status = 1
                shown = redact_text(str(exc))
                logger.error("%s: compaction failed, nothing changed: %s", name, shown)
                continue
            if version is None:
                logger.info("%s: no pending changes to compact", name)
    finally:
        await redis.aclose()
    return status


async def _accept(config: Config, name: str) -> int:
    redis = _connect(config)
    audit = AuditLog(redis, config.audit)
    try:
        before = await audit.version_of(name)
        version = await ListStore(redis).accept(name, time.time())
        if version is not None:
            record = loader_record("accept", name, before, version, "ok", "accepted as held")
            await audit.append(record)
    except Exception as exc:  # Redis errors and the like
        logger.error("%s: not accepted, nothing changed: %s", name, redact_text(str(exc)))
        return 1
    finally:
        await redis.aclose()
    if version is None:
        logger.error(
            "%s: not in Redis, nothing to accept: sync it, or write its entries through "
            "the admin API and accept it then",
            name,
        )
        return 1
    logger.info(
        "%s: accepted as Redis holds it (version %d); the service trusts it again within "
        "a cache refresh",
        name,
        version,
    )
    return 0


async def _export(config: Config, name: str, out: Path | None) -> int:
    redis = _connect(config)
    try:
        count = await export_list(redis, config, name, out)
    except Exception as exc:  # Redis errors, a base swapped out under a long export
        logger.error("%s: export failed: %s", name, redact_text(str(exc)))
        return 1
    finally:
        await redis.aclose()
    if out is not None:
        logger.info("%s: exported %d entries to %s", name, count, out)
    return 0


async def _run(config: Config, redis: RedisClient | None = None) -> int:
    redis = redis or _connect(config)
    registry = CollectorRegistry()
    metrics = LoaderMetrics(registry, scheduled_lists(config), config.lists)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = await serve_metrics(registry, config.loader.metrics_host, config.loader.metrics_port)
    logger.info(
        "serving loader metrics on http://%s:%d/metrics",
        config.loader.metrics_host,
        bound_port(runner),
    )
    try:
        await Scheduler(redis, config, metrics).run(stop)
    finally:
        logger.info("stopping")
        await runner.cleanup()
        await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error:\n{redact_text(str(exc))}", file=sys.stderr)
        return 2
    try:
        # Every line redacted, not only aiohttp's and exceptions': the loader's lines
        # quote list sources and their errors, and there are few of them.
        configure_logging(
            args.log_level, args.log_format or config.server.log_format, redact_all=True
        )
    except ValueError as exc:
        print(f"bad --log-level: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        return asyncio.run(_run(config))
    if args.command == "apply":
        problem = _check_names(config, [args.name])
        if problem:
            print(problem, file=sys.stderr)
            return 2
        return asyncio.run(_apply(config, args.name, args.file, args.progress))
    if args.command in ("accept", "export"):
        problem = _check_names(config, [args.name])
        if problem:
            print(problem, file=sys.stderr)
            return 2
        if args.command == "export":
            return asyncio.run(_export(config, args.name, args.out))
        return asyncio.run(_accept(config, args.name))
    names = args.names or [
        name for name, spec in config.lists.items() if args.command == "compact" or spec.source
    ]
    problem = _check_names(config, names)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.command == "compact":
        return asyncio.run(_compact(config, names))
    logger.info(
        "syncing %s into Redis at %s", ", ".join(names) or "nothing", redact(config.redis.url)
    )
    source = None
    if args.source is not None:
        if len(names) != 1:
            print("--from restores one list: name it with --list", file=sys.stderr)
            return 2
        source = str(args.source.resolve())
    options = SyncOptions(
        dry_run=args.dry_run, force=args.force, progress=args.progress, source=source
    )
    return asyncio.run(_sync(config, names, options))


if __name__ == "__main__":
    sys.exit(main())
