"""Helpers of the Hub / local-directory / LoRA / export tests: the toy grid-world model saved as a Hugging Face
model directory, or into a Hub cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub's snapshots are named


def save_grid_model(folder: Path, *, arch: str = "qwen3", seed: int = 0) -> Path:
    """The toy run's model shape (1 layer, 32 wide) over the grid world's tokenizer, saved with it to `folder`."""
    from trace_core.model.tiny import build_tiny_model
    from trace_core.model.word_tokenizer import gridworld_tokenizer

    tokenizer = gridworld_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, arch=arch, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hub_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in the Hub cache `cache` (HF_HUB_CACHE), with refs/main pointing at it:
    models--{org}--{name}/snapshots/<revision>/ and models--{org}--{name}/refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def grid_input_ids():
    """[1, T] token ids of a grid-world-like prompt and actions, for comparing logits."""
    import torch

    from trace_core.model.word_tokenizer import gridworld_tokenizer

    ids = gridworld_tokenizer()("<bos> level 1 goal wall north south east west <eot> turns 3 invalid")["input_ids"]
    return torch.tensor([ids])
