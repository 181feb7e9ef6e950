"""The trainer end to end at toy size: the CLI, exact resume, the comparison report, config errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from run_helpers import TOY

from trace_core.envs import make_env, make_task_source
from trace_core.train.cli import main
from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import ConfigError, load_config, save_config
from trace_core.train.expansion import prefix_budgets as _prefix_budgets
from trace_core.train.expansion import round_shares as _round_shares
from trace_core.train.trainer import Trainer


def toy(tmp_path, *extra):
    return load_config(TrainConfig, None, [*TOY, f"run_dir={tmp_path}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_run_directory(tmp_path, capsys):
    assert main(["train", *TOY, f"run_dir={tmp_path}", "steps=3", "checkpoint_every=2", "eval_at_start=true"]) == 0
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # step 0 evaluates the untrained policy (the paper's untrained-ReAct row) before any update
    initial, rows = rows[0], rows[1:]
    assert initial["leaves_sampled"] == 0 and 0 <= initial["eval/success"] <= 1 and "loss" not in initial
    # ... beside the scripted policies' exact success on the same eval tasks (the plot's reference lines)
    assert 0 < initial["reference/random policy"] < initial["reference/optimal policy"] <= 1
    last = rows[-1]
    assert last["leaves"] == 16 and last["leaves_sampled"] == 48  # equal budget: 8 roots x (1 + 1)
    assert 0 <= last["eval/success"] <= 1 and 0 <= last["effective_ratio"] <= 1
    assert last["tokens_leaf_paths"] >= last["tokens_packed"] > 0 and math.isfinite(last["loss"])
    assert {"time/rollout", "time/train"} <= set(last)
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        import tensorboard  # noqa: F401  (optional: events are written only when it is installed)

        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    except ImportError:
        assert not (tmp_path / "tensorboard").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == [
        "step_00000002.pt",
        "step_00000003.pt",
    ]
    assert "run directory" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["trace", "uniform", "random_tree", "pcl"])
def test_every_mode_samples_the_same_number_of_leaves(tmp_path, mode):
    trainer = Trainer(toy(tmp_path, f"allocation.mode={mode}", "steps=2"))
    for _ in range(2):
        row = trainer.train_step()
        assert row["leaves"] == 16, mode
    assert trainer.predictor.nodes_seen > 0


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = Trainer(toy(tmp_path / "a", "steps=4", "checkpoint_every=2"))
    straight.fit()
    first = Trainer(toy(tmp_path / "b", "steps=2", "checkpoint_every=2"))
    first.fit()
    del first
    resumed = Trainer(toy(tmp_path / "b", "steps=4", "checkpoint_every=2"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # training metrics of every step agree; wall times differ, and run b evaluated at its end (step 2)
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "eval/"))}
    assert [same(r) for r in metrics(tmp_path / "a")] == [same(r) for r in metrics(tmp_path / "b")]
    assert metrics(tmp_path / "a")[-1]["eval/success"] == metrics(tmp_path / "b")[-1]["eval/success"]


def test_gradient_checkpointing_trains_the_same(tmp_path):
    """model.gradient_checkpointing=true recomputes layers in the backward; the run is the same."""
    plain = Trainer(toy(tmp_path / "a", "steps=2"))
    plain.fit()
    checkpointed = Trainer(toy(tmp_path / "b", "steps=2", "model.gradient_checkpointing=true"))
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.model.layers)
    checkpointed.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    losses = [[row["loss"] for row in metrics(tmp_path / run)] for run in "ab"]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_optimizer_follows_the_lr_schedule(tmp_path):
    """Each step's update uses learning_rate(step); the rate is logged with the step's metrics."""
    from trace_core.train.schedule import learning_rate

    trainer = Trainer(
        toy(
            tmp_path,
            "steps=3",
            "optim.lr=0.01",
            "optim.lr_schedule=cosine",
            "optim.warmup_steps=1",
            "optim.min_lr_ratio=0.2",
        )
    )
    logged = []
    for _step in range(3):
        logged.append(trainer.train_step()["lr"])
        assert trainer.optimizer.param_groups[0]["lr"] == logged[-1]
    expected = [
        learning_rate(s, lr=0.01, steps=3, schedule="cosine", warmup_steps=1, min_lr_ratio=0.2) for s in range(3)
    ]
    assert logged == pytest.approx(expected) and logged[1] > logged[2] >= 0.002


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory"):
        Trainer(toy(tmp_path, "steps=1"), resume=True)
    with Trainer(toy(tmp_path, "steps=1")) as trainer:
        trainer.fit()
    with pytest.raises(ConfigError, match="resume: optim differs"):
        Trainer(toy(tmp_path, "steps=2", "optim.lr=0.5"), resume=True)
    for path in (tmp_path / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        Trainer(toy(tmp_path, "steps=2"), resume=True)


def test_compare_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--seeds", "0", "--modes", "trace", "uniform", "--out", str(out), *TOY, "steps=2"]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary) == {"trace", "uniform"}
    assert summary["trace"]["leaves_per_step"] == summary["uniform"]["leaves_per_step"] == 16
    table = (out / "comparison.md").read_text()
    assert "| trace |" in table and "| uniform |" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_reads_a_checkpoint(tmp_path, capsys):
    Trainer(toy(tmp_path, "steps=1")).fit()
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--tasks", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 1 and result["eval/tasks"] == 4 and 0 <= result["eval/success"] <= 1
    assert main(["eval", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        (["steps=many"], "steps: expected an integer, got 'many'"),
        (["allocation.mode=best"], "allocation.mode: 'best' is not one of"),
        (["allocation.mode=uniform", "allocation.candidates=3", "allocation.m_max=16"], "must divide evenly"),
        (["allocation.candidates=2", "allocation.m_max=2"], "cannot hold the 8 bare rollouts"),
        (["env.name=search_qa"], "model.name: 'tiny' needs an env with a built-in word tokenizer"),
        (["model.name=/no/such/dir"], "model.name: '/no/such/dir' is neither"),
        (["allocation.candidates=100"], "allocation.candidates: 100 prompts per step, but the train split has only 40"),
        (["optim.warmup_steps=5"], "optim.warmup_steps: 5 is more than the run's 1 steps"),
        (["optim.min_lr_ratio=1.5"], "min_lr_ratio: must be in [0, 1], got 1.5"),
        (["optim.lr_schedule=step"], "optim.lr_schedule: 'step' is not one of"),
        (
            ["generation.num_pages=auto"],
            "generation.num_pages: 'auto' sizes the KV cache from free GPU memory, but the model is on cpu",
        ),
        (["generation.num_pages=0"], "num_pages: must be >= 1 or 'auto', got 0"),
        (["generation.kv_memory_fraction=0"], "kv_memory_fraction: must be in (0, 1], got 0"),
        # a cache of 3 pages cannot hold a step's rollouts: the error names the setting to raise
        (["generation.num_pages=3"], "generation.num_pages: KV cache out of pages"),
        (["model.dtype=bf16"], "model.dtype: 'bf16' is not one of"),
        (["model.master_weights=maybe"], "model.master_weights"),
        # PCL keeps M(1+N) // pcl_count prompts: with 8 x (1 + 1) = 16 bare rollouts, 32 per prompt cannot keep one
        (
            ["allocation.mode=pcl", "allocation.pcl_count=32", "allocation.m_max=32"],
            "allocation.pcl_count: 32 bare rollouts per kept prompt does not fit",
        ),
        (["allocation.mode=pcl", "allocation.pcl_count=1"], "pcl_count: 1 bare rollouts per kept prompt does not fit"),
        (["allocation.expansion_rounds=0"], "allocation.expansion_rounds: must be >= 1, got 0"),
    ],
)
def test_config_errors_are_messages_not_tracebacks(tmp_path, capsys, overrides, message):
    assert main(["train", *TOY, f"run_dir={tmp_path}", "steps=1", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_model_tokenizer_mismatch(tmp_path, capsys):
    from trace_core.model.loading import tiny_causal_lm
    from trace_core.model.word_tokenizer import gridworld_tokenizer

    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", vocab_size=8, hidden_size=16, heads=2, kv_heads=1, layers=1).save_pretrained(model_dir)
    gridworld_tokenizer().save_pretrained(model_dir)
    assert main(["train", *TOY, f"run_dir={tmp_path / 'run'}", "steps=1", f"model.name={model_dir}"]) == 2
    assert "but the model's vocabulary has 8" in capsys.readouterr().err


def test_prefix_budgets_move_unspendable_budget_to_prompts_with_anchors():
    budget, moved = _prefix_budgets([4, 2, 6, 0], group=[0, 0, 2, 2, 2])  # prompt 1 has no anchor
    assert moved == 2 and budget.tolist() == [5, 0, 7, 0] and budget.sum() == 12
    budget, moved = _prefix_budgets([3, 3], group=[1])
    assert moved == 3 and budget.tolist() == [0, 6]


SHIPPED_CONFIGS = sorted((Path(__file__).parents[2] / "trace_core" / "configs").glob("*.yaml"))


def test_env_tasks_default_to_the_named_envs_own():
    # the embedded job's grid levels must not leak into another env's task source (they did: the
    # shipped SmolLM2 config failed with "unknown option(s) ['levels']")
    assert load_config(TrainConfig).env.tasks == {"levels": [0, 1]}
    assert load_config(TrainConfig, None, ["env.name=search_qa"]).env.tasks == {}
    assert load_config(TrainConfig, None, ["env.name=search_qa", "env.tasks={synthetic_seed: 3}"]).env.tasks == {
        "synthetic_seed": 3
    }
    assert load_config(TrainConfig, None, ["env.tasks={levels: [2]}"]).env.tasks == {"levels": [2]}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_build_their_env_and_tasks(path, tmp_path):
    cfg = load_config(TrainConfig, path)
    source = make_task_source(cfg.env.name, **cfg.env.tasks)
    assert len(source.tasks("train")) >= cfg.allocation.candidates and source.tasks("eval")
    make_env(cfg.env.name, **cfg.env.env)
    save_config(cfg, tmp_path / "config.yaml")  # what a run directory keeps, and --resume reads back
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg


@pytest.mark.slow  # SmolLM2 through the CLI: 81 s on 2 cores
def test_smollm2_search_qa_config_trains_a_step(tmp_path):
    """The shipped SmolLM2 config end to end through the CLI, at a CPU-test budget: real model, BM25
    search, chat template, stop strings, prefix expansion and a policy update."""
    pytest.importorskip("bm25s")
    small = [
        "steps=1",
        "optim.warmup_steps=1",
        "model.attention_backend=reference",
        "eval_every=0",
        "eval_tasks=2",
        "allocation.candidates=2",
        "allocation.roots=2",
        "allocation.m_min=1",
        "allocation.m_max=2",
        "generation.max_tokens_per_turn=6",
        "progress=false",
    ]
    config = Path(__file__).parents[2] / "trace_core" / "configs" / "smollm2_search_qa.yaml"
    assert main(["train", "--config", str(config), f"run_dir={tmp_path}", *small]) == 0
    row = metrics(tmp_path)[-1]
    assert row["step"] == 1 and row["leaves"] == 4 and math.isfinite(row["loss"])
    assert row["generated_tokens"] > 0 and 0 <= row["eval/success"] <= 1


def test_round_shares_split_each_prompts_budget_evenly():
    assert [r.tolist() for r in _round_shares([5, 2, 0], 2)] == [[3, 1, 0], [2, 1, 0]]
    assert [r.tolist() for r in _round_shares([5, 2, 0], 3)] == [[2, 1, 0], [2, 1, 0], [1, 0, 0]]
    assert [r.tolist() for r in _round_shares([4], 1)] == [[4]]


def _spy_expand(trainer):
    """Record every engine.expand call of a trainer: (anchor nodes, counts, nodes added, forest)."""
    calls, expand = [], trainer.engine.expand

    def spy(forest, anchors, counts, **kw):
        out = expand(forest, anchors, counts, **kw)
        calls.append((list(anchors), list(counts), out.nodes.tolist(), forest))
        return out

    trainer.engine.expand = spy
    return calls


@pytest.mark.parametrize("mode", ["trace", "random_tree"])
def test_expansion_rounds_branch_from_the_last_rounds_continuations(tmp_path, mode):
    """Round 2 expands the turns round 1's continuations added, at the same total budget."""
    trainer = Trainer(
        toy(
            tmp_path,
            f"allocation.mode={mode}",
            "allocation.expansion_rounds=2",
            "steps=4",
            "allocation.continuations_per_root=2",
        )
    )
    calls = _spy_expand(trainer)
    from_continuations = 0
    for _step in range(4):
        before = len(calls)
        row = trainer.train_step()
        assert row["leaves"] == 24 and row["expansion_rounds_run"] == 2  # 8 bare + 16 continuations
        (_anchors1, k1, nodes1, _), (anchors2, k2, _, _) = calls[before:]
        assert sum(k1) + sum(k2) == 16 and sum(k1) >= sum(k2)  # per-prompt halves, the first round rounds up
        assert set(anchors2) <= set(nodes1)  # round 2 branches from round 1's continuations only
        from_continuations += sum(k for a, k in zip(anchors2, k2) if k)
    assert from_continuations > 0
    assert trainer.predictor.nodes_seen > 0


