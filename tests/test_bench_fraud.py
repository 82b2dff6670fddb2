"""The bench's fraud policy (bench/fraud.py) on a real Redis, without timing: its config
is valid and Redis-backed, and its key census counts and measures what calls leave."""

from __future__ import annotations

from pathlib import Path

import redis as sync_redis
from redis.asyncio import Redis

from bench.fraud import FRAUD_TRUNK_GROUP, KINDS, fraud_config, key_memory
from bench.workload import Files, bench_config
from core import fraud, keys
from core.config import parse_config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from service.screening.policy import CompiledPolicy


def test_the_fraud_policy_reads_redis_for_three_rules_and_keeps_the_lists(tmp_path: Path) -> None:
    files = Files(*(tmp_path / f"{name}.csv" for name in ("b", "a", "p", "n", "bodies")))
    data = fraud_config(bench_config(files, "redis://127.0.0.1:1/0", 1, 1))
    config = parse_config(data, source="bench")
    assert config.trunk_groups[FRAUD_TRUNK_GROUP].policy == FRAUD_TRUNK_GROUP
    policy = CompiledPolicy(FRAUD_TRUNK_GROUP, config.policies[FRAUD_TRUNK_GROUP])
    assert (len(policy.rate_rules), len(policy.keyed_rates), len(policy.sequences)) == (1, 1, 1)
    assert policy.lists == CompiledPolicy("bench", config.policies["bench"]).lists


async def test_key_census_counts_measures_and_finds_keys_without_ttl(
    redis: Redis, redis_server: RedisProcess
) -> None:
    store = ListStore(redis)
    rates = [fraud.KeyedRate("p:tdos", "called", 60)]
    sequences = [fraud.SequenceRule("p:seq", 60, 1, 16)]
    for i in range(5):
        caller, called = f"1212555{i:04d}", f"1516206{i:04d}"
        plan = fraud.plan(
            rates, sequences, caller=caller, called=called, trunk_group="t", now_s=1000.0
        )
        await store.fetch_for_call(caller, [("p:flood", 60)], 1000.0, extra=plan.commands)
    await redis.persist(keys.dialed("12125550000", "p:seq"))
    client = sync_redis.Redis(port=redis_server.port)
    try:
        census = {kind: key_memory(client, pattern) for kind, pattern in KINDS.items()}
    finally:
        client.close()
    assert {kind: c["keys"] for kind, c in census.items()} == {
        "call rate by caller": 5,
        "call rate by called": 5,
        "sequential dialing": 5,
    }
    assert census["sequential dialing"]["without_ttl"] == 1
    assert census["call rate by called"]["without_ttl"] == 0
    assert all(0 < (c["bytes_per_key"] or 0) < 500 for c in census.values())
