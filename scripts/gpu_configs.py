"""On a GPU machine: S6 (device_map="cuda") at 1b for a few ring/thread settings, ABBA n=2."""
import os
import sys

sys.path.insert(0, os.getcwd())
from fasthug_patch.bench import checkpoints, runner  # noqa: E402

path = checkpoints.cached_checkpoint("llama", sys.argv[1] if len(sys.argv) > 1 else "1b", "bf16", progress=False)
for ring, threads in (("16x32", "16"), ("16x32", "8"), ("8x32", "8"), ("8x64", "8")):
    os.environ["FASTHUG_RING"], os.environ["FASTHUG_THREADS"] = ring, threads
    r = runner.run_bench(path, n=2, warmup=1, dtype="bf16", device="cuda", progress=False)
    s = r["stats"]
    rep = [(t.get("fasthug") or {}).get("phases") for t in r["trials"] if t["mode"] == "patched"][-1]
    print(f"ring {ring} threads {threads}: stock {s['stock']['ready_s']['median']:.3f} patched "
          f"{s['patched']['ready_s']['median']:.3f} same {r.get('identical')} phases {rep}", flush=True)
