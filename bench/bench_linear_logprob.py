"""Benchmark `linear_logprob` (fused lm-head + log-softmax gather) against its baselines.

Baselines, all measured in the same run on the same inputs (one label per row, rows = arange(N),
so every implementation computes the same per-token log-probabilities):
- torch eager:      log_softmax(hidden @ W.T).gather(labels)       (materialises [N, V])
- torch.compile chunked: a compiled per-chunk log-prob, each chunk under activation checkpointing
- Liger-Kernel:     LigerFusedLinearCrossEntropyLoss(reduction="sum"), only if `liger-kernel` is installed
- TRL chunked:      trl.kernels.ChunkedLogProbFunction (TRL's fused lm-head logprob, what its GRPOTrainer
                    scores with; Triton on CUDA, torch tiles on CPU), only if `trl` is installed

Reported per shape: forward time, forward+backward time (gradients of hidden and weight), the
peak extra memory of forward+backward (CUDA: max_memory_allocated; CPU: peak resident memory), and
ratios against torch eager. The device and the path the fused op took are printed with the table.
On CPU the fused op runs its chunked torch path, so its times are CPU reference times, not kernel
times; the memory ratios are the meaningful CPU result.

    python bench/bench_linear_logprob.py            # issue shapes on CUDA; two mid-size shapes on CPU
    python bench/bench_linear_logprob.py --small    # under a minute on a 2-core CPU
    pytest bench/bench_linear_logprob.py            # pytest-benchmark: fused vs eager, fwd+bwd
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from trace_kernels._runtime import select_backend
from trace_kernels.linear_logprob import OP_NAME, linear_logprob
from trace_kernels.tools.autotune_report import format_tuned_configs

MODELS = {"Qwen3-8B": (4096, 151936), "SmolLM2": (576, 49152)}  # name -> (H, V)
CUDA_TOKENS = (2048, 8192, 16384, 32768)
CPU_SHAPES = [("SmolLM2", 1024), ("SmolLM2", 2048)]
SMALL_SHAPES = [("SmolLM2", 128), ("SmolLM2", 512)]


# ------------------------------------------------------------------------------------------------
# Implementations: each returns the scalar sum of the N per-token log-probabilities.


def fused_sum(hidden, weight, labels, backend=None):
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return linear_logprob(hidden, weight, rows, labels, check_inputs=False, backend=backend).sum()


def eager_token_logprobs(hidden, weight, labels):
    """[N] log-probabilities of the labels the plain way: logits in the inputs' dtype, [N, V] materialised."""
    log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return log_probs.gather(1, labels[:, None])[:, 0]


def eager_sum(hidden, weight, labels):
    return eager_token_logprobs(hidden, weight, labels).sum()


_compiled_chunk = None


