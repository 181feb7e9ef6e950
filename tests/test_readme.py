"""The README runs as written (issue 19, defect 11): every fenced Python block executes (on a tiny model;
the flat-batch snippet gets small stand-ins for its trainer's tensors), and every command line of its bash
blocks runs through the installed `trace` at a test budget, the sequence twice in a row without losing
anything. `bash scripts/...` lines are skipped: they set up a virtual environment."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TRACE = Path(sys.executable).parent / "trace"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def command_lines() -> list[str]:
    """Every command of the README's bash blocks (comments stripped), in order."""
    lines = []
    for body in blocks("bash"):
        for line in body.splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def test_the_readme_has_what_this_file_tests():
    assert len(blocks("python")) >= 2 and any(line.startswith("trace train") for line in command_lines())
    for line in command_lines():  # a new kind of command needs a way to run here
        assert line.startswith(("trace ", "bash scripts/", "source .venv/bin/activate")), line


# ------------------------------------------------------------------ Python blocks


def _flat_batch_stand_ins() -> dict:
    """What the flat-batch snippet takes from its trainer: a model, padded rows (4 completions of one prompt,
    left-padded), a temperature and the response length."""
    from trace_core.model.loading import tiny_causal_lm

    torch.manual_seed(0)
    prompt = torch.randint(1, 32, (5,))
    input_ids = torch.stack([torch.cat([prompt, torch.randint(1, 32, (3,))]) for _ in range(4)])
    return {
        "model": tiny_causal_lm("qwen3", vocab_size=32),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "T": 1.0,
        "response_length": 3,
    }


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index):
    code = blocks("python")[index]
    # a block that defines its own model runs alone (it must be self-contained); the others get stand-ins
    namespace: dict = {} if "tiny_causal_lm" in code else _flat_batch_stand_ins()
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "loss" in namespace:  # the packed-loss snippet: a finite loss with gradients on the model
        assert math.isfinite(float(namespace["loss"].detach()))
        grads = [p.grad for p in namespace["model"].parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    if "completion_logprobs" in namespace:
        assert namespace["completion_logprobs"].shape == (4, 3)
        assert torch.isfinite(namespace["completion_logprobs"]).all()


# ------------------------------------------------------------------ command lines


def at_test_budget(command: str) -> list[str]:
    """A README command as argv, at a test budget: steps=N -> N // 50 (at least 1; 1 when unset), 8 eval
    tasks, no progress bar. Runs resumed with --resume only change what may change on resume."""
    argv = shlex.split(command)
    if argv[:2] in (["trace", "train"], ["trace", "compare"], ["trace", "ablate"]):
        steps = next((int(a.split("=")[1]) for a in argv if a.startswith("steps=")), None)
        argv = [a for a in argv if not a.startswith("steps=")]
        argv += [f"steps={max(1, (steps or 50) // 50)}", "eval_tasks=8", "progress=false"]
        if argv[1] == "ablate" and "--seeds" in argv:  # 7 runs a seed: one seed is enough to run the grid
            i = argv.index("--seeds")
            rest = [a for a in argv[i + 1 :] if not a.isdigit()]
            argv = [*argv[: i + 1], "0", *rest]
    elif argv[:2] == ["trace", "eval"]:
        argv += ["--tasks", "8"]
    return [str(TRACE), *argv[1:]]


def run_commands(cwd: Path, skip=()) -> list[subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    done = []
    for command in command_lines():
        if not command.startswith("trace ") or any(command.startswith(s) for s in skip):
            continue
        result = subprocess.run(at_test_budget(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        done.append(result)
    return done


def files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def check_runs(cwd: Path, expected_runs: int) -> dict[str, str]:
    """Every train run under runs/ is whole: its metrics rows are 0..steps (step 0 evaluates the untrained
    policy) and its latest checkpoint verifies."""
    from trace_core.train import checkpoint as ckpt

    train_runs = [
        p for p in (cwd / "runs").iterdir() if p.is_dir() and not p.is_symlink() and (p / "config.yaml").is_file()
    ]
    assert len(train_runs) == expected_runs, sorted(p.name for p in train_runs)
    for run in train_runs:
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run), require_manifest=True)
        assert steps == list(range(state["step"] + 1)) and state["step"] >= 1, run  # step 0: the untrained policy
    return files(cwd / "runs")


def test_readme_commands_run(tmp_path):
    """train, train uniform, --resume runs/latest, eval runs/latest (compare, ablate: in the slow test below)."""
    done = run_commands(tmp_path, skip=("trace compare", "trace ablate"))
    grids = ("compare", "ablate")
    assert len(done) == len([c for c in command_lines() if c.startswith("trace ") and not any(g in c for g in grids)])
    check_runs(tmp_path, expected_runs=2)
    evaluation = json.loads(done[-1].stdout.strip().splitlines()[-1])
    assert evaluation["step"] == 2  # the resumed run (runs/latest: the uniform one), at its new end
    assert (tmp_path / "runs" / "latest").resolve().name.startswith("uniform-")


@pytest.mark.slow  # the whole sequence twice, `trace compare` (9 runs) and `trace ablate` (21 runs) included
def test_readme_command_sequence_runs_twice_without_losing_anything(tmp_path):
    run_commands(tmp_path)
    first = check_runs(tmp_path, expected_runs=2)
    run_commands(tmp_path)
    second = check_runs(tmp_path, expected_runs=4)
    assert all(second.get(name) == digest for name, digest in first.items())  # the first pass's files unchanged
    comparisons = sorted((tmp_path / "runs").glob("compare-*/comparison.md"))
    assert len(comparisons) == 2 and all("over 3 seeds" in p.read_text() for p in comparisons)
    assert len(sorted((tmp_path / "runs").glob("ablate-*/ablation_stages.md"))) == 2


@pytest.mark.parametrize("command", [c for c in command_lines() if c.startswith("bash scripts/")])
def test_setup_scripts_are_not_run_here(command):
    pytest.skip(f"{command!r} creates a virtual environment and installs packages; CI runs scripts/test.sh itself")
