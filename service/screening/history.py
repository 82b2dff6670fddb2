"""Call history: what was decided for a call, findable later by number (docs/history.md).

Every reject, every dry-run match and a sample of allowed calls are recorded.
:meth:`CallHistory.add` only appends to an in-memory queue on the request path; a
background task (:meth:`CallHistory.run`) writes it every ``history.flush_ms``, in
chunks of :data:`CHUNK_MAX` records a command. Invariant: an answer never waits for
Redis; past ``history.queue_max``, or on a slow or failed write, records are dropped
and counted. Numbers are stored masked unless ``history.unmasked``, their sets then
named by an HMAC under ``history.hash_key_env``. The Redis layout is in
docs/history.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from core import keys
from core.audit import newest_first
from core.config import Config, ConfigError
from core.shards import Command, dispatcher_for
from core.store import RedisClient
from service.metrics import Metrics
from service.ratelimit import RateLimitedLog
from service.screening.policy import Evaluation
from service.screening.request import Call, called_number
from service.screening.screen import mask_number

logger = logging.getLogger(__name__)
#: A single server (or Sentinel) takes a chunk in one script, which costs the worker's
#: loop one command's packing and reply instead of one per write. KEYS[1]: the recent
#: stream, KEYS[2..]: the numbers' sets. ARGV: max_entries, the rank a trim stops at,
#: the sets' TTL, the records joined by newlines (orjson escapes any newline inside a
#: string), per record "<time in ms> <set> <set>" (indexes into KEYS, 0: none), and
#: per set a letter: T trim, E expire, B both, - neither (see CallHistory._upkeep).
_ADD_CHUNK = """
local recent, stop, ttl, upkeep = KEYS[1], tonumber(ARGV[2]), ARGV[3], ARGV[6]
local metas = {}
for at, a, b in string.gmatch(ARGV[5], '(%d+) (%d+) (%d+)') do
  metas[#metas + 1] = {at, tonumber(a), tonumber(b)}
end
local i = 0
for record in string.gmatch(ARGV[4], '[^\\n]+') do
  i = i + 1
  local m = metas[i]
  redis.call('xadd', recent, '*', 'r', record)
  if m[2] > 0 then redis.call('zadd', KEYS[m[2]], m[1], record) end
  if m[3] > 0 then redis.call('zadd', KEYS[m[3]], m[1], record) end
end
for k = 2, #KEYS do
  local what = string.sub(upkeep, k - 1, k - 1)
  if what == 'T' or what == 'B' then redis.call('zremrangebyrank', KEYS[k], 0, stop) end
  if what == 'E' or what == 'B' then redis.call('expire', KEYS[k], ttl) end
end
redis.call('xtrim', recent, 'MAXLEN', '~', ARGV[1])
return i
"""
_ADD_CHUNK_SHA = hashlib.sha1(_ADD_CHUNK.encode()).hexdigest()
_UPKEEP_LETTERS = {(False, False): "-", (True, False): "T", (False, True): "E", (True, True): "B"}
#: Records encoded in one go at most, and written in one command (:data:`_ADD_CHUNK`;
#: on a Cluster plain commands, one write per node): a chunk's Redis time stays around a
#: millisecond at most next to the request path's own reads of the same server.
CHUNK_MAX = 64
#: The loop's time one chunk's encoding may take before the chunk is cut short and sent;
#: the loop serves calls while Redis works on it.
SLICE_S = 0.0005
#: Distinct record tails (decision, answer, rule, list, on_error) kept encoded; past it
#: the memo starts again empty.
TAIL_MEMO_MAX = 1024
#: Numbers whose set key is remembered (the HMAC is the dearest step of a record); past
#: it the memo starts again empty, so it stays bounded.
KEY_MEMO_MAX = 20_000
SHA256_BLOCK = 64
#: Round trips at most (of core.audit.QUERY_PAGE entries) for the recent calls.
MAX_PAGES = 20
#: A record as queued: (time, trunk group, Call-ID, caller, the body's To value, evaluation).
Queued = tuple[float, str, str | None, str | None, Any, Evaluation]
#: A record as written: its JSON, its time in ms, the keys of its numbers' sets.
Encoded = tuple[bytes, int, list[str]]


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
        self.default_country = config.caller.default_country
        self.sample = self.settings.sample_allowed
        self.queue: list[Queued] = []
        self.queue_max = self.settings.queue_max
        self.dispatcher = dispatcher_for(redis)
        self.cluster = isinstance(redis, RedisCluster)
        self._refresh_s = self.settings.retention_s / 10
        self._ttl_s = math.ceil(self.settings.retention_s + self._refresh_s)
        self._set_keys: dict[str, str] = {}
        self._tails: dict[tuple[Any, ...], bytes] = {}
        #: A number's set -> [when its expiry was last pushed back, calls added since
        #: its last trim] (see :meth:`_upkeep`); bounded like the set keys' memo.
        self._upkept: dict[str, list[float]] = {}
        self._pads = None if self.key is None else _hmac_pads(self.key)
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
        # Not the call and its whole parsed body: held until the next flush, they would be
        # traced by every garbage collection meanwhile. The To value is kept as it came
        # and normalised by the writer, off the answer's path.
        to = call.headers.get("to")
        self.queue.append((time.time(), group, call.call_id, call.caller, to, evaluation))

    # --- the writer --------------------------------------------------------------------
    async def run(self) -> None:
        """Write the queue every ``flush_ms`` until cancelled."""
        pause_s = self.settings.flush_ms / 1000
        while True:
            await asyncio.sleep(pause_s)
            await self.flush()

    async def flush(self) -> int:
        """Write what is queued now; returns how many records were written.

        Records are encoded in slices of at most about :data:`SLICE_S` of the loop's
        time, the loop serving calls between them, and written :data:`CHUNK_MAX` a
        command. On a timeout or a Redis error the records not yet written are dropped
        and counted.
        """
        batch, self.queue = self.queue, []
        written = done = 0
        try:
            async with asyncio.timeout(self.settings.write_timeout_ms / 1000):
                while done < len(batch):
                    end = min(done + CHUNK_MAX, len(batch))
                    chunk: list[Encoded] = []
                    while done + len(chunk) < end:
                        if chunk:  # a slice is over: answer the calls waiting meanwhile
                            await asyncio.sleep(0)
                        self._encode(batch, done + len(chunk), end, chunk)
                    written += await self._send(chunk)
                    done += len(chunk)
        except TimeoutError as exc:
            self._drop(len(batch) - done, exc)
        if written:
            self._written.inc(written)
        return written

    def _drop(self, lost: int, why: BaseException) -> None:
        self._failed.inc(lost)
        self._warn.warning("call history: %d records dropped: %r", lost, why)

    def _encode(self, batch: list[Queued], start: int, end: int, chunk: list[Encoded]) -> None:
        """Append the records of ``batch[start:end]`` to ``chunk`` until :data:`SLICE_S`
        has passed (one at least)."""
        deadline = time.perf_counter() + SLICE_S
        set_key = self._set_key
        for at, group, call_id, caller, to, evaluation in batch[start:end]:
            called = called_number(to, self.default_country)
            sets = [set_key(caller)] if caller else []
            if called and called != caller:
                sets.append(set_key(called))
            record = self._record(at, group, call_id, caller, called, evaluation)
            chunk.append((record, int(at * 1000), sets))
            if time.perf_counter() >= deadline:
                return

    def _record(
        self,
        at: float,
        group: str,
        call_id: str | None,
        caller: str | None,
        called: str | None,
        evaluation: Evaluation,
    ) -> bytes:
        """The record's JSON: the call's own fields, then the outcome's, which repeat
        from call to call and are encoded once (:data:`TAIL_MEMO_MAX`)."""
        outcome = evaluation.outcome
        numbers = (caller, called)
        head = orjson.dumps(
            {
                "call_id": call_id,
                "time": round(at, 3),
                "trunk_group": None if group.startswith("_") else group,
                "caller": self._number(caller),
                "called": self._number(called),
                "matched": self._matched(evaluation.matched, numbers),
            }
        )
        if evaluation.dry_runs:  # rare, and with numbers of the call in it: not memoised
            return head[:-1] + self._tail(evaluation, numbers)
        memo = (outcome.action, outcome.operands, outcome.rule, outcome.list, evaluation.fallback)
        tail = self._tails.get(memo)
        if tail is None:
            if len(self._tails) >= TAIL_MEMO_MAX:
                self._tails.clear()
            tail = self._tails[memo] = self._tail(evaluation, numbers)
        return head[:-1] + tail

    def _tail(self, evaluation: Evaluation, numbers: tuple[str | None, str | None]) -> bytes:
        """The outcome's fields, as JSON members after a comma, closing the object."""
        outcome = evaluation.outcome
        fields = orjson.dumps(
            {
                "decision": outcome.action,
                "answer": outcome.operands or (),
                "rule": outcome.rule,
                "list": outcome.list,
                "on_error": evaluation.fallback,
                "dry_run_matches": [
                    {"rule": dry.rule, "list": dry.list, "matched": self._matched(m, numbers)}
                    for dry, m in evaluation.dry_runs
                ],
            }
        )
        return b"," + fields[1:]

    def _number(self, number: str | None) -> str | None:
        if number is None:
            return None
        return mask_number(number) if self.masked else number

    def _matched(self, matched: str | None, numbers: tuple[str | None, str | None]) -> str | None:
        """What a rule matched, masked when it is the caller or called number."""
        if matched is not None and matched in numbers:
            return self._number(matched)
        return matched

    def number_key(self, number: str) -> str:
        """The name of a (canonical) number's set: the number, or its keyed hash
        (HMAC-SHA256, from the key's two padded hash states computed once)."""
        if self._pads is None:
            return number
        inner, outer = self._pads[0].copy(), self._pads[1].copy()
        inner.update(number.encode())
        outer.update(inner.digest())
        return outer.hexdigest()[:32]

    def _set_key(self, number: str) -> str:
        """The Redis key of a number's set, remembered (see :data:`KEY_MEMO_MAX`)."""
        found = self._set_keys.get(number)
        if found is None:
            if len(self._set_keys) >= KEY_MEMO_MAX:
                self._set_keys.clear()
            found = self._set_keys[number] = keys.history_calls(self.number_key(number))
        return found

    def _upkeep(self, key: str, added: int) -> tuple[bool, bool]:
        """Whether a number's set, given ``added`` calls, is due a trim and an expiry.

        Its expiry is pushed back at most every tenth of the retention (to 1.1x the
        retention, so the set outlives each call it holds by the retention at least), and
        it is trimmed to the newest ``max_per_number`` after every tenth of that many
        calls this process added. Age is not trimmed: :meth:`calls` never reads past the
        retention. So a set holds about ``max_per_number`` calls (a tenth more per
        process at most, between trims), and a busy number costs a write, not three."""
        settings = self.settings
        state = self._upkept.get(key)
        now = time.monotonic()
        if state is None:
            if len(self._upkept) >= KEY_MEMO_MAX:
                self._upkept.clear()  # forgotten sets get both at their next write: safe
            state = self._upkept[key] = [-math.inf, 0]
        state[1] += added
        trim = state[1] >= max(1, settings.max_per_number // 10)
        if trim:
            state[1] = 0
        expire = now - state[0] >= self._refresh_s
        if expire:
            state[0] = now
        return trim, expire

    async def _send(self, chunk: list[Encoded]) -> int:
        """Write ``chunk``; returns how many of its records were written whole (their
        stream entry and their numbers' sets), counting the others as dropped."""
        by_key: dict[str, int] = {}
        for _, _, sets in chunk:
            for key in sets:
                by_key[key] = by_key.get(key, 0) + 1
        upkeep = {key: self._upkeep(key, added) for key, added in by_key.items()}
        if self.cluster:
            return await self._send_commands(chunk, upkeep)
        settings = self.settings
        index = {key: slot for slot, key in enumerate(upkeep, start=2)}
        metas = []
        for _, at_ms, sets in chunk:
            slots = [index[key] for key in sets] + [0, 0]
            metas.append(f"{at_ms} {slots[0]} {slots[1]}")
        args = (
            1 + len(index), keys.HISTORY_RECENT, *index,
            settings.max_entries, -settings.max_per_number - 1, self._ttl_s,
            b"\n".join([data for data, _, _ in chunk]), "\n".join(metas),
            "".join([_UPKEEP_LETTERS[due] for due in upkeep.values()]),
        )  # fmt: skip
        (reply,) = await self.dispatcher.run([("EVALSHA", _ADD_CHUNK_SHA, *args)])
        if isinstance(reply, NoScriptError):  # a restarted or flushed server
            (reply,) = await self.dispatcher.run([("EVAL", _ADD_CHUNK, *args)])
        if isinstance(reply, Exception):
            for key in upkeep:  # their expiry may not be set: set it at the next write
                self._upkept.pop(key, None)
            self._drop(len(chunk), reply)
            return 0
        return len(chunk)

    async def _send_commands(
        self, chunk: list[Encoded], upkeep: dict[str, tuple[bool, bool]]
    ) -> int:
        """On a Cluster: the numbers' sets are on many nodes, so plain commands, each
        node's share in one write (:mod:`core.shards`)."""
        settings = self.settings
        by_key: dict[str, list[Any]] = {}
        commands: list[Command] = []
        for data, at_ms, sets in chunk:
            commands.append(("XADD", keys.HISTORY_RECENT, "*", "r", data))
            for key in sets:
                by_key.setdefault(key, []).extend((at_ms, data))
        for key, members in by_key.items():
            commands.append(("ZADD", key, *members))
            trim, expire = upkeep[key]
            if trim:
                commands.append(("ZREMRANGEBYRANK", key, 0, -settings.max_per_number - 1))
            if expire:
                commands.append(("EXPIRE", key, self._ttl_s))
        commands.append(("XTRIM", keys.HISTORY_RECENT, "MAXLEN", "~", settings.max_entries))
        replies = await self.dispatcher.run(commands)
        failed = {
            command[1] for command, reply in zip(commands, replies, strict=True)
            if isinstance(reply, Exception) and command[0] != "XADD"
        }  # fmt: skip
        for key in failed:  # its expiry may not be set: set it at the next write
            self._upkept.pop(key, None)
        written = 0
        error: BaseException | None = None
        for (_, _, sets), reply in zip(chunk, replies, strict=False):
            if isinstance(reply, Exception) or failed.intersection(sets):
                error = reply if isinstance(reply, Exception) else error
                continue
            written += 1
        if written < len(chunk):
            why = error or next(r for r in replies if isinstance(r, Exception))
            self._drop(len(chunk) - written, why)
        return written

    # --- the reads (operator API) ------------------------------------------------------
    async def calls(
        self, number: str, since_s: float, until_s: float, limit: int
    ) -> list[dict[str, Any]]:
        """A canonical number's recorded calls in ``[since_s, until_s]``, newest first,
        none older than ``history.retention_s`` (the writer leaves them to expiry)."""
        since_s = max(since_s, time.time() - self.settings.retention_s)
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


def _hmac_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after the HMAC inner and outer key pads (RFC 2104)."""
    if len(key) > SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in key))
    return inner, hashlib.sha256(bytes(byte ^ 0x5C for byte in key))
