"""LoRA through peft (model.lora.*): only the adapters train, checkpoints hold only them, resume is exact, and
bad settings are errors naming the key."""

import importlib.util

import pytest
import torch
from run_helpers import TOY

from trace_core.train.cli import main
from trace_core.train.config import LoraConfig, TrainConfig
from trace_core.train.config_loader import ConfigError, load_config
from trace_core.train.trainer import Trainer

pytest.importorskip("peft")
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"]


def toy(run_dir, *extra):
    return load_config(TrainConfig, None, [*TOY, f"run_dir={run_dir}", *LORA, *extra])


def test_lora_run_trains_only_the_adapters_saves_only_them_and_resumes_exactly(tmp_path):
    straight = Trainer(toy(tmp_path / "a", "steps=3", "checkpoint_every=1"))
    before = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    adapters = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters) and len(adapters) < len(before)
    trainable = {id(p) for p in straight.model.parameters() if p.requires_grad}
    assert {id(p) for g in straight.optimizer.param_groups for p in g["params"]} == trainable
    straight.fit()
    changed = {n for n, p in straight.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapters  # the base weights are bit-identical
    state = torch.load(tmp_path / "a" / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert len(state["model"]) == len(adapters) and all("lora_" in key for key in state["model"])
    assert sum(t.numel() for t in state["model"].values()) == sum(
        p.numel() for n, p in straight.model.named_parameters() if n in adapters
    )
    assert len(state["optimizer"]["state"]) <= len(adapters)  # AdamW state of adapters only
    straight.close()

    first = Trainer(toy(tmp_path / "b", "steps=1", "checkpoint_every=1"))
    first.fit()
    first.close()
    resumed = Trainer(toy(tmp_path / "b", "steps=3", "checkpoint_every=1"), resume=True)
    assert resumed.step == 1
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    resumed.close()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.rank=0", "model.lora.rank: must be >= 1, got 0"),
        ("model.lora.alpha=0", "model.lora.alpha: must be > 0"),
        ("model.lora.dropout=1", "model.lora.dropout: must be in [0, 1)"),
        ("model.lora.target_modules=[]", "model.lora.target_modules: name at least one module"),
        (
            "model.lora.target_modules=[q_proj, lm_head]",
            "model.lora.target_modules: 'lm_head': adapters on the lm_head",
        ),
        ("model.lora.target_modules=[qkv_proj]", "model.lora.target_modules: 'qkv_proj' is not a linear layer"),
    ],
)
def test_lora_config_errors_name_the_key_before_a_run_directory_exists(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["train", *TOY, f"run_dir={run_dir}", "steps=1", "model.lora.enabled=true", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_lora_without_peft_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model\.lora\.enabled: LoRA needs the peft package"):
        load_config(TrainConfig, None, ["model.lora.enabled=true"])
    LoraConfig(enabled=False)  # off: peft is not needed


def test_apply_lora_names_modules_the_model_does_not_have():
    """A model registered by a plugin is not checked at config time; wrapping it is."""
    from trace_core.model.loading import tiny_causal_lm
    from trace_core.model.lora import apply_lora

    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: 'c_attn' matches no linear layer") as err:
        apply_lora(tiny_causal_lm("llama", layers=1), LoraConfig(enabled=True, target_modules=["q_proj", "c_attn"]))
    assert "q_proj" in err.value.detail and "lm_head" not in err.value.detail


def test_a_checkpoint_of_other_adapters_is_refused_whole():
    from trace_core.model.loading import tiny_causal_lm
    from trace_core.model.lora import apply_lora, load_trainable_state_dict, trainable_state_dict

    model = apply_lora(tiny_causal_lm("qwen3", layers=1), LoraConfig(enabled=True, rank=4))
    wider = trainable_state_dict(apply_lora(tiny_causal_lm("qwen3", layers=1), LoraConfig(enabled=True, rank=8)))
    fewer = trainable_state_dict(
        apply_lora(tiny_causal_lm("qwen3", layers=1), LoraConfig(enabled=True, rank=4, target_modules=["q_proj"]))
    )
    kept = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    with pytest.raises(ConfigError, match=r"model\.lora: .*shape"):
        load_trainable_state_dict(model, wider)
    with pytest.raises(ConfigError, match="not this model's adapters"):
        load_trainable_state_dict(model, fewer)
    with pytest.raises(ConfigError, match="not this model's adapters"):
        load_trainable_state_dict(model, tiny_causal_lm("qwen3", layers=1).state_dict())  # a full checkpoint
    assert all(torch.equal(v, trainable_state_dict(model)[k]) for k, v in kept.items())  # nothing half-loaded


def test_lora_with_gradient_checkpointing_trains_the_same(tmp_path):
    plain = Trainer(toy(tmp_path / "a", "steps=2"))
    plain.fit()
    checkpointed = Trainer(toy(tmp_path / "b", "steps=2", "model.gradient_checkpointing=true"))
    checkpointed.fit()
    adapters = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in adapters.items() if "lora_B" in n)  # it trained
    for name, param in checkpointed.model.named_parameters():
        if name in adapters:
            torch.testing.assert_close(param, adapters[name], rtol=1e-5, atol=1e-6, msg=name)
    plain.close()
    checkpointed.close()


def test_a_run_from_before_model_lora_and_logging_resumes(tmp_path):
    """Checkpoints and config.yaml written before the model.lora / logging sections existed still resume."""
    import yaml

    from trace_core.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    cfg = [*TOY, f"run_dir={run_dir}", "checkpoint_every=1"]
    with Trainer(load_config(TrainConfig, None, [*cfg, "steps=1"])) as trainer:
        trainer.fit()
    path = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(path)
    for config in (state["config"], saved := yaml.safe_load((run_dir / "config.yaml").read_text())):
        del config["model"]["lora"], config["logging"]
    ckpt.save_checkpoint(run_dir, 1, state)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    from trace_core.train.config import resume_config

    with Trainer(resume_config(None, [f"run_dir={run_dir}", "steps=2"]), resume=True) as trainer:
        assert trainer.step == 1
        trainer.fit()
        assert trainer.step == 2