def test_a_round_without_new_prefixes_branches_from_every_prefix(tmp_path):
    # episodes of at most 2 turns: a continuation from turn 1 ends after its own first turn, so round 2
    # has no new prefix and goes back to the bare rollouts' turn 1 (the step keeps its full budget)
    trainer = Trainer(toy(tmp_path, "allocation.expansion_rounds=2", "steps=2", "env.env={max_turns: 2}"))
    calls = _spy_expand(trainer)
    row = trainer.train_step()
    (anchors1, k1, _, forest), (anchors2, k2, _, _) = calls
    assert row["leaves"] == 16 and sum(k1) + sum(k2) == 8
    assert set(anchors2) <= set(anchors1) and (forest.depth[anchors2] == 1).all()


def test_one_round_is_the_default_and_expands_once(tmp_path):
    trainer = Trainer(toy(tmp_path, "steps=1"))
    calls = _spy_expand(trainer)
    row = trainer.train_step()
    assert len(calls) == 1 and row["expansion_rounds_run"] == 1 and sum(calls[0][1]) == 8


def test_stage_pairs_from_config_run_through_the_cli(tmp_path):
    """The paper's stage ablation is a config line: uniform roots with TRACE's active prefixes."""
    run_dir = tmp_path / "uniform_active"
    assert (
        main(
            [
                "train",
                *TOY,
                f"run_dir={run_dir}",
                "steps=2",
                "allocation.root_strategy=uniform",
                "allocation.prefix_strategy=active",
            ]
        )
        == 0
    )
    rows = metrics(run_dir)
    # uniform roots: 8 bare rollouts on 4 prompts (2 each), then 8 continuations from turn prefixes
    assert [r["prompts"] for r in rows] == [4, 4] and all(r["leaves"] == 16 for r in rows)
    assert all(r["expansion_rounds_run"] == 1 for r in rows)
    # the pair reads the predictor (its prefix stage does): cold start at step 1, informed at step 2
    assert [r["predictor_informed"] for r in rows] == [0.0, 1.0]


