"""Every Triton kernel compiles for an H100 (sm_90) on this machine, GPU or not.

The interpreter runs kernels as numpy code and never lowers them, so a kernel can pass every
interpreter test and still fail to compile, spill registers or overflow shared memory on the GPU.
Triton compiles ahead of time without a driver (trace_kernels.tools.compile_check), so this runs on CPU.
It runs in a subprocess: the test session sets TRITON_INTERPRET=1, which swaps kernels for
interpreted ones.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # no NVIDIA backend or no bundled ptxas (e.g. a non-Linux triton wheel)
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend with ptxas")


def _compile_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is what launches use
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "trace_kernels.tools.compile_check", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.slow  # compiles every kernel: 33 s on 2 cores
def test_every_autotune_config_compiles_for_h100_without_spills(tmp_path):
    """bf16, head_dim 128 (Llama/Qwen): each config the autotuner may pick compiles for sm_90,
    fits its shared memory, spills no registers, and its tile loop loads are software-pipelined."""
    proc, report = _compile_check(tmp_path, "--arch", "90", "--dtype", "bf16", "--head-dim", "128", "--all-configs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    builds = report["builds"]
    kernels = {b["kernel"] for b in builds}
    assert kernels == {
        "tree_attn_fwd",
        "tree_attn_bwd_dq",
        "tree_attn_bwd_dkdv",
        "ll_row_stats",
        "ll_label_logits",
        "ll_logit_grad",
        "tree_decode_partial",
    }, kernels
    for b in builds:
        assert b["spill_stores"] == 0 and b["spill_loads"] == 0, f"{b['kernel']} {b['config']} spills: {b}"
        # loops over tiles feeding tl.dot must prefetch (cp.async); the branching tree-attention
        # loop (RUNS=False) cannot, which is why the run-scanning loop exists
        if b["kernel"] != "ll_label_logits" and "RUNS=False" not in b["config"]:
            assert b["async_loads"] > 0, f"{b['kernel']} {b['config']} loads are not pipelined: {b}"


_LIST_KERNELS = """
import importlib, json
from trace_kernels.tools import compile_check as cc
kernels = set()
for mod in cc.KERNEL_MODULES:
    m = importlib.import_module("trace_kernels." + mod)
    for name, obj in vars(m).items():
        if name.endswith("_kernel"):
            kernels.add(getattr(obj, "fn", obj) if hasattr(obj, "configs") else obj)
covered = {b.fn for b in cc.kernel_builds()}
print(json.dumps(sorted(k.__name__ for k in kernels - covered)))
"""


def test_every_kernel_of_the_package_is_checked():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _LIST_KERNELS], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "kernels missing from compile_check.kernel_builds"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only meaningful under the interpreter")
def test_compile_check_refuses_interpreted_kernels():
    """Under TRITON_INTERPRET=1 (CPU test sessions) kernels are interpreted: a clear error, not a crash."""
    from trace_kernels.tools import compile_check

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        compile_check.kernel_builds()
