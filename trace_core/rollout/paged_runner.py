"""Run a Hugging Face causal LM (Llama / Qwen2 / Qwen3 families) over the paged tree KV cache.

The model's own modules do all the math: its embedding, rotary embedding, and every decoder layer
(norms, q/k/v/o projections, Qwen3's q_norm/k_norm, MLP) are called as they are. Only attention
is swapped: while the runner executes, the model's `config._attn_implementation` points at
"trace_paged", an attention function registered with `transformers.AttentionInterface`. It
receives each layer's rotated K/V of the new tokens, writes them into the nodes' pages, and attends:

- decode (one new token per branch): `trace_kernels.tree_decode_attention` over the
  tree (shared prefixes read once per tile of branches; Triton on CUDA/interpreter, torch on CPU);
- extend (prompt / observation prefill of a node): each node's new tokens attend to their path's
  keys, causally, through torch SDPA on the gathered path (one gather per node per layer).

Sliding-window attention is not supported (the runner raises for configs that enable it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from trace_core.model.tree_forward import autocast_off
from trace_core.rollout.kv_cache import PagedTreeKVCache
from trace_kernels.tree_decode import TreeDecodeMeta, tree_decode_attention

ATTENTION_NAME = "trace_paged"


@dataclass
class _ExtendGroup:
    lo: int  # this node's new tokens are rows lo..hi of the flat batch
    hi: int
    key_slots: torch.Tensor  # [L] the node's whole path, new tokens last
    prefix_len: int  # keys before the first new token


@dataclass
class _StepContext:
    cache: PagedTreeKVCache
    slots: torch.Tensor  # [N] where the new tokens' K/V go
    decode_meta: TreeDecodeMeta | None  # decode step
    extend_groups: list[_ExtendGroup] | None  # extend step
    decode_backend: str | None


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function HF layers call. query [1, Hq, N, D]; key/value [1, Hkv, N, D]."""
    with autocast_off(query.device.type):  # K/V go to the pool's dtype and q with them (see below)
        return _paged_attention_math(module, query, key, value, kwargs["trace_step"], scaling)


def _paged_attention_math(module, query, key, value, step: _StepContext, scaling):
    layer = module.layer_idx
    cache = step.cache
    cache.write(layer, step.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [N, Hq, D]
    k_pool, v_pool = cache.k_pools[layer], cache.v_pools[layer]
    if q.dtype != k_pool.dtype:
        # under autocast over fp32 master weights q arrives in fp32 (RoPE / q_norm) while the pool holds
        # the compute dtype; without autocast the dtypes already match
        q = q.to(k_pool.dtype)
    if step.decode_meta is not None:
        out = tree_decode_attention(q, k_pool, v_pool, step.decode_meta, scale=scaling, backend=step.decode_backend)
        return out[None], None
    out = torch.empty_like(q)
    flat_k = k_pool.view(-1, cache.num_kv_heads, cache.head_dim)
    flat_v = v_pool.view(-1, cache.num_kv_heads, cache.head_dim)
    group = q.shape[1] // cache.num_kv_heads
    for g in step.extend_groups:
        k = flat_k[g.key_slots].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, D]
        v = flat_v[g.key_slots].transpose(0, 1).repeat_interleave(group, 0)
        rows = torch.arange(g.hi - g.lo, device=q.device)[:, None] + g.prefix_len
        allowed = torch.arange(k.shape[1], device=q.device)[None, :] <= rows  # causal over the path
        out[g.lo : g.hi] = F.scaled_dot_product_attention(
            q[g.lo : g.hi].transpose(0, 1), k, v, attn_mask=allowed, scale=scaling
        ).transpose(0, 1)
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, _paged_attention)


