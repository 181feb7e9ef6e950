"""Shared-prefix decode attention: Triton kernel (interpreter on CPU), the CPU path and the torch cascade
vs the per-branch oracle (naive.py) on random trees of the paged KV cache.

The kernel tests build the cache and the queries on DEVICE, so on a GPU machine they run the
compiled kernel (which computes fp16 / bf16 dot products in that dtype; see `kernel_tolerance`)."""

from __future__ import annotations

import random

import pytest
import torch

from trace_core.rollout.kv_cache import PagedTreeKVCache
from trace_kernels._runtime import interpreter_enabled
from trace_kernels.tree_decode import build_tree_decode_meta, choose_split_tokens, tree_decode_attention
from trace_kernels.tree_decode.cpu import tree_decode_attention_cascade
from trace_kernels.tree_decode.naive import tree_decode_attention_reference, tree_decode_attention_same_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def kernel_tolerance(q, k_pool, v_pool, meta, expected) -> float:
    """Max abs error the kernel may have against the fp32 reference `expected`.

    In fp32, and in every dtype under the interpreter, the kernel computes in fp32 and only rounds
    its output: TOL. A GPU kernel in fp16 / bf16 feeds its dot products that dtype (p is rounded
    before p @ v), so it may be off by twice what the same math carried out in that dtype is off."""
    if q.dtype == torch.float32 or interpreter_enabled():
        return TOL[q.dtype]
    low = tree_decode_attention_same_dtype(q, k_pool, v_pool, meta)
    return TOL[q.dtype] + 2 * (low.float() - expected).abs().max().item()


