"""The policy a trainer runs: an HF causal LM, its tokenizer, and how text becomes tokens."""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch

from trace_core.model.codec import HFTextCodec
from trace_core.train.config import ModelConfig
from trace_core.train.config_loader import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger("trace_core.model.policy")


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    codec: HFTextCodec
    stop_token_ids: tuple[int, ...]  # end a turn (besides the tokenizer's EOS)
    compute_dtype: torch.dtype = torch.float32  # dtype forward passes run in (model.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def autocast(self) -> bool:
        """Master weights: parameters are stored wider than the compute dtype, forwards autocast."""
        return self.param_dtype != self.compute_dtype

    def compute(self) -> contextlib.AbstractContextManager:
        """Context for every forward of the policy (training, predictor features, generation):
        autocast to the compute dtype over fp32 master weights, a no-op otherwise."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch autocasts to `dtype` on `device_type` (older builds warn and disable it instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
        except RuntimeError:
            return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("model.device", f"{name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{name!r} asked for, but CUDA is not available here")
    return device


def load_tiny(cfg: ModelConfig, env_name: str, seed: int, dtype: torch.dtype):
    """model.name=tiny: a random-init model sized for the env's word tokenizer (WORD_TOKENIZERS)."""
    from trace_core.model.tiny import build_tiny_model
    from trace_core.model.word_tokenizer import EOT, WORD_TOKENIZERS, word_tokenizer_for

    tokenizer = word_tokenizer_for(env_name)
    if tokenizer is None:
        raise ConfigError(
            "model.name",
            f"'tiny' needs an env with a built-in word tokenizer ({', '.join(sorted(WORD_TOKENIZERS))}), got "
            f"env.name={env_name!r}; use model.name=smollm2 or a model directory (or register_word_tokenizer)",
        )
    model = build_tiny_model(
        tokenizer,
        seed=seed,
        dtype=dtype,
        arch=cfg.arch,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        num_kv_heads=cfg.kv_heads,
    )
    return model, tokenizer, (tokenizer.convert_tokens_to_ids(EOT),)


def load_smollm2_policy(cfg: ModelConfig, env_name: str, seed: int, dtype: torch.dtype):
    """model.name=smollm2: SmolLM2-135M-Instruct, offline (trace_core.model.loading.load_smollm2)."""
    from trace_core.model.loading import load_smollm2

    model, tokenizer = load_smollm2(dtype)
    return model, tokenizer, ()


def build_policy(cfg: ModelConfig, env_name: str, seed: int) -> Policy:
    """The model named by `cfg` for environment `env_name` (tiny models use the env's word tokenizer)."""
    compute_dtype, device = DTYPES[cfg.dtype], resolve_device(cfg.device)
    low_precision = compute_dtype != torch.float32
    if low_precision and cfg.master_weights and not autocast_supported(device.type, compute_dtype):
        raise ConfigError(
            "model.dtype",
            f"{cfg.dtype} compute over fp32 master weights needs torch autocast to "
            f"{cfg.dtype} on {device.type}, which this torch build does not support; use "
            "model.dtype=bfloat16 or float32",
        )
    if low_precision and not cfg.master_weights:
        log.warning(
            "model.master_weights=false: the weights are stored in %s, so every optimizer update smaller "
            "than its resolution (about 1/%d of a weight) is lost; keep model.master_weights=true for fp32 "
            "master weights",
            cfg.dtype,
            round(2 / torch.finfo(compute_dtype).eps),
        )
    dtype = torch.float32 if low_precision and cfg.master_weights else compute_dtype  # parameter storage
    from trace_core.model.loading import MODELS

    if cfg.name in MODELS:
        model, tokenizer, stop = MODELS.get(cfg.name)(cfg, env_name, seed, dtype)
    else:  # a Hub id or a local directory (trace_core/model/hub.py: supported families, offline handling)
        from trace_core.model.hub import generation_stop_ids, load_pretrained

        model, tokenizer = load_pretrained(cfg.name, dtype)
        stop = generation_stop_ids(model)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            "model.name",
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
            f"has {vocab}; they do not belong together",
        )
    if cfg.gradient_checkpointing:
        # recompute each layer in the backward instead of keeping its activations (tree_forward
        # makes the replay use tree attention); generation runs in eval mode, where it is off
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:  # after checkpointing is set on the base model; the adapters' layers inherit it
        from trace_core.model.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    codec = HFTextCodec(tokenizer, chat_template=cfg.chat_template)
    return Policy(
        model=model.to(device), tokenizer=tokenizer, codec=codec, stop_token_ids=stop, compute_dtype=compute_dtype
    )
