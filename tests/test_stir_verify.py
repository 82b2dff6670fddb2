"""STIR/SHAKEN verification against a real HTTPS x5u server and a real Redis.

Each result reason, the certificate cache shared through Redis, the per-value results
cache, and a certificate server that hangs.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core import keys
from core.config import Config
from devtools import stir_sign
from devtools.stir_pki import StiPKI, make_pki, pem
from service.metrics import Metrics
from service.screening.request import Call, CallParser
from service.screening.stir import make_verifier
from service.screening.stir.certs import encode_tn_auth
from service.screening.stir.verify import Pending, Verification, Verifier
from tests.helpers import wait_for
from tests.stir_support import CALLED, CALLER, X5uServer, call_body, signed, stir_settings

PARSER = CallParser(("from", "p-asserted-identity", "remote-party-id"))


@pytest.fixture
async def make_verifier_for(
    make_config: Callable[..., Config], redis: Redis, files: dict[str, Path]
) -> AsyncIterator[Callable[..., Verifier]]:
    made: list[Verifier] = []

    def make(**stir: Any) -> Verifier:
        config = make_config({"stir": stir_settings(files, **stir)})
        verifier = make_verifier(config, redis, Metrics(config, CollectorRegistry()))
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        if verifier.helper is not None:
            await verifier.helper.close()
        await verifier.certs.close()


def call_of(identity: str | None, **options: Any) -> Call:
    return PARSER.parse(call_body(identity, **options))


async def test_a_valid_passport_with_its_attestation(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    for attest in ("A", "B", "C"):
        value = signed(pki, server.url("/sp.pem"), attest=attest, origid="o-1")
        found = await verifier.verify(call_of(value), False, 2.0)
        assert (found.result, found.reason, found.attest, found.origid) == (
            "valid", None, attest, "o-1"
        )  # fmt: skip
    explained = found.explain()
    assert explained["passport"]["payload"]["orig"] == {"tn": CALLER}
    assert [c["check"] for c in explained["checks"]] == [
        "decode", "certificate", "signature", "freshness", "orig.tn", "dest.tn", "tn_auth"
    ]  # fmt: skip
    assert {c["outcome"] for c in explained["checks"]} == {"ok"}
    assert server.hits["/sp.pem"] == 1  # fetched once, then this worker's copy


async def test_no_identity_is_absent_and_unknown_ppt_is_ignored(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    assert (await verifier.verify(call_of(None), False, 1.0)).result == "absent"
    div = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln;info=<https://x/y>;ppt=div"
    assert (await verifier.verify(call_of(div), False, 1.0)).result == "absent"
    # Odd shapes are no header at all, never an error.
    for odd in ("a string, not a list", [{"an": "object"}], [123], [None], [""]):
        body = call_body(None)
        body["Identity"] = odd
        assert (await verifier.verify(PARSER.parse(body), False, 1.0)).result == "absent"
    # A second Identity header with ppt=shaken is the one verified.
    body = call_body(None)
    body["identity"] = [div, signed(pki, server.url("/sp.pem"))]  # any header spelling
    assert (await verifier.verify(PARSER.parse(body), False, 2.0)).result == "valid"


@pytest.mark.parametrize(
    "value",
    [
        "not a passport",
        "a.b;info=<https://x/y>;ppt=shaken",
        "eyJhbGciOiJFUzI1NiJ9..c2ln;info=<https://x/y>;ppt=shaken",  # compact form
        "!!!.!!!.!!!;info=<https://x/y>;ppt=shaken",
    ],
)
async def test_malformed_values(make_verifier_for: Callable[..., Verifier], value: str) -> None:
    found = await make_verifier_for().verify(call_of(value), False, 1.0)
    assert (found.result, found.reason) == ("invalid", "malformed")


async def test_malformed_claims(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    good = signed(pki, server.url("/sp.pem"))
    wrong_info = good.replace(f"info=<{server.url('/sp.pem')}>", "info=<https://other/x.pem>")
    wrong_alg = good.replace("alg=ES256", "alg=RS256")
    bad_attest = signed(pki, server.url("/sp.pem"), attest="D")
    for value in (wrong_info, wrong_alg, bad_attest):
        found = await verifier.verify(call_of(value), False, 1.0)
        assert (found.result, found.reason) == ("invalid", "malformed"), value
    assert server.hits["/sp.pem"] == 0  # nothing fetched for a malformed PASSporT


async def test_stale_and_future_passports_fetch_nothing(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for(max_age_s=60, clock_skew_s=5)
    now = int(time.time())
    for iat in (now - 120, now + 60):
        found = await verifier.verify(
            call_of(signed(pki, server.url("/sp.pem"), iat=iat)), False, 1
        )
        assert (found.result, found.reason) == ("invalid", "stale")
    assert server.hits["/sp.pem"] == 0
    # Within the allowance: valid.
    found = await verifier.verify(
        call_of(signed(pki, server.url("/sp.pem"), iat=now - 50)), False, 2
    )
    assert found.result == "valid"


async def test_tn_mismatch(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    x5u = server.url("/sp.pem")
    for value in (signed(pki, x5u, orig="12125550000"), signed(pki, x5u, dest="12125550000")):
        found = await verifier.verify(call_of(value), False, 2.0)
        assert (found.result, found.reason) == ("invalid", "tn_mismatch")
    # Numbers compare after the service's normalisation: a national From still matches.
    found = await verifier.verify(call_of(signed(pki, x5u), caller=CALLER[1:]), False, 2.0)
    assert found.result == "valid"
    # So do PASSporT numbers written with separators (not compared as strings only).
    spaced = signed(pki, x5u, orig="1-516-206-5613", dest="1 951 262 3062")
    assert (await verifier.verify(call_of(spaced), False, 2.0)).result == "valid"
    # A certificate whose TNAuthList names numbers covers only those.
    narrow, key = pki.sp_cert(tn_auth=encode_tn_auth(numbers=("12125551111",)))
    narrow_x5u = server.serve("/narrow.pem", pem(narrow, pki.intermediate))
    found = await verifier.verify(call_of(signed(pki, narrow_x5u, key=key)), False, 2.0)
    assert (found.result, found.reason) == ("invalid", "tn_mismatch")
    ranged, key = pki.sp_cert(tn_auth=encode_tn_auth(ranges=((CALLER[:-2] + "00", 100),)))
    ranged_x5u = server.serve("/ranged.pem", pem(ranged, pki.intermediate))
    assert (
        await verifier.verify(call_of(signed(pki, ranged_x5u, key=key)), False, 2)
    ).result == "valid"


async def test_bad_signature(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    _other, other_key = pki.sp_cert()
    x5u = server.url("/sp.pem")
    # Signed by another SP's key but naming this SP's certificate.
    forged = signed(pki, x5u, key=other_key)
    found = await verifier.verify(call_of(forged), False, 2.0)
    assert (found.result, found.reason) == ("invalid", "bad_signature")
    assert found.explain()["checks"][-1] == {
        "check": "signature", "outcome": "failed",
        "detail": "does not verify with the certificate's key",
    }  # fmt: skip


async def test_untrusted_chains(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI, tmp_path: Path
) -> None:
    x5u = server.url("/sp.pem")
    # Another STI-CA's chain.
    stranger = make_pki()
    server.serve("/stranger.pem", stranger.chain_pem)
    # An expired SP certificate; one without TNAuthList; the SP alone (no intermediate).
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    expired, expired_key = pki.sp_cert(not_before=past - datetime.timedelta(days=5), not_after=past)
    server.serve("/expired.pem", pem(expired, pki.intermediate))
    bare, bare_key = pki.sp_cert(tn_auth=None)
    server.serve("/bare.pem", pem(bare, pki.intermediate))
    server.serve("/alone.pem", pem(pki.sp))
    server.serve("/junk.pem", b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    verifier = make_verifier_for()
    cases = [
        signed(stranger, server.url("/stranger.pem")),
        signed(pki, server.url("/expired.pem"), key=expired_key),
        signed(pki, server.url("/bare.pem"), key=bare_key),
        signed(pki, server.url("/alone.pem")),
        signed(pki, server.url("/junk.pem")),
    ]
    for value in cases:
        found = await verifier.verify(call_of(value), False, 2.0)
        assert (found.result, found.reason) == ("invalid", "untrusted_chain"), found.checks
    # No trust anchors configured: nothing is trusted.
    found = await make_verifier_for(trust_anchors=None).verify(call_of(signed(pki, x5u)), False, 2)
    assert found.reason == "untrusted_chain"


async def test_a_revoked_certificate_by_crl(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.intermediate.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(pki.sp.serial_number)
            .revocation_date(now - datetime.timedelta(hours=1))
            .build()
        )
        .sign(pki.intermediate_key, hashes.SHA256())
    )
    crl_path = tmp_path / "sti.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    verifier = make_verifier_for(crl_files=[str(crl_path)])
    found = await verifier.verify(call_of(signed(pki, server.url("/sp.pem"))), False, 2.0)
    assert (found.reason, "revoked" in found.checks[-1].detail) == ("untrusted_chain", True)


async def test_trust_anchors_are_reloaded_when_the_file_changes(
    make_verifier_for: Callable[..., Verifier],
    server: X5uServer,
    pki: StiPKI,
    tmp_path: Path,
) -> None:
    anchors = tmp_path / "anchors.pem"
    other = make_pki()
    anchors.write_bytes(pem(other.root))
    verifier = make_verifier_for(trust_anchors=str(anchors))
    value = signed(pki, server.url("/sp.pem"))
    assert (await verifier.verify(call_of(value), False, 2.0)).reason == "untrusted_chain"
    anchors.write_bytes(pem(other.root, pki.root))
    os.utime(anchors, (time.time() + 10, time.time() + 10))
    verifier.certs.trust.maybe_reload(force=True)  # what the periodic check does
    assert (await verifier.verify(call_of(value), False, 2.0)).result == "valid"


async def test_an_unreachable_certificate_is_unavailable_and_remembered(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for(negative_cache_s=30)
    value = signed(pki, server.url("/missing.pem"))
    for _ in range(3):
        found = await verifier.verify(call_of(value), False, 2.0)
        assert (found.result, found.reason) == ("invalid", "cert_unavailable")
    assert server.hits["/missing.pem"] == 1  # not asked again by every call


async def test_a_hanging_certificate_server_does_not_stall_the_call(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for(fetch_timeout_ms=3000)
    server.serve("/slow.pem", pki.chain_pem)
    value = signed(pki, server.url("/hang"))
    started = time.perf_counter()
    found = await verifier.verify(call_of(value), False, 0.05)
    assert time.perf_counter() - started < 0.5
    assert (found.result, found.reason) == ("invalid", "cert_unavailable")
    # The fetch goes on in the background; once the server answers, calls are served.
    server.files["/hang"] = (pki.chain_pem, {})
    server.hang.set()

    async def loaded() -> bool:
        return not verifier.certs.loads

    await wait_for(loaded, timeout_s=5.0)
    assert server.hits["/hang"] == 1
    later = verifier.verify_now(call_of(value))
    assert isinstance(later, Verification) and later.result == "valid"


async def test_the_certificate_cache_is_shared_through_redis(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI, redis: Redis
) -> None:
    x5u = server.serve("/cached.pem", pki.chain_pem, **{"Cache-Control": "max-age=600"})
    value = signed(pki, x5u)
    first, second = make_verifier_for(), make_verifier_for()  # two workers (or hosts)
    assert (await first.verify(call_of(value), False, 2.0)).result == "valid"
    ttl = await redis.ttl(keys.stir_cert(x5u))
    assert 590 <= ttl <= 600
    assert (await second.verify(call_of(value), False, 2.0)).result == "valid"
    assert server.hits["/cached.pem"] == 1  # the second worker read Redis, not the server
    assert isinstance(second.verify_now(call_of(value)), Verification)  # its own copy now


async def test_a_retried_header_is_not_verified_twice(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for(results_cache_size=2)
    value = signed(pki, server.url("/sp.pem"))
    await verifier.verify(call_of(value), False, 2.0)
    metrics = verifier.metrics
    assert metrics is not None
    before = metrics.stir_cache_lookups.labels("result")._value.get()
    again = verifier.verify_now(call_of(value))
    assert isinstance(again, Verification) and again.result == "valid"
    assert metrics.stir_cache_lookups.labels("result")._value.get() == before + 1
    # The cached part holds for this value only: another caller still fails its TN check.
    other = verifier.verify_now(call_of(value, caller="12125550000"))
    assert isinstance(other, Verification) and other.reason == "tn_mismatch"


async def test_a_trusted_verstat_skips_the_signature(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    forged = signed(pki, server.url("/none.pem"), attest="B")  # never fetched
    body = call_body(forged)
    body["From"][0]["uri_parameters"] = {"verstat": "TN-Validation-Passed"}
    found = verifier.verify_now(PARSER.parse(body), trust_verstat=True)
    assert isinstance(found, Verification)
    assert (found.result, found.attest, found.basis) == ("valid", "B", "verstat")
    body["From"][0]["uri_parameters"] = {"verstat": "TN-Validation-Failed"}
    found = verifier.verify_now(PARSER.parse(body), trust_verstat=True)
    assert isinstance(found, Verification)
    assert (found.result, found.reason) == ("invalid", "verstat_failed")
    assert server.hits["/none.pem"] == 0
    # Without trust the same call is verified here: its certificate must be fetched.
    assert isinstance(verifier.verify_now(PARSER.parse(body), trust_verstat=False), Pending)


def test_called_number_fixture_is_the_body_to() -> None:
    assert call_of(None).called == CALLED


async def test_loads_of_one_url_are_joined(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for()
    value = signed(pki, server.url("/sp.pem"))
    results = await asyncio.gather(*(verifier.verify(call_of(value), False, 2.0) for _ in range(5)))
    assert {r.result for r in results} == {"valid"}
    assert server.hits["/sp.pem"] == 1


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def test_the_signer_tool_makes_a_body_the_service_accepts(
    make_verifier_for: Callable[..., Verifier],
    server: X5uServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert stir_sign.main(["pki", str(tmp_path / "sti")]) == 0
    made = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    x5u = server.serve("/operator.pem", _read(made["x5u"]))
    argv = ["sign", "--key", made["sp_key"], "--x5u", x5u, "--orig", CALLER, "--dest", CALLED]
    assert stir_sign.main([*argv, "--attest", "B", "--body"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    verifier = make_verifier_for(trust_anchors=made["trust_anchors"])
    found = await verifier.verify(PARSER.parse(body), False, 2.0)
    assert (found.result, found.attest) == ("valid", "B")


async def test_signatures_checked_by_the_helper_give_the_same_results(
    make_verifier_for: Callable[..., Verifier], server: X5uServer, pki: StiPKI
) -> None:
    verifier = make_verifier_for(signature_helper="always", results_cache_size=0)
    helper = verifier.helper
    assert helper is not None and verifier.metrics is not None
    await helper.start()
    x5u = server.url("/sp.pem")
    _other, other_key = pki.sp_cert()
    good, forged = signed(pki, x5u), signed(pki, x5u, key=other_key)
    await verifier.verify(call_of(good), False, 2.0)  # the certificate is loaded

    async def results() -> tuple[str | None, str | None]:
        found = []
        for value in (good, forged):
            now = verifier.verify_now(call_of(value))
            if isinstance(now, Pending):  # a signature to check: the helper's, if running
                now = await verifier.verify(call_of(value), False, 2.0, now)
            found.append(now.reason or now.result)
        return found[0], found[1]

    by = verifier.metrics.stir_signatures
    before = by.labels("helper")._value.get()
    assert await results() == ("valid", "bad_signature")
    assert by.labels("helper")._value.get() == before + 2
    # The helper gone: the worker checks them itself, with the same results.
    pid = helper.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def lost() -> bool:
        return not helper.running

    await wait_for(lost, timeout_s=5.0)
    worker_before = by.labels("worker")._value.get()
    assert await results() == ("valid", "bad_signature")
    assert by.labels("worker")._value.get() == worker_before + 2
