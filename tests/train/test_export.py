"""`trace export RUN_DIR OUT_DIR`: the policy in Hugging Face format, loaded back with AutoModelForCausalLM (in a
fresh process that never imports trace_core, as vLLM would) and giving the trained model's logits; LoRA runs as
adapters or merged; and an export that never loses data (non-empty OUT_DIR, the run directory)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from model_helpers import grid_input_ids, save_grid_model
from run_helpers import TOY, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_core.train.cli import main
from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import load_config
from trace_core.train.trainer import Trainer

LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"]


def train(run_dir, *extra):
    """A toy run of 2 steps (checkpoints of steps 1 and 2); returns its closed trainer."""
    trainer = Trainer(
        load_config(TrainConfig, None, [*TOY, f"run_dir={run_dir}", "steps=2", "checkpoint_every=1", *extra])
    )
    trainer.fit()
    trainer.close()
    return trainer


@torch.no_grad()
def logits(model, ids=None):
    return model.eval()(grid_input_ids() if ids is None else ids).logits


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return run_dir, train(run_dir)


LOAD_ALONE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2], return_tensors="pt")["input_ids"]
torch.save({"ids": ids, "logits": model(ids).logits.detach(), "modules": sorted(sys.modules)}, sys.argv[3])
"""


def test_export_loads_with_automodel_and_gives_the_trained_logits(full_run, tmp_path, capsys):
    run_dir, trainer = full_run
    before = snapshot(run_dir)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "exported step 2 (full model)" in capsys.readouterr().out
    assert snapshot(run_dir) == before  # the run directory is only read
    assert {"config.json", "model.safetensors", "tokenizer.json", "trace_export.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "trace_export.json").read_text())["step"] == 2

    exported = AutoModelForCausalLM.from_pretrained(out)
    got = exported.state_dict()
    assert got.keys() == trainer.model.state_dict().keys()
    for name, want in trainer.model.state_dict().items():
        assert torch.equal(want, got[name]), name
    torch.testing.assert_close(logits(exported), logits(trainer.model), rtol=0, atol=1e-6)
    text = "<bos> level 1 goal north <eot>"
    tokenizer, trained_tokenizer = AutoTokenizer.from_pretrained(out), trainer.policy.tokenizer
    assert tokenizer(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
    assert tokenizer.get_vocab() == trained_tokenizer.get_vocab()
    assert tokenizer.all_special_tokens == trained_tokenizer.all_special_tokens  # <pad> <unk> <bos> <eos> <eot>


@pytest.mark.slow  # a fresh Python process importing transformers: ~8 s on 2 cores
def test_export_loads_in_a_process_without_trace_core(full_run, tmp_path):
    """transformers alone (no trace_core imported, nothing of ours registered), as a server would load it."""
    run_dir, trainer = full_run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    text = "<bos> level 1 goal north <eot>"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, str(out), text, str(tmp_path / "alone.pt")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    alone = torch.load(tmp_path / "alone.pt", weights_only=True)
    assert not any(m.startswith("trace_") for m in alone["modules"])
    torch.testing.assert_close(alone["logits"], logits(trainer.model, alone["ids"]), rtol=0, atol=1e-6)


def test_export_of_a_step_and_in_another_dtype(full_run, tmp_path):
    run_dir, _ = full_run
    assert main(["export", str(run_dir), str(tmp_path / "s1"), "--step", "1", "--dtype", "bfloat16"]) == 0
    record = json.loads((tmp_path / "s1" / "trace_export.json").read_text())
    assert record["step"] == 1 and record["checkpoint"] == "step_00000001.pt" and record["dtype"] == "bfloat16"
    at_step_1, _ = Trainer.for_evaluation(run_dir / "checkpoints" / "step_00000001.pt")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "s1")
    assert exported.dtype == torch.bfloat16
    got = exported.state_dict()
    for name, want in at_step_1.model.state_dict().items():
        assert torch.equal(want.to(torch.bfloat16), got[name]), name


def test_export_never_loses_data(full_run, tmp_path, capsys):
    run_dir, _ = full_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def refused(*args) -> str:
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "OUT_DIR: " in refused(run_dir, out) and "already holds files" in refused(run_dir, out)
    assert "--overwrite only replaces an earlier export" in refused(run_dir, out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    assert "inside (or holds) the run directory" in refused(run_dir, run_dir / "export")
    assert "inside (or holds) the run directory" in refused(run_dir, run_dir.parent)
    assert "--step: " in refused(run_dir, tmp_path / "x", "--step", "7") and "steps: 1, 2" in refused(
        run_dir, tmp_path / "x", "--step", "7"
    )
    assert "--merge-lora: " in refused(run_dir, tmp_path / "x", "--merge-lora")
    assert "RUN_DIR: " in refused(tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    earlier = tmp_path / "earlier"
    assert main(["export", str(run_dir), str(earlier), "--step", "1"]) == 0
    capsys.readouterr()
    assert "already holds files" in refused(run_dir, earlier)
    assert main(["export", str(run_dir), str(earlier), "--overwrite"]) == 0  # an earlier export is replaced
    assert json.loads((earlier / "trace_export.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out"]  # no temporary folder left


def test_lora_run_exports_adapters_or_the_merged_model(tmp_path):
    from peft import PeftModel

    from trace_core.model.tiny import build_tiny_model
    from trace_core.model.word_tokenizer import gridworld_tokenizer

    pytest.importorskip("peft")
    trainer = train(tmp_path / "run", *LORA)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapters")]) == 0
    names = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the adapters only
    base = build_tiny_model(  # the run's base model: the toy shape, built in code from the run's seed
        gridworld_tokenizer(), seed=0, arch="qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapters")
    torch.testing.assert_close(logits(adapted), logits(trainer.model), rtol=0, atol=1e-6)

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(trainer.model), rtol=1e-5, atol=1e-5)
    with trainer.model.disable_adapter():  # and the adapters matter: the base alone gives other logits
        assert (logits(merged) - logits(trainer.model)).abs().max() > 1e-4


def test_lora_adapters_of_a_model_directory_load_with_automodel(tmp_path):
    """A base that from_pretrained can find (a directory or a Hub id): the adapter-only export names it, and
    AutoModelForCausalLM.from_pretrained(OUT_DIR) loads base + adapters."""
    pytest.importorskip("peft")
    base = save_grid_model(tmp_path / "base")
    trainer = train(tmp_path / "run", *LORA, f"model.name={base}")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapters")]) == 0
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapters")
    torch.testing.assert_close(logits(loaded), logits(trainer.model), rtol=0, atol=1e-6)
