#!/usr/bin/env bash
# Run the test suite under the other Python versions the package supports (CI runs 3.11,
# the only one with a local CPU build of torch 2.13.0). Each gets a venv under .pyvers/
# (git-ignored) with the PyPI torch 2.13.0 (a CUDA build: several GB of nvidia packages on
# first install; it runs on the CPU), the newest transformers that Python can have, and
# this checkout installed as a wheel (so the startup hook is the checkout's).
#
#   bash scripts/python_versions.sh                  # 3.10 (4.57.6), 3.12 and 3.13 (5.24.0)
#   bash scripts/python_versions.sh 3.12:5.24.0      # one
#
# Interpreters are found under pyenv's versions, else as pythonX.Y on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."

# transformers 5.21 and later need Python 3.11: 3.10 gets the 4.57 line.
pairs=("$@")
[ "${#pairs[@]}" -gt 0 ] || pairs=(3.10:4.57.6 3.12:5.24.0 3.13:5.24.0)

find_python() {  # the first candidate that runs (a pyenv shim of an inactive version does not)
    local candidate
    for candidate in "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/python 2>/dev/null | sort -V | tail -1)" \
                     "$(command -v "python$1" 2>/dev/null)"; do
        if [ -n "$candidate" ] && "$candidate" -c "" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
}

status=0
for pair in "${pairs[@]}"; do
    version=${pair%%:*} transformers=${pair##*:}
    python=$(find_python "$version")
    if [ -z "$python" ]; then
        echo "== python $version: no interpreter found, skipped"
        continue
    fi
    env=.pyvers/py$version-tf$transformers
    if [ ! -x "$env/bin/python" ]; then
        "$python" -m venv "$env" || { status=1; continue; }
        "$env/bin/pip" install -q --disable-pip-version-check torch==2.13.0 "transformers==$transformers" \
            safetensors accelerate wrapt "bitsandbytes==0.50.2" numpy pytest hypothesis psutil tqdm \
            sentencepiece protobuf matplotlib || { status=1; continue; }
    fi
    "$env/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall . && rm -rf build
    echo "== python $version, transformers $transformers"
    "$env/bin/python" -m pytest -q -p no:cacheprovider tests | tail -3
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
