#!/usr/bin/env bash
# Set up the environment (see scripts/setup_env.sh) and run the main job: `trace train` with the
# embedded default (a tiny model learns the slippery grid world with TRACE, on CPU, in minutes).
# Extra arguments go to `trace train`, e.g. `bash scripts/run.sh allocation.mode=uniform steps=50`; each run
# writes a fresh runs/<mode>-<YYYYmmdd-HHMMSS>/ (runs/latest points at it), so running it again loses nothing.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/setup_env.sh"

cd "$REPO_ROOT"
exec "$VENV/bin/trace" train "$@"
