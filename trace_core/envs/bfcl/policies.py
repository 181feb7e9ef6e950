"""A scripted policy for BFCL tasks: the ground truth's calls, as actions (the upper anchor for tests)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from trace_core.envs.bfcl.calls import parse_call_string

END_TURN = "Done."


def ground_truth_actions(task: Mapping[str, Any], call_format: str = "python") -> list[str]:
    """Every action of an episode that replays the ground truth: per user turn, one step with all of its
    calls (none for an empty turn), then plain text that ends the turn."""
    actions = []
    for turn in task["ground_truth"]:
        if turn and call_format == "hermes":
            blocks = []
            for call in map(parse_call_string, turn):
                if call.args:
                    raise ValueError(f"{call} has positional arguments, which <tool_call> JSON cannot express")
                blocks.append(
                    f"<tool_call>\n{json.dumps({'name': call.name, 'arguments': dict(call.kwargs)})}\n</tool_call>"
                )
            actions.append("\n".join(blocks))
        elif turn:
            actions.append("[" + ", ".join(turn) + "]")
        actions.append(END_TURN)
    return actions
