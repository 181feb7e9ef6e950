"""The policy a trainer runs: an HF causal LM, its tokenizer, and how text becomes tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .engine import HFTextCodec
from .trainer_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    codec: HFTextCodec
    stop_token_ids: tuple[int, ...]  # end a turn (besides the tokenizer's EOS)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} asked for, but CUDA is not available here")
    return device


def build_policy(cfg: ModelConfig, env_name: str, seed: int) -> Policy:
    """The model named by `cfg` for environment `env_name` (tiny models use the env's word tokenizer)."""
    dtype, device = DTYPES[cfg.dtype], resolve_device(cfg.device)
    if cfg.name == "tiny":
        if env_name != "gridworld":
            raise ConfigError(f"model.name: 'tiny' needs an env with a built-in word tokenizer (gridworld), got "
                              f"env.name={env_name!r}; use model.name=smollm2 or a model directory")
        from .envs.tiny_model import build_tiny_model
        from .envs.word_tokenizer import EOT, gridworld_tokenizer

        tokenizer = gridworld_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed, dtype=dtype, arch=cfg.arch, hidden_size=cfg.hidden_size,
                                 num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads)
        stop = (tokenizer.convert_tokens_to_ids(EOT),)
    elif cfg.name == "smollm2":
        from .models import load_smollm2

        model, tokenizer = load_smollm2(dtype)
        stop = ()
    else:
        path = Path(cfg.name)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: {cfg.name!r} is neither 'tiny', 'smollm2' nor a model directory "
                              "with a config.json (no model hub is used)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        stop = ()
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"model.name: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                          f"has {vocab}; they do not belong together")
    codec = HFTextCodec(tokenizer, chat_template=cfg.chat_template)
    return Policy(model=model.to(device), tokenizer=tokenizer, codec=codec, stop_token_ids=stop)
