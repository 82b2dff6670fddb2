"""The signature helper: ES256 checks in a process beside the worker (core/es256.py,
service/screening/stir/helper.py), on real helper processes.

What a user would notice: every answer is the one the worker would give itself, and a
helper that dies or hangs costs no call its answer (the worker checks instead, and a new
helper takes over).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from core import es256
from core.es256 import BAD, GOOD, UNUSABLE, Checker, job, key_der
from service.screening.stir import helper as helper_module
from service.screening.stir.helper import HelperLost, SignatureHelper
from tests.helpers import alive, process_state, wait_for

KEY = ec.generate_private_key(ec.SECP256R1())
KEY_DER = key_der(KEY.public_key())
OTHER_DER = key_der(ec.generate_private_key(ec.SECP256R1()).public_key())


def jws_signature(data: bytes) -> bytes:
    """``data`` signed as a PASSporT carries it: R and S, 32 bytes each."""
    r, s = decode_dss_signature(KEY.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


MESSAGES = [f"header.payload-{i}".encode() for i in range(6)]
SIGNATURES = [jws_signature(m) for m in MESSAGES]
#: (key, signature, signing input) and the answer each must get.
CASES = [
    ((KEY_DER, SIGNATURES[0], MESSAGES[0]), GOOD),
    ((KEY_DER, SIGNATURES[0], MESSAGES[1]), BAD),  # another message
    ((OTHER_DER, SIGNATURES[2], MESSAGES[2]), BAD),  # another key
    ((b"not a key", SIGNATURES[3], MESSAGES[3]), UNUSABLE),
    ((KEY_DER, SIGNATURES[4][:40], MESSAGES[4]), UNUSABLE),  # cut short
    ((KEY_DER, SIGNATURES[5], MESSAGES[5]), GOOD),
]
STREAM = b"".join(job(*fields) for fields, _ in CASES)
ANSWERS = bytes(answer for _, answer in CASES)


def test_the_checker_answers_each_job_in_order() -> None:
    assert Checker().feed(STREAM) == ANSWERS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_a_stream_cut_anywhere_gets_the_same_answers(cuts: list[int]) -> None:
    checker = Checker()
    edges = [0, *sorted(cuts), len(STREAM)]
    answers = b"".join(checker.feed(STREAM[a:b]) for a, b in itertools.pairwise(edges))
    assert answers == ANSWERS


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_answered_or_refused_as_a_stream_out_of_step(data: bytes) -> None:
    try:
        answers = Checker().feed(data)
    except ValueError as exc:
        assert "a job of" in str(exc)
    else:
        assert set(answers) <= {GOOD, BAD, UNUSABLE}


def test_a_job_too_large_stops_the_stream() -> None:
    with pytest.raises(ValueError, match="a job of"):
        Checker().feed(es256.HEADER.pack(0, 0, es256.MAX_JOB_BYTES))


@pytest.fixture
async def helper() -> AsyncIterator[SignatureHelper]:
    made = SignatureHelper(stall_s=0.5)
    await made.start()
    assert made.running
    yield made
    await made.close()


async def ask_all(helper: SignatureHelper) -> list[int]:
    futures = [helper.check(*fields) for fields, _ in CASES]
    assert all(future is not None for future in futures)
    return list(await asyncio.gather(*(f for f in futures if f is not None)))


async def test_the_helper_answers_like_the_checker(helper: SignatureHelper) -> None:
    assert bytes(await ask_all(helper)) == ANSWERS
    # Many at once, as a busy worker asks: each its own answer.
    many = [helper.check(*CASES[i % 2][0]) for i in range(500)]
    answers = await asyncio.gather(*(f for f in many if f is not None))
    assert answers == [GOOD if i % 2 == 0 else BAD for i in range(500)]


async def test_closing_the_worker_side_ends_the_helper() -> None:
    helper = SignatureHelper(stall_s=0.5)
    await helper.start()
    pid = helper.pid
    assert pid is not None and alive(pid)
    await helper.close()
    assert not alive(pid)
    assert helper.check(*CASES[0][0]) is None  # closed: the worker checks itself


async def test_a_helper_that_dies_is_replaced_and_its_checks_are_left_to_the_worker(
    helper: SignatureHelper,
) -> None:
    pid = helper.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # so that these stay unanswered until it dies

    async def stopped() -> bool:
        return process_state(pid) == "T"

    await wait_for(stopped, what="the helper to stop")
    owed = [helper.check(*fields) for fields, _ in CASES]
    os.kill(pid, signal.SIGKILL)
    for future in owed:
        assert future is not None
        with pytest.raises(HelperLost):
            await future
    assert not helper.running
    assert helper.check(*CASES[0][0]) is None  # checked by the worker meanwhile

    async def replaced() -> bool:
        return helper.check(*CASES[0][0]) is not None

    await wait_for(replaced, timeout_s=helper_module.RESTART_PAUSE_S + 5.0)
    assert helper.starts == 2 and helper.pid not in (None, pid)
    assert bytes(await ask_all(helper)) == ANSWERS


async def test_a_stalled_helper_is_given_up_within_its_stall_limit(
    helper: SignatureHelper,
) -> None:
    pid = helper.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    started = loop.time()
    future = helper.check(*CASES[0][0])
    assert future is not None
    with pytest.raises(HelperLost, match="no answer in"):
        await future
    waited = loop.time() - started
    assert 0.5 <= waited < 2.0

    async def gone() -> bool:  # killed, not left stopped: no stray process holds on
        return not alive(pid)

    await wait_for(gone, timeout_s=5.0)


async def test_the_checks_a_busy_helper_is_behind_on_go_to_the_worker() -> None:
    """A burst far larger than the helper's core keeps up with: the checks waiting past the
    stall limit are left to the worker, while the helper, still answering, is kept."""
    helper = SignatureHelper(stall_s=0.02)
    await helper.start()
    try:
        pid = helper.pid
        burst = [helper.check(*CASES[i % 2][0]) for i in range(3000)]
        answered, behind = 0, 0
        for i, future in enumerate(burst):
            assert future is not None
            try:
                answer = await future
            except HelperLost as exc:
                assert "behind" in str(exc)
                behind += 1
            else:
                assert answer == (GOOD if i % 2 == 0 else BAD)
                answered += 1
        assert answered > 0 and behind > 0
        assert helper.running and helper.pid == pid and helper.starts == 1
    finally:
        await helper.close()


async def test_a_helper_that_cannot_start_is_retried_ever_less_often(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A helper that exits at once (here: a program that is not one) leaves every check
    to the worker, and the tries back off instead of looping every second."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    helper = SignatureHelper(stall_s=0.5)
    try:
        for _ in range(4):
            await helper.start()
            assert not helper.running
            assert helper.check(*CASES[0][0]) is None
        assert helper.starts == 0
        said = [r.getMessage() for r in caplog.records]
        said = [line for line in said if "stopped answering" in line]
        pauses = [re.search(r"a new helper in (\d+) s", line) for line in said]
        assert [int(p.group(1)) for p in pauses if p] == [1, 2, 4, 8]
    finally:
        await helper.close()


async def test_a_job_too_large_for_the_helper_is_left_to_the_worker(
    helper: SignatureHelper,
) -> None:
    huge = b"x" * es256.MAX_JOB_BYTES
    assert helper.check(KEY_DER, SIGNATURES[0], huge) is None
    assert bytes(await ask_all(helper)) == ANSWERS  # and the helper goes on answering
    assert helper.starts == 1
