#!/usr/bin/env bash
# On a lent GPU machine: the GPU tests, then the suite's GPU-relevant scenarios at 7b.
#   bash scripts/gpu_bench.sh [SECONDS_FOR_SUITE]   results: bench/results/<transformers>/, a tarball in $OUT
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FASTHUG_CEILING_THREADS=${FASTHUG_CEILING_THREADS:-4,16}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_streaming.py -p no:cacheprovider -o addopts="" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout "${1:-420}" python3 bench/suite.py run --sizes 7b --scenarios "${SCENARIOS:-S6,S6w,S6m,S1,S6c,S2}" -n 2 --warmup 1 \
  2>&1 | grep -v "it/s\]" | tee "$OUT/suite.log" | grep -E "^==|time to ready|identical|path:|suite:" 
tar czf "$OUT/results.tgz" bench/results docs/benchmarks.md 2>/dev/null; ls -la "$OUT"
