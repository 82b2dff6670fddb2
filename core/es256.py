"""ES256 signature checks for a worker, in a helper process of its own (the child side).

A SHAKEN PASSporT's signature check (ECDSA P-256 with SHA-256) is most of a verified
call's cost, and OpenSSL does it while holding nothing the worker needs. A worker with a
spare core beside it sends the checks to a helper (``python -m core.es256 FD``, started
by :mod:`service.screening.stir.helper`) over a Unix socket pair, and serves other calls
meanwhile. This module holds both ends' wire format and the helper's loop; it imports
nothing of the service, so the helper starts in a fraction of a second.

The stream, worker to helper, is a sequence of jobs, each :data:`HEADER` (key, signature
and signing input lengths) followed by those three fields: the signer's public key as
DER SubjectPublicKeyInfo, the JWS signature as it came (R and S, 32 bytes each) and the
signing input. The helper answers each job, in order, with one byte: :data:`GOOD`,
:data:`BAD` or :data:`UNUSABLE` (a key or signature it cannot use: the worker then checks
that one itself, so an odd input is judged by the same code either way). It reads until
the worker closes its end, and exits then.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

#: Key, signature and signing input lengths of one job.
HEADER = struct.Struct("!HHI")
GOOD = 0x31
BAD = 0x30
UNUSABLE = 0x3F
#: The largest job accepted: a PASSporT's signing input is a few hundred bytes; the
#: worker checks a larger one itself (service/screening/stir/helper.py).
MAX_JOB_BYTES = 64 * 1024
#: Keys kept loaded; signers are few (a key per certificate in use), so this is a guard.
MAX_KEYS = 1024
#: Read at most this much at a time (a few dozen jobs, answered together), so that a
#: worker with a long queue hears back as its checks are done.
READ_BYTES = 4096
_ECDSA = ec.ECDSA(hashes.SHA256())


def job(key_der: bytes, signature: bytes, signing_input: bytes) -> bytes:
    """One job's bytes."""
    return HEADER.pack(len(key_der), len(signature), len(signing_input)) + (
        key_der + signature + signing_input
    )


def key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """``key`` as a job carries it."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Checker:
    """Checks the jobs of a byte stream, fed in pieces of any size."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.keys: dict[bytes, ec.EllipticCurvePublicKey | None] = {}

    def feed(self, data: bytes) -> bytes:
        """The answers of the jobs ``data`` completes; raises ValueError on a job too
        large to be one (the stream cannot be trusted after it)."""
        pending = self.pending
        pending += data
        answers = bytearray()
        at = 0
        size = HEADER.size
        while len(pending) - at >= size:
            key_len, sig_len, input_len = HEADER.unpack_from(pending, at)
            total = size + key_len + sig_len + input_len
            if total > MAX_JOB_BYTES:
                raise ValueError(f"a job of {total} bytes")
            if len(pending) - at < total:
                break
            start = at + size
            key = bytes(pending[start : start + key_len])
            start += key_len
            signature = bytes(pending[start : start + sig_len])
            start += sig_len
            answers.append(self.check(key, signature, bytes(pending[start : at + total])))
            at += total
        del pending[:at]
        return bytes(answers)

    def check(self, key_bytes: bytes, signature: bytes, signing_input: bytes) -> int:
        key = self._key(key_bytes)
        if key is None or len(signature) != 64:
            return UNUSABLE
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, signing_input, _ECDSA)
        except InvalidSignature:
            return BAD
        return GOOD

    def _key(self, key_bytes: bytes) -> ec.EllipticCurvePublicKey | None:
        keys = self.keys
        if key_bytes in keys:
            return keys[key_bytes]
        if len(keys) >= MAX_KEYS:
            keys.clear()
        try:
            loaded = serialization.load_der_public_key(key_bytes)
        except (ValueError, TypeError):
            loaded = None
        key = loaded if isinstance(loaded, ec.EllipticCurvePublicKey) else None
        keys[key_bytes] = key
        return key


def serve(sock: socket.socket) -> int:
    """Answer the jobs read from ``sock`` until its other end closes; the exit status."""
    checker = Checker()
    with sock:
        while True:
            try:
                data = sock.recv(READ_BYTES)
            except ConnectionError:
                return 0
            if not data:
                return 0
            try:
                answers = checker.feed(data)
            except ValueError as exc:
                print(f"es256 helper: the worker sent {exc}; stopping", file=sys.stderr)
                return 1
            if answers:
                try:
                    sock.sendall(answers)
                except (BrokenPipeError, ConnectionError):
                    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m core.es256 FD (started by a worker)", file=sys.stderr)
        return 2
    # Its life is the socket's: a worker that stops, however it stops, closes its end.
    # Signals meant for the worker's process group (Ctrl-C, a terminal hang-up, a
    # supervisor's TERM) are left to the worker, which closes the socket when it exits.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    return serve(socket.socket(fileno=int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
