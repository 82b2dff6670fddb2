"""A throw-away STIR/SHAKEN PKI and PASSporT signer, for tests and smoke tests.

Makes a root STI-CA, an intermediate CA and a service provider (SP) certificate with a
TNAuthList, plus a TLS CA and server certificate for a local HTTPS x5u server; signs
PASSporTs with the SP key. Nothing here is fit for production keys.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.screening.stir.certs import TN_AUTH_LIST_OID, encode_tn_auth

DAY = datetime.timedelta(days=1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    tn_auth: bytes | None = None,
    ip_san: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (None: self-signed)."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if tn_auth is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(TN_AUTH_LIST_OID, tn_auth), critical=False
        )
    if ip_san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip_san))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class StiPKI:
    """Root STI-CA -> intermediate -> SP certificate; and a TLS CA for the x5u server."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    sp: x509.Certificate
    sp_key: ec.EllipticCurvePrivateKey
    tls_ca: x509.Certificate
    tls_cert: x509.Certificate
    tls_key: ec.EllipticCurvePrivateKey

    @property
    def chain_pem(self) -> bytes:
        """What an x5u serves: the SP certificate, then the intermediate."""
        return pem(self.sp, self.intermediate)

    def sp_cert(self, **options: object) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Another SP certificate under the intermediate (``make_cert`` options)."""
        key = _key()
        options.setdefault("tn_auth", encode_tn_auth(spcs=("1234",)))
        cert = make_cert(
            "Test SP",
            key,
            (self.intermediate, self.intermediate_key),
            ca=False,
            **options,  # type: ignore[arg-type]
        )
        return cert, key

    def write(self, folder: Path) -> dict[str, Path]:
        """Write the files an operator needs; their paths by role."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "trust_anchors": (folder / "sti-ca.pem", pem(self.root)),
            "x5u": (folder / "sp-chain.pem", self.chain_pem),
            "sp_key": (folder / "sp-key.pem", key_pem(self.sp_key)),
            "tls_ca": (folder / "tls-ca.pem", pem(self.tls_ca)),
            "tls_cert": (folder / "tls-cert.pem", pem(self.tls_cert)),
            "tls_key": (folder / "tls-key.pem", key_pem(self.tls_key)),
        }
        for path, data in files.values():
            path.write_bytes(data)
        (folder / "sp-key.pem").chmod(0o600)
        (folder / "tls-key.pem").chmod(0o600)
        return {role: path for role, (path, _data) in files.items()}


def make_pki(tls_ip: str = "127.0.0.1", spcs: tuple[str, ...] = ("1234",)) -> StiPKI:
    root_key, inter_key, sp_key, tls_ca_key, tls_key = (_key() for _ in range(5))
    root = make_cert("Test STI-CA root", root_key, None, ca=True)
    inter = make_cert("Test STI-CA intermediate", inter_key, (root, root_key), ca=True)
    sp = make_cert(
        "Test SP", sp_key, (inter, inter_key), ca=False, tn_auth=encode_tn_auth(spcs=spcs)
    )
    tls_ca = make_cert("Test TLS CA", tls_ca_key, None, ca=True)
    tls_cert = make_cert("x5u server", tls_key, (tls_ca, tls_ca_key), ca=False, ip_san=tls_ip)
    return StiPKI(root, root_key, inter, inter_key, sp, sp_key, tls_ca, tls_cert, tls_key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_passport(
    key: ec.EllipticCurvePrivateKey,
    x5u: str,
    orig: str,
    dest: str,
    *,
    attest: str = "A",
    iat: int | None = None,
    origid: str | None = None,
) -> str:
    """A SHAKEN Identity header value (full form) for a call from ``orig`` to ``dest``."""
    header = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": x5u}
    payload = {
        "attest": attest,
        "dest": {"tn": [dest]},
        "iat": int(time.time()) if iat is None else iat,
        "orig": {"tn": orig},
        "origid": origid or str(uuid.uuid4()),
    }
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return f"{signing_input}.{signature};info=<{x5u}>;alg=ES256;ppt=shaken"


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key
