#!/usr/bin/env bash
# On a lent GPU machine (the device tool): environment, GPU tests, a short S6 bench.
#   bash scripts/gpu_check.sh [tests|bench|all]   (logs under $OUT when set)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, safetensors, accelerate, wrapt; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__, 'accelerate', accelerate.__version__)"
nproc; free -g | head -2; df -h /tmp | tail -1
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 420 python3 -m pytest -q -x tests/test_gpu.py -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import json, time
from fasthug_patch.bench import checkpoints, runner, ceiling
t=time.time(); p=checkpoints.cached_checkpoint("llama","1b","bf16",progress=False); print("built 1b in %.1fs"%(time.time()-t))
print(json.dumps(ceiling.h2d_gbps()))
for dev in ("cuda","cpu+cuda"):
    r=runner.run_bench(p, n=2, warmup=1, dtype="bf16", device=dev, progress=False)
    print(runner.format_table(r))
    for m in ("stock","patched"):
        print(m, [ (t.get("fasthug") or {}).get("summary") for t in r["trials"] if t["mode"]==m][:1])
PY
fi
