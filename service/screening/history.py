"""Call history: what was decided for a call, findable later by number (docs/history.md).

Every reject, every dry-run match and a sample of allowed calls are recorded.
:meth:`CallHistory.add` only appends to an in-memory queue on the request path; a
background task (:meth:`CallHistory.run`) writes it every ``history.flush_ms`` in one
pipeline. Invariant: an answer never waits for Redis; past ``history.queue_max``, or on
a slow or failed write, records are dropped and counted. Numbers are stored masked
unless ``history.unmasked``, their sets then named by an HMAC under
``history.hash_key_env``. The Redis layout is in docs/history.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import orjson
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import RedisError

from core import keys
from core.audit import newest_first
from core.config import Config, ConfigError
from core.store import RedisClient
from service.metrics import Metrics
from service.ratelimit import RateLimitedLog
from service.screening.policy import Evaluation
from service.screening.request import Call
from service.screening.screen import mask_number

logger = logging.getLogger(__name__)
#: One number's set: add the record, trim by age and count, push the expiry back. One
#: command per number (one key: Cluster-safe) instead of four.
_ADD_CALL = """
redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[3])
redis.call('zremrangebyrank', KEYS[1], 0, -tonumber(ARGV[4]) - 1)
redis.call('expire', KEYS[1], ARGV[5])
"""
#: A single server (or Sentinel) takes the whole batch as scripts of this many calls
#: each: one command instead of three per call, short enough (well under a millisecond
#: of Redis time) not to hold up the call-rate reads of the request path.
SCRIPT_CHUNK = 100
#: The chunk script: KEYS[1] the recent stream, KEYS[2..] the numbers' sets; ARGV: the
#: four limits, then per call its record and "<time in ms> <set> <set>" (indexes into
#: KEYS, 0: none; one argument rather than three, as each costs its encoding).
_ADD_CHUNK = """
local max_entries, oldest, per_number, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
for i = 5, #ARGV, 2 do
  redis.call('xadd', KEYS[1], 'MAXLEN', '~', max_entries, '*', 'r', ARGV[i])
  local at, a, b = string.match(ARGV[i + 1], '(%d+) (%d+) (%d+)')
  for _, k in ipairs({tonumber(a), tonumber(b)}) do
    if k > 0 then redis.call('zadd', KEYS[k], at, ARGV[i]) end
  end
end
for k = 2, #KEYS do
  redis.call('zremrangebyscore', KEYS[k], '-inf', oldest)
  redis.call('zremrangebyrank', KEYS[k], 0, -per_number - 1)
  redis.call('expire', KEYS[k], ttl)
end
"""
#: Round trips at most (of core.audit.QUERY_PAGE entries) for the recent calls.
MAX_PAGES = 20
#: A record as queued: (time, trunk group, call, evaluation).
Queued = tuple[float, str, Call, Evaluation]


def history_key(config: Config, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The HMAC key naming numbers' sets while history is masked (None: unmasked).

    Raises ConfigError when history is on, masked, and the variable is unset.
    """
    settings = config.history
    if settings.unmasked or not config.server.mask_callers:
        return None
    value = (os.environ if environ is None else environ).get(settings.hash_key_env, "")
    if settings.enabled and not value:
        raise ConfigError(
            f"config: history.hash_key_env: environment variable {settings.hash_key_env} is "
            "not set or empty (masked call history needs a key; or set history.unmasked)"
        )
    return value.encode() or None


