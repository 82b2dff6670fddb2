"""Produce a valid SHAKEN PASSporT for a smoke test (docs/stir-shaken.md).

    python -m devtools.stir_sign pki FOLDER            # a throw-away test PKI
    python -m devtools.stir_sign sign --key FOLDER/sp-key.pem --x5u https://host/sp-chain.pem \\
        --orig 15162065613 --dest 19512623062 [--attest A] [--body]

``sign`` prints the Identity header value, or with ``--body`` a whole CarrierX request
body carrying it, ready for ``curl --data-binary @-``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from devtools.stir_pki import load_key, make_pki, sign_passport


def _body(identity: str, orig: str, dest: str) -> bytes:
    return orjson.dumps(
        {
            "Call-ID": ["stir-smoke-test@callscreen"],
            "From": [{"user": orig, "name": "STIR test", "host": "127.0.0.1",
                      "raw": f'"STIR test" <sip:{orig}@127.0.0.1>',
                      "header_parameters": {}, "uri_parameters": {}}],
            "To": [{"user": dest, "name": "", "host": "127.0.0.1", "raw": f"<sip:{dest}@127.0.0.1>",
                    "header_parameters": {}, "uri_parameters": {}}],
            "Identity": [identity],
        }
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.stir_sign", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pki = commands.add_parser("pki", help="write a throw-away STI PKI to FOLDER")
    pki.add_argument("folder", type=Path)
    pki.add_argument("--tls-ip", default="127.0.0.1", help="address of the TLS certificate")
    sign = commands.add_parser("sign", help="sign a PASSporT")
    sign.add_argument("--key", type=Path, required=True, help="the SP's private key (PEM)")
    sign.add_argument("--x5u", required=True, help="URL serving the SP certificate chain")
    sign.add_argument("--orig", required=True, help="calling number, E.164 digits")
    sign.add_argument("--dest", required=True, help="called number, E.164 digits")
    sign.add_argument("--attest", choices=("A", "B", "C"), default="A")
    sign.add_argument("--iat", type=int, help="issued-at (Unix time; default: now)")
    sign.add_argument("--body", action="store_true", help="print a CarrierX request body")
    args = parser.parse_args(argv)
    if args.command == "pki":
        for role, path in make_pki(args.tls_ip).write(args.folder).items():
            print(f"{role}: {path}")
        return 0
    identity = sign_passport(
        load_key(args.key), args.x5u, args.orig, args.dest, attest=args.attest, iat=args.iat
    )
    if args.body:
        sys.stdout.buffer.write(_body(identity, args.orig, args.dest) + b"\n")
    else:
        print(identity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
