"""Adapters that plug trace-rl's kernels into other libraries.

- `hf`: tree attention as transformers' "trace_tree" attention; `tree_forward` /
  `tree_forward_with_head` run a packed tree through a Llama / Qwen2 / Qwen3 model (also PEFT, DDP,
  FSDP2 models, and under gradient checkpointing).
- `shared_prefix`: per-token logprobs of a flat padded batch with every shared prefix computed once
  (a drop-in for verl / TRL-style scoring).
- `trl_grpo`: TRL's GRPOTrainer with that scoring (needs `trl`).

Each adapter lives in its own module and imports its library lazily, so `trace_core` never
requires an integration's dependencies to be importable.
"""
