#!/usr/bin/env bash
# The test command (README.md and .ci/run call this).
# Environments come from scripts/matrix.py (.matrix/: torch 2.13.0 CPU once in a shared base,
# one small venv per transformers release with the package installed for real, so its .pth
# startup hook is in site-packages):
#   - the whole suite on the newest 5.x and on 4.57;
#   - the architecture sweep, the activation tests and the fault tests on the oldest
#     supported line and a middle one (the rest of the compatibility matrix: python scripts/matrix.py run).
#   FASTHUG_TEST_LINES="5.24.0" FASTHUG_SUBSET_LINES="" bash scripts/run_tests.sh   # one line
#   bash scripts/run_tests.sh -k sweep                     # extra args go to every pytest
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
full="${FASTHUG_TEST_LINES:-5.24.0 4.57.6}"
subset="${FASTHUG_SUBSET_LINES-4.43.4 4.50.3}"
results=".matrix/results"
extra=""
[ "$#" -eq 0 ] || extra="$(printf '%q ' "$@")"  # pytest arguments, quoted for matrix.py's shlex
failed=0
if [ -n "${full// }" ]; then
    # shellcheck disable=SC2086
    "$python" scripts/matrix.py run --all-tests --results "$results" --pytest="$extra" $full || failed=1
fi
if [ -n "${subset// }" ]; then
    # shellcheck disable=SC2086
    # plus the fault tests: "never a SIGBUS" holds on the legacy loader path too
    "$python" scripts/matrix.py run --results "$results" --pytest="tests/test_faults.py $extra" $subset || failed=1
fi
exit "$failed"
