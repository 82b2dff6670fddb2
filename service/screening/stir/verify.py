"""Verifying a call's SHAKEN PASSporT: the result the ``stir_*`` rules match on.

Results: ``valid`` (attestation A/B/C), ``absent`` (no SHAKEN Identity header) or
``invalid`` with the first reason found, in the order of docs/stir-shaken.md
(``malformed``, ``stale`` before any fetch, ``cert_unavailable``, ``untrusted_chain``,
``bad_signature``, ``tn_mismatch``, ``verstat_failed``). Every distinct Identity value
has its signature checked. What depends on the value alone (decoding, certificate,
signature) is kept by the identical string in a bounded LRU, for replays and forks;
freshness and the numbers are checked for every call, so a kept result serves only
within the PASSporT's ``iat`` window. What a certificate gives every call it signs
(key, TNAuthList, checks) is worked out once per certificate entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from core.config import StirSettings
from core.es256 import BAD, GOOD
from core.numbers import normalise
from service.metrics import Metrics
from service.screening.request import Call
from service.screening.stir.helper import HelperLost, SignatureHelper, stall_limit
from service.screening.stir.identity import Malformed, Passport, parse_value, shaken_value
from service.screening.stir.store import CertEntry, CertStore

VERSTAT_PASSED = "tn-validation-passed"
VERSTAT_FAILED = "tn-validation-failed"
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a verification and how it went: ``ok``, ``failed`` or ``skipped``."""

    name: str
    outcome: str
    detail: str = ""


@dataclass(slots=True)
class Verification:
    """A call's STIR/SHAKEN result (see the module docstring); never changed once made.

    Not ``frozen``, as :class:`_Signed` and :class:`~.identity.Passport`: one is made
    per call, and frozen dataclasses are several times slower to make.
    """

    result: str
    reason: str | None = None
    attest: str | None = None
    origid: str | None = None
    passport: Passport | None = None
    checks: tuple[Check, ...] = ()
    #: ``signature`` (checked here) or ``verstat`` (the upstream's word was taken).
    basis: str = "signature"

    def explain(self) -> dict[str, Any]:
        passport = self.passport
        return {
            "result": self.result,
            "reason": self.reason,
            "attest": self.attest,
            "origid": self.origid,
            "basis": self.basis,
            "passport": (
                {"header": passport.header, "payload": passport.payload}
                if passport is not None
                else None
            ),
            "checks": [
                {"check": c.name, "outcome": c.outcome, "detail": c.detail or None}
                for c in self.checks
            ],
        }


ABSENT = Verification("absent", checks=(Check("identity", "failed", "no SHAKEN Identity header"),))


@dataclass(slots=True)
class _Signed:
    """What depends on the header value only: its PASSporT and what its signature gave.

    For a good signature also whether the TNAuthList covers ``orig.tn`` and the checks
    of a valid result.
    """

    passport: Passport | None
    reason: str | None
    checks: tuple[Check, ...]
    covered: bool = False
    valid_checks: tuple[Check, ...] = ()


