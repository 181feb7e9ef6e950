"""BFCL's multi-turn checker, reimplemented: an episode passes iff every user turn with ground truth passes.

Mirrors `bfcl_eval/eval_checker/multi_turn_eval/multi_turn_checker.py:multi_turn_checker` (2026.3.23):
the model's calls are replayed turn by turn on fresh simulator instances built from the task's
initial config, and the ground-truth calls on another set; after each user turn t whose ground truth
is non-empty:

1. the model made at least one call step in turn t ("multi_turn:empty_turn_model_response");
2. state: for every involved class, every public attribute (name not starting with "_") of the
   ground-truth instance equals the model instance's ("multi_turn:instance_state_mismatch");
3. responses: the ground truth's results of turn t are contained, as a multiset and in any order, in
   the results of all the model's calls of turns 0..t ("multi_turn:execution_response_mismatch").

Turns whose ground truth is empty (miss_func / miss_param turns, where the right move is to ask or
to say a function is missing) are replayed and not checked, as in BFCL's checker. The first failing
turn decides; `CheckResult.turns_passed` counts the checked turns that passed before it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_core.envs.bfcl.calls import Call, execute_calls, parse_call_string
from trace_core.envs.bfcl.data import STATELESS_CLASSES, simulator_class


@dataclass
class CheckResult:
    valid: bool
    error_type: str | None = None
    message: str = ""
    turn: int | None = None  # the failing user turn
    turns_passed: int = 0  # checked turns (non-empty ground truth) that passed
    turns_checked: int = 0  # checked turns in the task
    details: dict[str, Any] = field(default_factory=dict)


def make_instances(task: Mapping[str, Any]) -> dict[str, Any]:
    """Fresh simulator instances of the task's classes, loaded with its initial config (as BFCL does)."""
    instances = {}
    config = task.get("initial_config", {}) or {}
    for name in task["involved_classes"]:
        instance = simulator_class(name)()
        if name not in STATELESS_CLASSES:
            instance._load_scenario(copy.deepcopy(config.get(name, {})), long_context=bool(task.get("long_context")))
        instances[name] = instance
    return instances


def public_state(instance: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(instance).items() if not k.startswith("_")}


def state_differences(model_instances: Mapping[str, Any], truth_instances: Mapping[str, Any]) -> dict[str, Any]:
    """{class: {attribute: {"model", "ground_truth"}}} for every public attribute that differs."""
    diffs: dict[str, Any] = {}
    for name, truth in truth_instances.items():
        model = model_instances[name]
        for attr in vars(truth):
            if attr.startswith("_"):
                continue
            if getattr(model, attr, None) != getattr(truth, attr):
                diffs.setdefault(name, {})[attr] = {
                    "model": getattr(model, attr, None),
                    "ground_truth": getattr(truth, attr),
                }
    return diffs


def missing_results(truth_results: Sequence[str], model_results: Sequence[str]) -> list[str]:
    """Ground-truth results not matched one-for-one by model results (order free, duplicates counted)."""
    pool = list(model_results)
    missing = []
    for item in truth_results:
        try:
            pool.remove(item)
        except ValueError:
            missing.append(item)
    return missing


def ground_truth_calls(task: Mapping[str, Any]) -> list[list[Call]]:
    return [[parse_call_string(c) for c in turn] for turn in task["ground_truth"]]


def check_episode(task: Mapping[str, Any], model_turns: Sequence[Sequence[Sequence[Call]]]) -> CheckResult:
    """Score one episode. `model_turns[t]` is the model's call steps in user turn t (each a non-empty
    list of calls); turns the episode never reached count as empty."""
    truth_turns = ground_truth_calls(task)
    model_turns = list(model_turns) + [[] for _ in range(len(truth_turns) - len(model_turns))]
    model_instances, truth_instances = make_instances(task), make_instances(task)
    all_model_results: list[str] = []
    checked = sum(1 for turn in truth_turns if turn)
    passed = 0
    for t, truth_calls in enumerate(truth_turns):
        steps = [list(s) for s in model_turns[t] if s]
        for calls in steps:
            all_model_results.extend(execute_calls(model_instances, calls))
        truth_results = execute_calls(truth_instances, truth_calls)
        if not truth_calls:
            continue

        def fail(kind: str, message: str, **details: Any) -> CheckResult:
            return CheckResult(False, kind, message, t, passed, checked, details)  # noqa: B023

        if not steps:
            return fail("multi_turn:empty_turn_model_response", f"Model response list is empty for turn {t}")
        diffs = state_differences(model_instances, truth_instances)
        if diffs:
            return fail(
                "multi_turn:instance_state_mismatch",
                f"Model instance for {', '.join(diffs)} does not match the state with ground truth instance.",
                differences=diffs,
            )
        missing = missing_results(truth_results, all_model_results)
        if missing:
            return fail(
                "multi_turn:execution_response_mismatch",
                f"Model response execution results so far does not contain all the ground truth response "
                f"execution results for turn {t}.",
                missing_items=missing,
            )
        passed += 1
    return CheckResult(True, turns_passed=passed, turns_checked=checked)
