"""Auto-pipelining: the batches asked for in one event-loop turn go to Redis as one.

A caller with nothing else in flight sends its own batch at once (a lone caller pays
nothing); otherwise the turn's first caller schedules a flush at the end of the turn
(``call_soon``) that sends every pending caller's commands through one
:meth:`core.shards.Dispatcher.run` (one pipeline per node) in a task of its own.
Invariants: each caller gets exactly its own replies, in order, its failures only; it is
answered once the nodes holding its keys are done, not the batch's slowest; a caller
that stops waiting (its deadline) leaves the batch to the others.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from typing import Any

from core.shards import Command, Dispatcher

Waiting = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]


class Coalescer:
    """Joins the batches of one event-loop turn into one :class:`Dispatcher` batch."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._pending: list[Waiting] = []
        self._running: set[asyncio.Task[None]] = set()
        #: Callers sending a batch of their own right now (see the module doc).
        self._alone = 0
        #: Joined batches sent and the callers they served (callers sending alone are
        #: not counted), for tests and benchmarks.
        self.batches = 0
        self.callers = 0

    async def run(self, commands: Sequence[Command], timeout_s: float | None = None) -> list[Any]:
        """``commands``' replies in order, sent with the turn's other batches.

        Never raises for a Redis failure (see :meth:`core.shards.Dispatcher.run`);
        raises ``TimeoutError`` when ``timeout_s`` passes first.
        """
        if not commands:
            return []
        if self.dispatcher.lean:  # the links join the turn's callers on the wire
            return await self.dispatcher.run(commands, timeout_s=timeout_s)
        if timeout_s is None:
            return await self._joined(commands)
        async with asyncio.timeout(timeout_s):
            return await self._joined(commands)

    async def _joined(self, commands: Sequence[Command]) -> list[Any]:
        if not self._pending and not self._running and not self._alone:
            self._alone += 1
            try:
                return await self.dispatcher.run(commands)
            finally:
                self._alone -= 1
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # A fresh context: the flush serves many requests, and must carry none's id.
            asyncio.get_running_loop().call_soon(self._flush, context=contextvars.Context())
        self._pending.append((commands, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        task = asyncio.create_task(self._send(pending), name="redis-batch")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _send(self, pending: list[Waiting]) -> None:
        waiting = [(commands, future) for commands, future in pending if not future.done()]
        if not waiting:  # every caller gave up already
            return
        joined: list[Command] = []
        # For each joined command, the caller it belongs to; per caller, the replies
        # still outstanding and where its commands start.
        owner: list[int] = []
        outstanding = []
        starts = []
        for n, (commands, _) in enumerate(waiting):
            starts.append(len(joined))
            joined += commands
            owner += [n] * len(commands)
            outstanding.append(len(commands))
        self.batches += 1
        self.callers += len(waiting)
        replies: list[Any] = [None] * len(joined)

        def answer(n: int) -> None:
            commands, future = waiting[n]
            if not future.done():  # a caller whose deadline passed is not answered
                future.set_result(replies[starts[n] : starts[n] + len(commands)])

        def on_part(done: list[tuple[int, Any]]) -> None:
            # Called as each node is done: a caller is answered once all of its
            # commands are, without waiting for nodes it has nothing on.
            for i, reply in done:
                replies[i] = reply
                n = owner[i]
                outstanding[n] -= 1
                if outstanding[n] == 0:
                    answer(n)

        try:
            final = await self.dispatcher.run(joined, on_part)
        except BaseException as exc:  # a bug or a cancellation: nobody may wait forever
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
            raise
        replies[:] = final
        for n in range(len(waiting)):  # any not reported as final (none, normally)
            if outstanding[n] > 0:
                answer(n)

    async def aclose(self) -> None:
        """Wait for the batches in flight (their callers are answered)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
