"""Tree attention: the Triton kernel (interpreter on CPU) and the CPU path against the naive oracle.

Trees come from trace_core.packing.forest.pack, so `end` is exactly what training feeds the op. Outputs
and gradients of q, k, v are compared with the fp32 reference; for fp16 / bf16 the tolerance is
set by how far the same math run in that dtype lands from the fp32 reference.
"""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton

from attention_cases import packed_forest, random_tree, same_dtype_attention
from trace_kernels.tree_attention import block_skip_metadata, tree_attention
from trace_kernels.tree_attention.cpu import independent_ranges, tree_attention_torch
from trace_kernels.tree_attention.naive import tree_attention_reference, tree_visibility_mask

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def chain(n_nodes: int, length: int = 1):
    return [i - 1 for i in range(n_nodes)], [length] * n_nodes


def fan(n_children: int, root_len: int, child_lens: list[int]):
    return [-1] + [0] * n_children, [root_len] + child_lens


def end_of(packed) -> torch.Tensor:
    return torch.as_tensor(packed.end, device=DEVICE)


def make_qkv(T, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, D, generator=g)
    k = torch.randn(T, Hkv, D, generator=g)
    v = torch.randn(T, Hkv, D, generator=g)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v)]


def run(fn, q, k, v, end, dout, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, end, **kw)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def assert_matches_reference(q, k, v, end, scale=None):
    dtype = q.dtype
    scale_val = 1 / math.sqrt(q.shape[2]) if scale is None else scale
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = run(tree_attention, q, k, v, end, dout, scale=scale)
    want = run(tree_attention_reference, q.float(), k.float(), v.float(), end, dout.float(), scale=scale)
    if dtype == torch.float32:
        tolerances = [1e-5 * max(1.0, w.abs().max().item()) for w in want]
    else:
        low = run(lambda *a, **kw: same_dtype_attention(*a, scale_val), q, k, v, end, dout)
        tolerances = [2 * (l.float() - w).abs().max().item() + 1e-3 for l, w in zip(low, want)]
    for name, g, w, tol in zip(["out", "dq", "dk", "dv"], got, want, tolerances):
        assert g.dtype == dtype and g.shape == w.shape, name
        err = (g.float() - w).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g} ({dtype})"


