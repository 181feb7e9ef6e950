"""BFCL v4 multi-turn data from the installed `bfcl-eval` wheel: entries, ground truth, function docs, splits.

The wheel is installed with `pip install --no-deps bfcl-eval==2026.3.23` (its declared dependencies
pin an old numpy and pull API clients this env never uses). Nothing here imports the package: files
are located with importlib.util.find_spec and read as JSON lines. The simulator classes are imported
one module at a time (`simulator_class`); their modules need only the standard library and mpmath
(MathAPI), which torch already installs.

A BFCL task record (what BFCLEnv.reset takes; JSON-serialisable):
    {"id": "multi_turn_base_0", "subset": "base",
     "question": [[{"role": "user", "content": ...}], ...],   one list of messages per user turn
     "initial_config": {class name: scenario}, "involved_classes": [class name, ...],
     "missed_function": {"3": ["sort"]},                        miss_func only: held out until that turn
     "ground_truth": [["cd(folder='document')", ...], ...],     one list of calls per user turn
     "long_context": bool}                                      scenarios load BFCL's long-context extensions

Splits (`BFCLTaskSource`): the four subsets are variants of the same 200 scenarios (entry i of every
subset starts from the same scenario, apart from a handful of edited configs), so the split is made
over scenario indices: a seeded 80/20 draw puts scenario i, in every subset, in "train" or in "eval",
and no eval scenario is seen in training in another variant. Each split is then shuffled (seeded) so
that the first tasks of the eval split mix the subsets.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from trace_core.envs.base import EnvError, check_split

BFCL_PIN = "bfcl-eval==2026.3.23"
INSTALL_HINT = f"pip install --no-deps {BFCL_PIN}"
SUBSETS = ("base", "miss_func", "miss_param", "long_context")
DATA_FILE = "BFCL_v4_multi_turn_{subset}.json"

# class name -> (module under bfcl_eval.eval_checker.multi_turn_eval.func_source_code, function doc file)
SIMULATORS = {
    "GorillaFileSystem": ("gorilla_file_system", "gorilla_file_system.json"),
    "MathAPI": ("math_api", "math_api.json"),
    "MessageAPI": ("message_api", "message_api.json"),
    "TwitterAPI": ("posting_api", "posting_api.json"),
    "TicketAPI": ("ticket_api", "ticket_api.json"),
    "TradingBot": ("trading_bot", "trading_bot.json"),
    "TravelAPI": ("travel_booking", "travel_booking.json"),
    "VehicleControlAPI": ("vehicle_control", "vehicle_control.json"),
}
SIMULATOR_PACKAGE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
STATELESS_CLASSES = frozenset({"MathAPI"})  # no _load_scenario call (as BFCL)


def bfcl_package_dir() -> Path:
    """Directory of the installed bfcl_eval package (found without importing it)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EnvError("bfcl", f"the BFCL env needs the bfcl-eval package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """`path`, or the data directory inside the installed wheel."""
    directory = bfcl_package_dir() / "data" if path is None else Path(path)
    if not (directory / DATA_FILE.format(subset="base")).is_file():
        raise EnvError("data_dir", f"{str(directory)!r} holds no {DATA_FILE.format(subset='base')}")
    return directory


def read_json_lines(path: Path) -> list[Any]:
    """BFCL's .json files hold one JSON object per line."""
    if not path.is_file():
        raise EnvError("data_dir", f"BFCL data file {str(path)!r} is missing")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise EnvError(f"{path}:{lineno}", f"not valid JSON ({exc.msg})") from None
    return rows


@lru_cache(maxsize=8)
def _load_subset(directory: str, subset: str) -> tuple[dict[str, Any], ...]:
    base = Path(directory)
    entries = read_json_lines(base / DATA_FILE.format(subset=subset))
    answers = {
        row["id"]: row["ground_truth"]
        for row in read_json_lines(base / "possible_answer" / DATA_FILE.format(subset=subset))
    }
    tasks = []
    for entry in entries:
        if entry["id"] not in answers:
            raise EnvError("data_dir", f"{entry['id']} has no ground truth in possible_answer/")
        tasks.append(
            {
                "id": entry["id"],
                "subset": subset,
                "question": entry["question"],
                "initial_config": entry.get("initial_config", {}),
                "involved_classes": list(entry["involved_classes"]),
                "missed_function": dict(entry.get("missed_function", {})),
                "ground_truth": answers[entry["id"]],
                "long_context": "long_context" in entry["id"] or "composite" in entry["id"],
            }
        )
    return tuple(tasks)


def load_bfcl_tasks(subset: str, path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every task of one multi-turn subset ("base", "miss_func", "miss_param", "long_context"), in file order."""
    if subset not in SUBSETS:
        raise EnvError("subsets", f"unknown BFCL multi-turn subset {subset!r}; choose from {list(SUBSETS)}")
    return [dict(task) for task in _load_subset(str(data_dir(path)), subset)]


@lru_cache(maxsize=16)
def _function_docs(directory: str, class_name: str) -> tuple[dict[str, Any], ...]:
    return tuple(read_json_lines(Path(directory) / "multi_turn_func_doc" / SIMULATORS[class_name][1]))


def function_docs(class_names: Sequence[str], path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """BFCL's function docs (JSON schemas) of the given classes, in class order."""
    directory = str(data_dir(path))
    docs: list[dict[str, Any]] = []
    for name in class_names:
        if name not in SIMULATORS:
            raise EnvError("involved_classes", f"unknown BFCL class {name!r}; known: {sorted(SIMULATORS)}")
        docs.extend(json.loads(json.dumps(d)) for d in _function_docs(directory, name))
    return docs


def simulator_class(class_name: str) -> type:
    """The BFCL simulator class (its module only; bfcl_eval's __init__ files are empty)."""
    if class_name not in SIMULATORS:
        raise EnvError("involved_classes", f"unknown BFCL class {class_name!r}; known: {sorted(SIMULATORS)}")
    bfcl_package_dir()  # a clear error when the wheel is missing
    module = importlib.import_module(f"{SIMULATOR_PACKAGE}.{SIMULATORS[class_name][0]}")
    return getattr(module, class_name)


def scenario_index(task_id: str) -> int:
    try:
        return int(task_id.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise EnvError("id", f"BFCL task id {task_id!r} does not end in _<index>") from None


class BFCLTaskSource:
    """BFCL v4 multi-turn tasks, split 80/20 by scenario (module docstring).

    subsets        which multi-turn subsets to use (default: all four: 800 tasks, 640 train / 160 eval)
    eval_fraction  share of the scenarios held out (the paper's 20%)
    seed           seeds the scenario split and the order of each split
    data_dir       a directory laid out like the wheel's data/ (None: the installed wheel's)
    """

    def __init__(
        self,
        subsets: Sequence[str] = SUBSETS,
        eval_fraction: float = 0.2,
        seed: int = 0,
        data_dir: str | None = None,
    ):
        if isinstance(subsets, str):
            subsets = [subsets]
        if not subsets or any(s not in SUBSETS for s in subsets):
            raise EnvError("subsets", f"subsets must be a non-empty list from {list(SUBSETS)}, got {subsets!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise EnvError("eval_fraction", f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.subsets = list(dict.fromkeys(subsets))
        self.eval_fraction = eval_fraction
        self.seed = seed
        self.data_dir = data_dir

    def eval_scenarios(self, num_scenarios: int) -> set[int]:
        order = np.random.default_rng([self.seed, 0xBFC1]).permutation(num_scenarios)
        return {int(i) for i in order[: max(1, round(self.eval_fraction * num_scenarios))]}

    def tasks(self, split: str) -> list[dict[str, Any]]:
        check_split(split)
        by_subset = {s: load_bfcl_tasks(s, self.data_dir) for s in self.subsets}
        num_scenarios = 1 + max(scenario_index(t["id"]) for tasks in by_subset.values() for t in tasks)
        held_out = self.eval_scenarios(num_scenarios)
        chosen = [
            t
            for tasks in by_subset.values()
            for t in tasks
            if (scenario_index(t["id"]) in held_out) == (split == "eval")
        ]
        order = np.random.default_rng([self.seed, 0xBFC2, split == "eval"]).permutation(len(chosen))
        return [chosen[i] for i in order]
