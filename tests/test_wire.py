"""The calls' own Redis connection (core/wire.py) when its server stops answering, goes
away, or answers with errors: the callers waiting on it fail with LinkError, the next
caller gets a fresh connection, and replies are Redis's own (no redis-py callbacks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import NoPermissionError, ResponseError

from core import wire
from core.wire import Link, LinkError, Settings
from devtools.redis_server import RedisProcess
from tests.helpers import wait_for


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    process = RedisProcess(tmp_path / "redis").start()
    yield process
    process.resume()  # in case a test left it paused
    process.stop()


async def test_a_server_that_stops_answering_fails_its_callers_then_is_reconnected(
    server: RedisProcess,
) -> None:
    link = Link(Settings("127.0.0.1", server.port, connect_timeout_s=1.0, stall_s=0.3))
    try:
        assert await link.run([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
        server.pause()
        try:
            waiting = [asyncio.ensure_future(link.run([("GET", "k")])) for _ in range(3)]
            done = await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            server.resume()
        assert all(isinstance(d, LinkError) and "no reply" in str(d) for d in done), done
        # The stalled connection was closed; the next call connects again.
        assert await link.run([("GET", "k")]) == [b"v"]
    finally:
        await link.aclose()


async def test_a_server_gone_fails_the_call_and_one_back_is_used_again(
    server: RedisProcess,
) -> None:
    link = Link(Settings("127.0.0.1", server.port, connect_timeout_s=1.0))
    try:
        assert await link.run([("PING",)]) == [b"PONG"]
        server.stop()
        with pytest.raises(LinkError):
            await link.run([("PING",)])
        server.start()
        assert await link.run([("INCR", "n"), ("INCR", "n")]) == [1, 2]
    finally:
        await link.aclose()


async def test_error_replies_come_back_as_redis_py_exceptions_in_place(
    server: RedisProcess,
) -> None:
    admin = Link(Settings("127.0.0.1", server.port))
    user = Link(Settings("127.0.0.1", server.port, username="calls", password="s3cret-pass"))
    try:
        setup = [("ACL", "SETUSER", "calls", "on", ">s3cret-pass", "~{ok}*", "+@all")]
        assert await admin.run(setup) == [b"OK"]
        replies = await user.run(
            [("SET", "{ok}a", 1), ("GET", "{no}b"), ("LPUSH", "{ok}a", "x"), ("GET", "{ok}a")]
        )
        assert replies[0] == b"OK" and replies[3] == b"1"
        assert isinstance(replies[1], NoPermissionError)
        assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
        wrong = Link(Settings("127.0.0.1", server.port, username="calls", password="nope"))
        with pytest.raises(LinkError, match="refused the connection"):
            await wrong.run([("PING",)])
        await wrong.aclose()
    finally:
        await admin.aclose()
        await user.aclose()


async def test_each_callers_deadline_fails_it_alone_and_its_late_reply_is_dropped(
    server: RedisProcess,
) -> None:
    """Three callers with different deadlines and one without, in one write, against a
    server that is paused: each of the three gets TimeoutError when its own deadline
    passes (not the link's stall limit, not the first deadline); once the server
    answers again the fourth gets its reply, and the next caller its own, not one of
    the dropped ones."""
    link = Link(Settings("127.0.0.1", server.port, connect_timeout_s=1.0, stall_s=5.0))
    loop = asyncio.get_running_loop()
    try:
        assert await link.run([("SET", "k", "v")]) == [b"OK"]
        failed_at: dict[float, float] = {}

        async def caller(budget_s: float | None) -> list[object]:
            try:
                return await link.run([("GET", "k")], budget_s)
            except TimeoutError:
                assert budget_s is not None
                failed_at[budget_s] = loop.time() - started
                raise

        server.pause()
        try:
            started = loop.time()
            waiting = [asyncio.ensure_future(caller(b)) for b in (0.3, 0.1, 0.2, None)]
            done = await asyncio.gather(*waiting[:3], return_exceptions=True)
        finally:
            server.resume()
        assert all(isinstance(d, TimeoutError) for d in done), done
        # Each failed at its own deadline, in deadline order, none before it.
        assert sorted(failed_at, key=failed_at.__getitem__) == [0.1, 0.2, 0.3]
        for budget_s, at_s in failed_at.items():
            assert budget_s - 0.002 <= at_s < budget_s + 0.25, failed_at
        # The caller without a deadline is answered once the server is back.
        assert await waiting[3] == [b"v"]
        assert await link.run([("SET", "k", "w"), ("GET", "k")], 1.0) == [
            b"OK",
            b"w",
        ]
    finally:
        await link.aclose()


async def test_answered_callers_are_let_go_at_once_not_at_their_deadline(
    server: RedisProcess,
) -> None:
    """A caller's deadline is kept only while it waits: a hundred callers answered well
    before their 5 s deadlines leave nothing behind for the timer (or the cyclic
    collector) to go through, while one still waiting is kept."""
    link = Link(Settings("127.0.0.1", server.port, connect_timeout_s=1.0, stall_s=5.0))
    try:
        replies = await asyncio.gather(*(link.run([("INCR", "n")], 5.0) for _ in range(100)))
        assert sorted(r[0] for r in replies) == list(range(1, 101))
        assert link.deadlines_held == 0
        server.pause()
        try:
            waiting = asyncio.ensure_future(link.run([("GET", "n")], 5.0))

            async def held() -> bool:
                return link.deadlines_held == 1

            await wait_for(held, timeout_s=2.0, what="the waiting caller's deadline kept")
        finally:
            server.resume()
        assert await waiting == [b"100"]
        assert link.deadlines_held == 0
    finally:
        await link.aclose()


@given(
    st.text(min_size=1, max_size=80),
    st.text(min_size=1, max_size=20),
    st.integers(min_value=0, max_value=10**9),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.integers(min_value=-1000, max_value=-1),
)
def test_composed_commands_are_what_hiredis_packs_or_are_left_to_it(
    key: str, field: str, seconds: int, score: float, stop: int
) -> None:
    """The calls' commands composed as text are byte for byte hiredis's packing; text
    beyond ASCII is refused (its lengths would be wrong) and packed by hiredis."""
    after = f"({score!r}"
    composed = (
        wire.incrby_one(key) + wire.get(key) + wire.expire(key, seconds)
        + wire.hmget_two(key, field, "_gen") + wire.zadd_one(key, repr(score), field)
        + wire.zrangebyscore_after(key, after) + wire.zremrangebyrank_to(key, stop)
    )  # fmt: skip
    packed = wire.encode(
        [
            ("INCRBY", key, 1), ("GET", key), ("EXPIRE", key, seconds),
            ("HMGET", key, field, "_gen"), ("ZADD", key, score, field),
            ("ZRANGEBYSCORE", key, after, "+inf"), ("ZREMRANGEBYRANK", key, 0, stop),
        ]
    )  # hiredis's packing  # fmt: skip
    data = wire.ascii_bytes(composed)
    if (key + field).isascii():
        assert data == packed
    else:
        assert data is None
