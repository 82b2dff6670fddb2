"""STI certificates: the trust anchors, chain validation and the TNAuthList (RFC 8226).

A chain is trusted when each certificate from the x5u's first (the signer's) up is
issued and signed by the next one of the same file (which must be a CA) or by a
configured trust anchor, each is within its validity dates, none is revoked by a
configured CRL, and the signer's certificate carries a TNAuthList. All signature and
X.509 work is done by ``cryptography``; the TNAuthList is decoded with ``pyasn1``.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, namedtype, tag, univ

from core.es256 import key_der

logger = logging.getLogger(__name__)

TN_AUTH_LIST_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.26")
MAX_CHAIN = 5
#: How often the trust anchors' and CRLs' files are checked for changes.
RELOAD_CHECK_S = 5.0


def _explicit(number: int) -> tag.Tag:
    return tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, number)


class _Range(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("start", char.IA5String()),
        namedtype.NamedType("count", univ.Integer()),
    )


class _Entry(univ.Choice):
    # RFC 8226's module uses EXPLICIT tags.
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("spc", char.IA5String().subtype(explicitTag=_explicit(0))),
        namedtype.NamedType("range", _Range().subtype(explicitTag=_explicit(1))),
        namedtype.NamedType("one", char.IA5String().subtype(explicitTag=_explicit(2))),
    )


class _TNAuthList(univ.SequenceOf):
    componentType = _Entry()


@dataclass(frozen=True, slots=True)
class TNAuth:
    """What a certificate's TNAuthList authorises: SPCs, single numbers, ranges."""

    spcs: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()  # (first, count)

    def covers(self, tn: str) -> bool:
        """Whether ``tn`` (digits) is one the certificate may sign for.

        A list of SPCs only (the SHAKEN norm) names no numbers: any number is covered.
        """
        if not self.numbers and not self.ranges:
            return True
        if tn in self.numbers:
            return True
        if not (tn.isascii() and tn.isdigit()):
            return False
        value = int(tn)
        return any(first <= value < first + count for first, count in self.ranges)


def decode_tn_auth(der: bytes) -> TNAuth:
    """Decode a TNAuthList extension value; raise ValueError if it is not one."""
    try:
        decoded, rest = der_decoder.decode(der, asn1Spec=_TNAuthList())
    except PyAsn1Error as exc:
        raise ValueError(f"TNAuthList does not decode: {exc}") from None
    if rest or len(decoded) == 0:
        raise ValueError("TNAuthList is empty or has trailing bytes")
    spcs, numbers, ranges = [], [], []
    for entry in decoded:
        kind = entry.getName()
        if kind == "spc":
            spcs.append(str(entry["spc"]))
        elif kind == "one":
            numbers.append(str(entry["one"]))
        else:
            item = entry["range"]
            ranges.append((int(str(item["start"])), int(item["count"])))
    return TNAuth(tuple(spcs), tuple(numbers), tuple(ranges))


def encode_tn_auth(
    spcs: tuple[str, ...] = (),
    numbers: tuple[str, ...] = (),
    ranges: tuple[tuple[str, int], ...] = (),
) -> bytes:
    """The DER of a TNAuthList (for the signer's test PKI in devtools/)."""
    found = _TNAuthList()
    at = 0
    for kind, values in (("spc", spcs), ("one", numbers)):
        for value in values:
            entry = _Entry()
            entry[kind] = value
            found[at] = entry
            at += 1
    for start, count in ranges:
        entry = _Entry()
        item = entry.componentType.getTypeByPosition(1).clone()
        item["start"] = start
        item["count"] = count
        entry["range"] = item
        found[at] = entry
        at += 1
    return bytes(der_encoder.encode(found))


class Untrusted(Exception):
    """The certificate chain is not trusted; the message says why."""


@dataclass(frozen=True, slots=True)
class Signer:
    """A trusted SHAKEN signer: its key, what it may sign for, when the chain expires."""

    key: ec.EllipticCurvePublicKey
    tn_auth: TNAuth
    not_after: float
    subject: str
    #: ``key`` as DER SubjectPublicKeyInfo, as the signature helper is sent it.
    key_der: bytes


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


