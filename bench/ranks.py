"""Ranks sharing the reading (issue 8): N torchrun ranks against one patched process, cold.

    python bench/ranks.py [--size 1b] [--world 2] [-n 3] [--warmup 1]

Each round evicts the checkpoint's pages (posix_fadvise DONTNEED), then runs, alternating
(ABBA), either one patched process or ``torchrun --standalone --nproc-per-node=N`` of
patched ranks (no process group: torchrun's variables, as a training job has before
init_process_group). Every process imports the modeling module first, then times
from_pretrained plus one byte read in every weight page (time to ready), and records the
bytes it read from storage (/proc/self/io read_bytes: what actually came off the disk,
whoever's pages they became), the engine's own reads (report.bytes_filled) and a digest of
all weights. Writes bench/results/ranks/<transformers>-<size>-w<N>.json, which
``python bench/suite.py render`` puts in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _storage_read_bytes() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def worker(checkpoint: str, out: str) -> None:
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the clock starts

    import fasthug_patch
    from fasthug_patch.bench.trial import touch_pages, weights_digest

    read_before = _storage_read_bytes()
    began_at = time.time()  # wall clock, comparable across the ranks: how far apart they started
    began = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    returned = time.perf_counter() - began
    touch_pages(model)
    ready = time.perf_counter() - began
    report = fasthug_patch.last_report()
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "ready_s": ready, "returned_s": returned, "path": report.path,
              "storage_read_bytes": _storage_read_bytes() - read_before, "bytes_filled": report.bytes_filled,
              "ranks": report.ranks, "began_at": began_at, "phases": report.phases,
              "digest": weights_digest(model)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def _round(python: str, checkpoint: str, world: int) -> list[dict]:
    from fasthug_patch.bench.runner import evict

    evict(checkpoint)
    with tempfile.TemporaryDirectory() as out:
        script = [os.path.abspath(__file__), "worker", checkpoint, out]
        command = ([python, *script] if world == 1 else
                   [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *script])
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FASTHUG_")}, "FASTHUG_ENABLE": "1",
               "PYTHONPATH": ROOT}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return [json.load(open(name)) for name in sorted(glob.glob(os.path.join(out, "rank*.json")))]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1b")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--root", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)

    from fasthug_patch.bench import checkpoints, runner

    checkpoint = checkpoints.cached_checkpoint("llama", args.size, "bf16")
    info = json.loads(subprocess.run([args.python, "-c", "import json, transformers, torch; print(json.dumps("
                                      "{'transformers': transformers.__version__, 'torch': torch.__version__}))"],
                                     capture_output=True, text=True, check=True).stdout)
    rounds = {"single": [], "ranks": []}
    order = [("single", 1), ("ranks", args.world), ("ranks", args.world), ("single", 1)]
    plan = [order[i % 2] for i in range(2 * args.warmup)] + [order[i % 4] for i in range(2 * args.n)]
    for i, (kind, world) in enumerate(plan):
        results = _round(args.python, checkpoint, world)
        label = "warmup" if i < 2 * args.warmup else "measure"
        print(f"{label} {kind}: ready " + ", ".join(f"rank {r['rank']} {r['ready_s']:.2f}s "
                                                  f"(read {r['storage_read_bytes'] / 1e9:.2f} GB)" for r in results),
              flush=True)
        if label == "measure":
            rounds[kind].append(results)
    size_bytes = checkpoints.weight_bytes(checkpoint)
    single = [r[0]["ready_s"] for r in rounds["single"]]
    slowest = [max(x["ready_s"] for x in r) for r in rounds["ranks"]]
    digests = {x["digest"] for r in rounds["single"] + rounds["ranks"] for x in r}
    result = {
        "size": args.size, "world": args.world, "n": args.n, "warmup": args.warmup, "checkpoint_bytes": size_bytes,
        "transformers": info["transformers"], "torch": info["torch"],
        "machine": {**runner.machine_info(), "torch": info["torch"]},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "single_ready_s": runner.summarize(single), "ranks_slowest_ready_s": runner.summarize(slowest),
        "ratio": statistics.median(single) / statistics.median(slowest),
        "single_storage_read_bytes": [r[0]["storage_read_bytes"] for r in rounds["single"]],
        "ranks_storage_read_bytes": [sum(x["storage_read_bytes"] for x in r) for r in rounds["ranks"]],
        "ranks_bytes_filled": [[x["bytes_filled"] for x in r] for r in rounds["ranks"]],
        "identical": len(digests) == 1, "sharing": rounds["ranks"][0][0]["ranks"] if rounds["ranks"] else "",
        "command": f"python bench/ranks.py --size {args.size} --world {args.world} -n {args.n} --warmup {args.warmup}",
        "rounds": rounds,
    }
    os.makedirs(os.path.join(args.root, "ranks"), exist_ok=True)
    name = os.path.join(args.root, "ranks", f"{info['transformers']}-{args.size}-w{args.world}.json")
    with open(name, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: result[k] for k in ("single_ready_s", "ranks_slowest_ready_s", "ratio",
                                             "single_storage_read_bytes", "ranks_storage_read_bytes", "identical")}))
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
