"""RolloutForest: the rollout trees of one training batch as numpy struct-of-arrays.

A node is one turn; a prompt is a root (depth 0). Every node owns a contiguous span of one flat
token buffer, so a turn's tokens (model-generated thought/action, then the observation) are stored
once however many rollouts share that turn. Per token we keep the role (model / observation) and the
sampling logprob; per leaf the reward.

    forest = RolloutForest.from_trajectories(trajectories, vocab_size=V)   # offline builder
    root = forest.add_root(prompt_id, prompt_tokens)                      # or incrementally,
    node = forest.add_node(root, tokens, model_mask, logprobs)            # as an engine generates
    forest.set_reward(node, 1.0)
    forest.validate(require_rewards=True)

Conventions
- Node order is topological: a node's parent has a smaller index (this rules out cycles).
- `reward` is NaN on internal nodes and on leaves whose reward is not known yet.
- `logprob` is the sampling logprob of model tokens; 0.0 on observation tokens; NaN on a model token
  whose sampling logprob was not recorded.
- The *rollout* of a node is its depth-1 ancestor: a bare rollout's first turn together with every
  continuation branched below it (TRACE's "tree of rollout j").

Node and token columns are exposed as read-only numpy views; they stay valid until the forest grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numba
import numpy as np

from trace_core.errors import TraceError

ROLE_OBSERVATION = 0  # prompt, tool output, template tokens: never trained on
ROLE_MODEL = 1  # sampled from the policy: carries the loss

_LOGPROB_TOLERANCE = 1e-4  # sampling engines round; a logprob a hair above 0 is not an error


class ForestError(TraceError):
    """Invalid rollout-forest input. `field` names the offending field or argument."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def under(self, prefix: str) -> ForestError:
        """The same error, with its field qualified by where it came from (e.g. trajectories[3])."""
        return ForestError(f"{prefix}.{self.field}", self.detail)


@dataclass(frozen=True)
class Trajectory:
    """One rollout as flat token lists (what an engine or a dataset hands over).

    token_ids    [L] the whole sequence: prompt, then turn 1, turn 2, ...
    model_mask   [L] True where the policy sampled the token
    turn_starts  [T] offset where turn t = 1..T begins, strictly increasing; the prompt is
                 token_ids[:turn_starts[0]], turn t is token_ids[turn_starts[t-1]:turn_starts[t]]
    reward       outcome in [0, 1] (None: not known yet)
    logprobs     [L] sampling logprobs, read at model tokens only (None: not recorded)
    branch_from  (trajectory index, turn t): this is a continuation that shares the prompt and turns
                 1..t with an earlier trajectory of the same list (checked token by token) and
                 branches after turn t. None: a bare rollout (it shares only the prompt).
    """

    prompt_id: int
    token_ids: Sequence[int]
    model_mask: Sequence[bool]
    turn_starts: Sequence[int]
    reward: float | None = None
    logprobs: Sequence[float] | None = None
    branch_from: tuple[int, int] | None = None


@dataclass(frozen=True)
class LeafSequence:
    """A leaf's root-to-leaf tokens, as a per-leaf trainer would see them."""

    token_ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] bool, model tokens
    logprobs: np.ndarray  # [L] float32 sampling logprobs (0 on observation tokens)
    reward: float


