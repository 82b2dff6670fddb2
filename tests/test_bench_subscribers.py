"""The bench's per-subscriber workload on a real Redis (no timing here).

What bench/subscribers.py trusts: the CSV it writes loads through the real loader, each
body it labels gets that class's answer from the real parser, policy and entries read
back from Redis, and its memory measure covers every bucket.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import redis as sync_redis
from redis.asyncio import Redis

from bench.subscribers import bucket_memory
from bench.workload import (
    RATE_TRUNK_GROUP,
    SUBSCRIBER_CLASS_SHARES,
    SUBSCRIBER_LIST,
    SUBSCRIBER_TRUNK_GROUP,
    Files,
    SubscriberSizes,
    bench_config,
    check_answer,
    subscriber_config,
    subscriber_sample,
    write_subscribers,
)
from core import keys
from core.config import parse_config
from core.subscribers import SubscriberStore
from devtools.redis_server import RedisProcess
from loader.sync import sync_list
from service.screening.lists import NameList, NumberList, PrefixList, SubscriberList
from service.screening.policy import CompiledPolicy
from service.screening.request import CallParser

TINY = SubscriberSizes(subscribers=3_000, entries=10, bodies=800, called=300)


async def test_subscriber_bodies_get_the_answer_of_their_class(
    redis: Redis, redis_server: RedisProcess, tmp_path: Path
) -> None:
    workload = write_subscribers(tmp_path / "personal.csv", TINY)
    assert workload.rows == TINY.subscribers * TINY.entries
    counts = Counter(workload.classes)
    assert {c: counts[c] / TINY.bodies for c in SUBSCRIBER_CLASS_SHARES} == SUBSCRIBER_CLASS_SHARES
    files = Files(*(tmp_path / f"{name}.csv" for name in ("b", "a", "p", "n", "bodies")))
    data = subscriber_config(bench_config(files, redis_server.url, 1, 1), workload.path)
    config = parse_config(data, source="bench")
    report = await sync_list(redis, config, SUBSCRIBER_LIST)
    assert report.rows_rejected == 0 and report.result is not None
    assert report.result.size > 0.999 * workload.rows  # the odd repeated entry counts once

    policy = CompiledPolicy(SUBSCRIBER_TRUNK_GROUP, config.policies[SUBSCRIBER_TRUNK_GROUP])
    assert policy.subscriber_lists == (SUBSCRIBER_LIST,) and len(policy.rate_rules) == 1
    rate = CompiledPolicy(RATE_TRUNK_GROUP, config.policies[RATE_TRUNK_GROUP])
    assert rate.subscriber_lists == () and len(rate.rate_rules) == 1
    assert len(rate.rules) == len(config.policies["bench"].rules) + 1
    parser = CallParser(config.caller.sources, config.caller.default_country)
    store = SubscriberStore(redis)
    lists: dict[str, Any] = {
        SUBSCRIBER_LIST: SubscriberList(await store.gen(SUBSCRIBER_LIST), report.result.size),
        "allow": NumberList([], frozenset(), frozenset()),
        "block": NumberList([], frozenset(), frozenset()),
        "prefixes": PrefixList(frozenset()),
        "cnam": NameList(frozenset()),
    }
    for body, cls in zip(workload.bodies, workload.classes, strict=True):
        call = parser.parse(orjson.loads(body))
        assert call.called is not None
        _, entries = await store.read(SUBSCRIBER_LIST, call.called)
        outcome = policy.conclude(call, lists, {}, {SUBSCRIBER_LIST: entries}).outcome
        assert check_answer(cls, 200, outcome.answer) is None, (cls, body)
    assert len(subscriber_sample(workload, per_class=3)) == 3 * len(SUBSCRIBER_CLASS_SHARES)

    client = sync_redis.Redis(port=redis_server.port)
    try:
        memory = bucket_memory(client, await store.gen(SUBSCRIBER_LIST))
        assert sum(memory["encodings"].values()) == keys.SUBSCRIBER_BUCKETS
        assert 0 < memory["marker_bytes"] < memory["bytes"]
        assert not client.keys("*bench-copy*")  # the scratch copies are gone
    finally:
        client.close()


def test_zipf_bodies_crowd_onto_few_subscribers(tmp_path: Path) -> None:
    """``--subscriber-zipf``: a few called numbers take most calls (contact centres);
    the classes keep their shares, and each body's caller fits its class."""
    uniform = write_subscribers(tmp_path / "u.csv", TINY)
    skewed = write_subscribers(tmp_path / "z.csv", replace(TINY, zipf=1.2))

    def called(workload: Any) -> Counter[str]:
        return Counter(orjson.loads(b)["To"][0]["user"] for b in workload.bodies)

    top_uniform = sum(n for _, n in called(uniform).most_common(10)) / TINY.bodies
    top_skewed = sum(n for _, n in called(skewed).most_common(10)) / TINY.bodies
    assert top_uniform < 0.1 and top_skewed > 0.4
    counts = Counter(skewed.classes)
    assert {c: counts[c] / TINY.bodies for c in SUBSCRIBER_CLASS_SHARES} == SUBSCRIBER_CLASS_SHARES
