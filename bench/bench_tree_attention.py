"""Benchmark: tree attention on agent-RL shaped trees vs recomputing every leaf path.

Tree shape: a prefix of P tokens, then `depth` levels of turns with S tokens per node and a
uniform fan-out, ending in B leaves (depth 1: B branches off the prefix; depth 3, B=8: 2-2-2).
Every leaf path has P + depth*S tokens.

Reported in one run, with the baseline measured alongside:
  * counts that do not depend on speed: visible (query, key) pairs, pairs the kernels' block
    schedule computes (forward / dq and dk/dv passes) and the skipping efficiency (target >= 90%);
    the pairs a per-leaf trainer computes (its causal triangles) and the ideal speed-up from sharing;
  * times, forward and forward+backward:
      tree attention      - Triton on CUDA; on CPU the torch CPU path (what CPU training runs)
      per-leaf SDPA       - dense causal attention over every leaf path (the "no sharing" baseline)
      FlexAttention       - same tree mask as a BlockMask, output checked against ours; mask build
                            time shown and included (forward only on CPU: no CPU backward)
      flash-attn varlen   - per-leaf flash_attn_varlen_func, where the optional package is installed
    On CUDA also TFLOP/s counted on visible pairs only (fwd 4*pairs*D*H, bwd 10*pairs*D*H).

    python bench/bench_tree_attention.py            # CUDA: P=4096 S=512 B=8 bf16 D=128; CPU: --small
    python bench/bench_tree_attention.py --small    # P=256 S=64 B=8, fp32: under a minute on 2 CPU cores
    pytest bench/bench_tree_attention.py            # pytest-benchmark version (small tree)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trace_core.forest import RolloutForest
from trace_core.packing.forest import pack
from trace_kernels._runtime import select_backend
from trace_kernels.tools.autotune_report import format_tuned_configs
from trace_kernels.tree_attention import block_skip_metadata, tree_attention
from trace_kernels.tree_attention.triton import META

# tile shapes the schedule counts are reported for: (BLOCK_M, BLOCK_N) of the forward/dq kernels and
# of the dk/dv kernel (head_dim 128 autotune candidates on CUDA; the interpreter uses the last pair)
FWD_TILES = [(128, 64), (64, 64), (64, 32), (16, 32)]
DKDV_TILES = [(16, 128), (32, 64), (32, 16)]
SCAN = 64  # META-blocks per visible-run scan step (the kernels' default)


@dataclass
class TreeCase:
    prefix: int
    branch: int
    leaves: int
    depth: int
    end: np.ndarray  # int32 [T]
    leaf_index: list[np.ndarray]  # packed positions of each leaf path

    @property
    def name(self) -> str:
        return f"P={self.prefix} S={self.branch} B={self.leaves} depth={self.depth}"


def agent_tree(prefix: int, branch: int, leaves: int, depth: int) -> TreeCase:
    fanout = round(leaves ** (1 / depth))
    if fanout**depth != leaves:
        raise ValueError(f"leaves={leaves} is not a perfect power for depth={depth}")
    parent, lengths, level = [-1], [prefix], [0]
    for _ in range(depth):
        new_level = []
        for p in level:
            for _ in range(fanout):
                parent.append(p)
                lengths.append(branch)
                new_level.append(len(parent) - 1)
        level = new_level
    lengths_arr = np.asarray(lengths)
    tok_end = np.cumsum(lengths_arr)
    total = int(tok_end[-1])
    forest = RolloutForest.from_arrays(
        parent=np.asarray(parent),
        prompt_id=np.zeros(len(parent), np.int64),
        tok_start=tok_end - lengths_arr,
        tok_end=tok_end,
        tokens=np.zeros(total, np.int64),
        role=np.zeros(total, np.uint8),
    )
    packed = pack(forest)
    offsets, index = packed.leaf_token_index()
    return TreeCase(
        prefix, branch, leaves, depth, packed.end, [index[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    )


# ---------------------------------------------------------------------------------- counts


def visible_pairs(end: np.ndarray) -> int:
    return int((end.astype(np.int64) - np.arange(end.size)).sum())


def per_leaf_pairs(case: TreeCase) -> int:
    return sum(len(ix) * (len(ix) + 1) // 2 for ix in case.leaf_index)


def _tile_max(end: np.ndarray, block: int) -> np.ndarray:
    n = math.ceil(end.size / block)
    padded = np.zeros(n * block, np.int64)
    padded[: end.size] = end
    return padded.reshape(n, block).max(1)


def runs_schedule_pairs(end: np.ndarray, block_m: int, block_n: int) -> int:
    """Pairs the forward / dq kernels compute with RUNS=True: the same run scan (kv_max_end per META
    block, SCAN blocks per step); a tile overhanging its run's end is computed whole."""
    T = end.size
    kv_max_end, first_kv = (x.numpy() for x in block_skip_metadata(torch.as_tensor(end)))
    total = 0
    for i0 in range(0, T, block_m):
        rows, hi = min(block_m, T - i0), min(i0 + block_m, T)
        j = int(first_kv[i0 // META]) * META
        while j < hi:
            blocks = np.arange(j // META, j // META + SCAN)
            visible = (blocks * META < hi) & (kv_max_end[np.minimum(blocks, kv_max_end.size - 1)] > i0)
            window_end = min((j // META + SCAN) * META, hi)
            if not visible.any():
                j = window_end
                continue
            first = int(np.argmax(visible))
            rest = np.flatnonzero(~visible[first:])
            start = int(blocks[first]) * META
            stop = min(int(blocks[first + rest[0]]) * META, window_end) if rest.size else window_end
            total += sum(rows * min(block_n, T - j0) for j0 in range(start, stop, block_n))
            j = stop
    return total


def forward_schedule_pairs(end: np.ndarray, block_m: int, block_n: int) -> int:
    """(query, key) pairs the forward / dq kernels compute with RUNS=False: the same loop bounds and
    skip test."""
    T = end.size
    _, first_kv = block_skip_metadata(torch.as_tensor(end))
    first_kv = first_kv.numpy()
    tile_max = _tile_max(end, block_n)
    total = 0
    for i0 in range(0, T, block_m):
        rows = min(block_m, T - i0)
        lo = first_kv[i0 // META] * META // block_n * block_n
        for j0 in range(lo, min(i0 + block_m, T), block_n):
            if tile_max[j0 // block_n] > i0:
                total += rows * min(block_n, T - j0)
    return total


def dkdv_schedule_pairs(end: np.ndarray, block_m: int, block_n: int) -> int:
    """Pairs the dk/dv kernel computes: key tile n visits query tiles [j0 // BM * BM, max end)."""
    T = end.size
    tile_max = _tile_max(end, block_n)
    total = 0
    for n, j0 in enumerate(range(0, T, block_n)):
        cols = min(block_n, T - j0)
        for i0 in range(j0 // block_m * block_m, int(tile_max[n]), block_m):
            total += cols * min(block_m, T - i0)
    return total


def print_counts(case: TreeCase) -> float:
    """Prints the speed-independent counts; returns the worst skipping efficiency."""
    vis = visible_pairs(case.end)
    leaf = per_leaf_pairs(case)
    T = case.end.size
    print(f"\n[{case.name}] packed tokens {T}, leaf-path tokens {sum(len(ix) for ix in case.leaf_index)}")
    print(f"  visible pairs {vis:,}; per-leaf causal pairs {leaf:,} -> ideal speed-up from sharing {leaf / vis:.2f}x")
    print(f"  {'kernel':<14}{'tile (M x N)':>14}{'pairs computed':>18}{'useful':>9}")
    worst = 1.0
    for kernel, tiles, count in (
        ("fwd/dq runs", FWD_TILES, runs_schedule_pairs),
        ("fwd/dq branch", FWD_TILES, forward_schedule_pairs),
        ("dk/dv", DKDV_TILES, dkdv_schedule_pairs),
    ):
        for bm, bn in tiles:
            computed = count(case.end, bm, bn)
            assert computed >= vis, "the block schedule misses visible pairs"
            worst = min(worst, vis / computed)
            print(f"  {kernel:<14}{f'{bm} x {bn}':>14}{computed:>18,}{vis / computed:>8.1%}")
    return worst


# ---------------------------------------------------------------------------------- timing


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call: triton's do_bench on CUDA, best of `repeats` on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100) / 1e3
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fwd_and_fwdbwd(run, inputs, dout, device, repeats) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            run(*inputs)

    def fwdbwd():
        for x in inputs:
            x.grad = None
        run(*inputs).backward(dout)

    return timed(fwd, device, repeats), timed(fwdbwd, device, repeats)


def leaf_batch(case: TreeCase, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[T, H, D] packed -> [B, H, L, D] leaf paths (all leaves have the same length here)."""
    index = torch.as_tensor(np.stack(case.leaf_index), device=tensors[0].device)
    return [t[index].transpose(1, 2).contiguous().detach().requires_grad_() for t in tensors]


def bench_case(case: TreeCase, heads: tuple[int, int], head_dim: int, dtype, device: str, repeats: int) -> list:
    Hq, Hkv = heads
    T = case.end.size
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, head_dim, generator=g).to(device, dtype).requires_grad_() for h in (Hq, Hkv, Hkv))
    end = torch.as_tensor(case.end, device=device)
    dout = torch.randn(T, Hq, head_dim, generator=g).to(device, dtype)
    path = select_backend("tree_attention", q).value
    rows = []

    tree = fwd_and_fwdbwd(
        lambda a, b, c: tree_attention(a, b, c, end, check_inputs=False), (q, k, v), dout, device, repeats
    )
    rows.append((f"tree attention ({path})", *tree, 0.0))

    lq, lk, lv = leaf_batch(case, q, k, v)
    ldout = leaf_batch(case, dout)[0].detach()
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=Hq != Hkv)
    rows.append(("per-leaf SDPA (no sharing)", *fwd_and_fwdbwd(sdpa, (lq, lk, lv), ldout, device, repeats), 0.0))

    with torch.no_grad():
        expected = tree_attention(q, k, v, end, check_inputs=False)
    rows.append(flex_row(end, q, k, v, dout, Hq != Hkv, expected, device, repeats))
    if device == "cuda":
        rows.append(flash_varlen_row(case, q, k, v, dout, repeats))
    return rows


def flex_row(end, q, k, v, dout, gqa, expected, device, repeats):
    """FlexAttention with the tree rule as a mask_mod; its output is checked against ours first, so
    the baseline computes the same thing. torch's CPU FlexAttention has no backward: forward only."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = end.shape[0]
    flex = torch.compile(flex_attention)

    def tree_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < end[kv_idx])

    build = lambda: create_block_mask(tree_mask, None, None, T, T, device=device)
    mask = build()
    build_s = timed(build, device, repeats)
    qf, kf, vf = (x.detach().transpose(0, 1)[None].requires_grad_(device == "cuda") for x in (q, k, v))
    run = lambda a, b, c: flex(a, b, c, block_mask=mask, enable_gqa=gqa)
    with torch.no_grad():
        err = (run(qf, kf, vf)[0].transpose(0, 1).float() - expected.float()).abs().max().item()
    tol = 1e-4 if q.dtype == torch.float32 else 5e-2
    assert err <= tol, f"FlexAttention with the tree mask differs from tree attention by {err:.3g}"
    if device != "cuda":
        fwd = timed(lambda: run(qf, kf, vf), device, repeats)
        return ("FlexAttention fwd (+ mask build)", fwd + build_s, None, build_s)
    fwd, fwdbwd = fwd_and_fwdbwd(run, (qf, kf, vf), dout.transpose(0, 1)[None], device, repeats)
    return ("FlexAttention (+ mask build)", fwd + build_s, fwdbwd + build_s, build_s)


def flash_varlen_row(case, q, k, v, dout, repeats):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return ("flash-attn varlen: not installed", None, None, 0.0)
    index = torch.as_tensor(np.concatenate(case.leaf_index), device=q.device)
    lengths = torch.tensor([0] + [len(ix) for ix in case.leaf_index], device=q.device)
    cu = torch.cumsum(lengths, 0).to(torch.int32)
    max_len = int(lengths.max())
    lq, lk, lv = (x[index].detach().contiguous().requires_grad_() for x in (q, k, v))
    ldout = dout[index].contiguous()
    run = lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, max_len, max_len, causal=True)
    return ("per-leaf flash-attn varlen", *fwd_and_fwdbwd(run, (lq, lk, lv), ldout, "cuda", repeats), 0.0)


def print_times(case: TreeCase, rows, heads, head_dim, device: str) -> None:
    tree_fwd, tree_fb = rows[0][1], rows[0][2]
    print(f"  {'method':<34}{'fwd [ms]':>10}{'fwd+bwd [ms]':>14}{'row / tree: fwd':>19}{'fwd+bwd':>9}")
    for name, fwd, fb, extra in rows:
        if fwd is None:
            print(f"  {name:<34}{'-':>10}{'-':>14}")
            continue
        note = f"   (mask build {extra * 1e3:.2f} ms)" if extra else ""
        fb_ms, fb_ratio = (
            (f"{fb * 1e3:>14.2f}", f"{fb / tree_fb:>8.2f}x") if fb is not None else (f"{'-':>14}", f"{'-':>9}")
        )
        print(f"  {name:<34}{fwd * 1e3:>10.2f}{fb_ms}{fwd / tree_fwd:>18.2f}x{fb_ratio}{note}")
    if device == "cuda":
        flops_fwd = 4 * visible_pairs(case.end) * head_dim * heads[0]
        print(
            f"  tree attention on visible pairs: fwd {flops_fwd / tree_fwd / 1e12:.0f} TFLOP/s, "
            f"bwd {2.5 * flops_fwd / (tree_fb - tree_fwd) / 1e12:.0f} TFLOP/s"
        )


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="P=256 S=64 B=8 fp32 (the default on CPU)")
    parser.add_argument("--prefix", type=int, help="prefix tokens P (default 4096, small 256)")
    parser.add_argument("--branch", type=int, help="tokens per branch node S (default 512, small 64)")
    parser.add_argument("--leaves", type=int, default=8, help="leaves B (a perfect power for each depth)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--heads", type=int, nargs=2, default=None, help="query and kv heads (default 32 8, small 4 2)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128, small 64")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats on CPU (best kept)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    prefix = args.prefix or (256 if small else 4096)
    branch = args.branch or (64 if small else 512)
    heads = tuple(args.heads or ((4, 2) if small else (32, 8)))
    head_dim = args.head_dim or (64 if small else 128)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    print(
        f"device: {device_name(device)}; dtype {str(dtype).removeprefix('torch.')}; heads {heads[0]}/{heads[1]} "
        f"(q/kv), head_dim {head_dim}; torch {torch.__version__}"
    )

    # counts for the H100 target shape are cheap, so they are always printed
    worst = 1.0
    for depth in args.depths:
        worst = min(worst, print_counts(agent_tree(4096, 512, args.leaves, depth)))
    print(
        f"\nskipping efficiency at the target shape: worst {worst:.1%} useful (target >= 90%: "
        f"{'met' if worst >= 0.9 else 'NOT met'})"
    )

    for depth in args.depths:
        case = agent_tree(prefix, branch, args.leaves, depth)
        if (prefix, branch) != (4096, 512):
            print_counts(case)
        rows = bench_case(case, heads, head_dim, dtype, device, args.repeats)
        print(f"  times on {device_name(device)}:")
        print_times(case, rows, heads, head_dim, device)
    print("\n" + format_tuned_configs())  # which loop shape (RUNS) and tiles the autotuner chose


# ---------------------------------------------------------------------- pytest-benchmark
SMALL = dict(prefix=256, branch=64, leaves=8)


def _small_inputs(depth: int):
    case = agent_tree(depth=depth, **SMALL)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.end.size, h, 64, generator=g).to(device, dtype).requires_grad_() for h in (4, 2, 2))
    return case, q, k, v, torch.as_tensor(case.end, device=device)


def test_bench_schedule_counts(benchmark):
    case = agent_tree(4096, 512, 8, 3)
    computed = benchmark(forward_schedule_pairs, case.end, 128, 64)
    assert visible_pairs(case.end) / computed >= 0.9
    assert visible_pairs(case.end) / runs_schedule_pairs(case.end, 128, 64) >= 0.9


def test_bench_tree_attention_fwd_bwd(benchmark):
    _case, q, k, v, end = _small_inputs(depth=3)
    benchmark.extra_info.update(device=device_name(q.device.type), path=select_backend("tree_attention", q).value)
    benchmark(lambda: tree_attention(q, k, v, end, check_inputs=False).sum().backward())


def test_bench_per_leaf_sdpa_fwd_bwd(benchmark):
    case, q, k, v, _ = _small_inputs(depth=3)
    lq, lk, lv = leaf_batch(case, q, k, v)
    benchmark.extra_info.update(device=device_name(q.device.type), path="torch SDPA")
    benchmark(lambda: F.scaled_dot_product_attention(lq, lk, lv, is_causal=True, enable_gqa=True).sum().backward())


if __name__ == "__main__":
    main()
