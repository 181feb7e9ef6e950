"""LoRA adapters on the policy (peft), and which weights a checkpoint holds.

`apply_lora` wraps the causal LM in a `peft.PeftModel`: the base weights are frozen (requires_grad=False),
only the adapters train. Everything downstream takes the wrapped model as it is: the packed tree forward
unwraps it to the transformers model whose layers now carry the adapters, the paged engine reaches the same
layers through `get_decoder()`, and the fused logprob reads the (un-adapted) lm_head weight, which is why
the lm_head is never a target (trace_core.train.config.LoraConfig refuses it).

`trainable_state_dict` / `load_trainable_state_dict` are the one place that decides which weights a
checkpoint holds: the adapters of a LoRA model (peft's own state-dict functions), every weight otherwise.
"""

from __future__ import annotations

import torch

from trace_core.train.config import LoraConfig
from trace_core.train.config_loader import ConfigError


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (carries adapters)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of `model`'s linear layers (what LoRA's target_modules match)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters on `cfg.target_modules`; a target that matches no linear layer of the
    model is a ConfigError naming model.lora.target_modules (peft only refuses a list that matches nothing)."""
    import peft

    available = linear_names(model)
    unknown = [t for t in cfg.target_modules if t not in available]
    if unknown:
        raise ConfigError(
            "model.lora.target_modules",
            f"{', '.join(map(repr, unknown))} matches no linear layer of this model; its linear layers are "
            f"{', '.join(n for n in available if n != 'lm_head')}",
        )
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint keeps: the adapters of a LoRA model (no base weight), else `model.state_dict()`."""
    if is_lora(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore what `trainable_state_dict` saved, exactly; a state that does not fit the model (a full
    checkpoint into a LoRA model, adapters of another shape or target set) raises a ConfigError naming
    model.lora instead of loading part of it."""
    if not is_lora(model):
        model.load_state_dict(state)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ConfigError(
            "model.lora",
            f"the checkpoint's weights are not this model's adapters (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it saved with other model.lora settings, or without LoRA?",
        )
    for key, value in current.items():
        if value.shape != state[key].shape:
            raise ConfigError(
                "model.lora",
                f"{key}: the checkpoint holds shape {tuple(state[key].shape)}, the model {tuple(value.shape)}",
            )
    set_peft_model_state_dict(model, state)
