"""Hypothesis strategies for small random rollout forests (shared by tree and packing tests)."""

from hypothesis import strategies as st

from trace_core.forest import RolloutForest

VOCAB = 11


@st.composite
def forests(draw, max_prompts: int = 3, max_turns: int = 9, max_tokens: int = 4):
    """Random trees built through the incremental API. Nodes of different prompts interleave in id
    order, branching is arbitrary (deep chains, wide fans), nodes have 1..max_tokens tokens, every
    leaf gets a 0/1 reward."""
    forest = RolloutForest(vocab_size=VOCAB)
    num_prompts = draw(st.integers(1, max_prompts))
    open_nodes: list[int] = []  # nodes that may get children
    for prompt in range(num_prompts):
        open_nodes.append(forest.add_root(prompt, draw(_token_lists(max_tokens))))
    roots = list(open_nodes)
    num_turns = draw(st.integers(num_prompts, num_prompts * max_turns))
    for k in range(num_turns):
        # the first turns give every prompt a child, so no root is left without turns
        parent = roots[k] if k < num_prompts else draw(st.sampled_from(open_nodes))
        tokens = draw(_token_lists(max_tokens))
        mask = draw(st.lists(st.booleans(), min_size=len(tokens), max_size=len(tokens)))
        logprobs = draw(st.lists(st.floats(-5, 0), min_size=len(tokens), max_size=len(tokens)))
        open_nodes.append(forest.add_node(parent, tokens, mask, logprobs))
    for leaf in forest.leaves:
        forest.set_reward(leaf, float(draw(st.integers(0, 1))))
    return forest.validate(require_rewards=True)


def _token_lists(max_tokens: int):
    return st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_tokens)


def ancestors_or_self(forest: RolloutForest, node: int) -> set[int]:
    out = {int(node)}
    while forest.parent[node] >= 0:
        node = int(forest.parent[node])
        out.add(node)
    return out
