"""`trace` through the command line, in subprocesses (issue 19): `trace eval` reads exactly the checkpoint it
is given and writes nothing, every bad setting is refused when the config is built (before any model or
directory), `trace compare` refuses repeats, `--resume` reads the run's config, the Triton interpreter is
announced, and --help / config errors do not import torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from run_helpers import REPO, TOY, rows, snapshot, trace

from trace_core.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A toy run of 4 steps, evaluated at steps 2 and 4, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("eval") / "run"
    done = trace("train", *TOY, "steps=4", "eval_every=2", "checkpoint_every=2", f"run_dir={run}")
    assert done.returncode == 0, done.stderr
    return run


def _eval_result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_eval_evaluates_exactly_the_named_checkpoint_and_writes_nothing(trained_run, tmp_path):
    """It used to report the file it was given but evaluate the run's latest, and truncate metrics.jsonl."""
    before = snapshot(trained_run)
    row2 = rows(trained_run)[1]
    result = _eval_result(trace("eval", str(trained_run / "checkpoints" / "step_00000002.pt")))
    assert result["step"] == 2 and result["eval/tasks"] == 8
    assert (result["eval/success"], result["eval/success_greedy"]) == (
        row2["eval/success"],
        row2["eval/success_greedy"],
    )
    latest = _eval_result(trace("eval", str(trained_run), "--tasks", "4"))
    assert latest["step"] == 4 and latest["eval/tasks"] == 4
    assert snapshot(trained_run) == before  # read-only: metrics.jsonl keeps its rows, nothing added
    # a checkpoint copied out of its run (no manifest, no config.yaml beside it) evaluates from its own config
    copied = tmp_path / "elsewhere.pt"
    shutil.copy(trained_run / "checkpoints" / "step_00000002.pt", copied)
    alone = trace("eval", str(copied))
    assert _eval_result(alone) == {**result, "checkpoint": str(copied)}
    assert "cannot be verified" in alone.stderr


def test_eval_loads_the_weights_of_the_checkpoint_it_names(trained_run):
    from trace_core.train.trainer import Trainer

    path = trained_run / "checkpoints" / "step_00000002.pt"
    trainer, _ = Trainer.for_evaluation(path)
    saved = torch.load(path, weights_only=True)["model"]
    assert trainer.step == 2 and trainer.lock is None
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_eval_write_appends_one_row(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "metrics.jsonl").read_text()
    result = _eval_result(trace("eval", str(run / "checkpoints" / "step_00000002.pt"), "--write"))
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    row = json.loads(after.splitlines()[-1])
    assert row["step"] == 2 and row["eval/checkpoint"] == "step_00000002.pt"
    assert row["eval/success"] == result["eval/success"]
    copied = tmp_path / "alone.pt"
    shutil.copy(run / "checkpoints" / "step_00000002.pt", copied)
    refused = trace("eval", str(copied), "--write")
    assert refused.returncode == 2 and "--write: " in refused.stderr and "not inside a run directory" in refused.stderr


@pytest.mark.parametrize("tasks", ["0", "-5", "many"])
def test_eval_tasks_must_be_a_positive_integer(trained_run, tasks):
    done = trace("eval", str(trained_run), "--tasks", tasks)
    assert done.returncode == 2 and "argument --tasks" in done.stderr and "Traceback" not in done.stderr


