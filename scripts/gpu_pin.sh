#!/usr/bin/env bash
# On a lent GPU machine: the GPU tests, then pinning page-cached files in place (chunked,
# ahead of the loader) against the staging ring, S6 at 7b.   bash scripts/gpu_pin.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 170 python3 -m pytest -q tests/test_gpu.py tests/test_streaming.py -p no:cacheprovider -o addopts="" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout 120 python3 bench/gpu_stream.py --gb 4 --probe 2>&1 | tee "$OUT/probe.log" | tail -12
timeout 330 python3 - <<'PY' 2>&1 | grep -v "it/s\]" | tee "$OUT/s6.log"
import json, os, time
from fasthug_patch.bench import checkpoints, runner
t = time.time(); p = checkpoints.cached_checkpoint("llama", "7b", "bf16", progress=False)
print("7b at %s in %.0fs, %.2f GB" % (p, time.time() - t, checkpoints.weight_bytes(p) / 1e9))
for settings in ({"FASTHUG_PIN_FILES": "1"}, {}, {"FASTHUG_PIN_FILES": "1", "FASTHUG_PIN_CHUNK_MB": "64"}):
    r = runner.run_bench(p, n=2, warmup=1, dtype="bf16", device="cuda", progress=False, forward=False, settings=settings)
    s = r["stats"]
    print(settings, "stock %.3f patched %.3f identical %s" % (s["stock"]["ready_s"]["median"], s["patched"]["ready_s"]["median"], r.get("identical")), flush=True)
    print([(t["mode"], round(t["ready_s"], 3), (t.get("fasthug") or {}).get("summary")) for t in r["trials"]], flush=True)
    json.dump(r, open(os.path.join(os.environ["OUT"], "s6_%s.json" % ("_".join(settings.values()) or "ring")), "w"))
PY