class TrustStore:
    """The STI-CA trust anchors and CRLs, re-read when their files change."""

    def __init__(self, anchors_path: Path | None, crl_paths: tuple[Path, ...] = ()) -> None:
        self.anchors_path = anchors_path
        self.crl_paths = crl_paths
        self.anchors: list[x509.Certificate] = []
        self.crls: list[x509.CertificateRevocationList] = []
        #: Bumped on every reload: cached chain results of an older generation are void.
        self.generation = 0
        self._stamps: tuple[float, ...] = ()
        self._next_check = 0.0
        self.maybe_reload(force=True)

    def _files(self) -> tuple[Path, ...]:
        head = (self.anchors_path,) if self.anchors_path is not None else ()
        return head + self.crl_paths

    def maybe_reload(self, *, force: bool = False) -> bool:
        """Re-read the files if they changed (checked at most every RELOAD_CHECK_S)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return False
        self._next_check = now + RELOAD_CHECK_S
        try:
            stamps = tuple(os.stat(path).st_mtime for path in self._files())
        except OSError as exc:
            logger.error("STIR trust files unreadable (%s); keeping the last ones", exc)
            return False
        if not force and stamps == self._stamps:
            return False
        try:
            anchors = _load_pem_certs(self.anchors_path) if self.anchors_path else []
            crls = [_load_crl(path) for path in self.crl_paths]
        except (OSError, ValueError) as exc:
            logger.error("STIR trust files not loaded (%s); keeping the last ones", exc)
            return False
        self.anchors, self.crls, self._stamps = anchors, crls, stamps
        self.generation += 1
        logger.info("STIR trust anchors loaded: %d, CRLs: %d", len(anchors), len(crls))
        return True

    def _revoked(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        for crl in self.crls:
            if crl.issuer != cert.issuer:
                continue
            key = issuer.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey) and not crl.is_signature_valid(key):
                continue  # not issued by this issuer: says nothing about the certificate
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                return True
        return False

    def validate(self, chain: list[x509.Certificate], now: float | None = None) -> Signer:
        """The signer of a trusted chain (``chain[0]`` first); raise :class:`Untrusted`."""
        if not chain:
            raise Untrusted("no certificate")
        when = datetime.datetime.fromtimestamp(now or time.time(), datetime.UTC)
        leaf = chain[0]
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise Untrusted("the signer's key is not P-256")
        try:
            ext = leaf.extensions.get_extension_for_oid(TN_AUTH_LIST_OID)
        except x509.ExtensionNotFound:
            raise Untrusted("the signer's certificate has no TNAuthList") from None
        value = ext.value
        if not isinstance(value, x509.UnrecognizedExtension):
            raise Untrusted("unexpected TNAuthList form")
        try:
            tn_auth = decode_tn_auth(value.value)
        except ValueError as exc:
            raise Untrusted(str(exc)) from None
        not_after = min(c.not_valid_after_utc for c in chain).timestamp()
        cert, rest = leaf, chain[1:]
        for _depth in range(MAX_CHAIN):
            if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
                raise Untrusted(f"outside its validity dates: {cert.subject.rfc4514_string()}")
            anchor = self._issued_by(cert, self.anchors)
            if anchor is not None:
                if self._revoked(cert, anchor):
                    raise Untrusted(f"revoked: {cert.subject.rfc4514_string()}")
                if not anchor.not_valid_before_utc <= when <= anchor.not_valid_after_utc:
                    raise Untrusted("the trust anchor is outside its validity dates")
                return Signer(key, tn_auth, not_after, leaf.subject.rfc4514_string(), key_der(key))
            issuer = self._issued_by(cert, [c for c in rest if _is_ca(c)])
            if issuer is None:
                raise Untrusted(f"no trusted issuer for {cert.subject.rfc4514_string()}")
            if self._revoked(cert, issuer):
                raise Untrusted(f"revoked: {cert.subject.rfc4514_string()}")
            cert = issuer
            rest = [c for c in rest if c is not issuer]
        raise Untrusted("the chain is too long")

    @staticmethod
    def _issued_by(
        cert: x509.Certificate, candidates: list[x509.Certificate]
    ) -> x509.Certificate | None:
        for candidate in candidates:
            if candidate.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return candidate
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_chain(body: bytes) -> list[x509.Certificate]:
    """The certificates of an x5u body (PEM, or one DER certificate); ValueError if none."""
    if b"-----BEGIN CERTIFICATE" in body:
        return x509.load_pem_x509_certificates(body)
    return [x509.load_der_x509_certificate(body)]
