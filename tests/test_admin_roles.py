"""Named admin tokens with roles, their reload, and the audit trail of admin changes."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.audit import AuditLog, AuditRecord
from core.config import AuditSettings, Config, ConfigError
from core.logs import AUDIT_LOGGER, configure_logging
from loader.__main__ import _accept as accept
from loader.sync import SyncOptions, SyncRefused, sync_list
from service.operator.admin import ADMIN_TOKENS
from service.operator.tokens import read_tokens
from tests.helpers import body_from

ADMIN = "ops-admin-secret-0123456789"
READER = "noc-reader-secret-0123456789"
EDITOR = "support-editor-secret-0123456789"
LEGACY = "legacy-bare-token-0123456789"
TOKENS = f"alice:admin:{ADMIN},noc:read:{READER},bob:editor=blocklist:{EDITOR},{LEGACY}"
CONFIG: dict[str, Any] = {
    "lists": {"blocklist": {"kind": "numbers"}, "vip": {"kind": "numbers"}},
    "policies": {
        "default": {
            "rules": [
                {"name": "vip", "match": "caller_in_list", "list": "vip", "action": "allow"},
                {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
            ]
        },
        "sales": {"rules": [{"name": "vip", "match": "caller_in_list", "list": "vip"}]},
    },
    "trunk_groups": {"main": {"policy": "default"}, "sales": {"policy": "sales"}},
}
Client = TestClient[Any, Any]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def client(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> Client:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKENS)
    made: Client = await make_client(make_config(CONFIG), redis_client=redis)
    return made


async def test_each_role_does_what_it_says_on_the_api(client: Client) -> None:
    entry = "/v1/lists/blocklist/entries/15162065699"
    # read: reads and explain, no writes; the 403 names the role that is missing.
    assert (await client.get("/v1/lists", headers=bearer(READER))).status == 200
    explained = await client.post("/v1/explain", json=body_from(), headers=bearer(READER))
    assert explained.status == 200
    refused = await client.put(entry, headers=bearer(READER))
    assert refused.status == 403
    assert await refused.json() == {
        "error": "token 'noc' has role 'read'; this needs role 'editor' or 'admin'"
    }
    # editor: its own list only.
    assert (await client.put(entry, headers=bearer(EDITOR))).status == 200
    other = await client.put("/v1/lists/vip/entries/15162065699", headers=bearer(EDITOR))
    assert other.status == 403
    assert "editor of blocklist only; list 'vip'" in (await other.json())["error"]
    # admin, named or bare (a token from before roles): everything.
    for token in (ADMIN, LEGACY):
        assert (
            await client.put("/v1/lists/vip/entries/15162065600", headers=bearer(token))
        ).status == 200
    who = await (await client.get("/v1/whoami", headers=bearer(EDITOR))).json()
    assert who == {
        "name": "bob",
        "role": "editor",
        "scope": ["blocklist"],
        "editable": ["blocklist"],
    }
    legacy = await (await client.get("/v1/whoami", headers=bearer(LEGACY))).json()
    assert (legacy["name"], legacy["role"]) == ("admin-1", "admin")
    wrong = await client.get("/v1/whoami", headers=bearer("not-a-token-0123456789"))
    assert wrong.status == 403 and await wrong.json() == {"error": "invalid admin token"}


async def test_an_admin_change_shows_in_the_audit_with_its_token_name_and_client(
    client: Client, redis: Redis
) -> None:
    put = await client.put(
        "/v1/lists/blocklist/entries/+1 (516) 206-5699?reason=ticket 42", headers=bearer(EDITOR)
    )
    assert put.status == 200
    bulk = await client.post(
        "/v1/lists/blocklist/entries",
        json={"add": ["15162065601", "15162065602"], "remove": ["15162065699"]},
        headers=bearer(ADMIN),
    )
    assert bulk.status == 200
    answer = await client.get("/v1/audit?entry=5162065699", headers=bearer(READER))
    records = (await answer.json())["records"]
    assert len(records) == 1
    record = records[0]
    assert (record["action"], record["actor"], record["client"]) == ("add", "bob", "127.0.0.1")
    assert (record["list"], record["entry"], record["reason"]) == (
        "blocklist",
        "15162065699",
        "ticket 42",
    )
    assert (record["version_before"], record["version_after"]) == (0, 1)
    # A limit in digits of another script (schemathesis found it): 400, not a 500.
    odd = await client.get("/v1/audit?limit=%C2%B3", headers=bearer(READER))
    assert odd.status == 400 and "limit must be a whole number" in (await odd.json())["error"]
    everything = await (await client.get("/v1/audit?list=blocklist", headers=bearer(READER))).json()
    newest = everything["records"][0]
    assert (newest["action"], newest["actor"], newest["added"], newest["removed"]) == (
        "bulk",
        "alice",
        2,
        1,
    )
    assert (newest["version_before"], newest["version_after"]) == (1, 2)
    # No secret in Redis.
    stored: Any = await redis.xrange(keys.AUDIT_LOG)
    raw = b"".join(values[b"r"] for _, values in stored)
    assert EDITOR.encode() not in raw and ADMIN.encode() not in raw


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    audit_level = logging.getLogger(AUDIT_LOGGER).level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(AUDIT_LOGGER).setLevel(audit_level)


async def test_audit_lines_survive_log_level_warning(restore_logging: None, redis: Redis) -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "json", stream)
    logging.getLogger("service.screening.screen").info("rejected call ...")  # dropped
    log = AuditLog(redis, AuditSettings(max_entries=50))
    record = AuditRecord("reload", "alice", "10.0.0.9", detail="3 tokens")
    await log.append(record)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["logger"] == AUDIT_LOGGER and lines[0]["actor"] == "alice"
    assert "reload by alice from 10.0.0.9" in lines[0]["message"]


async def test_the_audit_stream_is_capped(redis: Redis) -> None:
    log = AuditLog(redis, AuditSettings(max_entries=10))
    for n in range(300):
        await log.append(AuditRecord("add", "alice", "::1", list="blocklist", entry=str(n)))
    assert await redis.xlen(keys.AUDIT_LOG) < 300
    newest = await log.query(limit=1)
    assert newest[0]["entry"] == "299"


async def test_tokens_file_is_reloaded_and_a_removed_token_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.delenv("CALLSCREEN_ADMIN_TOKENS", raising=False)
    secrets = tmp_path / "tokens"
    secrets.write_text(f"# NOC\nnoc:read:{READER}\nsales:editor=tg/sales:{EDITOR}\n")
    config = make_config({**CONFIG, "admin": {"tokens_file": str(secrets)}})
    client: Client = await make_client(config, redis_client=redis)
    who = await (await client.get("/v1/whoami", headers=bearer(EDITOR))).json()
    assert who["editable"] == ["vip"]  # the lists of trunk group sales's policy
    secrets.write_text(f"noc:read:{ADMIN}\n")
    tokens = client.app[ADMIN_TOKENS]
    tokens.reload()
    assert (await client.get("/v1/whoami", headers=bearer(READER))).status == 403
    assert (await client.get("/v1/whoami", headers=bearer(ADMIN))).status == 200
    secrets.write_text("noc:editor:no-scope-given-0123456789\n")
    with pytest.raises(ConfigError, match="editor needs a scope"):
        tokens.reload()
    assert (await client.get("/v1/whoami", headers=bearer(ADMIN))).status == 200  # old set kept


def test_bad_token_entries_name_the_entry_never_the_secret(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(CONFIG)
    with pytest.raises(ConfigError) as bad:
        read_tokens(config, {"CALLSCREEN_ADMIN_TOKENS": "x:editor=nolist:secret-0123456789abc"})
    assert "entry 1" in str(bad.value) and "unknown list" in str(bad.value)
    assert "secret-0123456789abc" not in str(bad.value)
    with pytest.raises(ConfigError, match="repeated: x"):
        read_tokens(config, {"CALLSCREEN_ADMIN_TOKENS": f"x:read:{READER},x:admin:{ADMIN}"})


async def test_the_loaders_syncs_and_accepts_are_in_the_audit(
    tmp_path: Path, redis: Redis, make_config: Callable[..., Config]
) -> None:
    data = {
        "lists": {"blocklist": {"kind": "numbers", "source": "blocklist.csv"}},
        "policies": {
            "default": {"rules": [{"name": "bl", "match": "caller_in_list", "list": "blocklist"}]}
        },
    }
    config = make_config(data, base_dir=tmp_path)
    write_source(tmp_path, "number\n5162065613\n")
    quiet = SyncOptions(progress="off")
    report = await sync_list(redis, config, "blocklist", quiet)
    write_source(tmp_path, "number\n")
    with pytest.raises(SyncRefused):
        await sync_list(redis, config, "blocklist", quiet)
    await sync_list(redis, config, "blocklist", SyncOptions(dry_run=True, progress="off"))
    assert await accept(config, "blocklist") == 0  # python -m loader accept
    records = await AuditLog(redis, config.audit).query(list_name="blocklist")
    summary = [(r["action"], r["actor"], r["outcome"], r.get("version_before")) for r in records]
    assert summary == [
        ("accept", "loader", "ok", report.version),
        ("sync", "loader", "refused", report.version),
        ("sync", "loader", "ok", None),  # a new list: no version before
    ]
    assert records[2]["version_after"] == report.version
    assert "no valid entries" in records[1]["detail"]


def write_source(folder: Path, text: str) -> None:
    (folder / "blocklist.csv").write_text(text)


async def test_subscriber_changes_are_audited_and_scoped(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    data = {
        "lists": {"personal": {"kind": "subscribers"}, "blocklist": {"kind": "numbers"}},
        "policies": {
            "default": {
                "rules": [
                    {"name": "personal", "match": "caller_in_subscriber_list", "list": "personal"}
                ]
            }
        },
    }
    monkeypatch.setenv(
        "CALLSCREEN_ADMIN_TOKENS", f"desk:editor=personal:{EDITOR},other:editor=blocklist:{ADMIN}"
    )
    client: Client = await make_client(make_config(data), redis_client=redis)
    path = "/v1/lists/personal/subscribers/19512623062/entries/15162065613?reason=asked"
    assert (await client.put(path, headers=bearer(ADMIN))).status == 403  # not its list
    assert (await client.put(path, headers=bearer(EDITOR))).status == 200
    assert (await client.delete(path, headers=bearer(EDITOR))).status == 200
    answer = await client.get("/v1/audit?entry=19512623062", headers=bearer(ADMIN))
    records = (await answer.json())["records"]
    assert [(r["action"], r["actor"], r["entry"], r["reason"]) for r in records] == [
        ("subscriber_remove", "desk", "15162065613", "asked"),
        ("subscriber_block", "desk", "15162065613", "asked"),
    ]
    assert records[0]["subscriber"] == "19512623062"