_DECODED = Check("decode", "ok")
_SIGNATURE_OK = Check("signature", "ok")
_BAD_SIGNATURE = Check("signature", "failed", "does not verify with the certificate's key")
_VALID_TAIL = (
    Check("freshness", "ok"), Check("orig.tn", "ok"), Check("dest.tn", "ok"), Check("tn_auth", "ok")
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _EntryChecks:
    """The checks every PASSporT verified with one certificate entry shares."""

    entry: CertEntry
    #: Up to the certificate (its failure, or its success and where it came from).
    certificate: tuple[Check, ...]
    bad_signature: tuple[Check, ...]
    signed: tuple[Check, ...]
    valid: tuple[Check, ...]


def _entry_checks(entry: CertEntry) -> _EntryChecks:
    if entry.signer is None:
        certificate = (_DECODED, Check("certificate", "failed", entry.detail))
    else:
        certificate = (_DECODED, Check("certificate", "ok", f"{entry.detail} ({entry.source})"))
    signed = (*certificate, _SIGNATURE_OK)
    return _EntryChecks(
        entry, certificate, (*certificate, _BAD_SIGNATURE), signed, (*signed, *_VALID_TAIL)
    )


def _is_number(number: str, tn: str, country: str) -> bool:
    """Whether a PASSporT number ``tn`` is ``number`` after the service's normalisation.

    SHAKEN numbers are already E.164 digits, the normalised form, so equal strings
    settle it without normalising.
    """
    return number == tn or number == normalise("+" + tn, country)


@dataclass(slots=True)
class Pending:
    """A call's verification waiting for its certificate (no ``entry`` yet) or for the
    signature helper: what :meth:`Verifier.verify` goes on from."""

    value: str
    passport: Passport
    entry: CertEntry | None


class Verifier:
    """Verifies calls for one worker: results per header value, certificates via
    ``certs``, signatures by ``helper`` when it runs (else here)."""

    def __init__(
        self,
        settings: StirSettings,
        certs: CertStore,
        default_country: str = "1",
        metrics: Metrics | None = None,
        helper: SignatureHelper | None = None,
    ) -> None:
        self.settings = settings
        self.helper = helper
        self.certs = certs
        self.default_country = default_country
        self.metrics = metrics
        self.signed: OrderedDict[str, _Signed] = OrderedDict()
        self._generation = certs.trust.generation
        #: The checks of the certificate entry used last (most calls share one signer).
        self._last_checks: _EntryChecks | None = None

    def reconfigure(self, default_country: str, deadline_s: float) -> None:
        """Take a config reloaded in place: its callers' country, and its call deadline,
        which sets the signature helper's stall limit."""
        self.default_country = default_country
        if self.helper is not None:
            self.helper.stall_s = stall_limit(deadline_s)

    def verify_now(self, call: Call, trust_verstat: bool = False) -> Verification | Pending:
        """The call's result without waiting, or what :meth:`verify` must wait for."""
        return self._verify(call, trust_verstat)

    async def verify(
        self, call: Call, trust_verstat: bool, wait_s: float, pending: Pending | None = None
    ) -> Verification:
        """The call's result, waiting at most ``wait_s`` for its certificate, and for the
        signature helper (its own stall limit; then the check is done here).
        ``pending``: what :meth:`verify_now` returned for the call, if it did."""
        if pending is None:
            found = self._verify(call, trust_verstat)
            if type(found) is Verification:
                return found
            pending = cast(Pending, found)
        entry = pending.entry
        if entry is None:
            entry = await self.certs.get(pending.passport.x5u, wait_s)
        signer = entry.signer
        helper = self.helper
        answer = None
        if signer is not None and helper is not None:
            passport = pending.passport
            asked = helper.check(signer.key_der, passport.signature, passport.signing_input)
            if asked is not None:
                try:
                    answer = await asked
                except HelperLost:
                    answer = None
        return self._settle(
            call, pending.value, self._check_signature(pending.passport, entry, answer)
        )

    def _verify(self, call: Call, trust_verstat: bool) -> Verification | Pending:
        values = call.headers.get("identity")
        if trust_verstat:
            by_verstat = self._by_verstat(call, values)
            if by_verstat is not None:
                return by_verstat
        self.certs.trust.maybe_reload()
        if self._generation != self.certs.trust.generation:  # new trust anchors: re-check
            self.signed.clear()
            self._generation = self.certs.trust.generation
        # A retry carries the same single value: found without splitting it up.
        first = values[0] if type(values) is list and len(values) == 1 else None
        value: str | None = first if type(first) is str else None
        signed = self.signed.get(value) if value is not None else None
        if value is None or signed is None:
            value = shaken_value(values)
            if value is None:
                return ABSENT
            signed = self.signed.get(value)
        if signed is not None:
            self.signed.move_to_end(value)
            if self.metrics is not None:
                self.metrics.stir_cache("result")
            return self._per_call(call, signed)
        try:
            passport = parse_value(value)
        except Malformed as exc:
            return self._per_call(call, self._remember(value, _malformed(str(exc))))
        stale = self._stale(passport)
        if stale is not None:  # no certificate is fetched for an old PASSporT
            checks = (Check("decode", "ok"), stale)
            return self._invalid("stale", passport, checks)
        entry = self.certs.peek(passport.x5u)
        if entry is None or (
            entry.signer is not None and self.helper is not None and self.helper.running
        ):
            return Pending(value, passport, entry)
        return self._settle(call, value, self._check_signature(passport, entry))

    def _settle(self, call: Call, value: str, signed: _Signed) -> Verification:
        """The call's result from what its value's signature check gave, kept for the
        value unless the certificate was unavailable (tried again next call)."""
        if signed.reason != "cert_unavailable":
            self._remember(value, signed)
        return self._per_call(call, signed)

    def _check_signature(
        self, passport: Passport, entry: CertEntry, answer: int | None = None
    ) -> _Signed:
        """The signature checked with the entry's key: a distinct PASSporT, checked anew.

        ``answer``: the signature helper's (core/es256.py); without a GOOD or BAD one
        the signature is checked here.
        """
        checks = self._last_checks
        if checks is None or checks.entry is not entry:
            checks = self._last_checks = _entry_checks(entry)
        signer = entry.signer
        if signer is None:
            return _Signed(passport, entry.reason or "cert_unavailable", checks.certificate)
        metrics = self.metrics
        if answer in (GOOD, BAD):
            if metrics is not None:
                metrics.stir_signature("helper")
            if answer == BAD:
                return _Signed(passport, "bad_signature", checks.bad_signature)
        else:
            if metrics is not None:
                metrics.stir_signature("worker")
            signature = passport.signature
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            try:
                signer.key.verify(der, passport.signing_input, _ECDSA)
            except InvalidSignature:
                return _Signed(passport, "bad_signature", checks.bad_signature)
        covered = signer.tn_auth.covers(passport.orig_tn)
        return _Signed(passport, None, checks.signed, covered, checks.valid)

    def _remember(self, value: str, signed: _Signed) -> _Signed:
        size = self.settings.results_cache_size
        if size:
            self.signed[value] = signed
            if len(self.signed) > size:
                self.signed.popitem(last=False)
        return signed

    def _stale(self, passport: Passport) -> Check | None:
        age_s = time.time() - passport.iat
        skew_s = self.settings.clock_skew_s
        if age_s > self.settings.max_age_s + skew_s:
            return Check("freshness", "failed", f"iat is {int(age_s)} s old")
        if age_s < -skew_s:
            return Check("freshness", "failed", f"iat is {int(-age_s)} s in the future")
        return None

    @staticmethod
    def _invalid(reason: str, passport: Passport | None, checks: tuple[Check, ...]) -> Verification:
        attest = passport.attest if passport is not None else None
        origid = passport.origid if passport is not None else None
        return Verification("invalid", reason, attest, origid, passport, checks)

    def _per_call(self, call: Call, signed: _Signed) -> Verification:
        passport = signed.passport
        if signed.reason is not None or passport is None:
            return self._invalid(signed.reason or "malformed", passport, signed.checks)
        stale = self._stale(passport)
        if stale is not None:
            return self._invalid("stale", passport, (*signed.checks, stale))
        caller, called = call.caller, call.called
        country = self.default_country
        orig_ok = caller is not None and _is_number(caller, passport.orig_tn, country)
        dest_ok = called is not None and (
            called in passport.dest_tns
            or any(_is_number(called, tn, country) for tn in passport.dest_tns)
        )
        if signed.covered and orig_ok and dest_ok:
            return Verification(
                "valid", None, passport.attest, passport.origid, passport, signed.valid_checks
            )
        checks = [*signed.checks, _VALID_TAIL[0]]
        if not orig_ok:
            checks.append(Check("orig.tn", "failed", f"{passport.orig_tn} is not the caller"))
        elif not dest_ok:
            failed = Check("dest.tn", "failed", "no dest.tn is the called number")
            checks += [_VALID_TAIL[1], failed]
        else:
            failed = Check("tn_auth", "failed", "orig.tn is not in the TNAuthList")
            checks += [*_VALID_TAIL[1:3], failed]
        return self._invalid("tn_mismatch", passport, tuple(checks))

    def _by_verstat(self, call: Call, values: Any) -> Verification | None:
        verstat = (call.verstat or "").lower()
        if verstat not in (VERSTAT_PASSED, VERSTAT_FAILED):
            return None
        value = shaken_value(values)
        passport = None
        if value is not None:
            try:  # unverified: only for the attestation level and explain
                passport = parse_value(value)
            except Malformed:
                passport = None
        outcome = "ok" if verstat == VERSTAT_PASSED else "failed"
        check = Check("verstat", outcome, call.verstat or "")
        attest = passport.attest if passport is not None else None
        origid = passport.origid if passport is not None else None
        if verstat == VERSTAT_PASSED:
            return Verification("valid", None, attest, origid, passport, (check,), "verstat")
        return Verification(
            "invalid", "verstat_failed", attest, origid, passport, (check,), "verstat"
        )


def _malformed(detail: str) -> _Signed:
    return _Signed(None, "malformed", (Check("decode", "failed", detail),))
