"""The benchmark workload (BENCHMARKS.md): lists, request bodies and the answers each body must get.

Everything is generated from a seed, so two runs with the same sizes load the same
numbers and send the same bodies. Callers fall in five classes:

============  ======  ==========================================================
class         share   caller
============  ======  ==========================================================
block_list    16 %    on the block list (and not on the allow list)
prefix        2 %     starts with an entry of the prefix list
cnam          2 %     unlisted number, caller name matching a CNAM entry
allow_list    5 %     on the allow list; one in ten of those is on the block list
                      too, so the allow rule coming first is what lets it through
unlisted      75 %    on no list, with an ordinary name
============  ======  ==========================================================

The first three are the workload's "20 % blocked". General callers are NANP numbers whose
area code is never 809, 900 or 976: those are kept for the prefix list, so no
ordinary caller can match a prefix by chance.

The per-subscriber part (bench/subscribers.py) has its own list and bodies
(:func:`write_subscribers`): ``subscribers`` subscribers with ``entries`` entries each
(11-digit numbers: all on the block side but the last, on the allow side), as CSV rows
``subscriber,entry[,side]``; and bodies calling a subscriber of the list, in three
classes:

============  ======  ==========================================================
class         share   caller
============  ======  ==========================================================
sub_block     20 %    one of the called subscriber's block entries
sub_allow     5 %     the called subscriber's allow entry
sub_unlisted  75 %    on none of the called subscriber's entries
============  ======  ==========================================================
"""

from __future__ import annotations

import itertools
import random
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

#: Share of request bodies in each caller class (see the module docstring).
CLASS_SHARES = {
    "block_list": 0.16,
    "prefix": 0.02,
    "cnam": 0.02,
    "allow_list": 0.05,
    "unlisted": 0.75,
}
#: What the bench policy answers for each class.
ANSWERS: dict[str, list[dict[str, Any]]] = {
    "block_list": [{"action": "reject", "operands": ["unavailable", "aniblock"]}],
    "prefix": [{"action": "reject", "operands": ["decline", "prefix"]}],
    "cnam": [{"action": "reject", "operands": ["unwanted", "cnam"]}],
    "allow_list": [],
    "unlisted": [],
}
TRUNK_GROUP = "bench"
#: The per-subscriber part: its list, trunk group, classes and answers.
SUBSCRIBER_LIST = "personal"
SUBSCRIBER_TRUNK_GROUP = "subscribers"
#: The same subscriber rules without the call-rate rule: a hot subscriber is answered
#: from the worker's entries cache, without Redis (docs/subscribers.md).
ENTRIES_TRUNK_GROUP = "subscriber-entries"
#: The bench policy's local rules plus one call-rate rule counting each caller's calls
#: (a limit no caller reaches): every call it does not reject locally goes to Redis.
RATE_TRUNK_GROUP = "call-rate"
#: That rule, also the last of the subscribers policy.
FLOOD_RULE: dict[str, Any] = {
    "name": "flood", "match": "call_rate", "limit": 1_000_000_000, "window_s": 60,
    "operands": ["busy-here", "too-many-calls"],
}  # fmt: skip
SUBSCRIBER_CLASS_SHARES = {"sub_block": 0.20, "sub_allow": 0.05, "sub_unlisted": 0.75}
SUBSCRIBER_ANSWERS: dict[str, list[dict[str, Any]]] = {
    "sub_block": [{"action": "reject", "operands": ["decline", "subscriber-block"]}],
    "sub_allow": [],
    "sub_unlisted": [],
}
#: Area codes only the prefix list uses.
PREFIX_NPAS = (809, 900, 976)
_FIRST = (
    "JAMES", "MARY", "ROBERT", "PATRICIA", "JOHN", "JENNIFER", "MICHAEL", "LINDA", "DAVID",
    "ELIZABETH", "WILLIAM", "BARBARA", "RICHARD", "SUSAN", "JOSEPH", "JESSICA", "THOMAS",
    "SARAH", "CHARLES", "KAREN", "DANIEL", "NANCY", "MATTHEW", "BETTY", "ANTHONY", "MARK",
)  # fmt: skip
_LAST = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "WILSON",
    "RODRIGUEZ", "MARTINEZ", "LOPEZ", "ANDERSON", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
    "LEE", "PEREZ", "WHITE", "HARRIS", "CLARK", "LEWIS", "WALKER", "YOUNG", "KING", "SCOTT",
)  # fmt: skip
_PLACES = (
    "NEW YORK NY", "CHICAGO IL", "HOUSTON TX", "PHOENIX AZ", "DENVER CO", "BOSTON MA",
    "SEATTLE WA", "MIAMI FL", "ATLANTA GA", "DALLAS TX", "WIRELESS CALLER", "",
)  # fmt: skip
_AGENTS = ("VirtualPBX", "Asterisk PBX 18.9.0", "FPBX-16.0.40", "Grandstream UCM6302", "Yealink")
_SPAM_WORDS = ("warranty", "debt relief", "vacation", "final notice", "solar", "medicare")


