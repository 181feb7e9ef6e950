"""Compile every Triton kernel for an NVIDIA GPU without one, and report what the GPU would run.

Triton compiles ahead of time for any target: its LLVM back end and the bundled `ptxas` need no
driver. That makes the GPU build checkable on a CPU-only machine, which the interpreter cannot do
(it never lowers to PTX). Per kernel and autotune config this reports:

    registers / spill bytes   from `ptxas -v` on the generated PTX (spills cost local-memory traffic)
    shared memory             Triton's own figure; a config above the chip's limit is refused at launch
    async loads               cp.async / TMA copies in the TTGIR: > 0 means the loop loads are software
                              pipelined (num_stages > 1 prefetches the next tiles while computing)

Run it (not under TRITON_INTERPRET, which swaps kernels for interpreted ones):

    python -m trace_kernels.tools.compile_check --arch 90 --dtype bf16 --head-dim 128 [--all-configs]

`tests/kernels/test_kernel_compile.py` runs the default configs in a subprocess; the full table is in
bench/results/. Every `@triton.jit` kernel of the package has an entry in `kernel_builds` (a test
checks), so a new kernel cannot skip this check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # opt-in max per block (bytes)
# The package's Triton kernels, by module; kept in sync with `kernel_builds` by a test.
KERNEL_MODULES = ("tree_attention.triton", "linear_logprob.triton", "tree_decode.triton")


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """One specialisation of a kernel, as a launch on the GPU would specialise it."""

    kernel: str
    fn: object  # triton JITFunction (the autotuner's .fn)
    signature: dict  # arg name -> triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # arg name -> value (config meta-parameters included)
    aligned: frozenset  # args a launch marks 16-divisible (aligned pointers, strides)
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK") or k == "RUNS")
        return f"{meta} w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass
class BuildReport:
    kernel: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    async_loads: int
    compile_s: float

    def row(self) -> str:
        return (
            f"| {self.kernel} | {self.config} | {self.registers} | {self.spill_stores}/{self.spill_loads} | "
            f"{self.shared_bytes // 1024} KiB | {self.async_loads} | {self.compile_s:.1f} |"
        )


def _build(
    kernel, autotuned, types: dict, constexprs: dict, config, scalar_one: tuple = (), unaligned: tuple = ()
) -> KernelBuild:
    """Signature of the kernel behind `autotuned` from explicit types; every other arg is constexpr.

    Mirrors the JIT's specialisation: pointers and integers are marked 16-divisible (aligned
    tensors; model sizes and strides that are multiples of 16), except the kernel's
    do_not_specialize args and `unaligned` (token counts, arbitrary at run time: compiling them
    without the hint is the worst case a launch can hit); `scalar_one` are unit strides, which the
    JIT turns into the constant 1.
    """
    fn = autotuned.fn if hasattr(autotuned, "configs") else autotuned  # Autotuner wraps the JITFunction
    meta = dict(constexprs)
    if config is not None:
        meta.update(config.kwargs)
    no_hint = set(unaligned) | {p.name for p in fn.params if p.do_not_specialize}
    signature, aligned = {}, set()
    for name in fn.arg_names:
        if name in scalar_one:
            meta[name] = 1
        if name in meta:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
            if types[name] != "fp32" and name not in no_hint:
                aligned.add(name)
        else:
            raise KeyError(f"compile_check: no type for argument {name!r} of {fn.__name__}")
    meta = {k: v for k, v in meta.items() if k in fn.arg_names}
    warps = config.num_warps if config is not None else 4
    stages = config.num_stages if config is not None else 3
    return KernelBuild(kernel, fn, signature, meta, frozenset(aligned), warps, stages)


def _typed(names: str, ty: str) -> dict:
    """{name: ty} for each space-separated name."""
    return dict.fromkeys(names.split(), ty)


def kernel_builds(
    dtype: str = "bf16", head_dim: int = 128, all_configs: bool = False, prune: bool = True
) -> list[KernelBuild]:
    """Every Triton kernel of the package, specialised like a launch with `dtype` inputs.

    all_configs=False takes each autotuned kernel's first config only; prune=False keeps the
    configs the autotuner's early pruning would drop (to recalibrate it).
    """
    ta, ll, td = (importlib.import_module(f"trace_kernels.{module}") for module in KERNEL_MODULES)
    if getattr(ta, "_INTERPRET", False):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    t = DTYPES[dtype]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    pick = (lambda cs: cs) if all_configs else (lambda cs: cs[:1])
    # the attention kernels' autotuner drops configs that would spill at this head dim
    fit = (lambda kind, cs: pick(ta.fitting_configs(kind, cs, block_d))) if prune else (lambda kind, cs: pick(cs))
    builds: list[KernelBuild] = []

    attn_const = dict(
        GROUP=2,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        UPCAST=False,
        SCAN=64,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    scalars = {"T": "i32", "n_meta": "i32", "qk_scale_log2": "fp32", "sm_scale": "fp32"}
    fwd_types = {
        **_typed("Q K V O", f"*{t}"),
        **_typed("END KV_MAX_END FIRST_KV", "*i32"),
        "LSE": "*fp32",
        **scalars,
        **_typed("stride_qt stride_qh stride_kt stride_kh stride_vt stride_vh stride_ot stride_oh", "i32"),
    }
    for cfg in fit("fwd", ta._tree_attn_fwd_kernel.configs):
        builds.append(
            _build("tree_attn_fwd", ta._tree_attn_fwd_kernel, fwd_types, {**attn_const, "META_": ta.META}, cfg)
        )
    bwd_types = {
        **_typed("Q K V DO DQ DK DV", f"*{t}"),
        **_typed("END KV_MAX_END FIRST_KV", "*i32"),
        **_typed("LSE DELTA", "*fp32"),
        **scalars,
        **_typed("stride_qt stride_qh stride_kt stride_kh stride_vt stride_vh stride_dot stride_doh", "i32"),
    }
    for cfg in fit("dq", ta._tree_attn_bwd_dq_kernel.configs):
        builds.append(
            _build("tree_attn_bwd_dq", ta._tree_attn_bwd_dq_kernel, bwd_types, {**attn_const, "META_": ta.META}, cfg)
        )
    for cfg in fit("dkdv", ta._tree_attn_bwd_dkdv_kernel.configs):
        builds.append(_build("tree_attn_bwd_dkdv", ta._tree_attn_bwd_dkdv_kernel, bwd_types, attn_const, cfg))

    # linear_logprob: hidden and weight in `dtype`, unit stride along H (the JIT's constant 1)
    ll_const = dict(HAS_BIAS=False, UPCAST=False, IEEE_FP32=dtype == "fp32")
    unit = ("stride_hk", "stride_wk")
    tokens = ("U", "M", "T", "C")
    ll_types = {
        "h_ptr": f"*{t}",
        "w_ptr": f"*{t}",
        "b_ptr": f"*{t}",
        **_typed("max_ptr sum_ptr ent_ptr", "*fp32"),
        **dict.fromkeys(("U", "V", "H", "split_size", "M", "T", "C"), "i32"),
        **_typed("stride_hm stride_wv stride_dzm", "i32"),
        "inv_temp": "fp32",
        **_typed("rows_ptr labels_ptr", "*i64"),
        "out_ptr": "*fp32",
        **_typed("lse_ptr gsum_ptr gent_ptr", "*fp32"),
        "dz_ptr": f"*{t}",
    }
    for cfg in pick(ll._row_stats_kernel.configs):
        builds.append(
            _build(
                "ll_row_stats",
                ll._row_stats_kernel,
                ll_types,
                {**ll_const, "WITH_ENTROPY": True},
                cfg,
                scalar_one=unit,
                unaligned=tokens,
            )
        )
    builds.append(
        _build(
            "ll_label_logits",
            ll._label_logits_kernel,
            ll_types,
            dict(HAS_BIAS=False, BLOCK_M=64, BLOCK_K=64),
            None,
            scalar_one=unit,
            unaligned=tokens,
        )
    )
    for cfg in pick(ll._logit_grad_kernel.configs):
        builds.append(
            _build(
                "ll_logit_grad",
                ll._logit_grad_kernel,
                ll_types,
                {**ll_const, "WITH_ENTROPY_GRAD": True},
                cfg,
                scalar_one=unit + ("stride_dzv",),
                unaligned=tokens,
            )
        )

    # tree decode: the engine's shapes (block_q queries per tile, GQA group of 3 as in SmolLM2)
    group, block_q = 3, 16  # SmolLM2's GQA group; PagedTreeKVCache.decode_meta's default block_q
    dec_types = {
        "q_ptr": f"*{t}",
        "k_ptr": f"*{t}",
        "v_ptr": f"*{t}",
        "out_ptr": "*fp32",
        "lse_ptr": "*fp32",
        **_typed("seg_pages_ptr seg_len_ptr pair_ptr_ptr pair_query_ptr tile_seg_ptr tile_start_ptr", "*i32"),
        **_typed(
            "stride_qb stride_qh stride_kp stride_kt stride_kh stride_vp stride_vt stride_vh "
            "stride_pages stride_ob stride_oh stride_lb",
            "i32",
        ),
        "scale": "fp32",
        "page_size": "i32",
    }
    group_pad = 1 << (group - 1).bit_length()
    for cfg in pick(
        td.fitting_decode_configs(td._segment_partial_kernel.configs, block_d)
        if prune
        else td._segment_partial_kernel.configs
    ):
        builds.append(
            _build(
                "tree_decode_partial",
                td._segment_partial_kernel,
                dec_types,
                dict(
                    GROUP=group,
                    GROUP_PAD=group_pad,
                    BLOCK_Q=block_q,
                    BLOCK_ROWS=max(16, block_q * group_pad),
                    HEAD_DIM=head_dim,
                    HEAD_DIM_PAD=block_d,
                    UPCAST=dtype == "fp32",
                    IEEE_DOT=dtype == "fp32",
                ),
                cfg,
            )
        )
    return builds


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`, with Triton's own ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself runs for this arch

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        )
    log = res.stdout + res.stderr
    regs = _PTXAS_USAGE.search(log)
    spill = _PTXAS_SPILL.search(log)
    return (
        int(regs.group(1)) if regs else -1,
        int(spill.group(1)) if spill else 0,
        int(spill.group(2)) if spill else 0,
    )


def compile_build(build: KernelBuild, arch: int = 90) -> BuildReport:
    """Compile one build for NVIDIA compute capability `arch` (e.g. 90 = H100) and report it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": build.num_warps, "num_stages": build.num_stages})
    attrs = {(build.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in build.aligned}
    src = ASTSource(fn=build.fn, signature=build.signature, constexprs=build.constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"], arch)
    ttgir = compiled.asm["ttgir"]
    async_loads = len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir))
    return BuildReport(
        build.kernel, build.label, regs, spill_st, spill_ld, compiled.metadata.shared, async_loads, seconds
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    parser.add_argument("--no-prune", action="store_true", help="include configs the autotuner prunes")
    parser.add_argument("--json", type=Path, help="also write the reports (and failures) to this file")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, target sm_{args.arch}, {args.dtype}, head_dim {args.head_dim}")
    print("| kernel | config | registers | spill st/ld (B) | shared | async loads | compile s |")
    print("|---|---|---|---|---|---|---|")
    failures, records = 0, []
    limit = SHARED_LIMIT.get(args.arch, SHARED_LIMIT[90])
    for build in kernel_builds(args.dtype, args.head_dim, args.all_configs, not args.no_prune):
        try:
            report = compile_build(build, args.arch)
        except Exception as exc:  # report every failing build, then fail
            failures += 1
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"| {build.kernel} | {build.label} | FAILED: {error} |||||")
            records.append({"kernel": build.kernel, "config": build.label, "error": error})
            continue
        print(report.row(), flush=True)
        records.append(dataclasses.asdict(report))
        if report.shared_bytes > limit:
            failures += 1
            print(f"  ^ shared memory {report.shared_bytes} B exceeds sm_{args.arch}'s {limit} B")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "arch": args.arch,
                    "dtype": args.dtype,
                    "head_dim": args.head_dim,
                    "builds": records,
                },
                indent=1,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
