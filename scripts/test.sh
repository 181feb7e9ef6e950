#!/usr/bin/env bash
# Set up the environment (see scripts/setup_env.sh) and run the whole test-suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k packing`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test}" source "$REPO_ROOT/scripts/setup_env.sh"

cd "$REPO_ROOT"
set +e
"$VENV_PY" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing; never let that pass as green.
if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