@pytest.fixture(params=[True, False], ids=["runs", "branch"])
def loop_shape(request, monkeypatch):
    """Pin the forward and dq kernels to one key-loop shape (both are autotune candidates): RUNS
    scans for runs of visible keys and streams them branch-free; branch tests every key tile."""
    ta = importlib.import_module("trace_kernels.tree_attention.triton")
    for kernel in (ta._tree_attn_fwd_kernel, ta._tree_attn_bwd_dq_kernel):
        cfg = (
            next(c for c in kernel.configs if c.kwargs["RUNS"] == request.param)
            if not ta._INTERPRET
            else kernel.configs[0]
        )
        pinned = triton.Config(
            {**cfg.kwargs, "RUNS": request.param}, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        monkeypatch.setattr(kernel, "configs", [pinned])
        monkeypatch.setattr(kernel, "cache", {})
    return request.param


# -------------------------------------------------------------------------- outputs and gradients


@pytest.mark.parametrize(
    "name, trees, heads, D, dtype",
    [
        ("deep chain of single-token nodes", [chain(45)], (2, 2), 32, torch.float32),
        ("wide fan, GQA 4:1", [fan(12, 9, [1, 3, 2, 5, 1, 1, 4, 2, 3, 1, 2, 6])], (4, 1), 16, torch.float32),
        (
            "three random trees, T not a multiple of the tile",
            [random_tree(np.random.default_rng(s), 7, 9) for s in range(3)],
            (4, 2),
            32,
            torch.float16,
        ),
        ("random tree, bf16", [random_tree(np.random.default_rng(5), 9, 8)], (2, 1), 16, torch.bfloat16),
        ("head_dim 64", [fan(3, 20, [11, 7, 13])], (2, 2), 64, torch.float32),
        ("head_dim 24 (padded to 32)", [random_tree(np.random.default_rng(7), 6, 6)], (2, 1), 24, torch.float32),
    ],
)
def test_matches_reference(name, trees, heads, D, dtype, loop_shape):
    end = end_of(packed_forest(trees))
    q, k, v = make_qkv(end.shape[0], *heads, D, dtype)
    assert_matches_reference(q, k, v, end)


@pytest.mark.parametrize(
    "name, trees",
    [
        # sibling gaps of 16 keys, shorter than a 32-key tile: a tile overhanging its run's end
        # reaches the next run's keys and must not count them twice
        ("gaps shorter than a tile", [fan(5, 20, [16, 16, 16, 16, 16]), random_tree(np.random.default_rng(9), 12, 16)]),
        # 8 siblings of 40 keys before the last one: the scan window (64 keys here) finds nothing
        ("gaps longer than the scan window", [fan(9, 23, [40] * 9), chain(3, 17)]),
        ("deep tree, path of many ranges", [random_tree(np.random.default_rng(4), 40, 6)]),
    ],
)
def test_visible_runs_match_reference(name, trees, loop_shape):
    end = end_of(packed_forest(trees))
    q, k, v = make_qkv(end.shape[0], 2, 1, 16, torch.float32, seed=6)
    assert_matches_reference(q, k, v, end)


def test_gpu_tile_sizes(monkeypatch):
    """The GPU's own tiles (head_dim 128 bucket's first configs: 128 x 64 run-scanning forward / dq
    with a 64-block scan window, 16 x 128 dk/dv) on an agent-shaped tree of ~1.5k tokens; the other
    tests use small interpreter tiles."""
    ta = importlib.import_module("trace_kernels.tree_attention.triton")
    for name, kernel in (
        ("fwd", ta._tree_attn_fwd_kernel),
        ("dq", ta._tree_attn_bwd_dq_kernel),
        ("dkdv", ta._tree_attn_bwd_dkdv_kernel),
    ):
        cfg = ta._config(name, ta._SHAPES[name][128][0])
        stages = 1 if ta._INTERPRET else cfg.num_stages  # on a GPU: the real, pipelined config
        monkeypatch.setattr(kernel, "configs", [triton.Config(cfg.kwargs, num_warps=cfg.num_warps, num_stages=stages)])
        monkeypatch.setattr(kernel, "cache", {})
    end = end_of(packed_forest([fan(3, 300, [200, 170, 230]), random_tree(np.random.default_rng(1), 30, 40)]))
    q, k, v = make_qkv(end.shape[0], 4, 2, 32, torch.float32)
    assert_matches_reference(q, k, v, end)


def test_head_dim_128_fp16_and_custom_scale():
    end = end_of(packed_forest([fan(2, 6, [5, 9])]))
    q, k, v = make_qkv(end.shape[0], 2, 1, 128, torch.float16, seed=3)
    assert_matches_reference(q, k, v, end, scale=0.05)


def test_strided_views_match_contiguous():
    """transformers hands [1, H, T, D] tensors; their [T, H, D] views are strided, not copied."""
    end = end_of(packed_forest([random_tree(np.random.default_rng(11), 6, 7)]))
    T = end.shape[0]
    q, k, v = make_qkv(T, 2, 1, 16, torch.float32, seed=4)
    views = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v)]
    assert not views[0].is_contiguous()
    dout = torch.randn(T, 2, 16, device=DEVICE)
    for got, want in zip(run(tree_attention, *views, end, dout), run(tree_attention, q, k, v, end, dout)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_reference_equals_causal_attention_on_each_leaf_path():
    """Independent check of the visibility rule: every leaf path, unpacked, run with causal SDPA."""
    packed = packed_forest([random_tree(np.random.default_rng(2), 8, 5), chain(3, 2)])
    end = torch.as_tensor(packed.end)
    q, k, v = (x.cpu() for x in make_qkv(end.shape[0], 2, 2, 16, torch.float32))
    out = tree_attention_reference(q, k, v, end)
    offsets, index = packed.leaf_token_index()
    for leaf in range(packed.num_leaves):
        idx = torch.as_tensor(index[offsets[leaf] : offsets[leaf + 1]])
        qs, ks, vs = (x[idx].transpose(0, 1) for x in (q, k, v))
        leaf_out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[idx], leaf_out, rtol=1e-5, atol=1e-5)


