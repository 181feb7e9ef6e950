"""verl's LLM-client interface over trace-rl's paged tree KV cache: verl agent loops without vLLM.

verl's `AgentLoopWorker` talks to its rollout servers through an object with

    async generate(request_id, *, prompt_ids, sampling_params, **kw) -> verl TokenOutput

(`verl.workers.rollout.llm_server.LLMServerClient`). `PagedTreeLLMClient` is such an object backed by a
Hugging Face causal LM (Llama / Qwen2 / Qwen3 style) running over trace-rl's `HFPagedRunner`, the paged
tree KV cache the trace-rl engine uses. Why that and not `model.generate`: agent rollouts resend their
whole history every turn, and TRACE's continuations resend a turn prefix many times. The client keeps
the KV of every prompt it has seen (and of every prompt + response) as frozen cache nodes, keyed by
their tokens; a request whose prompt starts with a cached sequence forks that node (no copy) and
computes only the new tokens, as vLLM's and SGLang's prefix caches do. Concurrent requests are batched:
each decode step runs every live request in one forward, and new requests join between steps.

Sampling parameters read: temperature (0 = greedy), top_p, top_k (<= 0: off), max_tokens (or
max_new_tokens; default `max_tokens`), stop_token_ids (plus the model's EOS ids), logprobs (the sampling
logprob of every token is always returned: log-softmax of the tempered logits before the top-p / top-k
cut, what a trainer recomputes). repetition_penalty must be 1; multimodal inputs are refused.

The KV cache holds the weights' activations: call `clear_cache()` after the policy's weights change.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_core.rollout.kv_cache import CacheCapacityError
from trace_core.rollout.paged_runner import HFPagedRunner
from trace_core.rollout.sampling import sample_tokens


@dataclass
class _Request:
    prompt: list[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: frozenset[int]
    future: asyncio.Future
    node: int = -1  # KV node the response is written into
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # hidden state that sampled tokens[-1]
    cached: int = 0  # prompt tokens found in the prefix cache


class PagedTreeLLMClient:
    """verl LLM client (see module docstring).

    model            HF causal LM (eval mode is set); its device is where everything runs
    num_pages, page_size   KV cache size (pages of page_size tokens)
    max_tokens       response cap when a request names none
    eos_token_ids    end a response (with any stop_token_ids of the request); default: the model's
                     generation_config / config eos_token_id
    max_cached_prefixes  cached sequences kept (least recently used go first; also when pages run out)
    seed             sampling seed
    """

    def __init__(
        self,
        model,
        *,
        num_pages: int = 2048,
        page_size: int = 16,
        max_tokens: int = 256,
        eos_token_ids: tuple[int, ...] | None = None,
        max_cached_prefixes: int = 4096,
        decode_backend: str | None = None,
        seed: int = 0,
    ):
        model.eval()
        self.model = model
        self.runner = HFPagedRunner(model, num_pages=num_pages, page_size=page_size, decode_backend=decode_backend)
        self.cache = self.runner.cache
        self.max_tokens = int(max_tokens)
        if eos_token_ids is None:
            source = getattr(model, "generation_config", None) or model.config
            eos = getattr(source, "eos_token_id", None)
            eos_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_cached_prefixes = int(max_cached_prefixes)
        self.generator = torch.Generator(device=self.runner.device)
        self.generator.manual_seed(int(seed))
        self._prefixes: collections.OrderedDict[tuple[int, ...], tuple[int, torch.Tensor]] = collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()
        self._queue: list[_Request] = []
        self._driver: asyncio.Task | None = None
        self.stats = collections.Counter()  # requests, prompt_tokens, cached_prompt_tokens, generated_tokens

    # ------------------------------------------------------------------ verl's interface
    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        **kwargs: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        if image_data or video_data or audio_data:
            raise ValueError("PagedTreeLLMClient: multimodal inputs are not supported")
        request = self._request(list(map(int, prompt_ids)), dict(sampling_params))
        self._queue.append(request)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        tokens, logprobs, cached = await request.future
        return TokenOutput(
            token_ids=tokens,
            log_probs=logprobs,
            stop_reason="completed",
            num_preempted=0,
            extra_fields={"cached_prompt_tokens": cached},
        )

    def clear_cache(self) -> None:
        """Forget every cached prefix (after a weight update: the cached K/V are the old weights')."""
        while self._prefixes:
            self._evict_one()

    # ------------------------------------------------------------------ requests
    def _request(self, prompt: list[int], params: dict[str, Any]) -> _Request:
        if not prompt:
            raise ValueError("prompt_ids: empty prompt")
        vocab = int(self.model.config.vocab_size)
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt_ids: ids outside the model's vocab of {vocab}")
        if float(params.get("repetition_penalty", 1.0) or 1.0) != 1.0:
            raise ValueError("sampling_params: repetition_penalty != 1 is not supported by PagedTreeLLMClient")
        max_tokens = params.get("max_tokens", params.get("max_new_tokens")) or self.max_tokens
        top_k = params.get("top_k")
        return _Request(
            prompt=prompt,
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0) or 1.0),
            top_k=-1 if top_k is None else int(top_k),
            max_tokens=max(int(max_tokens), 1),
            stop=frozenset(map(int, params.get("stop_token_ids") or ())) | frozenset(self.eos_token_ids),
            future=asyncio.get_running_loop().create_future(),
        )

    async def _drive(self) -> None:
        active: list[_Request] = []
        try:
            while self._queue or active:
                if self._queue:
                    batch, self._queue = self._queue, []
                    self._admit(batch)
                    active += batch
                else:
                    nodes, pending = [r.node for r in active], [r.tokens[-1] for r in active]
                    hidden = self._with_pages(functools.partial(self.runner.decode, nodes, pending))
                    for r, h in zip(active, hidden):
                        r.hidden = h
                    self._sample(active)
                active = [r for r in active if not self._finish_if_done(r)]
                await asyncio.sleep(0)  # let new requests join the next step
        except BaseException as err:  # fail every waiting request, not only the one that tripped
            for r in active + self._queue:
                if not r.future.done():
                    r.future.set_exception(err)
            self._queue = []
            raise

    def _admit(self, batch: list[_Request]) -> None:
        """Find each prompt's longest cached prefix, compute the rest, sample the first tokens."""
        to_extend: list[tuple[_Request, int, list[int]]] = []
        for r in batch:
            start, node, hidden = self._lookup(r.prompt)
            r.cached = start
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(r.prompt)
            self.stats["cached_prompt_tokens"] += start
            if start == len(r.prompt):  # the whole prompt is cached: generate from its stored hidden state
                r.node, r.hidden = self.cache.fork(node), hidden
            else:
                prompt_node = self.cache.new_root() if node < 0 else self.cache.fork(node)
                to_extend.append((r, prompt_node, r.prompt[start:]))
        if to_extend:
            nodes = [n for _, n, _ in to_extend]
            hidden = self._with_pages(lambda: self.runner.extend(nodes, [t for _, _, t in to_extend]))
            for (r, prompt_node, _), h in zip(to_extend, hidden):
                r.hidden = h.clone()
                r.node = self.cache.fork(prompt_node)
                self._remember(tuple(r.prompt), prompt_node, r.hidden)  # takes the handle new_root/fork gave
        self._sample(batch)

    def _sample(self, batch: list[_Request]) -> None:
        hidden = torch.stack([r.hidden for r in batch])
        logits = self.runner.logits(hidden)
        top_k = torch.tensor([r.top_k for r in batch])
        if bool((top_k > 0).any()):
            kth = torch.stack(
                [
                    row.topk(min(int(k), row.numel())).values[-1] if k > 0 else row.new_tensor(-float("inf"))
                    for row, k in zip(logits, top_k)
                ]
            )
            logits = logits.masked_fill(logits < kth[:, None], -float("inf"))
        temperature = torch.tensor([r.temperature for r in batch], dtype=torch.float32)
        top_p = torch.tensor([r.top_p for r in batch], dtype=torch.float32)
        tokens, logprobs = sample_tokens(logits, temperature, top_p, self.generator)
        for r, t, lp in zip(batch, tokens.tolist(), logprobs.tolist()):
            r.tokens.append(int(t))
            r.logprobs.append(float(lp))
            self.stats["generated_tokens"] += 1

    def _finish_if_done(self, r: _Request) -> bool:
        if r.tokens[-1] not in r.stop and len(r.tokens) < r.max_tokens:
            return False
        if self.cache.length(r.node) > 0:  # prompt + response[:-1]: the next turn's prompt starts with it
            self._remember((*r.prompt, *r.tokens[:-1]), r.node, r.hidden.clone())
        else:
            self.cache.release(r.node)
        r.future.set_result((list(r.tokens), list(r.logprobs), r.cached))
        return True

    # ------------------------------------------------------------------ the prefix cache
    def _lookup(self, prompt: list[int]) -> tuple[int, int, torch.Tensor | None]:
        """(cached length, its KV node or -1, hidden state at its last token)."""
        for length in sorted((n for n in self._lengths if n <= len(prompt)), reverse=True):
            key = tuple(prompt[:length])
            hit = self._prefixes.get(key)
            if hit is not None:
                self._prefixes.move_to_end(key)
                return length, hit[0], hit[1]
        return 0, -1, None

    def _remember(self, key: tuple[int, ...], node: int, hidden: torch.Tensor) -> None:
        """Keep `node` (holding exactly `key`, with one handle we own) as a cached prefix."""
        if key in self._prefixes:  # already cached by a concurrent request: keep that one
            self.cache.release(node)
            self._prefixes.move_to_end(key)
            return
        self._prefixes[key] = (node, hidden)
        self._lengths[len(key)] += 1
        while len(self._prefixes) > self.max_cached_prefixes:
            self._evict_one()

    def _evict_one(self) -> None:
        key, (node, _) = self._prefixes.popitem(last=False)
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]
        self.cache.release(node)  # pages stay while running requests fork from it

    def _with_pages(self, fn):
        """Run fn; when the KV pool is short, drop cached prefixes (least recently used first) and retry."""
        while True:
            try:
                return fn()
            except CacheCapacityError:
                if not self._prefixes:
                    raise
                for _ in range(max(1, len(self._prefixes) // 2)):
                    self._evict_one()