PLUGIN = '''
import numpy as np
from trace_core.allocation import register_mode, register_root_strategy


@register_root_strategy("one_prompt")
class OnePrompt:
    """Every bare rollout on the first candidate (a strategy no built-in mode has)."""
    uses_predictor = False
    cold_start = None

    def __call__(self, v, budget, *, m_min, m_max, eps, rng):
        counts = np.zeros(len(v), dtype=np.int64)
        counts[0] = budget
        return counts


register_mode("one_prompt_trees", root="one_prompt", prefix="random")
'''


@pytest.fixture
def user_plugin(tmp_path):
    """PLUGIN as a file; what it registers is removed afterwards (the registries are process-wide)."""
    from trace_core.allocation.modes import MODES, ROOT_STRATEGIES

    plugin = tmp_path / "my_allocation.py"
    plugin.write_text(PLUGIN)
    yield plugin
    ROOT_STRATEGIES.unregister("one_prompt")
    MODES.unregister("one_prompt_trees")


def test_a_user_registered_strategy_runs_through_trace_train(tmp_path, user_plugin):
    plugin = user_plugin
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TOY,
                f"run_dir={run_dir}",
                "steps=2",
                "allocation.m_max=8",
                f"plugins=[{plugin}]",
                "allocation.mode=one_prompt_trees",
            ]
        )
        == 0
    )
    rows = metrics(run_dir)
    assert [r["prompts"] for r in rows] == [1, 1] and all(r["leaves"] == 16 for r in rows)
    assert all(r["expansion_rounds_run"] == 1 for r in rows)