def test_independent_ranges_are_the_trees():
    lens = [random_tree(np.random.default_rng(s), 5, 4) for s in range(3)]
    packed = packed_forest([*lens, chain(4, 3)])
    starts, stops = independent_ranges(torch.as_tensor(packed.end))
    sizes = [sum(tree[1]) for tree in [*lens, chain(4, 3)]]
    assert stops.tolist() == np.cumsum(sizes).tolist() and starts.tolist() == [0, *np.cumsum(sizes)[:-1]]
    # no visible pair crosses a range: the dense mask is block diagonal over them
    mask = tree_visibility_mask(torch.as_tensor(packed.end))
    for a, b in zip(starts.tolist(), stops.tolist()):
        assert not mask[a:b, :a].any() and not mask[b:, a:b].any()


@pytest.mark.parametrize(
    "name, trees, heads, dtype",
    [
        (
            "five random trees of unequal size, GQA 2:1",
            [random_tree(np.random.default_rng(s), 4 + s, 6) for s in range(5)],
            (4, 2),
            torch.float32,
        ),
        ("forty small chains", [chain(2, 1 + s % 4) for s in range(40)], (2, 1), torch.float32),
        ("one tree: the dense reference", [random_tree(np.random.default_rng(3), 9, 5)], (2, 2), torch.float32),
        (
            "one long tree among small ones: the dense reference",
            [chain(30, 4), chain(2, 1), chain(2, 2)],
            (2, 2),
            torch.float32,
        ),
        ("eight trees, bf16", [fan(3, 5, [2, 3, 1]) for _ in range(8)], (2, 1), torch.bfloat16),
    ],
)
def test_cpu_path_equals_the_dense_reference(name, trees, heads, dtype, monkeypatch):
    """tree_attention_torch (what CPU training runs) against the dense oracle: values and gradients."""
    end = torch.as_tensor(packed_forest(trees).end)
    q, k, v = (x.cpu() for x in make_qkv(end.shape[0], *heads, 16, dtype))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    module = importlib.import_module("trace_kernels.tree_attention.cpu")
    dense_calls = []
    monkeypatch.setattr(
        module, "tree_attention_reference", lambda *a, **kw: dense_calls.append(1) or tree_attention_reference(*a, **kw)
    )
    got = run(tree_attention_torch, q, k, v, end, dout)
    assert bool(dense_calls) == ("dense reference" in name)  # the batched path runs where it saves work
    want = run(tree_attention_reference, q, k, v, end, dout)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for what, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert g.dtype == dtype, what
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=lambda m, what=what: f"{name}: {what}: {m}")


def test_cpu_path_is_the_cpu_backend():
    end = torch.as_tensor(packed_forest([chain(3, 2), chain(2, 3)]).end)
    q, k, v = (x.cpu() for x in make_qkv(end.shape[0], 2, 1, 16, torch.float32))
    for backend in ("cpu", "reference"):  # "reference": the old name, still accepted
        torch.testing.assert_close(
            tree_attention(q, k, v, end, backend=backend), tree_attention_torch(q, k, v, end), rtol=0, atol=0
        )


# -------------------------------------------------------------------------- block skipping


def test_block_skip_metadata_is_exact():
    end = torch.as_tensor(packed_forest([random_tree(np.random.default_rng(3), 30, 9), chain(4, 5)]).end)
    kv_max_end, first_kv = block_skip_metadata(end)
    T = end.shape[0]
    for b in range(kv_max_end.shape[0]):
        assert kv_max_end[b] == end[b * 16 : (b + 1) * 16].max()
        # the first 16-block containing a key that any query of block b (i >= 16 b) could see
        visible_start = next(j for j in range(T) if end[j] > 16 * b)
        assert first_kv[b] == visible_start // 16


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # branch A's rows, on purpose
def test_invisible_key_tiles_are_never_read(loop_shape):
    """Keys of a sibling branch carry NaN. Queries of the other branch stay finite only if the
    kernels skip those key tiles instead of loading and masking them (a masked NaN still poisons
    p @ v). Segments are aligned to the largest tile so whole tiles belong to one branch."""
    seg = 128 if HAS_CUDA else 32
    packed = packed_forest([fan(2, seg, [seg, seg])])  # prefix [0, seg), branch A, branch B
    end = end_of(packed)
    q, k, v = make_qkv(3 * seg, 2, 1, 16, torch.float32)
    k[seg : 2 * seg] = float("nan")
    v[seg : 2 * seg] = float("nan")
    out, dq, dk, dv = run(tree_attention, q, k, v, end, torch.ones_like(q))
    branch_b = slice(2 * seg, 3 * seg)
    assert out[seg : 2 * seg].isnan().all()  # branch A reads its own NaN keys: the poison works
    for name, t in [("out", out), ("dq", dq), ("dk", dk), ("dv", dv)]:
        assert torch.isfinite(t[branch_b]).all(), f"{name} of branch B touched branch A's key tiles"


