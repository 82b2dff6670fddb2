"""``python -m bench.stir_cost``: where a verified call's STIR/SHAKEN time goes, no HTTP.

On ``--calls`` distinct PASSporTs signed by a throw-away STI PKI (devtools/stir_pki.py),
each for its own caller and called number, with the certificate already held by the
worker as after its first load (no fetch, no Redis) and the per-value results cache off:

- ``openssl``: ``openssl speed ecdsap256``'s verifications a second, as microseconds
  (the system's OpenSSL command, not the library ``cryptography`` links; skipped when
  there is no ``openssl`` command);
- ``verify``: ``cryptography``'s ``EllipticCurvePublicKey.verify`` on each PASSporT's
  DER signature and signing input, nothing else;
- ``path``: :meth:`Verifier.verify_now` on each parsed call: finding the Identity value,
  decoding it, freshness, the certificate look-up, the signature, the numbers;
- ``path without ECDSA``: the same with a key that accepts every signature, so what the
  service adds to the library's check.

Rounds alternate over the measures (CPU time of this process); prints the median and
the range over rounds, in microseconds per call.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from core.config import StirSettings
from devtools.stir_pki import make_pki, sign_passport
from service.screening.request import Call, CallParser
from service.screening.stir.certs import Signer, TrustStore
from service.screening.stir.identity import Passport, parse_value
from service.screening.stir.store import CertEntry, CertStore
from service.screening.stir.verify import Verification, Verifier

X5U = "https://cert.bench.invalid/sp-chain.pem"
_ECDSA = ec.ECDSA(hashes.SHA256())


class _AcceptAll:
    """A stand-in key whose check passes: the verifier's own cost without ECDSA."""

    def verify(self, signature: bytes, data: bytes, algorithm: Any) -> None:
        return None


def openssl_verify_us(seconds: int) -> float | None:
    """``openssl speed``'s P-256 verification time in microseconds, or None without it."""
    binary = shutil.which("openssl")
    if binary is None:
        return None
    done = subprocess.run(
        [binary, "speed", "-seconds", str(seconds), "ecdsap256"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"nistp256\)\s+\S+s\s+\S+s\s+\S+\s+([\d.]+)", done.stdout)
    return 1e6 / float(found.group(1)) if found else None


def _calls(count: int) -> tuple[Verifier, list[Call], list[Passport], Any]:
    pki = make_pki()
    folder = Path(tempfile.mkdtemp(prefix="stir-cost-"))
    anchors = pki.write(folder)["trust_anchors"]
    settings = StirSettings(trust_anchors=str(anchors), max_age_s=3600, results_cache_size=0)
    trust = TrustStore(anchors)
    certs = CertStore(settings, trust, None, None)  # type: ignore[arg-type]  # never fetches
    certs.entries[X5U] = certs._validated(X5U, pki.chain_pem, 86_400, "redis")
    verifier = Verifier(settings, certs, "1", None)
    parser = CallParser(("from",), "1")
    calls, passports = [], []
    for i in range(count):
        caller, called = f"1516{i:07d}", f"1951{i * 7919 % 10**7:07d}"
        value = sign_passport(pki.sp_key, X5U, caller, called)
        call = parser.parse(_body(caller, called, value))
        calls.append(call)
        passports.append(parse_value(value))
        found = verifier.verify_now(call)
        assert isinstance(found, Verification) and found.result == "valid", found
    return verifier, calls, passports, certs


def _body(caller: str, called: str, identity: str) -> dict[str, Any]:
    return {
        "From": [{"user": caller, "name": "", "raw": f"<sip:{caller}@10.1.10.190>"}],
        "To": [{"user": called, "raw": f"<sip:{called}@10.1.10.190:5060>"}],
        "Identity": [identity],
    }


def _per_call_us(run: Callable[[], None], count: int) -> float:
    started = time.process_time()
    run()
    return (time.process_time() - started) / count * 1e6


def measure(count: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per call of each measure, one figure per round."""
    verifier, calls, passports, certs = _calls(count)
    entry = certs.entries[X5U]
    signer = entry.signer
    assert signer is not None
    key = signer.key
    signed = [
        (
            encode_dss_signature(
                int.from_bytes(p.signature[:32], "big"), int.from_bytes(p.signature[32:], "big")
            ),
            p.signing_input,
        )
        for p in passports
    ]
    stub = Signer(_AcceptAll(), signer.tn_auth, signer.not_after, signer.subject, signer.key_der)  # type: ignore[arg-type]
    unchecked = CertEntry(stub, None, entry.detail, entry.expires_at, entry.generation, "redis")

    def raw() -> None:
        for der, data in signed:
            key.verify(der, data, _ECDSA)

    def path() -> None:
        for call in calls:
            verifier.verify_now(call)

    def without_ecdsa() -> None:
        certs.entries[X5U] = unchecked
        try:
            path()
        finally:
            certs.entries[X5U] = entry

    measures = {"verify": raw, "path": path, "path without ECDSA": without_ecdsa}
    found: dict[str, list[float]] = {name: [] for name in measures}
    for _round in range(rounds):
        for name, run in measures.items():
            found[name].append(_per_call_us(run, count))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stir_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="distinct signed calls")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--openssl-seconds", type=int, default=3, help="0: skip openssl speed")
    args = parser.parse_args(argv)
    openssl = openssl_verify_us(args.openssl_seconds) if args.openssl_seconds else None
    if openssl is not None:
        print(f"{'openssl':20s} {openssl:7.1f} us per verification (openssl speed ecdsap256)")
    for name, figures in measure(args.calls, args.rounds).items():
        print(
            f"{name:20s} {median(figures):7.1f} us per call"
            f"  (range {min(figures):.1f}-{max(figures):.1f} over {len(figures)} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
