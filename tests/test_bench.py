"""The benchmark's workload and answer checker, on a tiny workload (no timing here).

The bench trusts two things that this proves: each generated body belongs to the class
it is labelled with, as the real parser and policy engine see it, and the checker tells
a right answer from a wrong one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson

from bench.decision import bench_config_for_lists, number_list
from bench.load import write_wrk_script
from bench.workload import (
    ANSWERS,
    CLASS_SHARES,
    Sizes,
    check_answer,
    generate,
    sample,
    write_files,
)
from core.config import parse_config
from core.entries import canonical
from service.screening.lists import ListObject, NameList, PrefixList
from service.screening.policy import CompiledPolicy
from service.screening.request import CallParser

TINY = Sizes(numbers=2_000, allow=200, prefixes=50, names=20, bodies=1_000)


def test_generated_bodies_get_the_answer_of_their_class() -> None:
    workload = generate(TINY)
    assert len(set(workload.bodies)) == TINY.bodies  # all distinct
    counts = Counter(workload.classes)
    assert {cls: counts[cls] / TINY.bodies for cls in CLASS_SHARES} == CLASS_SHARES
    config = parse_config(bench_config_for_lists(), source="bench")
    policy = CompiledPolicy("bench", config.policies["bench"])
    parser = CallParser(config.caller.sources, config.caller.default_country)
    lists: dict[str, ListObject] = {
        "block": number_list(workload.block),
        "allow": number_list(workload.allow),
        "prefixes": PrefixList(frozenset(canonical("prefixes", p) for p in workload.prefixes)),
        "cnam": NameList(frozenset(canonical("names", n) for n in workload.names)),
    }
    for body, cls in zip(workload.bodies, workload.classes, strict=True):
        outcome = policy.conclude(parser.parse(orjson.loads(body)), lists).outcome
        assert check_answer(cls, 200, outcome.answer) is None, (cls, body)
    # Some allow-listed callers are on the block list too: the allow rule comes first.
    blocked = set(workload.block.tolist())
    assert any(n in blocked for n in workload.allow.tolist())


def test_the_checker_catches_wrong_answers() -> None:
    reject = orjson.dumps(ANSWERS["block_list"])
    assert check_answer("block_list", 200, reject) is None
    assert check_answer("unlisted", 200, b"[]") is None
    assert check_answer("unlisted", 200, reject) is not None
    assert check_answer("block_list", 200, b"[]") is not None
    assert check_answer("cnam", 200, reject) is not None  # right action, wrong operands
    assert check_answer("unlisted", 503, b"[]") is not None


def test_files_and_the_wrk_script(tmp_path: Path) -> None:
    workload = generate(TINY)
    files = write_files(workload, tmp_path)
    lines = files.bodies.read_bytes().splitlines()
    assert lines == workload.bodies
    header, *numbers = files.block.read_text().splitlines()
    assert header == "number" and len(numbers) == TINY.numbers
    assert len(sample(workload, per_class=3)) == 3 * len(CLASS_SHARES)
    script = write_wrk_script(tmp_path, files.bodies, "/tg/bench").read_text()
    assert str(files.bodies) in script and "/tg/bench" in script
