"""The ``stir_result`` and ``stir_attestation`` rules: config checks and where they run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.config import Config, ConfigError
from devtools.stir_pki import StiPKI
from service.appkeys import METRICS
from tests.stir_support import X5uServer, call_body, signed, stir_settings

UNSIGNED = {
    "name": "unsigned",
    "match": "stir_result",
    "results": ["absent"],
    "operands": ["decline", "unsigned"],
}


def rule(**fields: Any) -> dict[str, Any]:
    return {"policies": {"default": {"rules": [{"name": "r", **fields}]}}}


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"match": "stir_result"}, "needs 'results'"),
        ({"match": "stir_result", "results": ["valid"], "reasons": ["stale"]}, "needs 'invalid'"),
        ({"match": "stir_result", "results": ["unknown"]}, "results"),
        ({"match": "stir_result", "results": ["invalid"], "reasons": ["bogus"]}, "reasons"),
        ({"match": "stir_attestation"}, "needs 'attest'"),
        ({"match": "stir_attestation", "attest": ["D"]}, "attest"),
        ({"match": "anonymous", "results": ["valid"]}, "takes no"),
        ({"match": "anonymous", "attest": ["A"]}, "takes no"),
    ],
)
def test_bad_stir_rules_stop_start_up(
    make_config: Callable[..., Config], fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(rule(**fields))
    assert "policies.default.rules[0]" in str(caught.value)
    assert problem in str(caught.value)


def test_stir_settings_are_checked(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"stir: .*cache_min_s"):
        make_config({"stir": {"cache_default_s": 10, "cache_min_s": 60}})
    with pytest.raises(ConfigError, match=r"stir\.allow_networks"):
        make_config({"stir": {"allow_networks": ["not-a-net"]}})


async def test_only_policies_with_stir_rules_verify(
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    files: dict[str, Path],
    server: X5uServer,
    pki: StiPKI,
) -> None:
    config = make_config(
        {
            "stir": stir_settings(files),
            "handler": {"deadline_ms": 2000},
            "policies": {
                "plain": {"rules": [{"name": "anon", "match": "anonymous"}]},
                "shaken": {"rules": [UNSIGNED]},
            },
            "default_policy": "plain",
            "trunk_groups": {"shaken": {"policy": "shaken"}},
        }
    )
    client = await make_client(config)
    value = signed(pki, server.url("/sp.pem"))
    response = await client.post("/", json=call_body(value))
    assert await response.json() == []
    assert server.hits["/sp.pem"] == 0  # no stir rule: the header is not even looked at
    response = await client.post("/tg/shaken", json=call_body(value))
    assert await response.json() == []
    assert server.hits["/sp.pem"] == 1
    response = await client.post("/tg/shaken", json=call_body(None))
    assert await response.json() == [{"action": "reject", "operands": ["decline", "unsigned"]}]
    results = client.app[METRICS].stir_results
    assert results.labels("valid", "", "A")._value.get() == 1
    assert results.labels("absent", "", "")._value.get() == 1
