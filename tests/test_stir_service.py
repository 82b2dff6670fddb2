"""STIR/SHAKEN rules end to end on a real ``python -m service`` process.

One service, one rule per result reason (its reject tag names the reason), an
A-attestation rule that lets callers past the block list and a dry-run for C; a local
HTTPS server in the test serves the certificates.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess
from devtools.stir_pki import StiPKI, make_pki, pem
from service.operator.models import Explanation
from service.screening.stir.certs import encode_tn_auth
from tests.helpers import alive, load_list, wait_for
from tests.procs import ServiceProcess, scrape
from tests.stir_support import CALLER, X5uServer, call_body, signed, stir_settings

REASONS = (
    "bad_signature", "stale", "tn_mismatch", "untrusted_chain", "cert_unavailable", "malformed"
)  # fmt: skip
DEADLINE_MS = 1000


def policy(trust_verstat: bool = False) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {"name": f"stir-{reason}", "match": "stir_result", "results": ["invalid"],
         "reasons": [reason], "operands": ["forbidden", reason]}
        for reason in REASONS
    ]  # fmt: skip
    rules += [
        {"name": "verstat-failed", "match": "stir_result", "results": ["invalid"],
         "operands": ["decline", "verstat"]},
        {"name": "a-attested", "match": "stir_attestation", "attest": ["A"], "action": "allow"},
        {"name": "c-attested", "match": "stir_attestation", "attest": ["C"], "dry_run": True},
        {"name": "no-identity", "match": "stir_result", "results": ["absent"], "dry_run": True},
        {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
    ]  # fmt: skip
    return {"rules": rules, "trust_verstat": trust_verstat}


@pytest.fixture(params=["always", "never"])
def service(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: RedisProcess,
    files: dict[str, Path],
) -> Iterator[ServiceProcess]:
    """The service with and without its signature helper: the same answers either way."""
    stir = stir_settings(files, fetch_timeout_ms=10_000, signature_helper=request.param)
    overrides = {
        "stir": stir,
        "handler": {"deadline_ms": DEADLINE_MS},
        "policies": {"default": policy(), "upstream": policy(trust_verstat=True)},
        "trunk_groups": {"main": {"policy": "default"}, "upstream": {"policy": "upstream"}},
    }
    process = ServiceProcess(tmp_path, redis_server.url, overrides=overrides)
    yield process
    process.stop()


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as response:
        assert response.status == 200
        return await response.json()


def reject(reason: str, tag: str) -> list[dict[str, Any]]:
    return [{"action": "reject", "operands": [reason, tag]}]


async def test_stir_rules_on_a_running_service(
    service: ServiceProcess, server: X5uServer, pki: StiPKI, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", [CALLER])
    service.start()
    await service.ready()
    x5u = server.url("/sp.pem")
    _other, other_key = pki.sp_cert()
    stranger = make_pki()
    server.serve("/stranger.pem", stranger.chain_pem)
    narrow, narrow_key = pki.sp_cert(tn_auth=encode_tn_auth(numbers=("12125551111",)))
    server.serve("/narrow.pem", pem(narrow, pki.intermediate))
    tg = f"{service.url}/tg/main"
    async with aiohttp.ClientSession() as session:
        # The first call with a new certificate may wait for its fetch: within the deadline.
        assert await post(session, tg, call_body(signed(pki, x5u, attest="A"))) == []
        cases = {
            "bad_signature": signed(pki, x5u, key=other_key),
            "stale": signed(pki, x5u, iat=int(time.time()) - 600),
            "tn_mismatch": signed(pki, x5u, orig="12125550000"),
            "untrusted_chain": signed(stranger, server.url("/stranger.pem")),
            "malformed": "garbage;info=<https://x/y>;ppt=shaken",
        }
        for reason, value in cases.items():
            assert await post(session, tg, call_body(value)) == reject("forbidden", reason), reason
        narrow_value = signed(pki, server.url("/narrow.pem"), key=narrow_key)
        assert await post(session, tg, call_body(narrow_value)) == reject(
            "forbidden", "tn_mismatch"
        )
        # A certificate server that hangs: answered within the deadline, not stalled.
        started = time.perf_counter()
        hung = await post(session, tg, call_body(signed(pki, server.url("/hang"))))
        assert hung == reject("forbidden", "cert_unavailable")
        assert time.perf_counter() - started < DEADLINE_MS / 1000 + 0.5
        # The fetch goes on in the background and serves the calls after it.
        server.files["/hang"] = (pki.chain_pem, {})
        server.hang.set()

        async def served() -> bool:
            value = signed(pki, server.url("/hang"), attest="A")
            return bool(await post(session, tg, call_body(value)) == [])

        await wait_for(served, timeout_s=10.0, interval_s=0.2)
        # A-attested callers pass the block list; B-attested ones do not; C is a dry run.
        assert await post(session, tg, call_body(signed(pki, x5u, attest="A"))) == []
        blocked = [{"action": "reject", "operands": ["unavailable", "aniblock"]}]
        assert await post(session, tg, call_body(signed(pki, x5u, attest="B"))) == blocked
        assert await post(session, tg, call_body(signed(pki, x5u, attest="C"))) == blocked
        assert await post(session, tg, call_body(None)) == blocked  # absent: dry run only
        # A trusted upstream verstat decides without a signature (none of these verifies).
        upstream = call_body(signed(pki, server.url("/never.pem"), attest="A"))
        upstream["From"][0]["uri_parameters"] = {"verstat": "TN-Validation-Passed"}
        assert await post(session, f"{service.url}/tg/upstream", upstream) == []
        upstream["From"][0]["uri_parameters"] = {"verstat": "TN-Validation-Failed"}
        assert await post(session, f"{service.url}/tg/upstream", upstream) == reject(
            "decline", "verstat"
        )
        assert await post(session, tg, upstream) == reject("forbidden", "cert_unavailable")

        # Explain shows the decoded PASSporT and each check.
        explain_url = f"{service.url}/v1/explain/tg/main"
        async with session.post(explain_url, json=call_body(cases["tn_mismatch"])) as response:
            explained = await response.json()
        assert explained["rule"] == "stir-tn_mismatch"
        Explanation.model_validate(explained)  # the answer is what the OpenAPI document says
        stir = explained["stir"]
        assert (stir["result"], stir["reason"], stir["attest"]) == ("invalid", "tn_mismatch", "A")
        assert stir["passport"]["payload"]["orig"] == {"tn": "12125550000"}
        assert {c["check"]: c["outcome"] for c in stir["checks"]}["orig.tn"] == "failed"

    samples = await scrape(service.url)
    verified = "callscreen_stir_verifications_total"
    for reason in REASONS:
        assert samples[f'{verified}{{attest="",reason="{reason}",result="invalid"}}'] >= 1, reason
    assert samples[f'{verified}{{attest="A",reason="",result="valid"}}'] >= 4
    assert samples[f'{verified}{{attest="",reason="verstat_failed",result="invalid"}}'] == 1
    assert samples[f'{verified}{{attest="",reason="",result="absent"}}'] == 1
    dry = 'callscreen_decisions_total{decision="reject",dry_run="true",rule="c-attested",trunk_group="main"}'
    assert samples[dry] == 1
    assert samples['callscreen_stir_cert_fetches_total{outcome="ok"}'] >= 3
    assert samples['callscreen_stir_cache_total{layer="local"}'] >= 1
    # Who checked the signatures: the helper process when there is one, else the worker.
    by_helper = samples['callscreen_stir_signatures_total{checked_by="helper"}']
    by_worker = samples['callscreen_stir_signatures_total{checked_by="worker"}']
    if yaml.safe_load(service.config_path.read_text())["stir"]["signature_helper"] == "always":
        assert by_helper >= 8 and by_worker == 0
    else:
        assert by_helper == 0 and by_worker >= 8


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` and their command lines (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


async def test_each_worker_has_its_own_helper_and_takes_it_along(
    tmp_path: Path, redis_server: RedisProcess, files: dict[str, Path], server: X5uServer,
    pki: StiPKI,
) -> None:  # fmt: skip
    """Two workers, each with its helper answering its calls; stopped, none is left."""
    overrides = {
        "stir": stir_settings(files, signature_helper="always"),
        "handler": {"deadline_ms": DEADLINE_MS},
        "policies": {"default": policy()},
    }
    service = ServiceProcess(tmp_path, redis_server.url, overrides=overrides, workers=2)
    service.start()
    try:
        await service.ready()
        assert service.process is not None
        supervisor = service.process.pid
        workers = [p for p, line in _children(supervisor).items() if "service" in line]
        assert len(workers) == 2
        helpers = {w: _children(w) for w in workers}
        assert all(
            len(found) == 1 and "core.es256" in next(iter(found.values()))
            for found in helpers.values()
        ), helpers
        for _ in range(20):  # new connections: the kernel spreads them over both
            async with aiohttp.ClientSession() as session:
                value = signed(pki, server.url("/sp.pem"), attest="A")
                assert await post(session, f"{service.url}/", call_body(value)) == []

        async def counted() -> bool:  # the workers' metrics reach the scrape in snapshots
            samples = await scrape(service.url)
            by = "callscreen_stir_signatures_total{checked_by=%s}"
            return samples[by % '"helper"'] == 20 and samples[by % '"worker"'] == 0

        await wait_for(counted, timeout_s=10.0, interval_s=0.2, what="20 helper checks")

        # A worker killed outright cannot close its helper: the socket's end does.
        killed = workers[0]
        orphan = list(helpers[killed])
        os.kill(killed, signal.SIGKILL)

        async def orphan_gone() -> bool:
            return not any(alive(pid) for pid in orphan)

        await wait_for(orphan_gone, timeout_s=10.0, what="the killed worker's helper to exit")

        async def replaced() -> bool:  # the supervisor's new worker brings its own
            now = [p for p, line in _children(supervisor).items() if "service" in line]
            return len(now) == 2 and killed not in now and all(len(_children(w)) == 1 for w in now)

        await wait_for(replaced, timeout_s=30.0, interval_s=0.2, what="a new worker and helper")
        workers = [p for p, line in _children(supervisor).items() if "service" in line]
        helpers = {w: _children(w) for w in workers}
    finally:
        service.stop()
    helper_pids = [pid for found in helpers.values() for pid in found]

    async def gone() -> bool:
        return not any(alive(pid) for pid in helper_pids)

    await wait_for(gone, timeout_s=10.0, what="the helpers to exit with their workers")
