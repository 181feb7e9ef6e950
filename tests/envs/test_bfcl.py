"""BFCL v4 multi-turn env: call parsing, ground-truth replay, the checker against BFCL's own, turns, limits,
snapshot / restore, splits. The data tests need the bfcl-eval wheel (pip install --no-deps bfcl-eval==2026.3.23)."""

import importlib.util
import json
import pickle
import random
import sys
import uuid

import pytest

from trace_core.envs import make_env, make_task_source
from trace_core.envs.base import Env, EnvError, EpisodeStateError
from trace_core.envs.bfcl.calls import Call, parse_call_string, parse_calls

HAVE_BFCL = importlib.util.find_spec("bfcl_eval") is not None
needs_bfcl = pytest.mark.skipif(not HAVE_BFCL, reason="bfcl-eval is not installed (pip install --no-deps bfcl-eval)")


# --- parsing (no package needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    "text,kind,calls",
    [
        ("[cd(folder='document'), ls(a=True)]", "calls", ["cd(folder='document')", "ls(a=True)"]),
        ("cd(folder='x')", "calls", ["cd(folder='x')"]),  # a bare call, as BFCL's decoder wraps it
        ("sort('final_report.pdf')", "calls", ["sort('final_report.pdf')"]),  # positional kept
        (
            "[f(x=-1.5, y=[1, 'a'], z={'k': (1, 2)}, w=None)]",
            "calls",
            ["f(x=-1.5, y=[1, 'a'], z={'k': (1, 2)}, w=None)"],
        ),
        ("[f(x=name)]", "calls", ["f(x='name')"]),  # a bare name reads as its string (BFCL)
        ("<think>plan: cd first</think>\n[cd(folder='a')]", "calls", ["cd(folder='a')"]),
        ("```python\n[cd(folder='a')]\n```", "calls", ["cd(folder='a')"]),
        ('<tool_call>\n{"name": "cd", "arguments": {"folder": "a"}}\n</tool_call>', "calls", ["cd(folder='a')"]),
        (
            '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "b"}</tool_call>',
            "calls",
            ["a(x=1)", "b()"],
        ),
        ("I have moved the file for you.", "text", []),
        ("[]", "text", []),  # an empty list is no call: BFCL ends the turn
        ("", "text", []),
        ("[cd(folder=]", "malformed", []),
        ("[cd(folder=ls())]", "malformed", []),  # nested calls are not run
        ("[cd(folder='a' + 'b')]", "malformed", []),
        ("[1, 2]", "malformed", []),
        ("[__import__('os').system('x')]", "malformed", []),
        ("<tool_call>{not json}</tool_call>", "malformed", []),
        ('<tool_call>{"arguments": {}}</tool_call>', "malformed", []),
    ],
)
def test_parse_calls(text, kind, calls):
    got_kind, got_calls, reason = parse_calls(text)
    assert got_kind == kind and [str(c) for c in got_calls] == calls
    assert (reason is not None) == (kind == "malformed")


def test_parse_calls_rejects_non_text_and_round_trips_call_strings():
    assert parse_calls(None)[0] == "malformed"
    call = parse_call_string("mv(source='a.txt', destination='temp')")
    assert call == Call("mv", (), {"source": "a.txt", "destination": "temp"})
    assert parse_call_string(str(call)) == call


# --- data, env, checker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks():
    from trace_core.envs.bfcl.data import load_bfcl_tasks

    return {subset: load_bfcl_tasks(subset) for subset in ("base", "miss_func", "miss_param", "long_context")}


def play(env, task, actions):
    env.reset(task)
    step = None
    for action in actions:
        step = env.step(action)
        if step.done:
            break
    return step