# -------------------------------------------------------------------------- errors


def _valid_inputs(T=5):
    q, k, v = make_qkv(T, 2, 1, 16, torch.float32)
    end = torch.full((T,), T, dtype=torch.int32, device=DEVICE)
    return q, k, v, end


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v, e: (q[0], k, v, e), ValueError, r"q must have shape \[T, heads, head_dim\]"),
        (lambda q, k, v, e: (q.double(), k, v, e), TypeError, "q has dtype torch.float64"),
        (lambda q, k, v, e: (q, k.half(), v, e), TypeError, "share one dtype"),
        (lambda q, k, v, e: (q, k, v[:, :, :8], e), ValueError, "k and v must have the same shape"),
        (lambda q, k, v, e: (q, k[:4], v[:4], e), ValueError, "k has 4 tokens but q has 5"),
        (lambda q, k, v, e: (q, k[..., :8], v[..., :8], e), ValueError, "k has head_dim 8 but q has 16"),
        (
            lambda q, k, v, e: (q[:, :1].expand(5, 3, 16), k.expand(5, 2, 16), v.expand(5, 2, 16), e),
            ValueError,
            r"multiple of k's heads",
        ),
        (lambda q, k, v, e: (q, k, v, e[:4]), ValueError, r"end must have shape \[T\] = \[5\]"),
        (lambda q, k, v, e: (q, k, v, e.float()), TypeError, "end must be int32"),
        (lambda q, k, v, e: (q, k, v, e.tolist()), TypeError, "end must be a torch.Tensor"),
        (
            lambda q, k, v, e: (q, k, v, torch.tensor([5, 5, 2, 5, 5], dtype=torch.int32, device=e.device)),
            ValueError,
            r"end\[2\] = 2 must be > 2",
        ),
        (
            lambda q, k, v, e: (q, k, v, torch.tensor([5, 5, 5, 9, 5], dtype=torch.int32, device=e.device)),
            ValueError,
            r"end\[3\] = 9 is out of range \(> T = 5\)",
        ),
        (
            lambda q, k, v, e: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, e),
            ValueError,
            "q must have unit stride along head_dim",
        ),
        (lambda q, k, v, e: (q[:0], k[:0], v[:0], e[:0]), ValueError, r"q has no tokens"),
        (lambda q, k, v, e: (q, k, v, e.cpu() if e.is_cuda else e.to("meta")), ValueError, "one device"),
    ],
)
def test_bad_input_raises_clear_error(mutate, error, match):
    args = mutate(*_valid_inputs())
    with pytest.raises(error, match=match):
        tree_attention(*args)


