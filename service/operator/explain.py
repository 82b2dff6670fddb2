"""``POST /v1/explain[/tg/{trunk_group}]``: why a call would be blocked or allowed.

Takes the screening body and answers the decision, the rule and list that decided it,
the dry-run matches on the way and the caller as parsed. Nothing is counted: explain
leaves metrics and call-rate counters alone.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from core import overlay, subscriber_overlay
from core.subscribers import Side, code_of
from service.appkeys import CONFIG, SCREENER, STORE
from service.edge.body import BadRequest, policy_of, read_body, refuse
from service.operator.admin import explain_refusal
from service.screening.policy import CompiledPolicy, Evaluation

_JSON = "application/json"


def _explanation(
    group: str, policy: CompiledPolicy, evaluation: Evaluation, call: Any, from_overlay: bool | None
) -> bytes:
    outcome = evaluation.outcome
    return orjson.dumps(
        {
            "decision": outcome.action,
            "answer": orjson.Fragment(outcome.answer),
            "trunk_group": None if group.startswith("_") else group,
            "policy": policy.name,
            "rule": outcome.rule,
            "list": outcome.list,
            "matched": evaluation.matched,
            "overlay": from_overlay,
            "on_error": evaluation.fallback,
            "dry_run_matches": [
                {"rule": dry.rule, "list": dry.list, "matched": matched}
                for dry, matched in evaluation.dry_runs
            ],
            "caller": {
                "number": call.caller,
                "source": call.caller_source,
                "user": call.caller_user,
                "name": call.caller_name or None,
                "anonymous": call.anonymous,
                "invalid_number": call.invalid_number,
                "verstat": call.verstat,
            },
            "called": call.called,
            "stir": call.stir.explain() if call.stir is not None else None,
            "call_id": call.call_id,
        }
    )


async def explain(request: web.Request) -> web.Response:
    """Explain one call; admin tokens guard it when configured."""
    if (refusal := explain_refusal(request)) is not None:
        return refusal
    screener = request.app[SCREENER]
    try:
        group, policy = policy_of(screener, request)
        body = await read_body(request)
    except BadRequest as exc:
        return refuse(screener, exc)
    call = screener.parser.parse(body)
    decision = await screener.decide(policy, call, count=False, trunk_group=group)
    if call.stir is None and screener.stir is not None:  # shown even when no rule asked
        call.stir = await screener.stir.verify(call, policy.trust_verstat, screener.deadline_s / 2)
    from_overlay = await _from_overlay(request, decision)
    answer = _explanation(group, policy, decision, call, from_overlay)
    return web.Response(body=answer, content_type=_JSON)


async def _from_overlay(request: web.Request, evaluation: Evaluation) -> bool | None:
    """Whether the matched entry of a list with a source is an admin overlay add.

    None when no list entry decided, or the list has no source (no overlay).
    """
    name, matched = evaluation.outcome.list, evaluation.matched
    spec = request.app[CONFIG].lists.get(name) if name else None
    if name is None or matched is None or spec is None or spec.source is None:
        return None
    redis = request.app[STORE].redis
    if spec.kind == "subscribers":
        # "<entry> (subscriber <called>)" (service/screening/policy.py); the rule's action
        # names the side it read.
        entry, _, rest = matched.partition(" (subscriber ")
        side: Side = "allow" if evaluation.outcome.action == "allow" else "block"
        kept = await subscriber_overlay.of_subscriber(redis, name, rest.rstrip(")"))
        return any(k.add and k.code == code_of(entry, side) for k in kept)
    state, _ = await overlay.state_of(redis, name, matched)
    return state == "add"
