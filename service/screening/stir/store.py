"""Certificates by x5u URL: this worker's copies, the fleet's in Redis, else a fetch.

A certificate body fetched by any worker is written to Redis (``core.keys.stir_cert``)
with the lifetime its cache headers give, so one fetch serves every worker and host.
Each worker keeps what it validated (a trusted :class:`Signer` or why not) until the
earlier of that lifetime and the chain's expiry; a trust-anchor reload voids it.

One load per URL runs at a time, as a task of its own: a call waits for it at most
its remaining time and then answers ``cert_unavailable``, while the load goes on and
serves the calls after it. A failed fetch is remembered for ``stir.negative_cache_s``,
so a dead certificate server is not asked again by every call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from redis.exceptions import RedisError

from core import keys
from core.config import StirSettings
from core.store import RedisClient
from service.metrics import Metrics
from service.screening.stir.certs import Signer, TrustStore, Untrusted, load_chain
from service.screening.stir.fetch import FetchError, fetch_cert

logger = logging.getLogger(__name__)
#: Most URLs remembered per worker (an attacker can name many).
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class CertEntry:
    """A trusted signer, or why there is none (``untrusted_chain``, ``cert_unavailable``)."""

    signer: Signer | None
    reason: str | None
    detail: str
    expires_at: float  # time.monotonic()
    generation: int
    #: Where it came from: ``local``, ``redis`` or ``fetch`` (explain).
    source: str = "fetch"


class CertStore:
    """Certificate look-ups for one worker (see the module docstring)."""

    def __init__(
        self,
        settings: StirSettings,
        trust: TrustStore,
        redis: RedisClient | None,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.trust = trust
        self.redis = redis
        self.session = session
        self.metrics = metrics
        self.entries: dict[str, CertEntry] = {}
        self.loads: dict[str, asyncio.Task[CertEntry]] = {}

    def peek(self, url: str) -> CertEntry | None:
        """This worker's entry for ``url`` if it is still good; never waits."""
        self.trust.maybe_reload()
        entry = self.entries.get(url)
        if entry is None:
            return None
        if entry.expires_at <= time.monotonic() or entry.generation != self.trust.generation:
            del self.entries[url]
            return None
        if self.metrics is not None:
            self.metrics.stir_cache("local")
        return entry

    async def get(self, url: str, wait_s: float) -> CertEntry:
        """The entry for ``url``, waiting at most ``wait_s`` for a load to finish."""
        entry = self.peek(url)
        if entry is not None:
            return entry
        task = self.loads.get(url)
        if task is None:
            task = asyncio.create_task(self._load(url), name="stir-cert-load")
            self.loads[url] = task
            task.add_done_callback(lambda _t: self.loads.pop(url, None))
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                return await asyncio.shield(task)
        except TimeoutError:
            return CertEntry(None, "cert_unavailable", "still loading", 0.0, -1)

    def _keep(self, url: str, entry: CertEntry) -> CertEntry:
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.pop(next(iter(self.entries)))  # the oldest added
        self.entries[url] = entry
        return entry

    async def _load(self, url: str) -> CertEntry:
        try:
            return await self._load_once(url)
        except Exception:  # a bug must not leave the URL loading for ever
            logger.exception("STIR certificate load failed: %s", url)
            return self._unavailable(url, "internal error")

    def _unavailable(self, url: str, detail: str) -> CertEntry:
        expires = time.monotonic() + self.settings.negative_cache_s
        return self._keep(
            url, CertEntry(None, "cert_unavailable", detail, expires, self.trust.generation)
        )

    async def _load_once(self, url: str) -> CertEntry:
        key = keys.stir_cert(url)
        body, ttl_s, source = None, 0, "redis"
        if self.redis is not None:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.get(key)
                    pipe.ttl(key)
                    found, ttl_s = await pipe.execute()
                body = found if found and ttl_s > 0 else None
            except (RedisError, OSError) as exc:
                logger.warning("STIR certificate cache unreadable (%s); fetching", exc)
        if body is not None:
            if self.metrics is not None:
                self.metrics.stir_cache("redis")
        else:
            source = "fetch"
            if self.metrics is not None:
                self.metrics.stir_cache("miss")
            started = time.perf_counter()
            try:
                fetched = await fetch_cert(self.session, url, self.settings)
            except FetchError as exc:
                self._fetched(exc.outcome, started)
                logger.warning("STIR certificate not fetched from %s: %s", url, exc)
                return self._unavailable(url, str(exc))
            self._fetched("ok", started)
            body, ttl_s = fetched.body, fetched.ttl_s
            if self.redis is not None and ttl_s > 0:
                try:
                    await self.redis.set(key, body, ex=ttl_s)
                except (RedisError, OSError) as exc:
                    logger.warning("STIR certificate not shared through Redis: %s", exc)
        return self._validated(url, body, ttl_s, source)

    def _fetched(self, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.stir_fetched(outcome, time.perf_counter() - started)

    def _validated(self, url: str, body: bytes, ttl_s: int, source: str) -> CertEntry:
        generation = self.trust.generation
        expires = time.monotonic() + max(ttl_s, 1)
        try:
            signer = self.trust.validate(load_chain(body))
        except ValueError:
            entry = CertEntry(None, "untrusted_chain", "not a certificate", expires, generation)
        except Untrusted as exc:
            entry = CertEntry(None, "untrusted_chain", str(exc), expires, generation)
        else:
            until = time.monotonic() + max(signer.not_after - time.time(), 0.0)
            entry = CertEntry(signer, None, signer.subject, min(expires, until), generation, source)
        return self._keep(url, entry)

    async def close(self) -> None:
        for task in list(self.loads.values()):
            task.cancel()
        await asyncio.gather(*self.loads.values(), return_exceptions=True)
        await self.session.close()
