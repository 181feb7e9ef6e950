"""Pack a RolloutForest into one token sequence that a model runs in a single pass.

Nodes are laid out in DFS pre-order, each node's tokens once. A node's subtree is then one
contiguous token range, so tree attention needs a single int per key token:

    end[j] = end of the subtree range of j's node;  query i sees key j  iff  j <= i < end[j]

`position_ids` are path positions (how many tokens precede the token on its root-to-leaf path),
so RoPE sees exactly the positions of the unpacked leaf sequences. Several trees are packed one
after another; `end` is absolute, so no extra per-tree argument is needed.

Next-token labels: inside a node, row i predicts token i+1; a node's last token predicts the
first token of *every* child. Each packed token except a prompt's first has exactly one
predecessor row, giving `label_rows` / `labels` / `label_pos` (rows repeat at branch points).

`pack` is numba; `pack_reference` is the same result in plain Python (test oracle and benchmark
baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypeGuard

import numba
import numpy as np

from trace_core.forest import ROLE_MODEL, ForestError, RolloutForest, _children_csr, _leaf_paths

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike


@dataclass(frozen=True, eq=False)
class PackedTree:
    """A packed batch of rollout trees. N packed tokens, M label pairs, L leaves.

    Per packed token [N]:
      input_ids     int64   token ids
      position_ids  int64   path position (index of the token in its unpacked leaf sequences)
      end           int32   exclusive end of the token's node's subtree range (the attention rule)
      loss_mask     bool    model-generated token (observations and prompts carry no loss)
      leaf_count    int64   leaves under the token's node = how many leaf paths contain the token
      old_logprobs  float32 sampling logprob (0 on observation tokens, NaN if not recorded)
      node_of_token int64   forest node id
    Per label pair [M] (M = N - number of trees):
      label_rows    int64   packed row whose output predicts the label
      labels        int64   the predicted token id (= input_ids[label_pos])
      label_pos     int64   packed position of the predicted token
    Per forest node [n_forest] (-1 for nodes of trees that were not packed):
      node_start    int64   packed offset of the node's first token
      node_end      int64   packed offset past the node's last token
    Per tree [R]:  root_nodes int64;  tree_offsets [R+1] int64 packed token range of each tree
    Per leaf [L]:  leaf_nodes int64 (increasing node id, as RolloutForest.leaves);
                   leaf_path_offsets [L+1], leaf_path_nodes: root-to-leaf node lists (CSR)
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    end: np.ndarray
    loss_mask: np.ndarray
    leaf_count: np.ndarray
    old_logprobs: np.ndarray
    node_of_token: np.ndarray
    label_rows: np.ndarray
    labels: np.ndarray
    label_pos: np.ndarray
    node_start: np.ndarray
    node_end: np.ndarray
    root_nodes: np.ndarray
    tree_offsets: np.ndarray
    leaf_nodes: np.ndarray
    leaf_path_offsets: np.ndarray
    leaf_path_nodes: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_leaves(self) -> int:
        return int(self.leaf_nodes.size)

    @property
    def num_leaf_path_tokens(self) -> int:
        """Tokens a per-leaf trainer would run (sum of leaf sequence lengths)."""
        return int(self.leaf_count.sum())

    def leaf_token_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [L+1], index): packed positions of each leaf's unpacked sequence, as CSR.
        Size is the total leaf-path length; build it only when per-leaf views are needed."""
        return _leaf_token_index(self.leaf_path_offsets, self.leaf_path_nodes, self.node_start, self.node_end)

    def equals(self, other: PackedTree) -> bool:
        """Field-by-field equality, dtypes included (NaN equals NaN)."""
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name), equal_nan=True)
            and getattr(self, f.name).dtype == getattr(other, f.name).dtype
            for f in fields(self)
        )


def unpack(packed: PackedTree, values: ArrayLike | torch.Tensor | None = None) -> list:
    """Split a per-packed-token array (numpy, torch, or a list / tuple / other array-like, taken as
    numpy; leading dim N) into per-leaf sequences, in the order of `packed.leaf_nodes`. Default
    values: input_ids (restores the leaf token ids)."""
    if not isinstance(packed, PackedTree):
        raise TypeError(f"packed: must be a PackedTree (from pack), got {type(packed).__name__}")
    if _is_tensor(values):
        import torch

        _check_leading_size(packed, tuple(values.shape))
        offsets, index = packed.leaf_token_index()
        gathered = values[torch.as_tensor(index, device=values.device)]
        return list(torch.split(gathered, np.diff(offsets).tolist()))
    array = packed.input_ids if values is None else _numeric_array(values)
    _check_leading_size(packed, array.shape)
    offsets, index = packed.leaf_token_index()
    return np.split(array[index], offsets[1:-1])


def _is_tensor(values: object) -> TypeGuard[torch.Tensor]:
    """A torch tensor, recognised without importing torch (packing does not need it)."""
    return type(values).__module__.startswith("torch") and hasattr(values, "detach")


def _numeric_array(values: ArrayLike) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise TypeError(f"values: not a numpy array, torch tensor or regular array-like ({exc})") from None
    if array.dtype == object:
        raise TypeError("values: must hold numbers (an array-like of equal-length rows), got objects")
    return array


def _check_leading_size(packed: PackedTree, shape: tuple[int, ...]) -> None:
    if not shape:
        raise ForestError("values", f"must have a leading dimension of {packed.num_tokens} packed tokens, got a scalar")
    if shape[0] != packed.num_tokens:
        raise ForestError("values", f"has leading size {shape[0]}, expected {packed.num_tokens} packed tokens")


def _selected_roots(forest: RolloutForest, roots: ArrayLike | None) -> np.ndarray:
    if roots is None:
        return forest.roots
    roots = np.asarray(roots, dtype=np.int64).reshape(-1)
    bad = roots[(roots < 0) | (roots >= forest.num_nodes)]
    if bad.size:
        raise ForestError("roots", f"node {bad[0]} does not exist (forest has {forest.num_nodes} nodes)")
    if np.any(forest.parent[roots] >= 0):
        raise ForestError("roots", f"node {roots[forest.parent[roots] >= 0][0]} is not a root (a prompt node)")
    if np.unique(roots).size != roots.size:
        raise ForestError("roots", "lists a root more than once")
    return roots


def pack(forest: RolloutForest, roots: ArrayLike | None = None, *, validate: bool = True) -> PackedTree:
    """Pack the trees of `roots` (default: every tree, in node order) into one PackedTree."""
    if validate:
        forest.validate()
    roots = _selected_roots(forest, roots)
    out = _pack_numba(
        forest.parent,
        forest.num_children,
        forest.tok_start,
        forest.tok_end,
        forest.tokens,
        forest.role,
        forest.logprob,
        roots,
        ROLE_MODEL,
    )
    (
        input_ids,
        position_ids,
        end,
        loss_mask,
        leaf_count,
        old_logprobs,
        node_of_token,
        node_start,
        node_end,
        tree_offsets,
        leaf_nodes,
    ) = out
    label_pos, label_rows = _label_pairs(node_of_token, node_start, node_end, forest.parent)
    path_offsets, path_nodes = _leaf_paths(forest.parent, forest.depth, leaf_nodes)
    return PackedTree(
        input_ids=input_ids,
        position_ids=position_ids,
        end=end,
        loss_mask=loss_mask,
        leaf_count=leaf_count,
        old_logprobs=old_logprobs,
        node_of_token=node_of_token,
        label_rows=label_rows,
        labels=input_ids[label_pos],
        label_pos=label_pos,
        node_start=node_start,
        node_end=node_end,
        root_nodes=roots,
        tree_offsets=tree_offsets,
        leaf_nodes=leaf_nodes,
        leaf_path_offsets=path_offsets,
        leaf_path_nodes=path_nodes,
    )


def split_by_tokens(
    forest: RolloutForest, max_tokens: int, roots: ArrayLike | None = None, *, oversized: str = "error"
) -> list[np.ndarray]:
    """Group whole trees into micro-batches of at most `max_tokens` packed tokens each, in root
    order (greedy, contiguous). A tree is never split: its shared prefix must be in the same pass
    as its branches. A tree larger than `max_tokens` raises (oversized="error") or gets a
    micro-batch of its own (oversized="alone"). Returns one array of root ids per micro-batch, for
    `pack(forest, roots=...)`."""
    if oversized not in ("error", "alone"):
        raise ForestError("oversized", f"must be 'error' or 'alone', got {oversized!r}")
    if int(max_tokens) <= 0:
        raise ForestError("max_tokens", f"must be positive, got {max_tokens}")
    roots = _selected_roots(forest, roots)
    node_tokens = forest.tok_end - forest.tok_start
    sizes = np.bincount(forest.tree_root(), weights=node_tokens, minlength=forest.num_nodes)[roots].astype(np.int64)
    too_big = np.flatnonzero(sizes > max_tokens)
    if too_big.size and oversized == "error":
        r = roots[too_big[0]]
        raise ForestError(
            "max_tokens",
            f"{max_tokens} is smaller than the tree of prompt {forest.prompt_id[r]} "
            f"({sizes[too_big[0]]} tokens); a tree cannot be split across micro-batches",
        )
    batches: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for r, size in zip(roots.tolist(), sizes.tolist()):
        if current and used + size > max_tokens:
            batches.append(np.asarray(current, np.int64))
            current, used = [], 0
        current.append(r)
        used += size
    if current:
        batches.append(np.asarray(current, np.int64))
    return batches


@numba.njit(cache=True)
def _pack_numba(parent, num_children, tok_start, tok_end, tokens, role, logprob, roots, role_model):
    n = parent.size
    child_offsets, children = _children_csr(parent)

    # DFS pre-order, children in increasing id order (explicit stack: trees can be deep)
    order = np.empty(n, np.int64)
    stack = np.empty(n, np.int64)
    count = 0
    for r in roots:
        stack[0] = r
        top = 1
        while top > 0:
            top -= 1
            u = stack[top]
            order[count] = u
            count += 1
            for c in range(child_offsets[u + 1] - 1, child_offsets[u] - 1, -1):
                stack[top] = children[c]
                top += 1
    order = order[:count]

    # subtree sizes (tokens, leaves): reverse pre-order visits children before parents
    node_len = tok_end - tok_start
    sub_tokens = np.zeros(n, np.int64)
    leaves = np.zeros(n, np.int64)
    for k in range(count - 1, -1, -1):
        u = order[k]
        sub_tokens[u] += node_len[u]
        if num_children[u] == 0 and parent[u] >= 0:
            leaves[u] += 1
        p = parent[u]
        if p >= 0:
            sub_tokens[p] += sub_tokens[u]
            leaves[p] += leaves[u]

    node_start = np.full(n, -1, np.int64)
    node_end = np.full(n, -1, np.int64)
    path_pos = np.zeros(n, np.int64)
    cursor = 0
    for k in range(count):
        u = order[k]
        node_start[u] = cursor
        node_end[u] = cursor + node_len[u]
        cursor += node_len[u]
        p = parent[u]
        if p >= 0:
            path_pos[u] = path_pos[p] + node_len[p]

    total = cursor
    input_ids = np.empty(total, np.int64)
    position_ids = np.empty(total, np.int64)
    end = np.empty(total, np.int32)
    loss_mask = np.empty(total, np.bool_)
    leaf_count = np.empty(total, np.int64)
    old_logprobs = np.empty(total, np.float32)
    node_of_token = np.empty(total, np.int64)
    for k in range(count):
        u = order[k]
        dst = node_start[u]
        src = tok_start[u]
        subtree_end = dst + sub_tokens[u]
        for i in range(node_len[u]):
            input_ids[dst + i] = tokens[src + i]
            position_ids[dst + i] = path_pos[u] + i
            end[dst + i] = subtree_end
            loss_mask[dst + i] = role[src + i] == role_model
            leaf_count[dst + i] = leaves[u]
            old_logprobs[dst + i] = logprob[src + i]
            node_of_token[dst + i] = u

    tree_offsets = np.empty(roots.size + 1, np.int64)
    for k in range(roots.size):
        tree_offsets[k] = node_start[roots[k]]
    tree_offsets[roots.size] = total

    num_leaves = 0
    for u in range(n):
        if node_start[u] >= 0 and num_children[u] == 0 and parent[u] >= 0:
            num_leaves += 1
    leaf_nodes = np.empty(num_leaves, np.int64)
    num_leaves = 0
    for u in range(n):
        if node_start[u] >= 0 and num_children[u] == 0 and parent[u] >= 0:
            leaf_nodes[num_leaves] = u
            num_leaves += 1
    return (
        input_ids,
        position_ids,
        end,
        loss_mask,
        leaf_count,
        old_logprobs,
        node_of_token,
        node_start,
        node_end,
        tree_offsets,
        leaf_nodes,
    )


@numba.njit(cache=True)
def _label_pairs(node_of_token, node_start, node_end, parent):
    """Every packed token but a prompt's first is predicted by one row: its path predecessor."""
    total = node_of_token.size
    count = 0
    for i in range(total):
        u = node_of_token[i]
        if i > node_start[u] or parent[u] >= 0:
            count += 1
    label_pos = np.empty(count, np.int64)
    label_rows = np.empty(count, np.int64)
    m = 0
    for i in range(total):
        u = node_of_token[i]
        if i > node_start[u]:
            label_pos[m] = i
            label_rows[m] = i - 1
            m += 1
        elif parent[u] >= 0:
            label_pos[m] = i
            label_rows[m] = node_end[parent[u]] - 1  # the branch point's last token
            m += 1
    return label_pos, label_rows


