"""``POST /v1/reload``: what SIGHUP does, for an operator with an admin token.

The file is checked first, off the event loop, so the answer says whether it will be
taken: 422 with each problem (key path and message) when it will not, 202 when it will.
Either way the process that reloads (the supervisor, or a single process itself) is then
sent SIGHUP, so a refusal is logged and counted in one place, like a refused SIGHUP
(:mod:`service.procs.reload`). A 202 means the reload has started: a change that needs
new workers takes effect when they listen, a few seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from core.config import Config, ConfigError, load_config
from service.edge.auth import check_secrets
from service.edge.errors import json_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadTarget:
    """Who re-reads which file: ``pid`` is sent SIGHUP."""

    pid: int
    path: Path


RELOAD_TARGET = web.AppKey("reload_target", ReloadTarget)


def check_config(path: Path) -> tuple[Config | None, list[str]]:
    """The config at ``path`` if it can serve, else None and one problem per line.

    An empty file is refused: at a reload it is far more likely a write caught halfway
    than a wish to go back to every default.
    """
    try:
        if path.stat().st_size == 0:
            return None, [f"{path}: the file is empty (written halfway?)"]
        config = load_config(path)
        check_secrets(config)
    except ConfigError as exc:
        return None, str(exc).splitlines()
    except OSError as exc:
        return None, [f"{path}: cannot read: {exc.strerror}"]
    return config, []


async def reload_config(request: web.Request) -> web.Response:
    """Check the config file, then ask for a reload (see the module docstring)."""
    target = request.app.get(RELOAD_TARGET)
    if target is None:
        return json_error(409, "this process was started without a config file to re-read")
    config, problems = await asyncio.to_thread(check_config, target.path)
    with contextlib.suppress(ProcessLookupError):
        os.kill(target.pid, signal.SIGHUP)
    logger.info("POST /v1/reload: %s", "refused" if config is None else "reloading")
    if config is None:
        body = {"error": "config refused; the last good config keeps serving",
                "problems": problems}  # fmt: skip
        return web.Response(status=422, body=orjson.dumps(body), content_type="application/json")
    return web.Response(
        status=202,
        body=orjson.dumps({"reloading": True, "file": str(target.path)}),
        content_type="application/json",
    )
