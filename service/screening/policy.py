"""The policy engine (docs/configuration.md): ordered rules, first match wins, then the default.

Policies are compiled once into :class:`CompiledPolicy` objects with pre-encoded
answers. Evaluation is pure (the call and the local lists in, an :class:`Evaluation`
out). ``dry_run`` rules are recorded and skipped. At the first ``call_rate``,
``sequential_dialing`` or ``caller_in_subscriber_list`` rule evaluation stops with
:class:`NeedsRates` (returned); the screener fetches what Redis holds in one round trip
(:mod:`core.fraud` plans the fraud rules' part) and resumes there, so each rule is
evaluated once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from core.config import Config, Operands, Policy, Rule
from core.fraud import KeyedRate, SequenceRule
from core.subscribers import NO_ENTRIES, Entries, Side
from service.screening.lists import ListObject, NameList, NumberList, PrefixList
from service.screening.request import Call

if TYPE_CHECKING:
    from service.screening.stir.verify import Pending

Lists = Mapping[str, ListObject]
Rates = Mapping[str, int] | None


class EntriesFound(Protocol):
    """The called subscriber's entries per subscribers list: a mapping of those read from
    Redis, or the entries cache's view (service/screening/subscriber_cache.py), whose
    ``get`` gives None for a subscriber it does not hold."""

    def get(self, name: str, default: Entries, /) -> Entries | None: ...


#: Per subscribers list, the called subscriber's entries; None before any were read.
Found = EntriesFound | None
ALLOW_ANSWER = b"[]"
DEFAULT_RULE = "default"
ON_ERROR_RULE = "on_error"
#: What a rule's ``test`` returns when it needs what Redis holds first (compared by
#: identity; evaluate() then returns a :class:`NeedsRates`).
NEEDS_REDIS = "needs Redis"


def reject_answer(operands: Operands) -> bytes:
    return orjson.dumps([{"action": "reject", "operands": list(operands)}])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a matched rule (or the default) decides; shared by every call it decides."""

    action: str
    rule: str
    list: str | None
    answer: bytes
    operands: Operands | None = None


def outcome_for(action: str, operands: Operands, rule: str, list_name: str | None) -> Outcome:
    if action == "allow":
        return Outcome("allow", rule, list_name, ALLOW_ANSWER)
    return Outcome("reject", rule, list_name, reject_answer(operands), operands)


class ListsUnavailable(Exception):
    """A list a rule needs is not loaded, or the local copies are too stale to trust."""


class NeedsRates:
    """Where evaluation stopped: at a ``call_rate`` or ``caller_in_subscriber_list`` rule
    that needs the counts and subscriber entries from Redis first.

    ``at`` is the index of that rule and ``dry_runs`` the dry-run matches before it:
    :meth:`CompiledPolicy.evaluate` resumes from there once the reads are in. Returned,
    not raised: a raised one would carry a traceback whose frames hold it, a reference
    cycle per call that only the cyclic collector frees.
    """

    __slots__ = ("at", "dry_runs", "stir")

    def __init__(
        self,
        at: int = 0,
        dry_runs: tuple[tuple[Outcome, str], ...] = (),
        *,
        stir: Pending | None = None,
    ) -> None:
        self.at = at
        self.dry_runs = dry_runs
        #: The call's STIR/SHAKEN verification waits for its certificate or its signature
        #: check first (nothing evaluated yet).
        self.stir = stir


@dataclass(frozen=True, slots=True)
class RateRule:
    """A ``call_rate`` rule as the counter sees it."""

    key: str
    limit: int
    window_s: int
    #: What calls are counted by (``Rule.key``); ``caller`` rules are counted by
    #: ``ListStore.fetch_for_call``, the others by :mod:`core.fraud`.
    by: str = "caller"
    prefix_digits: int = 0


@dataclass(slots=True)
class Evaluation:
    """What decided a call. Never changed once made: the "no rule matched" one is shared."""

    outcome: Outcome
    #: The list entry or fact that matched (explain).
    matched: str | None = None
    #: Dry-run rules that matched on the way, with what they matched.
    dry_runs: tuple[tuple[Outcome, str], ...] = ()
    #: Why ``on_error`` answered instead of the lists (set by the screener; see
    #: service/screening/screen.py); None when the lists decided.
    fallback: str | None = None


