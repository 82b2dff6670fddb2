"""Config validation, and the shipped config reproducing the seed scenario (block list)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import ConfigError, load_config, parse_config
from devtools.redis_server import RedisProcess
from tests.helpers import EXAMPLE_BODY, REJECT, body_from

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("data", "key_path", "problem"),
    [
        (
            {"lists": {"b": {}}, "policies": {"default": {"rules": [
                {"name": "r", "match": "caller_in_list", "list": "blockist"}]}}},
            "policies.default.rules[0].list",
            "unknown list 'blockist'",
        ),
        (
            {"lists": {"p": {"kind": "prefixes"}}, "policies": {"default": {"rules": [
                {"name": "r", "match": "caller_in_list", "list": "p"}]}}},
            "policies.default.rules[0].list",
            "needs 'numbers'",
        ),
        (
            {"policies": {"default": {"rules": [
                {"name": "r", "match": "anonymous", "operands": ["nope", "x"]}]}}},
            "policies.default.rules[0].operands",
            "unknown reject reason 'nope'",
        ),
        ({"handler": {"on_error": "maybe"}}, "handler.on_error", "'allow' or 'reject'"),
        ({"handler": {"deadline_ms": -1}}, "handler.deadline_ms", "greater than 0"),
        ({"trunk_groups": {"sales": {"policy": "gone"}}}, "trunk_groups.sales.policy", "unknown policy"),
        ({"lists": {"Bad Name": {}}}, "lists", "use 1-64 of a-z"),
        ({"servr": {}}, "servr", "Extra inputs are not permitted"),
        (
            {"policies": {"default": {"rules": [{"name": "r", "match": "call_rate"}]}}},
            "policies.default.rules[0]",
            "needs 'limit' and 'window_s'",
        ),
    ],
)  # fmt: skip
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, data: dict[str, Any], key_path: str, problem: str
) -> None:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"{path}: {key_path}" in message
    assert problem in message


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_config(tmp_path, "lists: [unclosed"))


def test_environment_overrides_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSCREEN_REDIS_URL", "redis://elsewhere:6390/2")
    assert parse_config({}).redis.url == "redis://elsewhere:6390/2"


def test_service_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"handler": {"on_error": "maybe"}})
    done = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{path}: handler.on_error" in done.stderr


async def test_shipped_config_reproduces_the_seed(
    redis_server: RedisProcess, make_client: Callable[..., Any]
) -> None:
    """What `make run` does: load lists/blocklist.csv with the loader, then serve."""
    env = {**os.environ, "CALLSCREEN_REDIS_URL": redis_server.url}
    loaded = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "loader", "--config", "config.yaml", "sync"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert "blocklist" in loaded.stderr and "4 entries" in loaded.stderr

    os.environ["CALLSCREEN_REDIS_URL"] = redis_server.url
    try:
        config = load_config(ROOT / "config.yaml")
    finally:
        del os.environ["CALLSCREEN_REDIS_URL"]
    client = await make_client(config)
    for number in ("5162065613", "15162065614", "+1 516 206 5615", "tel:+15162065616"):
        response = await client.post("/", json=body_from(number))
        assert await response.json() == REJECT, number
    assert await (await client.post("/", json=EXAMPLE_BODY)).json() == REJECT
    assert await (await client.post("/tg/main", json=body_from("15162065617"))).json() == []
    assert (await client.get("/readyz")).status == 200


async def test_not_ready_until_a_sourced_list_was_synced(
    make_config: Callable[..., Any], make_client: Callable[..., Any]
) -> None:
    config = make_config(
        {
            "lists": {"blocklist": {"kind": "numbers", "source": "lists/blocklist.csv"}},
            "policies": {
                "default": {
                    "rules": [{"name": "b", "match": "caller_in_list", "list": "blocklist"}]
                }
            },
        }
    )
    client = await make_client(config)
    response = await client.get("/readyz")
    assert response.status == 503
    assert "never synced" in (await response.json())["reasons"][0]
