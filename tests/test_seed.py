"""The seed scenario end to end: the documented example body, blocked and allowed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from core.config import Config
from tests.helpers import EXAMPLE_BODY, REJECT, body_from, load_list


async def test_example_body_is_rejected_when_caller_is_listed(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    client = await make_client(make_config(), redis_client=redis)
    response = await client.post("/", json=EXAMPLE_BODY)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == REJECT


async def test_example_body_with_unlisted_caller_continues(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    client = await make_client(make_config(), redis_client=redis)
    response = await client.post("/tg/main", json=body_from("15162065699"))
    assert response.status == 200
    assert await response.json() == []
