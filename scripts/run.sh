#!/usr/bin/env bash
# Set up the environment (see scripts/setup_env.sh) and run the main job.
# Until the trainer lands, the main job is the smallest real thing the project has: packing a
# ~1M-token rollout forest with the numba packer vs a plain-Python packer (bench/bench_packing.py).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/setup_env.sh"

cd "$REPO_ROOT"
exec "$VENV_PY" bench/bench_packing.py "$@"
