"""Re-reading config.yaml while serving (SIGHUP, or ``POST /v1/reload``).

A reload is checked in full before anything changes: the file must parse and validate
(:func:`core.config.load_config`) and every secret it names must be in the environment
(:func:`service.edge.auth.check_secrets`). A config that fails is refused: each problem
is logged with its key path, ``callscreen_config_reload_total{outcome="invalid"}``
counts it, ``callscreen_config_reload_failed`` goes to 1, and the last good config keeps
serving. A good one is applied in one of two ways:

- **in place**, when it differs only in :data:`IN_PLACE` sections (policies, trunk
  groups, handler, caller, auth): each process swaps its screener and guards between
  two requests (:func:`swap_in_place`); nothing restarts, and the next call is
  screened by the new config. The supervisor forwards SIGHUP to its workers, which
  re-read the file themselves; a single process does the same on its own;
- **by replacing the workers** one at a time (:mod:`service.procs.rollout`) for any
  other change (lists, Redis, cache, admin, ...). A single process cannot replace itself:
  it refuses such a reload and says it needs a restart.

Some keys are read only when the supervisor starts (:data:`RESTART_KEYS`): a reload
that changes them logs that they wait for a restart, and applies the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from core.config import Config, ConfigError
from service.appkeys import AUTH, METRICS, SCREENER
from service.operator.reload import check_config
from service.operator.tokens import AdminTokens
from service.screening.stir import wanted as stir_wanted

logger = logging.getLogger(__name__)

OUTCOMES = ("applied", "invalid", "failed")

#: Keys a reload cannot change, with why (docs/operations.md repeats them).
RESTART_KEYS: dict[str, str] = {
    "server.host": "the supervisor holds the listening address for all workers",
    "server.port": "the supervisor holds the listening port for all workers",
    "server.admin_host": "the supervisor holds the operator listener's address",
    "server.admin_port": "the supervisor holds the operator listener's port",
    "server.workers": "the supervisor sizes its worker slots at start",
    "server.log_format": "the supervisor's own log lines and the workers' argv use it",
    "cache.share_lists": "the shared lists folder is made at start",
    "cache.share_dir": "the shared lists folder is made at start",
}


#: Config sections a running process can swap between two requests.
IN_PLACE = frozenset({"policies", "default_policy", "trunk_groups", "handler", "caller", "auth"})


class ReloadMetrics:
    """Reload outcomes, on the registry of whoever reloads (supervisor or single process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter(
            "callscreen_config_reload",
            "Config reloads asked for (SIGHUP or POST /v1/reload), by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.total.labels(outcome)
        self.failed = Gauge(
            "callscreen_config_reload_failed",
            "1 when the last reload was refused or failed: the last good config serves.",
            registry=registry,
        )
        self.last_success = Gauge(
            "callscreen_config_last_reload_success_timestamp_seconds",
            "When the config now serving was read (start or last applied reload).",
            registry=registry,
        )
        self.last_success.set(time.time())

    def record(self, outcome: str) -> None:
        self.total.labels(outcome).inc()
        self.failed.set(0 if outcome == "applied" else 1)
        if outcome == "applied":
            self.last_success.set(time.time())


def _lookup(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The :data:`RESTART_KEYS` whose values differ between ``old`` and ``new``."""
    return [key for key in RESTART_KEYS if _lookup(old, key) != _lookup(new, key)]


def log_refused(path: Path, problems: list[str]) -> None:
    logger.error(
        "config reload refused; the last good config keeps serving: %s",
        "; ".join(problems) or f"{path}: invalid",
    )


def log_restart_keys(keys: list[str]) -> None:
    for key in keys:
        logger.warning(
            "config reload: %s changed but needs a restart (%s); the old value stays",
            key, RESTART_KEYS[key],
        )  # fmt: skip


def ready_path(folder: Path, worker_id: str) -> Path:
    """The file a worker makes in the metrics folder once it listens."""
    return folder / f"{worker_id}.ready"


def changed_sections(old: Config, new: Config) -> list[str]:
    """The top-level config sections whose values differ."""
    return [name for name in Config.model_fields if getattr(old, name) != getattr(new, name)]


def in_place(old: Config, new: Config) -> bool:
    """True when ``new`` differs from ``old`` only where :func:`swap_in_place` can apply it.

    A policy that starts or stops using STIR/SHAKEN rules needs the verifier made (or
    closed) with the app: that takes new workers.
    """
    return set(changed_sections(old, new)) <= IN_PLACE and stir_wanted(old) == stir_wanted(new)


def swap_in_place(app: web.Application, config: Config) -> None:
    """Serve the next request under ``config`` (which :func:`in_place` accepted)."""
    app[METRICS].add_decisions(config)  # before a new rule can count a decision
    app[AUTH].reconfigure(config)
    app[SCREENER].reconfigure(config)


class Reloader:
    """SIGHUP in a serving process: re-read the config, swap in place what can be."""

    def __init__(
        self,
        app: web.Application,
        path: Path,
        metrics: ReloadMetrics | None,
        tokens: AdminTokens | None = None,
    ) -> None:
        self.app = app
        self.path = path
        self.metrics = metrics
        #: The admin tokens, re-read on every reload: ``admin.tokens_file`` may change
        #: while config.yaml does not.
        self.tokens = tokens
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, who: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(who), name="config-reload")
        self._tasks.add(task)  # a task nobody references may be collected mid-run
        task.add_done_callback(self._tasks.discard)

    def _record(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.record(outcome)

    async def reload(self, who: str) -> None:
        # Parsing and validation off the event loop: calls keep being answered meanwhile.
        config, problems = await asyncio.to_thread(check_config, self.path)
        if config is None:
            log_refused(self.path, problems)
            self._record("invalid")
            return
        if self.tokens is not None:
            try:
                self.tokens.reload()
            except ConfigError as exc:  # a bad entry: the old tokens stay
                logger.error("%s: admin tokens not reloaded, the old ones stay: %s", who, exc)
                self._record("invalid")
                return
        current = self.app[SCREENER].config
        if not in_place(current, config):
            others = [s for s in changed_sections(current, config) if s not in IN_PLACE]
            others = others or ["the use of STIR/SHAKEN rules"]
            logger.error(
                "%s: config reload refused: %s changed, which a single process applies "
                "only at a restart (or run server.workers >= 2, whose supervisor replaces "
                "its workers); the last good config keeps serving",
                who, ", ".join(others),
            )  # fmt: skip
            self._record("failed")
            return
        swap_in_place(self.app, config)
        logger.info("%s: config reloaded in place", who)
        self._record("applied")