class CallHistory:
    """The queue of calls to record, its writer, and the reads of the operator API."""

    def __init__(
        self,
        config: Config,
        redis: RedisClient,
        metrics: Metrics,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = config.history
        self.redis = redis
        self.metrics = metrics
        self.key = history_key(config, environ)
        self.masked = config.server.mask_callers and not self.settings.unmasked
        self.sample = self.settings.sample_allowed
        self.queue: list[Queued] = []
        self.queue_max = self.settings.queue_max
        self.cluster = isinstance(redis, RedisCluster)
        self._warn = RateLimitedLog(logger, interval_s=10.0)
        self._written = metrics.history_records.labels("written")
        self._full = metrics.history_records.labels("dropped_queue_full")
        self._failed = metrics.history_records.labels("dropped_redis")

    # --- the request path --------------------------------------------------------------
    def add(self, group: str, call: Call, evaluation: Evaluation) -> None:
        """Queue the call if it is to be recorded; never blocks, never raises for Redis."""
        recorded = evaluation.outcome.action == "reject" or evaluation.dry_runs
        if not recorded and (not self.sample or random.random() >= self.sample):
            return
        if len(self.queue) >= self.queue_max:
            self._full.inc()
            return
        self.queue.append((time.time(), group, call, evaluation))

    # --- the writer --------------------------------------------------------------------
    async def run(self) -> None:
        """Write the queue every ``flush_ms`` until cancelled."""
        pause_s = self.settings.flush_ms / 1000
        while True:
            await asyncio.sleep(pause_s)
            await self.flush()

    async def flush(self) -> int:
        """Write what is queued now; returns how many records were written."""
        batch, self.queue = self.queue, []
        if not batch:
            return 0
        try:
            async with asyncio.timeout(self.settings.write_timeout_ms / 1000):
                await self._write(batch)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed.inc(len(batch))
            self._warn.warning("call history: %d records dropped: %r", len(batch), exc)
            return 0
        self._written.inc(len(batch))
        return len(batch)

    def _number(self, number: str | None) -> str | None:
        if number is None:
            return None
        return mask_number(number) if self.masked else number

    def _matched(self, matched: str | None, call: Call) -> str | None:
        """What a rule matched, masked when it is the caller or called number."""
        if matched is not None and matched in (call.caller, call.called):
            return self._number(matched)
        return matched

    def number_key(self, number: str) -> str:
        """The name of a (canonical) number's set: the number, or its keyed hash."""
        if self.key is None:
            return number
        return hmac.digest(self.key, number.encode(), "sha256").hex()[:32]

    def _record(self, at: float, group: str, call: Call, evaluation: Evaluation) -> dict[str, Any]:
        outcome = evaluation.outcome
        caller, called = call.caller, call.called
        return {
            "call_id": call.call_id,
            "time": round(at, 3),
            "trunk_group": None if group.startswith("_") else group,
            "caller": self._number(caller),
            "called": self._number(called),
            "decision": outcome.action,
            "answer": list(outcome.operands) if outcome.operands else [],
            "rule": outcome.rule,
            "list": outcome.list,
            "matched": self._matched(evaluation.matched, call),
            "on_error": evaluation.fallback,
            "dry_run_matches": [
                {"rule": dry.rule, "list": dry.list, "matched": self._matched(m, call)}
                for dry, m in evaluation.dry_runs
            ],
        }

    def _numbers(self, call: Call) -> list[str]:
        """The keys of the sets a call goes to: its caller's and its called number's."""
        caller, called = call.caller, call.called
        found = [caller] if caller else []
        if called and called != caller:
            found.append(called)
        return [keys.history_calls(self.number_key(number)) for number in found]

    async def _write(self, batch: list[Queued]) -> None:
        settings = self.settings
        oldest_ms = int(time.time() * 1000) - settings.retention_s * 1000
        limits = (settings.max_entries, oldest_ms, settings.max_per_number, settings.retention_s)
        records = [
            (orjson.dumps(self._record(*queued)), int(queued[0] * 1000), self._numbers(queued[2]))
            for queued in batch
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.cluster:  # every number's set on its own slot: one command each
                for data, at_ms, sets in records:
                    pipe.xadd(keys.HISTORY_RECENT, {"r": data}, maxlen=limits[0], approximate=True)
                    for key in sets:
                        pipe.eval(_ADD_CALL, 1, key, data, at_ms, *limits[1:])
            else:  # one script per chunk: the loop's cost is then the arguments only
                for start in range(0, len(records), SCRIPT_CHUNK):
                    _add_chunk(pipe, records[start : start + SCRIPT_CHUNK], limits)
            await pipe.execute()

    # --- the reads (operator API) ------------------------------------------------------
    async def calls(
        self, number: str, since_s: float, until_s: float, limit: int
    ) -> list[dict[str, Any]]:
        """A canonical number's recorded calls in ``[since_s, until_s]``, newest first."""
        key = keys.history_calls(self.number_key(number))
        found = await self.redis.zrevrangebyscore(
            key, int(until_s * 1000), int(since_s * 1000), start=0, num=limit
        )
        return [orjson.loads(data) for data in found]  # type: ignore[arg-type]

    async def recent(self, limit: int, decision: str | None = None) -> list[dict[str, Any]]:
        """The newest recorded calls of every number (of one decision), newest first."""
        found: list[dict[str, Any]] = []
        async for record in newest_first(self.redis, keys.HISTORY_RECENT, MAX_PAGES):
            if decision is None or record.get("decision") == decision:
                found.append(record)
                if len(found) >= limit:
                    break
        return found[:limit]


def _add_chunk(
    pipe: Pipeline | ClusterPipeline,
    records: list[tuple[bytes, int, list[str]]],
    limits: tuple[int, ...],
) -> None:
    """Queue one :data:`_ADD_CHUNK` call for ``records`` (record, time in ms, set keys)."""
    index: dict[str, int] = {}
    args: list[bytes | str] = []
    for data, at_ms, sets in records:
        slots = [index.setdefault(key, len(index) + 2) for key in sets] + [0, 0]
        args += [data, f"{at_ms} {slots[0]} {slots[1]}"]
    pipe.eval(_ADD_CHUNK, 1 + len(index), keys.HISTORY_RECENT, *index, *limits, *args)
