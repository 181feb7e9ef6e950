"""BFCL v4 multi-turn function calling against BFCL's stateful API simulators (registered as "bfcl").

Turns. BFCL runs a task as user turns; within a user turn the model is queried step by step, each
step's function calls are executed and their results shown, until the model answers without calls,
which ends the user turn (bfcl_eval's base_handler.inference_multi_turn_prompting). Here one env
turn is one such step, one generation of the model:

    reset(task)      prompt: instructions + function docs + the first user message
    step(action):
      calls          the calls run in order on the simulators; observation: their results;
                     the user turn goes on
      plain text     (no call, or an empty list `[]`) ends the user turn; observation: the next user
                     message (for a miss_func turn, the held-out function docs and "I have updated
                     some more functions you can choose from. What about now?", as BFCL); after the
                     last user turn the episode ends and is scored
      malformed      text that looks like calls but does not parse (calls.py): with on_malformed=
                     "observe" (default) the observation is the parse error and the user turn goes
                     on (the step counts); with "end_turn" it ends the user turn, as BFCL's decoder
                     failure does
    A call that fails (unknown function, bad arguments, a simulator error) is not an error of the
    env: its result text is "Error during execution: ..." and the episode goes on.

Limits. More than `max_steps_per_turn` call steps in one user turn (BFCL: 20) ends the episode with
reward 0 (end_reason "step_limit", BFCL's force-terminated entry); so does reaching `max_turns`
generations in all (end_reason "turn_limit").

Reward: 1 if BFCL's multi-turn checker passes (checker.py: after every user turn with ground truth,
the simulator states equal the ground truth's and its call results are among the model's), else 0.
info["error_type"] says why it failed, info["turns_passed"] / info["turns_checked"] how far it got
(the checker stops at the first failing turn) and info["turn_pass_rate"] their ratio (an eval metric).

Prompt and observation formats. The codec wraps the prompt in the chat template as one user
message and appends observations as plain text, and it has no tool-template support, so the env
renders the tools as text:
    call_format "python"  BFCL's own prompting system prompt (its default "classic" plaintext style,
                          calls as `[func(a=1)]`), function docs as JSON (doc_format "json", BFCL's)
                          or one line per function (doc_format "compact", far shorter)
    call_format "hermes"  the Qwen / Hermes chat-template tool prompt: `<tools>` with one JSON schema
                          per line and calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
Both call syntaxes are parsed whatever the prompt said. chat_format "chatml" wraps observations as
chat messages (`<|im_start|>user ...<|im_end|>` then the assistant header; tool results inside
`<tool_response>`), for ChatML models (SmolLM2, Qwen); None appends "User: ..." / "Tool results: ..."
text. (A turn that ends by max_tokens rather than <|im_end|> leaves its message unclosed.)

The simulators are deterministic given their calls (seeded per instance), so `restore(..., seed=...)`
accepts a seed and it has no effect; a snapshot holds deep copies of the simulator instances.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from trace_core.envs.base import (
    EnvError,
    EpisodeStateError,
    Step,
    check_choice,
    check_positive_int,
    check_seed,
    require_field,
)
from trace_core.envs.bfcl.calls import Call, execute_calls, parse_calls
from trace_core.envs.bfcl.checker import check_episode, make_instances
from trace_core.envs.bfcl.data import function_docs

MAXIMUM_STEP_LIMIT = 20  # bfcl_eval.constants.default_prompts.MAXIMUM_STEP_LIMIT

# bfcl_eval.constants.default_prompts, style "classic", format "plaintext", ret_fmt "python", no tag
BFCL_SYSTEM_PROMPT = (
    "You are an expert in composing functions.You are given a question and a set of possible functions. "
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. "
    "If none of the functions can be used, point it out. If the given question lacks the parameters required "
    "by the function, also point it out.\n\n"
    "You should only return the function calls in your response.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)].  "
    "You SHOULD NOT include any other text in the response.\n\n"
    "At each turn, you should try your best to complete the tasks requested by the user within the current "
    "turn. Continue to output functions to call until you have fulfilled the user's request to the best of "
    "your ability. Once you have no more functions to call, the system will consider the current turn "
    "complete and proceed to the next turn or task.\n\n"
    "Here is a list of functions in {doc_format} format that you can invoke.\n{functions}\n"
)
HERMES_SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{functions}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n\n'
    "At each turn, call functions until you have fulfilled the user's request to the best of your ability; "
    "the results come back inside <tool_response></tool_response>. When you have no more functions to call, "
    "reply in plain text without a tool call: the system will consider the current turn complete and proceed "
    "to the next turn or task."
)
ADDITIONAL_FUNCTIONS_PROMPT = "{functions}\nI have updated some more functions you can choose from. What about now?"
MALFORMED_OBSERVATION = (
    "Could not parse your function calls: {reason}. Write calls as [func_name(param=value), ...] "
    "(or <tool_call> JSON blocks), or answer in plain text to finish this turn."
)

# BFCL type names -> JSON schema types (for the hermes rendering; BFCL's GORILLA_TO_OPENAPI mapping)
_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def _schema(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _schema(v) for k, v in value.items()}
        if isinstance(out.get("type"), str):
            out["type"] = _SCHEMA_TYPES.get(out["type"], out["type"])
        return out
    if isinstance(value, list):
        return [_schema(v) for v in value]
    return value


def _compact_doc(doc: Mapping[str, Any]) -> str:
    props = doc.get("parameters", {}).get("properties", {})
    required = set(doc.get("parameters", {}).get("required", []))
    params = ", ".join(
        f"{name}: {spec.get('type', 'any')}" + ("" if name in required else " = optional")
        for name, spec in props.items()
    )
    description = doc.get("description", "").split("Tool description: ")[-1].strip()
    return f"{doc['name']}({params}): {description}"


def render_docs(docs: list[dict[str, Any]], call_format: str, doc_format: str) -> str:
    if call_format == "hermes":
        return "\n".join(json.dumps({"type": "function", "function": _schema(d)}) for d in docs)
    if doc_format == "compact":
        return "\n".join(_compact_doc(d) for d in docs)
    return json.dumps(docs, indent=4)


class BFCLEnv:
    """Env protocol implementation of BFCL v4 multi-turn (module docstring has the rules).

    max_turns            generations per episode in all (user turns x steps); the episode ends with reward 0
    max_steps_per_turn   call steps allowed in one user turn (BFCL: 20); one more ends the episode, reward 0
    call_format          "python" (BFCL's prompt) or "hermes" (Qwen-style <tool_call> prompt)
    doc_format           "json" (BFCL's) or "compact" (python call format only)
    chat_format          None or "chatml" (how observations are wrapped)
    on_malformed         "observe" or "end_turn"
    max_result_chars     cut each call result to this many characters in the observation (None: whole)
    """

    # info keys the trainer's evaluation averages (an episode cut by a limit counts 0)
    eval_metrics = ("turn_pass_rate",)

    def __init__(
        self,
        max_turns: int = 40,
        max_steps_per_turn: int = MAXIMUM_STEP_LIMIT,
        call_format: str = "python",
        doc_format: str = "json",
        chat_format: str | None = None,
        on_malformed: str = "observe",
        max_result_chars: int | None = None,
        data_dir: str | None = None,
    ):
        self.max_turns = check_positive_int("max_turns", max_turns)
        self.max_steps_per_turn = check_positive_int("max_steps_per_turn", max_steps_per_turn)
        check_choice("call_format", call_format, ("python", "hermes"))
        check_choice("doc_format", doc_format, ("json", "compact"))
        check_choice("chat_format", chat_format, (None, "chatml"))
        check_choice("on_malformed", on_malformed, ("observe", "end_turn"))
        if max_result_chars is not None:
            check_positive_int("max_result_chars", max_result_chars)
        self.call_format, self.doc_format, self.chat_format = call_format, doc_format, chat_format
        self.on_malformed, self.max_result_chars, self.data_dir = on_malformed, max_result_chars, data_dir
        self._task: dict[str, Any] | None = None

    # --- protocol ---------------------------------------------------------------------------
    def reset(self, task: Mapping[str, Any], *, seed: int | None = None) -> str:
        check_seed(seed)
        self._task = check_bfcl_task(task)
        self.instances = make_instances(self._task)
        self.user_turn, self.turn, self.steps_in_turn = 0, 0, 0
        self.done, self.reward = False, None
        self.calls: list[list[list[Call]]] = [[]]  # per user turn, per call step
        docs = self._docs()
        held_out = {name for names in self._task["missed_function"].values() for name in names}
        system = self._system_prompt([d for d in docs if d["name"] not in held_out])
        return system + "\n\n" + self._user_message(0)

    def step(self, action: str) -> Step:
        if self._task is None:
            raise EpisodeStateError("BFCLEnv: call reset(task) (or restore) before step")
        if self.done:
            raise EpisodeStateError("BFCLEnv: the episode is over; reset or restore before stepping again")
        self.turn += 1
        kind, calls, reason = parse_calls(action)
        info: dict[str, Any] = {"turn": self.turn, "user_turn": self.user_turn, "action": kind}
        if kind == "malformed":
            info["invalid_reason"] = reason
        if kind == "calls" or (kind == "malformed" and self.on_malformed == "observe"):
            self.steps_in_turn += 1
            if kind == "calls":
                results = execute_calls(self.instances, calls)
                self.calls[self.user_turn].append(calls)
                info["calls"] = [str(c) for c in calls]
                info["results"] = results
                observation = self._tool_observation(calls, results)
            else:
                observation = self._wrap_user(MALFORMED_OBSERVATION.format(reason=reason))
            if self.steps_in_turn > self.max_steps_per_turn:
                return self._finish(0.0, "step_limit", info)
        else:  # the user turn is over
            self.user_turn += 1
            self.steps_in_turn = 0
            if self.user_turn == len(self._task["question"]):
                return self._score(info)
            self.calls.append([])
            observation = self._wrap_user(self._user_message(self.user_turn))
        if self.turn >= self.max_turns:
            return self._finish(0.0, "turn_limit", info)
        return Step(observation, False, None, info)

    def snapshot(self) -> dict[str, Any]:
        if self._task is None:
            raise EpisodeStateError("BFCLEnv: nothing to snapshot before reset")
        return {
            "task": self._task,  # never mutated: shared by every snapshot of the episode
            "instances": copy.deepcopy(self.instances),
            "calls": [list(turn) for turn in self.calls],
            "user_turn": self.user_turn,
            "turn": self.turn,
            "steps_in_turn": self.steps_in_turn,
            "done": self.done,
            "reward": self.reward,
        }

    def restore(self, snapshot: Any, *, seed: int | None = None) -> None:
        keys = {"task", "instances", "calls", "user_turn", "turn", "steps_in_turn", "done"}
        if not isinstance(snapshot, Mapping) or not keys <= set(snapshot):
            raise EnvError("snapshot", "snapshot must be a value returned by BFCLEnv.snapshot()")
        check_seed(seed)
        self._task = snapshot["task"]
        self.instances = copy.deepcopy(snapshot["instances"])
        self.calls = [list(turn) for turn in snapshot["calls"]]
        self.user_turn, self.turn, self.steps_in_turn = (
            snapshot["user_turn"],
            snapshot["turn"],
            snapshot["steps_in_turn"],
        )
        self.done, self.reward = snapshot["done"], snapshot.get("reward")

    # --- rendering --------------------------------------------------------------------------
    def _docs(self) -> list[dict[str, Any]]:
        assert self._task is not None
        if "function" in self._task:  # a record that carries its docs (BFCL's populated format)
            return [dict(d) for d in self._task["function"]]
        return function_docs(self._task["involved_classes"], self.data_dir)

    def _system_prompt(self, docs: list[dict[str, Any]]) -> str:
        functions = render_docs(docs, self.call_format, self.doc_format)
        if self.call_format == "hermes":
            return HERMES_SYSTEM_PROMPT.format(functions=functions)
        return BFCL_SYSTEM_PROMPT.format(doc_format=self.doc_format, functions=functions)

    def _user_message(self, index: int) -> str:
        assert self._task is not None
        held_out = self._task["missed_function"].get(str(index))
        if held_out:
            docs = [d for d in self._docs() if d["name"] in set(held_out)]
            return ADDITIONAL_FUNCTIONS_PROMPT.format(functions=render_docs(docs, self.call_format, self.doc_format))
        messages = self._task["question"][index]
        return "\n\n".join(str(m.get("content", "")) for m in messages)

    def _wrap_user(self, text: str) -> str:
        if self.chat_format == "chatml":
            return f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        return f"\nUser: {text}\n"

    def _tool_observation(self, calls: list[Call], results: list[str]) -> str:
        limit = self.max_result_chars
        cut = [r if limit is None or len(r) <= limit else r[:limit] + " ...(truncated)" for r in results]
        if self.chat_format == "chatml":
            body = "\n".join(f"<tool_response>\n{c}: {r}\n</tool_response>" for c, r in zip(calls, cut))
            return f"\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
        return "\nTool results:\n" + "\n".join(f"{c}: {r}" for c, r in zip(calls, cut)) + "\n"

    # --- end of episode ---------------------------------------------------------------------
    def _score(self, info: dict[str, Any]) -> Step:
        assert self._task is not None
        result = check_episode(self._task, self.calls)
        info.update(
            passed=result.valid,
            error_type=result.error_type,
            turns_passed=result.turns_passed,
            turns_checked=result.turns_checked,
            turn_pass_rate=result.turns_passed / max(1, result.turns_checked),
        )
        if not result.valid:
            info["error_message"] = result.message
        return self._finish(1.0 if result.valid else 0.0, "completed", info)

    def _finish(self, reward: float, reason: str, info: dict[str, Any]) -> Step:
        self.done, self.reward = True, reward
        info["end_reason"] = reason
        return Step("", True, reward, info)


def check_bfcl_task(task: Any) -> dict[str, Any]:
    """Validate a BFCL task record (data.py docstring); returns it, with defaults filled in a copy if needed.
    EnvError naming the field otherwise."""
    require_field(task, "id", str)
    question = require_field(task, "question", list)
    classes = require_field(task, "involved_classes", list)
    truth = require_field(task, "ground_truth", list)
    if not question or not all(isinstance(turn, list) for turn in question):
        raise EnvError("question", "BFCL field 'question' must be a non-empty list of turns (lists of messages)")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise EnvError("involved_classes", "BFCL field 'involved_classes' must be a non-empty list of class names")
    if len(truth) != len(question) or not all(isinstance(t, list) for t in truth):
        raise EnvError(
            "ground_truth", f"BFCL field 'ground_truth' must hold one list of calls per turn ({len(question)})"
        )
    missed = task.get("missed_function", {})
    if not isinstance(missed, Mapping):
        raise EnvError("missed_function", "BFCL field 'missed_function' must map a turn index to function names")
    if "initial_config" in task and not isinstance(task["initial_config"], Mapping):
        raise EnvError("initial_config", "BFCL field 'initial_config' must be an object")
    if "missed_function" in task and "long_context" in task:
        return task if isinstance(task, dict) else dict(task)
    out = dict(task)
    out.setdefault("missed_function", {})
    out.setdefault("long_context", "long_context" in task["id"] or "composite" in task["id"])
    return out
