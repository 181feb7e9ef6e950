"""Paged tree KV cache: the K/V of many generation branches that share prefixes, stored once.

Layout. Per layer one K pool and one V pool of shape [num_pages, page_size, num_kv_heads, head_dim]
(`k_pools[layer]`, `v_pools[layer]`). A *node* is one segment of tokens (a prompt, a turn, ...); it
owns a list of pages filled in order, and has a parent whose tokens come before its own. A
sequence is the path root -> node: its K/V are its ancestors' pages followed by its own.

Forking. `fork(node)` makes a child that shares every ancestor page by reference: O(1), nothing
is copied or recomputed. **Children always start on a fresh page**: the parent's partially filled
last page is never written by a child (no copy-on-write is needed; the cost is at most one
partially empty page per node). A node that has children is *frozen*: appending to it would change
the prefix its children see, so it raises.

Lifetime. Each node has a reference count = live children + handles held by the user (`fork`
and `new_root` return a node with one handle). `release(node)` drops a handle; a node whose count
reaches zero returns its pages to the free list and releases its parent in turn, so a branch's
exclusive tail is reclaimed while shared prefixes stay. `free_subtree(node)` drops a whole subtree
(every handle below it included) at once.

Writing K/V is two steps, because a model computes K/V layer by layer: `reserve(node, n)` claims
slots for n new tokens (allocating pages, raising `CacheCapacityError` before anything changes if
the pool is short) and returns their flat slot ids (page * page_size + offset); `write(layer, slots,
k, v)` stores a layer's K/V there. `append(node, k, v)` does both for all layers at once;
`reserve_many` reserves for several nodes all-or-nothing (a batch never half-allocates).

`decode_meta(leaves)` describes one shared-prefix decode step over the leaves' paths for
`trace_kernels.tree_decode_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trace_kernels.tree_decode import TreeDecodeMeta, build_tree_decode_meta, choose_split_tokens


class CacheCapacityError(RuntimeError):
    """The page pool cannot hold the requested tokens."""


def page_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes over all layers (K and V)."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class CacheUsageError(ValueError):
    """Invalid use of the cache (unknown node, frozen node, bad shapes). Names the argument."""


@dataclass
class _Node:
    parent: int  # -1 for roots
    start: int  # number of tokens before this node on its path (its first position)
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens stored in this node
    refs: int = 1  # live children + user handles
    children: set[int] = field(default_factory=set)


class PagedTreeKVCache:
    """Per-layer paged K/V pools whose pages belong to the nodes of a prefix tree (see module doc).

    num_layers, num_kv_heads, head_dim   model geometry
    num_pages, page_size                 pool size: num_pages * page_size token slots per layer
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_pages", num_pages),
            ("page_size", page_size),
        ):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise CacheUsageError(f"{name}: must be a positive integer, got {value!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._nodes: dict[int, _Node] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ tree structure
    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def new_root(self) -> int:
        """A new empty sequence (no parent); returns its node id with one handle."""
        return self._make_node(-1, 0)

    def fork(self, node: int) -> int:
        """A child of `node` sharing all of node's path pages (no copy); `node` becomes frozen.

        Returns the child's id with one handle."""
        parent = self._get(node, "node")
        child = self._make_node(node, parent.start + parent.length)
        parent.refs += 1
        parent.children.add(child)
        return child

    def parent(self, node: int) -> int:
        return self._get(node, "node").parent

    def length(self, node: int) -> int:
        """Tokens stored in `node` itself."""
        return self._get(node, "node").length

    def start(self, node: int) -> int:
        """Tokens on the path before `node` (= position of node's first token)."""
        return self._get(node, "node").start

    def seq_len(self, node: int) -> int:
        """Tokens on the whole path root -> node."""
        n = self._get(node, "node")
        return n.start + n.length

    def pages(self, node: int) -> list[int]:
        """Pages owned by `node`, in token order (a copy)."""
        return list(self._get(node, "node").pages)

    def path(self, node: int) -> list[int]:
        """Node ids from the root down to `node`."""
        self._get(node, "node")
        out = []
        while node >= 0:
            out.append(node)
            node = self._nodes[node].parent
        return out[::-1]

    def children(self, node: int) -> list[int]:
        return sorted(self._get(node, "node").children)

    def __contains__(self, node: int) -> bool:
        return node in self._nodes

    # ------------------------------------------------------------------ writing
    def reserve(self, node: int, num_tokens: int) -> torch.Tensor:
        """Claim slots for `num_tokens` new tokens at the end of `node`; returns [num_tokens] int64
        flat slot ids (page * page_size + offset). Raises before changing anything if the pool is short."""
        n = self._get(node, "node")
        if n.children:
            raise CacheUsageError(
                f"node: node {node} has children {sorted(n.children)}; its tokens are their "
                "prefix, so it is frozen (fork a new child to continue)"
            )
        if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
            raise CacheUsageError(f"num_tokens: must be a non-negative integer, got {num_tokens!r}")
        capacity = len(n.pages) * self.page_size
        new_pages = max(0, -(-(n.length + num_tokens - capacity) // self.page_size))
        if new_pages > len(self._free_pages):
            raise CacheCapacityError(
                f"KV cache out of pages: node {node} needs {new_pages} new page(s) of {self.page_size} tokens "
                f"for {num_tokens} token(s), but only {len(self._free_pages)} of {self.num_pages} pages are free; "
                "release finished branches or build the cache with more num_pages"
            )
        for _ in range(new_pages):
            n.pages.append(self._free_pages.pop())
        positions = np.arange(n.length, n.length + num_tokens)
        page_ids = np.asarray(n.pages, dtype=np.int64)[positions // self.page_size] if num_tokens else positions
        n.length += int(num_tokens)
        return torch.as_tensor(page_ids * self.page_size + positions % self.page_size, dtype=torch.int64)

    def pages_needed(self, node: int, num_tokens: int) -> int:
        """New pages `reserve(node, num_tokens)` would take."""
        n = self._get(node, "node")
        return max(0, -(-(n.length + num_tokens - len(n.pages) * self.page_size) // self.page_size))

    def reserve_many(self, nodes, counts) -> list[torch.Tensor]:
        """`reserve` for several distinct nodes, all or nothing (capacity is checked up front)."""
        nodes, counts = list(nodes), list(counts)
        if len(set(nodes)) != len(nodes) or len(nodes) != len(counts):
            raise CacheUsageError("nodes: must be distinct, one count each")
        needed = sum(self.pages_needed(u, c) for u, c in zip(nodes, counts))
        if needed > len(self._free_pages):
            raise CacheCapacityError(
                f"KV cache out of pages: {len(nodes)} node(s) need {needed} new page(s) of {self.page_size} tokens, "
                f"but only {len(self._free_pages)} of {self.num_pages} pages are free; "
                "release finished branches or build the cache with more num_pages"
            )
        for u in nodes:
            n = self._nodes[int(u)]
            if n.children:
                raise CacheUsageError(f"nodes: node {u} has children; it is frozen")
        return [self.reserve(u, c) for u, c in zip(nodes, counts)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's K/V ([n, num_kv_heads, head_dim] each) at `slots` ([n], from `reserve`)."""
        if not 0 <= layer < self.num_layers:
            raise CacheUsageError(f"layer: {layer} is outside 0..{self.num_layers - 1}")
        expected = (slots.numel(), self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise CacheUsageError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
        slots = slots.to(self.k_pools[layer].device)
        self.k_pools[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, slots, k.to(self.k_pools[layer].dtype)
        )
        self.v_pools[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, slots, v.to(self.v_pools[layer].dtype)
        )

    def append(self, node: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append tokens to `node` for every layer: k, v [num_layers, n, num_kv_heads, head_dim].
        Returns the slot ids used."""
        if k.dim() != 4 or k.shape[0] != self.num_layers:
            raise CacheUsageError(
                f"k: expected [num_layers={self.num_layers}, n, heads, head_dim], got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise CacheUsageError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
        expected = (self.num_kv_heads, self.head_dim)
        if tuple(k.shape[2:]) != expected:
            raise CacheUsageError(f"k: heads/head_dim {tuple(k.shape[2:])} differ from the cache's {expected}")
        slots = self.reserve(node, int(k.shape[1]))
        for layer in range(self.num_layers):
            self.write(layer, slots, k[layer], v[layer])
        return slots

    # ------------------------------------------------------------------ reading
    def path_slots(self, node: int) -> torch.Tensor:
        """[seq_len(node)] int64 flat slot ids of the whole path, in token order."""
        parts = []
        for u in self.path(node):
            n = self._nodes[u]
            pos = np.arange(n.length)
            parts.append(
                np.asarray(n.pages, dtype=np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size
                if n.length
                else np.zeros(0, np.int64)
            )
        return torch.as_tensor(np.concatenate(parts), dtype=torch.int64)

    def gather(self, layer: int, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The path's K and V for one layer, each [seq_len, num_kv_heads, head_dim] (a copy)."""
        slots = self.path_slots(node).to(self.k_pools[layer].device)
        flat_k = self.k_pools[layer].view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.v_pools[layer].view(-1, self.num_kv_heads, self.head_dim)
        return flat_k[slots], flat_v[slots]

    @property
    def nbytes(self) -> int:
        """Bytes the K and V pools of every layer hold."""
        return sum(pool.numel() * pool.element_size() for pool in self.k_pools + self.v_pools)

    def decode_meta(self, leaves, *, block_q: int = 16, split_tokens: int | str | None = "auto") -> TreeDecodeMeta:
        """Metadata for one shared-prefix decode step whose query b sits at the end of `leaves[b]`
        (every node on the leaves' paths is one segment, listed once however many leaves share it).

        split_tokens: chunk long segments so a few branches over a long prefix still fill the GPU
        (see trace_kernels.tree_decode.meta); "auto" picks the chunk on CUDA (2 programs per SM)
        and keeps segments whole on CPU; None never splits.
        """
        index: dict[int, int] = {}
        segments, query_segments = [], []
        for leaf in leaves:
            path = []
            for u in self.path(leaf):
                if u not in index:
                    index[u] = len(segments)
                    segments.append((self._nodes[u].pages, self._nodes[u].length))
                path.append(index[u])
            query_segments.append(path)
        device = self.k_pools[0].device
        if split_tokens == "auto":
            split_tokens = None
            if device.type == "cuda":
                users = [0] * len(segments)
                for path in query_segments:
                    for s in path:
                        users[s] += 1
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                split_tokens = choose_split_tokens(
                    [n for _, n in segments],
                    users,
                    block_q=block_q,
                    kv_heads=self.num_kv_heads,
                    page_size=self.page_size,
                    target_programs=2 * sms,
                )
        elif isinstance(split_tokens, str):
            raise ValueError(f'split_tokens: must be an int, None or "auto", got {split_tokens!r}')
        return build_tree_decode_meta(
            segments,
            query_segments,
            page_size=self.page_size,
            block_q=block_q,
            split_tokens=split_tokens,
            device=device,
        )

    # ------------------------------------------------------------------ freeing
    def release(self, node: int) -> None:
        """Drop one handle on `node`; nodes left without handles or children return their pages."""
        n = self._get(node, "node")
        if n.refs - len(n.children) <= 0:
            raise CacheUsageError(
                f"node: node {node} holds no handle to release (it is kept alive by its children {sorted(n.children)})"
            )
        self._decref(node)

    def free_subtree(self, node: int) -> int:
        """Free `node` and all its descendants, whatever handles they hold; returns pages returned.

        The parent of `node` loses one child reference (and is reclaimed if that was its last)."""
        self._get(node, "node")
        before = len(self._free_pages)
        stack, order = [node], []
        while stack:
            u = stack.pop()
            order.append(u)
            stack.extend(self._nodes[u].children)
        parent = self._nodes[node].parent
        for u in order:
            self._free_pages.extend(reversed(self._nodes.pop(u).pages))
        if parent >= 0:
            self._nodes[parent].children.discard(node)
            self._decref(parent)
        return len(self._free_pages) - before

    def _decref(self, node: int) -> None:
        while node >= 0:
            n = self._nodes[node]
            n.refs -= 1
            if n.refs > 0:
                return
            self._free_pages.extend(reversed(n.pages))
            del self._nodes[node]
            if n.parent >= 0:
                self._nodes[n.parent].children.discard(node)
            node = n.parent

    # ------------------------------------------------------------------ helpers
    def _make_node(self, parent: int, start: int) -> int:
        node = self._next_id
        self._next_id += 1
        self._nodes[node] = _Node(parent=parent, start=start)
        return node

    def _get(self, node, field: str) -> _Node:
        try:
            return self._nodes[int(node)]
        except (KeyError, TypeError, ValueError):
            raise CacheUsageError(f"{field}: node {node!r} does not exist (freed, or never created)") from None

    def check_invariants(self) -> None:
        """Every page is free or owned by exactly one node; counts add up (for tests and debugging)."""
        owned = [p for n in self._nodes.values() for p in n.pages]
        all_pages = owned + self._free_pages
        if len(all_pages) != self.num_pages or set(all_pages) != set(range(self.num_pages)):
            raise AssertionError("page accounting broken: a page is lost or owned twice")
        for u, n in self._nodes.items():
            if n.refs < len(n.children) or n.refs <= 0:
                raise AssertionError(f"node {u}: refs {n.refs} < children {len(n.children)}")
            if len(n.pages) != -(-n.length // self.page_size):
                raise AssertionError(f"node {u}: {len(n.pages)} pages for {n.length} tokens")
            if n.parent >= 0 and u not in self._nodes[n.parent].children:
                raise AssertionError(f"node {u} missing from its parent's children")
