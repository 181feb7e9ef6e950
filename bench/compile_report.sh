#!/usr/bin/env bash
# Compile every Triton kernel for an H100 (sm_90; ARCH=80 for an A100) on this machine, GPU or not,
# and write the table to bench/results/compile_sm<arch>_triton<version>.md: registers, spills,
# shared memory and pipelined loads of each autotune candidate (trace_kernels.tools.compile_check).
# Another triton can be checked by putting it first on PYTHONPATH, e.g. `pip install --target /tmp/t36
# triton==3.6.0` and `PYTHONPATH=/tmp/t36 bash bench/compile_report.sh` (3.6 is what the GPU machines run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
ARCH="${ARCH:-90}"
version="$("$PY" -c 'import triton; print(triton.__version__)')"
out="bench/results/compile_sm${ARCH}_triton${version}.md"
failed=0
check() { "$PY" -m trace_kernels.tools.compile_check --arch "$ARCH" "$@" | grep -v '^triton ' || failed=1; }
{
    echo "# Kernels compiled for sm_${ARCH} with triton ${version}, on a CPU machine"
    echo
    echo "Made by \`bash bench/compile_report.sh\` on $(date -u +%Y-%m-%d) ($(uname -m), no GPU): Triton's"
    echo "ahead-of-time compiler and its bundled ptxas. Nothing here was run on a GPU; these are what"
    echo "ptxas reports for the code a launch would run. 'async loads' counts cp.async copies in the"
    echo "TTGIR: > 0 means the tile loop's loads are software-pipelined. The autotune candidates are"
    echo "chosen to spill nothing on sm_90; on other archs some may spill (autotuning then times them)."
    for d in 64 128 256; do
        echo
        echo "## bf16, head_dim $d: the configs the autotuner keeps"
        echo
        check --dtype bf16 --head-dim "$d" --all-configs
    done
    echo
    echo "## bf16, head_dim 128: every tree-attention candidate before pruning (why some are dropped)"
    echo
    check --dtype bf16 --head-dim 128 --all-configs --no-prune | grep -E '^\| (kernel|---|tree_attn)'
} > "$out"
echo "wrote $out"
[ "$failed" -eq 0 ] || { echo "some build failed or overflowed shared memory: see $out" >&2; exit 1; }