@dataclass(frozen=True, slots=True)
class Sizes:
    numbers: int = 1_000_000
    allow: int = 10_000
    prefixes: int = 1_000
    names: int = 100
    bodies: int = 50_000


@dataclass(slots=True)
class Workload:
    """Generated lists and bodies; numbers are canonical E.164 integers."""

    block: np.ndarray[Any, np.dtype[np.uint64]]
    allow: np.ndarray[Any, np.dtype[np.uint64]]
    prefixes: list[str]
    names: list[str]
    #: One encoded JSON request body per call, and the caller class of each.
    bodies: list[bytes]
    classes: list[str]


@dataclass(frozen=True, slots=True)
class Files:
    block: Path
    allow: Path
    prefixes: Path
    names: Path
    bodies: Path


def _nanp_codes(exclude: tuple[int, ...] = ()) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Three-digit codes 200-999 that are not N11 service codes (nor ``exclude``)."""
    codes = np.arange(200, 1000, dtype=np.int64)
    keep = (codes % 100 != 11) & ~np.isin(codes, exclude)
    kept: np.ndarray[Any, np.dtype[np.int64]] = codes[keep]
    return kept


def random_numbers(rng: np.random.Generator, count: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """``count`` distinct NANP-shaped numbers (``1NPANXXXXXX``) in random order.

    NPA 809/900/976 are left out (the prefix list's), and NXX 555 too (555-01xx is
    fictional). Many NPAs drawn are unassigned, so an ``invalid_number`` rule would flag
    them; the benchmark's policy has none.
    """
    npas = _nanp_codes(PREFIX_NPAS)
    nxxs = _nanp_codes((555,))
    found = np.empty(0, dtype=np.uint64)
    while found.size < count:
        draw = int((count - found.size) * 1.02) + 1000
        numbers = (
            10_000_000_000
            + rng.choice(npas, draw) * 10_000_000
            + rng.choice(nxxs, draw) * 10_000
            + rng.integers(0, 10_000, draw)
        ).astype(np.uint64)
        found = np.unique(np.concatenate([found, numbers]))
    return rng.permutation(found)[:count]


def _prefix_entries(rng: random.Random, count: int) -> list[str]:
    """Prefix-list entries: 7- and 8-digit NANP ranges in the reserved area codes,
    plus a few international ones (4 to 6 digits)."""
    international = ["4470", "4487", "44909", "882", "883", "3706", "23225", "881"]
    entries: set[str] = set(international[: max(0, count // 100)])
    while len(entries) < count:
        npa = rng.choice(PREFIX_NPAS)
        nxx = rng.randrange(200, 1000)
        if rng.random() < 0.5:
            entries.add(f"1{npa}{nxx}")
        else:
            entries.add(f"1{npa}{nxx}{rng.randrange(10)}")
    return sorted(entries)


def _name_entries(count: int) -> list[str]:
    """CNAM entries: exact names, ``contains:`` words and ``re:`` patterns (50/30/20 %)."""
    exact = [f"spam risk {i:02d}" for i in range(count // 2)]
    contains = [
        f"contains:{_SPAM_WORDS[i % len(_SPAM_WORDS)]} {i:02d}" for i in range(count * 3 // 10)
    ]
    patterns = [f"re:^v{i:02d}[0-9]{{5,}}$" for i in range(count - len(exact) - len(contains))]
    return exact + contains + patterns


def _matching_name(rng: random.Random, entry: str) -> str:
    """A caller name that ``entry`` matches."""
    if entry.startswith("contains:"):
        return f"{entry.removeprefix('contains:').upper()} DEPT"
    if entry.startswith("re:"):
        return f"V{entry[5:7]}{rng.randrange(10**5, 10**7)}"
    return entry.upper()


def ordinary_name(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_PLACES)
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"[:15]


def _address(user: str, name: str, host: str, **header_parameters: str) -> dict[str, Any]:
    shown = f'"{name}" ' if name else ""
    params = "".join(f";{k}={v}" for k, v in header_parameters.items())
    return {
        "header_parameters": header_parameters,
        "host": host,
        "name": name,
        "raw": f"{shown}<sip:{user}@{host}>{params}",
        "uri_parameters": {},
        "user": user,
    }


def _user_form(rng: random.Random, number: str) -> str:
    """How the caller's number is written: mostly E.164 digits, sometimes national or +."""
    roll = rng.random()
    if roll < 0.7:
        return number
    if roll < 0.9:
        return number[1:]
    return "+" + number


