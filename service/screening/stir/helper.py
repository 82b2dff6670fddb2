"""A worker's signature helper: its ES256 checks done by a process of their own.

One helper per worker (``python -m core.es256``, the wire format there), joined to it by a
Unix socket pair. Each check is written as soon as a call asks for it; the helper
answers each with a byte, in order. The worker serves other calls meanwhile, so with a
spare core a verified call costs the worker its parsing, not its signature.

Invariants:

- the helper never decides a call alone: an answer it cannot give (``UNUSABLE``), a
  helper that exits, and a check not answered within ``stall_s`` are all checked by the
  worker itself (:meth:`SignatureHelper.check` returns None or its future fails with
  :class:`HelperLost`), so trouble costs speed, never an answer;
- a lost or stalled helper is replaced after :data:`RESTART_PAUSE_S`, a pause that
  doubles (up to :data:`MAX_PAUSE_S`) while each new helper is lost within
  :data:`STEADY_S` of its start; each loss is logged once, and the calls in between
  are checked by the worker;
- the helper's life is the socket's: closing the worker's end (or the worker dying)
  ends it.

Whether a worker starts one is ``stir.signature_helper`` (docs/stir-shaken.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import cast

import core
from core.es256 import MAX_JOB_BYTES, UNUSABLE, job

logger = logging.getLogger(__name__)

#: The pause before a lost helper is replaced; doubled, up to MAX_PAUSE_S, for each
#: helper lost within STEADY_S of its start (one that cannot start is not retried in a
#: tight loop, nor logged every second).
RESTART_PAUSE_S = 1.0
MAX_PAUSE_S = 60.0
STEADY_S = 60.0
#: How long a new helper may take to answer its first job (a probe) before it is given up.
START_TIMEOUT_S = 10.0
#: How long a closing worker gives its helper to exit before killing it.
EXIT_WAIT_S = 2.0
#: Where ``core`` is imported from, for the helper's ``python -m core.es256``.
_PROJECT_ROOT = str(Path(core.__file__).resolve().parent.parent)


def stall_limit(deadline_s: float) -> float:
    """How long a helper may leave a check unanswered: a quarter of the call's deadline,
    so that a call it fails still has time to check the signature in the worker."""
    return deadline_s / 4


class HelperLost(Exception):
    """The helper exited or stalled before answering: check the signature here."""


class _Link(asyncio.Protocol):
    """The worker's end of one helper's socket: the futures owed an answer, in order."""

    def __init__(self, owner: SignatureHelper, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        #: (future, when asked), oldest first; answered in this order.
        self.owed: deque[tuple[asyncio.Future[int], float]] = deque()
        self.watch: asyncio.TimerHandle | None = None
        self.lost = False
        #: Until the helper has answered its first job, its start-up (Python and OpenSSL
        #: loading) may take this long; then the owner's limit holds.
        self.start_timeout_s: float | None = START_TIMEOUT_S
        self.last_answer = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def ask(self, data: bytes) -> asyncio.Future[int]:
        """Send one check at once: the helper starts on it while the worker parses the
        turn's other calls. (Written together at the end of the turn, the checks kept
        the worker idle while the helper did the whole batch, and the helper idle while
        the worker answered it: BENCHMARKS.md.)"""
        transport = self.transport
        assert transport is not None  # set before the link is handed out
        loop = self.loop
        future: asyncio.Future[int] = loop.create_future()
        self.owed.append((future, loop.time()))
        transport.write(data)
        if self.watch is None:
            self.watch = loop.call_later(self.stall_s, self.check)
        return future

    @property
    def stall_s(self) -> float:
        return self.start_timeout_s or self.owner.stall_s

    def started(self) -> None:
        """The helper answered its probe: from now on the owner's stall limit holds."""
        self.start_timeout_s = None
        if self.watch is not None:  # armed with the start-up's limit
            self.watch.cancel()
            self.watch = None

    def check(self) -> None:
        """Every ``stall_s / 2`` while checks are owed: give up on a helper that answered
        nothing for ``stall_s``; leave to the worker the checks of a helper that answers
        but is ``stall_s`` behind (a burst larger than its core keeps up with)."""
        self.watch = None
        if not self.owed or self.lost:
            return
        loop = self.loop
        now = loop.time()
        stall_s = self.stall_s
        silent_s = now - max(self.last_answer, self.owed[0][1])
        if silent_s >= stall_s:
            self.fail(f"no answer in {silent_s * 1000:.0f} ms")
            return
        for future, asked_at in self.owed:
            if now - asked_at < stall_s:
                break
            if not future.done():  # its answer, when it comes, is dropped
                future.set_exception(HelperLost(f"{stall_s * 1000:.0f} ms behind"))
        self.watch = loop.call_later(stall_s / 2, self.check)

    def data_received(self, data: bytes) -> None:
        self.last_answer = self.loop.time()
        owed = self.owed
        for answer in data:
            if not owed:
                self.fail("an answer no check asked for")
                return
            future = owed.popleft()[0]
            if not future.done():
                future.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"it exited ({exc})" if exc is not None else "it exited")

    def fail(self, why: str) -> None:
        """Stop using this helper; its unanswered checks are done by the worker."""
        if self.lost:
            return
        self.lost = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self.transport is not None:
            self.transport.abort()
        owed, self.owed = self.owed, deque()
        for future, _ in owed:
            if not future.done():
                future.set_exception(HelperLost(why))
        self.owner.lost(why)


