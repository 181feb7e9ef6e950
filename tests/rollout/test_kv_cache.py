"""Paged tree KV cache: random fork/append/release/free sequences against a plain per-sequence cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_core.rollout.kv_cache import CacheCapacityError, CacheUsageError, PagedTreeKVCache

LAYERS, HEADS, DIM = 2, 2, 4


def _kv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, n, HEADS, DIM, generator=g), torch.randn(LAYERS, n, HEADS, DIM, generator=g)


class PlainCache:
    """The oracle: every live sequence keeps its own full K/V tensor; forks copy."""

    def __init__(self):
        self.k, self.v, self.handles, self.parent, self.children = {}, {}, {}, {}, {}

    def add(self, node, parent):
        empty = torch.zeros(LAYERS, 0, HEADS, DIM)
        self.k[node] = self.k[parent].clone() if parent is not None else empty
        self.v[node] = self.v[parent].clone() if parent is not None else empty
        self.handles[node], self.parent[node], self.children[node] = 1, parent, set()
        if parent is not None:
            self.children[parent].add(node)

    def append(self, node, k, v):
        self.k[node] = torch.cat([self.k[node], k], 1)
        self.v[node] = torch.cat([self.v[node], v], 1)

    def _drop(self, node):
        del self.k[node], self.v[node], self.handles[node], self.children[node]
        parent = self.parent.pop(node)
        if parent is not None:
            self.children[parent].discard(node)
        return parent

    def release(self, node):
        self.handles[node] -= 1
        while node is not None and self.handles[node] == 0 and not self.children[node]:
            node = self._drop(node)

    def free_subtree(self, node):
        stack, order = [node], []
        while stack:
            u = stack.pop()
            order.append(u)
            stack.extend(self.children[u])
        parent = self.parent[node]
        for u in reversed(order):
            self._drop(u)
        while parent is not None and self.handles[parent] == 0 and not self.children[parent]:
            parent = self._drop(parent)


ops = st.lists(
    st.tuples(
        st.sampled_from(["root", "fork", "append", "append", "release", "free"]),
        st.integers(0, 10_000),
        st.integers(0, 9),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 3, 4]))
def test_random_operations_match_plain_cache(ops, page_size):
    cache = PagedTreeKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_pages=48, page_size=page_size)
    plain = PlainCache()
    for step, (op, pick, n) in enumerate(ops):
        live = sorted(plain.k)
        if op == "root" or not live:
            plain.add(cache.new_root(), None)
            continue
        node = live[pick % len(live)]
        if op == "fork":
            plain.add(cache.fork(node), node)
        elif op == "append":
            k, v = _kv(n, seed=step)
            if plain.children[node]:
                with pytest.raises(CacheUsageError, match="frozen"):
                    cache.append(node, k, v)
                continue
            free_before = cache.free_pages
            try:
                cache.append(node, k, v)
            except CacheCapacityError:
                assert cache.free_pages == free_before  # nothing half-done
                continue
            plain.append(node, k, v)
        elif op == "release":
            if plain.handles[node] == 0:
                with pytest.raises(CacheUsageError, match="no handle"):
                    cache.release(node)
                continue
            cache.release(node)
            plain.release(node)
        else:
            cache.free_subtree(node)
            plain.free_subtree(node)
        cache.check_invariants()
        assert set(plain.k) == {u for u in plain.k if u in cache} and cache.num_nodes == len(plain.k)
        for u in plain.k:
            for layer in range(LAYERS):
                k, v = cache.gather(layer, u)
                torch.testing.assert_close(k, plain.k[u][layer], rtol=0, atol=0)
                torch.testing.assert_close(v, plain.v[u][layer], rtol=0, atol=0)
    for u in sorted(plain.k):
        if u in cache and cache.parent(u) < 0:
            cache.free_subtree(u)
    assert cache.free_pages == cache.num_pages and cache.num_nodes == 0


def test_fork_shares_pages_and_children_start_on_a_fresh_page():
    cache = PagedTreeKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_pages=8, page_size=4)
    root = cache.new_root()
    cache.append(root, *_kv(6, 0))  # 2 pages, the second half full
    used = cache.num_pages - cache.free_pages
    a, b = cache.fork(root), cache.fork(root)
    assert cache.free_pages == cache.num_pages - used  # forking copies nothing
    cache.append(a, *_kv(1, 1))
    cache.append(b, *_kv(1, 2))
    assert set(cache.pages(a)).isdisjoint(cache.pages(root)) and set(cache.pages(b)).isdisjoint(cache.pages(root))
    assert cache.start(a) == 6 and cache.seq_len(a) == 7
    assert cache.path_slots(a)[:6].tolist() == cache.path_slots(root).tolist()


def test_release_keeps_shared_prefix_until_last_branch_goes():
    cache = PagedTreeKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_pages=8, page_size=2)
    root = cache.new_root()
    cache.append(root, *_kv(4, 0))
    a = cache.fork(root)
    cache.append(a, *_kv(2, 1))
    cache.release(root)  # the prompt handle goes, the branch keeps it alive
    assert root in cache and cache.free_pages == 5
    cache.release(a)
    assert root not in cache and cache.free_pages == 8


def test_capacity_error_says_pages_available_and_asked():
    cache = PagedTreeKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=2, page_size=4)
    root = cache.new_root()
    with pytest.raises(CacheCapacityError, match=r"needs 3 new page\(s\).*only 2 of 2 pages are free"):
        cache.reserve(root, 9)
    assert cache.length(root) == 0 and cache.free_pages == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(num_layers=0), "num_layers"), (dict(num_pages=-1), "num_pages"), (dict(page_size=2.5), "page_size")],
)
def test_bad_geometry_names_the_argument(kwargs, field):
    base = dict(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=2, page_size=4) | kwargs
    with pytest.raises(CacheUsageError, match=field):
        PagedTreeKVCache(**base)


def test_bad_usage_names_the_argument():
    cache = PagedTreeKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=2, page_size=4)
    with pytest.raises(CacheUsageError, match="node: node 7 does not exist"):
        cache.fork(7)
    root = cache.new_root()
    with pytest.raises(CacheUsageError, match="k: heads/head_dim"):
        cache.append(root, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(CacheUsageError, match="num_tokens"):
        cache.reserve(root, -1)
    slots = cache.reserve(root, 2)
    with pytest.raises(CacheUsageError, match="layer"):
        cache.write(3, slots, torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))


def test_page_bytes_matches_the_pools():
    from trace_core.rollout.kv_cache import page_bytes

    for dtype in (torch.float32, torch.bfloat16):
        cache = PagedTreeKVCache(num_layers=3, num_kv_heads=2, head_dim=8, num_pages=5, page_size=4, dtype=dtype)
        pool_bytes = sum(p.numel() * p.element_size() for p in cache.k_pools + cache.v_pools)
        assert page_bytes(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4, dtype=dtype) * 5 == pool_bytes
        assert cache.nbytes == pool_bytes