def request_body(
    rng: random.Random, caller: str, name: str, called: str | None = None
) -> dict[str, Any]:
    """A CarrierX external-handler body for one call from ``caller`` (to ``called``, else
    a random number)."""
    host = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    drawn = f"1{rng.choice((212, 312, 415, 516, 617, 951))}{rng.randrange(2_000_000, 10**7)}"
    called = drawn if called is None else called  # drawn anyway: same bodies for a seed
    user = _user_form(rng, caller)
    tag = f"{rng.getrandbits(32):08x}"
    body: dict[str, Any] = {
        "Call-ID": [f"{rng.getrandbits(128):032x}@{host}"],
        "CSeq": [f"{rng.randrange(1, 999)} INVITE"],
        "Contact": [_address(user, "", f"{host}:5060")],
        "From": [_address(user, name, host, tag=tag)],
        "Max-Forwards": [str(rng.randrange(60, 71))],
        "To": [_address(called, "", f"{host}:5060")],
        "User-Agent": [rng.choice(_AGENTS)],
        "Via": [f"SIP/2.0/UDP {host}:5060;branch=z9hG4bK{rng.getrandbits(32):08x};rport"],
    }
    if rng.random() < 0.5:
        body["Remote-Party-ID"] = [
            _address(user, name, host, party="calling", privacy="off", screen="no")
        ]
    if rng.random() < 0.3:
        body["P-Asserted-Identity"] = [_address(user, name, host)]
    return body


def _class_counts(total: int) -> dict[str, int]:
    counts = {cls: int(total * share) for cls, share in CLASS_SHARES.items()}
    counts["unlisted"] += total - sum(counts.values())
    return counts


def generate(sizes: Sizes, seed: int = 2024) -> Workload:
    """The lists and ``sizes.bodies`` request bodies, shuffled, with their classes."""
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    counts = _class_counts(sizes.bodies)
    overlap = min(sizes.allow, sizes.numbers) // 10
    allow_only = sizes.allow - overlap
    pool = random_numbers(rng, sizes.numbers + allow_only + counts["unlisted"] + counts["cnam"])
    block = pool[: sizes.numbers]
    allow = np.concatenate([pool[sizes.numbers : sizes.numbers + allow_only], block[:overlap]])
    unlisted = pool[sizes.numbers + allow_only :]
    prefixes = _prefix_entries(prng, sizes.prefixes)
    nanp_prefixes = [p for p in prefixes if p.startswith("1")]
    names = _name_entries(sizes.names)

    def callers() -> Iterator[tuple[str, str, str]]:
        blocked = block[overlap:]
        for i in rng.integers(0, blocked.size, counts["block_list"]).tolist():
            yield "block_list", str(blocked[i]), ordinary_name(prng)
        for i in rng.integers(0, allow.size, counts["allow_list"]).tolist():
            yield "allow_list", str(allow[i]), ordinary_name(prng)
        for _ in range(counts["prefix"]):
            prefix = prng.choice(nanp_prefixes)
            rest = "".join(prng.choices("0123456789", k=11 - len(prefix)))
            yield "prefix", prefix + rest, ordinary_name(prng)
        spare = iter(unlisted.tolist())
        for _ in range(counts["cnam"]):
            yield "cnam", str(next(spare)), _matching_name(prng, prng.choice(names))
        for _ in range(counts["unlisted"]):
            yield "unlisted", str(next(spare)), ordinary_name(prng)

    calls = list(callers())
    prng.shuffle(calls)
    bodies = [orjson.dumps(request_body(prng, number, name)) for _, number, name in calls]
    return Workload(block, allow, prefixes, names, bodies, [cls for cls, _, _ in calls])