@pytest.mark.parametrize("how", ["garbage appended", "latest names a missing file"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog, how):
    """A damaged latest checkpoint (or pointer), a partial metrics line: --resume names what it skipped,
    continues from the newest intact checkpoint and ends where an uninterrupted run ends."""
    from test_checkpoint import _damage

    straight = Trainer(toy(tmp_path / "a", "steps=6", "checkpoint_every=2"))
    straight.fit()
    first = Trainer(toy(tmp_path / "b", "steps=4", "checkpoint_every=2"))
    first.fit()
    first.close()
    run = tmp_path / "b"
    folder = run / "checkpoints"
    for name in ("step_00000002", "step_00000004"):  # renumber so that _damage's "step 2" is the newest
        (folder / f"{name}.pt").rename(folder / f"{name}.pt.orig")
    (folder / "step_00000004.pt.orig").rename(folder / "step_00000002.pt")
    (folder / "step_00000002.pt.orig").rename(folder / "step_00000001.pt")
    (folder / "step_00000004.json").rename(folder / "step_00000002.json.new")
    (folder / "step_00000002.json").rename(folder / "step_00000001.json")
    (folder / "step_00000002.json.new").rename(folder / "step_00000002.json")
    (folder / "latest").write_text("step_00000002.pt")
    _damage(folder, how)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    resumed = Trainer(toy(run, "steps=6", "checkpoint_every=2"), resume=True)
    expected = 2 if how == "garbage appended" else 4  # (file "step_1" holds step 2, "step_2" step 4)
    assert resumed.step == expected
    assert "resume: skipped" in caplog.text and "dropped a partial last line" in caplog.text
    resumed.fit()
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_pcl_samples_m_times_1_plus_n_bare_rollouts_and_no_tree(tmp_path):
    """PCL filters prompts toward p = 0.5 with a fixed group size and samples no continuation."""
    trainer = Trainer(toy(tmp_path, "allocation.mode=pcl", "allocation.pcl_count=4", "steps=3"))
    calls = _spy_expand(trainer)
    for _ in range(3):
        row = trainer.train_step()
        # 8 x (1 + 1) = 16 bare rollouts in groups of 4: 4 prompts, every leaf a depth-1 chain's end
        assert row["leaves"] == 16 and row["prompts"] == 4 and row["expansion_rounds_run"] == 0
    assert calls == []


def test_ablate_runs_the_stage_grid_and_the_budget_pairs(tmp_path):
    out = tmp_path / "ablation"
    argv = ["ablate", "--seeds", "0", "--budgets", "4x1", "4x3", "8x1", "--out", str(out), *TOY, "steps=2"]
    assert main(argv) == 0
    stages = json.loads((out / "ablation_stages.json").read_text())
    assert list(stages) == ["uniform/uniform", "uniform/active", "active/uniform", "active/active"]
    paired = json.loads((out / "ablation_stages_paired.json").read_text())
    assert set(paired) == {"uniform/active", "active/uniform", "active/active"}  # each against uniform/uniform
    budgets = json.loads((out / "ablation_budgets.json").read_text())
    assert {label: s["leaves_per_step"] for label, s in budgets.items()} == {
        "M=4 N=1": 8.0,
        "M=4 N=3": 16.0,
        "M=8 N=1": 16.0,
    }
    for label in ("uniform_uniform", "active_active"):
        saved = (out / "stages" / label / "seed0" / "config.yaml").read_text()
        root, prefix = label.split("_")
        assert f"root_strategy: {root}" in saved and f"prefix_strategy: {prefix}" in saved
    assert (out / "ablation_stages.png").is_file() and (out / "ablation_budgets.md").is_file()


def test_ablate_predictor_table_pairs_each_head_with_the_hidden_state_only_one(tmp_path):
    out = tmp_path / "ablation"
    argv = ["ablate", "--seeds", "0", "--tables", "predictor", "--out", str(out), *TOY, "steps=2"]
    assert main(argv) == 0
    table = json.loads((out / "ablation_predictor.json").read_text())
    assert list(table) == ["hidden state only", "hidden state + n-grams", "oracle"]
    paired = json.loads((out / "ablation_predictor_paired.json").read_text())
    assert set(paired) == {"hidden state + n-grams", "oracle"}  # differences to the hidden-state-only row
    saved = {
        label: yaml.safe_load((out / "predictor" / label / "seed0" / "config.yaml").read_text())
        for label in ("hidden_state_only", "hidden_state_n-grams", "oracle")
    }
    assert {
        k: (c["allocation"]["mode"], c["predictor"]["backend"], c["predictor"]["ngram_buckets"])
        for k, c in saved.items()
    } == {
        "hidden_state_only": ("trace", "mlp_head", 0),
        "hidden_state_n-grams": ("trace", "mlp_head", 4096),
        "oracle": ("trace", "oracle", 4096),
    }
    assert not (out / "ablation_stages.md").exists()  # only the table asked for


def test_ablation_budgets_parse_and_default_to_the_papers_shape():
    from trace_core.train.experiments import budget_variants, default_budgets, parse_budget

    assert parse_budget("16x2") == (16, 2) and parse_budget(" 8X0 ") == (8, 0)
    assert default_budgets(1024, 2) == [(512, 2), (512, 6), (1024, 2)]  # the paper's Table 2
    assert default_budgets(32, 1) == [(16, 1), (16, 3), (32, 1)]
    for bad in ("16", "0x2", "ax2", "16x-1"):
        with pytest.raises(ConfigError, match="--budgets"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="repeated budgets"):
        budget_variants([(4, 1), (4, 1)])


def test_evaluation_reports_success_with_its_interval(tmp_path):
    from trace_core.train.stats import wilson_interval

    result = Trainer(toy(tmp_path, "steps=1")).evaluate()
    for name in ("eval/success", "eval/success_greedy"):
        k = round(result[name] * result["eval/tasks"])
        assert (result[f"{name}_ci_low"], result[f"{name}_ci_high"]) == wilson_interval(k, result["eval/tasks"])
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"]


def test_encoder_predictor_backend_trains_and_informs_the_allocation(tmp_path):
    """predictor.backend=encoder: a separate tiny model reads the prefix tokens (the policy's tokenizer)."""
    from trace_core.predictor import EncoderPredictor

    trainer = Trainer(toy(tmp_path, "predictor.backend=encoder", "steps=3"))
    assert isinstance(trainer.predictor, EncoderPredictor)
    encoder = trainer.predictor.net.encoder
    assert not any(p is q for p in encoder.parameters() for q in trainer.model.parameters())
    rows = [trainer.train_step() for _ in range(3)]
    assert trainer.predictor.nodes_seen > 0 and rows[-1]["predictor_informed"] == 1.0
    assert math.isfinite(rows[-1]["predictor/loss"]) and rows[-1]["predictor/replay_max_age"] == 2.0


@pytest.mark.parametrize("buckets", [0, 64])
def test_the_mlp_head_reads_the_prefixes_tokens_only_with_ngram_features(tmp_path, buckets):
    """predictor.ngram_buckets > 0: the trainer hands the head every prefix's tokens (root to node, as the
    forest holds them) and the head replays their hashed n-gram bags, not the tokens; 0: no tokens at all."""
    from trace_core.predictor import hashed_ngrams

    trainer = Trainer(toy(tmp_path, f"predictor.ngram_buckets={buckets}", "steps=2"))
    seen = []
    observe = trainer.predictor.observe
    trainer.predictor.observe = lambda batch, *a: seen.append(batch) or observe(batch, *a)
    forests = []
    update = trainer._update_policy
    trainer._update_policy = lambda forest: forests.append(forest) or update(forest)
    trainer.train_step()
    (batch,), (forest,) = seen, forests
    (replayed, _, _) = trainer.predictor._replay[0]
    if not buckets:
        assert batch.token_ids is None and replayed.ngrams is None
        return
    nodes = np.flatnonzero(forest.num_children > 0)  # what the predictor learns from, in order
    assert len(batch.token_ids) == nodes.size
    for tokens, u in zip(batch.token_ids, nodes):
        np.testing.assert_array_equal(tokens, np.concatenate([forest.node_tokens(v) for v in forest.leaf_path(u)]))
    assert replayed.token_ids is None
    for bag, tokens in zip(replayed.ngrams, batch.token_ids):
        np.testing.assert_array_equal(bag, hashed_ngrams(tokens, 64, 2))


def test_bad_predictor_backend_is_a_config_error(tmp_path, capsys):
    assert main(["train", *TOY, f"run_dir={tmp_path / 'r'}", "predictor.backend=oracle-ish"]) == 2
    assert "predictor.backend" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.slow  # spawns two training processes (each imports torch and builds its model)
def test_trace_report_rebuilds_a_comparison_from_its_runs(tmp_path, capsys):
    """`trace report DIR` reads the runs (labels from grid.json, so trace+oracle keeps its name) and writes the
    same table `trace compare` wrote; a folder without runs is a clear error."""
    out = tmp_path / "cmp"
    common = ["--seeds", "0-1", "--modes", "uniform", "trace+oracle", *TOY, "steps=2", "predictor.oracle_samples=2"]
    assert main(["compare", "--out", str(out), *common]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["trace_oracle", "uniform"]
    written = (out / "comparison.md").read_text()
    assert "| trace+oracle |" in written and "Mean over 2 seeds;" in written
    (out / "comparison.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "comparison.md").read_text() == written
    assert main(["report", str(tmp_path)]) == 2  # no runs there
    # a run still training (here: cut back to step 1) is left out and named; differences pair by seed
    metrics_file = out / "trace_oracle" / "seed0" / "metrics.jsonl"
    metrics_file.write_text(metrics_file.read_text().splitlines()[0] + "\n")
    assert main(["report", str(out)]) == 0
    assert f"left out): {metrics_file.parent}" in capsys.readouterr().out
    paired = json.loads((out / "comparison_paired.json").read_text())
    assert paired["trace+oracle"]["seeds"] == [1] and "uniform 2, trace+oracle 1" in (out / "comparison.md").read_text()


def test_parallel_seeds_give_the_sequential_results(tmp_path):
    def untimed(out):
        runs = {}
        for path in sorted(out.glob("*/seed*/metrics.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            runs[str(path.relative_to(out))] = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
        return runs

    common = ["--seeds", "0", "1", "--modes", "trace", *TOY, "steps=2"]
    assert main(["compare", "--out", str(tmp_path / "seq"), *common]) == 0
    assert main(["compare", "--jobs", "2", "--out", str(tmp_path / "par"), *common]) == 0
    sequential, parallel = untimed(tmp_path / "seq"), untimed(tmp_path / "par")
    assert len(sequential) == 2 and sequential == parallel


def test_oracle_predictor_informs_the_allocation_from_step_one_outside_the_budget(tmp_path):
    """predictor.backend=oracle (analysis): Monte-Carlo predictions from extra episodes, no cold start,
    the same leaves per step, its sampling reported apart (oracle_tokens)."""
    trainer = Trainer(
        toy(
            tmp_path, "predictor.backend=oracle", "predictor.oracle_samples=4", "steps=3", "predictor.warmup_nodes=9999"
        )
    )
    rows = [trainer.train_step() for _ in range(2)]
    assert [r["predictor_informed"] for r in rows] == [1.0, 1.0] and all(r["leaves"] == 16 for r in rows)
    assert all(r["oracle_tokens"] > r["generated_tokens"] > 0 for r in rows)
    assert all("predictor/brier" in r for r in rows) and trainer.predictor.nodes_seen > 0
    # the learned head is not ready (cold start), so it is not scored yet ...
    assert not any("predictor/head_brier" in r for r in rows)
    trainer.predictor.nodes_seen = trainer.predictor.config.warmup_nodes  # ... and is once it is
    row = trainer.train_step()
    assert {"predictor/head_brier", "predictor/head_brier_constant", "predictor/head_auc_mixed"} <= row.keys()
    assert row["predictor/head_brier"] != row["predictor/brier"]  # scored on its own predictions, not the oracle's