class _Column:
    """A numpy array that grows by doubling (amortised O(1) appends)."""

    def __init__(self, dtype, capacity: int = 16):
        self._data = np.empty(max(capacity, 1), dtype=dtype)
        self.size = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self._data.dtype).reshape(-1)
        need = self.size + values.size
        if need > self._data.size:
            grown = np.empty(max(need, 2 * self._data.size), dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = values
        self.size = need

    @property
    def view(self) -> np.ndarray:
        out = self._data[: self.size]
        out.flags.writeable = False
        return out

    def set(self, index: int, value) -> None:
        self._data[index] = value


class RolloutForest:
    """Rollout trees of a batch (see module docstring). Build with `from_trajectories`,
    `from_arrays`, or the incremental `add_root` / `add_node` / `set_reward`."""

    _NODE_COLUMNS: ClassVar[dict[str, type]] = {
        "parent": np.int64,
        "depth": np.int32,
        "prompt_id": np.int64,
        "tok_start": np.int64,
        "tok_end": np.int64,
        "reward": np.float64,
        "num_children": np.int32,
    }
    _TOKEN_COLUMNS: ClassVar[dict[str, type]] = {"tokens": np.int32, "role": np.uint8, "logprob": np.float32}

    def __init__(self, vocab_size: int | None = None):
        if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0):
            raise ForestError("vocab_size", f"must be a positive integer or None, got {vocab_size!r}")
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self._nodes = {name: _Column(dtype) for name, dtype in self._NODE_COLUMNS.items()}
        self._toks = {name: _Column(dtype, 256) for name, dtype in self._TOKEN_COLUMNS.items()}
        self._root_of_prompt: dict[int, int] = {}
        # from_trajectories: per trajectory, the node ids of its prompt and of each of its turns
        self.turn_nodes: list[list[int]] = []

    # ------------------------------------------------------------------ columns
    parent = property(lambda self: self._nodes["parent"].view, doc="[n] int64 parent node, -1 for roots")
    depth = property(lambda self: self._nodes["depth"].view, doc="[n] int32 turn index, 0 for roots")
    prompt_id = property(lambda self: self._nodes["prompt_id"].view, doc="[n] int64 prompt of the node's tree")
    tok_start = property(lambda self: self._nodes["tok_start"].view, doc="[n] int64 span start in `tokens`")
    tok_end = property(lambda self: self._nodes["tok_end"].view, doc="[n] int64 span end in `tokens`")
    reward = property(lambda self: self._nodes["reward"].view, doc="[n] float64 leaf reward, NaN elsewhere")
    num_children = property(lambda self: self._nodes["num_children"].view, doc="[n] int32")
    tokens = property(lambda self: self._toks["tokens"].view, doc="[T] int32 flat token buffer")
    role = property(lambda self: self._toks["role"].view, doc="[T] uint8 ROLE_MODEL / ROLE_OBSERVATION")
    logprob = property(lambda self: self._toks["logprob"].view, doc="[T] float32 sampling logprob")

    @property
    def num_nodes(self) -> int:
        return self._nodes["parent"].size

    @property
    def num_tokens(self) -> int:
        return self._toks["tokens"].size

    @property
    def roots(self) -> np.ndarray:
        return np.flatnonzero(self.parent < 0)

    @property
    def leaves(self) -> np.ndarray:
        """Leaf node ids in increasing order (roots without turns are not leaves)."""
        return np.flatnonzero((self.num_children == 0) & (self.parent >= 0))

    def node_tokens(self, node: int) -> np.ndarray:
        return self.tokens[self.tok_start[node] : self.tok_end[node]]

    def __len__(self) -> int:
        return self.num_nodes

    def __repr__(self) -> str:
        return (
            f"RolloutForest(prompts={len(self._root_of_prompt)}, nodes={self.num_nodes}, "
            f"leaves={self.leaves.size}, tokens={self.num_tokens})"
        )

    # ------------------------------------------------------------------ incremental building
    def add_root(self, prompt_id: int, token_ids: Sequence[int]) -> int:
        """Add the prompt of a new tree; returns its node id."""
        prompt_id = _int_scalar(prompt_id, "prompt_id")
        if prompt_id in self._root_of_prompt:
            raise ForestError(
                "prompt_id", f"prompt {prompt_id} already has a root (node {self._root_of_prompt[prompt_id]})"
            )
        tokens = self._checked_tokens(token_ids, "token_ids")
        node = self._append_node(-1, 0, prompt_id, tokens, np.zeros(tokens.size, np.uint8), None)
        self._root_of_prompt[prompt_id] = node
        return node

    def root_of(self, prompt_id: int) -> int:
        try:
            return self._root_of_prompt[_int_scalar(prompt_id, "prompt_id")]
        except KeyError:
            raise ForestError("prompt_id", f"no tree for prompt {prompt_id}") from None

    def add_node(
        self,
        parent: int,
        token_ids: Sequence[int],
        model_mask: Sequence[bool],
        logprobs: Sequence[float] | np.ndarray | None = None,
    ) -> int:
        """Add one turn under `parent`; returns the new node id.

        token_ids [L] the turn's tokens, model_mask [L] True for sampled tokens,
        logprobs [L] sampling logprobs (read at model tokens; None: not recorded).
        """
        parent = _int_scalar(parent, "parent")
        if not 0 <= parent < self.num_nodes:
            raise ForestError("parent", f"node {parent} does not exist (forest has {self.num_nodes} nodes)")
        if not np.isnan(self.reward[parent]):
            raise ForestError("parent", f"node {parent} has a reward, so it is a finished leaf and cannot get children")
        tokens = self._checked_tokens(token_ids, "token_ids")
        mask = np.asarray(model_mask, dtype=bool).reshape(-1)
        if mask.size != tokens.size:
            raise ForestError("model_mask", f"has {mask.size} entries for {tokens.size} tokens")
        roles = mask.astype(np.uint8)
        node = self._append_node(
            parent, int(self.depth[parent]) + 1, int(self.prompt_id[parent]), tokens, roles, logprobs
        )
        self._nodes["num_children"].set(parent, self.num_children[parent] + 1)
        return node

    def set_reward(self, node: int, reward: float) -> None:
        """Set the outcome of leaf `node` (a finite value in [0, 1])."""
        node = _int_scalar(node, "node")
        if not 0 <= node < self.num_nodes:
            raise ForestError("node", f"node {node} does not exist (forest has {self.num_nodes} nodes)")
        if self.num_children[node] > 0 or self.parent[node] < 0:
            raise ForestError("reward", f"node {node} is not a leaf turn (internal nodes and roots carry no reward)")
        _check_reward(reward, f"reward of node {node}")
        self._nodes["reward"].set(node, float(reward))

    def _checked_tokens(self, token_ids, field: str) -> np.ndarray:
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ForestError(field, f"must be a non-empty 1-D sequence of token ids, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ForestError(field, f"token ids must be integers, got dtype {tokens.dtype}")
        _check_token_range(tokens, self.vocab_size, field)
        return tokens.astype(np.int32)

    def _append_node(self, parent, depth, prompt_id, tokens, roles, logprobs) -> int:
        start = self.num_tokens
        lp = np.zeros(tokens.size, np.float32)
        model = roles == ROLE_MODEL
        if logprobs is None:
            lp[model] = np.nan
        else:
            given = np.asarray(logprobs, dtype=np.float64).reshape(-1)
            if given.size != tokens.size:
                raise ForestError("logprobs", f"has {given.size} entries for {tokens.size} tokens")
            _check_logprobs(given[model], "logprobs")
            lp[model] = given[model]
        for name, values in (("tokens", tokens), ("role", roles), ("logprob", lp)):
            self._toks[name].extend(values)
        node = self.num_nodes
        row = dict(
            parent=parent,
            depth=depth,
            prompt_id=prompt_id,
            tok_start=start,
            tok_end=start + tokens.size,
            reward=np.nan,
            num_children=0,
        )
        for name, value in row.items():
            self._nodes[name].extend(value)
        return node

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory], vocab_size: int | None = None) -> RolloutForest:
        """Build the forest of a batch from flat trajectories.

        Trajectories with the same prompt_id share one root (their prompts must be identical).
        `forest.turn_nodes[i][t]` is then the node of turn t of trajectories[i] (t = 0: its prompt).
        A continuation (`branch_from=(j, t)`) must come after trajectory j, repeat its prompt and
        turns 1..t token for token, and branch before j's last turn.
        """
        forest = cls(vocab_size)
        for i, traj in enumerate(trajectories):
            try:
                forest.turn_nodes.append(forest._add_trajectory(traj, trajectories, forest.turn_nodes))
            except ForestError as err:
                raise err.under(f"trajectories[{i}]") from None
        return forest

    def _add_trajectory(self, traj: Trajectory, trajectories, turn_nodes: list[list[int]]) -> list[int]:
        tokens, mask, starts = _trajectory_arrays(traj)
        prompt_id = _int_scalar(traj.prompt_id, "prompt_id")
        bounds = np.concatenate([[0], starts, [tokens.size]])
        if traj.branch_from is None:
            shared_turns = 0
            root = self._root_of_prompt.get(prompt_id)
            if root is None:
                root = self.add_root(traj.prompt_id, tokens[: bounds[1]])
            elif not np.array_equal(self.node_tokens(root), tokens[: bounds[1]]):
                raise ForestError("token_ids", f"prompt differs from the earlier prompt with id {traj.prompt_id}")
            nodes = [root]
        else:
            j, shared_turns = _branch_point(traj.branch_from, len(turn_nodes), turn_nodes)
            base = trajectories[j]
            if int(base.prompt_id) != prompt_id:
                raise ForestError(
                    "branch_from",
                    f"branches from trajectory {j} of prompt {base.prompt_id} but has prompt_id {traj.prompt_id}",
                )
            if shared_turns >= starts.size:
                raise ForestError(
                    "turn_starts", f"continuation has no turn after its branch point (turn {shared_turns})"
                )
            shared_end = int(bounds[shared_turns + 1])
            base_starts = np.asarray(base.turn_starts)
            if (
                not np.array_equal(tokens[:shared_end], np.asarray(base.token_ids)[:shared_end])
                or not np.array_equal(starts[: shared_turns + 1], base_starts[: shared_turns + 1])
                or not np.array_equal(mask[:shared_end], np.asarray(base.model_mask, dtype=bool)[:shared_end])
            ):
                raise ForestError(
                    "token_ids", f"does not repeat the prompt and turns 1..{shared_turns} of trajectory {j}"
                )
            nodes = turn_nodes[j][: shared_turns + 1]
        logprobs = None if traj.logprobs is None else np.asarray(traj.logprobs, dtype=np.float64).reshape(-1)
        if logprobs is not None and logprobs.size != tokens.size:
            raise ForestError("logprobs", f"has {logprobs.size} entries for {tokens.size} tokens")
        for t in range(shared_turns + 1, starts.size + 1):
            lo, hi = int(bounds[t]), int(bounds[t + 1])
            nodes.append(
                self.add_node(nodes[-1], tokens[lo:hi], mask[lo:hi], None if logprobs is None else logprobs[lo:hi])
            )
        if traj.reward is not None:
            self.set_reward(nodes[-1], traj.reward)
        return nodes

    @classmethod
    def from_arrays(
        cls,
        *,
        parent,
        prompt_id,
        tok_start,
        tok_end,
        tokens,
        role,
        reward=None,
        logprob=None,
        depth=None,
        vocab_size: int | None = None,
        require_rewards: bool = False,
    ) -> RolloutForest:
        """Wrap ready struct-of-arrays (e.g. from another trainer) after full validation.

        depth is derived from parent when omitted; reward defaults to NaN (unknown) and logprob to
        NaN on model tokens (not recorded) and 0 on observation tokens.
        """
        parent = _int_array(parent, "parent")
        n = parent.size
        node_cols = {
            "parent": parent,
            "prompt_id": _int_array(prompt_id, "prompt_id"),
            "tok_start": _int_array(tok_start, "tok_start"),
            "tok_end": _int_array(tok_end, "tok_end"),
        }
        node_cols["reward"] = np.full(n, np.nan) if reward is None else np.asarray(reward, dtype=np.float64)
        tok_cols = {"tokens": _int_array(tokens, "tokens"), "role": _int_array(role, "role")}
        for name, col in {**node_cols}.items():
            if col.shape != (n,):
                raise ForestError(name, f"has shape {col.shape}, expected ({n},) like parent")
        t = tok_cols["tokens"].size
        if tok_cols["role"].shape != (t,):
            raise ForestError("role", f"has shape {tok_cols['role'].shape}, expected ({t},) like tokens")
        if logprob is None:
            tok_cols["logprob"] = np.where(tok_cols["role"] == ROLE_MODEL, np.nan, 0.0)
        else:
            tok_cols["logprob"] = np.asarray(logprob, dtype=np.float64)
            if tok_cols["logprob"].shape != (t,):
                raise ForestError("logprob", f"has shape {tok_cols['logprob'].shape}, expected ({t},) like tokens")
        _check_parents(parent)  # before any numba loop indexes with it
        _check_token_range(tok_cols["tokens"], vocab_size, "tokens")  # before narrowing to int32
        computed_depth = _depths(parent)
        if depth is not None:
            depth = _int_array(depth, "depth")
            bad = np.flatnonzero(depth != computed_depth) if depth.shape == (n,) else np.array([0])
            if bad.size:
                raise ForestError(
                    "depth",
                    f"node {bad[0]} has depth {depth[bad[0]] if depth.shape == (n,) else depth.shape}, "
                    f"but its parent chain gives {computed_depth[bad[0]]}",
                )
        num_children = np.bincount(parent[parent >= 0], minlength=n).astype(np.int32)

        forest = cls(vocab_size)
        for name, col in {**node_cols, "depth": computed_depth, "num_children": num_children}.items():
            forest._nodes[name].extend(col)
        for name, col in tok_cols.items():
            if name == "role" and col.size and (col.min() < 0 or col.max() > ROLE_MODEL):
                bad = np.flatnonzero((col < 0) | (col > ROLE_MODEL))[0]
                raise ForestError(
                    "role",
                    f"token {bad} has role {col[bad]}; roles are {ROLE_OBSERVATION} (observation) or {ROLE_MODEL} (model)",
                )
            forest._toks[name].extend(col)
        roots = np.flatnonzero(parent < 0)
        forest._root_of_prompt = {int(p): int(r) for p, r in zip(forest.prompt_id[roots], roots)}
        if len(forest._root_of_prompt) != roots.size:
            _, counts = np.unique(forest.prompt_id[roots], return_counts=True)
            raise ForestError(
                "prompt_id", f"{int((counts > 1).sum())} prompt id(s) have more than one root; one tree per prompt"
            )
        forest.validate(require_rewards=require_rewards)
        return forest

    # ------------------------------------------------------------------ validation
    def validate(self, *, require_rewards: bool = False, vocab_size: int | None = None) -> RolloutForest:
        """Check every structural invariant; raise ForestError naming the bad field. Returns self."""
        _n, t = self.num_nodes, self.num_tokens
        parent, start, end = self.parent, self.tok_start, self.tok_end
        _check_parents(parent)
        wrong_depth = np.flatnonzero(self.depth != _depths(parent))
        if wrong_depth.size:
            bad = wrong_depth[0]
            raise ForestError("depth", f"node {bad} has depth {self.depth[bad]}, inconsistent with its parent chain")
        child = parent >= 0
        if np.any(self.prompt_id[child] != self.prompt_id[parent[child]]):
            bad = np.flatnonzero(child)[np.flatnonzero(self.prompt_id[child] != self.prompt_id[parent[child]])[0]]
            raise ForestError(
                "prompt_id",
                f"node {bad} has prompt {self.prompt_id[bad]} but its parent {parent[bad]} has {self.prompt_id[parent[bad]]}",
            )
        # spans: inside the buffer, non-empty, pairwise disjoint
        bad = np.flatnonzero((start < 0) | (end > t) | (start > end))
        if bad.size:
            u = bad[0]
            raise ForestError(
                "tok_start/tok_end", f"node {u} has span [{start[u]}, {end[u]}) outside the token buffer of {t} tokens"
            )
        bad = np.flatnonzero(start == end)
        if bad.size:
            raise ForestError(
                "tok_start/tok_end", f"node {bad[0]} has an empty token span (a turn must have at least one token)"
            )
        order = np.argsort(start, kind="stable")
        overlap = np.flatnonzero(start[order][1:] < end[order][:-1])
        if overlap.size:
            a, b = order[overlap[0]], order[overlap[0] + 1]
            raise ForestError(
                "tok_start/tok_end", f"spans of nodes {a} [{start[a]}, {end[a]}) and {b} [{start[b]}, {end[b]}) overlap"
            )
        _check_token_range(self.tokens, vocab_size if vocab_size is not None else self.vocab_size, "tokens")
        roots = self.roots
        root_token = np.zeros(t, dtype=bool)
        _mark_spans(root_token, start[roots], end[roots])
        if np.any(root_token & (self.role == ROLE_MODEL)):
            bad = np.flatnonzero(root_token & (self.role == ROLE_MODEL))[0]
            raise ForestError("role", f"token {bad} belongs to a prompt (root) but is marked as model-generated")
        childless_roots = roots[self.num_children[roots] == 0]
        if childless_roots.size:
            raise ForestError(
                "parent",
                f"prompt {self.prompt_id[childless_roots[0]]} (node {childless_roots[0]}) has no turns: empty trajectory",
            )
        model = self.role == ROLE_MODEL
        _check_logprobs(self.logprob[model].astype(np.float64), "logprob")
        reward, is_leaf = self.reward, (self.num_children == 0) & child
        internal_with_reward = np.flatnonzero(~is_leaf & ~np.isnan(reward))
        if internal_with_reward.size:
            raise ForestError(
                "reward",
                f"node {internal_with_reward[0]} is internal (or a root) but has reward {reward[internal_with_reward[0]]}",
            )
        leaf_reward = reward[is_leaf]
        bad = np.flatnonzero(~np.isnan(leaf_reward) & ~((leaf_reward >= 0) & (leaf_reward <= 1)))
        if bad.size:
            raise ForestError(
                "reward",
                f"leaf {np.flatnonzero(is_leaf)[bad[0]]} has reward {leaf_reward[bad[0]]}; rewards must be finite and in [0, 1]",
            )
        if require_rewards and np.isnan(leaf_reward).any():
            missing = np.flatnonzero(is_leaf)[np.isnan(leaf_reward)]
            raise ForestError("reward", f"{missing.size} leaves have no reward yet (first: node {missing[0]})")
        return self

    # ------------------------------------------------------------------ structure queries
    def children_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [n+1], children [n - roots]): children of u are children[offsets[u]:offsets[u+1]],
        in increasing node order."""
        return _children_csr(self.parent)

    def leaf_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """Root-to-leaf node lists of all leaves (order of `leaves`), as CSR (offsets [L+1], nodes)."""
        return _leaf_paths(self.parent, self.depth, self.leaves)

    def leaf_path(self, leaf: int) -> np.ndarray:
        path = [int(leaf)]
        while self.parent[path[-1]] >= 0:
            path.append(int(self.parent[path[-1]]))
        return np.array(path[::-1], dtype=np.int64)

    def leaf_sequence(self, leaf: int) -> LeafSequence:
        """Flattened root-to-leaf tokens of one leaf with its loss mask and sampling logprobs."""
        path = self.leaf_path(leaf)
        idx = np.concatenate([np.arange(self.tok_start[u], self.tok_end[u]) for u in path])
        return LeafSequence(
            token_ids=self.tokens[idx].copy(),
            loss_mask=self.role[idx] == ROLE_MODEL,
            logprobs=self.logprob[idx].copy(),
            reward=float(self.reward[leaf]),
        )

    def leaf_sequences(self) -> list[LeafSequence]:
        return [self.leaf_sequence(leaf) for leaf in self.leaves]

    def tree_root(self) -> np.ndarray:
        """[n] the root (prompt node) of each node's tree."""
        return _ancestor_at_depth(self.parent, self.depth, 0)

    def rollout_root(self) -> np.ndarray:
        """[n] the depth-1 ancestor of each node (its bare rollout's first turn), -1 for roots."""
        return _ancestor_at_depth(self.parent, self.depth, 1)

    def path_lengths(self) -> np.ndarray:
        """[n] int64 tokens from the tree's first token to the node's last: the length of the prefix
        the policy has seen after the node (what the predictor reads)."""
        return _path_lengths(self.parent, self.tok_end - self.tok_start)

    def episode_leaf(self, nodes) -> np.ndarray:
        """[k] for each node, the leaf reached by always taking the lowest-numbered child: the end of
        the episode that wrote the node when episodes are appended turn after turn (as engines and
        `from_trajectories` do; later continuations get higher ids)."""
        offsets, children = self.children_csr()
        out = np.asarray(nodes, dtype=np.int64).copy().reshape(-1)
        for i in range(out.size):
            while offsets[out[i] + 1] > offsets[out[i]]:
                out[i] = children[offsets[out[i]]]
        return out

    # ------------------------------------------------------------------ values (predictor targets)
    def subtree_leaf_counts(self) -> np.ndarray:
        """[n] int64 number of leaves in each node's subtree (1 for a leaf)."""
        counts, _ = _subtree_sums(self.parent, self.num_children, np.zeros(self.num_nodes))
        return counts

    def subtree_sum(self, leaf_values: np.ndarray) -> np.ndarray:
        """[n] sum of a per-node value over the leaves of each subtree (values at internal nodes are ignored)."""
        values = np.asarray(leaf_values, dtype=np.float64)
        if values.shape != (self.num_nodes,):
            raise ForestError("leaf_values", f"has shape {values.shape}, expected ({self.num_nodes},)")
        return _subtree_sums(self.parent, self.num_children, values)[1]

    def subtree_success_rates(self) -> np.ndarray:
        """[n] mean leaf reward of each node's subtree: V_target of docs/method.md step 4."""
        self.validate_rewards()
        counts, sums = _subtree_sums(self.parent, self.num_children, np.nan_to_num(self.reward))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def subtree_reward_range(self) -> tuple[np.ndarray, np.ndarray]:
        """([n], [n]) min and max leaf reward in each subtree."""
        self.validate_rewards()
        return _subtree_min_max(self.parent, self.num_children, self.reward)

    def is_mixed(self) -> np.ndarray:
        """[n] bool: the subtree has leaves with different rewards (a 0 and a 1 for 0/1 rewards)."""
        lo, hi = self.subtree_reward_range()
        return lo < hi

    def effective_ratio(self) -> float:
        """Fraction of prompts whose tree is mixed (has both a success and a failure leaf)."""
        roots = self.roots
        if roots.size == 0:
            raise ForestError("forest", "has no prompts; the effective ratio is undefined")
        return float(self.is_mixed()[roots].mean())

    def validate_rewards(self) -> None:
        leaves = self.leaves
        missing = leaves[np.isnan(self.reward[leaves])]
        if missing.size:
            raise ForestError("reward", f"{missing.size} leaves have no reward yet (first: node {missing[0]})")