class CompiledRule:
    """One rule; :meth:`test` returns what matched (non-empty string) or None."""

    def __init__(self, rule: Rule, policy: str) -> None:
        self.rule = rule
        self.match = rule.match
        self.list_name = rule.list
        #: ``list_name`` as a key ("" for rules without a list, which never look one up).
        self.list_key = rule.list or ""
        self.dry_run = rule.dry_run
        self.outcome = outcome_for(rule.action, rule.operands, rule.name, rule.list)
        self.rule_key = f"{policy}:{rule.name}"
        self.rate = (
            RateRule(self.rule_key, rule.limit, rule.window_s, rule.key, rule.prefix_digits or 0)
            if rule.limit is not None and rule.window_s is not None
            else None
        )
        self.sequence = (
            SequenceRule(self.rule_key, rule.window_s, rule.max_gap, rule.track)
            if rule.match == "sequential_dialing" and rule.window_s is not None
            else None
        )
        #: ``neighbour_spoofing``: the allow list ("" for none) and the verstats it spares.
        self.unless_key = rule.unless_list or ""
        self.unless_verstat = frozenset(v.lower() for v in rule.unless_verstat)
        #: ``caller_in_subscriber_list``: a reject rule reads the block entries, an
        #: allow rule the allow entries.
        self.side: Side = "allow" if rule.action == "allow" else "block"
        self.stir_results = frozenset(rule.results)
        self.stir_reasons = frozenset(rule.reasons)
        self.stir_attest = frozenset(rule.attest)
        self.test: Callable[[Call, Lists, Rates, Found], str | None] = getattr(
            self, "_" + rule.match
        )

    # One method per condition; __init__ binds the rule's own as ``test`` so a call
    # costs one attribute look-up, not a chain of comparisons. A list missing from
    # ``lists`` raises KeyError, which evaluate() reports as ListsUnavailable; a rule
    # that needs Redis's counts or entries first returns NEEDS_REDIS.
    def _caller_in_list(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        numbers: NumberList = lists[self.list_key]  # type: ignore[assignment]
        number = call.caller_int
        return call.caller if number is not None and number in numbers else None

    def _caller_prefix_in_list(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        prefixes: PrefixList = lists[self.list_key]  # type: ignore[assignment]
        return prefixes.match(call.caller) if call.caller else None

    def _caller_name_matches_list(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        names: NameList = lists[self.list_key]  # type: ignore[assignment]
        return names.match(call.caller_name)

    def _called_in_list(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        numbers: NumberList = lists[self.list_key]  # type: ignore[assignment]
        number = call.called_int
        return call.called if number is not None and number in numbers else None

    def _anonymous(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        return "anonymous" if call.anonymous else None

    def _invalid_number(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        if not call.invalid_number:
            return None
        return call.caller or call.caller_user or "invalid"

    def _attestation_failed(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        return call.verstat if call.attestation_failed else None

    def _stir_result(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        stir = call.stir  # set by the screener for every policy with stir rules
        if stir is None or stir.result not in self.stir_results:
            return None
        if stir.reason is None:
            return str(stir.result)
        if self.stir_reasons and stir.reason not in self.stir_reasons:
            return None
        return f"{stir.result} ({stir.reason})"

    def _stir_attestation(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        stir = call.stir
        if stir is None or stir.result != "valid" or stir.attest not in self.stir_attest:
            return None
        return f"attest {stir.attest}"

    def _call_rate(self, call: Call, lists: Lists, rates: Rates, found: Found) -> str | None:
        assert self.rate is not None
        by = self.rate.by
        # Anonymous callers have no identity to count, except towards a number or a
        # trunk group (core.fraud.subject_of).
        if call.caller is None and by not in ("called", "trunk_group"):
            return None
        if by in ("called", "caller_called") and call.called is None:
            return None
        if rates is None:
            return NEEDS_REDIS
        count = rates.get(self.rate.key, 0)
        if count <= self.rate.limit:
            return None
        per = "" if by == "caller" else f" by {by}"
        return f"{count} calls{per} in {self.rate.window_s}s"

    def _caller_in_subscriber_list(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        lists[self.list_key]  # raises KeyError when not loaded: evaluate() reports it
        caller, called = call.caller, call.called
        if caller is None or called is None:
            return None
        entries = found.get(self.list_key, NO_ENTRIES) if found is not None else None
        if entries is None:  # not read yet (nor cached)
            return NEEDS_REDIS
        matched = entries.match(self.side, caller)
        return f"{matched} (subscriber {called})" if matched else None

    def _sequential_dialing(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        if call.caller is None or call.called is None:
            return None
        if rates is None:
            return NEEDS_REDIS
        run = rates.get(self.rule_key, 1)
        rule = self.rule
        if run < rule.run_length:
            return None
        return f"{run} numbers at most {rule.max_gap} apart in {rule.window_s}s"

    def _neighbour_spoofing(
        self, call: Call, lists: Lists, rates: Rates, found: Found
    ) -> str | None:
        caller, called, digits = call.caller, call.called, self.rule.digits
        if caller is None or called is None or len(caller) <= digits or len(called) <= digits:
            return None
        if caller[:digits] != called[:digits]:
            return None
        verstat = call.verstat
        if verstat is not None and verstat.lower() in self.unless_verstat:
            return None
        if self.unless_key:
            allowed: NumberList | None = lists.get(self.unless_key)  # type: ignore[assignment]
            if allowed is None:
                raise ListsUnavailable(f"list {self.unless_key!r} is not loaded")
            if call.caller_int is not None and call.caller_int in allowed:
                return None
        return f"caller {caller} shares {caller[:digits]} with the called number"


class CompiledPolicy:
    """A policy ready to evaluate calls."""

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.rules = tuple(CompiledRule(rule, name) for rule in policy.rules)
        self.default = outcome_for(policy.default, policy.default_operands, DEFAULT_RULE, None)
        self._by_default = Evaluation(self.default)
        self.lists = frozenset(r.list_name for r in self.rules if r.list_name is not None) | {
            r.unless_key for r in self.rules if r.unless_key
        }
        #: Call-rate rules counted by caller (``ListStore.fetch_for_call``'s counters).
        self.rate_rules = tuple(
            r.rate for r in self.rules if r.rate is not None and r.rate.by == "caller"
        )
        #: ``(rule key, window_s)`` of each, as ``fetch_for_call`` takes them.
        self.rate_windows = tuple((rate.key, rate.window_s) for rate in self.rate_rules)
        #: The rules :mod:`core.fraud` reads for: rates by other keys, sequential dialing.
        self.keyed_rates = tuple(
            KeyedRate(r.rate.key, r.rate.by, r.rate.window_s, r.rate.prefix_digits)
            for r in self.rules
            if r.rate is not None and r.rate.by != "caller"
        )
        self.sequences = tuple(r.sequence for r in self.rules if r.sequence is not None)
        #: Whether a call reaching a remote rule needs Redis whatever the entries cache
        #: holds (counters to add to or read).
        self.counts_calls = bool(self.rate_rules or self.keyed_rates or self.sequences)
        #: The call's STIR/SHAKEN result is worked out before evaluating (screen.py).
        self.uses_stir = any(r.match.startswith("stir_") for r in self.rules)
        self.trust_verstat = policy.trust_verstat
        #: Subscribers lists whose entries a call reaching a remote rule reads.
        self.subscriber_lists = tuple(
            sorted({r.list_key for r in self.rules if r.match == "caller_in_subscriber_list"})
        )

    def evaluate(
        self,
        call: Call,
        lists: Mapping[str, ListObject],
        rates: Mapping[str, int] | None = None,
        found: Found = None,
        resume: NeedsRates | None = None,
    ) -> Evaluation | NeedsRates:
        """Decide ``call``, or say where it stopped for Redis (:class:`NeedsRates`, see
        the module doc); raises ListsUnavailable.

        ``resume``: the NeedsRates an earlier evaluation of the same call returned; the
        rules before it are not evaluated again.
        """
        dry_runs: tuple[tuple[Outcome, str], ...] = ()
        start = 0
        if resume is not None:
            start, dry_runs = resume.at, resume.dry_runs
        rules = self.rules
        for at in range(start, len(rules)):
            rule = rules[at]
            try:
                matched = rule.test(call, lists, rates, found)
            except KeyError:
                if rule.list_name is None or rule.list_name in lists:
                    raise
                raise ListsUnavailable(f"list {rule.list_name!r} is not loaded") from None
            if matched is None:
                continue
            if matched is NEEDS_REDIS:
                return NeedsRates(at, dry_runs)
            if rule.dry_run:
                dry_runs += ((rule.outcome, matched),)
                continue
            return Evaluation(rule.outcome, matched, dry_runs)
        return Evaluation(self.default, None, dry_runs) if dry_runs else self._by_default

    def conclude(
        self,
        call: Call,
        lists: Lists,
        rates: Rates = None,
        found: Found = None,
        resume: NeedsRates | None = None,
    ) -> Evaluation:
        """:meth:`evaluate` for a caller holding every read its remote rules can need, or a
        policy without any: raises RuntimeError when a rule still needs Redis."""
        decision = self.evaluate(call, lists, rates, found, resume)
        if isinstance(decision, NeedsRates):
            raise RuntimeError(f"policy {self.name!r}: rule {decision.at} still needs Redis")
        return decision


def compile_policies(config: Config) -> dict[str, CompiledPolicy]:
    return {name: CompiledPolicy(name, policy) for name, policy in config.policies.items()}
