"""Certificate (x5u) fetching: the SSRF guards, redirects, size cap, timeouts, cache headers."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from core.config import StirSettings
from devtools.stir_pki import StiPKI
from service.screening.stir.fetch import (
    FetchError,
    cache_ttl_s,
    check_url,
    fetch_cert,
    make_session,
)
from tests.stir_support import X5uServer


def settings(files: dict[str, Path], **overrides: Any) -> StirSettings:
    return StirSettings.model_validate(
        {"fetch_ca_file": str(files["tls_ca"]), "fetch_timeout_ms": 1000, **overrides}
    )


async def fetch(url: str, config: StirSettings) -> bytes:
    async with make_session(config, "/") as session:
        return (await fetch_cert(session, url, config)).body


async def refused(url: str, config: StirSettings, outcome: str = "refused") -> str:
    with pytest.raises(FetchError) as caught:
        await fetch(url, config)
    assert caught.value.outcome == outcome, str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://cert.example.com/sp.pem",  # plain http
        "ftp://cert.example.com/sp.pem",
        "https://user:pw@cert.example.com/sp.pem",  # credentials
        "https://cert.example.com/sp.pem#frag",
        "https:///sp.pem",  # no host
        "https://127.0.0.1/sp.pem",  # loopback
        "https://10.1.2.3/sp.pem",  # private
        "https://192.168.0.1/sp.pem",
        "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
        "https://[::1]/sp.pem",
        "https://[::ffff:127.0.0.1]/sp.pem",  # IPv4-mapped loopback
        "https://0.0.0.0/sp.pem",
        "https://cert.example.com/" + "x" * 600,
    ],
)
def test_urls_an_attacker_might_write_are_refused(url: str) -> None:
    with pytest.raises(FetchError) as caught:
        check_url(url, StirSettings())
    assert caught.value.outcome == "refused"


def test_a_public_https_url_passes_and_http_needs_allowing() -> None:
    assert check_url("https://cert.example.com/sp.pem", StirSettings()) == (
        "https", "cert.example.com", 443
    )  # fmt: skip
    assert check_url("http://8.8.8.8:8080/x.pem", StirSettings(allow_http=True))[2] == 8080


async def test_loopback_needs_an_explicit_allowance(
    server: X5uServer, files: dict[str, Path], pki: StiPKI
) -> None:
    await refused(server.url("/sp.pem"), settings(files))
    assert server.hits["/sp.pem"] == 0  # never connected
    allowed = settings(files, allow_networks=["127.0.0.0/8"])
    assert await fetch(server.url("/sp.pem"), allowed) == pki.chain_pem


async def test_a_name_resolving_to_loopback_is_refused(
    server: X5uServer, files: dict[str, Path]
) -> None:
    url = f"https://localhost:{server.port}/sp.pem"
    detail = await refused(url, settings(files))
    assert "not allowed" in detail
    assert server.hits["/sp.pem"] == 0


async def test_redirects_stay_on_the_same_host(
    server: X5uServer, files: dict[str, Path], pki: StiPKI
) -> None:
    allowed = settings(files, allow_networks=["127.0.0.0/8"])
    same = server.url("/redirect?to=/sp.pem")
    assert await fetch(same, allowed) == pki.chain_pem
    other = server.url(f"/redirect?to=https://127.0.0.2:{server.port}/sp.pem")
    assert "another host" in await refused(other, allowed)
    metadata = server.url("/redirect?to=https://169.254.169.254/")
    await refused(metadata, allowed)
    assert server.hits["/sp.pem"] == 1


async def test_a_certificate_over_the_size_cap_is_refused(
    server: X5uServer, files: dict[str, Path]
) -> None:
    server.serve("/big.pem", b"x" * 40_000)
    allowed = settings(files, allow_networks=["127.0.0.0/8"], max_cert_bytes=16_384)
    await refused(server.url("/big.pem"), allowed, "too_large")


async def test_http_errors_and_a_hanging_server(server: X5uServer, files: dict[str, Path]) -> None:
    allowed = settings(files, allow_networks=["127.0.0.0/8"], fetch_timeout_ms=300)
    await refused(server.url("/missing.pem"), allowed, "http_error")
    started = time.perf_counter()
    await refused(server.url("/hang"), allowed, "timeout")
    assert time.perf_counter() - started < 1.5


async def test_an_untrusted_tls_certificate_fails_the_fetch(
    server: X5uServer, files: dict[str, Path]
) -> None:
    no_test_ca = StirSettings.model_validate({"allow_networks": ["127.0.0.0/8"]})
    await refused(server.url("/sp.pem"), no_test_ca, "error")


def test_cache_lifetime_from_the_headers() -> None:
    config = StirSettings(cache_default_s=3600, cache_min_s=60, cache_max_s=86_400)
    assert cache_ttl_s(None, None, config) == 3600
    assert cache_ttl_s("public, max-age=600", None, config) == 600
    assert cache_ttl_s("max-age=5", None, config) == 60  # bounded below
    assert cache_ttl_s("max-age=9999999", None, config) == 86_400  # and above
    # Digits of other scripts are no lifetime (int() would refuse them): the default.
    assert cache_ttl_s("max-age=\u00b3\u00b3", None, config) == 3600
    assert cache_ttl_s("no-store", None, config) == 60
    assert 1700 <= cache_ttl_s(None, formatdate(time.time() + 1800, usegmt=True), config) <= 1800
    assert cache_ttl_s(None, "garbage", config) == 60
    assert cache_ttl_s("max-age=120", formatdate(time.time() + 1800, usegmt=True), config) == 120