# every setting that used to do the wrong thing silently (defect 4) or fail late as a traceback (defect 9)
BAD_SETTINGS = [
    ("optim.grad_clip=-1", "optim.grad_clip: must be > 0"),
    ("optim.grad_clip=0", "optim.grad_clip: must be > 0"),
    ("optim.eps_low=-0.2", "optim.eps_low: must be in [0, 1)"),
    ("optim.eps_low=1", "optim.eps_low: must be in [0, 1)"),
    ("optim.eps_high=-0.1", "optim.eps_high: must be >= 0"),
    ("optim.kl_coef=-1", "optim.kl_coef: must be >= 0"),
    ("optim.entropy_coef=-0.5", "optim.entropy_coef: must be >= 0"),
    ("optim.lr=inf", "optim.lr: must be a finite number"),
    ("optim.entropy_coef=nan", "optim.entropy_coef: must be a finite number"),
    ("generation.temperature=-1", "generation.temperature: must be >= 0"),
    ("generation.temperature=nan", "generation.temperature: must be a finite number"),
    ("generation.temperature=1e-40", "generation.temperature: 1e-40 is too small"),
    ("generation.top_p=0", "generation.top_p: must be in (0, 1]"),
    ("generation.top_p=1.5", "generation.top_p: must be in (0, 1]"),
    ("generation.max_tokens_per_turn=0", "generation.max_tokens_per_turn: must be >= 1"),
    ("generation.stop_strings=['']", "generation.stop_strings[0]: must be a non-empty string"),
    ("allocation.eps=0", "allocation.eps: must be in (0, 0.5)"),
    ("allocation.eps=0.7", "allocation.eps: must be in (0, 0.5)"),
    ("allocation.k_max=0", "allocation.k_max: must be null (no cap) or >= 1"),
    ("seed=-1", "seed: must be in [0, 2**32 - 1]"),
    ("seed=99999999999", "seed: must be in [0, 2**32 - 1]"),
    ("generation.num_pages=1000000000000", "generation.num_pages: the KV cache would take"),
    ("generation.page_size=100000000000", "generation.num_pages: the KV cache would take"),
    ("model.hidden_size=33", "model.hidden_size: 33 is not divisible by heads=2"),
    ("model.hidden_size=30", "model.hidden_size: head_dim = hidden_size / heads = 15 must be even"),
    ("model.kv_heads=3", "model.heads: 2 is not divisible by kv_heads=3"),
    ("env.name=nope", "env.name: unknown env name 'nope'"),
    ("optim.lr=[1,", "optim.lr: '[1,' is not valid YAML"),
    ("run_dir=", "run_dir: '' names the current directory"),
    ("run_dir=.", "run_dir: '.' names the current directory"),
    ("run_dir=BLOCKED", "is a file, not a directory"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_is_built(tmp_path, setting, message):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should be")
    setting = setting.replace("BLOCKED", str(blocked))
    run = tmp_path / "run"
    overrides = [*TOY, "steps=1", f"run_dir={run}", setting]  # the setting comes last: it wins
    done = trace("train", *overrides, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr
    assert not run.exists() and not (tmp_path / "runs").exists()  # no directory was made


def _imports_after(argv: list[str]) -> dict:
    """Run main(argv) in a fresh interpreter; which heavy modules it imported."""
    code = (
        "import sys, json\nfrom trace_core.train.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'trace_core.train.trainer')}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["train", "optim.grad_clip=-1"], ["train", "optim.lrr=1"]],
    ids=["help", "train-help", "bad-value", "unknown-key"],
)
def test_help_and_config_errors_import_no_heavy_module(argv):
    assert _imports_after(argv) == {"torch": False, "transformers": False, "trace_core.train.trainer": False}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0", "0"], "--seeds: 0 given more than once"),
        (["--seeds", "-1", "2"], "--seeds: -1: seeds must be in [0, 2**32 - 1]"),
        (["--seeds", "0", "--modes", "trace", "trace"], "--modes: trace given more than once"),
        (["--seeds", "0", "--modes", "best"], "--modes: 'best' not registered"),
        (["--seeds", "0", "--modes", "best+oracle"], "--modes: 'best+oracle' not registered"),
        (["--seeds", "3-1"], "--seeds: range '3-1' is empty"),
        (["--seeds", "0-2", "1"], "--seeds: 1 given more than once"),
    ],
)
def test_compare_refuses_repeated_or_negative_seeds_and_modes(tmp_path, args, message):
    done = trace("compare", *args, "--out", str(tmp_path / "cmp"), *TOY, "steps=1", cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "cmp").exists() or not any((tmp_path / "cmp").iterdir())


def test_comparison_table_says_the_real_number_of_seeds(tmp_path):
    from trace_core.train.config import TrainConfig
    from trace_core.train.config_loader import load_config
    from trace_core.train.report import write_comparison

    row = {"effective_ratio": 0.5, "leaves": 16, "generated_tokens": 10, "dedup_ratio": 1.5, "leaves_sampled": 16}
    history = [{**row, "eval/success": 0.25}]
    cfg = load_config(TrainConfig)
    write_comparison({"trace": [history, history], "uniform": [history, history]}, cfg, tmp_path)
    assert "Mean over 2 seeds;" in (tmp_path / "comparison.md").read_text()
    write_comparison({"trace": [history], "uniform": [history, history]}, cfg, tmp_path)
    assert "trace 1, uniform 2" in (tmp_path / "comparison.md").read_text()


def test_resume_reads_the_runs_config_and_refuses_other_changes(tmp_path):
    run = tmp_path / "run"
    first = trace("train", *TOY, "allocation.mode=uniform", "optim.lr=0.01", "steps=2", f"run_dir={run}")
    assert first.returncode == 0, first.stderr
    refused = trace("train", "--resume", f"run_dir={run}", "steps=3", "optim.lr=0.02")
    assert refused.returncode == 2 and "optim.lr: cannot change on --resume" in refused.stderr
    assert "optim.lr=0.01" in refused.stderr and "steps, eval_every" in refused.stderr
    resumed = trace("train", "--resume", f"run_dir={run}", "steps=3", "optim.lr=0.01", "eval_tasks=4")
    assert resumed.returncode == 0, resumed.stderr
    assert '"mode": "uniform"' in resumed.stdout  # the run's own config, not the defaults
    assert [r["step"] for r in rows(run)] == [1, 2, 3] and rows(run)[-1]["eval/tasks"] == 4
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run), require_manifest=True)["config"]["optim"]["lr"] == 0.01


