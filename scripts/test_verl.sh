#!/usr/bin/env bash
# Make (or reuse) the verl venv (scripts/setup_verl_env.sh) and run the verl integration tests in it
# (tests/integrations/verl_integration, docs/verl.md). Extra arguments go to pytest.
#
#   VERL_VENV   the verl venv (default: <repo>/.venv-verl); the setup script's other variables apply too.
#               Its own name, not VENV: a VENV exported for the main venv (scripts/setup_env.sh) must not
#               turn that venv into the verl one (verl pins another transformers).
#
# In that venv every test must run: a skip means verl (or pyarrow) is missing, so it fails here.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_VENV:-$REPO_ROOT/.venv-verl}"
VENV="$VENV" bash "$REPO_ROOT/scripts/setup_verl_env.sh"

cd "$REPO_ROOT"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest tests/integrations/verl_integration -q -rs \
    --durations=10 "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no verl tests" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && grep -qE '^SKIPPED' "$log"; then
    echo "ERROR: verl tests were skipped in the verl venv (see above)" >&2
    exit 1
fi
exit "$rc"