def test_head_dim_above_kernel_limit_is_rejected():
    q, k, v = make_qkv(3, 1, 1, 320, torch.float32)
    end = torch.full((3,), 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 320 is larger than the kernel's maximum 256"):
        tree_attention(q, k, v, end)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_head_dim_and_scale_are_validated(backend):
    # issue 19: head_dim 0 raised ZeroDivisionError; a NaN or negative scale was accepted
    q, k, v = (torch.zeros(3, 1, 0, device=DEVICE) for _ in range(3))
    end = torch.full((3,), 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim must be >= 1, got q of shape \(3, 1, 0\)"):
        tree_attention(q, k, v, end, backend=backend)
    q, k, v = make_qkv(3, 1, 1, 8, torch.float32)
    for scale in (float("nan"), -0.5, 0.0, float("inf")):
        with pytest.raises(ValueError, match=f"scale must be finite and > 0 .*got {scale}"):
            tree_attention(q, k, v, end, scale=scale, backend=backend)
    for scale in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="scale must be a real number or None"):
            tree_attention(q, k, v, end, scale=scale, backend=backend)
    tree_attention(q, k, v, end, scale=2, backend=backend)  # an int is a real scale


def overflow_case(copies: int):
    """Two kinds of trees (a fork 0-1-2 -> {3, 4}, and chains of 3) with scores that overflow fp32:
    row 3 sees key 3 at +inf; row 4 has -inf on its own key, finite scores on keys 0..2, and key 3
    at +inf but not visible to it; row 5 (the first token of a chain) sees only its own key, at -inf."""
    ends = [5, 5, 5, 4, 5] + [5 + 3 * c + 3 for c in range(copies) for _ in range(3)]
    q, k, v = make_qkv(len(ends), 2, 2, 8, torch.float32, seed=3)
    for t in (q, k):
        t[:, :, 0] = 0.0
    big = 1e20  # squared beyond fp32's max
    q[3, :, 0], k[3, :, 0] = big, big
    q[4, :, 0], k[4, :, 0] = big, -big
    q[5, :, 0], k[5, :, 0] = big, -big
    return q, k, v, torch.tensor(ends, dtype=torch.int32, device=DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows, as intended
@pytest.mark.parametrize("copies", [1, 4])  # 1: the CPU path's dense branch; 4: its padded batch of trees
def test_overflowing_scores_give_the_same_result_on_both_backends(copies):
    # issue 19: the Triton path gave 0 where the CPU path gave NaN. Now both: NaN for a row with a +inf
    # score or only -inf scores (output and gradients), weight 0 for a -inf among finite scores, and
    # keys a row does not see never affect it.
    q, k, v, end = overflow_case(copies)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {
        "triton": run(tree_attention, q, k, v, end, dout, backend="triton"),
        "cpu": run(tree_attention_torch, q, k, v, end, dout),
        "reference": run(tree_attention_reference, q, k, v, end, dout),
    }
    out, dq, dk, dv = results["triton"]
    nan_rows = lambda x: torch.isnan(x).flatten(1).any(1).nonzero().flatten().tolist()
    assert nan_rows(out) == [3, 5] and nan_rows(dq) == [3, 5]
    assert nan_rows(dk) == nan_rows(dv) == [0, 1, 2, 3, 5]  # the keys rows 3 and 5 see, nothing else
    # row 4 is the softmax over keys 0..2: key 4's -inf weighs 0, invisible key 3's +inf is ignored
    visible = [0, 1, 2]
    scores = torch.einsum("hd,khd->hk", q[4], k[visible]) / math.sqrt(8)
    want = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v[visible])
    torch.testing.assert_close(out[4], want, rtol=1e-5, atol=1e-5)
    for name in ("cpu", "reference"):
        for got, expected in zip(results[name], results["triton"]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True)


# -------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_agent_tree_matches_reference(dtype):
    """The bf16 / fp16 speed path at a realistic shape: prefix 1024, 4 branches of 256, D=128, GQA."""
    end = end_of(packed_forest([fan(4, 1024, [256] * 4), fan(2, 300, [77, 130])]))
    q, k, v = make_qkv(end.shape[0], 8, 2, 128, dtype)
    assert_matches_reference(q, k, v, end)


@pytest.mark.gpu
def test_gpu_new_lengths_do_not_recompile():
    def compiled_variants():
        from trace_kernels.tree_attention.triton import _tree_attn_fwd_kernel

        caches = getattr(_tree_attn_fwd_kernel.fn, "device_caches", None)
        if caches is None:
            pytest.skip("this triton version keeps its kernel cache elsewhere")
        return sum(len(entry[0]) for entry in caches.values())

    counts = []
    for T in (1000, 1013, 1500, 2047):
        end = end_of(packed_forest([fan(3, T - 300, [100, 100, 100])]))
        q, k, v = make_qkv(T, 4, 4, 64, torch.bfloat16)
        tree_attention(q, k, v, end)
        counts.append(compiled_variants())
    assert counts[1:] == counts[:-1], f"compiled variants grew with T: {counts}"