def write_numbers(path: Path, numbers: np.ndarray[Any, Any], chunk: int = 1_000_000) -> None:
    """A CSV with a ``number`` header; NANP numbers written as 10 national digits, the way
    many block-list feeds ship them (the loader normalises them back)."""
    with path.open("w", encoding="ascii") as out:
        out.write("number\n")
        for start in range(0, numbers.size, chunk):
            part = (numbers[start : start + chunk] - np.uint64(10_000_000_000)).tolist()
            out.write("\n".join(map(str, part)))
            out.write("\n")


def write_files(workload: Workload, folder: Path) -> Files:
    folder.mkdir(parents=True, exist_ok=True)
    files = Files(
        block=folder / "block.csv",
        allow=folder / "allow.csv",
        prefixes=folder / "prefixes.txt",
        names=folder / "names.txt",
        bodies=folder / "bodies.jsonl",
    )
    write_numbers(files.block, workload.block)
    write_numbers(files.allow, workload.allow)
    files.prefixes.write_text("\n".join(workload.prefixes) + "\n", encoding="utf-8")
    files.names.write_text("\n".join(workload.names) + "\n", encoding="utf-8")
    files.bodies.write_bytes(b"\n".join(workload.bodies) + b"\n")
    return files


def bench_config(files: Files, redis_url: str, port: int, workers: int) -> dict[str, Any]:
    """The service config: allow list first, then block list, prefixes, CNAM."""
    return {
        "redis": {"url": redis_url},
        "server": {"host": "127.0.0.1", "port": port, "workers": workers, "admin_port": None},
        "lists": {
            "allow": {"kind": "numbers", "source": str(files.allow), "column": "number"},
            "block": {"kind": "numbers", "source": str(files.block), "column": "number"},
            "prefixes": {"kind": "prefixes", "source": str(files.prefixes)},
            "cnam": {"kind": "names", "source": str(files.names)},
        },
        "policies": {
            "bench": {
                "default": "allow",
                "rules": [
                    {"name": "allow-list", "match": "caller_in_list", "list": "allow",
                     "action": "allow"},
                    {"name": "block-list", "match": "caller_in_list", "list": "block"},
                    {"name": "prefixes", "match": "caller_prefix_in_list", "list": "prefixes",
                     "operands": ["decline", "prefix"]},
                    {"name": "cnam", "match": "caller_name_matches_list", "list": "cnam",
                     "operands": ["unwanted", "cnam"]},
                ],
            }
        },
        "default_policy": "bench",
        "trunk_groups": {TRUNK_GROUP: {"policy": "bench"}},
    }  # fmt: skip


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def check_answer(cls: str, status: int, body: bytes) -> str | None:
    """None if ``body`` is the right answer for a caller of class ``cls``, else why not."""
    if status != 200:
        return f"{cls}: HTTP {status}: {body[:200]!r}"
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{cls}: answer is not JSON: {body[:200]!r}"
    expected = ANSWERS.get(cls, SUBSCRIBER_ANSWERS.get(cls))
    if answer != expected:
        return f"{cls}: expected {expected}, got {answer}"
    return None


def sample(workload: Workload, per_class: int) -> list[int]:
    """Indexes of up to ``per_class`` bodies of each class, for answer checks."""
    picked: dict[str, list[int]] = {cls: [] for cls in CLASS_SHARES}
    for i, cls in enumerate(workload.classes):
        if len(picked[cls]) < per_class:
            picked[cls].append(i)
    return [i for indexes in picked.values() for i in indexes]


