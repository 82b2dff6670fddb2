"""``python -m loader``: keep the lists in Redis in step with their sources.

    python -m loader [--config config.yaml] sync [--list NAME]

``sync`` loads every list that has a source (or just ``--list NAME``) once and exits;
the exit status is 0 when every list loaded, 1 when any failed, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from core.config import Config, ConfigError, load_config
from core.connect import connect, redact
from loader.sync import SyncError, sync_list

logger = logging.getLogger("loader")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loader", description="List loader")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="config file")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="load lists from their sources once")
    sync.add_argument("--list", dest="name", help="only this list")
    return parser.parse_args(argv)


async def _sync(config: Config, names: list[str]) -> int:
    redis = connect(config.redis.url, client_name="callscreen-loader")
    failed = 0
    try:
        for name in names:
            try:
                report = await sync_list(redis, config, name)
            except (SyncError, OSError) as exc:
                failed += 1
                logger.error("sync failed, the old list is kept: %s", exc)
                continue
            except Exception as exc:  # Redis errors and the like: report, go on
                failed += 1
                logger.error("%s: sync failed, the old list is kept: %s", name, exc)
                continue
            for line in report.bad_rows:
                logger.warning("skipped bad row %s", line)
            if report.rows_rejected > len(report.bad_rows):
                more = report.rows_rejected - len(report.bad_rows)
                logger.warning("%s: %d more bad rows skipped", name, more)
            logger.info("synced %s", report.summary())
    finally:
        await redis.aclose()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    if args.name is not None:
        if args.name not in config.lists:
            print(
                f"unknown list {args.name!r}; configured: {', '.join(config.lists)}",
                file=sys.stderr,
            )
            return 2
        names = [args.name]
    else:
        names = [name for name, spec in config.lists.items() if spec.source]
    logger.info(
        "syncing %s into Redis at %s", ", ".join(names) or "nothing", redact(config.redis.url)
    )
    return asyncio.run(_sync(config, names))


if __name__ == "__main__":
    sys.exit(main())
