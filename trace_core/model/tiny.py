"""A tiny random-init causal LM (Llama or Qwen3 architecture) sized for a word-level tokenizer.

Used by the embedded grid world: a 2-layer, 64-wide model over a ~30-word vocabulary trains
with RL on CPU in minutes, while running through exactly the HF modelling code that a real
Llama / Qwen3 checkpoint uses (attention interface, RoPE, generation).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from trace_core.envs.base import EnvError, check_choice, check_positive_int
from trace_core.model.loading import model_from_config, tiny_config
from trace_core.model.word_tokenizer import EOT

ARCHITECTURES = ("llama", "qwen3")


def tiny_model_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 256,
) -> PretrainedConfig:
    """Config of a tiny model whose vocabulary is exactly `tokenizer`'s.

    intermediate_size defaults to 4 * hidden_size. The end-of-turn token (when the tokenizer has
    one) is listed with eos among the config's eos_token_id, so HF `generate` stops a turn there.
    """
    check_choice("arch", arch, ARCHITECTURES)
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("max_positions", max_positions),
    ):
        check_positive_int(name, value)
    if hidden_size % num_heads:
        raise EnvError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise EnvError("num_heads", f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise EnvError("tokenizer", "tokenizer must define pad_token and eos_token")
    eos_ids = [tokenizer.eos_token_id]
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    if eot_id is not None and eot_id != tokenizer.unk_token_id:
        eos_ids.append(eot_id)
    return tiny_config(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        layers=num_layers,
        heads=num_heads,
        kv_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs
) -> PreTrainedModel:
    """Random-init causal LM for `tokenizer`; the same `seed` gives the same weights."""
    return model_from_config(tiny_model_config(tokenizer, **config_kwargs), seed=seed, dtype=dtype)
