"""Lists carriers are told to block, loaded from files shaped as published (docs/fraud.md):
the Do-Not-Originate list (numbers) and unallocated NANP codes and thousands-blocks
(prefixes), each acted on by a real service."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core import keys
from core.config import Config, ConfigError, parse_config
from loader.sync import SyncOptions, sync_list
from tests.helpers import body_from

QUIET = SyncOptions(progress="off")
DNO = [{"action": "reject", "operands": ["unwanted", "dno"]}]
UNALLOCATED = [{"action": "reject", "operands": ["unwanted", "unallocated"]}]


def write_examples(folder: Path) -> None:
    # Do-Not-Originate: inbound-only numbers (a tax office, a bank's help line), as a
    # plain list of 10-digit NANP numbers, one a line.
    (folder / "dno.txt").write_text("# DNO registry extract\n8008291040\n2125550199\n\n")
    # NANPA's central office code report of *available* (unassigned) codes for a
    # region: tab-separated, a header, State and NPA-NXX.
    (folder / "available-codes.txt").write_text("State\tNPA-NXX\nNJ\t201-204\nNY\t212-958\n")
    # Thousands-blocks sitting unassigned in a pool: one NPA-NXX-X per row.
    (folder / "pool-blocks.csv").write_text(
        "State,NPA-NXX-X,Rate Center\nNJ,201-555-3,HACKENSACK\nNJ,973-555-0,NEWARK\n"
    )


def carrier_config(make_config: Callable[..., Config], folder: Path) -> Config:
    reject = {"action": "reject"}
    data: dict[str, Any] = {
        "lists": {
            "dno": {"kind": "numbers", "source": "dno.txt"},
            "unallocated-codes": {
                "kind": "prefixes",
                "source": "available-codes.txt",
                "delimiter": "\t",
                "column": "NPA-NXX",
                "entry_prefix": "1",
            },
            "unallocated-blocks": {
                "kind": "prefixes",
                "source": "pool-blocks.csv",
                "column": "NPA-NXX-X",
                "label_columns": ["State"],
                "entry_prefix": "1",
            },
        },
        "policies": {
            "default": {
                "rules": [
                    {"name": "dno", "match": "caller_in_list", "list": "dno",
                     "operands": ["unwanted", "dno"], **reject},
                    {"name": "unallocated-codes", "match": "caller_prefix_in_list",
                     "list": "unallocated-codes", "operands": ["unwanted", "unallocated"]},
                    {"name": "unallocated-blocks", "match": "caller_prefix_in_list",
                     "list": "unallocated-blocks", "operands": ["unwanted", "unallocated"]},
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
    }  # fmt: skip
    return make_config(data, base_dir=folder)


async def test_dno_and_unallocated_lists_load_as_published_and_block(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    write_examples(tmp_path)
    config = carrier_config(make_config, tmp_path)
    reports = {name: await sync_list(redis, config, name, QUIET) for name in config.lists}
    assert {name: (r.rows_read, r.rows_rejected) for name, r in reports.items()} == {
        "dno": (2, 0),
        "unallocated-codes": (2, 0),
        "unallocated-blocks": (2, 0),
    }
    assert reports["unallocated-blocks"].labels == {"State": {"NJ": 2}}
    members = {
        m.decode() if isinstance(m, bytes) else m
        for m in await redis.smembers(keys.base("unallocated-codes", 1))
    }
    assert members == {"1201204", "1212958"}
    client = await make_client(config)

    async def answer(caller: str) -> Any:
        response = await client.post("/tg/main", json=body_from(caller))
        assert response.status == 200
        return await response.json()

    assert await answer("+18008291040") == DNO  # a DNO number presented as caller ID
    assert await answer("2012041234") == UNALLOCATED  # code 201-204 is not assigned
    assert await answer("12015553999") == UNALLOCATED  # block 201-555-3 is in the pool
    assert await answer("12015554999") == []  # the next block is assigned
    assert await answer("12125550100") == []


def test_entry_prefix_is_for_prefixes_lists_only() -> None:
    data = {"lists": {"dno": {"kind": "numbers", "entry_prefix": "1"}}}
    with pytest.raises(ConfigError, match=r"lists\.dno: .*'entry_prefix' is for lists of kind"):
        parse_config(data, source="c.yaml")
