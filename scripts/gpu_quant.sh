#!/usr/bin/env bash
# Issues 5 and 6 on a lent GPU, on the device's transformers 5.x and on a carried 4.57 (the
# line fasthug's own ratios were measured against): first the GPU tests with the paths not
# yet run on a GPU opted in (FASTHUG_UNVERIFIED_GPU=1: 4.57's device_map="cuda", bitsandbytes
# to CUDA), then the suite at 1b: S5g-* (pre-quantised checkpoints), S4g-* (quantised on the
# fly) and S6 (bf16 to the GPU).
# The GPU image has no bitsandbytes and no 4.57, so both travel as wheels (about 60 MB of
# the 64 MiB a call may carry):
#   here:   bash scripts/gpu_quant.sh fetch          # wheels into .whl/ (git-ignored)
#   there:  bash scripts/gpu_quant.sh tests [SECONDS]  # with .whl carried: the GPU tests, both lines
#   there:  bash scripts/gpu_quant.sh run [SECONDS]    # then the suite, in a second call; results in $OUT
# PY names the interpreter (default python3), ROOT where results and docs go (default .).
# On a machine without CUDA every GPU scenario is skipped, which is how this script is
# checked without one: PY=.matrix/base/bin/python ROOT=/tmp/dry bash scripts/gpu_quant.sh tests (or run)
set -eu
PY=${PY:-python3}
case "${1:-}" in
fetch)
    exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    mkdir -p .whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.2 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
    du -sh .whl
    ;;
tests|run)
    OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
    pip_install="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
    $pip_install /tmp/fh_bnb .whl/bitsandbytes-*.whl
    $pip_install /tmp/fh_tf457 .whl/transformers-4.57.6-*.whl .whl/tokenizers-*.whl .whl/huggingface_hub-*.whl
    # The 4.57 line: the same interpreter, with 4.57 and its pins first on the path (kept first
    # when the bench prepends the package for its patched trials).
    printf '#!/usr/bin/env bash\nPYTHONPATH=/tmp/fh_tf457:/tmp/fh_bnb${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' \
        "$(command -v "$PY")" > /tmp/fh_python457
    chmod +x /tmp/fh_python457
    export PYTHONPATH=$PWD:/tmp/fh_bnb PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FASTHUG_UNVERIFIED_GPU=1
    if [ "$1" = tests ]; then  # one call: about 150 s a line at most
        for python in "$(command -v "$PY")" /tmp/fh_python457; do
            timeout "${2:-270}" "$python" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py \
                tests/test_v4_devices.py tests/test_quant.py tests/test_lookahead.py -k "gpu or GPU or cuda or v4_devices" \
                2>&1 | tee -a "$OUT/gpu_tests.log" | tail -3 || true
        done
        exit 0
    fi
    timeout "${2:-540}" "$PY" bench/suite.py run --python "$(command -v "$PY")" --python /tmp/fh_python457 \
        --sizes 1b --scenarios "${SCENARIOS:-S5g-int8,S5g-nf4,S4g-int8,S4g-nf4,S6}" -n 2 --warmup 1 --root "${ROOT:-.}" \
        2>&1 | grep -v "it/s\]" | tee "$OUT/suite.log" | grep -E "^==|time to ready|identical|path:|suite:" || true
    (cd "${ROOT:-.}" && tar czf "$OUT/results.tgz" bench/results docs/benchmarks.md 2>/dev/null) || true
    ls -la "$OUT"
    ;;
*)
    echo "usage: bash scripts/gpu_quant.sh fetch | tests [SECONDS] | run [SECONDS]" >&2
    exit 2
    ;;
esac
