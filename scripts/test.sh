#!/usr/bin/env bash
# Set up the environment (see scripts/setup_env.sh) and run the test-suite on CPU with pytest-xdist.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k packing`, `bash scripts/test.sh -m "not slow"`
# (the fast subset), `bash scripts/test.sh tests/test_forest.py -n 0` (no workers).
#
#   PYTEST_WORKERS   xdist workers (default: auto = one per CPU core)
#
# --dist loadfile keeps each test file on one worker: several files share expensive module-scoped
# fixtures (SmolLM2, tiny models, compiled Triton kernels), which `load` would rebuild on every worker.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test}" source "$REPO_ROOT/scripts/setup_env.sh"

cd "$REPO_ROOT"
set +e
"$VENV_PY" -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadfile --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected (or selected) nothing; never let that pass as green.
if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