@needs_bfcl
def test_bfcl_package_is_used_without_its_dependencies():
    """Installed with --no-deps: the env imports only the simulator modules, none of the API clients.
    Checked in a fresh interpreter: other tests in this process (TRL, datasets) import pandas themselves."""
    import subprocess

    script = """
import sys
from trace_core.envs.bfcl.checker import make_instances
from trace_core.envs.bfcl.data import SIMULATORS, load_bfcl_tasks

make_instances({"involved_classes": list(SIMULATORS), "initial_config": {}})
assert load_bfcl_tasks("base")
heavy = ("openai", "anthropic", "pandas", "sentence_transformers", "tree_sitter", "qwen_agent", "cohere")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in ("bfcl_eval.model_handler", "bfcl_eval.utils")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@needs_bfcl
@pytest.mark.parametrize("subset", ["base", "miss_func", "miss_param", "long_context"])
def test_replaying_the_ground_truth_scores_one_on_every_task(tasks, subset):
    """Every task of the subset (200 each, ~0.5 s): the ground truth's calls, one step per user turn."""
    from trace_core.envs.bfcl.env import BFCLEnv
    from trace_core.envs.bfcl.policies import ground_truth_actions

    env = BFCLEnv()
    failed = []
    for task in tasks[subset]:
        step = play(env, task, ground_truth_actions(task))
        if not (step.done and step.reward == 1.0 and step.info["end_reason"] == "completed"):
            failed.append((task["id"], step.info.get("error_type")))
    assert not failed
    assert len(tasks[subset]) == 200


@needs_bfcl
def test_a_policy_that_calls_nothing_scores_zero_on_every_base_task(tasks):
    from trace_core.envs.bfcl.env import BFCLEnv

    env = BFCLEnv()
    for task in tasks["base"]:
        step = play(env, task, ["I cannot do that."] * len(task["question"]))
        assert step.done and step.reward == 0.0
        assert step.info["error_type"] == "multi_turn:empty_turn_model_response" and step.info["turns_passed"] == 0


@needs_bfcl
def test_hermes_tool_calls_replay_the_ground_truth(tasks):
    from trace_core.envs.bfcl.env import BFCLEnv
    from trace_core.envs.bfcl.policies import ground_truth_actions

    env = BFCLEnv(call_format="hermes", chat_format="chatml")
    keyword_only = [
        t for t in tasks["base"] if not any(parse_call_string(c).args for turn in t["ground_truth"] for c in turn)
    ]
    assert len(keyword_only) > 150
    for task in keyword_only[:20]:
        prompt = env.reset(task)
        assert "<tools>" in prompt and '"type": "object"' in prompt and "<tool_call>" in prompt
        assert play(env, task, ground_truth_actions(task, "hermes")).reward == 1.0


