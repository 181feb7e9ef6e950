"""TRACE inside verl (`pip install -e .[verl]`, or scripts/setup_verl_env.sh; docs/verl.md).

- `advantage`: trace-rl's `tree_grpo` / `segment` registered as verl advantage estimators; the tree
  travels in the batch's `uid` strings (format in that module).
- `client`: `PagedTreeLLMClient`, verl's LLM-client interface (`async generate(request_id, *,
  prompt_ids, sampling_params)` -> `TokenOutput`) over trace-rl's paged tree KV cache and a Hugging
  Face model, with a token prefix cache: runs verl's agent loops on CPU or a small GPU without vLLM.
- `agent_loop`: the `trace_agent` agent loop: Stage 1, bare rollouts turn by turn through verl's LLM
  client with a trace-rl env, Stage 2 continuations from turn prefixes; one leaf per batch row.
- `rows`: a forest leaf as a verl row.
- `actor`: `SharedPrefixFSDPEngine`, verl's FSDP2 actor engine with the logprob and training forwards
  through `shared_prefix_logprobs` (switch: `fsdp_config.shared_prefix=true`); `micro_batches`: its
  group-preserving micro-batches (numpy only).
- `main`: the `run_ppo` entry point (`python -m trace_core.integrations.verl.main`), `TraceTaskRunner` and
  the presets in `config/`; `data`: Search-R1 rows as verl dataset rows for the `search_qa` env.

Importing this package does not import verl; `agent_loop`, `client`, `actor` and `main` do.
"""

from trace_core.integrations.verl.advantage import (
    ESTIMATORS,
    adopt_tree_uids,
    decode_tree_uid,
    encode_tree_uid,
    forest_from_index,
    install_tree_uid_hook,
    register_estimators,
    tree_advantages,
)

__all__ = [
    "ESTIMATORS",
    "adopt_tree_uids",
    "decode_tree_uid",
    "encode_tree_uid",
    "forest_from_index",
    "install_tree_uid_hook",
    "register_estimators",
    "tree_advantages",
]