def compiled_chunked_sum(hidden, weight, labels, chunk: int):
    """Per-chunk compiled log-prob; checkpointing drops each chunk's logits until backward needs them."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(eager_sum, dynamic=False)
    total = 0.0
    for t0 in range(0, hidden.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _compiled_chunk, hidden[t0 : t0 + chunk], weight, labels[t0 : t0 + chunk], use_reentrant=False
        )
    return total


def liger_sum_factory():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, labels: -loss(weight, hidden, labels)


def trl_chunked_sum_factory():
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception:
        return None
    vocab_chunk = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what GRPOTrainer passes
    # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, extra outputs)
    return lambda hidden, weight, labels: ChunkedLogProbFunction.apply(
        hidden, weight, None, labels, 1.0, vocab_chunk, None, 1.0, ()
    )[0].sum()


# ------------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class _CpuPeakMeter:
    """Peak resident memory of the process during a call (Linux: VmHWM, reset via clear_refs).

    glibc's mmap threshold is pinned low so freed blocks return to the OS and a later allocation
    cannot hide inside memory an earlier one left resident.
    """

    def __init__(self):
        self.available = sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)
        self._armed = False

    def _arm(self):
        """Pin the thresholds (slows later allocations: call only after all timings are taken)."""
        if not self._armed:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
            self._armed = True

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def extra_peak(self, fn: Callable[[], object]) -> int | None:
        if not self.available:
            return None
        self._arm()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # release free heap pages an earlier call left resident
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._status("VmRSS")
        fn()
        return self._status("VmHWM") - before


def extra_peak_bytes(fn: Callable[[], object], device: torch.device, cpu_meter: _CpuPeakMeter) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_meter.extra_peak(fn)


@dataclass
class Result:
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_bytes: int | None = None
    note: str = ""


def measure(result: Result, fn, hidden, weight, labels, *, repeats: int, warmup: int, cpu_meter=None) -> None:
    """Times (cpu_meter None) or peak memory (cpu_meter given) of fn into result; errors become notes."""
    device = hidden.device
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(h, w, labels)

    def forward_backward():
        return torch.autograd.grad(fn(h, w, labels), (h, w))

    if result.note:
        return  # it failed in the timing pass already
    try:
        if cpu_meter is None:
            result.fwd_ms = time_ms(forward, device, repeats, warmup)
            result.fwd_bwd_ms = time_ms(forward_backward, device, repeats, warmup)
        else:
            result.peak_bytes = extra_peak_bytes(forward_backward, device, cpu_meter)
    except torch.OutOfMemoryError:
        result.note = "out of memory"
    except Exception as err:  # a baseline that cannot run here (e.g. no compiler) is reported, not fatal
        result.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU, {len(os.sched_getaffinity(0))} cores"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result], device: torch.device, fused_path: str) -> None:
    print(f"\ndevice: {device_label(device)}   fused op path: {fused_path}")
    if device.type == "cpu":
        print("times are CPU reference times (the fused op's chunked torch path), not Triton kernel times")
    header = f"{'shape':<38}{'impl':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}{'speedup':>9}{'mem ratio':>10}  note"
    print(header)
    print("-" * len(header))
    eager = {r.shape: r for r in results if r.impl == "torch eager"}
    for r in results:
        base = eager.get(r.shape)
        speedup = base.fwd_bwd_ms / r.fwd_bwd_ms if base and base.fwd_bwd_ms and r.fwd_bwd_ms else None
        mem_ratio = r.peak_bytes / base.peak_bytes if base and base.peak_bytes and r.peak_bytes is not None else None
        peak_mib = None if r.peak_bytes is None else r.peak_bytes / 2**20
        print(
            f"{r.shape:<38}{r.impl:<24}{fmt(r.fwd_ms, '.1f'):>10}{fmt(r.fwd_bwd_ms, '.1f'):>12}"
            f"{fmt(peak_mib, '.1f'):>10}{fmt(speedup, '.2f'):>9}{fmt(mem_ratio, '.3f'):>10}  {r.note}"
        )
    print("speedup = torch eager fwd+bwd time / this; mem ratio = this peak / torch eager peak (fwd+bwd)")


CHECK_ROWS = 256  # rows checked against the fp32 reference before a shape is timed
CHECK_TOL = 1e-2  # fp32 accumulation lands ~1e-5 from it; a wrong kernel lands O(1) away


def check_fused(hidden, weight, labels, backend=None) -> tuple[float, float]:
    """Max |error| of the fused op and of torch eager (in the input dtype) against an fp32 reference on
    the first CHECK_ROWS rows; raises if the fused op is off, so a wrong kernel is never timed."""
    h, lab = hidden[:CHECK_ROWS], labels[:CHECK_ROWS]
    rows = torch.arange(h.shape[0], device=h.device)
    with torch.no_grad():
        ref = eager_token_logprobs(h.float(), weight.float(), lab)
        fused = linear_logprob(h, weight, rows, lab, backend=backend).float()
        eager = eager_token_logprobs(h, weight, lab)
    fused_err, eager_err = ((x - ref).abs().max().item() for x in (fused, eager))
    if not fused_err <= CHECK_TOL:
        raise AssertionError(
            f"linear_logprob is wrong: max |error| {fused_err:.3g} against the fp32 reference "
            f"(tolerance {CHECK_TOL}; torch eager in {hidden.dtype}: {eager_err:.3g})"
        )
    return fused_err, eager_err


def make_inputs(hidden_size: int, vocab: int, n_tokens: int, device, dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen).to(device)
    return hidden, weight, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small CPU-sized shapes (under a minute on 2 cores)")
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="include the torch.compile'd chunked baseline (default: on, except with --small on CPU)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--backend",
        choices=["triton", "cpu", "reference"],
        default=None,
        help="force the fused op's path (reference: the old name of cpu)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda" and not args.small:
        shapes = [(model, n) for model in MODELS for n in CUDA_TOKENS]
    else:
        shapes = SMALL_SHAPES if args.small else CPU_SHAPES
    use_compile = args.compile if args.compile is not None else not (args.small and device.type == "cpu")
    repeats = args.repeats or (10 if device.type == "cuda" else (1 if args.small else 3))
    warmup = 3 if device.type == "cuda" else 1
    chunk = 4096 if device.type == "cuda" else 512
    liger = liger_sum_factory()
    probe = torch.zeros(1, device=device)
    fused_path = select_backend(OP_NAME, probe, backend=args.backend).value
    if fused_path == "triton" and device.type == "cpu":
        fused_path += " (interpreter: very slow, keep shapes small)"
    elif fused_path == "cpu":
        fused_path += " (chunked torch)"

    impls = [("torch eager", eager_sum), ("fused linear_logprob", lambda h, w, l: fused_sum(h, w, l, args.backend))]
    if use_compile:
        impls.append(("torch.compile chunked", lambda h, w, l: compiled_chunked_sum(h, w, l, chunk)))
    if liger is not None and device.type == "cuda":
        impls.append(("Liger FLCE", liger))
    trl_chunked = trl_chunked_sum_factory()
    if trl_chunked is not None:
        impls.append(("TRL chunked logprob", trl_chunked))
    notes = []
    if not use_compile:
        notes.append("torch.compile chunked baseline not run (--small on CPU; pass --compile to include it)")
    if liger is None:
        notes.append("Liger-Kernel not installed: its baseline was not run")
    elif device.type != "cuda":
        notes.append("Liger-Kernel needs CUDA: its baseline was not run")
    if trl_chunked is None:
        notes.append("trl not installed (or not importable): the TRL chunked logprob baseline was not run")

    cpu_meter = _CpuPeakMeter()
    if device.type == "cpu" and not cpu_meter.available:
        notes.append("peak memory unavailable (needs Linux /proc/self/clear_refs)")
    results = {}
    # Timings first, memory second: the CPU memory meter changes malloc settings, which slows allocation.
    for pass_name in ("time", "memory"):
        for model, n_tokens in shapes:
            hidden_size, vocab = MODELS[model]
            hidden, weight, labels = make_inputs(hidden_size, vocab, n_tokens, device, dtype)
            label = f"{model} N={n_tokens} H={hidden_size} V={vocab}"
            if pass_name == "time":
                fused_err, eager_err = check_fused(hidden, weight, labels, args.backend)
                print(
                    f"  check: {label:<36} max |logprob error| vs fp32 reference: fused {fused_err:.2e}, "
                    f"torch eager {eager_err:.2e}",
                    flush=True,
                )
            for impl, fn in impls:
                result = results.setdefault((label, impl), Result(shape=label, impl=impl))
                meter = cpu_meter if pass_name == "memory" else None
                measure(result, fn, hidden, weight, labels, repeats=repeats, warmup=warmup, cpu_meter=meter)
                done = (
                    f"fwd+bwd {fmt(result.fwd_bwd_ms, '.1f')} ms"
                    if meter is None
                    else f"peak {fmt(None if result.peak_bytes is None else result.peak_bytes / 2**20, '.1f')} MiB"
                )
                print(f"  {pass_name}: {label:<36} {impl:<24} {done} {result.note}", flush=True)
            del hidden, weight, labels
    results = list(results.values())
    print_table(results, device, fused_path)
    print(
        f"dtype: {dtype}, repeats: {repeats} (median), warm-up calls: {warmup}; "
        "peak = extra memory of one fwd+bwd, gradients of hidden [N, H] and weight [V, H] included"
    )
    for note in notes:
        print("note:", note)
    print(format_tuned_configs())


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest bench/bench_linear_logprob.py` (fused vs eager in one group).


def _bench_inputs():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, n_tokens = ("Qwen3-8B", 8192) if device.type == "cuda" else SMALL_SHAPES[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden_size, vocab = MODELS[model]
    return make_inputs(hidden_size, vocab, n_tokens, device, dtype), f"{model} N={n_tokens}", device


def _run_benchmark(benchmark, fn):
    (hidden, weight, labels), shape, device = _bench_inputs()
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def step():
        grads = torch.autograd.grad(fn(h, w, labels), (h, w))
        _sync(device)
        return grads

    benchmark.group = f"linear_logprob fwd+bwd {shape} on {device_label(device)}"
    benchmark.extra_info["fused_path"] = select_backend(OP_NAME, hidden).value
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def test_fwd_bwd_torch_eager(benchmark):
    _run_benchmark(benchmark, eager_sum)


def test_fwd_bwd_fused_linear_logprob(benchmark):
    _run_benchmark(benchmark, fused_sum)


if __name__ == "__main__":
    main()
