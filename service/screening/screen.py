"""Deciding one call end to end: parse -> identify the caller -> evaluate -> outcome.

:class:`Screener` holds what every request needs (parser, compiled policies, the list
cache, the store for call-rate counts, metrics) and turns failures into ``on_error``
outcomes: nothing that goes wrong while deciding becomes an HTTP error.

A policy that needs a list the cache does not answer from is decided by ``on_error``:
``list_lost`` when Redis lost the list's data, ``list_not_loaded`` when it was never
loaded, or has a source and was never synced (see :mod:`service.screening.cache`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, cast

from redis.exceptions import RedisError

from core import fraud
from core.config import Config
from core.keys import SUBSCRIBER_BUCKETS, subscriber_bucket_of
from core.logs import log_fields
from core.store import ListStore
from core.subscribers import Entries
from service.metrics import ROOT_TRUNK_GROUP, Metrics
from service.ratelimit import RateLimitedLog
from service.screening.cache import LIST_LOST, LIST_NOT_LOADED, ListCache
from service.screening.lists import SubscriberList
from service.screening.policy import (
    ON_ERROR_RULE,
    CompiledPolicy,
    Evaluation,
    ListsUnavailable,
    NeedsRates,
    compile_policies,
    outcome_for,
)
from service.screening.request import Call, CallParser
from service.screening.stir.verify import Pending, Verification, Verifier
from service.screening.subscriber_cache import CachedFound, SubscriberCache

if TYPE_CHECKING:
    from service.screening.history import CallHistory

logger = logging.getLogger(__name__)

STALE_LISTS = "stale_lists"
#: Logged once an on_error reason has not been seen for RECOVERED_QUIET_S.
RECOVERED = "answers normal again: on_error (%s) stopped after %d on_error answers"
RECOVERED_QUIET_S = 1.0
#: Cached subscribers one renewal read asks for at most (one round trip).
RENEW_BATCH = 256
#: A renewal waits this long before it reads, gathering the entries that fall due
#: meanwhile into its batch (a round trip per entry would cost nearly a miss each).
RENEW_GATHER_S = 0.05
#: After a renewal whose reads all failed, none starts again for this long: the
#: entries age out and calls read them, as without renewals.
RENEW_PAUSE_S = 1.0


def mask_number(number: str | None) -> str:
    """``15162065613`` -> ``1516206****``: enough to group by area, not to identify."""
    if not number:
        return "-"
    return number[:-4] + "****" if len(number) > 4 else "****"


class Screener:
    """Everything the request path needs, built once per worker."""

    def __init__(
        self, config: Config, cache: ListCache, store: ListStore, metrics: Metrics
    ) -> None:
        self.cache = cache
        self.store = store
        self.metrics = metrics
        #: One warning per on_error reason per 10 s, and a line when the reason stops.
        self._warn = RateLimitedLog(
            logger, interval_s=10.0, recovered=RECOVERED, quiet_s=RECOVERED_QUIET_S
        )
        #: Set while call history is on (service/app.py).
        self.history: CallHistory | None = None
        #: STIR/SHAKEN verification, set up by the app when a policy has ``stir_*`` rules.
        self.stir: Verifier | None = None
        #: Subscribers' entries read lately, answered from without Redis while fresh.
        #: Per subscribers list: (generation, buckets calls found without their marker).
        self.lost_buckets: dict[str, tuple[int, set[int]]] = {}
        self.subscribers = SubscriberCache(
            config.cache.subscriber_entries, config.cache.subscriber_max_age_ms
        )
        metrics.subscriber_cache.cache = self.subscribers
        self._cached_found = CachedFound(self.subscribers)
        #: The task reading due cache entries again, while one runs; none starts before
        #: this (cache clock seconds) after one whose reads all failed.
        self._renewal: asyncio.Task[None] | None = None
        self._renew_from = 0.0
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the policies, trunk groups, handler and caller settings from ``config``.

        Used at start and by a config reload in place: it awaits nothing, so a request
        sees either the old settings or the new ones, never a mix. The lists in use
        must be the same (the cache is kept).
        """
        self.config = config
        self.parser = CallParser(config.caller.sources, config.caller.default_country)
        self.policies = compile_policies(config)
        self.deadline_s = config.handler.deadline_ms / 1000
        self.on_error = Evaluation(
            outcome_for(
                config.handler.on_error, config.handler.on_error_operands, ON_ERROR_RULE, None
            )
        )
        self.mask_callers = config.server.mask_callers
        if self.stir is not None:
            self.stir.reconfigure(config.caller.default_country, self.deadline_s)
        self.subscribers.resize(config.cache.subscriber_entries, config.cache.subscriber_max_age_ms)
        self._by_group: dict[str | None, tuple[str, CompiledPolicy]] = {
            None: (ROOT_TRUNK_GROUP, self.policies[config.default_policy])
        }
        for group, spec in config.trunk_groups.items():
            self._by_group[group] = (group, self.policies[spec.policy])

    def policy_for(self, trunk_group: str | None) -> tuple[str, CompiledPolicy] | None:
        """(metrics label, policy) for a trunk group (None: ``POST /``), or None if unknown."""
        return self._by_group.get(trunk_group)

    def _fallback(self, reason: str, detail: str) -> Evaluation:
        self.metrics.fallback(reason)
        self._warn.warning("answering by on_error (%s): %s", reason, detail, cause=reason)
        return Evaluation(self.on_error.outcome, fallback=reason)

    def _unavailable(self, policy: CompiledPolicy, exc: ListsUnavailable) -> Evaluation:
        """The on_error answer for a policy whose list the cache does not answer from."""
        why = self.cache.distrust_of(policy.lists)
        if why is None:
            return self._fallback(LIST_NOT_LOADED, str(exc))
        return self._fallback(why.reason, why.detail)

    def decide_locally(self, policy: CompiledPolicy, call: Call) -> Evaluation | NeedsRates:
        """Decide ``call`` from the local list copies, without awaiting anything.

        Returns where evaluation stopped (:class:`NeedsRates`) when a ``call_rate`` or
        ``caller_in_subscriber_list`` rule needs Redis first: pass it to
        :meth:`decide_remote`. Never raises for Redis or list trouble.
        """
        cache = self.cache
        warn = self._warn
        if warn.active:
            warn.settle()
        stale = cache.stale_among(policy.lists)
        if stale is not None:
            return self._fallback(STALE_LISTS, cache.staleness(stale))
        if policy.uses_stir and call.stir is None and self.stir is not None:
            found = self.stir.verify_now(call, policy.trust_verstat)
            if type(found) is not Verification:  # decide_remote waits for the certificate
                return NeedsRates(stir=cast(Pending, found))  # or the signature helper
            call.stir = found
        cached = None
        if policy.subscriber_lists and not policy.counts_calls:
            # Only subscriber rules can need Redis: they look in the entries cache as
            # they are reached, and stop for Redis only on a miss.
            cached = self._cached_found.start(cache.lists, call)
        try:
            decision = policy.evaluate(call, cache.lists, None, cached)
        except ListsUnavailable as exc:
            return self._unavailable(policy, exc)
        finally:
            if cached is not None:
                cached.release()
        if cached is not None and cached.served and type(decision) is not NeedsRates:
            subscribers = self.subscribers
            subscribers.hits += len(cached.served)  # a miss is counted by decide_remote
            if subscribers.due:
                self._renew_due()
        # A decision, or where evaluation stopped: Redis (a counting policy whatever the
        # entries cache holds).
        return decision

    async def decide(
        self,
        policy: CompiledPolicy,
        call: Call,
        *,
        count: bool = True,
        trunk_group: str = ROOT_TRUNK_GROUP,
    ) -> Evaluation:
        """Decide ``call`` under ``policy``: the local rules, then the remote reads if needed.

        ``count=False`` (explain) reads call-rate counters without adding this call.
        """
        decision = self.decide_locally(policy, call)
        if isinstance(decision, NeedsRates):
            return await self.decide_remote(
                policy, call, decision, count=count, trunk_group=trunk_group
            )
        return decision

    async def decide_remote(
        self,
        policy: CompiledPolicy,
        call: Call,
        pending: NeedsRates,
        *,
        count: bool = True,
        trunk_group: str = ROOT_TRUNK_GROUP,
        arrived: float | None = None,
    ) -> Evaluation:
        """Finish a decision :meth:`decide_locally` left at a remote rule.

        Call-rate counts and subscriber entries come in one pipelined round trip under
        ``handler.deadline_ms``; a call that reaches a remote rule counts itself for every
        call-rate rule of its policy (docs/subscribers.md). Evaluation resumes at the rule
        that stopped it. A bucket without its marker (Redis lost it: core/keys.py) makes
        that list unavailable for this call: reaching its rule answers by ``on_error``
        with reason ``list_lost``. The fraud rules' reads (:mod:`core.fraud`; rates by
        ``trunk_group`` use the metrics label) ride in the same round trip.

        ``arrived`` (a :func:`time.perf_counter` reading) is when the request arrived
        (service/edge/handlers.py): the Redis wait gets what is left of the deadline from
        then, so the whole call, not only its Redis read, is answered within
        ``handler.deadline_ms``; with nothing left it answers by ``on_error`` at once.
        """
        budget_s = self.deadline_s
        if pending.stir is not None:
            decision, budget_s = await self._verify_stir(policy, call, pending.stir)
            if not isinstance(decision, NeedsRates):
                return decision
            pending = decision
        cache = self.cache
        if policy.subscriber_lists:
            reads, held, cached = self.subscribers.lookup(
                policy.subscriber_lists, cache.lists, call
            )
            if self.subscribers.due:
                self._renew_due()
        else:
            reads, held, cached = [], [], {}
        now_s = time.time()
        plan = None
        if policy.keyed_rates or policy.sequences:
            plan = fraud.plan(
                policy.keyed_rates,
                policy.sequences,
                caller=call.caller,
                called=call.called,
                trunk_group=trunk_group,
                now_s=now_s,
                increment=count,
                upkeep=self.store.upkeep,
                resp=self.store.sends_text,
            )
        started = time.perf_counter()
        budget_s = self.deadline_s - (started - arrived if arrived is not None else 0.0)
        if budget_s <= 0:
            return self._fallback("deadline", "no time left for the Redis read")
        sent_at = self.subscribers.clock() if reads else 0.0
        try:
            counts, packed, lost, replies = await self.store.fetch_for_call(
                call.caller,
                policy.rate_windows,
                now_s,
                increment=count,
                subscribers=reads,
                extra=plan.commands if plan is not None else (),
                extra_text=plan.text if plan is not None else None,
                timeout_s=budget_s,
            )
        except TimeoutError:
            return self._fallback("deadline", f"Redis read took over {budget_s:.3f}s")
        except (RedisError, OSError) as exc:
            # The store turns anything the client raises into a RedisError (core/shards.py).
            return self._fallback("redis_error", f"Redis read failed: {exc}")
        self.metrics.redis_rate.observe(time.perf_counter() - started)
        if plan is not None:
            counts.update(plan.read(replies))
            self.store.send_later(plan.repairs(replies))
        if count:
            self.metrics.rates_seen(counts, now_s)
        found = cached
        if reads:
            found = {name: Entries.unpack(blob) for name, blob in packed.items()}
            for (name, _, subscriber), copy in zip(reads, held, strict=True):
                if name not in lost:  # a bucket without its marker is never cached
                    self.subscribers.put(name, copy, subscriber, found[name], sent_at)
            found.update(cached)
        lists = cache.lists
        if lost:  # rare: copy the (few) list objects without the lost ones
            lists = {name: copy for name, copy in lists.items() if name not in lost}
            self._note_lost(reads, held, lost)
        try:
            return policy.conclude(call, lists, counts, found, resume=pending)
        except ListsUnavailable as exc:
            if not lost or cache.missing(policy.lists - frozenset(lost)):
                return self._unavailable(policy, exc)
        # The rule that needed a lost bucket was reached. Its own log line (rate-limited
        # apart from the other fallbacks'), so another trouble cannot hide it.
        name, gen, subscriber = next(read for read in reads if read[0] in lost)
        self.metrics.fallback(LIST_LOST)
        self._warn.warning(
            "answering by on_error (list_lost): list %r, bucket %d of generation %d has no "
            "marker: Redis lost it (a Cluster master failed over to an empty or lagging "
            "replica?); calls to its subscribers are answered by on_error until a full sync",
            name,
            subscriber_bucket_of(subscriber),
            gen,
            cause="list_lost_bucket",
        )
        return Evaluation(self.on_error.outcome, fallback=LIST_LOST)

    async def _verify_stir(
        self, policy: CompiledPolicy, call: Call, pending: Pending
    ) -> tuple[Evaluation | NeedsRates, float]:
        """Wait (within the deadline) for the call's certificate or signature check, then
        decide locally.

        Also returns what is left of the deadline for a Redis round trip after it.
        """
        assert self.stir is not None
        started = time.perf_counter()
        call.stir = await self.stir.verify(call, policy.trust_verstat, self.deadline_s / 2, pending)
        return self.decide_locally(policy, call), self.deadline_s - (time.perf_counter() - started)

    def _renew_due(self) -> None:
        """Start reading the cache's due entries again off the calls' path, unless a
        renewal runs already or one whose reads all failed ended less than
        RENEW_PAUSE_S ago."""
        if self._renewal is None and self.subscribers.clock() >= self._renew_from:
            self._renewal = self.store.run_later(self._renew())

    async def _renew(self) -> None:
        """Wait RENEW_GATHER_S, so that one batch carries the entries that fall due
        meanwhile, then :meth:`_renew_batches`."""
        try:
            await asyncio.sleep(RENEW_GATHER_S)
            await self._renew_batches()
        finally:
            self._renewal = None

    async def _renew_batches(self) -> None:
        """Read the due entries again, in batches of one round trip each, as a call's
        miss reads them (the copy each was used under is its tag; a bucket without its
        marker drops the entry, so the next call reads it and notices the loss)."""
        cache = self.subscribers
        while cache.due:
            lists = self.cache.lists
            batch = [due for due in cache.take_due(RENEW_BATCH) if lists.get(due[0]) is due[1]]
            if not batch:
                continue
            reads = [(name, copy.gens.of_subscriber(sub), sub) for name, copy, sub in batch]
            sent_at = cache.clock()
            try:
                found = await self.store.read_subscribers(reads, self.deadline_s)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.debug("renewing cached subscribers failed: %s", exc)
                found = [None] * len(batch)
            for (name, copy, sub), read in zip(batch, found, strict=True):
                if read is None:  # left to age out; a call reads it then
                    cache.renewals_failed += 1
                elif read[1]:
                    cache.put(name, copy, sub, Entries.unpack(read[0]), sent_at)
                    cache.renewed += 1
                else:
                    cache.drop(name, sub)
            if all(read is None for read in found):
                self._renew_from = cache.clock() + RENEW_PAUSE_S
                return

    def _note_lost(
        self,
        reads: list[tuple[str, int, str]],
        held: list[SubscriberList],
        lost: Collection[str],
    ) -> None:
        """Remember which buckets of which live generation calls found lost (operator
        /readyz). ``held``: the copy each read was made in (a read names its bucket's
        own generation, which an unchanged bucket keeps from an earlier sync)."""
        for (name, _, subscriber), copy in zip(reads, held, strict=True):
            gen = copy.gen
            if name in lost:
                seen_gen, buckets = self.lost_buckets.get(name, (gen, set()))
                if seen_gen != gen:  # a newer generation: what the old one lost is moot
                    buckets = set()
                buckets.add(subscriber_bucket_of(subscriber))
                self.lost_buckets[name] = (gen, buckets)

    def lost_bucket_report(self) -> dict[str, dict[str, float]]:
        """Per subscribers list, the buckets of its live generation calls found lost."""
        report = {}
        for name, (gen, buckets) in sorted(self.lost_buckets.items()):
            held = self.cache.lists.get(name)
            if isinstance(held, SubscriberList) and held.gen == gen and buckets:
                share = len(buckets) / SUBSCRIBER_BUCKETS
                report[name] = {"gen": gen, "buckets_seen_lost": len(buckets), "share": share}
        return report

    def record(self, group: str, call: Call, evaluation: Evaluation) -> None:
        """Count a decision and log a rejected call (one line each).

        The log lines carry their fields twice: in the text (``k=v``) and as record
        attributes, which JSON logs turn into fields; the Call-ID comes with every line of the
        request as its request id (core/logs.py).
        """
        outcome = evaluation.outcome
        metrics = self.metrics
        metrics.decided(group, outcome.action, outcome.rule)
        if call.stir is not None:
            metrics.stir_result(call.stir.result, call.stir.reason, call.stir.attest)
        for dry, _matched in evaluation.dry_runs:
            metrics.decided(group, dry.action, dry.rule, dry_run=True)
            self._log_call("dry-run match", group, dry.rule, dry.list, call)
        if outcome.action == "reject":
            self._log_call("rejected call", group, outcome.rule, outcome.list, call)
        if self.history is not None:
            self.history.add(group, call, evaluation)

    def _log_call(
        self, event: str, group: str, rule: str, list_name: str | None, call: Call
    ) -> None:
        caller = self._caller(call)
        list_name = list_name or "-"
        log_fields(
            logger,
            logging.INFO,
            "%s trunk_group=%s rule=%s list=%s caller=%s",
            (event, group, rule, list_name, caller),
            {"trunk_group": group, "rule": rule, "list": list_name, "caller": caller},
        )

    def _caller(self, call: Call) -> str:
        number = call.caller
        return mask_number(number) if self.mask_callers else (number or "-")