@numba.njit(cache=True)
def _leaf_token_index(path_offsets, path_nodes, node_start, node_end):
    num_leaves = path_offsets.size - 1
    offsets = np.zeros(num_leaves + 1, np.int64)
    for k in range(num_leaves):
        length = 0
        for q in range(path_offsets[k], path_offsets[k + 1]):
            length += node_end[path_nodes[q]] - node_start[path_nodes[q]]
        offsets[k + 1] = offsets[k] + length
    index = np.empty(offsets[num_leaves], np.int64)
    for k in range(num_leaves):
        pos = offsets[k]
        for q in range(path_offsets[k], path_offsets[k + 1]):
            u = path_nodes[q]
            for i in range(node_start[u], node_end[u]):
                index[pos] = i
                pos += 1
    return offsets, index


# ---------------------------------------------------------------------- plain-Python reference
def pack_reference(forest: RolloutForest, roots: ArrayLike | None = None) -> PackedTree:
    """The same packing with plain Python loops and lists (same O(nodes + tokens) algorithm, no
    numba): the oracle for tests and the baseline of bench/bench_packing.py."""
    forest.validate()
    roots = [int(r) for r in _selected_roots(forest, roots)]
    parent = forest.parent.tolist()
    starts, ends = forest.tok_start.tolist(), forest.tok_end.tolist()
    tokens, role, logprob = forest.tokens.tolist(), forest.role.tolist(), forest.logprob.tolist()
    n = len(parent)
    kids: list[list[int]] = [[] for _ in range(n)]
    for u, p in enumerate(parent):
        if p >= 0:
            kids[p].append(u)
    is_leaf = [not kids[u] and parent[u] >= 0 for u in range(n)]

    order: list[int] = []
    for r in roots:
        stack = [r]
        while stack:
            u = stack.pop()
            order.append(u)
            stack.extend(reversed(kids[u]))
    length = {u: ends[u] - starts[u] for u in order}
    subtree_tokens, leaves = dict(length), {u: int(is_leaf[u]) for u in order}
    for u in reversed(order):
        if parent[u] >= 0:
            subtree_tokens[parent[u]] += subtree_tokens[u]
            leaves[parent[u]] += leaves[u]
    node_start, node_end, path_pos = [-1] * n, [-1] * n, [0] * n
    cursor = 0
    for u in order:
        node_start[u], node_end[u] = cursor, cursor + length[u]
        cursor += length[u]
        if parent[u] >= 0:
            path_pos[u] = path_pos[parent[u]] + length[parent[u]]

    ids: list[int] = []
    pos: list[int] = []
    end: list[int] = []
    mask: list[bool] = []
    mult: list[int] = []
    lp: list[float] = []
    node: list[int] = []
    label_pos: list[int] = []
    label_rows: list[int] = []
    for u in order:
        for k, i in enumerate(range(starts[u], ends[u])):
            here = len(ids)
            if k > 0 or parent[u] >= 0:
                label_pos.append(here)
                label_rows.append(here - 1 if k > 0 else node_end[parent[u]] - 1)
            ids.append(tokens[i])
            pos.append(path_pos[u] + k)
            end.append(node_start[u] + subtree_tokens[u])
            mask.append(role[i] == ROLE_MODEL)
            mult.append(leaves[u])
            lp.append(logprob[i])
            node.append(u)
    tree_offsets = [node_start[r] for r in roots] + [len(ids)]
    leaf_nodes = [u for u in range(n) if node_start[u] >= 0 and is_leaf[u]]
    path_offsets: list[int] = [0]
    path_nodes: list[int] = []
    for leaf in leaf_nodes:
        path = [leaf]
        while parent[path[-1]] >= 0:
            path.append(parent[path[-1]])
        path_nodes.extend(reversed(path))
        path_offsets.append(len(path_nodes))

    def i64(values):
        return np.asarray(values, dtype=np.int64)

    input_ids = i64(ids)
    return PackedTree(
        input_ids=input_ids,
        position_ids=i64(pos),
        end=np.asarray(end, np.int32),
        loss_mask=np.asarray(mask, bool),
        leaf_count=i64(mult),
        old_logprobs=np.asarray(lp, np.float32),
        node_of_token=i64(node),
        label_rows=i64(label_rows),
        labels=input_ids[i64(label_pos)],
        label_pos=i64(label_pos),
        node_start=i64(node_start),
        node_end=i64(node_end),
        root_nodes=i64(roots),
        tree_offsets=i64(tree_offsets),
        leaf_nodes=i64(leaf_nodes),
        leaf_path_offsets=i64(path_offsets),
        leaf_path_nodes=i64(path_nodes),
    )