class SignatureHelper:
    """Starts, feeds and replaces one worker's helper (see the module docstring)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._link: _Link | None = None
        self._process: asyncio.subprocess.Process | None = None
        #: Helpers given up on that may not have exited yet (the loop reaps them).
        self._retired: list[asyncio.subprocess.Process] = []
        self._starting: asyncio.Task[None] | None = None
        self._next_start = 0.0
        self._pause_s = RESTART_PAUSE_S
        #: Helpers lost in a row, each within STEADY_S of its start.
        self._early_losses = 0
        self._started_at = 0.0
        self._closed = False
        #: Set by the first :meth:`start`: only a helper once started is replaced.
        self._wanted = False
        #: Helpers started, the first included (tests and the log).
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The process id of the helper in use, if any."""
        return self._process.pid if self._process is not None and self.running else None

    @property
    def running(self) -> bool:
        link = self._link
        return link is not None and not link.lost

    async def start(self) -> None:
        """Start the helper; on failure log it (the worker checks signatures itself)."""
        loop = asyncio.get_running_loop()
        self._wanted = True
        self._started_at = loop.time()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                part for part in (_PROJECT_ROOT, env.get("PYTHONPATH")) if part
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "core.es256",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            mine.close()
            self.lost(f"it did not start: {exc}")
            return
        finally:
            theirs.close()
        self._process = process
        mine.setblocking(False)
        try:
            _, link = await loop.create_unix_connection(lambda: _Link(self, loop), sock=mine)
        except OSError as exc:
            mine.close()
            self.lost(f"no connection to it: {exc}")
            return
        # In use once it has answered a probe (a job no key can pass): calls do not wait
        # for its start-up, and a helper that cannot start is found out here.
        try:
            probe = await link.ask(job(b"", b"", b""))
        except HelperLost:
            return  # logged by lost(), which set when to try again
        if self._closed:
            link.fail("closing")
            return
        if probe != UNUSABLE:
            link.fail(f"it answered a probe with {probe!r}")
            return
        link.started()
        self._link = link
        self.starts += 1
        logger.info("STIR signature helper started (pid %d)", process.pid)

    def check(
        self, key_der: bytes, signature: bytes, signing_input: bytes
    ) -> asyncio.Future[int] | None:
        """A future of the helper's answer byte (core/es256.py), or None: no helper now,
        check it here. The future fails with :class:`HelperLost` likewise."""
        link = self._link
        if link is None or link.lost:
            self._restart_due()
            return None
        data = job(key_der, signature, signing_input)
        if len(data) > MAX_JOB_BYTES:  # the helper would stop on it (Identity values are
            return None  # capped far below: service/screening/stir/identity.py)
        return link.ask(data)

    def _restart_due(self) -> None:
        if not self._wanted or self._closed:
            return
        if self._starting is not None and not self._starting.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_start:
            self._starting = loop.create_task(self.start(), name="stir-signature-helper")

    def lost(self, why: str) -> None:
        """The helper in use (or being started) is given up: log it, kill it if it still
        runs, and set when the next one starts."""
        if self._closed:
            return
        now = asyncio.get_running_loop().time()
        self._early_losses = self._early_losses + 1 if now - self._started_at < STEADY_S else 0
        self._pause_s = min(RESTART_PAUSE_S * 2 ** max(self._early_losses - 1, 0), MAX_PAUSE_S)
        self._next_start = now + self._pause_s
        logger.warning(
            "the STIR signature helper stopped answering (%s): checking signatures in the "
            "worker, a new helper in %.0f s",
            why,
            self._pause_s,
        )
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:  # stalled, not exited: it answers no more
                process.kill()
            self._retired.append(process)
        self._retired = [old for old in self._retired if old.returncode is None]

    async def close(self) -> None:
        """End the helper: close its socket, wait for it to exit (kill it after
        EXIT_WAIT_S)."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        link, self._link = self._link, None
        if link is not None:
            link.fail("closing")
        processes = [*self._retired, *([self._process] if self._process else [])]
        self._process, self._retired = None, []
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), EXIT_WAIT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