def kv_geometry(model, dtype: torch.dtype | None = None) -> dict:
    """num_layers, num_kv_heads, head_dim and dtype of the K/V a Llama / Qwen2 / Qwen3 model caches.
    dtype: the cache's dtype; None = the parameter dtype (under autocast: pass the compute dtype)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return dict(
        num_layers=len(decoder.layers),
        num_kv_heads=model.config.num_key_value_heads,
        head_dim=decoder.layers[0].self_attn.head_dim,
        dtype=dtype or next(model.parameters()).dtype,
    )


class HFPagedRunner:
    """Forward passes of `model` whose K/V live in a `PagedTreeKVCache` it owns (`self.cache`).

    num_pages, page_size   cache size; decode_backend None (auto) / "triton" / "cpu"
    kv_dtype       dtype of the cached K/V; None = the parameter dtype. With fp32 master weights run
                   under autocast, pass the compute dtype (bf16 / fp16) and call the runner inside it.
    """

    def __init__(
        self,
        model,
        *,
        num_pages: int,
        page_size: int = 16,
        decode_backend: str | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        config = model.config
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError("model: sliding-window attention is not supported by the paged runner")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(decoder, name):
                raise ValueError(f"model: its decoder has no `{name}`; expected a Llama / Qwen2 / Qwen3 style model")
        self.model, self.decoder = model, decoder
        self.cache = PagedTreeKVCache(
            **kv_geometry(model, kv_dtype),
            num_pages=num_pages,
            page_size=page_size,
            device=next(model.parameters()).device,
        )
        self.decode_backend = decode_backend
        self.device = next(model.parameters()).device
        self.tokens_run = 0  # tokens pushed through the model (prefill + decode)

    @contextlib.contextmanager
    def _paged_attention(self):
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    @torch.no_grad()
    def _run(self, token_ids: list[int], positions: list[int], step: _StepContext) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)[None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        hidden = self.decoder.embed_tokens(ids)
        rotary = self.decoder.rotary_emb(hidden, pos)
        with self._paged_attention():
            for layer in self.decoder.layers:
                hidden = layer(
                    hidden, attention_mask=None, position_ids=pos, position_embeddings=rotary, trace_step=step
                )
                if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                    hidden = hidden[0]
            self.tokens_run += len(token_ids)
            return self.decoder.norm(hidden)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] final hidden states -> [n, V] fp32 logits."""
        with torch.no_grad():
            return self.model.lm_head(hidden).float()

    def decode(self, nodes: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Append token_ids[b] to nodes[b] (one each) and return their final hidden states [B, hidden]."""
        slots = torch.cat(self.cache.reserve_many(nodes, [1] * len(nodes))).to(self.device)
        positions = [self.cache.seq_len(u) - 1 for u in nodes]
        meta = self.cache.decode_meta(nodes)
        step = _StepContext(self.cache, slots, meta, None, self.decode_backend)
        return self._run(list(token_ids), positions, step)

    def extend(self, nodes: Sequence[int], token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append token_lists[i] (non-empty) to nodes[i]; returns the final hidden state of each
        node's last new token [len(nodes), hidden]."""
        if len(set(nodes)) != len(nodes):
            raise ValueError("nodes: each node may appear once per extend")
        if any(len(toks) == 0 for toks in token_lists):
            raise ValueError("token_lists: every node needs at least one token")
        before_all = [self.cache.seq_len(u) for u in nodes]
        slot_parts = self.cache.reserve_many(nodes, [len(t) for t in token_lists])
        flat, positions, groups = [], [], []
        for u, toks, before in zip(nodes, token_lists, before_all):
            lo = len(flat)
            flat.extend(int(t) for t in toks)
            positions.extend(range(before, before + len(toks)))
            groups.append(_ExtendGroup(lo, len(flat), self.cache.path_slots(u).to(self.device), before))
        step = _StepContext(self.cache, torch.cat(slot_parts).to(self.device), None, groups, None)
        hidden = self._run(flat, positions, step)
        return hidden[torch.tensor([g.hi - 1 for g in groups], device=self.device)]