# --- per-subscriber lists -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SubscriberSizes:
    subscribers: int = 100_000
    #: Entries per subscriber: all on the block side but the last, on the allow side.
    entries: int = 10
    bodies: int = 20_000
    #: Subscribers the bodies call (their entries are kept to build the bodies).
    called: int = 5_000
    #: How the bodies pick the called subscriber: 0 uniformly, else by a Zipf law of
    #: this exponent over the ``called`` ones (1.0: the k-th busiest gets 1/k of the
    #: busiest's calls; a few contact centres take most of the traffic).
    zipf: float = 0.0


@dataclass(slots=True)
class SubscriberWorkload:
    """The subscribers CSV written, and bodies calling its subscribers, with their classes."""

    path: Path
    #: Rows written (pairs before the loader de-duplicates the odd repeated entry).
    rows: int
    bodies: list[bytes]
    classes: list[str]


#: Subscribers generated and written per step: memory stays flat at 10 M subscribers.
SUBSCRIBER_CHUNK = 200_000


def _nanp_numbers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """NANP-shaped numbers (not necessarily distinct), as :func:`random_numbers` draws them."""
    npas = _nanp_codes(PREFIX_NPAS)
    nxxs = _nanp_codes((555,))
    numbers: np.ndarray[Any, Any] = (
        10_000_000_000
        + rng.choice(npas, shape) * 10_000_000
        + rng.choice(nxxs, shape) * 10_000
        + rng.integers(0, 10_000, shape)
    ).astype(np.uint64)
    return numbers


def write_subscribers(path: Path, sizes: SubscriberSizes, seed: int = 2025) -> SubscriberWorkload:
    """Write the subscribers list as CSV and build bodies that call its subscribers.

    Streamed ``SUBSCRIBER_CHUNK`` subscribers at a time (10 M subscribers x 10 entries
    is a 3 GB file); the entries of ``sizes.called`` subscribers picked at random are
    kept for the bodies.
    """
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    count, per = sizes.subscribers, sizes.entries
    subscribers = random_numbers(rng, count)
    picked = set(rng.choice(count, min(sizes.called, count), replace=False).tolist())
    kept: dict[str, list[str]] = {}
    rows = 0
    with path.open("w", encoding="ascii") as out:
        out.write("subscriber,entry,side\n")
        for start in range(0, count, SUBSCRIBER_CHUNK):
            chunk = subscribers[start : start + SUBSCRIBER_CHUNK].tolist()
            entries = _nanp_numbers(rng, (len(chunk), per)).tolist()
            lines: list[str] = []
            for offset, (subscriber, row) in enumerate(zip(chunk, entries, strict=True)):
                lines += [f"{subscriber},{entry}" for entry in row[:-1]]
                lines.append(f"{subscriber},{row[-1]},allow")
                if start + offset in picked:
                    kept[str(subscriber)] = [str(entry) for entry in row]
            out.write("\n".join(lines))
            out.write("\n")
            rows += len(lines)
    bodies, classes = _subscriber_bodies(prng, rng, kept, sizes.bodies, sizes.zipf)
    return SubscriberWorkload(path, rows, bodies, classes)


def _subscriber_bodies(
    prng: random.Random,
    rng: np.random.Generator,
    kept: dict[str, list[str]],
    count: int,
    zipf: float = 0.0,
) -> tuple[list[bytes], list[str]]:
    """``count`` bodies calling the ``kept`` subscribers, in the classes' shares, shuffled;
    the subscriber picked uniformly, or by a Zipf law of exponent ``zipf``."""
    called = sorted(kept)
    pick: Callable[[], str] = lambda: prng.choice(called)  # noqa: E731
    if zipf > 0:
        ranked = called[:]
        prng.shuffle(ranked)  # the busiest are not the lowest numbers
        cumulative = list(itertools.accumulate(1 / (k**zipf) for k in range(1, len(ranked) + 1)))
        pick = lambda: prng.choices(ranked, cum_weights=cumulative)[0]  # noqa: E731
    counts = {cls: int(count * share) for cls, share in SUBSCRIBER_CLASS_SHARES.items()}
    counts["sub_unlisted"] += count - sum(counts.values())
    strangers = iter(_nanp_numbers(rng, (counts["sub_unlisted"],)).tolist())
    calls: list[tuple[str, str, str]] = []
    for cls, n in counts.items():
        for _ in range(n):
            subscriber = pick()
            entries = kept[subscriber]
            if cls == "sub_block":
                # Not the first two: the bench's later syncs take a subscriber's first
                # row off (bench/subscribers.py, drop_one_entry), some twice.
                caller = prng.choice(entries[2:-1] or entries[:-1])
            elif cls == "sub_allow":
                caller = entries[-1]
            else:
                caller = str(next(strangers))
                while caller in entries:  # one chance in billions, but not zero
                    caller = str(int(caller) + 1)
            calls.append((cls, caller, subscriber))
    prng.shuffle(calls)
    bodies = [
        orjson.dumps(request_body(prng, caller, ordinary_name(prng), subscriber))
        for _, caller, subscriber in calls
    ]
    return bodies, [cls for cls, _, _ in calls]


