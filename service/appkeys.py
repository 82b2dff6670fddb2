"""Typed keys for what the application shares between handlers (no globals)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from core.config import Config
from core.store import ListStore, RedisClient
from service.edge.aiohttp_adapter import Internals
from service.edge.auth import HandlerAuth
from service.metrics import Metrics
from service.screening.cache import ListCache
from service.screening.screen import Screener

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", CollectorRegistry)
METRICS = web.AppKey("metrics", Metrics)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
STORE = web.AppKey("store", ListStore)
CACHE = web.AppKey("cache", ListCache)
SCREENER = web.AppKey("screener", Screener)
AUTH = web.AppKey("auth", HandlerAuth)
#: Whether this process uses aiohttp's internals (service/edge/aiohttp_adapter.py).
INTERNALS = web.AppKey("aiohttp_internals", Internals)
#: The worker processes serving the config, this one included.
WORKERS = web.AppKey("workers", int)
