"""``python -m service``: serve the screening handler.

    python -m service [--config config.yaml] [--host H] [--port P] [--workers N]
                      [--admin-host H] [--admin-port P|none]
                      [--log-level INFO] [--log-format text|json]

``--workers`` (default ``server.workers``; 0 = one per CPU core) above 1 starts a
supervisor and that many worker processes on the same port (see service/procs/workers.py).
A bad config stops start-up with exit status 2 and the file, key path and problem.
SIGTERM or SIGINT stops gracefully: no new connections, in-flight requests answered,
Redis closed, exit status 0. SIGHUP re-reads the config (service/procs/reload.py);
SIGUSR2 to a supervisor moves to the code installed now (service/procs/upgrade.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import ConfigError, load_config
from core.logs import configure_logging
from core.version import VERSION
from service.edge.aiohttp_adapter import InternalsUnavailable, resolve
from service.edge.auth import check_secrets
from service.operator.tokens import read_tokens
from service.procs.ports import worker_count
from service.procs.serve import serve_one
from service.procs.workers import Supervisor
from service.screening.history import history_key
from service.screening.shared_lists import parent_folder


def _admin_port(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"callscreen {VERSION}")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="config file")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument(
        "--admin-host", help="operator listener address (overrides server.admin_host)"
    )
    parser.add_argument(
        "--admin-port",
        type=_admin_port,
        help="operator listener port, or 'none' for the handler port (overrides server.admin_port)",
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes, 0 = one per core (overrides server.workers)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="overrides server.log_format"
    )
    # Set by the supervisor for the workers it starts.
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lists-dir", type=Path, help=argparse.SUPPRESS)
    # Set by a supervisor for the successor SIGUSR2 starts (service/procs/upgrade.py).
    parser.add_argument("--upgrade-from", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        config = load_config(args.config)
        check_secrets(config)  # fail here, not in each worker
        read_tokens(config)
        history_key(config)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    log_format = args.log_format or config.server.log_format
    try:
        configure_logging(args.log_level, log_format)
    except ValueError as exc:
        print(f"bad --log-level: {exc}", file=sys.stderr)
        return 2
    try:  # here, once, rather than in each worker (which a supervisor would restart)
        resolve(config.server.aiohttp_internals)
    except (InternalsUnavailable, ValueError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    admin_port = config.server.admin_port if args.admin_port is None else args.admin_port
    operator = (
        None
        if admin_port in (None, "none")
        else (args.admin_host or config.server.admin_host, int(admin_port))
    )
    if args.worker_id is not None:
        return serve_one(
            config,
            host,
            port,
            metrics_dir=args.metrics_dir,
            worker_id=args.worker_id,
            operator=operator,
            lists_dir=args.lists_dir,
            config_path=args.config,
            workers=args.workers,
        )
    if args.workers is not None and args.workers < 0:
        print("--workers must be 0 (one per core) or more", file=sys.stderr)
        return 2
    workers = worker_count(args.workers if args.workers is not None else config.server.workers)
    try:
        share_parent = parent_folder(config.cache.share_dir)
    except ValueError as exc:
        print(f"config error:\n{args.config}: {exc}", file=sys.stderr)
        return 2
    if workers == 1:
        return serve_one(config, host, port, operator=operator, config_path=args.config, workers=1)
    # absolute(), not resolve(): a reload must re-read the path given, which may be a
    # symlink swapped to a new file (a Kubernetes ConfigMap's ..data), not its old target.
    worker_argv = [
        "--config", str(args.config.absolute()),
        "--log-level", args.log_level,
        "--log-format", log_format,
        # What a worker's stir.signature_helper "auto" weighs against the cores.
        "--workers", str(workers),
    ]  # fmt: skip
    return Supervisor(
        host,
        port,
        workers,
        worker_argv,
        operator=operator,
        share_parent=share_parent if config.cache.share_lists else None,
        config=(args.config.absolute(), config),
        own_argv=sys.argv[1:] if argv is None else argv,
        upgrade_from=args.upgrade_from,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