def subscriber_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """``config`` (:func:`bench_config`) plus the subscribers list and its trunk groups.

    The ``subscribers`` policy reads the called subscriber's entries (allow first, then
    block) and counts the caller's calls (a limit no caller reaches): the count, and the
    entries unless cached, come from Redis in the call's one pipelined round trip. The
    ``subscriber-entries`` policy has the entries rules alone: a cached subscriber's
    calls need no Redis at all. The ``call-rate`` policy is the bench policy with the
    call-rate rule after its local rules (it serves the local bodies).
    """
    personal = {"match": "caller_in_subscriber_list", "list": SUBSCRIBER_LIST}
    spec = {"kind": "subscribers", "source": str(source)}
    local = config["policies"][config["trunk_groups"][TRUNK_GROUP]["policy"]]
    return {
        **config,
        # A sync changing most buckets goes by steps, at the bench's sizes too (not only
        # past 16 MB); nothing reads the list during the bench's syncs, so the pause
        # between steps need not be the 120 s grace.
        "loader": {
            **config.get("loader", {}),
            "subscriber_step_wait_s": 5,
            "subscriber_step_min_mb": 0,
        },
        "lists": {**config["lists"], SUBSCRIBER_LIST: spec},
        "policies": {
            **config["policies"],
            SUBSCRIBER_TRUNK_GROUP: {
                "default": "allow",
                "rules": [
                    {"name": "personal-allow", **personal, "action": "allow"},
                    {"name": "personal-block", **personal,
                     "operands": ["decline", "subscriber-block"]},
                    FLOOD_RULE,
                ],
            },
            ENTRIES_TRUNK_GROUP: {
                "default": "allow",
                "rules": [
                    {"name": "personal-allow", **personal, "action": "allow"},
                    {"name": "personal-block", **personal,
                     "operands": ["decline", "subscriber-block"]},
                ],
            },
            RATE_TRUNK_GROUP: {
                **local,
                "rules": [*local["rules"], FLOOD_RULE],
            },
        },
        "trunk_groups": {
            **config["trunk_groups"],
            SUBSCRIBER_TRUNK_GROUP: {"policy": SUBSCRIBER_TRUNK_GROUP},
            ENTRIES_TRUNK_GROUP: {"policy": ENTRIES_TRUNK_GROUP},
            RATE_TRUNK_GROUP: {"policy": RATE_TRUNK_GROUP},
        },
    }  # fmt: skip


def subscriber_sample(workload: SubscriberWorkload, per_class: int) -> list[int]:
    """Indexes of up to ``per_class`` subscriber bodies of each class, for answer checks."""
    picked: dict[str, list[int]] = {cls: [] for cls in SUBSCRIBER_CLASS_SHARES}
    for i, cls in enumerate(workload.classes):
        if len(picked[cls]) < per_class:
            picked[cls].append(i)
    return [i for indexes in picked.values() for i in indexes]


def check_sample(
    url: str, bodies: Sequence[bytes], classes: Sequence[str], indexes: Iterable[int]
) -> dict[str, Any]:
    """POST the bodies at ``indexes`` to ``url``; compare each answer with its class's."""
    problems: list[str] = []
    checked = 0
    for i in indexes:
        request = urllib.request.Request(
            url, data=bodies[i], headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            problem = check_answer(classes[i], response.status, response.read())
        checked += 1
        if problem:
            problems.append(problem)
    return {"checked": checked, "wrong": len(problems), "examples": problems[:5]}