# ---------------------------------------------------------------------- input checks
def _int_scalar(value, field: str) -> int:
    """An integer id or index (Python or numpy int); a float, bool or string raises rather than truncate."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ForestError(field, f"must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _int_array(values, field: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ForestError(field, f"must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ForestError(field, f"must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_token_range(tokens: np.ndarray, vocab_size: int | None, field: str) -> None:
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise ForestError(field, f"token id {low} at position {int(np.argmin(tokens))} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise ForestError(field, f"token id {high} at position {int(np.argmax(tokens))} is >= vocab_size {vocab_size}")
    if high > np.iinfo(np.int32).max:
        raise ForestError(field, f"token id {high} does not fit in int32")


def _check_reward(reward, field: str) -> None:
    try:
        value = float(reward)
    except (TypeError, ValueError):
        raise ForestError("reward", f"{field} must be a number, got {reward!r}") from None
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise ForestError("reward", f"{field} is {value}; rewards must be finite and in [0, 1]")


def _check_logprobs(values: np.ndarray, field: str) -> None:
    bad = np.flatnonzero(np.isinf(values) | (values > _LOGPROB_TOLERANCE))
    if bad.size:
        raise ForestError(field, f"sampling logprob {values[bad[0]]} (model token {bad[0]}) must be finite and <= 0")


def _check_parents(parent: np.ndarray) -> None:
    n = parent.size
    bad = np.flatnonzero((parent < -1) | (parent >= np.arange(n)))
    if bad.size:
        u = bad[0]
        raise ForestError(
            "parent",
            f"node {u} has parent {parent[u]}; a parent must be -1 (root) or an earlier node "
            "(parent index < node index, which also rules out cycles)",
        )


def _trajectory_arrays(traj: Trajectory):
    tokens = np.asarray(traj.token_ids)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ForestError("token_ids", "empty trajectory")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ForestError("token_ids", f"token ids must be integers, got dtype {tokens.dtype}")
    mask = np.asarray(traj.model_mask, dtype=bool).reshape(-1)
    if mask.size != tokens.size:
        raise ForestError("model_mask", f"has {mask.size} entries for {tokens.size} tokens")
    starts = _int_array(traj.turn_starts, "turn_starts")
    if starts.size == 0:
        raise ForestError("turn_starts", "empty trajectory: no turn after the prompt")
    if starts[0] <= 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= tokens.size:
        raise ForestError(
            "turn_starts",
            f"{starts.tolist()} must be strictly increasing within (0, {tokens.size}) "
            "so that the prompt and every turn are non-empty",
        )
    if mask[: starts[0]].any():
        raise ForestError(
            "model_mask",
            f"marks prompt token {int(np.argmax(mask))} as model-generated; the prompt is token_ids[:{starts[0]}]",
        )
    return tokens, mask, starts


def _branch_point(branch_from, i: int, turn_nodes: list[list[int]]) -> tuple[int, int]:
    try:
        j, t = (_int_scalar(x, "branch_from") for x in branch_from)
    except (TypeError, ValueError):
        raise ForestError("branch_from", f"must be (trajectory index, turn), got {branch_from!r}") from None
    if not 0 <= j < i:
        raise ForestError("branch_from", f"trajectory {j} must be an earlier trajectory (index < {i})")
    num_turns = len(turn_nodes[j]) - 1
    if not 0 <= t < num_turns:
        raise ForestError(
            "branch_from",
            f"turn {t} is not a branch point of trajectory {j}, which has "
            f"{num_turns} turns (branch after turn 0..{num_turns - 1}; its last turn is a leaf)",
        )
    return j, t


# ---------------------------------------------------------------------- numba loops over nodes
@numba.njit(cache=True)
def _depths(parent):
    depth = np.zeros(parent.size, np.int32)
    for u in range(parent.size):
        if parent[u] >= 0:
            depth[u] = depth[parent[u]] + 1
    return depth


@numba.njit(cache=True)
def _mark_spans(flags, starts, ends):
    for k in range(starts.size):
        flags[starts[k] : ends[k]] = True


@numba.njit(cache=True)
def _path_lengths(parent, node_tokens):
    out = np.empty(parent.size, np.int64)
    for u in range(parent.size):  # parents come first
        out[u] = node_tokens[u] + (out[parent[u]] if parent[u] >= 0 else 0)
    return out


@numba.njit(cache=True)
def _children_csr(parent):
    n = parent.size
    offsets = np.zeros(n + 1, np.int64)
    for u in range(n):
        if parent[u] >= 0:
            offsets[parent[u] + 1] += 1
    for u in range(n):
        offsets[u + 1] += offsets[u]
    fill = offsets[:-1].copy()
    children = np.empty(offsets[n], np.int64)
    for u in range(n):  # increasing u keeps every child list sorted
        p = parent[u]
        if p >= 0:
            children[fill[p]] = u
            fill[p] += 1
    return offsets, children


@numba.njit(cache=True)
def _subtree_sums(parent, num_children, leaf_values):
    n = parent.size
    counts = np.zeros(n, np.int64)
    sums = np.zeros(n, np.float64)
    for u in range(n - 1, -1, -1):  # children have larger ids than parents
        if num_children[u] == 0 and parent[u] >= 0:
            counts[u] += 1
            sums[u] += leaf_values[u]
        if parent[u] >= 0:
            counts[parent[u]] += counts[u]
            sums[parent[u]] += sums[u]
    return counts, sums


@numba.njit(cache=True)
def _subtree_min_max(parent, num_children, reward):
    n = parent.size
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    for u in range(n - 1, -1, -1):
        if num_children[u] == 0 and parent[u] >= 0:
            lo[u] = min(lo[u], reward[u])
            hi[u] = max(hi[u], reward[u])
        p = parent[u]
        if p >= 0:
            lo[p] = min(lo[p], lo[u])
            hi[p] = max(hi[p], hi[u])
    return lo, hi


@numba.njit(cache=True)
def _ancestor_at_depth(parent, depth, level):
    """[n] each node's ancestor-or-self at `level`, -1 for nodes above that level."""
    out = np.full(parent.size, -1, np.int64)
    for u in range(parent.size):
        if depth[u] == level:
            out[u] = u
        elif depth[u] > level:
            out[u] = out[parent[u]]
    return out


@numba.njit(cache=True)
def _leaf_paths(parent, depth, leaves):
    offsets = np.zeros(leaves.size + 1, np.int64)
    for k in range(leaves.size):
        offsets[k + 1] = offsets[k] + depth[leaves[k]] + 1
    nodes = np.empty(offsets[-1], np.int64)
    for k in range(leaves.size):
        u = leaves[k]
        for pos in range(offsets[k + 1] - 1, offsets[k] - 1, -1):
            nodes[pos] = u
            u = parent[u]
    return offsets, nodes