def _random_tree(seed, *, kv_heads, head_dim, page_size, depth=3, dtype=torch.float32, device="cpu"):
    """A random prefix tree of depth >= `depth` with segments of random lengths; returns (cache, leaves)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = PagedTreeKVCache(
        num_layers=1,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_pages=256,
        page_size=page_size,
        dtype=dtype,
        device=device,
    )

    def fill(node, n):
        k = torch.randn(1, n, kv_heads, head_dim, generator=gen).to(device, dtype)
        cache.append(node, k, torch.randn(1, n, kv_heads, head_dim, generator=gen).to(device, dtype))

    root = cache.new_root()
    fill(root, rng.randint(1, 2 * page_size + 3))
    frontier, leaves = [root], []
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for _ in range(rng.randint(1, 3)):
                child = cache.fork(node)
                fill(child, rng.randint(1, page_size + 5))
                nxt.append(child)
        frontier = nxt
    leaves = frontier
    # a leaf that branches right at a page boundary and one sibling left empty so far
    extra = cache.fork(rng.choice(frontier[:-1] or frontier))
    fill(extra, page_size)
    leaves = [u for u in leaves if not cache.children(u)] + [extra]
    return cache, leaves


@pytest.mark.parametrize(
    "dtype, q_heads, kv_heads, head_dim, page_size",
    [
        (torch.float32, 4, 4, 16, 4),
        (torch.float32, 6, 2, 32, 16),
        (torch.float16, 4, 2, 16, 8),
        (torch.bfloat16, 6, 2, 32, 16),
    ],
)
def test_kernel_matches_reference_on_random_trees(dtype, q_heads, kv_heads, head_dim, page_size):
    cache, leaves = _random_tree(
        q_heads * 100 + page_size, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype, device=DEVICE
    )
    assert max(len(cache.path(u)) for u in leaves) >= 4  # depth >= 3 below the root
    assert len({cache.seq_len(u) for u in leaves}) > 1  # branches of different lengths
    meta = cache.decode_meta(leaves, block_q=8)
    q = torch.randn(len(leaves), q_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    k_pool, v_pool = cache.k_pools[0], cache.v_pools[0]
    expected = tree_decode_attention_reference(q.float(), k_pool.float(), v_pool.float(), meta)
    got = tree_decode_attention(q, k_pool, v_pool, meta, backend="triton")
    assert got.dtype == dtype and got.shape == q.shape
    atol = kernel_tolerance(q, k_pool, v_pool, meta, expected)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=atol)
    # the reference in the input dtype agrees too (it upcasts internally)
    torch.testing.assert_close(
        tree_decode_attention_reference(q, k_pool, v_pool, meta).float(), expected, rtol=0, atol=TOL[dtype]
    )


def test_cpu_backend_is_the_per_branch_math():
    cache, leaves = _random_tree(5, kv_heads=2, head_dim=8, page_size=4, depth=2)
    meta = cache.decode_meta(leaves)
    q = torch.randn(len(leaves), 4, 8)
    k_pool, v_pool = cache.k_pools[0], cache.v_pools[0]
    for backend in ("cpu", "reference"):  # "reference": the old name, still accepted
        torch.testing.assert_close(
            tree_decode_attention(q, k_pool, v_pool, meta, scale=0.3, backend=backend),
            tree_decode_attention_reference(q, k_pool, v_pool, meta, 0.3),
            rtol=0,
            atol=0,
        )


def test_cascade_torch_matches_reference():
    cache, leaves = _random_tree(7, kv_heads=2, head_dim=8, page_size=3, depth=4)
    meta = cache.decode_meta(leaves)
    q = torch.randn(len(leaves), 4, 8)
    torch.testing.assert_close(
        tree_decode_attention_cascade(q, cache.k_pools[0], cache.v_pools[0], meta),
        tree_decode_attention_reference(q, cache.k_pools[0], cache.v_pools[0], meta),
        rtol=0,
        atol=1e-5,
    )
    # the shared kernel reads each segment once per tile, the baseline once per branch
    assert meta.keys_read_shared() < meta.keys_read_per_branch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_branch_alone_equals_branch_among_64_siblings(dtype):
    kv_heads, head_dim = 1, 16
    cache = PagedTreeKVCache(
        num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_pages=200, page_size=16, dtype=dtype, device=DEVICE
    )
    gen = torch.Generator().manual_seed(0)
    root = cache.new_root()
    cache.append(
        root,
        torch.randn(1, 70, 1, head_dim, generator=gen).to(DEVICE, dtype),
        torch.randn(1, 70, 1, head_dim, generator=gen).to(DEVICE, dtype),
    )
    leaves = []
    for i in range(64):
        leaf = cache.fork(root)
        n = 1 + i % 5
        cache.append(
            leaf,
            torch.randn(1, n, 1, head_dim, generator=gen).to(DEVICE, dtype),
            torch.randn(1, n, 1, head_dim, generator=gen).to(DEVICE, dtype),
        )
        leaves.append(leaf)
    q = torch.randn(64, 2, head_dim, generator=gen).to(DEVICE, dtype)
    shared = tree_decode_attention(q, cache.k_pools[0], cache.v_pools[0], cache.decode_meta(leaves), backend="triton")
    for b in (0, 37):
        alone = tree_decode_attention(
            q[b : b + 1], cache.k_pools[0], cache.v_pools[0], cache.decode_meta([leaves[b]]), backend="triton"
        )
        torch.testing.assert_close(alone.float(), shared[b : b + 1].float(), rtol=0, atol=1e-6)


def test_bad_inputs_name_the_argument():
    cache, leaves = _random_tree(3, kv_heads=2, head_dim=8, page_size=4, depth=2)
    meta = cache.decode_meta(leaves)
    k, v = cache.k_pools[0], cache.v_pools[0]
    with pytest.raises(ValueError, match="q: 3 query heads is not a multiple of 2"):
        tree_decode_attention(torch.randn(len(leaves), 3, 8), k, v, meta)
    with pytest.raises(ValueError, match=r"q: .* queries but meta"):
        tree_decode_attention(torch.randn(len(leaves) + 1, 2, 8), k, v, meta)
    with pytest.raises(ValueError, match="v_pool"):
        tree_decode_attention(torch.randn(len(leaves), 2, 8), k, v[:2], meta)
    with pytest.raises(ValueError, match="dtypes differ"):
        tree_decode_attention(torch.randn(len(leaves), 2, 8).half(), k, v, meta)
    with pytest.raises(ValueError, match=r"query_segments\[0\]: the query has no keys"):
        build_tree_decode_meta([([], 0)], [[0]], page_size=4)
    with pytest.raises(ValueError, match="block_q"):
        build_tree_decode_meta([([0], 1)], [[0]], page_size=4, block_q=3)


# -------------------------------------------------------------------------- split-KV chunks


@pytest.mark.parametrize("split_tokens", [4, 8])
def test_split_segments_give_the_same_attention(split_tokens):
    """Chunking segments (split-KV) changes only which program reads which keys, never the result."""
    cache, leaves = _random_tree(21, kv_heads=2, head_dim=16, page_size=4, depth=3, device=DEVICE)
    whole = cache.decode_meta(leaves, block_q=4, split_tokens=None)
    split = cache.decode_meta(leaves, block_q=4, split_tokens=split_tokens)
    assert split.seg_len.numel() > whole.seg_len.numel()  # some segment really was cut
    assert int(split.seg_len.max()) <= split_tokens
    assert int(split.seg_len.sum()) == int(whole.seg_len.sum())  # the same keys, each in one chunk
    assert split.keys_read_shared() == whole.keys_read_shared()  # still read once per tile of queries
    q = torch.randn(len(leaves), 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    k_pool, v_pool = cache.k_pools[0], cache.v_pools[0]
    expected = tree_decode_attention_reference(q, k_pool, v_pool, whole)
    for meta in (whole, split):
        got = tree_decode_attention(q, k_pool, v_pool, meta, backend="triton")
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL[torch.float32])
    torch.testing.assert_close(
        tree_decode_attention_cascade(q, k_pool, v_pool, split), expected, rtol=0, atol=TOL[torch.float32]
    )


def test_choose_split_tokens_fills_the_gpu_and_no_more():
    # one 8192-token prefix read by 4 branches (one query tile), 2 kv heads: 2 programs unsplit
    lens, users = [8192, 256, 256, 256, 256], [4, 1, 1, 1, 1]
    programs = lambda c: 2 * sum(-(-n // c) for n in lens)
    split = choose_split_tokens(lens, users, block_q=16, kv_heads=2, page_size=16, target_programs=40)
    assert split == 512 and programs(512) >= 40 > programs(1024)  # the largest chunk that fills the GPU
    # a GPU too large to fill: the smallest chunk allowed
    assert choose_split_tokens(lens, users, block_q=16, kv_heads=2, page_size=16, target_programs=264) == 256
    # enough work already: keep segments whole
    assert (
        choose_split_tokens([512] * 200, [1] * 200, block_q=16, kv_heads=2, page_size=16, target_programs=264) is None
    )
    # never below min_tokens, even when the GPU cannot be filled
    assert choose_split_tokens([1024], [1], block_q=16, kv_heads=1, page_size=16, target_programs=10_000) == 256


def test_split_tokens_must_be_whole_pages():
    with pytest.raises(ValueError, match=r"split_tokens: must be a positive multiple of page_size \(4\)"):
        build_tree_decode_meta([([0, 1], 8)], [[0]], page_size=4, split_tokens=6)
    cache, leaves = _random_tree(3, kv_heads=2, head_dim=8, page_size=4, depth=2)
    with pytest.raises(ValueError, match='split_tokens: must be an int, None or "auto"'):
        cache.decode_meta(leaves, split_tokens="always")
