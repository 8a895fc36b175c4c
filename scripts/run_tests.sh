#!/usr/bin/env bash
# The test command (README.md and .ci/run call this).
# One virtual environment per transformers line, each on torch 2.13.0 (CPU build), with the
# package installed for real (so its .pth startup hook is in site-packages), then pytest.
#   FASTHUG_TEST_LINES="5.23.0"  bash scripts/run_tests.sh     # a single line
#   bash scripts/run_tests.sh -k sweep                          # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${FASTHUG_TEST_LINES:-5.23.0 4.57.6}"
python="${PYTHON:-python3}"
failed=0
for version in $lines; do
    venv=".venv-tf${version}"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" torch==2.13.0          # first, so nothing pulls a CUDA build
    "${pip[@]}" "transformers==${version}" ".[test]"
    echo "=== transformers ${version}: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || failed=1
done
exit "$failed"