@pytest.mark.parametrize("interpreted", [True, False])
def test_train_warns_when_kernels_run_under_the_triton_interpreter(tmp_path, interpreted):
    env = {"TRITON_INTERPRET": "1" if interpreted else "0"}
    done = trace("train", *TOY, "steps=1", f"run_dir={tmp_path / 'run'}", env=env)
    assert done.returncode == 0, done.stderr
    assert ("TRITON_INTERPRET=1 is set" in done.stderr) == interpreted
    assert ("1000x slower" in done.stderr) == interpreted


def test_compare_takes_overrides_after_its_seeds(tmp_path):
    """`trace compare --seeds 0 1 2 steps=10` used to fail: --seeds swallowed the override."""
    out = tmp_path / "cmp"
    done = trace("compare", "--modes", "uniform", "--seeds", "3", *TOY, "steps=1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Mean over 1 seed;" in (out / "comparison.md").read_text()
    assert (out / "uniform" / "seed3" / "config.yaml").is_file()


def test_trace_retriever_serve_is_the_search_r1_server(tmp_path):
    """`trace retriever serve` runs envs/search_qa/server.py: a real server on a free port answers /retrieve."""
    import json as _json
    import socket
    import time
    import urllib.request

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(
            _json.dumps({"id": str(i), "contents": text})
            for i, text in enumerate(["Ossik Tarn was born in Velmora.", "Velmora is a city in Dranthia."])
        )
    )
    bad = trace("retriever", "serve", "--corpus", str(tmp_path / "missing.jsonl"))
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trace_core.train.cli",
            "retriever",
            "serve",
            "--corpus",
            str(corpus),
            "--port",
            str(port),
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _json.dumps({"queries": ["Where was Ossik Tarn born?"], "topk": 1, "return_scores": True}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/retrieve", data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = _json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (
                    server.stderr.read() if server.poll() else ""
                )
                time.sleep(0.2)
        (hits,) = answer["result"]
        assert "Ossik Tarn" in hits[0]["document"]["contents"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_seed_ranges_expand_inclusively():
    from trace_core.train.cli import _seeds

    assert _seeds(["0-3", "7", "10 - 11"]) == [0, 1, 2, 3, 7, 10, 11]


def test_jobs_auto_is_the_usable_cores():
    import os

    from trace_core.train.cli import _jobs

    assert _jobs("auto") == len(os.sched_getaffinity(0)) >= 1 and _jobs("3") == 3
    with pytest.raises(Exception, match="positive integer"):
        _jobs("0")
