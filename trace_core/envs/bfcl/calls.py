"""Function calls: parsing the model's text (no eval), canonical call strings, running them on simulators.

Two call syntaxes are read, whichever the prompt asked for:

python   BFCL's prompting format, a Python list of calls: `[cd(folder='document'), ls(a=True)]`
         (a single call without brackets is accepted too, as BFCL's decoder wraps it).
hermes   the chat-template tool-call format of Qwen / Hermes models, one JSON object per block:
         `<tool_call>{"name": "cd", "arguments": {"folder": "document"}}</tool_call>`

Before parsing, `<think>...</think>` blocks and Markdown code fences are removed. Python text is
parsed with `ast.parse(mode="eval")`; argument values must be literals (strings, numbers, booleans,
None, lists, tuples, dicts, sets, negated numbers) or a bare name, read as its string (as BFCL's
decoder does); nested calls, arithmetic, attributes and subscripts are rejected. Positional arguments
are kept (BFCL's decoder drops them silently; its ground truth uses them).

`parse_calls(text)` classifies an action as
    ("calls", [Call, ...], None)   one or more calls
    ("text", [], None)             no call attempt (plain answer, or an empty list `[]`): ends the user turn
    ("malformed", [], reason)      it looks like calls (starts with "[" or "name(", or has <tool_call>)
                                   but does not parse
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_THINK_RE = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL)
_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*\n?|```")
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_CALL_START_RE = re.compile(r"^[A-Za-z_][\w.]*\s*\(")

# names BFCL's executor refuses to run (multi_turn_utils.execute_multi_turn_func_call); kept for parity
BLOCKED_NAMES = frozenset({"kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run"})


class CallSyntaxError(ValueError):
    """Text that was meant as function calls but is not valid call syntax."""


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        if isinstance(inner, (int, float, complex)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
        raise CallSyntaxError("a sign applies to numbers only")
    if isinstance(node, ast.List):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(e) for e in node.elts)
    if isinstance(node, ast.Set):
        return {_value(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise CallSyntaxError("** inside a dict is not supported")
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, ast.Name):
        return node.id  # BFCL's decoder reads a bare name as its string
    raise CallSyntaxError(f"argument values must be literals, got {ast.unparse(node)!r}")


def _call_from_ast(node: ast.AST) -> Call:
    if not isinstance(node, ast.Call):
        raise CallSyntaxError(f"expected a function call, got {ast.unparse(node)!r}")
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise CallSyntaxError(f"not a function name: {ast.unparse(node.func)!r}")
    parts.append(func.id)
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise CallSyntaxError("*args / **kwargs are not supported")
    return Call(
        ".".join(reversed(parts)),
        tuple(_value(a) for a in node.args),
        {k.arg: _value(k.value) for k in node.keywords if k.arg is not None},
    )


def parse_python_calls(text: str) -> list[Call]:
    """Calls of a Python list (or one bare call); CallSyntaxError if it is not one."""
    source = text.strip().strip("'")
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as exc:
        raise CallSyntaxError(f"invalid Python call syntax ({exc.msg})") from None
    if isinstance(tree, ast.Call):
        return [_call_from_ast(tree)]
    if isinstance(tree, (ast.List, ast.Tuple)):
        return [_call_from_ast(e) for e in tree.elts]
    raise CallSyntaxError("expected a list of function calls like [func(a=1), other(b='x')]")


def parse_hermes_calls(blocks: list[str]) -> list[Call]:
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            raise CallSyntaxError(f"a <tool_call> block is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise CallSyntaxError('a <tool_call> block must be {"name": ..., "arguments": {...}}')
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise CallSyntaxError("'arguments' is a string that is not a JSON object") from None
        if not isinstance(arguments, dict):
            raise CallSyntaxError("'arguments' must be a JSON object")
        calls.append(Call(obj["name"], (), dict(arguments)))
    return calls


def clean_action(text: str) -> str:
    """The action without <think> blocks and code fences, stripped."""
    return _FENCE_RE.sub("", _THINK_RE.sub("", text)).strip()


def parse_calls(text: Any) -> tuple[str, list[Call], str | None]:
    """(kind, calls, reason) with kind "calls", "text" or "malformed" (module docstring)."""
    if not isinstance(text, str):
        return "malformed", [], f"action must be text, got {type(text).__name__}"
    cleaned = clean_action(text)
    blocks = _TOOL_CALL_RE.findall(cleaned)
    try:
        if blocks:
            calls = parse_hermes_calls(blocks)
        elif cleaned.startswith("[") or _CALL_START_RE.match(cleaned):
            calls = parse_python_calls(cleaned)
        else:
            return "text", [], None
    except CallSyntaxError as exc:
        return "malformed", [], str(exc)
    return ("calls", calls, None) if calls else ("text", [], None)


def parse_call_string(text: str) -> Call:
    """One ground-truth call string, e.g. "sort('final_report.pdf')"."""
    calls = parse_python_calls(text)
    if len(calls) != 1:
        raise CallSyntaxError(f"expected one call, got {text!r}")
    return calls[0]


def method_table(instances: Mapping[str, Any]) -> dict[str, Any]:
    """Public method name -> bound method over the involved instances (a later class wins a shared
    name, as in BFCL's executor)."""
    table = {}
    for instance in instances.values():
        for name in dir(type(instance)):
            if not name.startswith("_") and callable(getattr(type(instance), name, None)):
                table[name] = getattr(instance, name)
    return table


def result_text(value: Any) -> str:
    """A call's result as BFCL records it: strings as they are, dicts as JSON (str() if that fails)."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def execute_calls(instances: Mapping[str, Any], calls: list[Call]) -> list[str]:
    """Run `calls` in order on the simulator `instances`; one result text per call. Errors (unknown
    function, bad arguments, an exception inside a simulator) become the result text
    "Error during execution: ...", as in BFCL; nothing is raised."""
    table = method_table(instances)
    results = []
    for call in calls:
        try:
            if call.name.split(".")[-1] in BLOCKED_NAMES:
                raise PermissionError(f"Function call {call.name.split('.')[-1]} is not allowed.")
            method = table.get(call.name)
            if method is None:
                raise NameError(f"name '{call.name.split('.')[0]}' is not defined")
            # copies: a simulator may keep and later mutate an argument (post_tweet keeps `mentions`,
            # mention() extends it), which must not change the recorded call that the checker replays
            args, kwargs = copy.deepcopy((call.args, dict(call.kwargs)))
            results.append(result_text(method(*args, **kwargs)))
        except Exception as exc:  # the simulators raise whatever they raise; the model sees it
            results.append(f"Error during execution: {exc}")
    return results