@needs_bfcl
def test_checker_agrees_with_bfcls_own_multi_turn_checker(tasks):
    """Ours vs bfcl_eval's multi_turn_checker (imported from the wheel) on the ground truth, on nothing, on
    one dropped call, on one changed argument and on every call moved to the first turn, over 4 x 25 tasks."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    from trace_core.envs.bfcl.checker import check_episode, ground_truth_calls

    rng = random.Random(0)
    outcomes = []
    for subset_tasks in tasks.values():
        for task in subset_tasks[:25]:
            truth = ground_truth_calls(task)
            variants = [[[t] if t else [] for t in truth], [[] for _ in truth]]
            spots = [(i, j) for i, t in enumerate(truth) for j in range(len(t))]
            i, j = rng.choice(spots)
            dropped = [[list(t)] if t else [] for t in truth]
            del dropped[i][0][j]
            variants.append([[s for s in turn if s] for turn in dropped])
            changed = [[list(t)] if t else [] for t in truth]
            call = changed[i][0][j]
            key = next(iter(call.kwargs), None)
            if key is not None:
                changed[i][0][j] = Call(call.name, call.args, {**call.kwargs, key: "zz_changed"})
                variants.append(changed)
            variants.append([[[c] for t in truth for c in t]] + [[] for _ in truth[1:]])
            entry = {k: task[k] for k in ("id", "initial_config", "involved_classes")}
            for model in variants:
                decoded = [[[str(c) for c in step] for step in turn] for turn in model]
                theirs = multi_turn_checker(decoded, task["ground_truth"], dict(entry), "x", f"m{uuid.uuid4().hex}")
                ours = check_episode(task, model)
                assert ours.valid == theirs["valid"], (task["id"], decoded, theirs)
                if not ours.valid:
                    assert ours.error_type == theirs["error_type"]
                outcomes.append(ours.valid)
    assert 100 < sum(outcomes) < len(outcomes) - 100  # both outcomes well represented


@needs_bfcl
def test_turn_mapping_calls_results_and_next_user_turn(tasks):
    task = tasks["base"][0]  # multi_turn_base_0: file system + twitter, 4 user turns
    env = make_env("bfcl")
    assert isinstance(env, Env)
    prompt = env.reset(task)
    assert prompt.startswith("You are an expert in composing functions.")
    assert '"name": "mkdir"' in prompt and prompt.endswith(task["question"][0][0]["content"])
    step = env.step("[cd(folder='document'), mkdir(dir_name='temp')]")
    assert not step.done and step.info["calls"] == ["cd(folder='document')", "mkdir(dir_name='temp')"]
    assert step.observation.startswith("\nTool results:\ncd(folder='document'): ")
    assert '"current_working_directory": "document"' in step.observation
    step = env.step("[mv(source='final_report.pdf', destination='temp')]")  # a second step of user turn 0
    assert not step.done and step.info["user_turn"] == 0
    step = env.step("Moved it.")  # plain text ends the user turn: the next user message
    assert not step.done and step.observation == "\nUser: " + task["question"][1][0]["content"] + "\n"
    assert env.user_turn == 1 and env.calls[0] == [
        [parse_call_string("cd(folder='document')"), parse_call_string("mkdir(dir_name='temp')")],
        [parse_call_string("mv(source='final_report.pdf', destination='temp')")],
    ]
    for _ in range(3):
        step = env.step("done")
    # turn 0 matched the ground truth; turn 1 has calls in the ground truth and none here
    assert step.done and step.reward == 0.0 and step.info["turns_passed"] == 1
    assert step.info["turn_pass_rate"] == 1 / 4 and env.eval_metrics == ("turn_pass_rate",)
    assert step.info["error_type"] == "multi_turn:empty_turn_model_response"
    with pytest.raises(EpisodeStateError):
        env.step("[ls()]")


@needs_bfcl
def test_bad_calls_are_observations_never_crashes(tasks):
    env = make_env("bfcl")
    env.reset(tasks["base"][0])
    step = env.step("[cd(folder=]")
    assert not step.done and "Could not parse your function calls" in step.observation
    assert step.info["action"] == "malformed" and "invalid" in step.info["invalid_reason"]
    step = env.step("[teleport(to='mars'), cd(nope=1), cd(folder='no_such_dir')]")
    assert not step.done
    assert step.info["results"][0] == "Error during execution: name 'teleport' is not defined"
    assert step.info["results"][1].startswith("Error during execution:") and "nope" in step.info["results"][1]
    assert "no_such_dir" in step.info["results"][2]
    assert env.user_turn == 0  # still the first user turn
    step = env.step("[run(x=1)]")  # BFCL's executor refuses these names
    assert step.info["results"] == ["Error during execution: Function call run is not allowed."]
    step = env.step(12)  # not even text
    assert not step.done and step.info["action"] == "malformed"

    env = make_env("bfcl", on_malformed="end_turn")  # BFCL's decoder failure: the user turn ends
    env.reset(tasks["base"][0])
    step = env.step("[cd(folder=]")
    assert not step.done and env.user_turn == 1 and step.observation.startswith("\nUser: ")


@needs_bfcl
def test_step_and_turn_limits_end_with_zero(tasks):
    task = tasks["base"][0]
    env = make_env("bfcl", max_steps_per_turn=2)
    step = play(env, task, ["[ls()]"] * 5)
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "step_limit" and env.turn == 3
    env = make_env("bfcl", max_turns=3)
    step = play(env, task, ["[ls()]", "ok", "[ls()]", "ok"])
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "turn_limit" and env.turn == 3


@needs_bfcl
def test_miss_func_holds_the_function_back_until_its_turn(tasks):
    from trace_core.envs.bfcl.policies import ground_truth_actions

    task = tasks["miss_func"][0]  # `sort` is held out until user turn 3, whose message is empty
    assert task["missed_function"] == {"3": ["sort"]} and task["question"][3] == []
    env = make_env("bfcl", doc_format="compact", chat_format="chatml")
    prompt = env.reset(task)
    assert "\nsort(" not in prompt and "\ncd(folder: string)" in prompt
    actions = ground_truth_actions(task)
    for action in actions[:5]:  # turns 0-2: calls, end; calls, end; (empty ground truth) end
        step = env.step(action)
    assert env.user_turn == 3 and "\nsort(file_name: string)" in step.observation
    assert step.observation.startswith("\n<|im_start|>user\n") and step.observation.endswith("<|im_start|>assistant\n")
    assert "I have updated some more functions you can choose from. What about now?" in step.observation
    for action in actions[5:]:
        step = env.step(action)
    assert step.done and step.reward == 1.0


@needs_bfcl
def test_snapshot_restore_then_the_same_calls_give_the_same_state(tasks):
    from trace_core.envs.bfcl.checker import public_state
    from trace_core.envs.bfcl.policies import ground_truth_actions

    task = next(t for t in tasks["base"] if "TravelAPI" in t["involved_classes"])  # seeded ids (booking, ...)
    actions = ground_truth_actions(task)
    env = make_env("bfcl", chat_format="chatml")
    env.reset(task)
    env.step(actions[0])
    snap = pickle.loads(pickle.dumps(env.snapshot()))  # picklable
    before = {k: public_state(v) for k, v in env.instances.items()}
    observations = [env.step(a).observation for a in actions[1:]]
    final = {k: public_state(v) for k, v in env.instances.items()}
    assert env.done and env.reward == 1.0
    for seed in (None, 5):  # twice from one snapshot: restore copies, the seed changes nothing
        env.restore(snap, seed=seed)
        assert {k: public_state(v) for k, v in env.instances.items()} == before
        assert [env.step(a).observation for a in actions[1:]] == observations
        assert {k: public_state(v) for k, v in env.instances.items()} == final and env.reward == 1.0
    # a branch that diverges does not leak into the snapshot
    env.restore(snap)
    env.step("[logout()]" if "TravelAPI" in task["involved_classes"] else "[ls()]")
    env.restore(snap)
    assert {k: public_state(v) for k, v in env.instances.items()} == before
    with pytest.raises(EnvError, match="snapshot"):
        env.restore({"turn": 1})


@needs_bfcl
def test_task_source_splits_by_scenario_80_20_seeded():
    source = make_task_source("bfcl")
    train, evals = source.tasks("train"), source.tasks("eval")
    assert len(train) == 640 and len(evals) == 160
    index = lambda t: int(t["id"].rsplit("_", 1)[1])
    assert not {index(t) for t in train} & {index(t) for t in evals}  # no scenario on both sides
    assert {t["subset"] for t in evals[:20]} == {"base", "miss_func", "miss_param", "long_context"}  # mixed order
    assert [t["id"] for t in make_task_source("bfcl").tasks("eval")] == [t["id"] for t in evals]
    other = make_task_source("bfcl", seed=1).tasks("eval")
    assert {t["id"] for t in other} != {t["id"] for t in evals}
    base = make_task_source("bfcl", subsets=["base"], eval_fraction=0.25).tasks("eval")
    assert len(base) == 50 and {t["subset"] for t in base} == {"base"}
    json.dumps(evals)  # task records are JSON
    with pytest.raises(EnvError, match="subsets"):
        make_task_source("bfcl", subsets=["simple"])
    with pytest.raises(EnvError, match="eval_fraction"):
        make_task_source("bfcl", eval_fraction=1.0)


@needs_bfcl
def test_bad_task_records_and_options_name_the_field(tasks):
    env = make_env("bfcl")
    task = tasks["base"][0]
    with pytest.raises(EnvError, match="ground_truth"):
        env.reset({**task, "ground_truth": task["ground_truth"][:-1]})
    with pytest.raises(EnvError, match="involved_classes"):
        env.reset({**task, "involved_classes": ["NoSuchAPI"]})
    with pytest.raises(EnvError, match="question"):
        env.reset({k: v for k, v in task.items() if k != "question"})
    for option, value in (("call_format", "xml"), ("chat_format", "llama"), ("max_turns", 0), ("on_malformed", "x")):
        with pytest.raises(EnvError, match=option):
            make_env("bfcl", **{option: value})
    with pytest.raises(EpisodeStateError):
        make_env("bfcl").step("[ls()]")


def test_missing_package_is_a_clear_error(monkeypatch):
    from trace_core.envs.bfcl import data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EnvError, match="pip install --no-deps bfcl-eval==2026.3.23"):
        data.load_bfcl_tasks("base")
