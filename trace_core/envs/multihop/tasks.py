"""Multi-hop lookup tasks: levels of difficulty, a seeded generator, train/eval splits.

A task is a JSON-serialisable dict:
    {"id": str, "level": int, "hops": int, "noise": float, "max_turns": int,
     "start": "e3", "answer": "e1", "facts": [["e3", "e7"], ["e7", "e1"], ["e5", "e2"], ...]}
`facts` is a small knowledge base of (subject, object) pairs over the entities e0..e7, at most one
fact per subject. The question is "follow `hops` facts from `start`"; `answer` is where the chain
ends (checked against the facts). Facts off the chain are distractors: looking up a wrong entity
returns a plausible fact, and the answer itself may have a fact, so one hop too many gives a wrong
answer.

Difficulty grows with level: more hops, a tool that fails more often (`noise`: the probability that
one lookup returns "fail" instead of its result), more distractors; every level has one spare turn.

Splits are disjoint by construction: a task (hops, noise, turn limit, start, facts) belongs to
"eval" iff a stable hash of it falls in the eval bucket, so no eval task ever appears in training,
whatever the seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trace_core.envs.base import EnvError, check_positive_int, check_split, require_field, round_robin_tasks

NUM_ENTITIES = 8
ENTITIES = tuple(f"e{i}" for i in range(NUM_ENTITIES))
ACTION_WORDS = ("answer", "lookup")  # an action is an entity (a lookup) or "answer"; "lookup eK" = "eK"


@dataclass(frozen=True)
class LevelSpec:
    hops: int  # facts to follow from the start entity
    noise: float  # probability that one lookup fails (observation "fail"; the turn is used)
    distractors: int  # facts off the chain (the answer entity among their possible subjects)
    spare_turns: int  # max_turns = hops lookups + 1 answer + spare_turns


LEVELS: dict[int, LevelSpec] = {
    0: LevelSpec(hops=1, noise=0.0, distractors=1, spare_turns=1),
    1: LevelSpec(hops=2, noise=0.2, distractors=2, spare_turns=1),
    2: LevelSpec(hops=3, noise=0.3, distractors=3, spare_turns=1),
    3: LevelSpec(hops=4, noise=0.4, distractors=3, spare_turns=1),
}
MAX_HOPS = max(spec.hops for spec in LEVELS.values())
MAX_TURNS = max(spec.hops + 1 + spec.spare_turns for spec in LEVELS.values())
EVAL_BUCKETS = 5  # one task hash bucket in five is held out for evaluation


@dataclass(frozen=True)
class HopTask:
    """A validated task record; `facts` maps subject -> object."""

    task_id: str
    level: int
    hops: int
    noise: float
    max_turns: int
    start: str
    answer: str
    facts: Mapping[str, str]


def _entity(value: Any, name: str) -> str:
    if value not in ENTITIES:
        raise EnvError(name, f"task field {name!r} must be an entity e0..e{NUM_ENTITIES - 1}, got {value!r}")
    return value


def follow(facts: Mapping[str, str], start: str, hops: int) -> str | None:
    """The entity `hops` facts away from `start`, or None when the chain breaks off."""
    entity = start
    for _ in range(hops):
        if entity not in facts:
            return None
        entity = facts[entity]
    return entity


def parse_hop_task(task: Mapping[str, Any]) -> HopTask:
    """Validate a task record; EnvError naming the bad field otherwise."""
    hops = check_positive_int("task field 'hops'", require_field(task, "hops", int))
    noise = float(require_field(task, "noise", (int, float)))
    if not 0.0 <= noise < 1.0:
        raise EnvError("noise", f"task field 'noise' must be in [0, 1), got {noise!r}")
    max_turns = check_positive_int("task field 'max_turns'", require_field(task, "max_turns", int))
    start = _entity(require_field(task, "start", str), "start")
    answer = _entity(require_field(task, "answer", str), "answer")
    raw = require_field(task, "facts", (list, tuple))
    facts: dict[str, str] = {}
    for fact in raw:
        if not isinstance(fact, (list, tuple)) or len(fact) != 2:
            raise EnvError("facts", f"task field 'facts' must hold [subject, object] pairs, got {fact!r}")
        subject, obj = _entity(fact[0], "facts"), _entity(fact[1], "facts")
        if subject == obj or subject in facts:
            raise EnvError("facts", f"task field 'facts': {list(fact)} repeats a subject or links an entity to itself")
        facts[subject] = obj
    end = follow(facts, start, hops)
    if end is None:
        raise EnvError("facts", f"task field 'facts' has no {hops}-hop chain from {start}")
    if end != answer:
        raise EnvError("answer", f"task field 'answer' is {answer} but {hops} hops from {start} end at {end}")
    return HopTask(str(task.get("id", "")), int(task.get("level", -1)), hops, noise, max_turns, start, answer, facts)


def split_of(task: Mapping[str, Any]) -> str:
    """'eval' or 'train': a stable hash of the task's content (not of its id) decides."""
    key = repr(
        (
            task["hops"],
            float(task["noise"]),
            task["max_turns"],
            task["start"],
            sorted(map(tuple, task["facts"])),
        )
    )
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def _random_task(rng: np.random.Generator, level: int) -> dict[str, Any]:
    spec = LEVELS[level]
    order = [ENTITIES[int(i)] for i in rng.permutation(NUM_ENTITIES)]
    chain = order[: spec.hops + 1]
    facts = dict(zip(chain, chain[1:]))
    # distractor subjects: any entity that is not a chain subject (the answer may be one)
    free = [e for e in ENTITIES if e not in facts]
    for i in rng.choice(len(free), size=min(spec.distractors, len(free)), replace=False):
        subject = free[int(i)]
        others = [e for e in ENTITIES if e != subject]
        facts[subject] = others[int(rng.integers(len(others)))]
    return {
        "level": level,
        "hops": spec.hops,
        "noise": spec.noise,
        "max_turns": spec.hops + 1 + spec.spare_turns,
        "start": chain[0],
        "answer": chain[-1],
        "facts": sorted([s, o] for s, o in facts.items()),
    }


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(isinstance(x, bool) or x not in LEVELS for x in levels):
        raise EnvError("levels", f"levels must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    return levels


def generate_hop_tasks(
    num_tasks: int, *, split: str = "train", seed: int = 0, levels: Sequence[int] = tuple(LEVELS)
) -> list[dict[str, Any]]:
    """`num_tasks` tasks of `split`, levels in round-robin order, reproducible from `seed`."""
    check_positive_int("num_tasks", num_tasks)
    check_split(split)
    levels = check_levels(levels)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EnvError("seed", f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng([seed, 0x40B5])
    return round_robin_tasks(num_tasks, split, levels, rng, _random_task, split_of, f"hop-{split}-s{seed}")


class HopTaskSource:
    """TaskSource for the multi-hop lookup env: `tasks("train")` / `tasks("eval")`, disjoint and seeded."""

    def __init__(
        self, num_train: int = 2000, num_eval: int = 200, seed: int = 0, levels: Sequence[int] = tuple(LEVELS)
    ):
        self.num = {
            "train": check_positive_int("num_train", num_train),
            "eval": check_positive_int("num_eval", num_eval),
        }
        self.seed, self.levels = seed, check_levels(levels)

    def tasks(self, split: str) -> list[dict[str, Any]]:
        check_split(split)
        return generate_hop_tasks(self.num[split], split=split, seed=self.seed, levels=self.levels)
